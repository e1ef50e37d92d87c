"""The captioning suite: BLEU and attribute accuracy parsed from the captions, for seen and
held-out combinations, scored on a model that knows its images and run through
``genloop eval`` on a trained one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from genloop.config import EvalConfig, GenloopConfig
from genloop.data.shapes import Scene, ShapeObject, generate
from genloop.data.tokenizer import load_hf_tokenizer, train_bpe
from genloop.errors import GenloopError
from genloop.evaluate.captioning import (
    corpus_bleu,
    evaluate_captioning,
    held_out_images,
    scene_scores,
)
from genloop.evaluate.run import evaluate_model
from genloop.models.captioning import FAMILY, pixel_values
from genloop.train.loop import train
from genloop.workspace import Workspace, init_workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRUTH = Scene(
    (
        ShapeObject("red", "circle", "large", "left"),
        ShapeObject("blue", "square", "small", "right"),
    )
)


def test_scene_scores_compare_each_attribute_at_its_position() -> None:
    exact = scene_scores(
        "a large red circle on the left and a small blue square on the right", TRUTH
    )
    assert exact == {
        "scene": 1.0,
        "parse": 1.0,
        "colour": 1.0,
        "shape": 1.0,
        "size": 1.0,
        "pair": 1.0,
        "position": 1.0,
    }
    # the colours swapped: shapes, sizes and positions right, no colour and no pair
    swapped = scene_scores(
        "a large blue circle on the left and a small red square on the right", TRUTH
    )
    assert swapped["scene"] == swapped["colour"] == swapped["pair"] == 0.0
    assert swapped["shape"] == swapped["size"] == swapped["position"] == 1.0
    # one object missed: half of each attribute, the positions wrong
    half = scene_scores("a large red circle on the left", TRUTH)
    assert (half["colour"], half["pair"], half["position"], half["scene"]) == (0.5, 0.5, 0.0, 0.0)
    # the right object in the wrong slot counts for nothing there
    moved = scene_scores("a large red circle in the center", Scene((TRUTH.objects[0],)))
    assert moved["colour"] == moved["position"] == 0.0 and moved["parse"] == 1.0
    nothing = scene_scores("a cat on a mat", TRUTH)
    assert set(nothing.values()) == {0.0}


def test_corpus_bleu_is_sacrebleus() -> None:
    refs = ["a large red circle on the left", "a small blue square on the right"]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    worse = corpus_bleu(["a large red circle on the right", "a small green square"], refs)
    assert 0.0 < worse < 100.0
    assert corpus_bleu([], []) == 0.0
    with pytest.raises(GenloopError, match="1 captions for 2 references"):
        corpus_bleu(refs[:1], refs)


def test_held_out_images_hold_a_held_out_pair() -> None:
    images, captions, scenes = held_out_images(6, seed=1, size=32)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8
    assert all(s.held_out() for s in scenes) and len(captions) == 6


def test_a_model_that_knows_its_images_scores_full_marks_on_them(tmp_path: Any) -> None:
    """Overfit a tiny captioner on four seen scenes: seen BLEU 100 and every attribute
    right; the held-out group is captioned and scored too."""
    items = list(generate(4, seed=5))
    images = torch.from_numpy(np.stack([im for im, _, _ in items])).permute(0, 3, 1, 2)
    refs = [c for _, c, _ in items]
    tok_dir = train_bpe(refs * 10, tmp_path / "tok", vocab_size=300)
    tok = load_hf_tokenizer(tok_dir)
    torch.manual_seed(0)
    model = FAMILY.build(
        {
            "image_size": 32,
            "channels": 3,
            "vocab_size": len(tok),
            "n_layer": 1,
            "n_embd": 64,
            "n_head": 4,
            "patch_size": 8,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
    )
    rows = [tok(c)["input_ids"] + [tok.eos_token_id] for c in refs]
    width = max(map(len, rows))
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    batch = {"pixel_values": pixel_values(model, images), "labels": labels}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):  # until it knows the four captions by heart
        loss = FAMILY.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break

    result = evaluate_captioning(model, tok, images, refs, max_new_tokens=40, max_samples=4)
    m = result.metrics
    assert m["bleu_seen"] == pytest.approx(100.0)
    for key in ("scene", "colour", "shape", "size", "pair", "position"):
        assert m[f"{key}_accuracy_seen"] == 1.0, key
    assert result.per_sample["scene_accuracy_seen"] == [1.0] * 4
    assert {k for k in m if k.endswith("_held_out")} == {
        k.replace("_seen", "_held_out") for k in m if k.endswith("_seen")
    }
    assert 0.0 <= m["bleu_held_out"] <= 100.0
    assert {s["group"] for s in result.samples} == {"seen", "held_out"}
    # captions that are not corpus captions: BLEU only, no held-out group
    plain = evaluate_captioning(model, tok, images, ["a photo"] * 4, max_samples=4)
    assert set(plain.metrics) == {"bleu_seen"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    from genloop.config import DataConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset

    workspace = init_workspace(tmp_path_factory.mktemp("cap-eval") / "ws")
    data = DataConfig.model_validate(
        {
            "name": "shapes",
            "kind": "images",
            "sources": [{"type": "builtin", "name": "shapes", "count": 200, "size": 32}],
            "images": {"size": 32, "channels": 3},
            "split": {"val": 0.1, "test": 0.1},
            "workers": 1,
        }
    )
    prepare_dataset(workspace, data, TokenizerConfig(vocab_size=320))
    cfg = GenloopConfig.model_validate(
        {
            "name": "cap",
            "model": {"family": "captioning", "n_layer": 1, "n_embd": 32, "n_head": 2},
            "train": {
                "objective": "captioning",
                "dataset": "shapes",
                "warmup_steps": 1,
                "max_steps": 6,
                "batch_size": 8,
                "eval_every": 6,
                "eval_batches": 1,
            },
        }
    )
    train(workspace, cfg)
    yield workspace
    workspace.close()


def test_genloop_eval_runs_the_captioning_suite_by_default(ws: Workspace) -> None:
    cfg = EvalConfig(max_samples=8, max_new_tokens=12)
    record = evaluate_model(ws, "cap", cfg=cfg, device="cpu")
    assert record.suite == "captioning" and record.dataset == "shapes@1"
    for group in ("seen", "held_out"):
        assert 0.0 <= record.metrics[f"bleu_{group}"] <= 100.0  # type: ignore[operator]
        assert 0.0 <= record.metrics[f"pair_accuracy_{group}"] <= 1.0  # type: ignore[operator]
    again = evaluate_model(ws, "cap", cfg=cfg, device="cpu")
    assert again.metrics == record.metrics
    with pytest.raises(
        GenloopError, match="the image suite is for the vae, gan, diffusion families"
    ):
        evaluate_model(ws, "cap", suites=["image"], cfg=cfg, device="cpu")
