"""The image families in the one training loop: loss falls, exact resume (the GAN's EMA
included), registration, latent diffusion on a registered VAE, clear config errors."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from genloop.config import GenloopConfig
from genloop.errors import ConfigError, GenloopError
from genloop.models.image_generation import load_image_generator
from genloop.train import checkpoint as ckpt
from genloop.train.loop import TrainResult, train
from genloop.workspace import Workspace, init_workspace, registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"base_channels": 8, "latent_dim": 16}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    from genloop.config import DataConfig
    from genloop.data.prepare import prepare_dataset

    workspace = init_workspace(tmp_path_factory.mktemp("images") / "ws")
    data = DataConfig.model_validate(
        {
            "name": "digits",
            "kind": "images",
            "sources": [{"type": "builtin", "name": "digits"}],
            "split": {"val": 0.1, "test": 0.1},
            "workers": 1,
        }
    )
    prepare_dataset(workspace, data)
    yield workspace
    workspace.close()


def config(name: str, family: str, model: dict[str, Any] | None = None, **t: Any) -> GenloopConfig:
    spec = {
        "name": name,
        "model": {"family": family, **SMALL, **(model or {})},
        "train": {
            "objective": family,
            "dataset": "digits",
            "lr": 2e-3,
            "min_lr": 2e-4,
            "warmup_steps": 2,
            "weight_decay": 0.0,
            "max_steps": 40,
            "batch_size": 32,
            "eval_every": 10,
            "eval_batches": 2,
            "checkpoint_every": 100,
            **t,
        },
    }
    return GenloopConfig.model_validate(spec)


def falls(history: list[float]) -> bool:
    return statistics.fmean(history[-5:]) < 0.8 * statistics.fmean(history[:5])


def test_the_vae_trains_registers_and_generates(ws: Workspace) -> None:
    result = train(ws, config("t-vae", "vae", {"num_classes": 10, "vae": {"beta": 2.0}}))
    assert falls(result.history) and "val_loss" in result.metrics
    assert result.model is not None and result.model.family == "vae"
    assert result.model.config["model"]["class_names"] == [str(i) for i in range(10)]
    gen = load_image_generator(registry.artifact_path(ws, result.model.ref))
    assert gen.conditional and len(gen.generate("3", n=2, seed=0)) == 2


def test_diffusion_loss_falls(ws: Workspace) -> None:
    cfg = config("t-diffusion", "diffusion", {"num_classes": 10}, lr=3e-3)
    result = train(ws, cfg)
    assert falls(result.history)
    assert result.metrics["tokens_per_s"] > 0  # images per second
    assert result.model is not None
    assert (registry.artifact_path(ws, result.model.ref) / "unet" / "config.json").is_file()


def test_gan_samples_move_towards_the_data(ws: Workspace) -> None:
    """The adversarial loss says nothing about progress; validation tracks MMD² of the
    EMA generator's samples against real images, which falls."""
    seen: list[float] = []

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        if "val_loss" in metrics:
            seen.append(metrics["val_loss"])

    cfg = config(
        "t-gan", "gan", {"num_classes": 10}, betas=[0.5, 0.999], eval_every=5, max_steps=60
    )
    train(ws, cfg, progress=progress)
    assert len(seen) == 12 and seen[-1] < 0.5 * seen[0]


def stop_at(step: int) -> Any:
    def progress(current: int, total: int, metrics: dict[str, float]) -> None:
        if current == step:
            raise KeyboardInterrupt

    return progress


def weights(ws: Workspace, result: TrainResult) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    assert result.model is not None
    return load_file(str(registry.artifact_path(ws, result.model.ref) / "model.safetensors"))


def test_an_interrupted_gan_resumes_exactly(ws: Workspace) -> None:
    """Batches depend on their position only; the EMA generator and its update count are
    in the checkpoint, so a resumed run ends with the uninterrupted run's weights."""
    model = {"num_classes": 10, "gan": {"ema_decay": 0.9}}
    settings = {"max_steps": 10, "checkpoint_every": 4, "eval_every": 5, "betas": [0.5, 0.999]}
    whole = train(ws, config("r-whole", "gan", model, **settings))
    cfg = config("r-split", "gan", model, **settings)
    with pytest.raises(KeyboardInterrupt):
        train(ws, cfg, progress=stop_at(7))
    resumed = train(ws, cfg, resume=True)
    assert resumed.history == whole.history
    a, b = weights(ws, whole), weights(ws, resumed)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert int(a["ema_updates"]) == 10
    assert ckpt.list_checkpoints(ws.store, resumed.run_id)


def test_latent_diffusion_trains_on_a_registered_vae(ws: Workspace) -> None:
    vae = train(ws, config("t-ae", "vae", max_steps=20))
    assert vae.model is not None
    cfg = config("t-ldm", "diffusion", {"diffusion": {"latent_vae": "t-ae"}}, max_steps=20)
    result = train(ws, cfg)
    assert result.model is not None and falls(result.history)
    settings = result.model.config["model"]
    assert settings["latent_vae"] == "t-ae@1" and settings["latent_scale"] > 0
    path = registry.artifact_path(ws, result.model.ref)
    assert (path / "vae" / "model.safetensors").is_file()
    images = load_image_generator(path).generate(None, n=2, seed=0)
    assert images[0].size == (8, 8)

    conditional = config("t-cvae", "vae", {"num_classes": 10}, max_steps=3)
    train(ws, conditional)
    with pytest.raises(GenloopError, match="unconditional VAE"):
        train(ws, config("t-ldm2", "diffusion", {"diffusion": {"latent_vae": "t-cvae"}}))
    with pytest.raises(ConfigError, match="is a diffusion model, not a vae"):
        train(ws, config("t-ldm3", "diffusion", {"diffusion": {"latent_vae": "t-ldm"}}))


def test_model_settings_must_fit_the_dataset(ws: Workspace) -> None:
    with pytest.raises(ConfigError, match=r"model\.image_size is 16 but the dataset's images"):
        train(ws, config("bad", "vae", {"image_size": 16}))
    with pytest.raises(ConfigError, match="the dataset has 10 classes"):
        train(ws, config("bad", "vae", {"num_classes": 4}))
    with pytest.raises(ConfigError, match=r"model\.channels is 3"):
        train(ws, config("bad", "gan", {"channels": 3}))
    cfg = config("bad", "vae").model_dump()
    cfg["data"] = {
        "name": "digits",
        "kind": "images",
        "sources": [{"type": "builtin", "name": "digits"}],
        "images": {"normalize": "zero_one"},
    }
    with pytest.raises(ConfigError, match=r"leave data\.images\.normalize at minus_one_one"):
        train(ws, GenloopConfig.model_validate(cfg))
