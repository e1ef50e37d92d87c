"""QLoRA against LoRA: the same fine-tuning with the base in NF4, in fp32 and in bf16.

One base model (a preset, ``small`` by default: 8 layers × 512, built from a seed and
saved as a Hugging Face directory, once in float32 and once in bfloat16) is fine-tuned
with the same LoRA adapters (r 8 on the attention projections), data (the built-in
``python-stdlib`` corpus, prepared once), seed, batch and steps by the real
``genloop.train.loop.train``, in these variants:

- ``lora_fp32``: the float32 base, ``train.precision: fp32`` — the baseline;
- ``qlora_nf4``: the same base loaded in 4-bit NF4 (``model.lora.load_in_4bit``,
  bitsandbytes), fp32 compute;
- ``qlora_nf4_bf16``: the NF4 base with bf16 autocast (what ``precision: auto`` picks on
  this machine), where the device runs bf16;
- ``lora_bf16``: the bfloat16 base with bf16 autocast, where the device runs bf16.

Each variant runs in a process of its own, so that its memory is its own. On a CPU,
``memory_mb`` is the resident memory (RSS) at the end of the training steps, the highest
sample, and ``peak_mb`` the process's peak (``ru_maxrss``: loading, the first step's
allocations, the final evaluation and checkpoint included), both above the RSS once the
libraries are imported (the same for all). On a GPU ``memory_mb`` is
``torch.cuda.max_memory_allocated``. ``base_mb`` counts the frozen base's bytes as loaded
for training: parameters and buffers, and for a 4-bit layer its packed weight plus its
quantization state (block scales, code books), adapters left out.
Seconds per step are the median over steps ``warmup+1 … N-1`` (the last one evaluates),
from timestamps at the end of each step. The base is randomly initialized, so the losses
only show that each variant trains, and how far NF4 moves the curve from fp32's.

    python benchmarks/bench_qlora.py [--quick] [--preset small] [--steps N]
                                     [--batch-size B] [--seq-len T] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BASELINE = "lora_fp32"
VARIANTS = {  # name: (base dtype, load_in_4bit, train.precision)
    "lora_fp32": ("float32", False, "fp32"),
    "qlora_nf4": ("float32", True, "fp32"),
    "qlora_nf4_bf16": ("float32", True, "bf16"),
    "lora_bf16": ("bfloat16", False, "bf16"),
}
LORA: dict[str, Any] = {"r": 8, "alpha": 16.0, "dropout": 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke check: tiny, 5 steps of 2 × 32")
    p.add_argument("--preset", default=None, help="tiny, small or base (default small)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2)")
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (quick: 2)")
    p.add_argument("--seq-len", type=int, default=None, help="default 64 (quick: 32)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--corpus-mb", type=float, default=None, help="default 1 (quick: 0.3)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (default 1: steadier "
        "on a shared machine; 0 keeps torch's default)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON: one variant, in this process
    args = p.parse_args(argv)
    quick = args.quick
    args.preset = args.preset or ("tiny" if quick else "small")
    args.steps = args.steps or (5 if quick else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.batch_size = args.batch_size or (2 if quick else 4)
    args.seq_len = args.seq_len or (32 if quick else 64)
    args.corpus_mb = args.corpus_mb or (0.3 if quick else 1.0)
    if not 1 <= args.warmup < args.steps - 1:
        raise SystemExit(f"need 1 ≤ --warmup < --steps - 1 (got {args.warmup}, {args.steps})")
    return args


# ------------------------------------------------------------------------- one variant


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc; ru_maxrss elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes; KiB


def base_bytes(model: Any) -> int:
    """Bytes of the frozen base as it sits in memory: parameters and buffers, adapters
    left out, and for a 4-bit weight its quantization state too (scales, code books)."""
    import torch

    total, seen = 0, set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "lora_" in name or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            for value in state.as_dict(packed=False).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
    return total


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one variant in this process and return its figures."""
    import torch

    from genloop.config import parse_config
    from genloop.models.lora import apply_lora, import_bitsandbytes
    from genloop.models.pretrained import load_pretrained
    from genloop.train.distributed import pick_device
    from genloop.train.loop import compute_dtype
    from genloop.train.loop import train as genloop_train
    from genloop.workspace import Workspace

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import_bitsandbytes()
    for name in ("genloop.train.objectives", "genloop.train.text", "peft"):
        importlib.import_module(name)  # what the loop imports, now: the same RSS floor for all

    device = pick_device(spec["device"])
    idle_mb = rss_mb()
    dtype, in_4bit, precision = VARIANTS[spec["variant"]]
    base_dir = spec["base"][dtype]
    cfg = parse_config(
        {
            "name": spec["variant"].replace("_", "-"),
            "model": {
                "family": "causal_lm",
                "base_model": base_dir,
                "lora": {**LORA, "load_in_4bit": in_4bit},
            },
            "train": {
                "dataset": spec["dataset"],
                "lr": 1e-3,
                "min_lr": 1e-4,
                "warmup_steps": 1,
                "max_steps": spec["steps"],
                "batch_size": spec["batch_size"],
                "eval_every": spec["steps"],
                "eval_batches": 1,
                "checkpoint_every": spec["steps"],
                "precision": precision,
                "device": spec["device"],
                "seed": 0,
            },
        }
    )
    stamps: dict[int, float] = {}
    resident: list[float] = []

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        stamps[step] = time.perf_counter()
        if step < total:  # the last step also evaluates and checkpoints
            resident.append(rss_mb())

    ws = Workspace.open(spec["ws"])
    try:
        result = genloop_train(ws, cfg, progress=progress, register=False)
    finally:
        ws.close()
    # CPU: resident memory at the end of the training steps, above the imports' floor
    tracked = (
        torch.cuda.max_memory_allocated() / 1e6
        if device.type == "cuda"
        else max(resident) - idle_mb
    )
    peak = peak_rss_mb()
    last, warmup = spec["steps"] - 1, spec["warmup"]
    step_s = statistics.median(stamps[s] - stamps[s - 1] for s in range(warmup + 1, last + 1))

    # the base as the loop held it, measured after training (so as not to raise the peak)
    loaded = load_pretrained(base_dir, device=device, load_in_4bit=in_4bit)
    model = apply_lora(loaded, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"])
    base_mb = base_bytes(model) / 1e6
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "variant": spec["variant"],
        "device": str(device),
        "compute": compute_dtype(precision, device),
        "base_mb": round(base_mb, 2),
        "memory_mb": round(tracked, 1),
        "peak_mb": round(peak - idle_mb, 1),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(spec["batch_size"] * spec["seq_len"] / step_s, 1),
        "loss": round(result.history[-1], 4),
        "trainable": trainable,
    }


