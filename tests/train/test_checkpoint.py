"""Checkpoints: atomic, verified on load, complete enough to resume exactly, pruned to the
newest K and the best."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from genloop.errors import GenloopError, IntegrityError
from genloop.train import checkpoint as ckpt
from genloop.workspace import Workspace
from genloop.workspace.store import ArtifactStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = "0123456789abcdef0123456789abcdef"
TINY: dict[str, Any] = {
    "preset": "tiny",
    "vocab_size": 96,
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 2,
    "context_length": 32,
    "dropout": 0.1,
}


def build(**overrides: Any) -> torch.nn.Module:
    from genloop.models.causal_lm import FAMILY

    torch.manual_seed(0)
    return FAMILY.build(TINY | overrides)


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int) -> list[float]:
    """``n`` AdamW steps on random tokens (dropout on: the RNG matters)."""
    losses = []
    model.train()
    for _ in range(n):
        ids = torch.randint(0, TINY["vocab_size"], (2, 16))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def make(
    **overrides: Any,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build(**overrides)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def save(store: ArtifactStore, step: int, model: torch.nn.Module, opt: Any, **state: Any) -> str:
    return ckpt.save_checkpoint(store, RUN, step, model, opt, {"best_val": 1.0, **state})


@pytest.fixture
def store(workspace: Workspace) -> ArtifactStore:
    return workspace.store


def test_restore_continues_exactly(store: ArtifactStore) -> None:
    model, opt = make()
    train_steps(model, opt, 3)
    save(store, 3, model, opt, history=[3.0, 2.5])
    expected = train_steps(model, opt, 3)  # what the uninterrupted run does next
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_py, expected_np = random.random(), np.random.rand()

    fresh, fresh_opt = make()  # another process, another init, other RNG positions
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    found = ckpt.load_latest(store, RUN)
    assert found is not None and found.step == 3
    assert found.state["history"] == [3.0, 2.5] and found.state["best_val"] == 1.0
    ckpt.restore(found, fresh, fresh_opt)
    assert train_steps(fresh, fresh_opt, 3) == expected  # dropout masks, Adam moments, step
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected_weights[key]), key
    assert (random.random(), np.random.rand()) == (expected_py, expected_np)


def test_tied_embeddings_are_stored_once_and_restored_tied(store: ArtifactStore) -> None:
    model, opt = make(tie_embeddings=True)
    train_steps(model, opt, 1)
    save(store, 1, model, opt)
    fresh, fresh_opt = make(tie_embeddings=True)
    found = ckpt.load_latest(store, RUN)
    assert found is not None
    ckpt.restore(found, fresh, fresh_opt)
    emb = fresh.get_input_embeddings().weight  # type: ignore[operator]
    assert fresh.get_output_embeddings().weight is emb  # type: ignore[operator]
    assert torch.equal(emb, model.get_input_embeddings().weight)  # type: ignore[operator]


def test_a_checkpoint_of_another_architecture_is_refused(store: ArtifactStore) -> None:
    model, opt = make()
    save(store, 1, model, opt)
    other, other_opt = make(n_layer=3)
    found = ckpt.load_latest(store, RUN)
    assert found is not None
    with pytest.raises(GenloopError, match="does not fit this model"):
        ckpt.restore(found, other, other_opt)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different hash
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        (truncate, "model.safetensors"),
        (flip_byte, "model.safetensors"),
        (flip_byte, "optimizer.safetensors"),
        (truncate, "state.json"),
        (Path.unlink, "rng.safetensors"),
    ],
)
def test_a_damaged_checkpoint_is_refused_and_the_previous_one_used(
    store: ArtifactStore, damage: Any, file: str, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt = make()
    save(store, 2, model, opt)
    train_steps(model, opt, 1)
    newest = save(store, 4, model, opt)
    damage(store.path(newest) / file)

    with pytest.raises(IntegrityError, match=file.replace(".", r"\.")):
        ckpt.load_checkpoint(store, newest)
    found = ckpt.load_latest(store, RUN)
    assert found is not None and found.step == 2
    assert "step 4 is unusable" in caplog.text


def test_no_checkpoint_that_verifies_means_none(store: ArtifactStore) -> None:
    assert ckpt.load_latest(store, RUN) is None
    model, opt = make()
    key = save(store, 1, model, opt)
    truncate(store.path(key) / "model.safetensors")
    assert ckpt.load_latest(store, RUN) is None


def test_a_failed_save_publishes_nothing(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    model, opt = make()
    save(store, 1, model, opt)
    real = safetensors.torch.save_file
    calls = []

    def fail_on_second(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        save(store, 2, model, opt)
    assert [step for step, _ in ckpt.list_checkpoints(store, RUN)] == [1]
    assert not list((store.root / ".tmp").iterdir())  # the half-written one is gone


def test_an_unpublished_directory_is_not_a_checkpoint(store: ArtifactStore) -> None:
    """A writer killed before its manifest leaves at most a directory without one."""
    model, opt = make()
    save(store, 1, model, opt)
    partial = store.path(ckpt.checkpoint_key(RUN, 2))
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert [step for step, _ in ckpt.list_checkpoints(store, RUN)] == [1]
    found = ckpt.load_latest(store, RUN)
    assert found is not None and found.step == 1


def test_the_checkpoint_holds_no_pickles(store: ArtifactStore) -> None:
    model, opt = make()
    train_steps(model, opt, 1)
    path = store.path(save(store, 1, model, opt))
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "MANIFEST.sha256",
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 1 and set(state["rng"]) == {"python", "numpy"}
    assert "torch" in load_file(str(path / "rng.safetensors"))


def test_prune_keeps_the_newest_k_and_the_best(store: ArtifactStore) -> None:
    model, opt = make()
    for step in (2, 4, 6, 8, 10):
        save(store, step, model, opt)
    ckpt.prune_checkpoints(store, RUN, keep_last=2, keep={4})
    assert [step for step, _ in ckpt.list_checkpoints(store, RUN)] == [10, 8, 4]
    ckpt.prune_checkpoints(store, RUN, keep_last=1, keep={10})  # the best is the newest
    assert [step for step, _ in ckpt.list_checkpoints(store, RUN)] == [10]
