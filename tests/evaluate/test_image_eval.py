"""``genloop eval`` on image models (the image and augment suites) and ``genloop augment``'s
synthetic dataset, on a small conditional VAE trained for the module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from genloop.config import EvalConfig, GenloopConfig
from genloop.errors import GenloopError
from genloop.evaluate.run import evaluate_model
from genloop.workspace import Workspace, init_workspace, registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """Digits prepared, and ``cvae@1``: a conditional VAE after 150 steps."""
    from genloop.config import DataConfig
    from genloop.data.prepare import prepare_dataset
    from genloop.train.loop import train

    workspace = init_workspace(tmp_path_factory.mktemp("image-eval") / "ws")
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
    cfg = GenloopConfig.model_validate(
        {
            "name": "cvae",
            "model": {"family": "vae", "num_classes": 10, "base_channels": 16, "vae": {"beta": 4}},
            "train": {
                "objective": "vae",
                "dataset": "digits",
                "lr": 3e-3,
                "min_lr": 3e-4,
                "warmup_steps": 5,
                "weight_decay": 0.0,
                "max_steps": 150,
                "batch_size": 64,
                "eval_every": 150,
                "eval_batches": 1,
            },
        }
    )
    train(workspace, cfg)
    yield workspace
    workspace.close()


def test_the_image_suite_reports_fid_against_the_untrained_model(ws: Workspace) -> None:
    record = evaluate_model(ws, "cvae", cfg=EvalConfig(image_samples=300), device="cpu")
    m = record.metrics
    assert record.suite == "image" and record.dataset == "digits@1"
    assert m["fid"] is not None and m["fid_untrained"] is not None
    assert m["fid"] < 0.5 * m["fid_untrained"]  # training moved it a long way
    assert m["fid_real_heldout"] is not None and m["fid_real_heldout"] < m["fid"]
    assert m["kid"] is not None and m["kid"] < m["kid_untrained"]  # type: ignore[operator]
    assert m["is"] is not None and m["is"] > m["is_untrained"]  # type: ignore[operator]
    assert 0.3 < m["conditional_accuracy"] <= 1.0  # type: ignore[operator]
    settings = record.settings["suites"]["image"]
    extractor = settings["extractor"]
    assert extractor["kind"] == "classifier" and extractor["id"].startswith("classifier:digits@1:")
    assert settings["generated"] == 300 and settings["real"] == 300
    report = (ws.store.path(record.report or "") / "report.md").read_text()
    assert extractor["id"] in report and "fid_untrained" in report
    assert registry.resolve(ws, "cvae").metrics["fid"] == m["fid"]
    # the same model, settings and seed: the same numbers
    again = evaluate_model(ws, "cvae", cfg=EvalConfig(image_samples=300), device="cpu")
    assert again.metrics == m


def test_suites_must_fit_the_family(ws: Workspace) -> None:
    with pytest.raises(GenloopError, match="the perplexity suite needs a text model"):
        evaluate_model(ws, "cvae", suites=["image", "perplexity"])


def test_augment_writes_a_synthetic_dataset_and_measures_it(ws: Workspace) -> None:
    from genloop.data.images import load_image_dataset
    from genloop.evaluate.image import evaluate_augmentation
    from genloop.models.augment_synthetic import synthetic_dataset
    from genloop.workspace.datasets import resolve_dataset

    model = registry.resolve(ws, "cvae")
    real = resolve_dataset(ws, "digits")
    real_dir = ws.store.open_verified(real.artifact)
    first = "run 'genloop augment images cvae@1 --per-class N' first"
    with pytest.raises(GenloopError, match=first):
        evaluate_augmentation(ws, model, real_dir, real)

    info, created = synthetic_dataset(ws, "cvae", per_class=20, seed=1)
    assert created and info.ref == "cvae-synthetic@1" and info.kind == "images"
    assert info.lineage["generated_by"]["model"] == "cvae@1"
    images, labels, classes = load_image_dataset(
        ws.store.open_verified(info.artifact) / "images" / "train"
    )
    assert images.shape == (200, 1, 8, 8) and classes == [str(i) for i in range(10)]
    assert torch.equal(torch.bincount(labels), torch.full((10,), 20))
    same, created_again = synthetic_dataset(ws, "cvae", per_class=20, seed=1)
    assert not created_again and same.ref == info.ref
    other, _ = synthetic_dataset(ws, "cvae", per_class=20, seed=2)
    assert other.ref == "cvae-synthetic@2"

    result = evaluate_augmentation(ws, model, real_dir, real, seeds=(0, 1), steps=60)
    m = result.metrics
    assert m["synthetic_images"] == 200  # the newest version: seed 2
    assert 0 < m["accuracy_real"] <= 1 and 0 < m["accuracy_augmented"] <= 1
    assert m["accuracy_delta"] == pytest.approx(m["accuracy_augmented"] - m["accuracy_real"])
    assert len(result.per_sample["accuracy_delta"]) == 2
    assert result.settings["synthetic_dataset"] == "cvae-synthetic@2"

    with pytest.raises(GenloopError, match="between 1 and"):
        synthetic_dataset(ws, "cvae", per_class=0)


def test_an_unconditional_model_cannot_write_labels(ws: Workspace) -> None:
    from genloop.models.augment_synthetic import synthetic_dataset
    from genloop.models.gan import FAMILY as GAN

    torch.manual_seed(0)
    gan = GAN.build({"image_size": 8, "channels": 1, "latent_dim": 8, "base_channels": 8})
    with ws.store.scratch() as tmp:
        registry.register_model(ws, "plain-gan", "gan", GAN.save(gan, tmp / "gan"))
    with pytest.raises(GenloopError, match="unconditional, so its images have no labels"):
        synthetic_dataset(ws, "plain-gan", per_class=2)
