"""Image metrics: FID/KID/IS through torchmetrics with the dataset classifier or a local
InceptionV3 file; the classifier is stored once per dataset version and reused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.errors import GenloopError
from genloop.evaluate.classifier import (
    accuracy,
    dataset_classifier,
    store_key,
    train_classifier,
)
from genloop.evaluate.features import Extractor
from genloop.evaluate.image import classifier_extractor, image_scores
from genloop.workspace import Workspace, init_workspace
from genloop.workspace.datasets import DatasetVersionInfo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits_ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A workspace with the digits corpus prepared as ``digits@1``."""
    from genloop.config import DataConfig
    from genloop.data.prepare import prepare_dataset

    ws = init_workspace(tmp_path_factory.mktemp("metrics") / "ws")
    cfg = DataConfig.model_validate(
        {
            "name": "digits",
            "kind": "images",
            "sources": [{"type": "builtin", "name": "digits"}],
            "split": {"val": 0.1, "test": 0.1},
            "workers": 1,
        }
    )
    prepare_dataset(ws, cfg)
    yield ws
    ws.close()


def version(ws: Workspace) -> tuple[DatasetVersionInfo, Path]:
    from genloop.workspace.datasets import resolve_dataset

    info = resolve_dataset(ws, "digits")
    return info, ws.store.open_verified(info.artifact)


def split(path: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    from genloop.data.images import load_image_dataset

    images, labels, _ = load_image_dataset(path / "images" / name)
    return images, labels


@pytest.fixture(scope="module")
def extractor(digits_ws: Workspace) -> Extractor:
    info, path = version(digits_ws)
    return classifier_extractor(*dataset_classifier(digits_ws, info, path))


def test_the_dataset_classifier_is_trained_once_then_reused(
    digits_ws: Workspace, extractor: Extractor, monkeypatch: pytest.MonkeyPatch
) -> None:
    info, path = version(digits_ws)
    assert digits_ws.store.exists(store_key(info)) and store_key(info).startswith(
        "extractors/digits/1/"
    )
    assert extractor.id.startswith("classifier:digits@1:") and extractor.kind == "classifier"
    assert extractor.meta["heldout_accuracy"] > 0.9  # it recognises real held-out digits

    def no_training(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the stored classifier should have been reused")

    monkeypatch.setattr("genloop.evaluate.classifier.train_classifier", no_training)
    again = classifier_extractor(*dataset_classifier(digits_ws, info, path))
    assert again.id == extractor.id  # the same weights, so the same id
    test_images, _ = split(path, "test")
    assert torch.equal(again.features(test_images[:8]), extractor.features(test_images[:8]))


def test_fid_of_real_against_real_is_near_zero_and_against_noise_large(
    digits_ws: Workspace, extractor: Extractor
) -> None:
    _, path = version(digits_ws)
    train_images, _ = split(path, "train")
    real = train_images[:1000]
    same = image_scores(real, real, extractor)
    # two random halves (the corpus is ordered by writer: slices are not alike)
    shuffled = train_images[
        torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))
    ]
    halves = image_scores(shuffled[:700], shuffled[700:1400], extractor)
    noise = torch.randint(0, 256, real.shape, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    against_noise = image_scores(real, noise.to(torch.uint8), extractor)
    seconds = time.perf_counter() - started
    assert abs(same["fid"]) < 1e-3
    assert against_noise["fid"] > 20 * halves["fid"]
    # KID is unbiased: about 0 (either sign) for one distribution
    assert abs(same["kid"]) < 0.02 * against_noise["kid"]
    assert abs(halves["kid"]) < 0.02 * against_noise["kid"]
    # real digits spread over the 10 classes; noise falls into few of them
    assert same["is"] > 7 and against_noise["is"] < 5
    assert seconds < 60  # 1,000 vs 1,000 images


def test_scores_are_reproducible_and_leave_the_global_rng_alone(
    digits_ws: Workspace, extractor: Extractor
) -> None:
    _, path = version(digits_ws)
    images, _ = split(path, "train")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    one = image_scores(images[:200], images[200:400], extractor, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert image_scores(images[:200], images[200:400], extractor, seed=1) == one
    with pytest.raises(GenloopError, match="at least 2"):
        image_scores(images[:1], images[:5], extractor)


def test_train_classifier_is_deterministic_and_learns(digits_ws: Workspace) -> None:
    _, path = version(digits_ws)
    images, labels = split(path, "train")
    test_images, test_labels = split(path, "test")
    a = train_classifier(images, labels, 10, seed=3, steps=120)
    b = train_classifier(images, labels, 10, seed=3, steps=120)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    assert accuracy(a, test_images, test_labels) > 0.8
    with pytest.raises(GenloopError, match="at least 2 labelled"):
        train_classifier(images[:5], torch.full((5,), -1), 10)


def test_an_unlabelled_dataset_has_no_classifier(tmp_path: Path) -> None:
    from genloop.config import DataConfig
    from genloop.data.prepare import prepare_dataset

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(4):
        from PIL import Image

        Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    ws = init_workspace(tmp_path / "ws")
    cfg = DataConfig.model_validate(
        {
            "name": "plain",
            "kind": "images",
            "sources": [{"type": "images", "path": str(folder)}],
            "split": {"val": 0.0, "test": 0.0},
            "workers": 1,
        }
    )
    info, _ = prepare_dataset(ws, cfg)
    with pytest.raises(GenloopError, match=r"eval\.inception_weights"):
        dataset_classifier(ws, info, ws.store.open_verified(info.artifact))
    ws.close()


# ------------------------------------------------------------------------- InceptionV3


def test_inception_weights_load_from_a_local_safetensors_file_only(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from genloop.evaluate.inception import FIDInceptionV3, inception_extractor

    torch.manual_seed(0)
    net = FIDInceptionV3()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["AuxLogits.fc.weight"] = torch.zeros(2, 2)  # torchvision's aux head is ignored
    weights = tmp_path / "inception.safetensors"
    save_file(state, str(weights))

    ex = inception_extractor(weights)
    assert (
        ex.kind == "inception" and ex.id.startswith("inception_v3:") and ex.suffix == "_inception"
    )
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        features, logits = ex.features(images), ex.logits(images)
    assert features.shape == (3, 2048) and logits.shape == (3, 1008)
    scores = image_scores(images, images.flip(0), ex)
    assert set(scores) == {
        "fid_inception",
        "kid_inception",
        "kid_inception_std",
        "is_inception",
        "is_inception_std",
    }

    pickle = tmp_path / "pt_inception.pth"
    pickle.write_bytes(b"not read")
    with pytest.raises(GenloopError, match=r"\.safetensors file only"):
        inception_extractor(pickle)
    with pytest.raises(GenloopError, match="does not exist"):
        inception_extractor(tmp_path / "absent.safetensors")
    del state["fc.weight"]
    save_file(state, str(weights))
    with pytest.raises(GenloopError, match="does not hold pytorch-fid's InceptionV3"):
        inception_extractor(weights)
