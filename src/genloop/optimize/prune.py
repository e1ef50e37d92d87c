"""Pruning: unstructured magnitude pruning, structured head/channel pruning, recovery.

Unstructured (``magnitude_prune``)
    In every linear layer of the decoder (attention and MLP projections; not the embedding
    or the output head) the ``round(p·numel)`` weights of smallest magnitude become zero,
    so each layer, and the whole, has sparsity p up to rounding. The checkpoint stays a
    dense Hugging Face one: zeros take as much room and time as other numbers, so this
    saves nothing by itself; it is the step before a sparse kernel or a compressor.

Structured (``structured_prune``)
    Removes whole key/value head groups (each with its query heads) and MLP channels, the
    same number in every layer, so the result is a smaller standard Llama checkpoint
    (fewer ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size``) that
    transformers and vLLM load as is, and that really is faster. Importance is weight
    magnitude: a head group scores the squared norms of its q, k, v rows and o columns; an
    MLP channel the product of its gate row, up row and down column norms. Per layer the
    lowest ``round(p·K)`` groups (K kv heads) and ``round(p·I)`` channels go.

``recover`` fine-tunes a pruned model for a few steps on the dataset (language modelling
loss); for unstructured pruning the masks keep pruned weights at zero.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from genloop.errors import GenloopError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]  # (step, steps, loss)


def check_amount(amount: float) -> None:
    if not isinstance(amount, int | float) or isinstance(amount, bool) or not 0 < amount < 1:
        raise GenloopError(f"the pruning amount must be a number in (0, 1), not {amount!r}")


def prunable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The decoder's linear layers: every ``nn.Linear`` except the output head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    found = [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
    ]
    if not found:
        raise GenloopError("the model has no linear layers to prune")
    return found


def sparsity(model: nn.Module) -> float:
    """The share of exact zeros among the prunable layers' weights."""
    zeros = total = 0
    for _, linear in prunable_linears(model):
        w = linear.weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total


def magnitude_prune(model: nn.Module, amount: float) -> dict[str, Any]:
    """Zero the smallest-magnitude share ``amount`` of each prunable layer, in place."""
    check_amount(amount)
    with torch.no_grad():
        for _, linear in prunable_linears(model):
            flat = linear.weight.view(-1)
            k = round(amount * flat.numel())
            if k:
                idx = torch.topk(flat.abs(), k, largest=False, sorted=False).indices
                flat[idx] = 0.0  # exactly k zeros, whatever the ties
    return {"method": "magnitude", "amount": amount, "sparsity": sparsity(model)}


def weight_masks(model: nn.Module) -> dict[str, Tensor]:
    """Which weights of each prunable layer are kept (nonzero), by module name."""
    return {name: linear.weight.detach() != 0 for name, linear in prunable_linears(model)}


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_submodule(name).weight.mul_(mask)  # type: ignore[operator]


# --------------------------------------------------------------------------- structured


