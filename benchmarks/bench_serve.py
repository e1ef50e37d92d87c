"""Serving speed: genloop's engine next to two baselines, same model, same load, loopback.

Three OpenAI-style ``/v1/completions`` servers, each a separate process on 127.0.0.1, serve
the same checkpoint (the ``tiny`` preset, random weights from a fixed seed, a byte-level
BPE trained on the built-in ``python-stdlib`` corpus). All three stay up (an idle one uses
no CPU) and take turns under the same load, ``--repeat`` rounds, the best round of each
counting, so that a shared machine's drifting load touches every side alike:

- genloop: ``genloop serve``'s own app (``genloop.serve.app.create_app``: API key, limits,
  metrics, request records without their text, rate limits off) on the continuous-batching
  engine with ``serve.max_batch_size``'s default (``--batch`` sets another), streaming each
  token as a server-sent event; ``--subject engine`` puts the engine
  behind a minimal FastAPI endpoint instead, to see the engine alone;
- per-request baseline: FastAPI + uvicorn calling Hugging Face ``model.generate`` once per
  request (sync endpoint, so concurrent requests run in uvicorn's thread pool);
- ``transformers serve --continuous-batching`` on the checkpoint directory (offline), the
  tool a user would otherwise pick; null with the reason when it cannot run here;
- vLLM on the CPU (``vllm.entrypoints.openai.api_server``, fp32, its own default batch),
  run by the Python of its own environment (``--vllm-python``, else ``$GENLOOP_VLLM_PYTHON``,
  else the repository's ``.venv-vllm/bin/python`` that ``make vllm`` makes); null with the
  reason when it is missing or does not start. It warms up (compiles) for a minute or
  two, so ``--quick`` leaves it out unless ``--vllm on``.

The client (httpx, asyncio, this process) runs 1, 4 and 16 concurrent clients against
each; every client sends the same prompts (about 32 tokens of Python source) asking for
64 new tokens at temperature 1, one request after another, until the run has sent its
request budget (bounded count) or its time budget is spent. The per-request baseline (and
``--subject engine``) always generate all 64 tokens (``min_new_tokens``, ``ignore_eos``);
the OpenAI API has no such option, so genloop's app and transformers serve stop at an
end-of-text token (rare with random weights); tokens are counted from each response's usage.

The vLLM comparison is its own round (the section "genloop vs vLLM" below): 1, 16 and 64
clients at temperature 0 (greedy: both sides decode the same tokens, and stop at the same
end-of-text), streamed and not, genloop's app with its default ``serve.max_batch_size``.

Figures: tokens/s = completion tokens / wall time of the run; time to first token and
inter-token latency (p50, p99) from the arrival times of streamed chunks (genloop and
transformers serve stream; the per-request baseline cannot); ``per_token_latency_ratio_bs1``
= genloop's median seconds per token / the baseline's, one client, non-streamed requests on
both sides (end-to-end time / tokens).

All servers run with the same torch thread count (``--threads``, default 1: on a shared
2-core machine a second OpenMP thread that waits for a descheduled peer makes every side
slower and noisier). Timings on a shared machine are noisy.

    python benchmarks/bench_serve.py [--quick] [--threads N] [--repeat N] [--max-tokens 64]
                                     [--subject app|engine] [--skip-transformers-serve]
                                     [--vllm auto|on|off] [--vllm-python PATH] [--families]

``--families`` measures the native engine alone (no HTTP) on every architecture it batches
(``bench_families``), each the size of the ``tiny`` preset: tokens/s on 16 concurrent
sequences and the ratio to Llama's in the same run (the quick run prints it too).

    python benchmarks/bench_serve.py --vllm-gateway [--quick]   (needs make vllm)

``--structured`` measures what grammar-constrained decoding costs: the same genloop server
under 16 streaming clients, requests with ``response_format: json_schema`` (a typical
extraction schema) taking turns with unconstrained ones; ``structured_ratio_c16`` =
constrained tokens/s / unconstrained tokens/s (target ≥ 0.85).

    python benchmarks/bench_serve.py --structured [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the endpoints' annotations here

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONCURRENCY = (1, 4, 16)
TARGET_RATIO_C16 = 5.0
TARGET_RATIO_VS_TS = 1.2
TARGET_LATENCY_RATIO = 0.7
VLLM_CONCURRENCY = (1, 16, 64)
TARGET_RATIO_VS_VLLM = {16: 1.2, 64: 1.0}
DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"


# ------------------------------------------------------------------------ the model


def build_checkpoint(out: Path, preset: str, vocab_size: int, corpus_mb: float) -> Path:
    """A random-weight ``preset`` checkpoint with a BPE tokenizer, HF layout, in ``out``."""
    import torch

    from genloop.data.records import Record
    from genloop.data.sources import build_source
    from genloop.data.tokenizer import train_bpe
    from genloop.models.causal_lm import FAMILY
    from genloop.models.pretrained import save_hf_dir

    texts: list[str] = []
    total = 0
    for item in build_source({"type": "builtin", "name": "python-stdlib"}).records():
        if isinstance(item, Record) and item.text:
            texts.append(item.text)
            total += len(item.text)
            if total >= corpus_mb * 1e6:
                break
    tok_dir = train_bpe(texts, out / "tokenizer", vocab_size=vocab_size)
    from genloop.data.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(tok_dir)
    torch.manual_seed(0)
    model = FAMILY.build(
        {
            "preset": preset,
            "vocab_size": vocab_size,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
    )
    params = sum(p.numel() for p in model.parameters())
    path = save_hf_dir(model, out / "model", family="causal_lm", tokenizer_dir=tok_dir)
    (path / "bench.json").write_text(json.dumps({"parameters": params, "texts": texts[:64]}))
    return path


def make_prompts(model_dir: Path, count: int, tokens: int) -> list[str]:
    """``count`` prompts of about ``tokens`` tokens, cut from the corpus."""
    from genloop.data.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(model_dir)
    texts = json.loads((model_dir / "bench.json").read_text())["texts"]
    prompts = []
    for i in range(count):
        ids = tok(texts[i % len(texts)])["input_ids"]
        start = (i * 97) % max(1, len(ids) - tokens)
        prompts.append(tok.decode(ids[start : start + tokens]))
    return prompts


# --------------------------------------------------------------------- the servers


def serve_engine(model_dir: Path, port: int, batch: int | None) -> None:
    """genloop's engine behind a minimal OpenAI-style completions endpoint (streams SSE)."""
    import uuid

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    from genloop.config import ServeConfig
    from genloop.serve.engine import load_engine
    from genloop.serve.engine.engine import collect
    from genloop.serve.engine.types import Finished, GenerationRequest, SamplingParams

    cfg = ServeConfig(device="cpu", max_queue=256)
    if batch is not None:
        cfg = cfg.model_copy(update={"max_batch_size": batch})
    engine = load_engine(model_dir, model_name="bench", model_version=1, cfg=cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await engine.start()
        yield
        await engine.drain(5)

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        params = SamplingParams(
            max_tokens=int(body.get("max_tokens", 16)),
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            ignore_eos=bool(body.get("ignore_eos", False)),
        )
        ids = engine.encode(body["prompt"])
        rid = uuid.uuid4().hex
        stream = engine.submit(GenerationRequest(rid, ids, params))
        if not body.get("stream"):
            _, done = await collect(stream)
            usage = {"prompt_tokens": len(ids), "completion_tokens": done.completion_tokens}
            return JSONResponse({"choices": [{"text": done.text}], "usage": usage})

        async def events() -> Any:
            try:
                async for event in stream:
                    if isinstance(event, Finished):
                        usage = {
                            "prompt_tokens": len(ids),
                            "completion_tokens": event.completion_tokens,
                        }
                        chunk = {
                            "choices": [{"text": "", "finish_reason": event.reason}],
                            "usage": usage,
                        }
                        yield f"data: {json.dumps(chunk)}\n\n"
                    else:
                        yield f"data: {json.dumps({'choices': [{'text': event.text}]})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                await stream.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def serve_hf(model_dir: Path, port: int) -> None:
    """Hugging Face ``generate`` once per request (the naive server), non-streamed."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.pretrained import load_pretrained

    model = load_pretrained(model_dir)
    tok = load_hf_tokenizer(model_dir)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        return await asyncio.to_thread(generate, body)

    def generate(body: dict[str, Any]) -> Any:
        ids = torch.tensor([tok(body["prompt"])["input_ids"]])
        new = int(body.get("max_tokens", 16))
        temperature = float(body.get("temperature", 1.0))
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new if body.get("ignore_eos") else 0,
                pad_token_id=tok.pad_token_id,
                **sampling,
            )
        completion = out[0, ids.shape[1] :]
        usage = {"prompt_tokens": ids.shape[1], "completion_tokens": int(completion.numel())}
        text = tok.decode(completion, skip_special_tokens=True)
        return JSONResponse({"choices": [{"text": text}], "usage": usage})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def bench_app(model_dir: Path, port: int, root: Path, **serve: Any) -> tuple[Any, str]:
    """genloop's app (``genloop serve``) on a workspace in ``root`` where the checkpoint is
    ``bench``, and a generate key: per-key rate limits, request records and the repetition
    guard off (the benchmark's own load must not meet them); ``serve`` overrides the rest."""
    from genloop.config import parse_config
    from genloop.security.keys import create_key
    from genloop.serve.app import create_app
    from genloop.workspace import init_workspace, registry

    ws = init_workspace(root / "ws")
    registry.register_model(ws, "bench", "causal_lm", model_dir)
    key = create_key(ws.catalog, name="bench", scopes=["generate"]).plaintext
    defaults = {
        "models": ["bench"],
        "port": port,
        "device": "cpu",
        "max_queue": 256,
        "store_requests": False,
        "ui": False,
        "rate_limit": {"requests_per_min": None, "tokens_per_min": None},
    }
    cfg = parse_config(
        {
            "serve": defaults | serve,
            "security": {"guardrails": {"max_repetition": None}},
        }
    )
    return create_app(ws, cfg), key


def serve_app(model_dir: Path, port: int, batch: int | None, root: Path) -> None:
    """genloop's own server (``genloop serve``): auth, limits, metrics, request records."""
    import uvicorn

    # without --batch: serve.max_batch_size's default, as `genloop serve` has it
    serve = {} if batch is None else {"max_batch_size": batch}
    app, key = bench_app(model_dir, port, root, **serve)
    (root / "key").write_text(key)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


@dataclass
class Server:
    name: str
    url: str
    model: str
    proc: subprocess.Popen[bytes]
    log: Path
    headers: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/health"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("GENLOOP_DATABASE_URL", None)
    return env


def start(kind: str, model_dir: Path, args: argparse.Namespace, tmp: Path) -> Server:
    """Start one server process (``wait_ready`` waits for it, ``stop`` ends it)."""
    port = free_port()
    log = tmp / f"{kind}.log"
    model = "bench"
    if kind == "transformers-serve":
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe), "serve", str(model_dir), "--continuous-batching"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
        cmd += ["--dtype", "float32", "--log-level", "warning"]
        model = str(model_dir)
    elif kind == "vllm":
        cmd = [str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server"]
        cmd += ["--model", str(model_dir), "--served-model-name", model, "--dtype", "float32"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--disable-log-stats"]
        cmd += ["--uvicorn-log-level", "warning"]
        # on the CPU this is the share of RAM vLLM reserves (its default, 0.92, fails on a
        # machine other work shares); the small models here need a sliver of it
        cmd += ["--gpu-memory-utilization", str(args.vllm_memory_fraction)]
    else:
        cmd = [sys.executable, __file__, "--serve", kind, "--model-dir", str(model_dir)]
        cmd += ["--port", str(port), "--state-dir", str(tmp)]
        if args.batch is not None:
            cmd += ["--batch", str(args.batch)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=thread_env(args.threads)
        )
    return Server(kind, f"http://127.0.0.1:{port}", model, proc, log)


def stop(server: Server) -> None:
    with contextlib.suppress(ProcessLookupError):
        server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


def wait_ready(server: Server, tmp: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            tail = server.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{server.name} exited ({server.proc.returncode}): {tail}")
        if server.name == "app" and (tmp / "key").is_file():
            server.headers = {"Authorization": f"Bearer {(tmp / 'key').read_text().strip()}"}
            server.ready_path = "/ready"
        try:
            r = httpx.get(server.url + server.ready_path, headers=server.headers, timeout=5)
            # the app's key file may appear between the check above and this answer
            if r.status_code == 200 and not (server.name == "app" and not server.headers):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{server.name} did not become ready in {timeout:.0f} s")


# ----------------------------------------------------------------------- the client


@dataclass
class Result:
    tokens: int
    e2e: float
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)


@dataclass
class RunFigures:
    concurrency: int
    tokens_per_s: float
    requests: int
    tokens: int
    seconds: float
    ttft: list[float]
    gaps: list[float]
    per_token: list[float]


async def one_request(
    client: Any,
    server: Server,
    prompt: str,
    max_tokens: int,
    stream: bool,
    temperature: float = 1.0,
    extra: dict[str, Any] | None = None,
) -> Result:
    body: dict[str, Any] = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": stream,
    } | (extra or {})
    if server.name in ("engine", "hf"):  # the OpenAI API has no such field
        body["ignore_eos"] = True
    if stream and server.name in ("transformers-serve", "app", "vllm"):
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    if not stream:
        r = await client.post(server.url + "/v1/completions", json=body, headers=server.headers)
        r.raise_for_status()
        tokens = int(r.json()["usage"]["completion_tokens"])
        return Result(tokens, time.perf_counter() - start)
    result = Result(0, 0.0)
    last = None
    counted = 0
    async with client.stream(
        "POST", server.url + "/v1/completions", json=body, headers=server.headers
    ) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            usage = chunk.get("usage")
            if usage:
                result.tokens = int(usage["completion_tokens"])
            choices = chunk.get("choices") or []
            if choices and choices[0].get("text"):
                counted += 1
                if last is None:
                    result.ttft = now - start
                else:
                    result.gaps.append(now - last)
                last = now
    result.e2e = time.perf_counter() - start
    result.tokens = result.tokens or counted
    return result


async def load_run(
    server: Server,
    prompts: list[str],
    concurrency: int,
    *,
    requests: int,
    time_budget: float,
    max_tokens: int,
    stream: bool,
    temperature: float = 1.0,
    extra: dict[str, Any] | None = None,
) -> RunFigures:
    """``concurrency`` clients, each sending requests back to back, ``requests`` in all
    (or fewer when ``time_budget`` runs out first)."""
    import httpx

    results: list[Result] = []
    sent = 0
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def worker() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() - start < time_budget:
                prompt = prompts[sent % len(prompts)]
                sent += 1
                results.append(
                    await one_request(
                        client, server, prompt, max_tokens, stream, temperature, extra
                    )
                )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    tokens = sum(r.tokens for r in results)
    return RunFigures(
        concurrency=concurrency,
        tokens_per_s=tokens / seconds,
        requests=len(results),
        tokens=tokens,
        seconds=seconds,
        ttft=[r.ttft for r in results if r.ttft is not None],
        gaps=[g for r in results for g in r.gaps],
        per_token=[r.e2e / r.tokens for r in results if r.tokens],
    )


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 2)


def warm_up(server: Server, prompts: list[str]) -> None:
    asyncio.run(
        load_run(server, prompts, 1, requests=2, time_budget=60, max_tokens=8, stream=False)
    )


def measure(
    servers: dict[str, Server], prompts: list[str], args: argparse.Namespace
) -> dict[str, dict[int, RunFigures]]:
    """Load runs at 1, 4 and 16 clients; the sides take turns, ``--repeat`` rounds, and the
    best round of each side counts (the machine's load drifts; turns share the drift)."""
    best: dict[str, dict[int, RunFigures]] = {side: {} for side in servers}
    for c in CONCURRENCY:
        requests = max(args.requests_per_client * c, args.min_requests)
        for _ in range(args.repeat):
            for side, server in servers.items():
                f = asyncio.run(
                    load_run(
                        server,
                        prompts,
                        c,
                        requests=requests,
                        time_budget=args.time_budget,
                        max_tokens=args.max_tokens,
                        stream=side != "baseline",  # the per-request server cannot stream
                    )
                )
                lat = ""
                if f.ttft:
                    lat = f"  ttft p50 {ms(pct(f.ttft, 50))} ms  itl p50 {ms(pct(f.gaps, 50))} ms"
                print(
                    f"  {server.name:>19} c={c:<2} {f.tokens_per_s:8.1f} tok/s  "
                    f"({f.requests} requests, {f.tokens} tokens, {f.seconds:.1f} s){lat}",
                    file=sys.stderr,
                )
                if c not in best[side] or f.tokens_per_s > best[side][c].tokens_per_s:
                    best[side][c] = f
    return best


def bs1_latency(
    servers: dict[str, Server], prompts: list[str], args: argparse.Namespace
) -> dict[str, float]:
    """Median seconds per token, one client, non-streamed (the same measure on both
    sides); the sides take turns and the best round counts."""
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for side in ("genloop", "baseline"):
            f = asyncio.run(
                load_run(
                    servers[side],
                    prompts,
                    1,
                    requests=args.bs1_requests,
                    time_budget=args.time_budget,
                    max_tokens=args.max_tokens,
                    stream=False,
                )
            )
            value = statistics.median(f.per_token)
            best[side] = min(best.get(side, value), value)
    return best


# ------------------------------------------------ the native engine on every family

FAMILY_TARGET_RATIO = 0.8  # each batched family's tokens/s at least this × Llama's


def family_configs(vocab_size: int, tok: Any) -> dict[str, Any]:
    """One config per batched family, all the size of the ``tiny`` preset (4 layers, 256
    wide, 4 heads, a 704-wide gated MLP or a 1024-wide plain one, 512 positions), each
    with its family's defaults otherwise (Gemma 2's soft-capping, Gemma 3's local layers,
    NeoX's partial rotary and parallel residual, Qwen 3's and OLMo 2's q/k norms)."""
    import transformers as tf

    ids = {
        "vocab_size": vocab_size,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    size = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4}
    gated = size | ids | {"intermediate_size": 704, "max_position_embeddings": 512}
    return {
        "llama": tf.LlamaConfig(**gated, num_key_value_heads=4),
        "mistral": tf.MistralConfig(**gated, num_key_value_heads=4),
        "qwen2": tf.Qwen2Config(**gated, num_key_value_heads=4),
        "qwen3": tf.Qwen3Config(**gated, num_key_value_heads=4, head_dim=64),
        "gemma2": tf.Gemma2Config(**gated, num_key_value_heads=4, head_dim=64),
        "gemma3_text": tf.Gemma3TextConfig(**gated, num_key_value_heads=4, head_dim=64),
        "phi3": tf.Phi3Config(**gated, num_key_value_heads=4),
        "gpt2": tf.GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=512, **ids),
        "gpt_neox": tf.GPTNeoXConfig(
            **size, **ids, intermediate_size=1024, max_position_embeddings=512
        ),
        "olmo2": tf.Olmo2Config(**gated, num_key_value_heads=4),
    }


