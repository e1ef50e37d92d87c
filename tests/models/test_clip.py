"""The clip family: contrastive loss values, training on a fixed batch, eos pooling, the
saved layout and its round trip, Stable Diffusion's text encoder, and import."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from genloop.errors import GenloopError
from genloop.models.clip import (
    FAMILY,
    contrastive_loss,
    encode_texts,
    image_features,
    load_clip,
    text_encoder_from_clip,
    text_features,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY: dict[str, Any] = {
    "image_size": 16,
    "patch_size": 4,
    "vision_hidden": 32,
    "vision_layers": 2,
    "text_hidden": 32,
    "text_layers": 2,
    "heads": 2,
    "projection_dim": 32,
    "max_text_length": 24,
}


@pytest.fixture(scope="module")
def captioned() -> tuple[torch.Tensor, list[str]]:
    """16 shapes images (uint8 16×3×16×16) with their captions."""
    from genloop.data.shapes import generate

    rows = list(generate(16, seed=3, size=16, max_objects=1))
    images = torch.from_numpy(np.stack([r[0] for r in rows])).permute(0, 3, 1, 2).contiguous()
    return images, [r[1] for r in rows]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from genloop.data.shapes import caption, random_scene
    from genloop.data.tokenizer import train_bpe

    rng = np.random.default_rng(0)
    texts = [caption(random_scene(rng, split="all")) for _ in range(300)]
    return train_bpe(texts, tmp_path_factory.mktemp("tok"), vocab_size=320)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config = {
        **TINY,
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    model = FAMILY.build(config)
    return FAMILY.save(model, tmp_path_factory.mktemp("clip") / "m", tokenizer_dir=tokenizer_dir)


def test_the_loss_is_symmetric_cross_entropy_with_shared_targets() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    distinct = math.log(1 + math.exp(-2))  # each row and column: softmax(2, 0)[0]
    assert contrastive_loss(logits).item() == pytest.approx(distinct)
    assert contrastive_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(distinct)
    # one caption for both images: half the target on each, so the loss is the row's CE
    # against (½, ½): ½·(-log p) + ½·(-log q) = 1 + log(1 + e^-2)
    same = contrastive_loss(logits, torch.tensor([7, 7])).item()
    assert same == pytest.approx(1 + distinct)


def test_training_on_a_fixed_batch_lowers_the_loss(
    saved: Path, captioned: tuple[torch.Tensor, list[str]]
) -> None:
    from genloop.models.clip import pixel_values

    model, tok = load_clip(saved)
    model.train()
    images, captions = captioned
    batch = {
        "pixel_values": pixel_values(model, images),
        **encode_texts(tok, captions, 24),
        "groups": torch.tensor([sorted(set(captions)).index(c) for c in captions]),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(80):  # a plateau (all features alike) first, then it learns
        loss = FAMILY.loss(model, batch)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_the_saved_tokenizer_ends_every_text_with_eos(saved: Path) -> None:
    _, tok = load_clip(saved)
    assert tok.model_max_length == 24
    long = " and ".join(["a large red circle on the left"] * 10)
    enc = encode_texts(tok, ["a red circle", long], 24)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == (2, 24)  # the long one is cut to the context …
    assert ids[1, -1] == tok.eos_token_id  # … and still ends with eos
    short = int(mask[0].sum())
    assert ids[0, short - 1] == tok.eos_token_id and (ids[0, short:] == tok.pad_token_id).all()


def test_text_features_pool_at_eos_whatever_the_padding(saved: Path) -> None:
    model, tok = load_clip(saved)
    alone = text_features(model, tok, ["a small blue square"])
    padded = text_features(model, tok, ["a small blue square", "a large red circle on the left"])
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(padded.norm(dim=-1), torch.ones(2))


def test_the_round_trip_gives_equal_logits(
    tmp_path: Path, saved: Path, tokenizer_dir: Path, captioned: tuple[torch.Tensor, list[str]]
) -> None:
    from transformers import CLIPModel

    model, tok = load_clip(saved)
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "genloop.json"} <= names
    assert json.loads((saved / "genloop.json").read_text())["family"] == "clip"
    again = FAMILY.save(model, tmp_path / "again", tokenizer_dir=saved)
    reloaded, _ = load_clip(again)
    plain = CLIPModel.from_pretrained(saved)  # transformers reads the layout unchanged
    images, captions = captioned
    for other in (reloaded, plain):
        torch.testing.assert_close(image_features(other, images), image_features(model, images))
        torch.testing.assert_close(
            text_features(other, tok, captions), text_features(model, tok, captions)
        )
    assert (again / "tokenizer.json").read_bytes() == (saved / "tokenizer.json").read_bytes()


def test_the_text_encoder_is_the_clip_text_tower(saved: Path) -> None:
    from transformers import CLIPTextModel

    model, _ = load_clip(saved)
    encoder, encoder_tok = text_encoder_from_clip(saved)
    assert isinstance(encoder, CLIPTextModel)
    enc = encode_texts(encoder_tok, ["a large purple triangle on the right", "a red circle"], 24)
    with torch.no_grad():
        ours = encoder(**enc)
        theirs = model.text_model(**enc)
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state)
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output)


def test_bad_sizes_are_named(tokenizer_dir: Path) -> None:
    base = {**TINY, "vocab_size": 320, "eos_token_id": 0, "pad_token_id": 1}
    with pytest.raises(GenloopError, match="multiple of patch_size"):
        FAMILY.build({**base, "image_size": 18})
    with pytest.raises(GenloopError, match="id 2"):
        FAMILY.build({**base, "eos_token_id": 2})
    with pytest.raises(GenloopError, match="unknown clip config keys depth"):
        FAMILY.build({**base, "depth": 3})
    with pytest.raises(GenloopError, match="uint8"):
        image_features(FAMILY.build(base), torch.zeros(1, 3, 16, 16))


def test_a_plain_transformers_clip_imports_as_the_clip_family(
    tmp_path: Path, tokenizer_dir: Path, captioned: tuple[torch.Tensor, list[str]]
) -> None:
    """A CLIPModel saved by transformers with a tokenizer of its own (one that adds eos
    itself) and CLIP's pixel statistics: imported, it loads and scores as it was."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    from genloop.models.clip import write_clip_tokenizer
    from genloop.models.importer import import_checkpoint
    from genloop.models.pretrained import inspect_checkpoint
    from genloop.workspace import init_workspace, registry

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(1)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 24,
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    source = tmp_path / "tiny-clip"
    CLIPModel(config).save_pretrained(source)
    write_clip_tokenizer(tokenizer_dir, source, 24)
    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]  # CLIP's, not genloop's 0.5
    (source / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": mean, "image_std": std})
    )
    assert inspect_checkpoint(source).family == "clip"

    ws = init_workspace(tmp_path / "ws")
    try:
        info = import_checkpoint(ws, source)
        assert info.family == "clip"
        model, imported_tok = load_clip(registry.artifact_path(ws, info.ref))
    finally:
        ws.close()
    images, captions = captioned
    reference = CLIPModel.from_pretrained(source).eval()
    x = images.float() / 255
    pixels = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(
        image_features(model, images), torch.nn.functional.normalize(expected, dim=-1)
    )
    assert text_features(model, imported_tok, captions[:3]).shape == (3, 16)
