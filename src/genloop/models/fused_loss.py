"""The output projection and its cross-entropy in one pass, a chunk of positions at a time.

A causal LM's loss usually takes the logits ``h·Wᵀ`` (B·T × V, float32: 134 MB for 16 ×
256 positions and a vocabulary of 8,192) and then their gradient of the same size. Here
each chunk of rows forms its logits, its loss and, at once, the gradients with respect to
the hidden states and to ``W`` (softmax minus one-hot, times ``W`` and times the chunk's
hidden states), then drops the logits: the full logits and their gradient never exist, so
the memory traffic of the loss shrinks to a cache-sized chunk (Liger-Kernel's
FusedLinearCrossEntropy, in plain torch). Backward only scales the stored gradients.

The quantity is :func:`genloop.models.token_loss.token_loss`'s (same label smoothing,
z-loss, ``ignore_index`` and reduction); under autocast the projection runs in the autocast
dtype as ``nn.Linear`` would, the loss in float32.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from genloop.errors import GenloopError
from genloop.models.token_loss import (
    IGNORE_INDEX,
    _cross_entropy_sum,
    check_options,
    reduce_sum,
)

# positions per chunk: the chunk's logits are ROWS × V (16 MiB in fp32 at V = 8,192).
# Whole tiny-preset training steps (8 × 256, V 6,837, 2-core EPYC, one thread) against the
# unfused loss: 1.03-1.04× in fp32 and 1.01-1.03× in bf16 at 512 rows; 256 rows was 0.97×
# in bf16, 2,048 rows 1.02×/1.03×
CHUNK_ROWS = {"cpu": 512, "cuda": 4096}
# Llama-layout models (``model.model`` returns the final-norm hidden states, ``lm_head`` a
# bias-free nn.Linear, no logit scaling or soft-capping between them)
FUSABLE = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


def can_fuse(model: nn.Module) -> bool:
    """Whether ``model`` is a plain (unwrapped) Llama-layout causal LM on the CPU whose
    ``lm_head`` can be fused with the loss; DDP, FSDP, PEFT and ``torch.compile`` wrappers
    are not (they must see the whole forward), nor LoRA on ``lm_head``."""
    if type(model).__name__ not in FUSABLE:
        return False
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or head.bias is not None:
        return False
    if type(head.weight) is not nn.Parameter:  # an FSDP2 DTensor, a quantized weight, …
        return False
    if head.weight.device.type != "cpu":  # measured on a CPU only; GPUs keep the logits path
        return False
    return getattr(model.config, "final_logit_softcapping", None) is None


def fused_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    targets: Tensor,
    *,
    label_smoothing: float = 0.0,
    z_loss_coef: float = 0.0,
    reduction: Literal["mean", "sum"] = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """``token_loss(model(input_ids).logits, targets, …)`` for a model :func:`can_fuse`
    accepts, without materialising the logits."""
    base: nn.Module = model.model  # type: ignore[assignment]
    head: nn.Linear = model.lm_head  # type: ignore[assignment]
    hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, D)
    return linear_cross_entropy(
        hidden,
        head.weight,
        targets,
        label_smoothing=label_smoothing,
        z_loss_coef=z_loss_coef,
        reduction=reduction,
        ignore_index=ignore_index,
    )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    label_smoothing: float = 0.0,
    z_loss_coef: float = 0.0,
    reduction: Literal["mean", "sum"] = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T`` ((B, T, D) × (V, D)) against
    ``targets`` (B, T), as :func:`token_loss` computes it on those logits."""
    if hidden.shape[:-1] != targets.shape:
        raise GenloopError(
            f"hidden states {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not "
            "line up; expected (B, T, D) and (B, T)"
        )
    check_options(label_smoothing, z_loss_coef)
    flat_h = hidden.reshape(-1, hidden.size(-1))
    flat_t = targets.reshape(-1)
    args = (label_smoothing, z_loss_coef, ignore_index)
    if torch.is_grad_enabled() and (flat_h.requires_grad or weight.requires_grad):
        loss: Tensor = _LinearCrossEntropy.apply(flat_h, weight, flat_t, *args)  # type: ignore[no-untyped-call]
    else:  # evaluation: the loss alone
        loss = _linear_cross_entropy_sum(flat_h, weight, flat_t, *args, with_grad=False)[0]
    return reduce_sum(loss, flat_t, reduction, ignore_index)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would multiply in: autocast's where it is on."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _linear_cross_entropy_sum(
    h: Tensor,  # (N, D)
    w: Tensor,  # (V, D)
    targets: Tensor,  # (N,)
    label_smoothing: float,
    z_loss_coef: float,
    ignore_index: int,
    *,
    with_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The summed loss and (``with_grad``) its gradients with respect to ``h`` and ``w``."""
    dtype = _compute_dtype(h)
    hc, wc = h.to(dtype), w.to(dtype)
    n = h.size(0)
    rows = CHUNK_ROWS.get(h.device.type, 1024)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(hc) if with_grad else None
    # float32 accumulator for W's gradient, summed over chunks (bf16 sums would lose bits)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if with_grad else None
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, n, rows):
            h_c = hc[start : start + rows]
            logits = h_c @ wc.T  # (n_c, V), in the compute dtype
            part, grad_z = _cross_entropy_sum(
                logits, targets[start : start + rows], label_smoothing, z_loss_coef,
                ignore_index, with_grad=with_grad,
            )  # fmt: skip
            total += part
            if grad_z is None or grad_h is None or grad_w is None:
                continue
            torch.mm(grad_z, wc, out=grad_h[start : start + rows])
            if dtype == torch.float32:
                grad_w.addmm_(grad_z.T, h_c)
            else:
                grad_w.add_(grad_z.T @ h_c)
    if grad_h is not None and grad_w is not None:
        return total, grad_h.to(h.dtype), grad_w.to(w.dtype)
    return total, None, None


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in the forward pass; backward scales them by the incoming
    gradient, in place (so the graph cannot be walked twice)."""

    @staticmethod
    def forward(
        ctx: Any,
        h: Tensor,
        w: Tensor,
        targets: Tensor,
        label_smoothing: float,
        z_loss_coef: float,
        ignore_index: int,
    ) -> Tensor:
        total, grad_h, grad_w = _linear_cross_entropy_sum(
            h, w, targets, label_smoothing, z_loss_coef, ignore_index, with_grad=True
        )
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h.mul_(grad_total.to(grad_h.dtype)) if ctx.needs_input_grad[0] else None
        gw = grad_w.mul_(grad_total.to(grad_w.dtype)) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None