def bench_families(args: argparse.Namespace) -> dict[str, Any]:
    """Tokens/s of the engine alone (no HTTP) on every batched family: 16 concurrent
    sequences (prompts of ``--prompt-tokens``) × ``--max-tokens`` new tokens each, sampled,
    EOS ignored. A run takes about a second, so the families take turns for 3 × ``--repeat``
    rounds, each family's best round counting (a shared machine's load comes and goes);
    the ratio is to Llama's in the same run."""
    import torch
    import transformers as tf

    from genloop.config import ServeConfig
    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.pretrained import save_hf_dir
    from genloop.serve.engine import load_engine
    from genloop.serve.engine.architectures import CAUSAL_LM_CLASSES
    from genloop.serve.engine.engine import collect
    from genloop.serve.engine.types import GenerationRequest, SamplingParams

    torch.set_num_threads(args.threads)
    concurrent, rounds = 16, 3 * args.repeat
    with tempfile.TemporaryDirectory(prefix="bench_families_") as tmp_name:
        tmp = Path(tmp_name)
        tok_dir = build_checkpoint(tmp / "tok", "tiny", args.vocab_size, 0.5)
        tok = load_hf_tokenizer(tok_dir)
        prompts = [
            tok(p)["input_ids"] for p in make_prompts(tok_dir, concurrent, args.prompt_tokens)
        ]
        engines = {}
        cfg = ServeConfig(device="cpu", max_batch_size=concurrent, max_queue=4 * concurrent)
        for name, config in family_configs(args.vocab_size, tok).items():
            torch.manual_seed(0)
            model = getattr(tf, CAUSAL_LM_CLASSES[name])(config)
            path = save_hf_dir(model, tmp / name, family="causal_lm", tokenizer_dir=tok_dir)
            engines[name] = load_engine(path, model_name=name, model_version=1, cfg=cfg)

        async def one_run(engine: Any) -> tuple[float, float]:
            params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, ignore_eos=True)
            started, cpu = time.perf_counter(), time.process_time()
            streams = [
                engine.submit(GenerationRequest(f"r{i}", p, params)) for i, p in enumerate(prompts)
            ]
            done = await asyncio.gather(*(collect(s) for s in streams))
            tokens = sum(finished.completion_tokens for _, finished in done)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            return tokens / wall, tokens / cpu

        async def main() -> tuple[dict[str, float], dict[str, float]]:
            wall: dict[str, float] = {}
            cpu: dict[str, float] = {}
            for engine in engines.values():
                await engine.start()
                await one_run(engine)  # warm-up
            for _ in range(rounds):
                for name, engine in engines.items():
                    per_s, per_cpu_s = await one_run(engine)
                    wall[name] = max(wall.get(name, 0.0), per_s)
                    cpu[name] = max(cpu.get(name, 0.0), per_cpu_s)
            for engine in engines.values():
                await engine.close()
            return wall, cpu

        best, per_cpu = asyncio.run(main())
        runners = {name: engine.runner.kind for name, engine in engines.items()}
    llama, llama_cpu = best["llama"], per_cpu["llama"]
    print(
        f"native engine, {concurrent} sequences × {args.max_tokens} new tokens, "
        f"{args.threads} torch thread(s), best of {rounds} rounds (tokens per second of wall "
        "time, and per second of this process's CPU time, which other processes on a shared "
        "machine disturb far less; the target is read on the latter):",
        file=sys.stderr,
    )
    for name, value in best.items():
        ratio, cpu_ratio = value / llama, per_cpu[name] / llama_cpu
        met = "met" if cpu_ratio >= FAMILY_TARGET_RATIO else "NOT met"
        print(
            f"  {name:12s} {value:8.1f} tokens/s {ratio:5.2f}× llama | {per_cpu[name]:8.1f} "
            f"tokens/CPU-s {cpu_ratio:5.2f}× llama  ({runners[name]} runner; "
            f"target >= {FAMILY_TARGET_RATIO}: {met})",
            file=sys.stderr,
        )
    return {
        "tokens_per_s": {name: round(value, 1) for name, value in best.items()},
        "ratio_to_llama": {name: round(value / llama, 2) for name, value in best.items()},
        "tokens_per_cpu_s": {name: round(value, 1) for name, value in per_cpu.items()},
        "cpu_ratio_to_llama": {
            name: round(value / llama_cpu, 2) for name, value in per_cpu.items()
        },
        "runner": runners,
        "concurrent": concurrent,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "rounds": rounds,
    }


