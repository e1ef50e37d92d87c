"""``token_loss`` against PyTorch's own cross-entropy: values and gradients, in float32 and
bfloat16, with ignored positions, label smoothing, z-loss and several chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genloop.models import token_loss as token_loss_module
from genloop.models.token_loss import IGNORE_INDEX, token_loss


def reference(
    logits: torch.Tensor, targets: torch.Tensor, eps: float, c: float, reduction: str
) -> torch.Tensor:
    """The textbook formula: F.cross_entropy on float32 logits, plus c·log²Z."""
    flat = logits.reshape(-1, logits.size(-1)).float()
    t = targets.reshape(-1)
    loss = F.cross_entropy(flat, t, label_smoothing=eps, reduction="sum")
    counted = t != IGNORE_INDEX
    loss = loss + c * torch.logsumexp(flat[counted], dim=-1).square().sum()
    return loss if reduction == "sum" else loss / counted.sum().clamp(min=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("eps", "c"), [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_pytorch_cross_entropy_and_its_gradient(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, eps: float, c: float, reduction: str
) -> None:
    monkeypatch.setattr(token_loss_module, "CHUNK_ELEMENTS", {"cpu": 3 * 37})  # 3 rows a chunk
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 5, 37, generator=gen) * 3  # (B, T, V)
    targets = torch.randint(0, 37, (2, 5), generator=gen)
    targets[0, 1] = targets[1, 4] = IGNORE_INDEX

    ours_in = base.to(dtype).requires_grad_()
    ours = token_loss(ours_in, targets, label_smoothing=eps, z_loss_coef=c, reduction=reduction)
    (ours * 1.7).backward()
    ref_in = base.to(dtype).requires_grad_()
    ref = reference(ref_in, targets, eps, c, reduction)
    (ref * 1.7).backward()

    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours_in.grad is not None and ref_in.grad is not None
    assert ours_in.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(ours_in.grad.float(), ref_in.grad.float(), atol=tol)
    assert torch.all(ours_in.grad[0, 1] == 0) and torch.all(ours_in.grad[1, 4] == 0)


def test_without_gradients_gives_the_same_value() -> None:
    logits = torch.randn(3, 4, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 4))
    with torch.no_grad():
        evaluated = token_loss(logits, targets, z_loss_coef=1e-3)
    trained = token_loss(logits, targets, z_loss_coef=1e-3)
    assert torch.equal(evaluated, trained.detach())
    assert not evaluated.requires_grad


def test_logits_are_not_changed_and_an_all_masked_batch_is_zero() -> None:
    logits = torch.randn(2, 3, 7, requires_grad=True)
    before = logits.detach().clone()
    empty = token_loss(logits, torch.full((2, 3), IGNORE_INDEX))
    empty.backward()
    assert empty.item() == 0.0
    assert torch.equal(logits.detach(), before)
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_a_second_backward_through_the_same_graph_is_refused() -> None:
    logits = torch.randn(2, 3, 7, requires_grad=True)
    loss = token_loss(logits, torch.randint(0, 7, (2, 3)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
