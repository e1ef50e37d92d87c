"""The clip family in the one training loop and the eval runner: a few steps on a small
captioned shapes dataset register a CLIP version that loads, whose tokenizer ends texts
with eos, and that ``genloop eval`` scores (seen and held-out reported apart)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from genloop.config import GenloopConfig
from genloop.errors import GenloopError
from genloop.train.loop import train
from genloop.workspace import Workspace, init_workspace, registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {
    "patch_size": 4,
    "vision_hidden": 32,
    "vision_layers": 1,
    "text_hidden": 32,
    "text_layers": 1,
    "heads": 2,
    "projection_dim": 32,
    "max_text_length": 32,
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    from genloop.config import DataConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset

    workspace = init_workspace(tmp_path_factory.mktemp("clip") / "ws")
    data = DataConfig.model_validate(
        {
            "name": "shapes",
            "kind": "images",
            "sources": [{"type": "builtin", "name": "shapes", "count": 400, "size": 16}],
            "images": {"size": 16, "channels": 3},
            "split": {"val": 0.1, "test": 0.1},
            "workers": 1,
        }
    )
    prepare_dataset(workspace, data, TokenizerConfig(vocab_size=320))
    yield workspace
    workspace.close()


def config(name: str, model: dict[str, Any] | None = None, **t: Any) -> GenloopConfig:
    return GenloopConfig.model_validate(
        {
            "name": name,
            "model": {"family": "clip", "clip": SMALL, **(model or {})},
            "train": {
                "objective": "contrastive",
                "dataset": "shapes",
                "lr": 3e-4,
                "min_lr": 3e-5,
                "warmup_steps": 2,
                "max_steps": 12,
                "batch_size": 32,
                "eval_every": 6,
                "eval_batches": 1,
                "checkpoint_every": 100,
                **t,
            },
        }
    )


def test_clip_trains_registers_and_evaluates(ws: Workspace) -> None:
    from genloop.config import EvalConfig
    from genloop.evaluate.run import evaluate_model
    from genloop.models.clip import encode_texts, load_clip

    result = train(ws, config("t-clip"))
    assert len(result.history) == 12 and all(x > 0 for x in result.history)
    assert "val_loss" in result.metrics and result.metrics["tokens_per_s"] > 0  # pairs/s
    assert result.model is not None and result.model.family == "clip"
    model_config = result.model.config["model"]
    assert model_config["image_size"] == 16 and model_config["vision_hidden"] == 32
    model, tok = load_clip(registry.artifact_path(ws, result.model.ref))
    assert float(model.logit_scale.detach()) <= torch.log(torch.tensor(100.0)) + 1e-6
    ids = encode_texts(tok, ["a small red circle on the left"], 32)["input_ids"][0]
    assert ids[-1] == tok.eos_token_id == model.config.text_config.eos_token_id

    record = evaluate_model(ws, result.model.ref, cfg=EvalConfig(max_samples=40))
    assert record.suites == ["clip"]
    metrics = record.metrics
    for split in ("seen", "held_out"):
        for key in ("image_to_text_recall@1", "text_to_image_recall@5", "zero_shot_joint"):
            assert 0.0 <= metrics[f"{key}_{split}"] <= 1.0  # type: ignore[operator]
        assert 0.0 <= metrics[f"clip_score_{split}"] <= 100.0  # type: ignore[operator]
    assert metrics["image_to_text_recall@10_seen"] >= metrics["image_to_text_recall@1_seen"]  # type: ignore[operator]


def test_a_wrong_objective_or_suite_is_named(ws: Workspace) -> None:
    from genloop.evaluate.run import evaluate_model

    with pytest.raises(ValueError, match=r"'lm' does not fit model\.family 'clip'"):
        GenloopConfig.model_validate(
            {"model": {"family": "clip"}, "train": {"objective": "lm", "dataset": "shapes"}}
        )
    with pytest.raises(GenloopError, match="batch_size ≥ 2"):
        train(ws, config("t-clip-one", batch_size=1))
    with pytest.raises(GenloopError, match="image_size is 32"):
        train(ws, config("t-clip-size", {"image_size": 32}))
    result = train(ws, config("t-clip-eval", max_steps=3))
    assert result.model is not None
    with pytest.raises(GenloopError, match="clip model; the perplexity suite"):
        evaluate_model(ws, result.model.ref, suites=["perplexity"])


def test_hard_negatives_pair_captions_one_token_apart() -> None:
    from genloop.train.multimodal import Neighbours

    # captions as token ids (eos = 1, pad = 0): "red circle", "red square", "blue circle",
    # "big red circle" (longer), and a second "red circle" image
    rows = [[5, 7, 1, 0], [5, 8, 1, 0], [6, 7, 1, 0], [9, 5, 7, 1], [5, 7, 1, 0]]
    ids = torch.tensor(rows)
    mask = (ids != 0).long()
    groups = torch.tensor([0, 1, 2, 3, 0])
    near = Neighbours.of(ids, mask, groups)
    assert near.near == {0: [1, 2], 1: [0], 2: [0]}  # one token apart; same length only
    assert near.members[0] == [0, 4]

    idx = [3, 0, 1, 2]
    out = near.harden(idx, 0.5, (0, 7))
    assert out[:2] == [3, 0] and out == near.harden(idx, 0.5, (0, 7))  # seeded
    assert out[2] == 1  # anchor 3 has no neighbour: its random partner stays
    assert out[3] in (1, 2)  # a neighbour of anchor 0 ("red circle")
    assert near.harden(idx, 0.0, (0, 7)) == idx


def test_training_with_hard_negatives(ws: Workspace) -> None:
    result = train(ws, config("t-clip-hard", max_steps=4, hard_negatives=0.5))
    assert result.model is not None and len(result.history) == 4