# ------------------------------------------------- genloop's gateway over managed vLLM
#
# ``--vllm-gateway``: a section of its own. genloop's server with ``serve.engine: vllm``
# (keys, limits, metrics, request records off as above) runs in a subprocess and starts
# one vLLM process; the client loads that vLLM process through the gateway and directly
# (its internal address and key, which the gateway process writes to a file), in turns,
# at 16 and 64 streaming clients. Same process, same checkpoint, same run: the ratio is
# the gateway's cost. Figures: ``vllm_gateway_tokens_per_s_cN``,
# ``bare_vllm_tokens_per_s_cN``, ``vllm_gateway_ratio_cN`` (N = 16, 64), and the CPU time
# per generated token of the gateway process and of vLLM's process group (from /proc).
# ``BENCH_PROFILE=FILE`` profiles the gateway process (cProfile; ``kill -USR1`` dumps it).

VLLM_GATEWAY_CONCURRENCY = (16, 64)
TARGET_VLLM_GATEWAY_RATIO = 0.95


def serve_vllm_gateway(model_dir: Path, port: int, batch: int, root: Path) -> None:
    """genloop's server over a managed vLLM process; writes vLLM's own address and key to
    ``root/vllm.json`` once it is up, for the bare-vLLM side of the comparison."""
    import threading

    import uvicorn

    app, key = bench_app(model_dir, port, root, engine="vllm", max_batch_size=batch)

    def publish() -> None:
        while True:
            current = app.state.server.models.served[0].current
            if current is not None and current.engine is not None:
                process = current.engine.process
                (root / "vllm.json").write_text(
                    json.dumps(
                        {
                            "url": process.base_url,
                            "key": process.api_key,
                            "model": process.served_name,
                            "pid": process.pid,
                            "gateway_key": key,
                        }
                    )
                )
                return
            time.sleep(0.5)

    threading.Thread(target=publish, daemon=True).start()
    profile_to = os.environ.get("BENCH_PROFILE")  # where the gateway's time goes
    if not profile_to:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
        return
    import cProfile

    prof = cProfile.Profile()
    signal.signal(signal.SIGUSR1, lambda *_: prof.dump_stats(profile_to))  # dump on demand
    prof.enable()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def cpu_seconds(pid: int, *, group: bool = False) -> float:
    """User + system CPU seconds of process ``pid`` (``group``: of every process in its
    process group, as vLLM's API server and its engine core), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat") if group else [Path(f"/proc/{pid}/stat")]:
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if not group or int(fields[2]) == pid:  # fields[2]: the process group id
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def vllm_gateway_main(args: argparse.Namespace) -> dict[str, Any]:
    """Gateway over managed vLLM vs that vLLM bare, at 16 and 64 clients (section above)."""
    from genloop.serve.engine.vllm import require_vllm_python

    require_vllm_python()  # a clear error naming `make vllm` when it is missing
    started = time.perf_counter()
    batch = max(VLLM_GATEWAY_CONCURRENCY)
    with tempfile.TemporaryDirectory(prefix="bench_vllm_gateway_") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_checkpoint(tmp, args.preset, args.vocab_size, 0.5 if args.quick else 1.0)
        params = json.loads((model_dir / "bench.json").read_text())["parameters"]
        prompts = make_prompts(model_dir, 32, args.prompt_tokens)
        print(
            f"vLLM gateway: {args.preset} ({params / 1e6:.2f}M parameters), {args.max_tokens} "
            f"new tokens per request, streamed, best of {args.repeat}",
            file=sys.stderr,
        )
        port = free_port()
        log = tmp / "vllm-gateway.log"
        cmd = [sys.executable, __file__, "--serve", "vllm-gateway", "--model-dir", str(model_dir)]
        cmd += ["--port", str(port), "--batch", str(batch), "--state-dir", str(tmp)]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=thread_env(args.threads)
            )
        gateway = Server("vllm-gateway", f"http://127.0.0.1:{port}", "bench", proc, log)
        try:
            deadline = time.monotonic() + args.start_timeout + 600  # vLLM starts in minutes
            while not (tmp / "vllm.json").is_file():
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the vLLM gateway did not start: {tail}")
                time.sleep(0.5)
            inner = json.loads((tmp / "vllm.json").read_text())
            gateway.headers = {"Authorization": f"Bearer {inner['gateway_key']}"}
            gateway.ready_path = "/ready"
            wait_ready(gateway, tmp, timeout=args.start_timeout)
            bare = Server("bare-vllm", inner["url"], inner["model"], proc, log)
            bare.headers = {"Authorization": f"Bearer {inner['key']}"}
            sides = {"gateway": gateway, "bare": bare}
            for server in sides.values():
                warm_up(server, prompts)
            best: dict[str, dict[int, RunFigures]] = {side: {} for side in sides}
            cpu: dict[str, dict[int, tuple[float, float]]] = {side: {} for side in sides}
            for c in VLLM_GATEWAY_CONCURRENCY:
                requests = max(args.requests_per_client * c, args.min_requests)
                for _ in range(args.repeat):
                    for side, server in sides.items():
                        before = cpu_seconds(proc.pid), cpu_seconds(inner["pid"], group=True)
                        f = asyncio.run(
                            load_run(
                                server,
                                prompts,
                                c,
                                requests=requests,
                                time_budget=args.time_budget,
                                max_tokens=args.max_tokens,
                                stream=True,
                            )
                        )
                        gw_cpu = cpu_seconds(proc.pid) - before[0]
                        vllm_cpu = cpu_seconds(inner["pid"], group=True) - before[1]
                        per_token = 1e6 / max(1, f.tokens)
                        cpu[side][c] = (gw_cpu * per_token, vllm_cpu * per_token)
                        print(
                            f"  {server.name:>12} c={c:<2} {f.tokens_per_s:8.1f} tok/s  "
                            f"({f.requests} requests, {f.tokens} tokens, {f.seconds:.1f} s)  "
                            f"ttft p50 {ms(pct(f.ttft, 50))} ms  itl p50 {ms(pct(f.gaps, 50))} ms"
                            f"  CPU per token: gateway {gw_cpu * per_token:.0f} µs, "
                            f"vLLM {vllm_cpu * per_token:.0f} µs",
                            file=sys.stderr,
                        )
                        if c not in best[side] or f.tokens_per_s > best[side][c].tokens_per_s:
                            best[side][c] = f
        except BaseException:
            print(
                f"the gateway's log ends:\n{log.read_text(errors='replace')[-4000:]}",
                file=sys.stderr,
            )
            raise
        finally:
            if os.environ.get("BENCH_PROFILE") and proc.poll() is None:
                os.kill(proc.pid, signal.SIGUSR1)  # the gateway's profile, before it stops
                time.sleep(3.0)
            stop(gateway)
    figures: dict[str, Any] = {}
    for c in VLLM_GATEWAY_CONCURRENCY:
        ours, theirs = best["gateway"][c].tokens_per_s, best["bare"][c].tokens_per_s
        figures[f"vllm_gateway_tokens_per_s_c{c}"] = round(ours, 1)
        figures[f"bare_vllm_tokens_per_s_c{c}"] = round(theirs, 1)
        figures[f"vllm_gateway_ratio_c{c}"] = round(ours / theirs, 3)
        figures[f"vllm_gateway_ttft_p50_ms_c{c}"] = ms(pct(best["gateway"][c].ttft, 50))
        figures[f"bare_vllm_ttft_p50_ms_c{c}"] = ms(pct(best["bare"][c].ttft, 50))
        # CPU time per generated token (last round): what the gateway adds to vLLM's own
        figures[f"gateway_cpu_us_per_token_c{c}"] = round(cpu["gateway"][c][0])
        figures[f"vllm_cpu_us_per_token_c{c}"] = round(cpu["bare"][c][1])
    figures |= {
        "preset": args.preset,
        "parameters": params,
        "max_tokens": args.max_tokens,
        "repeat": args.repeat,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
    }
    for c in VLLM_GATEWAY_CONCURRENCY:
        value = figures[f"vllm_gateway_ratio_c{c}"]
        met = value >= TARGET_VLLM_GATEWAY_RATIO
        print(
            f"vllm_gateway_ratio_c{c} = {value} "
            f"(target >= {TARGET_VLLM_GATEWAY_RATIO}: {'met' if met else 'NOT met'})",
            file=sys.stderr,
        )
    print(json.dumps(figures))
    return figures


# ---------------------------------------------------------------- genloop vs vLLM


def vllm_python(args: argparse.Namespace) -> tuple[Path | None, str | None]:
    """The vLLM environment's Python, or None and why it cannot be used."""
    if args.vllm == "off" or (args.vllm == "auto" and args.quick):
        why = "--vllm off" if args.vllm == "off" else "skipped in --quick (use --vllm on)"
        return None, why
    path = Path(args.vllm_python or os.environ.get("GENLOOP_VLLM_PYTHON") or DEFAULT_VLLM_PYTHON)
    if not path.is_file():
        return None, f"no vLLM environment at {path} (make vllm, or --vllm-python PATH)"
    return path, None


