"""Quantizing a model: accuracy, safetensors storage, reload, generation (the layers' own
kernels are tested in tests/models/test_quantized.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

from genloop.errors import GenloopError
from genloop.models.pretrained import load_pretrained
from genloop.models.quantized import is_quantized, restore
from genloop.optimize.quantize import quantize_model, save_quantized

SCHEMES = [("int8", "dynamic"), ("int8", "weight_only"), ("int4", "weight_only")]
# relative error of the logits (‖q − fp‖ / ‖fp‖) each scheme stays under on the tiny model
TOLERANCE = {"int8": 0.03, "int4": 0.25}


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
        return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("bits", "mode"), SCHEMES)
def test_quantized_model_is_close_saves_as_safetensors_and_reloads(
    llama: Any, tmp_path: Path, bits: str, mode: str
) -> None:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = _logits(llama, ids)
    fp_dir = tmp_path / "fp"
    llama.save_pretrained(fp_dir)

    model = copy.deepcopy(llama)
    description = quantize_model(model, bits, mode)  # type: ignore[arg-type]
    assert is_quantized(model) and not is_quantized(llama)
    # every linear, the output head included, is quantized; nothing is left behind
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert "lm_head" in description["modules"] and description["skipped"] == {}
    quantized = _logits(model, ids)
    assert _rel(quantized, reference) < TOLERANCE[bits]

    out = save_quantized(model, tmp_path / "q", description, extra={"transform": "t"})
    assert not [p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    head = "lm_head.qweight"
    assert dtypes[head] == ("I8" if bits == "int8" else "U8")
    assert dtypes["model.embed_tokens.weight"] == "F32"  # the embedding stays float
    meta = json.loads((out / "genloop.json").read_text())
    assert meta["optimize"]["quantization"]["scheme"] == f"{bits}-{mode}"

    # the normal loader (evaluator, engine, FAMILY.load) rebuilds the same modules
    reloaded = load_pretrained(out)
    assert is_quantized(reloaded)
    assert torch.equal(_logits(reloaded, ids), quantized)
    generated = reloaded.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)

    # the linear weights take a quarter (int8) or an eighth (int4) of their fp32 room
    size = (out / "model.safetensors").stat().st_size
    fp_size = (fp_dir / "model.safetensors").stat().st_size
    assert size < 0.75 * fp_size


def test_int4_skips_layers_whose_width_is_not_a_multiple_of_the_group(tmp_path: Path) -> None:
    from genloop.models.causal_lm import FAMILY

    torch.manual_seed(0)
    # n_embd 48: q/k/v/o, gate/up and the head read 48 inputs (not a multiple of 32);
    # down_proj reads the 128-wide MLP and is quantized
    model = FAMILY.build({"preset": "tiny", "vocab_size": 64, "n_layer": 1, "n_embd": 48,
                          "n_head": 2, "intermediate_size": 128})  # fmt: skip
    description = quantize_model(model, "int4", "weight_only")
    assert description["modules"] == ["model.layers.0.mlp.down_proj"]
    assert "lm_head" in description["skipped"]
    out = save_quantized(model, tmp_path / "q", description)
    reloaded = restore(out, description)
    ids = torch.randint(0, 64, (1, 6))
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))


def test_user_mistakes_are_clear_errors(llama: Any, tmp_path: Path) -> None:
    with pytest.raises(GenloopError, match="int4 is weight-only"):
        quantize_model(copy.deepcopy(llama), "int4", "dynamic")
    with pytest.raises(GenloopError, match="unknown quantization 'int3'"):
        quantize_model(copy.deepcopy(llama), "int3", "dynamic")  # type: ignore[arg-type]
    model = copy.deepcopy(llama)
    description = quantize_model(model, "int8", "dynamic")
    with pytest.raises(GenloopError, match="already quantized"):
        quantize_model(model, "int8", "dynamic")
    out = save_quantized(model, tmp_path / "q", description)
    with pytest.raises(GenloopError, match="CPU only"):
        restore(out, description, device="cuda")
    broken = {**description, "modules": [*description["modules"], "model.nothing"]}
    with pytest.raises(GenloopError, match=r"no module 'model\.nothing'"):
        restore(out, broken)