# ------------------------------------------------------------------------------ driver


def prepare(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The dataset in a workspace, and the base saved in float32 and in bfloat16."""
    import torch

    from bench_train import write_corpus  # this folder is on sys.path: run as a script
    from genloop.config import parse_config
    from genloop.data.prepare import prepare_dataset
    from genloop.data.tokenizer import eos_token_id, load_tokenizer
    from genloop.models.family import get_family
    from genloop.models.pretrained import save_hf_dir
    from genloop.workspace import init_workspace

    corpus = tmp / "corpus"
    write_corpus(corpus, args.corpus_mb)  # the same files bench_train.py trains on
    cfg = parse_config(
        {
            "name": "bench-qlora",
            "data": {
                "name": "bench-stdlib",
                "kind": "code",
                "sources": [{"type": "code", "path": str(corpus)}],
                "dedup": {"near": False},
                "pii": {"enabled": False},
                "split": {"val": 0.05, "test": 0.0},
            },
            "tokenizer": {"vocab_size": args.vocab_size, "seq_len": args.seq_len},
        }
    )
    ws = init_workspace(tmp / "ws")
    try:
        assert cfg.data is not None
        dataset, _ = prepare_dataset(ws, cfg.data, cfg.tokenizer)
        tok_dir = ws.store.open_verified(dataset.artifact) / "tokenizer"
    finally:
        ws.close()
    vocab = dataset.stats["tokenizer"]["vocab_size"]
    eos = eos_token_id(tok_dir, load_tokenizer(tok_dir))
    torch.manual_seed(0)
    model = get_family("causal_lm").build(
        {
            "preset": args.preset,
            "vocab_size": vocab,
            "context_length": max(args.seq_len, 64),
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": eos,
        }
    )
    params = sum(p.numel() for p in model.parameters())
    bases = {}
    for dtype in ("float32", "bfloat16"):
        model.to(getattr(torch, dtype))
        bases[dtype] = str(
            save_hf_dir(model, tmp / f"base-{dtype}", family="causal_lm", tokenizer_dir=tok_dir)
        )
    return {"ws": str(tmp / "ws"), "dataset": dataset.ref, "base": bases, "params": params}


def bf16_runs(device: str) -> bool:
    from genloop.train.distributed import pick_device
    from genloop.train.loop import compute_dtype

    return compute_dtype("auto", pick_device(device)) == "bf16"  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return {}
    started = time.perf_counter()
    from genloop.models.lora import import_bitsandbytes

    bnb_version = import_bitsandbytes().__version__
    names = [n for n in VARIANTS if bf16_runs(args.device) or "bf16" not in n]
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="genloop-bench-qlora-") as tmp_name:
        made = prepare(args, Path(tmp_name))
        print(
            f"bench_qlora: preset {args.preset} ({made['params'] / 1e6:.1f} M parameters), "
            f"{args.steps} steps of {args.batch_size} × {args.seq_len} (median of steps "
            f"{args.warmup + 1}…{args.steps - 1}), LoRA r {LORA['r']}, "
            f"{args.threads or 'default'} torch thread(s) per run, "
            f"bitsandbytes {bnb_version}",
            flush=True,
        )
        for name in names:
            spec = {**made, **vars(args), "variant": name, "child": None}
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {name}: done in {time.perf_counter() - started:.0f} s", flush=True)

    base = rows[BASELINE]
    header = (
        f"{'variant':<16}{'compute':>8}{'base MB':>10}{'×fp32':>7}{'mem MB':>9}{'×fp32':>7}"
        f"{'peak MB':>9}{'s/step':>9}{'×fp32':>7}{'tok/s':>8}{'loss':>8}"
    )
    what = "CUDA peak allocated" if base["device"].startswith("cuda") else "RSS while training"
    print(f"device: {base['device']}; mem = {what}, peak = peak RSS (MB above the imports)")
    print(header)
    for name, r in rows.items():
        ratios = [r[k] / base[k] for k in ("base_mb", "memory_mb", "step_s")]
        print(
            f"{name:<16}{r['compute']:>8}{r['base_mb']:>10.1f}{ratios[0]:>7.2f}"
            f"{r['memory_mb']:>9.1f}{ratios[1]:>7.2f}{r['peak_mb']:>9.1f}"
            f"{r['step_s']:>9.3f}{ratios[2]:>7.2f}"
            f"{r['tokens_per_s']:>8.0f}{r['loss']:>8.3f}"
        )
    figures: dict[str, Any] = {
        "device": base["device"],
        "bitsandbytes": bnb_version,
        "preset": args.preset,
        "params": made["params"],
        "steps": args.steps,
        "batch": args.batch_size,
        "seq_len": args.seq_len,
    }
    for name, r in rows.items():
        figures |= {
            f"{name}_base_mb": r["base_mb"],
            f"{name}_memory_mb": r["memory_mb"],
            f"{name}_peak_mb": r["peak_mb"],
            f"{name}_step_s": r["step_s"],
            f"{name}_loss": r["loss"],
        }
        if name != BASELINE:
            figures[f"{name}_base_ratio"] = round(r["base_mb"] / base["base_mb"], 3)
            figures[f"{name}_memory_ratio"] = round(r["memory_mb"] / base["memory_mb"], 3)
            figures[f"{name}_step_ratio"] = round(r["step_s"] / base["step_s"], 3)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
