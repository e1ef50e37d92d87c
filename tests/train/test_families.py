"""The family registry of the training loop: every family has a builder, a sampler that
exists, and builders refuse objectives of other families."""

from __future__ import annotations

import importlib
import typing
from pathlib import Path

import pytest
import torch

from genloop.config import ModelConfig, TrainConfig
from genloop.errors import ConfigError, GenloopError
from genloop.models.family import family_names
from genloop.models.presets import ARCHITECTURE_KEYS, OVERRIDES
from genloop.train.families import TrainingData, builder_names, get_builder
from genloop.train.text import architecture


def test_every_family_of_the_model_section_has_a_builder() -> None:
    families = typing.get_args(ModelConfig.model_fields["family"].annotation)
    assert set(builder_names()) == set(families) == set(family_names())
    for name in builder_names():
        assert get_builder(name).family == name
    with pytest.raises(GenloopError, match=r"unknown model family 'bert' \(known: causal_lm"):
        get_builder("bert")


@pytest.mark.parametrize("family", builder_names())
def test_the_sampler_of_every_family_exists(family: str) -> None:
    module, _, name = get_builder(family).sampler.partition(":")
    assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.parametrize(
    ("family", "objective", "message"),
    [
        ("vae", "gan", "train.objective gan needs model.family gan"),
        ("diffusion", "sft", "train.objective sft needs model.family causal_lm or seq2seq"),
        ("seq2seq", "dpo", None),  # a text objective: the text builder goes on to the data
        ("causal_lm", "diffusion", "train.objective diffusion needs model.family diffusion"),
    ],
)
def test_a_builder_refuses_the_objectives_of_other_families(
    tmp_path: Path, family: str, objective: str, message: str | None
) -> None:
    data = TrainingData(ref="d@1", dir=tmp_path, tokenizer_dir=None, seq_len=64)
    t = TrainConfig(objective=objective)  # type: ignore[arg-type]
    builder = get_builder(family)
    if message is None:
        with pytest.raises(GenloopError, match="holds no rows"):
            builder.make_objective(t, data, torch.nn.Identity(), torch.device("cpu"))
        return
    with pytest.raises(ConfigError, match=message):
        builder.make_objective(t, data, torch.nn.Identity(), torch.device("cpu"))


def test_the_model_sections_architecture_keys_are_one_list() -> None:
    m = ModelConfig(n_layer=2, n_embd=64, n_head=4, tie_embeddings=False, activation="gelu")
    assert architecture(m) == {
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 4,
        "activation": "gelu",
        "tie_embeddings": False,
    }
    assert architecture(ModelConfig()) == {}
    # the one list names fields of the model section, each one the spec takes
    assert set(ARCHITECTURE_KEYS) <= set(ModelConfig.model_fields) & set(OVERRIDES)
