"""The diffusion family: the DDPM loss, guided DDIM/DDPM sampling, the diffusers layout,
latent diffusion on a VAE, exact save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genloop.errors import GenloopError, IntegrityError
from genloop.models import Family, get_family
from genloop.models.diffusion import FAMILY, DiffusionModel, build_diffusion
from genloop.models.vae import FAMILY as VAE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = {
    "image_size": 8,
    "channels": 1,
    "base_channels": 8,
    "timesteps": 50,
    "sample_steps": 5,
}


def tiny(vae: object = None, **overrides: object) -> DiffusionModel:
    torch.manual_seed(0)
    return build_diffusion({**CONFIG, **overrides}, vae)  # type: ignore[arg-type]


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = torch.tensor(d.images[:n], dtype=torch.float32)
    return (pixels / 8 - 1).unsqueeze(1), torch.tensor(d.target[:n])


def test_the_family_is_registered() -> None:
    family = get_family("diffusion")
    assert isinstance(family, Family) and family.name == "diffusion"


def test_the_loss_is_the_noise_prediction_error_at_the_drawn_steps() -> None:
    from diffusers import DDPMScheduler

    model = tiny(num_classes=3)
    x, _ = digits(4)
    labels = torch.tensor([0, 1, 2, 1])
    batch = model.draw(4, torch.Generator().manual_seed(0))
    batch["drop"] = torch.tensor([False, True, False, False])
    loss = FAMILY.loss(model, {"images": x, "labels": labels, **batch})
    schedule = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")
    xt = schedule.add_noise(x, batch["noise"], batch["timesteps"])
    dropped = torch.tensor([0, 3, 2, 1])  # the second label becomes the null class (3)
    pred = model.unet(xt, batch["timesteps"], class_labels=dropped).sample
    assert torch.allclose(loss, (pred - batch["noise"]).pow(2).mean(), atol=1e-6)
    assert batch["timesteps"].max() < 50


def test_a_few_steps_lower_the_loss() -> None:
    model = tiny().train()
    x, _ = digits(64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        g = torch.Generator().manual_seed(step)
        loss = FAMILY.loss(model, {"images": x, **model.draw(64, g)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-8:]) < 0.6 * sum(losses[:8])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_seeded_guided_and_bounded(sampler: str) -> None:
    model = tiny(num_classes=3, sampler=sampler).eval()
    labels = torch.tensor([0, 1, 2])
    a = model.sample(labels, 3, torch.Generator().manual_seed(1))
    b = model.sample(labels, 3, torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b)
    assert float(a.abs().max()) <= 1.0
    plain = model.sample(labels, 3, torch.Generator().manual_seed(1), guidance_scale=1.0)
    assert not torch.equal(a, plain)  # w = 2 mixes in the unconditional prediction
    unconditional = model.sample(None, 3, torch.Generator().manual_seed(1))
    assert not torch.equal(unconditional, plain)
    with pytest.raises(GenloopError, match="steps must be between 1 and 50"):
        model.sample(labels, 3, torch.Generator(), steps=80)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(GenloopError, match="sample_steps"):
        tiny(sample_steps=100)
    with pytest.raises(GenloopError, match="unknown sampler"):
        tiny(sampler="euler")


def test_save_writes_the_diffusers_layout_and_load_is_exact(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    model = tiny(num_classes=2, class_names=["a", "b"])
    out = FAMILY.save(model, tmp_path / "diffusion")
    assert {p.name for p in out.iterdir()} == {
        "model_index.json",
        "unet",
        "scheduler",
        "diffusion.json",
    }
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "model_index.json").read_text())["unet"] == [
        "diffusers",
        "UNet2DModel",
    ]
    loaded = FAMILY.load(out)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    labels = torch.tensor([1, 0])
    one = model.eval().sample(labels, 2, torch.Generator().manual_seed(2))
    two = loaded.sample(labels, 2, torch.Generator().manual_seed(2))
    assert torch.equal(one, two)

    # diffusers reads the same files with its own loaders
    unet = UNet2DModel.from_pretrained(out / "unet", local_files_only=True)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        assert torch.equal(
            unet(x, t, class_labels=labels).sample,
            loaded.unet(x, t, class_labels=labels).sample,
        )
    schedule = DDPMScheduler.from_pretrained(out / "scheduler", local_files_only=True)
    assert schedule.config.num_train_timesteps == 50


def test_load_refuses_a_unet_that_does_not_match(tmp_path: Path) -> None:
    out = FAMILY.save(tiny(), tmp_path / "a")
    wider = FAMILY.save(tiny(base_channels=16), tmp_path / "b")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (out / "unet" / name).write_bytes((wider / "unet" / name).read_bytes())
    with pytest.raises(IntegrityError, match="block_out_channels"):
        FAMILY.load(out)


def test_latent_diffusion_runs_in_the_vae_latent_space(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = VAE.build({"image_size": 8, "channels": 1, "latent_dim": 16, "base_channels": 8})
    model = tiny(vae, latent_scale=0.5, latent_vae="digits-vae@1")
    assert model.sample_shape == (1, 4, 4) and not any(p.requires_grad for p in vae.parameters())
    x, _ = digits(4)
    batch = model.draw(4, torch.Generator().manual_seed(0))
    assert batch["noise"].shape == (4, 1, 4, 4)
    FAMILY.loss(model.train(), {"images": x, **batch}).backward()
    assert all(p.grad is None for p in vae.parameters()) and not vae.training
    images = model.eval().sample(None, 2, torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8)

    out = FAMILY.save(model, tmp_path / "latent")
    assert (out / "vae" / "model.safetensors").is_file()
    settings = json.loads((out / "diffusion.json").read_text())
    assert settings["latent_scale"] == 0.5 and settings["latent_vae"] == "digits-vae@1"
    loaded = FAMILY.load(out)
    assert torch.equal(images, loaded.sample(None, 2, torch.Generator().manual_seed(0)))

    with pytest.raises(GenloopError, match="square of an even number"):
        tiny(VAE.build({"image_size": 8, "channels": 1, "latent_dim": 8, "base_channels": 8}))
