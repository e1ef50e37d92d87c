"""Stable Diffusion's recipe in the one training loop, on the captioned shapes corpus: the
autoencoder first (its scaling factor measured), then the UNet on its latents under a
frozen text encoder; the result is a registered StableDiffusionPipeline folder."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.config import GenloopConfig
from genloop.errors import ConfigError
from genloop.train.loop import train
from genloop.workspace import Workspace, init_workspace, registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    from genloop.config import DataConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset

    workspace = init_workspace(tmp_path_factory.mktemp("t2i") / "ws")
    data = DataConfig.model_validate(
        {
            "name": "shapes",
            "kind": "images",
            "sources": [{"type": "builtin", "name": "shapes", "count": 240, "size": 32}],
            "images": {"size": 32, "channels": 3},
            "split": {"val": 0.1, "test": 0.05},
            "workers": 1,
        }
    )
    prepare_dataset(workspace, data, TokenizerConfig(vocab_size=320))
    yield workspace
    workspace.close()


def config(name: str, family: str, model: dict[str, Any], **t: Any) -> GenloopConfig:
    spec = {
        "name": name,
        "model": {"family": family, **model},
        "train": {
            "objective": family,
            "dataset": "shapes",
            "lr": 2e-3,
            "min_lr": 2e-4,
            "warmup_steps": 2,
            "weight_decay": 0.0,
            "max_steps": 30,
            "batch_size": 16,
            "eval_every": 15,
            "eval_batches": 1,
            "checkpoint_every": 100,
            **t,
        },
    }
    return GenloopConfig.model_validate(spec)


def text_encoder_folder(ws: Workspace, out: Path) -> Path:
    """A tiny random CLIP text encoder over the dataset's caption tokenizer, saved as a
    pipeline's text_encoder/ + tokenizer/ (what a clip model's text tower becomes)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.workspace.datasets import resolve_dataset

    data_dir = ws.store.open_verified(resolve_dataset(ws, "shapes").artifact)
    tokenizer = load_hf_tokenizer(data_dir / "tokenizer")
    torch.manual_seed(0)
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=48,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return out


def falls(history: list[float]) -> bool:
    return statistics.fmean(history[-5:]) < 0.9 * statistics.fmean(history[:5])


def test_the_autoencoder_then_the_unet_train_and_register_a_pipeline(
    ws: Workspace, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    from genloop.models.text_to_image import load_text_to_image

    ae = train(ws, config("t-ae", "autoencoder_kl", {"base_channels": 8}))
    assert ae.model is not None and ae.model.family == "autoencoder_kl"
    assert falls(ae.history) and "val_loss" in ae.metrics
    ae_dir = registry.artifact_path(ws, ae.model.ref)
    scale = json.loads((ae_dir / "config.json").read_text())["scaling_factor"]
    assert scale != 1.0 and 0.01 < scale < 100

    encoder = text_encoder_folder(ws, tmp_path / "clip-text")
    model = {
        "base_channels": 16,
        "diffusion": {
            "latent_vae": ae.model.ref,
            "text_encoder": str(encoder),
            "sample_steps": 4,
            "cond_drop_prob": 0.2,
        },
    }
    unet = train(ws, config("t-t2i", "text_to_image", model, max_steps=20, eval_every=10))
    assert unet.model is not None and unet.model.family == "text_to_image"
    assert all(torch.isfinite(torch.tensor(unet.history)))
    assert unet.model.config["model"]["latent_vae"] == ae.model.ref
    out = registry.artifact_path(ws, unet.model.ref)
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.vae.config.scaling_factor == pytest.approx(scale)
    t2i = load_text_to_image(out)
    images = t2i.generate(["a large red circle on the left"], n=2, seed=0)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8


def test_text_to_image_without_its_parts_is_a_clear_error(ws: Workspace) -> None:
    with pytest.raises(ConfigError, match=r"needs model.diffusion.latent_vae"):
        train(ws, config("t-bad", "text_to_image", {"base_channels": 16}))
