"""Pruning: the measured sparsity is the requested one; structured pruning is exact."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.errors import GenloopError
from genloop.models.causal_lm import FAMILY
from genloop.optimize.prune import (
    magnitude_prune,
    prunable_linears,
    recover,
    sparsity,
    structured_prune,
    weight_masks,
)


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
        return out


@pytest.mark.parametrize("amount", [0.1, 0.3, 0.5, 0.9])
def test_measured_sparsity_equals_the_requested_one(llama: Any, amount: float) -> None:
    model = copy.deepcopy(llama)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    result = magnitude_prune(model, amount)
    layers = prunable_linears(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    for name, linear in layers:
        zeros = int((linear.weight == 0).sum())
        assert zeros == round(amount * linear.weight.numel()), name  # exact per layer
    smallest = min(linear.weight.numel() for _, linear in layers)
    assert abs(result["sparsity"] - amount) <= 0.5 / smallest
    assert sparsity(model) == result["sparsity"]
    # the embedding (tied to the output head) is not pruned
    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    # what was zeroed is the smallest magnitudes: every kept weight is at least as large
    for name, linear in layers:
        w = linear.weight.detach()
        kept, dropped = w[w != 0].abs(), llama.get_submodule(name).weight.detach()[w == 0].abs()
        if dropped.numel() and kept.numel():
            assert float(dropped.max()) <= float(kept.min())


def test_pruning_amount_is_checked(llama: Any) -> None:
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(GenloopError, match=r"number in \(0, 1\)"):
            magnitude_prune(copy.deepcopy(llama), bad)


def test_structured_pruning_removes_exactly_the_unimportant_heads_and_channels(
    llama: Any, tmp_path: Path
) -> None:
    """Zero one key/value group and half the MLP channels first: pruning then removes
    exactly those, so the smaller model computes the same logits as the original."""
    model = copy.deepcopy(llama)
    q_dim = model.config.head_dim  # 16; group 1 = query heads 2, 3 and kv head 1
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.q_proj.weight[2 * q_dim : 4 * q_dim] = 0
            attn.o_proj.weight[:, 2 * q_dim : 4 * q_dim] = 0
            attn.k_proj.weight[q_dim : 2 * q_dim] = 0
            attn.v_proj.weight[q_dim : 2 * q_dim] = 0
            dead = torch.arange(0, mlp.up_proj.weight.shape[0], 2)  # every other channel
            mlp.gate_proj.weight[dead] = 0
            mlp.up_proj.weight[dead] = 0
            mlp.down_proj.weight[:, dead] = 0
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    pruned, report = structured_prune(model, 0.5)
    c = pruned.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, 1)
    assert c.intermediate_size == model.config.intermediate_size // 2
    assert report["kept_kv_heads"] == [[0], [0]]
    assert report["head_sparsity"] == 0.5 and report["channel_sparsity"] == 0.5
    assert report["parameters"]["after"] < report["parameters"]["before"]
    assert torch.allclose(_logits(pruned, ids), _logits(model, ids), atol=1e-5)
    # the original is untouched and the result is a standard checkpoint
    assert model.config.num_attention_heads == 4
    FAMILY.save(pruned, tmp_path / "pruned")
    reloaded = FAMILY.load(tmp_path / "pruned")
    assert torch.equal(_logits(reloaded, ids), _logits(pruned, ids))


def test_structured_pruning_rounds_per_layer_and_refuses_extremes(llama: Any) -> None:
    _, report = structured_prune(llama, 0.3)  # 2 kv heads → round(0.6) = 1 removed
    assert report["kv_heads"] == {"before": 2, "after": 1}
    inter = llama.config.intermediate_size
    assert report["intermediate_size"]["after"] == inter - round(0.3 * inter)
    with pytest.raises(GenloopError, match="every key/value head"):
        structured_prune(llama, 0.8)
    with pytest.raises(GenloopError, match="removes nothing"):
        structured_prune(llama, 0.001)


def test_recovery_keeps_pruned_weights_at_zero_and_lowers_the_loss(llama: Any) -> None:
    model = copy.deepcopy(llama)
    magnitude_prune(model, 0.5)
    before = sparsity(model)
    gen = torch.Generator().manual_seed(0)
    fixed = torch.randint(0, 128, (4, 17), generator=gen)  # one batch, learned by heart

    def batches() -> Any:
        while True:
            yield {"input_ids": fixed[:, :-1], "targets": fixed[:, 1:]}

    losses = recover(model, batches(), 15, lr=3e-3, masks=weight_masks(model))
    assert len(losses) == 15 and losses[-1] < losses[0]
    assert sparsity(model) == before
    assert not model.training
