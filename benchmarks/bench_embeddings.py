"""Embedding throughput: genloop's ``/v1/embeddings`` with its batching engine, next to the
same server answering one request at a time and to one whose engine never batches.

Two genloop servers (``genloop.serve.app.create_app``: API key, limits, metrics, request
records without their text, rate limits off), each a separate process on 127.0.0.1, serve
the same checkpoint: a random BERT (``BertForMaskedLM``, registered as a ``masked_lm``
version; 2 layers × 64 wide with ``--quick``, 4 × 256 otherwise) on a byte-level BPE
trained on generated sentences. One runs the engine as ``genloop serve`` does
(``serve.embedding_batch_size`` 64), the other with ``serve.embedding_batch_size`` 1 (every
input a forward of its own: the baseline without batching). The client (httpx, asyncio,
this process) sends requests of one sentence (about 20 tokens) each:

- ``embeddings_per_s_c1``: one request at a time (unbatched by construction), batched server;
- ``embeddings_per_s_c16``: 16 concurrent clients, batched server;
- ``baseline_embeddings_per_s_c16``: 16 concurrent clients, the server that never batches.

``ratio_c16`` = batched ÷ unbatched engine at 16 clients; ``ratio_c16_vs_c1`` = 16 batched
clients ÷ one request at a time. Each figure is the best of ``--repeat`` rounds, the
servers taking turns. Both servers run with ``--threads`` torch threads (default 1).

    python benchmarks/bench_embeddings.py --quick [--threads N] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = [
    "the",
    "a",
    "model",
    "server",
    "request",
    "token",
    "batch",
    "vector",
    "search",
    "query",
    "document",
    "river",
    "mountain",
    "small",
    "large",
    "quick",
    "slow",
    "green",
    "blue",
    "red",
    "reads",
    "writes",
    "finds",
    "keeps",
    "sends",
    "answers",
    "many",
    "few",
]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 16))) for _ in range(n)]


def build_model(out: Path, quick: bool) -> Path:
    """A random BertForMaskedLM with a BPE tokenizer, in the Hugging Face layout."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from genloop.data.tokenizer import DEFAULT_SPECIAL_TOKENS, load_hf_tokenizer, train_bpe

    tok_dir = train_bpe(
        sentences(2000, 0),
        out / "tok",
        vocab_size=512,
        min_frequency=1,
        special_tokens=(*DEFAULT_SPECIAL_TOKENS, "<|mask|>"),
    )
    tok = load_hf_tokenizer(tok_dir)
    hidden, layers = (64, 2) if quick else (256, 4)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    model_dir = out / "bert"
    BertForMaskedLM(config).eval().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def serve(model_dir: Path, root: Path, port: int, batch: int, threads: int) -> None:
    """Child process: a workspace with the model as ``enc``, a key in ``root/key``, uvicorn."""
    import torch
    import uvicorn

    from genloop.config import parse_config
    from genloop.security.keys import create_key
    from genloop.serve.app import create_app
    from genloop.workspace import init_workspace, registry

    torch.set_num_threads(threads)
    ws = init_workspace(root / "ws")
    registry.register_model(ws, "enc", "masked_lm", model_dir)
    key = create_key(ws.catalog, name="bench", scopes=["generate"]).plaintext
    cfg = parse_config(
        {
            "serve": {
                "models": ["enc"],
                "port": port,
                "device": "cpu",
                "max_queue": 256,
                "store_requests": False,
                "ui": False,
                "embedding_batch_size": batch,
                "rate_limit": {"requests_per_min": None, "tokens_per_min": None},
            }
        }
    )
    app = create_app(ws, cfg)
    (root / "key").write_text(key)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(model_dir: Path, root: Path, batch: int, threads: int) -> tuple[Any, str, str]:
    """A server process; returns (process, base URL, key) once it answers /ready."""
    import httpx

    root.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    args = [sys.executable, __file__, "--serve", str(model_dir), str(root), str(port), str(batch)]
    log = (root / "log").open("wb")
    proc = subprocess.Popen([*args, "--threads", str(threads)], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(root / 'log').read_text()[-2000:]}")
        if (root / "key").exists():
            key = (root / "key").read_text()
            try:
                r = httpx.get(url + "/ready", headers={"Authorization": f"Bearer {key}"})
                if r.status_code == 200:
                    return proc, url, key
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not get ready")


async def load(url: str, key: str, texts: list[str], clients: int) -> float:
    """Embeddings per second: ``clients`` concurrent clients sending one text per request."""
    import httpx

    queue = list(texts)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as c:

        async def client() -> int:
            done = 0
            while queue:
                text = queue.pop()
                r = await c.post("/v1/embeddings", json={"model": "enc", "input": text})
                r.raise_for_status()
                done += len(r.json()["data"])
            return done

        started = time.perf_counter()
        counts = await asyncio.gather(*(client() for _ in range(clients)))
        return sum(counts) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Small model, few requests.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server.")
    parser.add_argument("--repeat", type=int, default=None, help="Rounds (best counts).")
    parser.add_argument("--requests", type=int, default=None, help="Requests per round.")
    parser.add_argument("--serve", nargs=4, metavar=("MODEL", "ROOT", "PORT", "BATCH"))
    args = parser.parse_args(argv)
    if args.serve:
        model_dir, root, port, batch = args.serve
        serve(Path(model_dir), Path(root), int(port), int(batch), args.threads)
        return {}
    repeat = args.repeat or (1 if args.quick else 3)
    n = args.requests or (96 if args.quick else 512)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_model(root, args.quick)
        batched = start(model_dir, root / "batched", 64, args.threads)
        single = start(model_dir, root / "single", 1, args.threads)
        texts = sentences(n, 1)
        best: dict[str, float] = {}
        try:
            for _ in range(repeat):
                for name, (_, url, key), clients in (
                    ("embeddings_per_s_c1", batched, 1),
                    ("embeddings_per_s_c16", batched, 16),
                    ("baseline_embeddings_per_s_c16", single, 16),
                ):
                    asyncio.run(load(url, key, texts[:16], clients))  # warm up
                    rate = asyncio.run(load(url, key, texts, clients))
                    best[name] = max(best.get(name, 0.0), rate)
                    print(f"{name}: {rate:,.1f} embeddings/s", flush=True)
        finally:
            for proc, _, _ in (batched, single):
                proc.terminate()
                proc.wait(timeout=30)
    figures: dict[str, Any] = {k: round(v, 2) for k, v in best.items()}
    figures["ratio_c16"] = round(
        best["embeddings_per_s_c16"] / best["baseline_embeddings_per_s_c16"], 3
    )
    figures["ratio_c16_vs_c1"] = round(
        best["embeddings_per_s_c16"] / best["embeddings_per_s_c1"], 3
    )
    figures.update({"requests": n, "repeat": repeat, "threads": args.threads, "quick": args.quick})
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
