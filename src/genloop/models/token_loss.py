"""Token-level cross-entropy with label smoothing and z-loss, shared by the text families.

The families' default objectives call this on their logits; objectives in
``train/objectives.py`` can call it too, on logits they computed themselves.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from genloop.errors import GenloopError

IGNORE_INDEX = -100  # the label of a position that takes no part in the loss (HF convention)


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
    if not 0.0 <= label_smoothing < 1.0:
        raise GenloopError(f"label_smoothing must be in [0, 1) (got {label_smoothing})")
    if z_loss_coef < 0.0:
        raise GenloopError(f"z_loss_coef must be ≥ 0 (got {z_loss_coef})")
    flat_logits = logits.reshape(-1, logits.size(-1)).float()  # (B·T, V)
    flat_targets = targets.reshape(-1)  # (B·T,)
    loss = F.cross_entropy(
        flat_logits,
        flat_targets,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    counted = flat_targets != ignore_index
    if z_loss_coef > 0.0:
        log_z = torch.logsumexp(flat_logits[counted], dim=-1)  # (N,)
        loss = loss + z_loss_coef * log_z.square().sum()
    if reduction == "sum":
        return loss
    # An all-masked batch gives 0 (not NaN), so one empty micro-batch cannot poison a step.
    return loss / counted.sum().clamp(min=1)
