"""CLIP metrics on hand-built similarities and features (known values), and the model
wrappers on a tiny CLIP whose features are arranged by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from genloop.errors import GenloopError
from genloop.evaluate.clip_metrics import (
    attribute_candidates,
    clip_score_from_features,
    is_shapes_corpus,
    recall_from_similarity,
    zero_shot_from_similarity,
)


def test_zero_shot_accuracy_is_the_share_of_right_argmaxes() -> None:
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert zero_shot_from_similarity(sim, torch.tensor([0, 1, 1, 1])) == 0.75
    with pytest.raises(GenloopError, match="3 images but 2 labels"):
        zero_shot_from_similarity(sim[:3], torch.tensor([0, 1]))


def test_recall_counts_a_repeated_caption_as_right() -> None:
    # 3 images; captions "a", "b", "a"; the texts are the distinct captions "a", "b"
    sim = torch.tensor(
        [
            [0.9, 0.1],  # image 0 ("a") ranks a, b: right at 1
            [0.8, 0.2],  # image 1 ("b") ranks a, b: right at 2
            [0.1, 0.7],  # image 2 ("a") ranks b, a: right at 2
        ]
    )
    out = recall_from_similarity(sim, ["a", "b", "a"], ["a", "b"], ks=(1, 2))
    assert out["image_to_text_recall@1"] == pytest.approx(1 / 3)
    assert out["image_to_text_recall@2"] == 1.0
    # text "a" ranks images 0, 1, 2 (image 0 is an "a"): right; text "b" ranks 2, 1, 0:
    # image 2 is an "a", so wrong at 1 and right at 2
    assert out["text_to_image_recall@1"] == 0.5
    assert out["text_to_image_recall@2"] == 1.0


def test_clip_score_is_100_times_the_clipped_cosine() -> None:
    images = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1
    )
    texts = torch.nn.functional.normalize(
        torch.tensor([[1.0, 1.0], [-1.0, 0.0], [0.0, 1.0]]), dim=-1
    )
    scores = clip_score_from_features(images, texts)
    torch.testing.assert_close(scores, torch.tensor([100 / math.sqrt(2), 0.0, 100.0]))


def test_the_attribute_candidates_are_every_single_object_scene() -> None:
    from genloop.data.shapes import caption, parse_caption

    candidates = attribute_candidates()
    assert len(candidates) == 6 * 3 * 2 * 3 == len(set(candidates))
    assert all(parse_caption(caption(c)) == c for c in candidates)
    assert is_shapes_corpus([caption(c) for c in candidates[:3]])
    assert not is_shapes_corpus(["a photo of a cat"])


def test_the_wrappers_score_a_real_models_features(tmp_path: Path) -> None:
    """On a tiny random CLIP: the wrappers agree with the metrics computed from its
    features by hand, and a class given one prompt twice is that prompt."""
    from transformers import AutoTokenizer

    from genloop.data.tokenizer import train_bpe
    from genloop.evaluate.clip_metrics import clip_score, retrieval_recall, zero_shot_accuracy
    from genloop.models.clip import FAMILY, image_features, text_features, write_clip_tokenizer

    train_bpe(["a red circle", "a blue square"] * 20, tmp_path / "raw", vocab_size=270)
    write_clip_tokenizer(tmp_path / "raw", tmp_path / "tok", 8)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    torch.manual_seed(0)
    model = FAMILY.build(
        {
            "vocab_size": len(tok),
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "image_size": 8,
            "vision_hidden": 16,
            "text_hidden": 16,
            "vision_layers": 1,
            "text_layers": 1,
            "heads": 2,
            "projection_dim": 8,
            "max_text_length": 8,
        }
    ).eval()
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )
    texts = ["a red circle", "a blue square"]
    u, v = image_features(model, images), text_features(model, tok, texts)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    expected = zero_shot_from_similarity(u @ v.t(), labels)
    assert zero_shot_accuracy(model, tok, images, labels, texts) == expected
    assert zero_shot_accuracy(model, tok, images, labels, [[texts[0]] * 2, texts[1]]) == expected
    captions = [texts[i] for i in labels.tolist()]
    assert retrieval_recall(model, tok, images, captions) == recall_from_similarity(
        u @ v.t(), captions, texts
    )
    pairs = clip_score_from_features(u, v[labels])
    assert clip_score(model, tok, images, captions) == pytest.approx(float(pairs.mean()))
