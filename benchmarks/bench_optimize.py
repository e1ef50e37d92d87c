"""Deployment optimization: int8 and ONNX variants next to the fp32 PyTorch model.

One model (the ``small`` preset, ~30M parameters at a 8192-token vocabulary; briefly
trained on the built-in ``python-stdlib`` corpus, or left at its random initialisation
with ``--train-steps 0``, which ``--quick`` does) is run in this one process as:

- ``fp32``: the Hugging Face model in PyTorch eager mode (the baseline);
- ``int8``: ``genloop.optimize.quantize`` int8 dynamic (fbgemm int8 matmuls, every linear
  layer and the output head), and the extras ``int8_wo`` (weight-only) and ``int4``;
- ``onnx``: ``genloop.optimize.onnx`` export with the cache, run by onnxruntime on the CPU
  (verified against PyTorch first), and ``onnx_int8`` (onnxruntime's dynamic quantizer).

Every variant runs the same greedy requests through the same loop
(``genloop.optimize.tradeoff.timed_request``: a prompt of ``--prompt-len`` random tokens,
then ``--new-tokens`` tokens with the cache), in alternating rounds so that a shared
machine's noise spreads over all of them:

- latency: one request at batch 1, the median over rounds (``*_latency_ratio`` is the
  variant's over fp32's; prefill and per-token decode ratios are printed too);
- throughput: generated tokens/s for a batch of ``--batch`` requests, the median over
  rounds (``onnx_throughput_ratio`` = onnxruntime fp32 over PyTorch eager fp32);
- quality: perplexity on the corpus's test split (``--ppl-windows`` windows of
  ``--seq-len`` tokens), ``int8_ppl_delta_pct`` = int8 against fp32 in percent.

Served: with ``--engine`` (on by default; ``--no-engine`` skips it) the fp32, int8 and onnx
variants also run in genloop's serving engine (``serve.engine.load_engine``: the Llama fast
path for fp32, the per-sequence fallback for int8's quantized layers, the onnxruntime runner
for onnx), ``--batch`` greedy requests at once; ``engine_tokens_per_s_*`` is generated
tokens per second, which tells which variant to serve.

Targets (2 CPU threads, small preset): int8 latency ≤ 0.6× fp32 with perplexity within +3%,
onnxruntime ≥ 1.3× PyTorch eager throughput.

    python benchmarks/bench_optimize.py [--quick] [--preset small] [--threads 2]
                                        [--train-steps N] [--rounds R] [--batch B]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TARGET_INT8_LATENCY = 0.6
TARGET_INT8_PPL_PCT = 3.0
TARGET_ONNX_THROUGHPUT = 1.3


@dataclass
class Variant:
    name: str
    runner: Any
    file_mb: float
    latency: list[float] = field(default_factory=list)  # seconds per batch-1 request
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)  # seconds per later step
    tokens_per_s: list[float] = field(default_factory=list)
    perplexity: float | None = None
    directory: Path | None = None  # a loadable model directory (for the engine figures)
    engine_tokens_per_s: float | None = None

    def median(self, what: str) -> float:
        return statistics.median(getattr(self, what))


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


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[Any, Any, Path]:
    """A workspace with the corpus prepared; the fp32 model (trained or not) and its tokens."""
    import torch

    from genloop.config import parse_config
    from genloop.data.prepare import prepare_dataset
    from genloop.models.causal_lm import FAMILY
    from genloop.workspace import init_workspace

    mb = write_corpus(tmp / "corpus", args.corpus_mb)
    cfg = parse_config(
        {
            "name": "bench-opt",
            "data": {
                "name": "bench-opt",
                "kind": "code",
                "sources": [{"type": "code", "path": str(tmp / "corpus")}],
                "dedup": {"near": False},
                "pii": {"enabled": False},
                "split": {"val": 0.02, "test": 0.05},
            },
            "tokenizer": {"vocab_size": args.vocab_size, "seq_len": args.seq_len},
            "model": {"preset": args.preset},
            "train": {
                "lr": 1e-3,
                "min_lr": 1e-4,
                "warmup_steps": max(1, args.train_steps // 10),
                "max_steps": max(2, args.train_steps),
                "batch_size": 8,
                "eval_every": max(2, args.train_steps),
                "eval_batches": 1,
                "checkpoint_every": max(2, args.train_steps),
                "precision": "fp32",
                "device": "cpu",
                "seed": 0,
            },
        }
    )
    ws = init_workspace(tmp / "ws")
    t0 = time.perf_counter()
    dataset, _ = prepare_dataset(ws, cfg.data, cfg.tokenizer)
    data_dir = ws.store.open_verified(dataset.artifact)
    print(f"data: {mb:.1f} MB of python-stdlib prepared in {time.perf_counter() - t0:.0f}s")
    if args.train_steps > 0:
        from genloop.train.loop import train

        t0 = time.perf_counter()
        result = train(ws, cfg)
        assert result.model is not None
        model = FAMILY.load(ws.store.open_verified(result.model.artifact), dtype="float32")
        print(
            f"model: {args.preset} trained {args.train_steps} steps in "
            f"{time.perf_counter() - t0:.0f}s (val loss {result.metrics.get('val_loss', 0):.3f})"
        )
    else:
        from genloop.train.distributed import pick_device
        from genloop.train.text import build_model

        torch.manual_seed(0)
        model, _, _ = build_model(
            ws, cfg.model, data_dir / "tokenizer", pick_device("cpu"), seq_len=cfg.tokenizer.seq_len
        )
        model.eval()
        print(f"model: {args.preset} at its random initialisation (seed 0)")
    torch.manual_seed(0)
    return ws, model, data_dir


def build_variants(args: argparse.Namespace, model: Any, tmp: Path) -> list[Variant]:
    from genloop.optimize.onnx import (
        OnnxCausalLM,
        TorchCausalLM,
        export_onnx,
        quantize_onnx,
        write_meta,
    )
    from genloop.optimize.quantize import quantize_model, save_quantized

    def size(directory: Path, pattern: str) -> float:
        return sum(p.stat().st_size for p in directory.glob(pattern)) / 2**20

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    fp_dir = tmp / "fp32"
    model.save_pretrained(fp_dir)
    variants = [
        Variant("fp32", TorchCausalLM(model), size(fp_dir, "*.safetensors"), directory=fp_dir)
    ]
    schemes = [("int8", "int8", "dynamic")]
    if not args.quick:
        schemes += [("int8_wo", "int8", "weight_only"), ("int4", "int4", "weight_only")]
    for name, bits, mode in schemes:
        q = copy.deepcopy(model)
        description = quantize_model(q, bits, mode)  # type: ignore[arg-type]
        out = save_quantized(q, tmp / name, description)
        variants.append(Variant(name, TorchCausalLM(q), size(out, "*.safetensors"), directory=out))

    t0 = time.perf_counter()
    onnx_dir = tmp / "onnx"
    meta = export_onnx(model, onnx_dir)
    write_meta(onnx_dir, meta, {"transform": "onnx"})
    check = meta["verification"]["max_abs_diff"]
    print(
        f"onnx: exported and verified in {time.perf_counter() - t0:.0f}s (max |diff| {check:.2g})"
    )
    threads = args.threads
    onnx_lm = OnnxCausalLM(onnx_dir, threads=threads)
    variants.append(Variant("onnx", onnx_lm, size(onnx_dir, "model.onnx*"), directory=onnx_dir))
    q_dir = tmp / "onnx_int8"
    quantize_onnx(onnx_dir, q_dir, "int8")
    write_meta(q_dir, meta, {"transform": "onnx-int8"})
    variants.append(
        Variant("onnx_int8", OnnxCausalLM(q_dir, threads=threads), size(q_dir, "model.onnx*"))
    )
    return variants


def measure(args: argparse.Namespace, variants: list[Variant], data_dir: Path) -> None:
    import torch

    from genloop.optimize.tradeoff import runner_perplexity, timed_request

    vocab = variants[0].runner.vocab_size
    gen = torch.Generator().manual_seed(0)
    for v in variants:  # warm-up: first calls allocate and plan
        for batch in (1, args.batch):
            timed_request(v.runner, torch.randint(0, vocab, (batch, args.prompt_len)), 3)
    for r in range(args.rounds):
        one = torch.randint(0, vocab, (1, args.prompt_len), generator=gen)
        many = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=gen)
        order = variants if r % 2 == 0 else variants[::-1]  # alternate who goes first
        for v in order:
            total, prefill, steps = timed_request(v.runner, one, args.new_tokens)
            v.latency.append(total)
            v.prefill.append(prefill)
            v.decode.append(statistics.median(steps))
            total, _, _ = timed_request(v.runner, many, args.new_tokens)
            v.tokens_per_s.append(args.batch * args.new_tokens / total)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    tokens = data_dir / "tokens"
    for v in variants:
        v.perplexity = runner_perplexity(
            v.runner, tokens, "test", args.seq_len, max_windows=args.ppl_windows
        )


def measure_engine(args: argparse.Namespace, variants: list[Variant], tokenizer_dir: Path) -> None:
    """``--batch`` concurrent greedy requests through the serving engine, per variant."""
    import asyncio

    import torch

    from genloop.config import ServeConfig
    from genloop.optimize.onnx import copy_tokenizer
    from genloop.serve.engine.loader import load_engine
    from genloop.serve.engine.types import GenerationRequest, SamplingParams

    cfg = ServeConfig(device="cpu", max_batch_size=args.batch, max_queue=4 * args.batch)
    gen = torch.Generator().manual_seed(1)
    vocab = variants[0].runner.vocab_size
    prompts = [
        torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
        for _ in range(args.batch)
    ]  # cut to fit the model's context with the new tokens (the engine checks it)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    async def one_round(engine: Any, tag: str) -> float:
        room = engine.runner.max_len - args.new_tokens

        async def consume(i: int) -> None:
            prompt = prompts[i][-room:]
            async for _ in engine.submit(GenerationRequest(f"{tag}-{i}", prompt, params)):
                pass

        t0 = time.perf_counter()
        await asyncio.gather(*(consume(i) for i in range(args.batch)))
        return args.batch * args.new_tokens / (time.perf_counter() - t0)

    async def run(v: Variant) -> float:
        assert v.directory is not None
        copy_tokenizer(tokenizer_dir, v.directory)
        engine = load_engine(v.directory, model_name=v.name, model_version=1, cfg=cfg)
        await engine.start()
        try:
            await one_round(engine, "warm-up")
            rates = [await one_round(engine, f"r{r}") for r in range(max(3, args.rounds // 2))]
        finally:
            await engine.close()
        return statistics.median(rates)

    for v in variants:
        if v.name in ("fp32", "int8", "onnx"):
            v.engine_tokens_per_s = asyncio.run(run(v))
            print(f"engine: {v.name} {v.engine_tokens_per_s:.1f} tok/s", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="random weights, fewer rounds (<~1 min)")
    p.add_argument("--preset", default="small")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--train-steps", type=int, default=None, help="default 40; 0 with --quick")
    p.add_argument("--rounds", type=int, default=None, help="default 8; 3 with --quick")
    p.add_argument("--batch", type=int, default=4, help="requests at once for throughput")
    p.add_argument("--prompt-len", type=int, default=None, help="default 128; 64 with --quick")
    p.add_argument("--new-tokens", type=int, default=None, help="default 32; 8 with --quick")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--corpus-mb", type=float, default=None, help="default 3; 1 with --quick")
    p.add_argument("--ppl-windows", type=int, default=None, help="default 64; 8 with --quick")
    p.add_argument(
        "--engine",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also serve fp32, int8 and onnx through the serving engine (default on)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "train_steps": (40, 0),
        "rounds": (8, 3),
        "prompt_len": (128, 64),
        "new_tokens": (32, 8),
        "corpus_mb": (3.0, 1.0),
        "ppl_windows": (64, 8),
    }
    for key, (full, fast) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, fast if quick else full)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    print(
        f"bench_optimize: preset {args.preset}, {args.threads} threads, prompt "
        f"{args.prompt_len} + {args.new_tokens} new tokens, batch {args.batch} for "
        f"throughput, {args.rounds} rounds (medians; a shared machine is noisy)"
    )
    with tempfile.TemporaryDirectory(prefix="bench-opt-") as tmp_name:
        tmp = Path(tmp_name)
        ws, model, data_dir = prepare(args, tmp)
        try:
            variants = build_variants(args, model, tmp)
            measure(args, variants, data_dir)
            if args.engine:
                measure_engine(args, variants, data_dir / "tokenizer")
        finally:
            ws.close()

    fp = variants[0]
    by = {v.name: v for v in variants}
    print(
        f"{'variant':>10} {'file MB':>8} {'latency ms':>11} {'prefill ms':>11} "
        f"{'decode ms':>10} {'tok/s':>8} {'ppl':>10}"
    )
    for v in variants:
        print(
            f"{v.name:>10} {v.file_mb:8.1f} {1e3 * v.median('latency'):11.1f} "
            f"{1e3 * v.median('prefill'):11.1f} {1e3 * v.median('decode'):10.2f} "
            f"{v.median('tokens_per_s'):8.1f} {v.perplexity:10.3f}"
        )

    def ratio(name: str, what: str) -> float:
        return round(by[name].median(what) / fp.median(what), 3)

    def ppl_delta(name: str) -> float:
        assert by[name].perplexity is not None and fp.perplexity is not None
        return round(100 * (by[name].perplexity - fp.perplexity) / fp.perplexity, 3)

    figures: dict[str, Any] = {
        "int8_latency_ratio": ratio("int8", "latency"),
        "int8_ppl_delta_pct": ppl_delta("int8"),
        "onnx_throughput_ratio": ratio("onnx", "tokens_per_s"),
        "int8_prefill_ratio": ratio("int8", "prefill"),
        "int8_decode_ratio": ratio("int8", "decode"),
        "int8_throughput_ratio": ratio("int8", "tokens_per_s"),
        "onnx_latency_ratio": ratio("onnx", "latency"),
        "onnx_int8_latency_ratio": ratio("onnx_int8", "latency"),
        "onnx_int8_throughput_ratio": ratio("onnx_int8", "tokens_per_s"),
        "onnx_int8_ppl_delta_pct": ppl_delta("onnx_int8"),
        "fp32_latency_ms": round(1e3 * fp.median("latency"), 2),
        "fp32_tokens_per_s": round(fp.median("tokens_per_s"), 1),
        "fp32_ppl": round(fp.perplexity or 0.0, 3),
        "fp32_file_mb": round(fp.file_mb, 1),
        "int8_file_mb": round(by["int8"].file_mb, 1),
        "onnx_file_mb": round(by["onnx"].file_mb, 1),
        "onnx_int8_file_mb": round(by["onnx_int8"].file_mb, 1),
    }
    if args.engine:
        print(
            f"served by the engine, {args.batch} greedy requests at once: "
            + ", ".join(
                f"{v.name} {v.engine_tokens_per_s:.1f}" for v in variants if v.engine_tokens_per_s
            )
            + " tok/s"
        )
        for v in variants:
            if v.engine_tokens_per_s is not None:
                figures[f"engine_tokens_per_s_{v.name}"] = round(v.engine_tokens_per_s, 1)
        figures["engine_onnx_vs_fp32_ratio"] = round(
            (by["onnx"].engine_tokens_per_s or 0) / (fp.engine_tokens_per_s or 1), 3
        )
    for extra in ("int8_wo", "int4"):
        if extra in by:
            figures[f"{extra}_latency_ratio"] = ratio(extra, "latency")
            figures[f"{extra}_decode_ratio"] = ratio(extra, "decode")
            figures[f"{extra}_ppl_delta_pct"] = ppl_delta(extra)
            figures[f"{extra}_file_mb"] = round(by[extra].file_mb, 1)
    figures.update(
        preset=args.preset,
        threads=args.threads,
        train_steps=args.train_steps,
        seconds=round(time.perf_counter() - started, 1),
    )
    int8_ok = (
        figures["int8_latency_ratio"] <= TARGET_INT8_LATENCY
        and figures["int8_ppl_delta_pct"] <= TARGET_INT8_PPL_PCT
    )
    onnx_ok = figures["onnx_throughput_ratio"] >= TARGET_ONNX_THROUGHPUT
    print(
        f"target int8 latency ≤ {TARGET_INT8_LATENCY}× with ppl ≤ +{TARGET_INT8_PPL_PCT}%: "
        f"{'met' if int8_ok else 'NOT met'}; onnxruntime ≥ {TARGET_ONNX_THROUGHPUT}× eager "
        f"throughput: {'met' if onnx_ok else 'NOT met'}"
    )
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
