"""The text_to_image family: a UNet2DConditionModel over a frozen AutoencoderKL and CLIP
text encoder, saved in the diffusers pipeline layout; our sampler draws the same images as
diffusers' StableDiffusionPipeline for DDPM, DDIM and DPM-Solver, with guidance and
negative prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from genloop.errors import GenloopError
from genloop.models import Family, get_family
from genloop.models.text_to_image import (
    FAMILY,
    TextToImage,
    build_text_to_image,
    load_text_to_image,
    sampling_cache,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = [
    f"a {size} {colour} {shape} on the {pos}"
    for size in ("small", "large")
    for colour in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle")
    for pos in ("left", "center", "right")
]
CONTEXT = 16  # the text encoder's positions


def tiny_parts(tmp: Path) -> tuple[Any, Any, Any]:
    """A random AutoencoderKL (32×32 → 8×8×4), CLIPTextModel and BPE tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from genloop.data.tokenizer import load_hf_tokenizer, train_bpe
    from genloop.models.autoencoder_kl import FAMILY as AUTOENCODER

    torch.manual_seed(0)
    ae = AUTOENCODER.build({"image_size": 32, "channels": 3, "base_channels": 8})
    ae.set_scaling_factor(2.0)  # type: ignore[attr-defined]
    tokenizer = load_hf_tokenizer(train_bpe(CAPTIONS, tmp / "tok", vocab_size=320))
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=CONTEXT,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    ).eval()
    return ae.vae, encoder, tokenizer  # type: ignore[attr-defined]


