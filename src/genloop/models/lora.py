"""LoRA adapters through peft: apply, merge for export, save and load the adapters alone.

LoRA (Hu et al., 2021) freezes the base weight W and learns ΔW = (α/r)·B·A with
A (r × d_in), B (d_out × r), B starting at zero so the adapted model starts equal to the
base. QLoRA (Dettmers et al., 2023) keeps the frozen base in 4-bit NF4: load it with
``load_pretrained(..., load_in_4bit=True)`` (CUDA and bitsandbytes only), then apply LoRA.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genloop.errors import GenloopError, NotFoundError

# The attention projections by default; peft's own defaults for other model types.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "t5": ["q", "v"],
}
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def apply_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
) -> Any:
    """Wrap ``model`` with LoRA adapters on ``target_modules``; every base weight is frozen.

    Returns a ``peft.PeftModel``, which takes the same batches as the model it wraps.
    """
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if is_lora(model):
        raise GenloopError("this model already has LoRA adapters")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise GenloopError(f"LoRA rank r must be a positive integer (got {r!r})")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise GenloopError(f"LoRA alpha must be a positive number (got {alpha!r})")
    if not 0.0 <= dropout < 1.0:
        raise GenloopError(f"LoRA dropout must be in [0, 1) (got {dropout!r})")
    config = getattr(model, "config", None)
    if config is None:
        raise GenloopError(f"expected a transformers model, got {type(model).__name__}")
    model_type = getattr(config, "model_type", "")
    targets = (
        list(target_modules) if target_modules is not None else DEFAULT_TARGETS.get(model_type)
    )
    task = (
        TaskType.SEQ_2_SEQ_LM
        if getattr(config, "is_encoder_decoder", False)
        else TaskType.CAUSAL_LM
    )
    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft says int; scale = alpha / r
        lora_dropout=dropout,
        target_modules=targets,
        task_type=task,
        bias="none",
    )
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model)  # type: ignore[no-untyped-call]
    try:
        with _quiet_peft():
            return get_peft_model(model, lora_config)
    except ValueError as exc:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise GenloopError(
            f"cannot place LoRA adapters on {model_type} model: {str(exc).splitlines()[0]} "
            f"(give target_modules; its linear layers are named: {', '.join(linear)})"
        ) from None


def is_lora(model: nn.Module) -> bool:
    return getattr(model, "peft_config", None) is not None


def merge_lora(model: nn.Module) -> Any:
    """Fold the adapters into the base weights (W + (α/r)·B·A) and return the plain model.

    The result is a ``transformers.PreTrainedModel`` that saves as a standard checkpoint.
    """
    if not is_lora(model):
        raise GenloopError("this model has no LoRA adapters to merge")
    if getattr(model, "is_loaded_in_4bit", False):
        raise GenloopError(
            "the base is 4-bit: merging into it would round the result to 4 bits; save the "
            "adapters (save_adapter), load the base in full precision, load_adapter, then merge"
        )
    return model.merge_and_unload()  # type: ignore[operator]


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the adapters alone (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    if not is_lora(model):
        raise GenloopError("this model has no LoRA adapters to save")
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)  # type: ignore[operator]
    return out


def load_adapter(base: nn.Module, adapter_dir: str | Path, *, trainable: bool = False) -> Any:
    """``base`` with the adapters saved in ``adapter_dir`` (safetensors only)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise NotFoundError(f"{adapter_dir} holds no adapter_config.json")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise GenloopError(
            f"{adapter_dir} holds no {ADAPTER_WEIGHTS}; adapters are loaded from safetensors only"
        )
    with _quiet_peft():
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def qlora_quantization_config() -> Any:
    """The 4-bit NF4 ``BitsAndBytesConfig`` for a QLoRA base; raises where it cannot run."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if missing:
        raise GenloopError(
            "4-bit (QLoRA) loading needs a CUDA GPU with bitsandbytes, but "
            + " and ".join(missing)
            + "; use plain LoRA on a full-precision base instead"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


@contextmanager
def _quiet_peft() -> Iterator[None]:
    # peft reads an attribute that transformers 5 deprecates; nothing for users to do.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        yield
