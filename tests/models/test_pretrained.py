from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.errors import GenloopError, NotFoundError
from genloop.models.pretrained import inspect_checkpoint, load_pretrained


@pytest.fixture
def gpt2_dir(tmp_path: Path) -> Path:
    """A tiny GPT-2 saved by plain transformers: a "pretrained" checkpoint from elsewhere."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_a_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GenloopError, match=r"no config\.json"):
        inspect_checkpoint(tmp_path)


def test_an_unsupported_model_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "my-own", "auto_map": {}}))
    with pytest.raises(GenloopError, match=r"'my-own'.*custom code"):
        inspect_checkpoint(tmp_path)


def test_a_directory_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(GenloopError, match=r"no model.safetensors.*found weights.safetensors"):
        inspect_checkpoint(tmp_path)


def test_gpt2_checkpoint_loads_for_fine_tuning(gpt2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    info = inspect_checkpoint(gpt2_dir)
    assert (info.model_type, info.family, info.architecture) == (
        "gpt2",
        "causal_lm",
        "GPT2LMHeadModel",
    )
    assert info.weight_format == "safetensors"
    model = load_pretrained(gpt2_dir)
    tokens = torch.randint(0, 128, (1, 8))
    reference = AutoModelForCausalLM.from_pretrained(gpt2_dir, local_files_only=True)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)


def test_sharded_safetensors_load(llama: Any, tokens: torch.Tensor, tmp_path: Path) -> None:
    llama.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    info = inspect_checkpoint(tmp_path / "sharded")
    assert info.weights[0].name == "model.safetensors.index.json" and len(info.weights) > 2
    loaded = load_pretrained(tmp_path / "sharded", family="causal_lm")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, llama.eval()(tokens).logits)


def test_an_index_pointing_outside_is_refused(llama: Any, tmp_path: Path) -> None:
    llama.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(GenloopError, match="not a file in"):
        inspect_checkpoint(tmp_path / "sharded")


def test_config_cannot_redirect_to_pickle_weights(gpt2_dir: Path) -> None:
    config = json.loads((gpt2_dir / "config.json").read_text())
    config["transformers_weights"] = "adapter_model.bin"
    (gpt2_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(GenloopError, match="safetensors only"):
        load_pretrained(gpt2_dir)
