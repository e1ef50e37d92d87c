"""The GAN family: each network gets its own gradient, EMA, MMD, exact save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genloop.errors import GenloopError
from genloop.models import Family, get_family
from genloop.models.gan import DCGAN, FAMILY, mmd2

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = {"image_size": 8, "channels": 1, "latent_dim": 8, "base_channels": 8}


def tiny(**overrides: object) -> DCGAN:
    torch.manual_seed(0)
    return FAMILY.build({**CONFIG, **overrides})  # type: ignore[return-value]


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = torch.tensor(d.images[:n], dtype=torch.float32)
    return (pixels / 8 - 1).unsqueeze(1), torch.tensor(d.target[:n])


def test_the_family_is_registered() -> None:
    family = get_family("gan")
    assert isinstance(family, Family) and family.name == "gan"


@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_one_backward_gives_each_network_only_its_own_gradient(kind: str) -> None:
    """L_D + L_G: D's gradient is L_D's alone (fakes detached), G's is L_G's alone."""
    model = tiny(loss=kind).train()
    x, _ = digits(8)
    z = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}  # SN updates u, v in place
    FAMILY.loss(model, {"images": x, "z": z}).backward()
    d_grads = [p.grad.clone() for p in model.discriminator.parameters()]
    g_grads = [p.grad.clone() for p in model.generator.parameters()]
    assert all(p.grad is None for p in model.ema.parameters())  # type: ignore[union-attr]

    ref = tiny(loss=kind).train()
    ref.load_state_dict(state)
    fake = ref.generator(z)
    real_score, fake_score = ref.discriminator(x), ref.discriminator(fake.detach())
    f = torch.nn.functional
    if kind == "hinge":
        loss_d = f.relu(1 - real_score).mean() + f.relu(1 + fake_score).mean()
    else:
        loss_d = f.softplus(-real_score).mean() + f.softplus(fake_score).mean()
    expected_d = torch.autograd.grad(loss_d, list(ref.discriminator.parameters()))
    for got, want in zip(d_grads, expected_d, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    assert any(float(g.abs().sum()) > 0 for g in g_grads)


def test_the_ema_generator_follows_with_a_warming_decay() -> None:
    model = tiny(ema_decay=0.9)
    assert model.ema is not None
    before = [p.clone() for p in model.ema.parameters()]
    with torch.no_grad():
        for p in model.generator.parameters():
            p.add_(1.0)
    model.update_ema()  # decay min(0.9, 1/10) = 0.1: the EMA moves 90% of the way
    for e, b in zip(model.ema.parameters(), before, strict=True):
        assert torch.allclose(e, b + 0.9, atol=1e-6)
    assert int(model.ema_updates) == 1
    assert not any(p.requires_grad for p in model.ema.parameters())
    no_ema = tiny(ema_decay=None)
    assert no_ema.ema is None and no_ema.sampler() is no_ema.generator


def test_eval_mode_scores_samples_with_mmd() -> None:
    x, _ = digits(64)
    noise = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same = abs(float(mmd2(x[:32], x[32:])))  # two samples of one distribution: about 0
    assert float(mmd2(x, noise)) > 10 * same
    model = tiny().eval()
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float(FAMILY.loss(model, {"images": x, "z": z})) == pytest.approx(
            float(mmd2(model.ema(z), x)),
            rel=1e-5,  # type: ignore[misc]
        )


def test_a_few_steps_bring_samples_closer_to_the_data() -> None:
    model = tiny(num_classes=10).train()
    x, y = digits(256)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.999))
    z_eval = torch.randn(256, 8, generator=torch.Generator().manual_seed(9))

    def quality() -> float:
        model.eval()
        with torch.no_grad():
            value = float(FAMILY.loss(model, {"images": x, "labels": y, "z": z_eval}))
        model.train()
        return value

    start = quality()
    g = torch.Generator().manual_seed(0)
    for step in range(60):
        idx = torch.arange(step * 32, step * 32 + 32) % 256
        loss = FAMILY.loss(model, {"images": x[idx], "labels": y[idx], **model.draw(32, g)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_ema()
    assert quality() < 0.7 * start


def test_conditional_sampling_needs_labels_and_is_seeded() -> None:
    model = tiny(num_classes=3).eval()
    a = model.sample(torch.tensor([0, 1, 2]), 3, torch.Generator().manual_seed(1))
    b = model.sample(torch.tensor([0, 1, 2]), 3, torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b)
    with pytest.raises(GenloopError, match="give labels"):
        model.sample(None, 3, torch.Generator())
    with pytest.raises(GenloopError, match="out of range"):
        FAMILY.loss(
            model.train(),
            {
                "images": torch.zeros(1, 1, 8, 8),
                "labels": torch.tensor([5]),
                "z": torch.zeros(1, 8),
            },
        )
    with pytest.raises(GenloopError, match="unknown GAN loss"):
        tiny(loss="wasserstein")


@pytest.mark.parametrize("spectral_norm", [True, False])
def test_save_and_load_are_exact(tmp_path: Path, spectral_norm: bool) -> None:
    model = tiny(num_classes=2, spectral_norm=spectral_norm, class_names=["a", "b"])
    x, _ = digits(4)
    FAMILY.loss(
        model.train(), {"images": x, "labels": torch.tensor([0, 1, 0, 1]), "z": torch.randn(4, 8)}
    )
    model.update_ema()
    out = FAMILY.save(model, tmp_path / "gan")
    loaded = FAMILY.load(out)
    assert loaded.config == model.config and not loaded.training
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    labels = torch.tensor([0, 1, 1])
    one = model.eval().sample(labels, 3, torch.Generator().manual_seed(5))
    two = loaded.sample(labels, 3, torch.Generator().manual_seed(5))
    assert torch.equal(one, two)
