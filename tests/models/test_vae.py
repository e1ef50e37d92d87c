"""The VAE family: loss, sampling, interpolation, exact save/load, label checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genloop.errors import ConflictError, GenloopError, IntegrityError
from genloop.models import Family, get_family
from genloop.models.vae import FAMILY, ConvVAE, interpolate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = {"image_size": 8, "channels": 1, "latent_dim": 4, "base_channels": 8}


def tiny(**overrides: object) -> ConvVAE:
    torch.manual_seed(0)
    return FAMILY.build({**CONFIG, **overrides})  # type: ignore[return-value]


def images(n: int = 6) -> torch.Tensor:
    """The first ``n`` of scikit-learn's 8×8 digits, in [-1, 1]."""
    from sklearn.datasets import load_digits

    pixels = torch.tensor(load_digits().images[:n], dtype=torch.float32)  # 0..16
    return (pixels / 8 - 1).unsqueeze(1)


def test_the_family_is_registered() -> None:
    family = get_family("vae")
    assert isinstance(family, Family) and family.name == "vae"


def test_loss_is_the_per_pixel_negative_elbo_and_beta_weights_the_kl() -> None:
    x = images()
    eps = torch.zeros(6, 4)  # z = μ: the loss is reconstruction + β·KL, deterministic
    plain, heavy = tiny(beta=0.0), tiny(beta=10.0)
    heavy.load_state_dict(plain.state_dict())
    rec = FAMILY.loss(plain, {"images": x, "eps": eps})
    both = FAMILY.loss(heavy, {"images": x, "eps": eps})
    mu, logvar = plain.encode(x)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean() / 64
    assert torch.allclose(both - rec, 10 * kl, atol=1e-5)
    recon = plain.decode(mu)
    expected = ((recon - x).pow(2).flatten(1).sum(1) / (2 * 0.2**2)).mean() / 64
    assert torch.allclose(rec, expected, atol=1e-5)


def test_a_few_steps_lower_the_loss() -> None:
    model, x = tiny(), images(32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        loss = FAMILY.loss(model, {"images": x, **model.draw(32, g)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


def test_samples_come_from_the_prior_and_the_seed_fixes_them() -> None:
    model = tiny().eval()
    a = model.sample(None, 5, torch.Generator().manual_seed(3))
    b = model.sample(None, 5, torch.Generator().manual_seed(3))
    c = model.sample(None, 5, torch.Generator().manual_seed(4))
    assert a.shape == (5, 1, 8, 8) and float(a.min()) >= -1 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_interpolation_runs_from_one_image_to_the_other() -> None:
    model = tiny().eval()
    x = images(2)
    path = interpolate(model, x[0], x[1], steps=5)
    assert path.shape == (5, 1, 8, 8)
    ends = model.decode(model.encode(x)[0]).clamp(-1, 1)
    assert torch.allclose(path[0], ends[0], atol=1e-5)
    assert torch.allclose(path[-1], ends[1], atol=1e-5)
    with pytest.raises(GenloopError, match="at least 2 steps"):
        interpolate(model, x[0], x[1], steps=1)


def test_a_conditional_vae_needs_labels_in_range() -> None:
    model = tiny(num_classes=3).eval()
    eps = torch.zeros(2, 4)
    x = images(2)
    assert FAMILY.loss(model, {"images": x, "labels": torch.tensor([0, 2]), "eps": eps}).ndim == 0
    with pytest.raises(GenloopError, match="needs 2 labels"):
        FAMILY.loss(model, {"images": x, "eps": eps})
    with pytest.raises(GenloopError, match="label 3 is out of range"):
        FAMILY.loss(model, {"images": x, "labels": torch.tensor([0, 3]), "eps": eps})
    # the label changes the decoded image
    z = torch.zeros(1, 4)
    assert not torch.equal(model.decode(z, torch.tensor([0])), model.decode(z, torch.tensor([1])))


def test_save_and_load_are_exact(tmp_path: Path) -> None:
    model = tiny(num_classes=3, class_names=["a", "b", "c"])
    out = FAMILY.save(model, tmp_path / "vae")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = FAMILY.load(out)
    assert loaded.config == model.config
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    labels = torch.tensor([0, 1, 2])
    one = model.eval().sample(labels, 3, torch.Generator().manual_seed(0))
    two = loaded.sample(labels, 3, torch.Generator().manual_seed(0))
    assert torch.equal(one, two)
    with pytest.raises(ConflictError, match="not an empty directory"):
        FAMILY.save(model, out)


def test_loading_refuses_damaged_or_foreign_files(tmp_path: Path) -> None:
    out = FAMILY.save(tiny(), tmp_path / "vae")
    other = FAMILY.save(tiny(latent_dim=6), tmp_path / "other")
    (out / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(IntegrityError, match=r"does not fit its config\.json"):
        FAMILY.load(out)
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(IntegrityError, match="unreadable weights"):
        FAMILY.load(out)
    gan_dir = get_family("gan").save(
        get_family("gan").build({**CONFIG, "ema_decay": None}), tmp_path / "gan"
    )
    with pytest.raises(GenloopError, match="does not hold a genloop-vae model"):
        FAMILY.load(gan_dir)
    with pytest.raises(GenloopError, match="float32"):
        FAMILY.load(other, dtype="bf16")
