"""Training speed: genloop's loop next to a plain Hugging Face ``Trainer``, side by side.

Both train the same model (the same preset, built by the same function from the same seed,
so the same initial weights) on the same data (the same token windows in the same order),
with the same batch, steps, learning rate, warmup, cosine decay to ``min_lr``, AdamW
betas, weight decay and gradient clipping, in this one process, AT THE SAME PRECISION:

- fp32 vs fp32, always: genloop with ``train.precision: fp32`` against the Trainer's
  default (fp32);
- bf16 vs bf16 where the machine runs bf16 natively (a GPU that supports it, a CPU with
  AVX512-BF16 or AMX: what ``train.precision: auto`` picks): genloop with
  ``train.precision: bf16`` (autocast) against the Trainer with ``bf16=True``.

- genloop: the real ``genloop.train.loop.train`` on a temporary workspace (dataset version,
  run tracking, metrics, checkpoint at the end; model registration off), compiled or not
  as ``train.compile: auto`` would for a long run (``--compile``: on on a GPU, off on a
  CPU; auto itself leaves runs shorter than ``COMPILE_AUTO_MIN_STEPS`` eager).
- Trainer: ``transformers.Trainer`` with default ``TrainingArguments`` apart from those
  hyperparameters (its default fused AdamW, no evaluation, no saving,
  ``report_to="none"``), fed the same windows in the same order through an
  ``IterableDataset`` (``shift_labels`` = genloop's targets, so both compute the loss on the
  same next tokens).

When genloop compiles, it also trains once more eagerly in fp32, to put a figure on
torch.compile's warm-up: the extra seconds of its first step (setup to the end of step 1,
compiled minus eager) and the steps after which the faster steps have paid them back.

The data is the built-in ``python-stdlib`` corpus (the first few MB; less with ``--quick``),
prepared by ``prepare_dataset``: byte-level BPE, packed into token shards.

Steady state: each side's time per step comes from timestamps taken at the end of every
step (genloop's progress callback, the Trainer's ``on_step_end``); the first
``--warmup`` steps and the last one (genloop evaluates and checkpoints there) are left
out of both, and tokens/s is B·T over the median step time (the machine may be shared;
the mean is printed too). The final losses of each run are printed so the precision's
effect on the loss curve can be checked. On a GPU, MFU = (6N + 12·L·H·Q·T) FLOPs/token ×
tokens/s over the device's bf16 dense peak (``genloop.models.presets.flops_per_token``).

    python benchmarks/bench_train.py [--quick] [--preset tiny] [--steps N] [--batch-size B]
                                     [--seq-len T] [--device auto|cpu|cuda]
                                     [--compile on|off|auto] [--no-bf16] [--no-eager]

``--fsdp`` measures something else: the weights + optimizer memory per rank of FSDP2 on 2
CPU ranks next to one process (``benchmarks/_fsdp_memory.py``, which documents its flags).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Dense bf16 peak TFLOPS (without sparsity), by a substring of the CUDA device name.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}
TARGET_RATIO_CPU = 1.5
COMPILE = {"on": True, "off": False, "auto": "auto"}  # --compile → train.compile
# What a step's time is read from (--clock): wall-clock seconds, or the process's CPU
# seconds, which with --threads 1 hardly move when others load a shared machine
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


@dataclass
class Side:
    """One training run: seconds per step (steady state) and the loss at each step."""

    name: str
    dtype: str
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tokens_per_step: int = 0
    first_step_s: float = 0.0  # from the call that starts training to the end of step 1

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / statistics.median(self.step_seconds)

    @property
    def mean_tokens_per_s(self) -> float:
        return self.tokens_per_step / statistics.fmean(self.step_seconds)


# ------------------------------------------------------------------------------ data


def write_corpus(out: Path, limit_mb: float) -> float:
    """The first ``limit_mb`` MB of the python-stdlib corpus as files under ``out``."""
    from genloop.data.records import Record
    from genloop.data.sources import build_source

    total = 0
    for item in build_source({"type": "builtin", "name": "python-stdlib"}).records():
        if not isinstance(item, Record) or item.text is None:
            continue
        path = out / item.id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(item.text, encoding="utf-8")
        total += len(item.text.encode("utf-8", "surrogatepass"))
        if total >= limit_mb * 1e6:
            break
    return total / 1e6


def make_config(
    args: argparse.Namespace, corpus: Path, precision: str, compile_: str | None = None
) -> Any:
    from genloop.config import parse_config

    return parse_config(
        {
            "name": "bench",
            "data": {
                "name": "bench-stdlib",
                "kind": "code",
                "sources": [{"type": "code", "path": str(corpus)}],
                "dedup": {"near": False},
                "pii": {"enabled": False},
                "split": {"val": 0.02, "test": 0.0},
            },
            "tokenizer": {"vocab_size": args.vocab_size, "seq_len": args.seq_len},
            "model": {"preset": args.preset},
            "train": {
                "lr": 3e-4,
                "min_lr": 3e-5,
                "warmup_steps": max(1, args.steps // 10),
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "eval_every": args.steps,  # one evaluation, at the last (untimed) step
                "eval_batches": 1,
                "checkpoint_every": args.steps,
                "precision": precision,
                "compile": COMPILE[compile_ or args.compile],
                "device": args.device,
                "seed": 0,
            },
        }
    )


# ------------------------------------------------------------------------------ genloop


def run_genloop(ws: Any, cfg: Any, warmup: int, name: str = "genloop") -> Side:

    from genloop.train.distributed import pick_device
    from genloop.train.loop import compute_dtype
    from genloop.train.loop import train as genloop_train

    dtype = compute_dtype(cfg.train.precision, pick_device(cfg.train.device))
    side = Side(name, dtype, tokens_per_step=cfg.train.batch_size * cfg.tokenizer.seq_len)
    stamps: dict[int, float] = {}
    first: list[float] = []

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        stamps[step] = CLOCK()
        if step == 1:
            first.append(time.perf_counter())

    started = time.perf_counter()
    result = genloop_train(ws, cfg, progress=progress, register=False)
    side.first_step_s = first[0] - started
    side.losses = list(result.history)
    side.step_seconds = _durations(stamps, warmup, cfg.train.max_steps)
    return side


# ------------------------------------------------------------------------------ Trainer


def run_trainer(ws: Any, cfg: Any, warmup: int, *, bf16: bool, out_dir: Path) -> Side:
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from genloop.data.pack import TokenDataset
    from genloop.train.distributed import pick_device
    from genloop.train.text import build_model
    from genloop.workspace.datasets import resolve_dataset

    t = cfg.train
    device = pick_device(t.device)
    data_dir = ws.store.open_verified(resolve_dataset(ws, "bench-stdlib").artifact)
    torch.manual_seed(t.seed)  # as the loop does before building: the same initial weights
    model, _, _ = build_model(
        ws, cfg.model, data_dir / "tokenizer", device, seq_len=cfg.tokenizer.seq_len
    )
    windows = TokenDataset(data_dir / "tokens", "train", cfg.tokenizer.seq_len)

    class Windows(torch.utils.data.IterableDataset[dict[str, torch.Tensor]]):
        """genloop's training windows, one sequence at a time, in genloop's order."""

        def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
            for x, y in windows.batches(t.batch_size, t.seed, 0):
                for row_x, row_y in zip(x, y, strict=True):
                    ids, targets = torch.from_numpy(row_x), torch.from_numpy(row_y)
                    yield {"input_ids": ids, "labels": targets, "shift_labels": targets}

    stamps: dict[int, float] = {}
    first: list[float] = []
    started = time.perf_counter()

    class Stamps(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps[state.global_step] = CLOCK()
            if state.global_step == 1:
                first.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        learning_rate=t.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": t.min_lr},
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        max_grad_norm=t.grad_clip,
        bf16=bf16,
        use_cpu=device.type == "cpu",
        logging_steps=1,  # the loss of every step, for the comparison (genloop keeps it too)
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,  # keep shift_labels (not in forward's signature)
        seed=t.seed,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=Windows(), callbacks=[Stamps()])
    trainer.remove_callback(PrinterCallback)  # no log line per step on stdout
    trainer.train()
    side = Side(
        "hf_trainer_bf16" if bf16 else "hf_trainer_fp32",
        "bf16" if bf16 else "fp32",
        tokens_per_step=t.batch_size * cfg.tokenizer.seq_len,
    )
    side.first_step_s = first[0] - started
    side.losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    side.step_seconds = _durations(stamps, warmup, t.max_steps)
    return side


def _durations(stamps: dict[int, float], warmup: int, steps: int) -> list[float]:
    """Seconds of steps warmup+1 … steps-1 (the last step evaluates and checkpoints)."""
    last = steps - 1
    if warmup < 1 or last <= warmup:
        raise SystemExit(f"need 1 ≤ --warmup < --steps - 1 (got warmup {warmup}, steps {steps})")
    return [stamps[s] - stamps[s - 1] for s in range(warmup + 1, last + 1)]


# ------------------------------------------------------------------------------ MFU


def peak_bf16_flops(device: Any, override_tflops: float | None) -> float | None:
    import torch

    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def model_flops_per_token(cfg: Any, vocab: int) -> int:
    from genloop.models.presets import causal_lm_spec, flops_per_token

    spec = causal_lm_spec(cfg.model.preset, vocab_size=vocab)
    return flops_per_token(spec, cfg.tokenizer.seq_len)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (a few minutes, 2 cores)")
    p.add_argument("--preset", default=None, help="tiny, small or base [tiny; base on a GPU]")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--corpus-mb", type=float, default=None, help="MB of python-stdlib to use")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    p.add_argument(
        "--compile",
        default=None,
        choices=tuple(COMPILE),
        help="train.compile for genloop [what auto picks for a long run: on on a GPU, "
        "off on a CPU]",
    )
    p.add_argument(
        "--clock",
        default="wall",
        choices=tuple(CLOCKS),
        help="step times in wall-clock or process CPU seconds (cpu: use with --threads 1)",
    )
    p.add_argument("--repeat", type=int, default=None, help="runs of each side; the best counts")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 vs bf16 pair")
    p.add_argument("--no-eager", action="store_true", help="skip the eager run (compile's cost)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak for MFU")
    args = p.parse_args(argv)

    import torch

    gpu = args.device != "cpu" and torch.cuda.is_available()
    quick, big = args.quick, gpu and not args.quick
    defaults = {
        "preset": "base" if big else "tiny",
        "steps": 6 if quick else 30,
        "warmup": 2 if quick else 5,
        "batch_size": 8 if quick else 16,
        "seq_len": 1024 if big else 256,
        "corpus_mb": 0.5 if quick else 4.0,
        "repeat": 1 if quick else 2,
        "compile": "on" if gpu else "off",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()

    import torch

    from genloop.data.prepare import prepare_dataset
    from genloop.train.distributed import pick_device
    from genloop.train.loop import compute_dtype
    from genloop.workspace import init_workspace

    device = pick_device(args.device)
    bf16 = compute_dtype("auto", device) == "bf16" and not args.no_bf16
    print(
        f"bench_train: preset {args.preset}, {args.steps} steps (the first {args.warmup} and "
        f"the last untimed), batch {args.batch_size} × seq_len {args.seq_len}, {device}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, genloop train.compile "
        f"{COMPILE[args.compile]}, precisions fp32{' and bf16' if bf16 else ''}, "
        f"best of {args.repeat}",
        flush=True,
    )
    best: dict[str, Side] = {}
    with tempfile.TemporaryDirectory(prefix="genloop-bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        mb = write_corpus(tmp / "corpus", args.corpus_mb)
        ws = init_workspace(tmp / "ws")
        try:
            cfg = make_config(args, tmp / "corpus", "fp32")
            t0 = time.perf_counter()
            dataset, _ = prepare_dataset(ws, cfg.data, cfg.tokenizer)
            train_tokens = dataset.stats["splits"]["train"]["tokens"]
            vocab = dataset.stats["tokenizer"]["vocab_size"]
            print(
                f"data: {mb:.1f} MB of python-stdlib → {train_tokens:,} training tokens "
                f"(vocab {vocab:,}) in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            runs = plan_runs(args, ws, tmp, bf16=bf16)
            for r in range(args.repeat):
                # alternate the order, so neither side always runs first on a shared machine
                for name, run in runs if r % 2 == 0 else runs[::-1]:
                    side = run()
                    report(side)
                    if name not in best or side.tokens_per_s > best[name].tokens_per_s:
                        best[name] = side
        finally:
            ws.close()

    compare_losses(list(best.values()))
    figures: dict[str, Any] = {}
    ratios: dict[str, float] = {}
    for dtype in ("fp32", "bf16"):
        ours, hf = best.get(f"genloop_{dtype}"), best.get(f"hf_trainer_{dtype}")
        if ours is None or hf is None:
            continue
        ratios[dtype] = ours.tokens_per_s / hf.tokens_per_s
        print(
            f"{dtype} vs {dtype}: genloop ({ours.dtype}) {ours.tokens_per_s:,.0f} tokens/s, "
            f"Trainer ({hf.dtype}) {hf.tokens_per_s:,.0f} tokens/s: {ratios[dtype]:.2f}×"
        )
        figures |= {
            f"{dtype}_tokens_per_s": round(ours.tokens_per_s, 1),
            f"hf_trainer_{dtype}_tokens_per_s": round(hf.tokens_per_s, 1),
            f"ratio_{dtype}": round(ratios[dtype], 3),
            f"{dtype}_final_loss": round(ours.losses[-1], 4),
            f"hf_trainer_{dtype}_final_loss": round(hf.losses[-1], 4),
        }
    figures |= compile_cost(best.get("genloop_fp32"), best.get("genloop_fp32_eager"))
    fastest = max((s for s in best.values() if s.name.startswith("genloop")), key=_speed)
    peak = peak_bf16_flops(device, args.peak_tflops)
    figures["mfu"] = None
    if peak is not None:
        flops = model_flops_per_token(cfg, vocab) * fastest.tokens_per_s
        figures["mfu"] = round(flops / peak, 4)
    figures |= {
        "preset": args.preset,
        "steps": args.steps,
        "timed_steps": len(fastest.step_seconds),
        "batch": args.batch_size,
        "seq_len": args.seq_len,
        "device": str(device),
        "compile": COMPILE[args.compile],
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "repeat": args.repeat,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if device.type == "cpu" and args.preset == "tiny":
        for dtype, ratio in ratios.items():
            verdict = "meets" if ratio >= TARGET_RATIO_CPU else "misses"
            print(
                f"target ≥ {TARGET_RATIO_CPU}× Trainer on CPU for tiny, {dtype} vs {dtype}: "
                f"{verdict} ({ratio:.2f}×)"
            )
    print(json.dumps(figures))
    return figures


def plan_runs(
    args: argparse.Namespace, ws: Any, tmp: Path, *, bf16: bool
) -> list[tuple[str, Callable[[], Side]]]:
    """The runs of one repeat: genloop and the Trainer in fp32, the same in bf16 where the
    machine runs it natively, and genloop eager in fp32 when genloop compiles."""
    corpus = tmp / "corpus"
    fp32_cfg = make_config(args, corpus, "fp32")
    runs: list[tuple[str, Callable[[], Side]]] = [
        ("genloop_fp32", lambda: run_genloop(ws, fp32_cfg, args.warmup, "genloop_fp32")),
        (
            "hf_trainer_fp32",
            lambda: run_trainer(ws, fp32_cfg, args.warmup, bf16=False, out_dir=tmp / "hf"),
        ),
    ]
    if bf16:
        bf16_cfg = make_config(args, corpus, "bf16")
        runs += [
            ("genloop_bf16", lambda: run_genloop(ws, bf16_cfg, args.warmup, "genloop_bf16")),
            (
                "hf_trainer_bf16",
                lambda: run_trainer(ws, bf16_cfg, args.warmup, bf16=True, out_dir=tmp / "hf16"),
            ),
        ]
    if args.compile != "off" and not args.no_eager:
        eager_cfg = make_config(args, corpus, "fp32", "off")
        runs.append(
            (
                "genloop_fp32_eager",
                lambda: run_genloop(ws, eager_cfg, args.warmup, "genloop_fp32_eager"),
            )
        )
    return runs


def compile_cost(compiled: Side | None, eager: Side | None) -> dict[str, Any]:
    """torch.compile's warm-up against the eager run: extra seconds to the end of step 1,
    the speed-up per step, and the steps after which it has paid for itself."""
    if compiled is None or eager is None:
        return {}
    extra = compiled.first_step_s - eager.first_step_s
    saved = statistics.median(eager.step_seconds) - statistics.median(compiled.step_seconds)
    even = math.ceil(extra / saved) if saved > 0 else None
    speedup = eager.tokens_per_s and compiled.tokens_per_s / eager.tokens_per_s
    print(
        f"torch.compile (fp32): first step {compiled.first_step_s:.1f} s vs "
        f"{eager.first_step_s:.1f} s eager (+{extra:.1f} s warm-up); steady state "
        f"{speedup:.2f}× eager; pays for itself after "
        + (f"{even} steps" if even is not None else "never (no faster than eager)")
    )
    return {
        "eager_fp32_tokens_per_s": round(eager.tokens_per_s, 1),
        "compile_speedup_fp32": round(speedup, 3),
        "compile_warmup_s": round(extra, 1),
        "compile_break_even_steps": even,
    }


def _speed(side: Side) -> float:
    return side.tokens_per_s


def report(side: Side) -> None:
    print(
        f"{side.name:>16} ({side.dtype}): {side.tokens_per_s:9,.0f} tokens/s median "
        f"({side.mean_tokens_per_s:,.0f} mean) over {len(side.step_seconds)} steps; "
        f"loss {side.losses[0]:.4f} → {side.losses[-1]:.4f}",
        flush=True,
    )


def compare_losses(sides: list[Side]) -> None:
    """Loss curves step by step: bf16 against fp32 (genloop's, the Trainer's), compiled
    against eager, and genloop against the Trainer in fp32."""
    by_name = {s.name: s for s in sides}
    pairs = (
        ("genloop_bf16", "genloop_fp32"),
        ("hf_trainer_bf16", "hf_trainer_fp32"),
        ("genloop_fp32", "genloop_fp32_eager"),
        ("genloop_fp32", "hf_trainer_fp32"),
    )
    for low, high in pairs:
        a, b = by_name.get(low), by_name.get(high)
        if a is None or b is None:
            continue
        gaps = [abs(x - y) for x, y in zip(a.losses, b.losses, strict=True)]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        print(
            f"loss curve {a.name} ({a.dtype}) vs {b.name} ({b.dtype}) over {len(gaps)} steps: "
            f"max |Δ| {gaps[worst]:.4f} ({gaps[worst] / abs(b.losses[worst]):.2%}) at step "
            f"{worst + 1}; final {a.losses[-1]:.4f} vs {b.losses[-1]:.4f}"
        )
    for s in sides:
        if not all(math.isfinite(x) for x in s.losses):
            print(f"warning: {s.name} has a non-finite loss", file=sys.stderr)


if __name__ == "__main__":
    if "--fsdp" in sys.argv[1:]:  # memory per rank, FSDP2 next to one process
        from _fsdp_memory import main as fsdp_memory

        fsdp_memory([a for a in sys.argv[1:] if a != "--fsdp"])
    else:
        main()
