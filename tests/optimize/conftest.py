"""Tiny models for the optimize tests.

``llama`` is an untrained 2-layer, 64-wide Llama with grouped-query attention (4 query
heads, 2 key/value heads); ``trained`` is a workspace holding a prepared fixture dataset
and such a model trained on it for a few steps (registered as ``lm@1``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from genloop.workspace import Workspace, init_workspace

from ..conftest import torch_on_one_thread, write_corpus

TINY: dict[str, Any] = {
    "preset": "tiny",
    "vocab_size": 128,
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 4,
    "n_kv_head": 2,
    "context_length": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest (and steadiest on a shared machine) on one thread: each test,
    not the session/module fixtures (``trained`` sets its own threads)."""
    with torch_on_one_thread():
        yield


@pytest.fixture
def llama() -> Any:
    from genloop.models.causal_lm import FAMILY

    torch.manual_seed(0)
    return FAMILY.build(TINY)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workspace, str]]:
    """A workspace with the fixture dataset ``fx`` and ``lm@1`` trained on it (20 steps)."""
    from genloop.config import DataConfig, GenloopConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset
    from genloop.train.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("optimize")
    ws = init_workspace(root / "ws")
    data = DataConfig.model_validate(
        {
            "name": "fx",
            "sources": [{"type": "files", "paths": [str(write_corpus(root / "corpus"))]}],
            "split": {"val": 0.1, "test": 0.1},
            "workers": 1,
        }
    )
    prepare_dataset(ws, data, TokenizerConfig(vocab_size=320, seq_len=32))
    cfg = GenloopConfig.model_validate(
        {
            "name": "lm",
            "tokenizer": {"vocab_size": 320, "seq_len": 32},
            "model": {"preset": "tiny", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2},
            "train": {
                "dataset": "fx",
                "lr": 3e-3,
                "max_steps": 20,
                "warmup_steps": 2,
                "batch_size": 8,
                "eval_every": 20,
                "eval_batches": 1,
                "checkpoint_every": 20,
                "device": "cpu",
            },
        }
    )
    result = train(ws, cfg)
    assert result.model is not None
    torch.set_num_threads(threads)
    try:
        yield ws, result.model.ref
    finally:
        ws.close()


WORKLOAD = {
    "prompt_len": 8,
    "new_tokens": 3,
    "repeats": 2,
    "warmup": 1,
    "throughput_batch": 2,
    "ppl_windows": 4,
}


@pytest.fixture(scope="session")
def optimized(trained: tuple[Workspace, str]) -> dict[str, Any]:
    """``lm@1`` pruned 30% (+3 recovery steps), then int8-quantized and exported to ONNX
    (with an onnxruntime int8 copy): the variants by transform name, and the result."""
    from genloop.config import OptimizeConfig
    from genloop.optimize.run import optimize_model

    ws, ref = trained
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = OptimizeConfig(quantize="int8", prune=0.3, recovery_steps=3, export="onnx")
    result = optimize_model(ws, ref, cfg)
    torch.set_num_threads(threads)
    by_transform = {v.tags["optimize"]: v for v in result.variants}
    return {"result": result, **by_transform}
