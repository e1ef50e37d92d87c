"""``train.compile``: when ``auto`` compiles, and a run that compiles trains what an eager
run trains, also when compiling fails (it falls back to eager with a warning).

A 2-layer, 32-wide model without dropout on a fixture corpus, a few steps each.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from genloop.config import GenloopConfig, TrainConfig
from genloop.train.distributed import Dist
from genloop.train.loop import COMPILE_AUTO_MIN_STEPS, TrainResult, should_compile, train
from genloop.workspace import Workspace

from ..conftest import prose_workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATASET = "fx"
STEPS = 4


def config(name: str, **train: Any) -> GenloopConfig:
    spec = {
        "name": name,
        "tokenizer": {"vocab_size": 320, "seq_len": 32},
        "model": {"preset": "tiny", "n_layer": 2, "n_embd": 32, "n_head": 2},
        "train": {
            "dataset": DATASET,
            "lr": 3e-3,
            "warmup_steps": 1,
            "max_steps": STEPS,
            "batch_size": 4,
            "eval_every": STEPS,
            "eval_batches": 1,
            "checkpoint_every": STEPS,
            "device": "cpu",
            **train,
        },
    }
    return GenloopConfig.model_validate(spec)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    workspace = prose_workspace(tmp_path_factory.mktemp("compile"), DATASET)
    yield workspace
    workspace.close()


@pytest.fixture(scope="module")
def eager(ws: Workspace) -> TrainResult:
    return train(ws, config("eager", compile=False), register=False)


def test_auto_compiles_long_single_process_causal_lm_runs_on_a_gpu_only() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    gpu, two = Dist(0, 0, 1, cuda), Dist(0, 0, 2, cuda)
    long = TrainConfig(max_steps=COMPILE_AUTO_MIN_STEPS)
    short = TrainConfig(max_steps=COMPILE_AUTO_MIN_STEPS - 1)
    assert TrainConfig().compile == "auto"
    assert should_compile(long, "causal_lm", "lm", gpu)
    assert not should_compile(long, "causal_lm", "lm", Dist(0, 0, 1, cpu))  # does not pay
    assert not should_compile(short, "causal_lm", "lm", gpu)  # the warm-up would not pay
    assert not should_compile(long, "causal_lm", "lm", two)  # DDP/FSDP: only when asked
    assert not should_compile(long, "causal_lm", "sft", gpu)
    assert not should_compile(long, "diffusion", "diffusion", gpu)
    # set explicitly, it is what it says whatever the run
    assert should_compile(TrainConfig(compile=True, max_steps=2, warmup_steps=1), "vae", "vae", two)
    assert not should_compile(TrainConfig(compile=False), "causal_lm", "lm", gpu)


def test_a_compile_that_fails_falls_back_to_eager_and_trains_the_same(
    ws: Workspace,
    eager: TrainResult,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import torch._inductor.config as inductor

    # a machine without a working C++ compiler: inductor fails at the first step
    # (inductor.patch, not monkeypatch: undoing a setattr on inductor's config drops the key)
    torch._dynamo.reset()
    with (
        inductor.patch({"cpp.cxx": (None, "/nonexistent/g++")}),
        caplog.at_level(logging.WARNING, logger="genloop.train.loop"),
    ):
        result = train(ws, config("fallback", compile=True), register=False)
    assert any("torch.compile failed" in r.getMessage() for r in caplog.records)
    assert result.steps == STEPS
    assert result.history == eager.history  # the failed attempt left no trace
    assert result.metrics["val_loss"] == eager.metrics["val_loss"]


def test_a_compiled_run_compiles_each_decoder_layer_and_trains_what_eager_trains(
    ws: Workspace, eager: TrainResult, caplog: pytest.LogCaptureFixture
) -> None:
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="genloop.train.loop"):
        result = train(ws, config("compiled", compile=True), register=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any("compiling each of the 2 decoder layers" in m for m in messages)
    assert not any("torch.compile failed" in m for m in messages)
    assert result.steps == STEPS
    assert result.history == pytest.approx(eager.history, abs=1e-4)
    assert result.metrics["val_loss"] == pytest.approx(eager.metrics["val_loss"], abs=1e-4)
