"""Image generation: the demo diffusion model next to its untrained self, side by side.

One run, one temporary workspace:

1. the bundled digits corpus is prepared and ``examples/digits-diffusion.yaml`` is trained
   with the real ``genloop.train.loop.train`` (``--steps`` overrides its 300 steps);
2. the dataset's classifier (the default FID extractor, ``evaluate/classifier.py``) is
   trained, or loaded when it is there;
3. ``--samples`` images (1,000) come from the trained model and as many, with the same
   seed and labels (every class in turn), from the same architecture freshly initialised;
4. FID of each against as many real training digits, with the same extractor; the time
   FID takes for 1,000 generated vs 1,000 real images (features of both sets + the
   Fréchet distance, the model's sampling excluded); and the conditional accuracy: the
   share of the trained model's samples the classifier assigns to the requested digit.

    python benchmarks/bench_images.py [--quick] [--steps N] [--samples N] [--threads N]

Final line: ``fid_trained``, ``fid_untrained``, ``fid_seconds_1000``,
``conditional_accuracy`` and extras (``fid_ratio`` = trained / untrained, KID, the real
held-out floor, train and sampling seconds, the extractor's id).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "digits-diffusion.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (under a minute, 2 cores)")
    p.add_argument("--steps", type=int, default=None, help="training steps [the example's 300]")
    p.add_argument("--samples", type=int, default=None, help="images per side [1000]")
    p.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = args.steps or 80
        args.samples = args.samples or 300
    args.samples = args.samples or 1000
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from genloop.config import load_config
    from genloop.evaluate.classifier import dataset_classifier, predict
    from genloop.evaluate.image import (
        FEATURE_BATCH,
        classifier_extractor,
        fid_from_features,
        heldout_images,
        image_scores,
        reference_images,
        untrained_like,
    )
    from genloop.models.image_generation import load_image_generator
    from genloop.train.loop import train
    from genloop.workspace import init_workspace, registry
    from genloop.workspace.datasets import resolve_dataset

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"train.max_steps={args.steps}"] if args.steps else []
    if args.steps:
        overrides.append(f"train.warmup_steps={min(20, args.steps // 4)}")
        overrides.append(f"train.eval_every={args.steps}")
    cfg = load_config(EXAMPLE, overrides)
    n = args.samples

    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        ws = init_workspace(Path(tmp) / "ws")
        try:
            log(f"training {EXAMPLE.name}: {cfg.train.max_steps} steps")
            started = time.perf_counter()
            result = train(ws, cfg, root=EXAMPLE.parent)
            train_seconds = time.perf_counter() - started
            assert result.model is not None
            dataset = resolve_dataset(ws, cfg.data.name if cfg.data else "digits")
            data_dir = ws.store.open_verified(dataset.artifact)
            judge, meta = dataset_classifier(ws, dataset, data_dir)
            extractor = classifier_extractor(judge, meta)

            gen = load_image_generator(registry.artifact_path(ws, result.model.ref))
            baseline = untrained_like(gen, cfg.train.seed)
            labels = gen.labels_for(None, n)
            log(f"sampling {n} images from each side")
            started = time.perf_counter()
            fake = gen.sample(labels, n, args.seed)
            sample_seconds = time.perf_counter() - started
            fake_untrained = baseline.sample(labels, n, args.seed)
            real = reference_images(data_dir, n, args.seed)

            trained = image_scores(real, fake, extractor, args.seed)
            untrained = image_scores(real, fake_untrained, extractor, args.seed)
            held = heldout_images(data_dir)
            floor = image_scores(real, held[0], extractor)["fid"] if held else float("nan")

            # FID timing on 1,000 vs 1,000 (features of both sets + the distance); with
            # fewer samples (--quick) the generated ones are cycled: the same work
            real_k = reference_images(data_dir, 1000, args.seed)
            fake_k = fake.repeat(-(-1000 // len(fake)), 1, 1, 1)[:1000]
            with torch.no_grad():
                started = time.perf_counter()
                f_real = torch.cat(
                    [
                        extractor.features(real_k[i : i + FEATURE_BATCH]).double()
                        for i in range(0, len(real_k), FEATURE_BATCH)
                    ]
                )
                f_fake = torch.cat(
                    [
                        extractor.features(fake_k[i : i + FEATURE_BATCH]).double()
                        for i in range(0, len(fake_k), FEATURE_BATCH)
                    ]
                )
                fid_from_features(f_real, f_fake)
                fid_seconds = time.perf_counter() - started

            wanted = torch.tensor(labels) if labels is not None else None
            accuracy = (
                float((predict(judge, fake) == wanted).float().mean())
                if wanted is not None
                else float("nan")
            )
        finally:
            ws.close()

    figures = {
        "fid_trained": round(trained["fid"], 3),
        "fid_untrained": round(untrained["fid"], 3),
        "fid_seconds_1000": round(fid_seconds, 3),
        "conditional_accuracy": round(accuracy, 4),
        "fid_ratio": round(trained["fid"] / untrained["fid"], 4),
        "kid_trained": round(trained["kid"], 3),
        "kid_untrained": round(untrained["kid"], 3),
        "fid_real_heldout": round(floor, 3),
        "samples": n,
        "fid_images_timed": [len(real_k), len(fake_k)],
        "train_steps": cfg.train.max_steps,
        "train_seconds": round(train_seconds, 1),
        "sample_seconds": round(sample_seconds, 2),
        "extractor": extractor.id,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
