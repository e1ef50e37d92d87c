"""The captioning family in the one training loop, on a prepared shapes dataset: the loss
falls, the version registers in Hugging Face layout, a resumed run repeats the
uninterrupted one exactly, and wrong data or settings fail with a clear message."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from genloop.config import GenloopConfig
from genloop.errors import ConfigError, GenloopError
from genloop.models.captioning import caption, load_captioner
from genloop.train.loop import TrainResult, train
from genloop.workspace import Workspace, init_workspace, registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"n_layer": 1, "n_embd": 64, "n_head": 4}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    from genloop.config import DataConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset

    workspace = init_workspace(tmp_path_factory.mktemp("captioning") / "ws")
    data = DataConfig.model_validate(
        {
            "name": "shapes",
            "kind": "images",
            "sources": [{"type": "builtin", "name": "shapes", "count": 300, "size": 32}],
            "images": {"size": 32, "channels": 3},
            "split": {"val": 0.1, "test": 0.1},
            "workers": 1,
        }
    )
    prepare_dataset(workspace, data, TokenizerConfig(vocab_size=320))
    digits = DataConfig.model_validate(
        {
            "name": "digits",
            "kind": "images",
            "sources": [{"type": "builtin", "name": "digits"}],
            "workers": 1,
        }
    )
    prepare_dataset(workspace, digits)
    yield workspace
    workspace.close()


def config(name: str, model: dict[str, Any] | None = None, **t: Any) -> GenloopConfig:
    spec = {
        "name": name,
        "model": {"family": "captioning", **SMALL, **(model or {})},
        "train": {
            "objective": "captioning",
            "dataset": "shapes",
            "lr": 2e-3,
            "min_lr": 2e-4,
            "warmup_steps": 2,
            "weight_decay": 0.0,
            "max_steps": 30,
            "batch_size": 16,
            "eval_every": 10,
            "eval_batches": 2,
            "checkpoint_every": 100,
            **t,
        },
    }
    return GenloopConfig.model_validate(spec)


def test_a_captioner_trains_registers_and_captions(ws: Workspace) -> None:
    from transformers import VisionEncoderDecoderModel

    result = train(ws, config("cap"))
    history = result.history
    assert statistics.fmean(history[-5:]) < 0.6 * statistics.fmean(history[:5])
    assert "val_loss" in result.metrics
    assert result.model is not None and result.model.family == "captioning"
    model_cfg = result.model.config["model"]
    assert (model_cfg["image_size"], model_cfg["channels"], model_cfg["patch_size"]) == (32, 3, 4)
    assert model_cfg["context_length"] == 64  # the captions are shorter
    path = registry.artifact_path(ws, result.model.ref)
    assert VisionEncoderDecoderModel.from_pretrained(path, local_files_only=True).num_parameters()
    model, tok = load_captioner(path)
    assert model.config.decoder.vocab_size == len(tok) == model_cfg["vocab_size"]
    texts = caption(model, tok, torch.full((2, 3, 32, 32), 255, dtype=torch.uint8))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def stop_at(step: int) -> Any:
    def progress(s: int, *_: Any) -> None:
        if s == step:
            raise KeyboardInterrupt

    return progress


def _weights(ws: Workspace, result: TrainResult) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    assert result.model is not None
    return load_file(str(registry.artifact_path(ws, result.model.ref) / "model.safetensors"))


def test_an_interrupted_run_resumes_exactly(ws: Workspace) -> None:
    settings = {"max_steps": 8, "checkpoint_every": 3, "eval_every": 4}
    model = {"n_embd": 32, "n_head": 2}
    whole = train(ws, config("r-whole", model, **settings))
    cfg = config("r-split", model, **settings)
    with pytest.raises(KeyboardInterrupt):
        train(ws, cfg, progress=stop_at(5))
    resumed = train(ws, cfg, resume=True)
    assert resumed.history == whole.history
    a, b = _weights(ws, whole), _weights(ws, resumed)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_wrong_data_and_settings_are_refused(ws: Workspace) -> None:
    with pytest.raises(GenloopError, match="digits@1 has no captioned images"):
        train(ws, config("bad", dataset="digits"))
    with pytest.raises(ConfigError, match="flip mirrors images"):
        train(ws, config("bad", augment={"flip": True}))
    with pytest.raises(
        ConfigError, match=r"model\.image_size is 28 but the dataset's images are 32×32"
    ):
        train(ws, config("bad", {"image_size": 28}))
    with pytest.raises(ValueError, match=r"train\.objective 'captioning' does not fit"):
        GenloopConfig.model_validate(
            {"name": "x", "model": {"family": "vae"}, "train": {"objective": "captioning"}}
        )
