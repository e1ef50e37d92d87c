"""Token-level cross-entropy with label smoothing and z-loss, shared by the text families.

The families' default objectives call this on their logits; objectives in
``train/objectives.py`` can call it too, on logits they computed themselves.

The loss is computed in float32 a chunk of positions at a time, and the gradient with
respect to the logits is formed in the same pass (softmax minus the target distribution)
and kept in the logits' dtype, so neither a float32 copy of all the logits nor their
log-softmax is ever held whole: for bf16 logits that is 4× less memory and, on CPUs,
about 2-3× less time in the loss than ``F.cross_entropy(logits.float(), …)``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from genloop.errors import GenloopError

IGNORE_INDEX = -100  # the label of a position that takes no part in the loss (HF convention)
# float32 logits per chunk (rows = CHUNK_ELEMENTS // V): on a CPU, 4 MiB, which stays in
# cache and in malloc's free lists (a fresh 32 MiB buffer per chunk costs more in page
# faults than the arithmetic); on a GPU, 128 MiB, so kernel launches don't add up
CHUNK_ELEMENTS = {"cpu": 2**20, "cuda": 2**25}


def token_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    label_smoothing: float = 0.0,
    z_loss_coef: float = 0.0,
    reduction: Literal["mean", "sum"] = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Cross-entropy of ``logits`` (B, T, V) against ``targets`` (B, T), aligned already.

    Positions whose target is ``ignore_index`` are left out of both terms.

    - ``label_smoothing`` ε: the target distribution is (1-ε)·one_hot + ε/V.
    - ``z_loss_coef`` c adds c·log²Z per position, Z = Σ exp(logits) (PaLM's z-loss,
      c = 1e-4 there), which keeps the softmax normaliser near 1 and the logits bounded.
    - ``reduction="sum"`` returns the sum over counted positions, so a loop that
      accumulates gradients can divide by the token count of the whole step.

    Computed in float32 whatever the logits' dtype.
    """
    if logits.shape[:-1] != targets.shape:
        raise GenloopError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not line up; "
            "expected (B, T, V) and (B, T)"
        )
    check_options(label_smoothing, z_loss_coef)
    flat_logits = logits.reshape(-1, logits.size(-1))  # (N, V)
    flat_targets = targets.reshape(-1)  # (N,)
    args = (label_smoothing, z_loss_coef, ignore_index)
    if torch.is_grad_enabled() and flat_logits.requires_grad:
        loss: Tensor = _CrossEntropy.apply(flat_logits, flat_targets, *args)  # type: ignore[no-untyped-call]
    else:  # evaluation: the loss alone
        loss = _cross_entropy_sum(flat_logits, flat_targets, *args, with_grad=False)[0]
    return reduce_sum(loss, flat_targets, reduction, ignore_index)


def check_options(label_smoothing: float, z_loss_coef: float) -> None:
    """A clear error for a label smoothing outside [0, 1) or a negative z-loss weight."""
    if not 0.0 <= label_smoothing < 1.0:
        raise GenloopError(f"label_smoothing must be in [0, 1) (got {label_smoothing})")
    if z_loss_coef < 0.0:
        raise GenloopError(f"z_loss_coef must be ≥ 0 (got {z_loss_coef})")


def reduce_sum(
    loss: Tensor, targets: Tensor, reduction: Literal["mean", "sum"], ignore_index: int
) -> Tensor:
    """The summed ``loss`` as ``reduction`` asks: itself, or its mean over counted targets.
    An all-masked batch gives 0 (not NaN), so one empty micro-batch cannot poison a step."""
    if reduction == "sum":
        return loss
    return loss / (targets != ignore_index).sum().clamp(min=1)


def _cross_entropy_sum(
    logits: Tensor,  # (N, V)
    targets: Tensor,  # (N,)
    label_smoothing: float,
    z_loss_coef: float,
    ignore_index: int,
    *,
    with_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Σ over counted positions of -(1-ε)·log p_t - ε·mean(log p) + c·lse², where
    p = softmax(z) of a position's logits z and lse = log Σ exp z, and (``with_grad``) its
    gradient with respect to z: p·(1 + 2c·lse) - (1-ε)·one_hot(t) - ε/V, zero where
    ignored, in the logits' dtype (the dtype autograd hands back to the layer that made
    them)."""
    n, v = logits.shape
    grad = torch.empty_like(logits) if with_grad else None
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    eps, c = label_smoothing, z_loss_coef
    rows = max(1, CHUNK_ELEMENTS.get(logits.device.type, 2**23) // max(v, 1))
    for start in range(0, n, rows):
        z = logits[start : start + rows].float()  # (n_c, V)
        t = targets[start : start + rows]
        keep = t != ignore_index  # (n_c,)
        safe = torch.where(keep, t, 0).unsqueeze(1)  # (n_c, 1)
        log_p = torch.log_softmax(z, dim=-1)  # (n_c, V), a new tensor
        log_p_t = log_p.gather(1, safe).squeeze(1)
        per = -log_p_t
        if eps > 0.0:
            per = (1.0 - eps) * per - eps * log_p.mean(dim=-1)
        if c > 0.0:
            lse = z.gather(1, safe).squeeze(1) - log_p_t  # log p_t = z_t - lse
            per = per + c * lse.square()
        total += torch.where(keep, per, 0.0).sum()
        if grad is None:
            continue
        p = log_p.exp_()  # softmax, in place of log_p
        if c > 0.0:
            p.mul_((1.0 + 2.0 * c * lse).unsqueeze(1))
        if eps > 0.0:
            p.sub_(eps / v)
        p.scatter_add_(1, safe, torch.full(safe.shape, eps - 1.0, device=p.device))
        p.mul_(keep.unsqueeze(1))
        grad[start : start + rows].copy_(p)  # cast to the logits' dtype
    return total, grad


class _CrossEntropy(torch.autograd.Function):
    """``_cross_entropy_sum`` with the gradient formed in the forward pass; backward only
    scales it by the loss's incoming gradient, in place (a second backward through the
    same graph, ``retain_graph=True``, is refused by autograd's version check)."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        targets: Tensor,
        label_smoothing: float,
        z_loss_coef: float,
        ignore_index: int,
    ) -> Tensor:
        total, grad = _cross_entropy_sum(
            logits, targets, label_smoothing, z_loss_coef, ignore_index, with_grad=True
        )
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_total.to(grad.dtype)), None, None, None, None
