"""The captioning family: a ViT + GPT-2 VisionEncoderDecoderModel built from a config dict,
trained by teacher forcing, saved in Hugging Face layout and captioning by greedy search."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.data.tokenizer import load_hf_tokenizer, train_bpe
from genloop.errors import ConfigError, ConflictError, GenloopError, IntegrityError
from genloop.models import Family, get_family
from genloop.models.captioning import (
    FAMILY,
    caption,
    caption_loss,
    default_patch_size,
    load_captioner,
    pixel_values,
    shift_right,
    spec_from_config,
)

CAPTIONS = ["a red square on the left", "a blue circle on the right", "a large green triangle"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    return train_bpe(CAPTIONS * 20, out, vocab_size=300)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    return load_hf_tokenizer(tokenizer_dir)


def _config(tok: Any, **extra: Any) -> dict[str, Any]:
    return {
        "image_size": 16,
        "channels": 3,
        "vocab_size": len(tok),
        "n_layer": 1,
        "n_embd": 64,
        "n_head": 4,
        "context_length": 24,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        **extra,
    }


def _images() -> torch.Tensor:
    """Three 16×16 RGB uint8 images (3, 3, 16, 16), one per caption, easy to tell apart."""
    x = torch.full((3, 3, 16, 16), 255, dtype=torch.uint8)
    x[0, 1:, :, :8] = 0  # red, left half
    x[1, :2, :, 8:] = 0  # blue, right half
    x[2, 0::2, 4:12, 4:12] = 0  # green, middle
    return x


def _labels(tok: Any, captions: list[str]) -> torch.Tensor:
    """Token ids + eos per caption, -100 after it: (B, T)."""
    rows = [tok(c)["input_ids"] + [tok.eos_token_id] for c in captions]
    width = max(map(len, rows))
    return torch.tensor([r + [-100] * (width - len(r)) for r in rows])


def _trained(tok: Any, steps: int = 80) -> Any:
    torch.manual_seed(0)
    model = FAMILY.build(_config(tok))
    batch = {"pixel_values": pixel_values(model, _images()), "labels": _labels(tok, CAPTIONS)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = FAMILY.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_the_family_is_registered_and_satisfies_the_protocol() -> None:
    family = get_family("captioning")
    assert isinstance(family, Family) and family.name == "captioning"


def test_specs_fill_defaults_and_refuse_bad_settings() -> None:
    spec = spec_from_config({"image_size": 32, "channels": 3, "vocab_size": 512})
    assert (spec.patch_size, spec.n_layer, spec.n_encoder_layer, spec.n_embd) == (4, 2, 2, 128)
    assert spec.intermediate_size == 512
    assert [default_patch_size(s) for s in (32, 28, 64, 8)] == [4, 2, 8, 1]
    base = {"image_size": 32, "channels": 3, "vocab_size": 512}
    with pytest.raises(ConfigError, match="missing vocab_size"):
        spec_from_config({"image_size": 32, "channels": 3})
    with pytest.raises(ConfigError, match="unknown captioning setting 'latent_dim'"):
        spec_from_config({**base, "latent_dim": 3})
    with pytest.raises(ConfigError, match="patch_size 5 does not divide image_size 32"):
        spec_from_config({**base, "patch_size": 5})
    with pytest.raises(ConfigError, match="unknown captioning preset 'huge'"):
        spec_from_config({**base, "preset": "huge"})
    with pytest.raises(ConfigError, match="pad_token_id 600 is outside the vocabulary"):
        spec_from_config({**base, "pad_token_id": 600})
    with pytest.raises(ConfigError, match="channels must be 1 or 3"):
        spec_from_config({**base, "channels": 2})


def test_the_loss_is_transformers_own_teacher_forced_loss(tokenizer: Any) -> None:
    torch.manual_seed(0)
    model = FAMILY.build(_config(tokenizer)).eval()
    labels = _labels(tokenizer, CAPTIONS)
    pixels = pixel_values(model, _images())
    ours = caption_loss(model, {"pixel_values": pixels, "labels": labels})
    theirs = model(pixel_values=pixels, labels=labels).loss  # shifts the labels itself
    torch.testing.assert_close(ours, theirs)
    shifted = shift_right(labels, 7, 1)
    assert shifted[:, 0].tolist() == [7, 7, 7] and (shifted >= 0).all()
    assert torch.equal(shifted[:, 1:][labels[:, :-1] >= 0], labels[:, :-1][labels[:, :-1] >= 0])
    with pytest.raises(GenloopError, match="needs labels"):
        caption_loss(model, {"pixel_values": pixels})


def test_a_trained_model_captions_its_images_and_round_trips(
    tokenizer: Any, tokenizer_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoImageProcessor, VisionEncoderDecoderModel

    model = _trained(tokenizer)
    assert caption(model, tokenizer, _images(), max_new_tokens=16) == CAPTIONS
    assert caption(model, tokenizer, _images(), max_new_tokens=16, num_beams=2) == CAPTIONS
    assert caption(model, tokenizer, _images(), max_new_tokens=16, batch_size=2) == CAPTIONS

    out = FAMILY.save(model, tmp_path / "m", tokenizer_dir=tokenizer_dir, extra={"run": "r1"})
    meta = json.loads((out / "genloop.json").read_text())
    assert meta == {"family": "captioning", "run": "r1"}
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    # transformers reads it alone: the model, and a processor giving our pixels
    hf = VisionEncoderDecoderModel.from_pretrained(out, local_files_only=True).eval()
    pixels = pixel_values(model, _images())
    labels = _labels(tokenizer, CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(pixel_values=pixels, labels=labels).logits,
            model(pixel_values=pixels, labels=labels).logits,
        )
    from PIL import Image

    processor = AutoImageProcessor.from_pretrained(out, local_files_only=True)
    pil = Image.fromarray(_images()[1].permute(1, 2, 0).numpy())
    processed = processor(images=pil, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processed, pixels[1:2], atol=1e-5, rtol=0)

    loaded, tok = load_captioner(out)
    assert caption(loaded, tok, _images(), max_new_tokens=16) == CAPTIONS
    with pytest.raises(ConflictError, match="not an empty directory"):
        FAMILY.save(model, out)


def test_pixel_values_resize_and_convert_channels(tokenizer: Any) -> None:
    model = FAMILY.build(_config(tokenizer))
    grey = torch.full((2, 1, 32, 32), 255, dtype=torch.uint8)
    x = pixel_values(model, grey)
    assert x.shape == (2, 3, 16, 16)
    torch.testing.assert_close(x, torch.ones_like(x))
    rgba = torch.zeros((1, 4, 16, 16), dtype=torch.uint8)
    assert pixel_values(model, rgba).shape == (1, 3, 16, 16)
    with pytest.raises(GenloopError, match="must be uint8"):
        pixel_values(model, grey.float())


def test_load_verifies_the_files_and_refuses_other_models(
    tokenizer: Any, tokenizer_dir: Path, tmp_path: Path
) -> None:
    from genloop.workspace.manifest import write_manifest

    torch.manual_seed(0)
    out = FAMILY.save(FAMILY.build(_config(tokenizer)), tmp_path / "m", tokenizer_dir=tokenizer_dir)
    write_manifest(out)
    assert FAMILY.load(out).config.model_type == "vision-encoder-decoder"
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IntegrityError):
        FAMILY.load(out)

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(GenloopError, match="holds a 'llama' model, not a vision-encoder-decoder"):
        FAMILY.load(other)
    with pytest.raises(GenloopError, match="load in float32"):
        FAMILY.load(out, dtype="bf16")