def versus_vllm(
    servers: dict[str, Server], prompts: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """genloop's app and vLLM-CPU in turns at 1, 16 and 64 clients, temperature 0, streamed
    and not; the best round of each side counts. Figures: each side's tokens/s and the
    ratio genloop / vLLM per concurrency (``_nostream`` for whole responses)."""
    out: dict[str, Any] = {}
    for stream in (True, False):
        suffix = "" if stream else "_nostream"
        for c in VLLM_CONCURRENCY:
            requests = max(args.requests_per_client * c, args.min_requests)
            best: dict[str, float] = {}
            for _ in range(args.repeat):
                for side in ("genloop", "vllm"):
                    f = asyncio.run(
                        load_run(
                            servers[side],
                            prompts,
                            c,
                            requests=requests,
                            time_budget=args.time_budget,
                            max_tokens=args.max_tokens,
                            stream=stream,
                            temperature=0.0,
                        )
                    )
                    print(
                        f"  {side:>7} greedy{suffix:<9} c={c:<2} {f.tokens_per_s:8.1f} tok/s  "
                        f"({f.requests} requests, {f.tokens} tokens, {f.seconds:.1f} s)",
                        file=sys.stderr,
                    )
                    best[side] = max(best.get(side, 0.0), f.tokens_per_s)
            out[f"greedy_tokens_per_s_c{c}{suffix}"] = round(best["genloop"], 1)
            out[f"vllm_tokens_per_s_c{c}{suffix}"] = round(best["vllm"], 1)
            out[f"ratio_vs_vllm_c{c}{suffix}"] = round(best["genloop"] / best["vllm"], 2)
    return out


def null_vllm_figures() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for suffix in ("", "_nostream"):
        for c in VLLM_CONCURRENCY:
            for name in ("greedy_tokens_per_s", "vllm_tokens_per_s", "ratio_vs_vllm"):
                out[f"{name}_c{c}{suffix}"] = None
    return out


# ------------------------------------------------------------------ structured outputs

# An extraction schema of the usual kind (what the openai client's parse() sends for a
# pydantic model): strings, a bounded integer, an enum, a list, a nested object.
STRUCTURED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "kind": {"enum": ["function", "class", "module"]},
        "names": {"type": "array", "items": {"type": "string"}},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "active": {"type": "boolean"}},
            "required": ["name", "active"],
            "additionalProperties": False,
        },
    },
    "required": ["title", "year", "kind", "names", "owner"],
    "additionalProperties": False,
}
STRUCTURED_CONCURRENCY = 16
TARGET_STRUCTURED_RATIO = 0.85


