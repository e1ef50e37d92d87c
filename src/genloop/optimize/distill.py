"""Knowledge distillation: train a smaller student from a teacher's logits.

The student is a fresh Llama-style model of a preset (``tiny``, ``small``, ``base``) with
the teacher's vocabulary, special token ids and context length. On the dataset's packed
token windows it minimises (Hinton et al., 2015)::

    loss = α · τ² · KL(softmax(z_t / τ) ‖ softmax(z_s / τ)) + (1 − α) · CE(z_s, y)

z_t, z_s the teacher's and student's logits, τ the temperature (τ² keeps the soft term's
gradient scale independent of τ), y the next tokens. The teacher runs without gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genloop.errors import GenloopError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ProgressFn = Callable[[int, int, float], None]  # (step, steps, loss)


def student_config(teacher: PreTrainedModel, preset: str) -> dict[str, Any]:
    """The family config of a ``preset`` student that shares the teacher's tokenizer."""
    c = teacher.config
    out: dict[str, Any] = {
        "preset": preset,
        "vocab_size": int(c.vocab_size),
        "context_length": int(getattr(c, "max_position_embeddings", 0) or 1024),
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(c, key, None)
        if isinstance(value, list):  # several eos ids: the family takes one
            value = value[0] if value else None
        if value is not None:
            out[key] = int(value)
    return out


def build_student(teacher: PreTrainedModel, preset: str, *, seed: int = 0) -> PreTrainedModel:
    from genloop.models.causal_lm import FAMILY

    torch.manual_seed(seed)
    student: PreTrainedModel = FAMILY.build(student_config(teacher, preset))  # type: ignore[assignment]
    module: nn.Module = student  # nn.Module's typed to (transformers wraps it)
    module.to(next(teacher.parameters()).device)
    return student


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    alpha: float,
) -> Tensor:
    """α·τ²·KL(teacher ‖ student) at temperature τ + (1 − α)·CE; logits (B, T, V)."""
    if temperature <= 0 or not 0 <= alpha <= 1:
        raise GenloopError(f"need temperature > 0 and 0 ≤ alpha ≤ 1; got {temperature}, {alpha}")
    vocab = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, vocab)
    t = teacher_logits.float().reshape(-1, vocab)
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    ce = F.cross_entropy(s, targets.reshape(-1))
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def distill(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterator[dict[str, Tensor]],
    steps: int,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    lr: float = 1e-3,
    warmup_steps: int | None = None,
    progress: ProgressFn | None = None,
) -> list[float]:
    """Train ``student`` for ``steps`` batches (``input_ids``, ``targets``); loss per step.

    AdamW with linear warmup (default: 10% of the steps) and cosine decay to 10% of
    ``lr``. Both models end in eval mode.
    """
    from genloop.train.schedule import lr_at

    if steps < 1:
        raise GenloopError(f"distillation needs at least one step, not {steps}")
    t_vocab = teacher.get_output_embeddings().weight.shape[0]  # type: ignore[operator]
    s_vocab = student.get_output_embeddings().weight.shape[0]  # type: ignore[operator]
    if t_vocab != s_vocab:
        raise GenloopError(
            f"teacher and student vocabularies differ ({t_vocab} vs {s_vocab}); they must "
            "share the tokenizer"
        )
    warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps
    warmup = min(warmup, steps - 1)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    teacher.eval()
    student.train()
    losses: list[float] = []
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(
                    step,
                    lr=lr,
                    min_lr=lr / 10,
                    warmup_steps=warmup,
                    max_steps=steps,
                    schedule="cosine",
                )
            batch = next(batches)
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], use_cache=False).logits
            student_logits = student(input_ids=batch["input_ids"], use_cache=False).logits
            loss = distillation_loss(
                student_logits,
                teacher_logits,
                batch["targets"],
                temperature=temperature,
                alpha=alpha,
            )
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if value != value or value in (float("inf"), float("-inf")):
                raise GenloopError(f"the distillation loss became {value} at step {step + 1}")
            losses.append(value)
            if progress is not None:
                progress(step + 1, steps, value)
    finally:
        student.eval()
    return losses
