"""Tuning with and without pruning: the same study budget, side by side.

Two studies of the same search space (learning rate, weight decay, depth) on the ``tiny``
preset, each through the real ``genloop.tune.tune`` on one temporary workspace: the same
number of trials, the same TPE sampler seed, one worker each (so both are deterministic
apart from float noise). The subject prunes (successive halving by default: at each rung,
every ``eval_every`` × 3^k steps, a trial goes on only if it is in the best third of the
trials that reached the rung; ``--pruner median`` or ``hyperband`` for the others); the
baseline trains every trial to ``max_steps``.

Printed figures: the best validation loss each study found and the optimizer steps it
trained over all its trials. Target: pruning finds a best validation loss within 2 % of
the unpruned study's with at most 50 % of its steps.

The data is the built-in ``python-stdlib`` corpus (the first few hundred KB, cut into
80-line documents so the validation split has some), prepared once by ``prepare_dataset``
and shared by both studies. ``--quick`` shrinks the tiny preset to
2 layers × 64 wide (stated in the output) so that both studies fit in under a minute on
2 CPU cores.

    python benchmarks/bench_tune.py [--quick] [--trials N] [--steps N] [--workers W]
                                     [--pruner successive_halving|median|hyperband]
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

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TARGET_LOSS_RATIO = 1.02
TARGET_STEPS_RATIO = 0.5


def write_corpus(out: Path, limit_mb: float, lines: int = 80) -> float:
    """The first ``limit_mb`` MB of the python-stdlib corpus under ``out``, in pieces of
    ``lines`` lines: documents small and many enough for a validation split."""
    from genloop.data.records import Record
    from genloop.data.sources import build_source

    total, n = 0, 0
    out.mkdir(parents=True, exist_ok=True)
    for item in build_source({"type": "builtin", "name": "python-stdlib"}).records():
        if not isinstance(item, Record) or item.text is None:
            continue
        rows = item.text.splitlines(keepends=True)
        for i in range(0, len(rows), lines):
            piece = "".join(rows[i : i + lines])
            (out / f"{n:06d}.txt").write_text(piece, encoding="utf-8")
            n += 1
            total += len(piece.encode("utf-8", "surrogatepass"))
        if total >= limit_mb * 1e6:
            break
    return total / 1e6


def make_config(args: argparse.Namespace, corpus: Path, pruner: str) -> Any:
    from genloop.config import parse_config

    model: dict[str, Any] = {"preset": "tiny"}
    depth = {"type": "int", "low": 2, "high": 4}
    if args.quick:
        model |= {"n_layer": 2, "n_embd": 64, "n_head": 2, "intermediate_size": 128}
        depth = {"type": "int", "low": 1, "high": 2}
    return parse_config(
        {
            "name": "bench-tune",
            "data": {
                "name": "bench-stdlib",
                "kind": "text",
                "sources": [{"type": "files", "paths": [str(corpus)]}],
                "dedup": {"near": False},
                "pii": {"enabled": False},
                "split": {"val": 0.05, "test": 0.0},
                "workers": 1,
            },
            "tokenizer": {"vocab_size": args.vocab_size, "seq_len": args.seq_len},
            "model": model,
            "train": {
                "lr": 1e-3,
                "min_lr": 1e-5,
                "warmup_steps": max(1, args.steps // 10),
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "eval_every": args.eval_every,
                "eval_batches": 4,
                "checkpoint_every": args.steps,
                "device": args.device,
                "seed": 0,
            },
            "tune": {
                "trials": args.trials,
                "sampler": "tpe",
                "pruner": pruner,
                "space": {
                    "train.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
                    "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.3},
                    "model.n_layer": depth,
                },
            },
        }
    )


def run_study(ws: Any, cfg: Any, name: str, workers: int) -> tuple[Any, float]:
    from genloop.tune import tune

    def progress(o: Any) -> None:
        value = f"{o.value:.4f}" if o.value is not None else "-"
        print(f"  {name} trial {o.number:>2} {o.state:<9} val {value:>7} {o.steps:>5} steps")

    t0 = time.perf_counter()
    result = tune(ws, cfg, study_name=name, workers=workers, progress=progress)
    return result, time.perf_counter() - t0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Small model and budget (< 1 min).")
    p.add_argument("--trials", type=int, help="Trials per study [quick 10, else 24].")
    p.add_argument("--steps", type=int, help="max_steps of a trial [quick 40, else 200].")
    p.add_argument("--eval-every", type=int, help="Validate every N steps [steps / 8].")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, help="Tokens per sequence [quick 64, else 128].")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary [quick 512, else 2048].")
    p.add_argument("--corpus-mb", type=float, help="python-stdlib MB [quick 0.3, else 1].")
    p.add_argument(
        "--pruner",
        default="successive_halving",
        choices=["median", "hyperband", "successive_halving"],
        help="The subject's pruner [successive_halving].",
    )
    p.add_argument("--workers", type=int, default=1, help="Worker processes per study.")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models).")
    args = p.parse_args(argv)
    args.trials = args.trials or (10 if args.quick else 24)
    args.steps = args.steps or (40 if args.quick else 200)
    args.eval_every = args.eval_every or max(1, args.steps // 8)
    args.seq_len = args.seq_len or (64 if args.quick else 128)
    args.vocab_size = args.vocab_size or (512 if args.quick else 2048)
    args.corpus_mb = args.corpus_mb or (0.3 if args.quick else 1.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from genloop.data.prepare import prepare_dataset
    from genloop.workspace import init_workspace

    size = "tiny preset" + (" shrunk to 2 layers × 64 wide (--quick)" if args.quick else "")
    print(
        f"bench_tune: {size}, {args.trials} trials per study of up to {args.steps} steps "
        f"(validation every {args.eval_every}), batch {args.batch_size} × {args.seq_len}, "
        f"{args.pruner} pruner vs none, {args.workers} worker(s), {args.threads} thread(s)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="genloop-bench-tune-") as tmp_name:
        tmp = Path(tmp_name)
        mb = write_corpus(tmp / "corpus", args.corpus_mb)
        ws = init_workspace(tmp / "ws")
        try:
            pruned_cfg = make_config(args, tmp / "corpus", args.pruner)
            t0 = time.perf_counter()
            dataset, _ = prepare_dataset(ws, pruned_cfg.data, pruned_cfg.tokenizer)
            print(
                f"data: {mb:.2f} MB of python-stdlib → "
                f"{dataset.stats['splits']['train']['tokens']:,} training tokens in "
                f"{time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            unpruned_cfg = make_config(args, tmp / "corpus", "none")
            pruned, pruned_s = run_study(ws, pruned_cfg, "pruned", args.workers)
            unpruned, unpruned_s = run_study(ws, unpruned_cfg, "unpruned", args.workers)
        finally:
            ws.close()

    assert pruned.best_value is not None and unpruned.best_value is not None
    loss_ratio = pruned.best_value / unpruned.best_value
    steps_ratio = pruned.steps / unpruned.steps
    for name, r, secs in (("pruned", pruned, pruned_s), ("unpruned", unpruned, unpruned_s)):
        c = r.counts
        print(
            f"{name:>8}: best val_loss {r.best_value:.4f} (trial {r.best_trial}), "
            f"{r.steps:,} steps, {c['complete']} complete / {c['pruned']} pruned / "
            f"{c['failed']} failed, {secs:.1f} s; best {r.best_params}"
        )
    met = loss_ratio <= TARGET_LOSS_RATIO and steps_ratio <= TARGET_STEPS_RATIO
    print(
        f"pruning: best val_loss × {loss_ratio:.3f} (target ≤ {TARGET_LOSS_RATIO}) with "
        f"{steps_ratio:.0%} of the steps (target ≤ {TARGET_STEPS_RATIO:.0%}): "
        f"{'met' if met else 'NOT met'}; {time.perf_counter() - started:.0f} s in all "
        "(a shared machine makes the seconds noisy; the steps and losses are not)"
    )
    figures = {
        "best_val_loss_pruned": round(pruned.best_value, 4),
        "best_val_loss_unpruned": round(unpruned.best_value, 4),
        "steps_pruned": pruned.steps,
        "steps_unpruned": unpruned.steps,
        "val_loss_ratio": round(loss_ratio, 4),
        "steps_ratio": round(steps_ratio, 4),
        "pruned_trials": pruned.counts["pruned"],
        "trials": args.trials,
        "pruner": args.pruner,
        "seconds_pruned": round(pruned_s, 1),
        "seconds_unpruned": round(unpruned_s, 1),
        "target_met": met,
    }
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
