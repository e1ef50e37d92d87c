"""The fused output projection + cross-entropy against the unfused reference (full logits,
then PyTorch's cross-entropy): the same loss and gradients for the hidden states and the
weight, over several chunks, with ignored positions, smoothing, z-loss and bf16 autocast;
and a Llama model trained through it gets what ``token_loss`` on its logits gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genloop.models import fused_loss
from genloop.models.fused_loss import can_fuse, fused_lm_loss, linear_cross_entropy
from genloop.models.token_loss import IGNORE_INDEX, token_loss


def reference(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, eps: float, c: float):  # type: ignore[no-untyped-def]
    """F.cross_entropy on the float32 logits h·Wᵀ, plus c·log²Z, mean over counted rows."""
    logits = F.linear(h, w).reshape(-1, w.size(0)).float()
    t = targets.reshape(-1)
    loss = F.cross_entropy(logits, t, label_smoothing=eps, reduction="sum")
    counted = t != IGNORE_INDEX
    loss = loss + c * torch.logsumexp(logits[counted], dim=-1).square().sum()
    return loss / counted.sum().clamp(min=1)


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 16, generator=gen)  # (B, T, D)
    w = torch.randn(37, 16, generator=gen) * 0.5  # (V, D)
    targets = torch.randint(0, 37, (2, 7), generator=gen)
    targets[0, 1] = targets[1, 6] = IGNORE_INDEX
    return h, w, targets


@pytest.mark.parametrize(("eps", "c"), [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
def test_float32_loss_and_gradients_match_cross_entropy_on_full_logits(
    monkeypatch: pytest.MonkeyPatch, eps: float, c: float
) -> None:
    monkeypatch.setattr(fused_loss, "CHUNK_ROWS", {"cpu": 4})  # 14 rows: 4 chunks, one short
    h, w, targets = inputs()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ours = linear_cross_entropy(h1, w1, targets, label_smoothing=eps, z_loss_coef=c)
    (ours * 1.7).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = reference(h2, w2, targets, eps, c)
    (ref * 1.7).backward()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    assert h1.grad is not None and h2.grad is not None and w1.grad is not None
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)
    assert h1.grad[0, 1].abs().max() == 0  # an ignored position gets no gradient


def test_bf16_autocast_matches_the_unfused_projection_under_autocast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fused_loss, "CHUNK_ROWS", {"cpu": 4})
    h, w, targets = inputs()
    grads = []
    for fn in (
        lambda a, b: linear_cross_entropy(a, b, targets),
        lambda a, b: reference(a, b, targets, 0.0, 0.0),
    ):
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(a, b)
        loss.backward()
        assert a.grad is not None and b.grad is not None
        assert a.grad.dtype == b.grad.dtype == torch.float32  # the parameters' dtype
        grads.append((loss.item(), a.grad, b.grad))
    (l1, gh1, gw1), (l2, gh2, gw2) = grads
    assert l1 == pytest.approx(l2, abs=2e-2)
    torch.testing.assert_close(gh1, gh2, atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(gw1, gw2, atol=2e-2, rtol=5e-2)


def test_all_ignored_gives_zero_and_no_grad_mode_gives_the_same_loss() -> None:
    h, w, targets = inputs()
    assert linear_cross_entropy(h, w, torch.full_like(targets, IGNORE_INDEX)).item() == 0.0
    with torch.no_grad():
        evaluated = linear_cross_entropy(h, w, targets)
    assert evaluated.item() == pytest.approx(reference(h, w, targets, 0.0, 0.0).item(), abs=1e-5)


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def test_a_llama_model_gets_the_loss_and_gradients_of_token_loss_on_its_logits() -> None:
    model = tiny_llama()
    assert can_fuse(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50, (3, 9), generator=gen)
    y = torch.randint(0, 50, (3, 9), generator=gen)
    y[2, :4] = IGNORE_INDEX
    fused = fused_lm_loss(model, x, y, label_smoothing=0.1)
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = token_loss(model(input_ids=x, use_cache=False).logits, y, label_smoothing=0.1)
    ref.backward()
    assert fused.item() == pytest.approx(ref.item(), abs=1e-5)
    for name, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(fused_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_only_plain_llama_layout_models_are_fused() -> None:
    model = tiny_llama()
    assert not can_fuse(nn.Linear(2, 2))
    assert not can_fuse(nn.Sequential(model))  # a wrapper (DDP, compile, PEFT) must run whole
    model.lm_head = nn.Linear(32, 50, bias=True)  # a bias would be left out of the fused path
    assert not can_fuse(model)