def structured_main(args: argparse.Namespace) -> dict[str, Any]:
    """Constrained (``response_format: json_schema``) vs unconstrained completions on one
    genloop server, 16 streaming clients, same prompts, budget and temperature; the two
    take turns, ``--repeat`` rounds, the best round of each counting. Tokens are the
    usage's completion tokens: a constrained request that closes its JSON early counts
    the tokens it generated. The ratio is what constraining costs in throughput."""
    started = time.perf_counter()
    fmt = {"type": "json_schema", "json_schema": {"name": "doc", "schema": STRUCTURED_SCHEMA}}
    sides: dict[str, dict[str, Any] | None] = {
        "unconstrained": None,
        "constrained": {"response_format": fmt},
    }
    c = STRUCTURED_CONCURRENCY
    with tempfile.TemporaryDirectory(prefix="bench_structured_") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_checkpoint(tmp, args.preset, args.vocab_size, 0.5 if args.quick else 1.0)
        params = json.loads((model_dir / "bench.json").read_text())["parameters"]
        prompts = make_prompts(model_dir, 32, args.prompt_tokens)
        print(
            f"structured outputs: {args.preset} ({params / 1e6:.2f}M parameters), "
            f"{args.max_tokens} new tokens per request, {c} clients, best of {args.repeat}",
            file=sys.stderr,
        )
        server = start("app", model_dir, args, tmp)
        try:
            wait_ready(server, tmp, timeout=args.start_timeout)
            for extra in sides.values():
                asyncio.run(
                    load_run(
                        server,
                        prompts,
                        2,
                        requests=4,
                        time_budget=60,
                        max_tokens=16,
                        stream=True,
                        extra=extra,
                    )
                )
            requests = max(args.requests_per_client * c, args.min_requests)
            best: dict[str, RunFigures] = {}
            for _ in range(args.repeat):
                for side, extra in sides.items():
                    f = asyncio.run(
                        load_run(
                            server,
                            prompts,
                            c,
                            requests=requests,
                            time_budget=args.time_budget,
                            max_tokens=args.max_tokens,
                            stream=True,
                            extra=extra,
                        )
                    )
                    print(
                        f"  {side:>13} c={c} {f.tokens_per_s:8.1f} tok/s  ({f.requests} "
                        f"requests, {f.tokens} tokens, {f.seconds:.1f} s)  itl p50 "
                        f"{ms(pct(f.gaps, 50))} ms",
                        file=sys.stderr,
                    )
                    if side not in best or f.tokens_per_s > best[side].tokens_per_s:
                        best[side] = f
        finally:
            stop(server)
    ours, base = best["constrained"], best["unconstrained"]
    ratio = round(ours.tokens_per_s / base.tokens_per_s, 3)
    figures = {
        "structured_tokens_per_s_c16": round(ours.tokens_per_s, 1),
        "unconstrained_tokens_per_s_c16": round(base.tokens_per_s, 1),
        "structured_ratio_c16": ratio,
        "structured_itl_p50_ms": ms(pct(ours.gaps, 50)),
        "unconstrained_itl_p50_ms": ms(pct(base.gaps, 50)),
        "structured_tokens_per_request": round(ours.tokens / max(1, ours.requests), 1),
        "preset": args.preset,
        "parameters": params,
        "vocab_size": args.vocab_size,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "repeat": args.repeat,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
    }
    met = ratio >= TARGET_STRUCTURED_RATIO
    print(
        f"structured_ratio_c16 = {ratio} (target >= {TARGET_STRUCTURED_RATIO}: "
        f"{'met' if met else 'NOT met'})",
        file=sys.stderr,
    )
    print(json.dumps(figures))
    return figures


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (about a minute, 2 cores)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument(
        "--batch", type=int, default=None, help="genloop's max_batch_size (default: serve's)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads in every server")
    p.add_argument("--requests-per-client", type=int, default=None)
    p.add_argument("--min-requests", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="seconds per load run")
    p.add_argument("--bs1-requests", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None, help="rounds of turns; the best counts")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument(
        "--subject",
        choices=("app", "engine"),
        default="app",
        help="genloop's full server (app) or the engine behind a minimal endpoint",
    )
    p.add_argument("--skip-transformers-serve", action="store_true")
    p.add_argument(
        "--families",
        action="store_true",
        help="only the native engine on every batched family (tokens/s, ratio to Llama)",
    )
    p.add_argument(
        "--vllm-gateway",
        action="store_true",
        help="instead: genloop's gateway over managed vLLM vs bare vLLM (make vllm)",
    )
    p.add_argument(
        "--structured",
        action="store_true",
        help="instead: json_schema-constrained vs unconstrained throughput, 16 clients",
    )
    p.add_argument(
        "--vllm",
        choices=("auto", "on", "off"),
        default="auto",
        help="the vLLM-CPU comparison (auto: on, except with --quick)",
    )
    p.add_argument(
        "--vllm-python",
        type=Path,
        default=None,
        help="Python of a vLLM environment (default: $GENLOOP_VLLM_PYTHON, else .venv-vllm)",
    )
    p.add_argument("--vllm-start-timeout", type=float, default=900.0)
    p.add_argument(
        "--vllm-memory-fraction",
        type=float,
        default=0.1,
        help="share of RAM vLLM reserves (its --gpu-memory-utilization; on the CPU, RAM)",
    )
    # internal: run one server in this process
    p.add_argument(
        "--serve", choices=("engine", "hf", "app", "vllm-gateway"), help=argparse.SUPPRESS
    )
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.requests_per_client = args.requests_per_client or (1 if quick else 3)
    args.min_requests = args.min_requests or (2 if quick else 8)
    args.time_budget = args.time_budget or (8.0 if quick else 60.0)
    args.bs1_requests = args.bs1_requests or (2 if quick else 5)
    args.repeat = args.repeat or (1 if quick else 2)
    return args


