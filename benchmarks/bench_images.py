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
    python benchmarks/bench_images.py --t2i-speed [--quick] [--threads N]
    python benchmarks/bench_images.py --t2i-quality [--quick] [--threads N] [--workspace DIR]

Final line: ``fid_trained``, ``fid_untrained``, ``fid_seconds_1000``,
``conditional_accuracy`` and extras (``fid_ratio`` = trained / untrained, KID, the real
held-out floor, train and sampling seconds, the extractor's id).

``--t2i-speed`` instead times text-to-image sampling: genloop's ``TextToImage.generate``
against diffusers' ``StableDiffusionPipeline`` on the same tiny random 32×32 pipeline
folder (AutoencoderKL + UNet2DConditionModel + CLIP text encoder), the same scheduler,
steps, guidance and seed: 8 prompts × 25 steps, each side timed in turn, best of 5. Final
line: ``t2i_images_per_s``, ``diffusers_images_per_s``, ``t2i_speed_ratio`` (ours / theirs,
wall time) and ``t2i_cpu_time_ratio`` (the same in process CPU seconds).

``--t2i-quality`` runs ``examples/shapes-t2i.yaml`` (data → parts: autoencoder, CLIP →
UNet → the t2i suite) with ``genloop.pipeline.runner.run_pipeline`` up to its eval stage,
evaluates the CLIP part with the clip suite, and prints the issue's targets beside the
figures: ``compositional_accuracy_seen`` (≥ 0.9) and ``_held_out`` (≥ 0.6),
``clip_zero_shot_joint_held_out`` (≥ 0.9), ``train_minutes`` (≥ 0: parts and UNet, ≤ 30)
and ``t2i_images_per_s``. ``--workspace`` keeps (and reuses) the prepared data and the
parts; ``--quick`` is a smoke run of the same flow with a few steps per model.
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
T2I_EXAMPLE = ROOT / "examples" / "shapes-t2i.yaml"
T2I_TARGETS = {
    "compositional_accuracy_seen": 0.9,
    "compositional_accuracy_held_out": 0.6,
    "clip_zero_shot_joint_held_out": 0.9,
}
T2I_MINUTES = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (under a minute, 2 cores)")
    p.add_argument("--steps", type=int, default=None, help="training steps [the example's 300]")
    p.add_argument("--samples", type=int, default=None, help="images per side [1000]")
    p.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--t2i-speed", action="store_true", help="time text-to-image sampling vs diffusers"
    )
    p.add_argument("--t2i-sampler", choices=("ddpm", "ddim", "dpm"), default="ddim", help="[ddim]")
    p.add_argument(
        "--t2i-quality",
        action="store_true",
        help="train examples/shapes-t2i.yaml and print its targets beside its figures",
    )
    p.add_argument("--workspace", type=Path, default=None, help="--t2i-quality: keep it here")
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
    if args.t2i_speed:
        figures = t2i_speed(args.t2i_sampler, args.seed, repeats=2 if args.quick else 5)
        print(json.dumps(figures))
        return figures
    if args.t2i_quality:
        figures = t2i_quality(args.workspace, args.quick)
        print(json.dumps(figures))
        return figures
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


# ----------------------------------------------------------------------- t2i sampling speed

T2I_PROMPTS = 8
T2I_STEPS = 25
T2I_GUIDANCE = 4.0


