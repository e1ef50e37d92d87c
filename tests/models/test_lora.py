from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.errors import GenloopError
from genloop.models.causal_lm import FAMILY, forward_logits
from genloop.models.lora import apply_lora, load_adapter, merge_lora, save_adapter


def _train(model: Any, tokens: torch.Tensor, steps: int = 4) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, foreach=True)
    model.train()
    for _ in range(steps):
        loss = FAMILY.loss(model, {"input_ids": tokens})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_apply_lora_freezes_the_base(llama: Any) -> None:
    adapted = apply_lora(llama, r=4, alpha=8)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert FAMILY.num_parameters(adapted, trainable_only=True) == 2 * 4 * (
        (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64)  # layers · r · Σ (d_in + d_out)
    )


def test_training_changes_only_adapters_and_merges_to_the_same_outputs(
    llama: Any, tokens: torch.Tensor, tmp_path: Path
) -> None:
    adapted = apply_lora(llama, r=4, alpha=8, dropout=0.0)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    _train(adapted, tokens)
    after = adapted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert all(any(k.startswith(c.split(".lora_")[0]) for c in changed) for k in changed)

    with torch.no_grad():
        expected = forward_logits(adapted, {"input_ids": tokens})
        merged = merge_lora(adapted)
        assert type(merged).__name__ == "LlamaForCausalLM"
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        got = forward_logits(merged, {"input_ids": tokens})
        assert torch.allclose(got, expected, atol=1e-5)
        out = FAMILY.save(merged, tmp_path / "merged")
        assert torch.equal(forward_logits(FAMILY.load(out), {"input_ids": tokens}), got)


def test_adapters_save_alone_and_load_back(
    llama: Any, tokens: torch.Tensor, tmp_path: Path
) -> None:
    base = copy.deepcopy(llama)  # apply_lora wraps the model in place
    adapted = apply_lora(llama, r=4)
    _train(adapted, tokens, steps=2)
    out = save_adapter(adapted, tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    with torch.no_grad():
        expected = forward_logits(adapted, {"input_ids": tokens})

    reloaded = load_adapter(base, out)
    with torch.no_grad():
        assert torch.equal(forward_logits(reloaded.eval(), {"input_ids": tokens}), expected)


def test_saving_an_adapted_model_asks_for_a_merge(llama: Any, tmp_path: Path) -> None:
    with pytest.raises(GenloopError, match="merge them first"):
        FAMILY.save(apply_lora(llama), tmp_path / "model")


def test_t5_defaults_to_q_and_v(t5: Any) -> None:
    adapted = apply_lora(t5, r=2)
    targeted = {
        n.split(".lora_")[0].rsplit(".", 1)[-1]
        for n, p in adapted.named_parameters()
        if p.requires_grad
    }
    assert targeted == {"q", "v"}


def test_unknown_targets_name_the_linear_layers(llama: Any) -> None:
    with pytest.raises(GenloopError, match=r"linear layers are named: .*gate_proj"):
        apply_lora(llama, target_modules=["query"])


def test_bad_lora_settings_and_merges_are_refused(llama: Any) -> None:
    with pytest.raises(GenloopError, match="rank r must be a positive integer"):
        apply_lora(llama, r=0)
    with pytest.raises(GenloopError, match="no LoRA adapters to merge"):
        merge_lora(llama)