def structured_prune(
    model: PreTrainedModel, amount: float
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A smaller Llama-style model without the least important heads and MLP channels.

    ``model`` is left as it was; the result is a new model in eval mode.
    """
    from transformers import AutoModelForCausalLM

    check_amount(amount)
    config = model.config
    layers = _decoder_layers(model)
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    n_inter = int(config.intermediate_size)
    group = n_head // n_kv  # query heads per key/value head
    kv_drop, inter_drop = round(amount * n_kv), round(amount * n_inter)
    if kv_drop >= n_kv or inter_drop >= n_inter:
        raise GenloopError(
            f"pruning {amount:.0%} would remove every key/value head ({n_kv}) or MLP channel "
            f"({n_inter}) of a layer; choose a smaller amount"
        )
    if kv_drop == 0 and inter_drop == 0:
        raise GenloopError(
            f"pruning {amount:.0%} removes nothing at this size ({n_kv} key/value heads, "
            f"{n_inter} MLP channels per layer); choose a larger amount"
        )
    kv_keep, inter_keep = n_kv - kv_drop, n_inter - inter_drop

    new_config = copy.deepcopy(config)
    new_config.num_attention_heads = kv_keep * group
    new_config.num_key_value_heads = kv_keep
    new_config.head_dim = head_dim  # explicit: it no longer equals hidden_size / heads
    new_config.intermediate_size = inter_keep
    dtype = next(model.parameters()).dtype
    pruned: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        new_config, attn_implementation="sdpa", dtype=dtype
    )
    module: nn.Module = pruned  # nn.Module's typed to/eval (transformers wraps them)
    module.to(next(model.parameters()).device)

    # everything outside the pruned projections is copied unchanged
    source = model.state_dict()
    target = pruned.state_dict()
    with torch.no_grad():
        for key, tensor in target.items():
            if source[key].shape == tensor.shape:
                tensor.copy_(source[key])
        kept_heads: list[list[int]] = []
        for old, new in zip(layers, _decoder_layers(pruned), strict=True):
            kv = _keep_kv_groups(old.self_attn, n_kv, group, head_dim, kv_keep)
            kept_heads.append(kv)
            q_rows = _rows([h for g in kv for h in range(g * group, (g + 1) * group)], head_dim)
            kv_rows = _rows(kv, head_dim)
            _copy_rows(new.self_attn.q_proj, old.self_attn.q_proj, q_rows)
            _copy_rows(new.self_attn.k_proj, old.self_attn.k_proj, kv_rows)
            _copy_rows(new.self_attn.v_proj, old.self_attn.v_proj, kv_rows)
            _copy_cols(new.self_attn.o_proj, old.self_attn.o_proj, q_rows)
            channels = _keep_channels(old.mlp, inter_keep)
            _copy_rows(new.mlp.gate_proj, old.mlp.gate_proj, channels)
            _copy_rows(new.mlp.up_proj, old.mlp.up_proj, channels)
            _copy_cols(new.mlp.down_proj, old.mlp.down_proj, channels)
    if getattr(new_config, "tie_word_embeddings", False):
        pruned.tie_weights()
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in pruned.parameters())
    report = {
        "method": "structured",
        "amount": amount,
        "heads": {"before": n_head, "after": kv_keep * group},
        "kv_heads": {"before": n_kv, "after": kv_keep},
        "intermediate_size": {"before": n_inter, "after": inter_keep},
        "head_sparsity": kv_drop / n_kv,
        "channel_sparsity": inter_drop / n_inter,
        "parameters": {"before": before, "after": after},
        "kept_kv_heads": kept_heads,
    }
    module.eval()
    return pruned, report


def _decoder_layers(model: nn.Module) -> list[Any]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    ok = layers is not None and all(
        hasattr(layer, "self_attn")
        and hasattr(layer, "mlp")
        and all(hasattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))
        for layer in layers
    )
    if not ok:
        raise GenloopError(
            f"structured pruning supports Llama-style decoders (q/k/v/o and gate/up/down "
            f"projections), not {type(model).__name__}; use unstructured pruning instead"
        )
    return list(layers)  # type: ignore[arg-type]


def _rows(heads: list[int], head_dim: int) -> Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _norm2(w: Tensor, dim: int) -> Tensor:
    return w.detach().float().pow(2).sum(dim=dim)


def _keep_kv_groups(attn: Any, n_kv: int, group: int, head_dim: int, keep: int) -> list[int]:
    """The ``keep`` key/value groups with the largest weight norms, in their order."""
    q = _norm2(attn.q_proj.weight, 1).view(n_kv, group * head_dim).sum(1)
    o = _norm2(attn.o_proj.weight, 0).view(n_kv, group * head_dim).sum(1)
    k = _norm2(attn.k_proj.weight, 1).view(n_kv, head_dim).sum(1)
    v = _norm2(attn.v_proj.weight, 1).view(n_kv, head_dim).sum(1)
    score = q + o + k + v  # (K,)
    return sorted(torch.topk(score, keep).indices.tolist())


def _keep_channels(mlp: Any, keep: int) -> Tensor:
    score = (
        _norm2(mlp.gate_proj.weight, 1).sqrt()
        * _norm2(mlp.up_proj.weight, 1).sqrt()
        * _norm2(mlp.down_proj.weight, 0).sqrt()
    )  # (I,)
    return torch.topk(score, keep).indices.sort().values


def _copy_rows(new: nn.Linear, old: nn.Linear, rows: Tensor) -> None:
    new.weight.copy_(old.weight[rows])
    if old.bias is not None and new.bias is not None:
        new.bias.copy_(old.bias[rows])


def _copy_cols(new: nn.Linear, old: nn.Linear, cols: Tensor) -> None:
    new.weight.copy_(old.weight[:, cols])
    if old.bias is not None and new.bias is not None:
        new.bias.copy_(old.bias)


# ----------------------------------------------------------------------------- recovery


def recover(
    model: nn.Module,
    batches: Iterator[dict[str, Tensor]],
    steps: int,
    *,
    lr: float = 1e-4,
    masks: dict[str, Tensor] | None = None,
    progress: ProgressFn | None = None,
) -> list[float]:
    """Fine-tune ``model`` for ``steps`` on ``batches`` (``input_ids``, ``targets``).

    With ``masks`` (unstructured pruning) pruned weights stay zero after every step.
    Returns the loss per step; the model ends in eval mode.
    """
    from genloop.models.token_loss import token_loss

    if steps < 1:
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    try:
        for step in range(1, steps + 1):
            batch = next(batches)
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
            loss = token_loss(logits, batch["targets"])
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if masks is not None:
                apply_masks(model, masks)
            value = float(loss.detach())
            if not torch.isfinite(torch.tensor(value)):
                raise GenloopError(f"the recovery loss became {value} at step {step}; lower the lr")
            losses.append(value)
            if progress is not None:
                progress(step, steps, value)
    finally:
        model.eval()
    return losses