def tiny(tmp: Path, **config: Any) -> TextToImage:
    vae, encoder, tokenizer = tiny_parts(tmp)
    torch.manual_seed(1)
    return build_text_to_image(
        {"base_channels": 32, "timesteps": 1000, "sample_steps": 4, **config},
        vae,
        encoder,
        tokenizer,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("t2i")
    model = tiny(tmp, sampler="ddim")
    return FAMILY.save(model, tmp / "pipe")


def test_the_family_is_registered_and_the_unet_attends_to_the_text() -> None:
    family = get_family("text_to_image")
    assert isinstance(family, Family) and family.name == "text_to_image"


def test_the_loss_is_the_noise_prediction_error_given_the_caption(tmp_path: Path) -> None:
    model = tiny(tmp_path)
    ids = model.tokenize(["a red circle on the left", ""])
    assert ids.shape == (2, CONTEXT)
    r = model.draw(2, torch.Generator().manual_seed(0))
    latents = torch.randn(2, 4, 8, 8)
    loss = FAMILY.loss(
        model,
        {"latents": latents, "input_ids": ids, "noise": r["noise"], "timesteps": r["timesteps"]},
    )
    with torch.no_grad():
        context = model.text_encoder(ids).last_hidden_state
        zt = model.noise.add_noise(latents, r["noise"], r["timesteps"])
        pred = model.unet(zt, r["timesteps"], encoder_hidden_states=context).sample
    assert torch.allclose(loss, (pred - r["noise"]).pow(2).mean(), atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert all(p.grad is None for p in model.vae.parameters())
    assert any(p.grad is not None for p in model.unet.parameters())


def test_the_saved_folder_is_a_stable_diffusion_pipeline(saved: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    pipe = StableDiffusionPipeline.from_pretrained(saved, safety_checker=None)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.tokenizer.model_max_length == CONTEXT
    ids = pipe.tokenizer(
        ["a red circle", "a " * 40],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids.shape == (2, CONTEXT)
    assert pipe.vae.config.scaling_factor == 2.0
    ours = load_text_to_image(saved)
    assert ours.config["sampler"] == "ddim" and ours.image_size == 32


def _theirs(pipe: Any, prompts: list[str], **kwargs: Any) -> np.ndarray:
    out = pipe(prompts, output_type="np", **kwargs).images  # (N, H, W, 3) in [0, 1]
    return (np.asarray(out) * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("sampler", "scheduler"),
    [("ddpm", "DDPMScheduler"), ("ddim", "DDIMScheduler"), ("dpm", "DPMSolverMultistepScheduler")],
)
def test_the_same_seed_draws_the_same_images_as_diffusers(
    saved: Path, sampler: str, scheduler: str
) -> None:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(saved, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    ours = load_text_to_image(saved)
    prompts = ["a red circle on the left", "a large blue square on the right"]
    negatives = ["a green triangle", ""]
    mine = ours.generate(
        prompts,
        negative_prompts=negatives,
        n=2,
        seed=3,
        steps=4,
        guidance_scale=3.0,
        sampler=sampler,  # type: ignore[arg-type]
    )
    theirs = _theirs(
        pipe,
        prompts,
        negative_prompt=negatives,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(3),
        num_inference_steps=4,
        guidance_scale=3.0,
    )
    assert mine.shape == (4, 3, 32, 32) and mine.dtype == torch.uint8
    diff = np.abs(mine.permute(0, 2, 3, 1).numpy().astype(int) - theirs.astype(int))
    assert diff.max() <= 1
    assert mine.float().std() > 5  # not a saturated, blank image
    assert not torch.equal(mine[0], mine[1])  # two draws of one prompt differ


def test_without_guidance_one_context_per_image_matches_too(saved: Path) -> None:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(saved, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    ours = load_text_to_image(saved)
    mine = ours.generate(["a small yellow square"], seed=5, steps=3, guidance_scale=1.0)
    theirs = _theirs(
        pipe,
        ["a small yellow square"],
        generator=torch.Generator().manual_seed(5),
        num_inference_steps=3,
        guidance_scale=1.0,
    )
    diff = np.abs(mine.permute(0, 2, 3, 1).numpy().astype(int) - theirs.astype(int))
    assert diff.max() <= 1


def test_the_sampling_cache_computes_what_diffusers_does(saved: Path) -> None:
    model = load_text_to_image(saved)
    context = model.encode_prompts(["a red circle", "a blue square"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(500)
    with torch.no_grad():
        plain = model.unet(x, t, encoder_hidden_states=context).sample
        with sampling_cache():
            first = model.unet(x, t, encoder_hidden_states=context).sample
            again = model.unet(x * 0.5, t, encoder_hidden_states=context).sample
        half = model.unet(x * 0.5, t, encoder_hidden_states=context).sample
    assert torch.allclose(first, plain, atol=1e-5)
    assert torch.allclose(again, half, atol=1e-5)


def test_long_prompts_are_truncated_with_a_warning_or_refused(saved: Path) -> None:
    model = load_text_to_image(saved)
    long = "a red circle on the left and " * 8
    warnings: list[str] = []
    images = model.generate([long], seed=0, steps=2, warnings=warnings)
    assert images.shape == (1, 3, 32, 32)
    assert len(warnings) == 1 and f"reads {CONTEXT}" in warnings[0]
    dropped = warnings[0].rsplit(", so ", 1)[1].removesuffix(" was ignored").strip("'\"")
    assert long.rstrip().endswith(dropped.strip()) and "endoftext" not in dropped  # the words
    short: list[str] = []
    model.generate(["a red circle"], seed=0, steps=2, warnings=short)
    assert short == []
    with pytest.raises(GenloopError, match="tokens long"):
        model.generate([long], seed=0, steps=2, refuse_long_prompts=True)


def test_bad_requests_are_clear_errors(saved: Path) -> None:
    model = load_text_to_image(saved)
    with pytest.raises(GenloopError, match="2 negative prompts for 1 prompts"):
        model.generate(["a"], negative_prompts=["b", "c"], steps=2)
    with pytest.raises(GenloopError, match="unknown sampler 'euler'"):
        model.generate(["a"], steps=2, sampler="euler")  # type: ignore[arg-type]
    with pytest.raises(GenloopError, match="steps must be between 1 and 1000"):
        model.generate(["a"], steps=5000)
    with pytest.raises(GenloopError, match="no prompts"):
        model.generate([])
    same = model.generate(["a red circle"], seed=9, steps=2)
    assert torch.equal(same, model.generate(["a red circle"], seed=9, steps=2))
