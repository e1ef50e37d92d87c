"""``bench_train.py --fsdp``: weights + optimizer memory per rank, FSDP2 next to one process.

The same model (``--preset``, default ``small``: 30M parameters at vocab 8192) is built the
way ``genloop train`` builds it (``genloop.train.text.build_on_meta``, then genloop's AdamW)
and trained for one step on the same global batch of random tokens, twice, each in fresh
processes so the figures don't mix:

- alone: one process, the whole model;
- FSDP2: ``torchrun --nproc-per-node 2`` on gloo (CPU), the model sharded at init.

What is measured, per rank, after the step:

- ``param_optim_mb``: the bytes of the parameters and of AdamW's state (``exp_avg``,
  ``exp_avg_sq``, ``step``) that the rank holds: the local shard sizes of the DTensors
  under FSDP2, the whole tensors alone. This is the figure FSDP2 divides; the target is
  ≤ 0.6× the single process's.
- ``peak_rss_delta_mb``: the process's peak resident memory (``ru_maxrss``, with glibc's
  mmap threshold fixed at 128 KiB so that freed tensors leave the resident set) minus its
  resident memory just before the model is built (after the imports, transformers'
  model code included), so gradients,
  activations, FSDP2's per-layer all-gathers and gloo buffers count too.
- ``init_rss_delta_mb``: the same peak, taken right after the model is built and
  initialised: a rank that held the whole model at init would show it here.

Ends with one flat JSON line (``fsdp_param_optim_mb_per_rank``,
``single_param_optim_mb``, ``fsdp_param_optim_ratio``, and the RSS twins).

    python benchmarks/bench_train.py --fsdp [--preset small] [--vocab-size 8192]
                                            [--batch-size 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--preset", default="small", help="tiny, small or base [small]")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=4, help="global sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="the tiny preset (a smoke run)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "tiny"
    return args


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): build, one step, write this rank's figures."""
    import torch

    from genloop.models.family import get_family
    from genloop.train import distributed
    from genloop.train.loop import make_optimizer
    from genloop.train.text import build_on_meta

    dist = distributed.setup("cpu")
    config = {"preset": args.preset, "vocab_size": args.vocab_size}
    with torch.device("meta"):  # import transformers' model code first: ~200 MB, not ours
        get_family("causal_lm").build(config)
    before = _rss_mb()
    torch.manual_seed(0)
    model = build_on_meta(config, dist.device, distributed.shard if dist.enabled else None)
    init_peak = _peak_rss_mb()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device=dist.device)
    # the same global batch, each rank its rows
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=g)
    mine = ids.chunk(dist.world_size)[dist.rank]
    loss = model(input_ids=mine, labels=mine).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(local_bytes(p) for p in model.parameters())  # tied weights counted once
    state = sum(
        local_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
    )
    figures = {
        "rank": dist.rank,
        "world_size": dist.world_size,
        "parameters": sum(p.numel() for p in model.parameters()),  # global count
        "param_mb": params / 2**20,
        "optim_mb": state / 2**20,
        "param_optim_mb": (params + state) / 2**20,
        "init_rss_delta_mb": init_peak - before,
        "peak_rss_delta_mb": _peak_rss_mb() - before,
        "loss": float(loss),
    }
    (args.worker / f"rank{dist.rank}.json").write_text(json.dumps(figures))
    distributed.teardown(dist)


def _run(args: argparse.Namespace, out: Path, ranks: int) -> list[dict[str, Any]]:
    out.mkdir()
    here = str(Path(__file__).resolve())
    flags = [
        f"--preset={args.preset}",
        f"--vocab-size={args.vocab_size}",
        f"--batch-size={args.batch_size}",
        f"--seq-len={args.seq_len}",
        f"--worker={out}",
    ]
    # glibc's dynamic mmap threshold keeps freed large blocks in the heap, so ru_maxrss
    # would record the allocator's high-water mark (FSDP2's freed all-gathers included),
    # not live memory; fixed, every tensor over 128 KiB is a mapping of its own, returned
    # to the system when freed. Both sides run under the same setting.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if ranks == 1:
        cmd = [sys.executable, here, *flags]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", f"--nproc-per-node={ranks}", here, *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        [single] = _run(args, Path(tmp) / "one", 1)
        ranks = _run(args, Path(tmp) / "two", 2)
    n = single["parameters"]
    print(
        f"{args.preset} preset, vocab {args.vocab_size}: {n / 1e6:.1f}M parameters; "
        f"one AdamW step on {args.batch_size}×{args.seq_len} tokens (fp32, CPU)"
    )
    print(
        f"{'':24}{'one process':>14}"
        + "".join(f"{'FSDP2 rank ' + str(r['rank']):>14}" for r in ranks)
        + f"{'ratio (max)':>14}"
    )
    rows = [
        ("params MB", "param_mb"),
        ("AdamW state MB", "optim_mb"),
        ("params + AdamW MB", "param_optim_mb"),
        ("peak RSS delta MB", "peak_rss_delta_mb"),
        ("RSS delta at init MB", "init_rss_delta_mb"),
    ]
    ratios: dict[str, float] = {}
    for label, key in rows:
        worst = max(r[key] for r in ranks)
        ratios[key] = worst / single[key] if single[key] else float("nan")
        print(
            f"{label:24}{single[key]:>14.1f}"
            + "".join(f"{r[key]:>14.1f}" for r in ranks)
            + f"{ratios[key]:>13.2f}×"
        )
    print(
        "params + AdamW: the local shard bytes of the parameters and of AdamW's state after "
        "the step; RSS delta: ru_maxrss minus the resident memory before building "
        "(gradients, activations and all-gathers included; MALLOC_MMAP_THRESHOLD_=131072)"
    )
    target = ratios["param_optim_mb"] <= 0.6
    print(f"target ≤ 0.60× for params + AdamW per rank: {'met' if target else 'NOT met'}")
    figures = {
        "fsdp_param_optim_mb_per_rank": round(max(r["param_optim_mb"] for r in ranks), 2),
        "single_param_optim_mb": round(single["param_optim_mb"], 2),
        "fsdp_param_optim_ratio": round(ratios["param_optim_mb"], 3),
        "fsdp_peak_rss_delta_mb_per_rank": round(max(r["peak_rss_delta_mb"] for r in ranks), 1),
        "single_peak_rss_delta_mb": round(single["peak_rss_delta_mb"], 1),
        "fsdp_peak_rss_ratio": round(ratios["peak_rss_delta_mb"], 3),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