def tiny_pipeline(out: Path) -> Path:
    """A random text-to-image pipeline folder at 32×32 (8×8×4 latents): the shapes corpus'
    caption tokenizer, a 2-layer CLIP text encoder, a 2-level UNet of 64/128 channels."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from genloop.data.shapes import generate
    from genloop.data.tokenizer import load_hf_tokenizer, train_bpe
    from genloop.models.autoencoder_kl import FAMILY as AUTOENCODER
    from genloop.models.text_to_image import FAMILY, build_text_to_image

    captions = [c for _, c, _ in generate(500, seed=0)]
    tokenizer = load_hf_tokenizer(train_bpe(captions, out / "tok", vocab_size=320))
    torch.manual_seed(0)
    ae = AUTOENCODER.build({"image_size": 32, "channels": 3, "base_channels": 32})
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=48,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model = build_text_to_image(
        {"base_channels": 64, "layers_per_block": 1, "sampler": "ddim"},
        ae.vae,  # type: ignore[attr-defined]
        encoder,
        tokenizer,
    )
    return FAMILY.save(model, out / "pipe")


def t2i_speed(sampler: str, seed: int, repeats: int = 3) -> dict[str, Any]:
    """Images per second of our sampler and of diffusers' pipeline on the same folder."""
    import diffusers
    import numpy as np
    import torch

    from genloop.data.shapes import generate
    from genloop.models.text_to_image import SCHEDULERS, load_text_to_image

    prompts = [c for _, c, _ in generate(T2I_PROMPTS, seed=1)]
    with tempfile.TemporaryDirectory(prefix="bench-t2i-") as tmp:
        folder = tiny_pipeline(Path(tmp))
        ours = load_text_to_image(folder)
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(pipe.scheduler.config)

        def run_ours() -> Any:
            return ours.generate(
                prompts, seed=seed, steps=T2I_STEPS, guidance_scale=T2I_GUIDANCE, sampler=sampler
            )  # type: ignore[arg-type]

        def run_theirs() -> Any:
            return pipe(
                prompts,
                generator=torch.Generator().manual_seed(seed),
                num_inference_steps=T2I_STEPS,
                guidance_scale=T2I_GUIDANCE,
                output_type="np",
            ).images

        mine, theirs = run_ours(), run_theirs()  # warm-up, and the two must agree
        theirs_u8 = (np.asarray(theirs) * 255).round().astype(np.int64)
        max_diff = int(np.abs(mine.permute(0, 2, 3, 1).numpy().astype(np.int64) - theirs_u8).max())
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        cpu: dict[str, list[float]] = {"ours": [], "theirs": []}
        sides = [("ours", run_ours), ("theirs", run_theirs)]
        for i in range(repeats):
            for name, fn in sides if i % 2 else sides[::-1]:  # each side goes first in turn
                started, cpu_started = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - cpu_started)
    ours_s, theirs_s = min(times["ours"]), min(times["theirs"])
    # CPU seconds: the work done, steadier than wall time on a machine shared with others
    ours_cpu, theirs_cpu = min(cpu["ours"]), min(cpu["theirs"])
    return {
        "t2i_images_per_s": round(T2I_PROMPTS / ours_s, 3),
        "diffusers_images_per_s": round(T2I_PROMPTS / theirs_s, 3),
        "t2i_speed_ratio": round(theirs_s / ours_s, 3),
        "t2i_cpu_time_ratio": round(theirs_cpu / ours_cpu, 3),
        "t2i_max_pixel_diff": max_diff,
        "t2i_prompts": T2I_PROMPTS,
        "t2i_steps": T2I_STEPS,
        "t2i_sampler": sampler,
        "t2i_guidance_scale": T2I_GUIDANCE,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------- t2i: the targets

QUICK_T2I = [  # a smoke run of the same flow: a small dataset, a few steps per model
    "data.sources.0.count=300",
    "parts.ae.train.max_steps=6",
    "parts.ae.train.warmup_steps=1",
    "parts.clip.train.max_steps=6",
    "parts.clip.train.warmup_steps=1",
    "train.max_steps=6",
    "train.warmup_steps=1",
    "eval.t2i_prompts=4",
    "eval.t2i_images_per_prompt=2",
]


def t2i_quality(workspace: Path | None, quick: bool) -> dict[str, Any]:
    """``examples/shapes-t2i.yaml`` trained and evaluated; its figures beside the targets."""
    from genloop.config import EvalConfig, load_config
    from genloop.evaluate.run import evaluate_model
    from genloop.pipeline.runner import run_pipeline
    from genloop.workspace import init_workspace, registry, runs

    cfg = load_config(T2I_EXAMPLE, QUICK_T2I if quick else [])
    with tempfile.TemporaryDirectory(prefix="bench-t2i-quality-") as tmp:
        ws = init_workspace(workspace or Path(tmp) / "ws")
        try:
            started = time.perf_counter()
            result = run_pipeline(ws, cfg, root=T2I_EXAMPLE.parent, stop="eval", progress=log)
            seconds = time.perf_counter() - started
            stages = {o.stage: o for o in result.stages}
            train = stages["train"].outputs
            model = registry.resolve(ws, train["model"])
            # training time: each model's run, from its start to its end (data prep apart)
            minutes = 0.0
            for ref in [*train["parts"].values(), model.ref]:
                run_id = registry.resolve(ws, ref).run_id
                run = runs.get_run(ws, run_id) if run_id else None
                if run is not None and run.ended_at is not None:
                    minutes += (run.ended_at - run.started_at).total_seconds() / 60
            clip = evaluate_model(ws, train["parts"]["clip"], cfg=EvalConfig(suites=["clip"]))
            t2i = registry.resolve(ws, model.ref).metrics
        finally:
            ws.close()
    figures: dict[str, Any] = {
        "compositional_accuracy_seen": t2i.get("compositional_accuracy_seen"),
        "compositional_accuracy_held_out": t2i.get("compositional_accuracy_held_out"),
        "clip_zero_shot_joint_held_out": clip.metrics.get("zero_shot_joint_held_out"),
        "clip_zero_shot_joint_seen": clip.metrics.get("zero_shot_joint_seen"),
        "clip_score_seen": t2i.get("clip_score_seen"),
        "clip_score_held_out": t2i.get("clip_score_held_out"),
        "fid_clip": t2i.get("fid_clip"),
        "train_minutes": round(minutes, 2),
        "pipeline_minutes": round(seconds / 60, 2),
        "model": model.ref,
        "parts": train["parts"],
        "quick": quick,
    }
    for name, target in T2I_TARGETS.items():
        value = figures[name]
        met = value is not None and value >= target
        log(f"{name} = {value} (target >= {target}: {'met' if met else 'NOT met'})")
    met = figures["train_minutes"] <= T2I_MINUTES
    log(
        f"train_minutes = {figures['train_minutes']} (target <= {T2I_MINUTES}: "
        f"{'met' if met else 'NOT met'})"
    )
    return figures
