"""A config's parts: trained first on the same dataset version, named by ``part:NAME``,
reused when unchanged, retrained when their sections change; bad references are refused."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from genloop.config import GenloopConfig
from genloop.pipeline.runner import run_pipeline
from genloop.train.loop import train
from genloop.workspace import Workspace, init_workspace, registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = {
    "name": "digits",
    "kind": "images",
    "sources": [{"type": "builtin", "name": "digits"}],
    "split": {"val": 0.1, "test": 0.1},
    "workers": 1,
}


def loop(family: str, steps: int) -> dict[str, Any]:
    return {
        "objective": family,
        "lr": 2e-3,
        "warmup_steps": 1,
        "max_steps": steps,
        "batch_size": 16,
        "eval_every": 100,
        "eval_batches": 1,
        "checkpoint_every": 100,
    }


def ldm(vae_steps: int = 3, unet_steps: int = 3) -> dict[str, Any]:
    """Latent diffusion on digits whose VAE is a part of the same config."""
    return {
        "name": "ldm",
        "data": DATA,
        "parts": {
            "vae": {
                "model": {"family": "vae", "base_channels": 8, "latent_dim": 16},
                "train": loop("vae", vae_steps),
            }
        },
        "model": {
            "family": "diffusion",
            "base_channels": 8,
            "diffusion": {"latent_vae": "part:vae", "sample_steps": 2},
        },
        "train": loop("diffusion", unet_steps),
    }


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    workspace = init_workspace(tmp_path_factory.mktemp("parts") / "ws")
    yield workspace
    workspace.close()


def versions(ws: Workspace, name: str) -> list[str]:
    return [v.ref for v in registry.list_models(ws, name)]


def test_parts_train_first_and_are_reused_until_their_sections_change(ws: Workspace) -> None:
    result = train(ws, GenloopConfig.model_validate(ldm()))
    assert result.model is not None
    assert versions(ws, "ldm-vae") == ["ldm-vae@1"]
    assert result.model.config["model"]["latent_vae"] == "ldm-vae@1"
    vae = registry.resolve(ws, "ldm-vae@1")
    assert vae.dataset_version_id == result.model.dataset_version_id  # the same data

    # only the UNet's loop changed: the VAE is reused
    again = train(ws, GenloopConfig.model_validate(ldm(unet_steps=4)))
    assert again.model is not None and again.model.ref == "ldm@2"
    assert versions(ws, "ldm-vae") == ["ldm-vae@1"]

    # the VAE's section changed: it is trained again, and the UNet uses the new one
    third = train(ws, GenloopConfig.model_validate(ldm(vae_steps=4)))
    assert third.model is not None
    assert versions(ws, "ldm-vae") == ["ldm-vae@1", "ldm-vae@2"]
    assert third.model.config["model"]["latent_vae"] == "ldm-vae@2"


def test_a_pipeline_reports_its_parts(ws: Workspace) -> None:
    cfg = GenloopConfig.model_validate(ldm() | {"name": "pipe"})
    said: list[str] = []
    result = run_pipeline(ws, cfg, stop="train", progress=said.append)
    (trained,) = [o for o in result.stages if o.stage == "train"]
    assert trained.outputs["parts"] == {"vae": "pipe-vae@1"}
    assert any("part vae: training pipe-vae" in m for m in said)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"family": "diffusion", "diffusion": {"latent_vae": "part:ae"}}}, "part:ae"),
        ({"parts": {"bad name": ldm()["parts"]["vae"]}}, "not a valid name"),
        (
            {"parts": {"vae": {"model": {"family": "vae"}, "train": loop("gan", 3)}}},
            r"does not fit model\.family 'vae'",
        ),
    ],
)
def test_bad_parts_are_refused_by_name(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GenloopConfig.model_validate(ldm() | change)


def test_a_part_may_only_name_an_earlier_part() -> None:
    spec = ldm()
    vae = spec["parts"]["vae"]
    spec["parts"] = {
        "first": {"model": {**vae["model"], "base_model": "part:second"}, "train": vae["train"]},
        "second": vae,
    }
    with pytest.raises(ValidationError, match=r"parts\.first\.model names part:second"):
        GenloopConfig.model_validate(spec)
