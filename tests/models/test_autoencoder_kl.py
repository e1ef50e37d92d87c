"""The autoencoder_kl family: diffusers AutoencoderKL, its L1 + KL loss, SD's scaling
factor, the diffusers layout that AutoencoderKL.from_pretrained reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genloop.errors import ConfigError, IntegrityError
from genloop.models import Family, get_family
from genloop.models.autoencoder_kl import (
    FAMILY,
    AutoencoderKLModel,
    latent_scaling_factor,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = {"image_size": 32, "channels": 3, "base_channels": 8}


def tiny(**overrides: object) -> AutoencoderKLModel:
    torch.manual_seed(0)
    return FAMILY.build({**CONFIG, **overrides})  # type: ignore[return-value]


def images(n: int) -> torch.Tensor:
    """uint8 (n, 3, 32, 32): coloured squares on white."""
    g = torch.Generator().manual_seed(0)
    out = torch.full((n, 3, 32, 32), 255, dtype=torch.uint8)
    for i in range(n):
        x, y = torch.randint(0, 20, (2,), generator=g).tolist()
        out[i, :, y : y + 12, x : x + 12] = torch.randint(0, 256, (3, 1, 1), generator=g)
    return out


def test_the_family_is_registered_and_maps_32_pixels_to_8x8x4_latents() -> None:
    family = get_family("autoencoder_kl")
    assert isinstance(family, Family) and family.name == "autoencoder_kl"
    model = tiny()
    mu, logvar = model.encode(torch.zeros(2, 3, 32, 32))
    assert mu.shape == logvar.shape == (2, 4, 8, 8)
    assert model.decode(mu).shape == (2, 3, 32, 32)
    assert len(model.vae.config.block_out_channels) == 3  # two stride-2 steps


def test_the_loss_is_l1_plus_weighted_kl_per_pixel() -> None:
    model = tiny(kl_weight=0.5)
    x = images(2).float() / 127.5 - 1
    eps = model.draw(2, torch.Generator().manual_seed(0))["eps"]
    loss = FAMILY.loss(model, {"images": x, "eps": eps})
    mu, logvar = model.encode(x)
    recon = model.decode(mu + torch.exp(0.5 * logvar) * eps)
    rec = (recon - x).abs().flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    assert torch.allclose(loss, ((rec + 0.5 * kl) / x[0].numel()).mean(), rtol=1e-5)
    mse = tiny(recon_loss="mse", kl_weight=0.0)
    loss = FAMILY.loss(mse, {"images": x, "eps": torch.zeros_like(eps)})
    mu, _ = mse.encode(x)
    assert torch.allclose(loss, (mse.decode(mu) - x).pow(2).mean(), rtol=1e-5)


def test_training_reduces_the_reconstruction_error() -> None:
    model = tiny()
    x = images(16).float() / 127.5 - 1
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    first = float((model.reconstruct(x) - x).abs().mean())
    for _ in range(40):
        loss = FAMILY.loss(model, {"images": x, **model.draw(16, g)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float((model.reconstruct(x) - x).abs().mean()) < 0.6 * first


def test_the_scaling_factor_makes_the_latents_unit_variance() -> None:
    model = tiny()
    data = images(32)
    scale = latent_scaling_factor(model, data)
    with torch.no_grad():
        mu, _ = model.encode(data.float() / 127.5 - 1)
    assert float((mu * scale).std()) == pytest.approx(1.0, rel=1e-4)


def test_save_measures_the_scaling_factor_and_diffusers_loads_the_folder(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    model = tiny()
    model.calibration_images = images(16)
    FAMILY.save(model, tmp_path / "ae")
    expected = latent_scaling_factor(model, images(16))
    assert model.scaling_factor == pytest.approx(expected)
    stored = json.loads((tmp_path / "ae/config.json").read_text())
    assert stored["scaling_factor"] == pytest.approx(expected)
    assert (tmp_path / "ae/diffusion_pytorch_model.safetensors").is_file()
    theirs = AutoencoderKL.from_pretrained(tmp_path / "ae").eval()
    ours = FAMILY.load(tmp_path / "ae")
    assert isinstance(ours, AutoencoderKLModel)
    assert ours.scaling_factor == pytest.approx(expected)
    x = images(2).float() / 127.5 - 1
    with torch.no_grad():
        want = theirs.decode(theirs.encode(x).latent_dist.mean).sample
        assert torch.allclose(ours.decode(ours.encode(x)[0]), want, atol=1e-5)
        mine = model.decode(model.encode(x)[0])
        assert torch.allclose(ours.decode(ours.encode(x)[0]), mine, atol=1e-5)


def test_bad_configs_and_mismatched_weights_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="downsample must be a power of two"):
        tiny(downsample=3)
    with pytest.raises(ConfigError, match="recon_loss must be l1 or mse"):
        tiny(recon_loss="lpips")
    FAMILY.save(tiny(), tmp_path / "ae")
    settings = tmp_path / "ae/autoencoder_kl.json"
    data = json.loads(settings.read_text())
    settings.write_text(json.dumps({**data, "base_channels": 16}))
    with pytest.raises(IntegrityError, match="block_out_channels"):
        FAMILY.load(tmp_path / "ae")


def test_the_image_generator_samples_an_autoencoder(tmp_path: Path) -> None:
    from genloop.models.image_generation import load_image_generator

    FAMILY.save(tiny(), tmp_path / "ae")
    gen = load_image_generator(tmp_path / "ae")
    assert gen.family == "autoencoder_kl" and not gen.conditional
    first = gen.sample(None, 3, seed=1)
    assert first.shape == (3, 3, 32, 32) and first.dtype == torch.uint8
    assert torch.equal(first, gen.sample(None, 3, seed=1))