def serve_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.serve == "engine":
        serve_engine(args.model_dir, args.port, args.batch)
    elif args.serve == "hf":
        serve_hf(args.model_dir, args.port)
    elif args.serve == "vllm-gateway":
        serve_vllm_gateway(args.model_dir, args.port, args.batch, args.state_dir)
    else:
        serve_app(args.model_dir, args.port, args.batch, args.state_dir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from genloop.config import ServeConfig

    args = parse_args(argv)
    if args.serve:
        serve_main(args)
        return {}
    if args.vllm_gateway:
        return vllm_gateway_main(args)
    if args.structured:
        return structured_main(args)
    if args.families or args.quick:  # the quick run prints the families' table too
        families = bench_families(args)
        if args.families:
            print(json.dumps(families))
            return families
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_checkpoint(tmp, args.preset, args.vocab_size, 0.5 if args.quick else 1.0)
        params = json.loads((model_dir / "bench.json").read_text())["parameters"]
        prompts = make_prompts(model_dir, 32, args.prompt_tokens)
        print(
            f"{args.preset}: {params / 1e6:.2f}M parameters, {args.max_tokens} new tokens per "
            f"request, {args.threads} torch thread(s) per server, best of {args.repeat}",
            file=sys.stderr,
        )
        # All servers stay up (idle ones use no CPU) so that the sides can take turns;
        # they start together, which saves a minute of imports.
        with contextlib.ExitStack() as stack:
            kinds = {"genloop": args.subject, "baseline": "hf"}
            ts_reason = None
            if args.skip_transformers_serve:
                ts_reason = "skipped (--skip-transformers-serve)"
            else:
                kinds["transformers_serve"] = "transformers-serve"
            servers: dict[str, Server] = {}
            args.vllm_python, vllm_reason = vllm_python(args)
            if args.vllm_python is not None:
                kinds["vllm"] = "vllm"
            for side, kind in kinds.items():
                try:
                    servers[side] = start(kind, model_dir, args, tmp)
                except OSError as exc:  # e.g. the transformers CLI is not installed
                    if side == "vllm":
                        vllm_reason = f"{type(exc).__name__}: {exc}"
                    else:
                        ts_reason = f"{type(exc).__name__}: {exc}"
                    continue
                stack.callback(stop, servers[side])
            for side in list(servers):
                timeout = args.vllm_start_timeout if side == "vllm" else args.start_timeout
                try:
                    wait_ready(servers[side], tmp, timeout=timeout)
                except RuntimeError as exc:
                    if side not in ("transformers_serve", "vllm"):
                        raise
                    reason = str(exc)[-500:]  # it cannot run here: say why
                    if side == "vllm":
                        vllm_reason = reason
                    else:
                        ts_reason = reason
                    print(f"{side}: {reason}", file=sys.stderr)
                    stop(servers.pop(side))
            vllm = servers.pop("vllm", None)  # not a side of the rounds below
            for server in servers.values():
                warm_up(server, prompts)
            runs = measure(servers, prompts, args)
            bs1 = bs1_latency(servers, prompts, args)
            versus = null_vllm_figures()
            if vllm is not None:
                warm_up(vllm, prompts)
                versus = versus_vllm({"genloop": servers["genloop"], "vllm": vllm}, prompts, args)
    ours, base = runs["genloop"], runs["baseline"]
    ts = runs.get("transformers_serve")
    ours_bs1, base_bs1 = bs1["genloop"], bs1["baseline"]
    c16 = ours[16]
    figures: dict[str, Any] = {
        "tokens_per_s_c1": round(ours[1].tokens_per_s, 1),
        "tokens_per_s_c4": round(ours[4].tokens_per_s, 1),
        "tokens_per_s_c16": round(c16.tokens_per_s, 1),
        "baseline_tokens_per_s_c1": round(base[1].tokens_per_s, 1),
        "baseline_tokens_per_s_c4": round(base[4].tokens_per_s, 1),
        "baseline_tokens_per_s_c16": round(base[16].tokens_per_s, 1),
        "ratio_c16": round(c16.tokens_per_s / base[16].tokens_per_s, 2),
        "transformers_serve_tokens_per_s_c1": round(ts[1].tokens_per_s, 1) if ts else None,
        "transformers_serve_tokens_per_s_c4": round(ts[4].tokens_per_s, 1) if ts else None,
        "transformers_serve_tokens_per_s_c16": round(ts[16].tokens_per_s, 1) if ts else None,
        "ratio_vs_transformers_serve_c16": (
            round(c16.tokens_per_s / ts[16].tokens_per_s, 2) if ts else None
        ),
        "transformers_serve_null_reason": ts_reason,
        **versus,
        "vllm_null_reason": vllm_reason,
        "ttft_p50_ms": ms(pct(c16.ttft, 50)),
        "ttft_p99_ms": ms(pct(c16.ttft, 99)),
        "itl_p50_ms": ms(pct(c16.gaps, 50)),
        "itl_p99_ms": ms(pct(c16.gaps, 99)),
        "ttft_p50_ms_c1": ms(pct(ours[1].ttft, 50)),
        "itl_p50_ms_c1": ms(pct(ours[1].gaps, 50)),
        "transformers_serve_ttft_p50_ms_c16": ms(pct(ts[16].ttft, 50)) if ts else None,
        "transformers_serve_itl_p50_ms_c16": ms(pct(ts[16].gaps, 50)) if ts else None,
        "per_token_latency_ms_bs1": ms(ours_bs1),
        "baseline_per_token_latency_ms_bs1": ms(base_bs1),
        "per_token_latency_ratio_bs1": round(ours_bs1 / base_bs1, 3),
        "subject": args.subject,
        "max_batch_size": args.batch or ServeConfig().max_batch_size,
        "preset": args.preset,
        "parameters": params,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "repeat": args.repeat,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
    }
    targets = [
        ("ratio_c16", figures["ratio_c16"], TARGET_RATIO_C16, ">="),
        (
            "ratio_vs_transformers_serve_c16",
            figures["ratio_vs_transformers_serve_c16"],
            TARGET_RATIO_VS_TS,
            ">=",
        ),
        (
            "per_token_latency_ratio_bs1",
            figures["per_token_latency_ratio_bs1"],
            TARGET_LATENCY_RATIO,
            "<=",
        ),
    ]
    for c, target in TARGET_RATIO_VS_VLLM.items():
        for suffix in ("", "_nostream"):
            key = f"ratio_vs_vllm_c{c}{suffix}"
            targets.append((key, figures[key], target, ">="))
    for name, value, target, op in targets:
        if value is None:
            continue
        met = value >= target if op == ">=" else value <= target
        print(
            f"{name} = {value} (target {op} {target}: {'met' if met else 'NOT met'})",
            file=sys.stderr,
        )
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
