"""GGUF export: genloop's model next to llama.cpp running its exported file.

One model (the ``tiny`` preset, trained briefly on the built-in ``python-stdlib`` corpus by
genloop's own loop, as ``bench_optimize.py`` prepares it) is exported with
``genloop.optimize.gguf_export.write_gguf`` as f16, q8_0, q4_0 and q4_k_m, and each file runs in
llama.cpp (llama-cpp-python, in its own environment: ``make llamacpp``; the runner is
``scripts/llamacpp_probe.py``) beside genloop's PyTorch model:

- greedy: ``--prompts`` prompts from held-out text, ``--new-tokens`` greedy tokens each;
  ``f16_greedy_match`` is the share of prompts whose tokens equal genloop's exactly
  (target 1.0), ``q8_0_greedy_match`` the same for q8_0 (informative: 8-bit weights may
  break a near tie);
- quality: perplexity on ``--windows`` windows of ``--seq-len`` tokens of held-out text
  (corpus files after the training slice); ``*_ppl_delta_pct`` is llama.cpp's over
  genloop's (targets: f16 within ±0.1%, q8_0 within ±1%, q4_k_m within ±5%);
- tokenizer: ``tokenize_match``, whether llama.cpp's tokenization of the held-out text
  equals genloop's (target 1.0);
- size: each file in MB next to the fp32 safetensors.

    python benchmarks/bench_export.py [--quick] [--train-steps N] [--llamacpp-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")
TARGET_F16_PPL_PCT = 0.1
TARGET_Q8_PPL_PCT = 1.0
TARGET_Q4_K_M_PPL_PCT = 5.0


def held_out(skip_mb: float, limit_mb: float) -> str:
    """python-stdlib text after the first ``skip_mb`` MB (which the model trained on)."""
    from genloop.data.records import Record
    from genloop.data.sources import build_source

    seen, parts, taken = 0.0, [], 0.0
    for item in build_source({"type": "builtin", "name": "python-stdlib"}).records():
        if not isinstance(item, Record) or item.text is None:
            continue
        size = len(item.text.encode("utf-8", "surrogatepass")) / 1e6
        seen += size
        if seen <= skip_mb:
            continue
        parts.append(item.text)
        taken += size
        if taken >= limit_mb:
            break
    return "\n".join(parts)


def genloop_side(model: Any, prompts: list[list[int]], windows: list[list[int]], new: int) -> Any:
    import numpy as np
    import torch

    greedy = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False
            )
            greedy.append(out[0, len(ids) :].tolist())
        nll = sum(
            float(model(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss) * (len(w) - 1)
            for w in windows
        )
    return greedy, float(np.exp(nll / sum(len(w) - 1 for w in windows)))


def llamacpp_side(
    python: Path, path: Path, prompts: list[list[int]], windows: list[list[int]], new: int,
    text: str,
) -> tuple[list[list[int]], float, list[int]]:  # fmt: skip
    import numpy as np

    greedy: list[list[int]] = []
    nll, count, tokenized = 0.0, 0, []
    for i, ids in enumerate(prompts):
        first = i == 0  # perplexity and tokenization once
        request = {"model": str(path), "prompt_ids": ids, "new_tokens": new,
                   "windows": windows if first else [],
                   "texts": [text] if first else []}  # fmt: skip
        ran = subprocess.run(
            [str(python), str(ROOT / "scripts" / "llamacpp_probe.py")],
            input=json.dumps(request), capture_output=True, text=True, timeout=1800,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )  # fmt: skip
        if ran.returncode != 0:
            raise SystemExit(f"llama.cpp failed on {path}:\n{ran.stderr[-3000:]}")
        answer = json.loads(ran.stdout)
        greedy.append(answer["greedy"])
        if i == 0:
            nll, count, tokenized = answer["nll"], answer["tokens"], answer["tokenized"][0]
    return greedy, float(np.exp(nll / count)), tokenized


def main(argv: list[str] | None = None) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_optimize import prepare  # the same corpus, tokenizer and training

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--corpus-mb", type=float, default=4.0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    default_python = ROOT / ".venv-llamacpp" / "bin" / "python"
    parser.add_argument("--llamacpp-python", type=Path, default=default_python)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_steps, args.corpus_mb, args.prompts, args.windows = 20, 1.0, 3, 4
        args.vocab_size, args.new_tokens = 1024, 16
    if not args.llamacpp_python.exists():
        raise SystemExit(f"no llama.cpp environment at {args.llamacpp_python}: run 'make llamacpp'")

    import torch

    from genloop.data.tokenizer import load_tokenizer
    from genloop.models.causal_lm import FAMILY
    from genloop.optimize.gguf_export import write_gguf

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp_name:
        tmp = Path(tmp_name)
        ws, model, data_dir = prepare(args, tmp)
        model.eval()
        model_dir = tmp / "model"
        FAMILY.save(model, model_dir, tokenizer_dir=data_dir / "tokenizer")
        tok = load_tokenizer(model_dir)
        text = held_out(args.corpus_mb, 0.2)
        ids = tok.encode(text).ids
        n = args.seq_len
        windows = [ids[i * n : (i + 1) * n] for i in range(args.windows)]
        step = max(n, len(ids) // (args.prompts + 1))
        prompts = [ids[(i + 1) * step : (i + 1) * step + 16] for i in range(args.prompts)]
        ours, ppl = genloop_side(model, prompts, windows, args.new_tokens)
        sample = text[:4000]
        fp32_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
        figures: dict[str, Any] = {"genloop_ppl": ppl, "fp32_safetensors_mb": fp32_mb}
        print(f"genloop (PyTorch fp32): perplexity {ppl:.3f}, weights {fp32_mb:.1f} MB")
        print(f"{'file':>6} {'MB':>6} {'export s':>8} {'llama.cpp ppl':>13} {'Δ ppl %':>8} "
              f"{'greedy = genloop':>16}")  # fmt: skip
        for quant in QUANTS:
            t0 = time.perf_counter()
            result = write_gguf(model_dir, tmp / f"model-{quant}.gguf", quant)
            seconds = time.perf_counter() - t0
            theirs, their_ppl, tokenized = llamacpp_side(
                args.llamacpp_python, result.path, prompts, windows, args.new_tokens, sample
            )
            match = sum(a == b for a, b in zip(theirs, ours, strict=True)) / len(ours)
            delta = 100 * (their_ppl / ppl - 1)
            figures |= {
                f"{quant}_mb": result.bytes / 1e6,
                f"{quant}_ppl": their_ppl,
                f"{quant}_ppl_delta_pct": delta,
                f"{quant}_greedy_match": match,
                f"{quant}_export_s": seconds,
            }
            if quant == "f16":
                figures["tokenize_match"] = float(tokenized == tok.encode(sample).ids)
            print(f"{quant:>6} {result.bytes / 1e6:6.2f} {seconds:8.2f} {their_ppl:13.3f} "
                  f"{delta:+8.3f} {match:16.2f}")  # fmt: skip
        ws.close()
    ok = (
        figures["f16_greedy_match"] == 1.0
        and abs(figures["f16_ppl_delta_pct"]) <= TARGET_F16_PPL_PCT
        and abs(figures["q8_0_ppl_delta_pct"]) <= TARGET_Q8_PPL_PCT
        and abs(figures["q4_k_m_ppl_delta_pct"]) <= TARGET_Q4_K_M_PPL_PCT
        and figures["tokenize_match"] == 1.0
    )
    print(
        f"targets (f16 tokens = genloop's, |Δppl| f16 ≤ {TARGET_F16_PPL_PCT}%, "
        f"q8_0 ≤ {TARGET_Q8_PPL_PCT}%, q4_k_m ≤ {TARGET_Q4_K_M_PPL_PCT}%, same tokenization): "
        f"{'met' if ok else 'NOT met'}"
    )
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
    return figures


if __name__ == "__main__":
    main()
