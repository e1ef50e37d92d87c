"""Run a GGUF file in llama.cpp (llama-cpp-python) and report what genloop compares.

Runs in llama.cpp's own environment (``make llamacpp``: .venv-llamacpp), not genloop's:
reads one JSON request on stdin, prints one JSON answer on stdout::

    {"model": PATH, "prompt_ids": [...], "new_tokens": 16,
     "windows": [[ids], ...], "texts": ["..."]}
    → {"greedy": [...], "nll": float, "tokens": int, "tokenized": [[ids], ...]}

``greedy``: the argmax continuation of ``prompt_ids`` (no sampler); ``nll``/``tokens``: the
summed negative log-likelihood of each window's tokens after its first; ``tokenized``:
llama.cpp's own tokenization of ``texts`` (no bos, special tokens as text).

``use_extra_bufts`` is turned off (the CPU "repack" buffers, AMX on Xeons): llama.cpp
0.3.36's repacked q8_0 kernels crash (SIGSEGV) on the tiny test models' shapes on an
AMX machine; the plain CPU kernels compute the same quantized weights.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main() -> None:
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    request = json.load(sys.stdin)
    default_params = lib.llama_model_default_params

    def plain_cpu_buffers():  # type: ignore[no-untyped-def]
        params = default_params()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = plain_cpu_buffers
    windows = request.get("windows") or []
    n_ctx = max([len(request["prompt_ids"]) + request["new_tokens"], *map(len, windows), 8])
    llm = Llama(
        model_path=request["model"], n_ctx=n_ctx, n_batch=n_ctx, n_threads=1,
        logits_all=True, verbose=False,
    )  # fmt: skip
    greedy: list[int] = []
    llm.eval(request["prompt_ids"])
    for _ in range(request["new_tokens"]):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(token)
        llm.eval([token])
    nll, count = 0.0, 0
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)  # (T-1, V)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    tokenized = [
        llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        for text in request.get("texts") or []
    ]
    json.dump({"greedy": greedy, "nll": nll, "tokens": count, "tokenized": tokenized}, sys.stdout)


if __name__ == "__main__":
    main()
