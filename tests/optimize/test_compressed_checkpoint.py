"""A quantized variant's compressed-tensors checkpoint, loaded by transformers itself.

``save_quantized`` writes the same codes a second time in the compressed-tensors format
(``compressed-tensors/``); here ``AutoModelForCausalLM.from_pretrained`` (transformers'
compressed-tensors integration) loads that folder, and its weights, logits and greedy
tokens are compared with genloop's own quantized model. vLLM serving it is
tests/serve/test_vllm_quantized.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from genloop.errors import GenloopError
from genloop.models.quantized import Int4Linear, Int8Linear
from genloop.optimize.compressed_checkpoint import write_compressed_checkpoint
from genloop.optimize.quantize import quantize_model, save_quantized

# scheme → (compressed-tensors format, the weight tensor's name, logit tolerance): the
# weights are identical, so what differs is arithmetic: W8A8 quantizes activations per token
# (genloop's fbgemm path per tensor); genloop's weight-only kernels run on bfloat16
# activations, transformers on float32 ones.
SCHEMES = {
    ("int8", "dynamic"): ("int-quantized", "weight", 0.03),
    ("int8", "weight_only"): ("pack-quantized", "weight_packed", 0.01),
    ("int4", "weight_only"): ("pack-quantized", "weight_packed", 0.01),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("bits", "mode"), list(SCHEMES))
def test_transformers_loads_the_same_weights_and_agrees_with_genloop(
    llama: Any, tmp_path: Path, bits: str, mode: str
) -> None:
    from transformers import AutoModelForCausalLM

    fmt, weight_name, tolerance = SCHEMES[(bits, mode)]
    model = copy.deepcopy(llama)
    description = quantize_model(model, bits, mode)  # type: ignore[arg-type]
    out = save_quantized(model, tmp_path / "q", description) / "compressed-tensors"

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == fmt
    assert config["ignore"] == ["lm_head"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert f"model.layers.0.mlp.down_proj.{weight_name}" in keys
    assert ("model.layers.0.mlp.down_proj.weight_zero_point" in keys) == (bits == "int4")

    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # (transformers decompresses the weights on the first call)
        ours, theirs = model(input_ids=ids).logits, hf(input_ids=ids).logits
    assert _rel(theirs, ours) < tolerance
    # every layer decompressed to exactly the weights genloop's codes stand for
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            weight = hf.get_submodule(name).weight.detach()
            assert torch.allclose(weight, module.dequantized(), rtol=0, atol=1e-6), name
    prompt = ids[:1, :4]
    greedy = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    assert torch.equal(hf.generate(prompt, **greedy), model.generate(prompt, **greedy))


def test_the_checkpoint_keeps_the_tokenizer_and_an_untied_float_head(
    llama: Any, tmp_path: Path
) -> None:
    llama.save_pretrained(tmp_path / "fp")
    (tmp_path / "fp" / "tokenizer.json").write_text("{}")  # copied as is
    model = copy.deepcopy(llama)
    description = quantize_model(model, "int4", "weight_only")
    out = write_compressed_checkpoint(
        model, tmp_path / "ct", description, tokenizer_dir=tmp_path / "fp"
    )
    assert (out / "tokenizer.json").read_text() == "{}"
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # the head has weights of its own here
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"] == {
        **config["quantization_config"]["config_groups"]["group_0"]["weights"],
        "num_bits": 4,
        "group_size": 32,
        "strategy": "group",
        "symmetric": False,
    }
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        head = f.get_tensor("lm_head.weight")
    assert head.dtype == torch.float32
    assert torch.equal(head, model.get_submodule("lm_head").dequantized())


def test_int4_with_float_zero_points_is_refused(llama: Any, tmp_path: Path) -> None:
    """Variants from before integer zero points cannot be written exactly: a clear error."""
    model = copy.deepcopy(llama)
    description = quantize_model(model, "int4", "weight_only")
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    layer.scales_and_zeros[..., 1] += 0.3 * layer.scales_and_zeros[..., 0]
    with pytest.raises(GenloopError, match="float zero points"):
        write_compressed_checkpoint(model, tmp_path / "ct", description)
