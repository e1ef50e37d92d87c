"""LoRA adapters through peft: apply, merge for export, save and load the adapters alone.

LoRA (Hu et al., 2021) freezes the base weight W and learns ΔW = (α/r)·B·A with
A (r × d_in), B (d_out × r), B starting at zero so the adapted model starts equal to the
base. QLoRA (Dettmers et al., 2023) keeps the frozen base in 4-bit NF4: load it with
``load_pretrained(..., load_in_4bit=True)`` (bitsandbytes, on a CUDA GPU or the CPU), then
apply LoRA. The adapters learn on top of the quantized weights, so a QLoRA model is merged
into the *dequantized* base: the exported checkpoint computes what was trained and evaluated.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
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
    _preload_bitsandbytes()  # peft imports it: do it without the network
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
        # norms and embeddings to float32 for stable updates; no activation checkpointing:
        # genloop's LoRA does not recompute activations either, so QLoRA differs in one thing
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=False
        )
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
    A 4-bit (QLoRA) base is first dequantized (``merge_dequantized``): merging into the
    NF4 weights would round the adapters' update away.
    """
    if not is_lora(model):
        raise GenloopError("this model has no LoRA adapters to merge")
    if getattr(model, "is_loaded_in_4bit", False):
        return merge_dequantized(model)
    return model.merge_and_unload()  # type: ignore[operator]


def merge_dequantized(model: nn.Module) -> Any:
    """A QLoRA model as a full-precision plain model, on the CPU: W = dequant(NF4(W₀)) + ΔW.

    The adapters were trained against the dequantized weights, not the original W₀, so this
    is the function that training optimized and validation measured. The dtype is the one
    the base was stored in (its config's), float32 if unknown.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    bnb = import_bitsandbytes()
    peft_model: Any = model
    inner = peft_model.get_base_model()  # the HF model, adapters inside
    config = copy.deepcopy(inner.config)
    stored = getattr(config, "_pre_quantization_dtype", None) or getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    dtype = stored if isinstance(stored, torch.dtype) and stored.is_floating_point else None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = type(inner)._from_config(config, dtype=dtype or torch.float32)
    wanted = set(plain.state_dict())
    state: dict[str, torch.Tensor] = {}
    for key, value in inner.state_dict().items():
        name = key.replace(".base_layer", "")  # peft nests the adapted layer
        if name in wanted and "lora_" not in key:
            state[name] = value.detach().cpu()
    for name, module in inner.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            full = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
            state[name.replace(".base_layer", "") + ".weight"] = full.float().cpu()
    plain.load_state_dict(state, strict=True)
    adapter: str = peft_model.active_adapter
    lora_config = copy.deepcopy(peft_model.peft_config[adapter])
    with _quiet_peft():
        adapted = get_peft_model(plain, lora_config, adapter_name=adapter)
    adapters = get_peft_model_state_dict(peft_model, adapter_name=adapter)
    set_peft_model_state_dict(
        adapted, {k: v.detach().cpu() for k, v in adapters.items()}, adapter_name=adapter
    )
    return adapted.merge_and_unload().eval()


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the adapters alone (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    if not is_lora(model):
        raise GenloopError("this model has no LoRA adapters to save")
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)  # type: ignore[operator]
    return out


def load_adapter(base: nn.Module, adapter_dir: str | Path, *, trainable: bool = False) -> Any:
    """``base`` with the adapters saved in ``adapter_dir`` (safetensors only)."""
    _preload_bitsandbytes()
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


def qlora_quantization_config(device: str | torch.device) -> Any:
    """The 4-bit NF4 ``BitsAndBytesConfig`` for a QLoRA base on ``device``.

    Raises a ``GenloopError`` naming the reason where bitsandbytes cannot quantize there
    (``check_4bit_device``). Layers compute in bfloat16 on a GPU that has it, else float32
    (on the CPU, ``train.precision`` still autocasts the matmuls to bfloat16 where it pays).
    """
    where = check_4bit_device(device)
    from transformers import BitsAndBytesConfig

    gpu_bf16 = where.type == "cuda" and torch.cuda.is_bf16_supported()
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if gpu_bf16 else torch.float32,
    )


def check_4bit_device(device: str | torch.device) -> torch.device:
    """``device``, once bitsandbytes has quantized and dequantized a small NF4 block on it.

    bitsandbytes runs 4-bit on CUDA GPUs and on the CPU (its own kernels). Anything that
    stops it (not installed, no GPU, a library without this device's kernels) is a
    ``GenloopError`` here, before a model is loaded, not a crash halfway through.
    """
    where = torch.device(device)
    if where.type == "cuda" and not torch.cuda.is_available():
        raise GenloopError(
            f"4-bit (QLoRA) loading on {where} needs a CUDA GPU, and none is visible; "
            "train on the CPU (train.device: cpu) or use plain LoRA"
        )
    if where.type not in ("cpu", "cuda"):
        raise GenloopError(
            f"4-bit (QLoRA) loading runs on cpu or cuda, not {where.type}; use plain LoRA there"
        )
    import_bitsandbytes()  # a GenloopError of its own when it is missing
    problem = _nf4_roundtrip_problem(str(where))
    if problem is not None:
        raise GenloopError(
            f"4-bit (QLoRA) loading cannot run on {where}: {problem}; "
            "use plain LoRA on a full-precision base instead"
        )
    return where


@functools.lru_cache(maxsize=8)
def _nf4_roundtrip_problem(device: str) -> str | None:
    """Why bitsandbytes cannot NF4-quantize on ``device``; None when it can (checked once)."""
    bnb = import_bitsandbytes()
    try:
        w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(device)
        packed, state = bnb.functional.quantize_4bit(w, quant_type="nf4")
        back = bnb.functional.dequantize_4bit(packed, state).float()
    except Exception as exc:  # a library without this device's kernels raises anything
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"bitsandbytes {bnb.__version__} failed to quantize there ({first})"
    # NF4 keeps 16 levels per 64-value block: about a tenth of |w| is lost, not more
    if not (back - w).abs().mean() < 0.2 * w.abs().mean():
        return f"bitsandbytes {bnb.__version__} gives wrong 4-bit values there"
    return None


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, imported so that it reaches for nothing on the network.

    On a CPU with AVX512-BF16, bitsandbytes ≥ 0.49 asks the ``kernels`` package, at import,
    for a compiled kernel from the Hugging Face Hub (a download of code). genloop fetches
    nothing at run time, so ``kernels`` is hidden for that one import and bitsandbytes
    uses the kernels it ships (its log line about the fallback is silenced too).
    """
    loaded = sys.modules.get("bitsandbytes")
    if loaded is not None:
        return loaded
    saved = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # type: ignore[assignment]  # `from kernels import` fails
    cpu_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_log.level
    cpu_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as exc:
        raise GenloopError(
            f"4-bit (QLoRA) loading needs bitsandbytes, which cannot be imported ({exc}): "
            "pip install bitsandbytes, or use plain LoRA on a full-precision base instead"
        ) from None
    except Exception as exc:  # a broken native library raises what it likes
        raise GenloopError(f"bitsandbytes is installed but fails to import: {exc}") from None
    finally:
        cpu_log.setLevel(level)
        if saved is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved
    return bitsandbytes


def keep_4bit_trainable(model: nn.Module) -> int:
    """Make ``model``'s 4-bit layers a base to train adapters on; returns how many.

    - On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` in place the
      first time it runs in eval mode without gradients (validation), rounding its block
      scales to bfloat16, and every later call, training included, goes through an
      inference kernel with no backward: the gradient stops at each 4-bit layer and the
      adapters below it learn from a wrong one, silently. That repacking is switched off.
    - A training checkpoint holds the packed weights with their quantization state (block
      scales, code books), which ``load_state_dict`` does not take back. On resume the base
      is quantized again from the same weights, so the state is checked equal and dropped
      (a different one means the base changed since the run started: an error).
    """
    bnb = import_bitsandbytes()
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
            module.register_load_state_dict_pre_hook(_same_4bit_state)
            count += 1
    return count


def _same_4bit_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """``load_state_dict`` hook of a frozen 4-bit layer (see ``keep_4bit_trainable``)."""
    mine: dict[str, Any] = {}
    module._save_to_state_dict(mine, prefix, keep_vars=False)  # weight + quantization state
    for key, value in mine.items():
        given = state_dict.get(key)
        if not key.startswith(prefix + "weight") or given is None:
            continue
        if not torch.equal(given.to(value.device), value):
            raise GenloopError(
                f"the checkpoint's 4-bit {key} differs from the base loaded now: "
                "was model.base_model changed since the run started?"
            )
        if key != prefix + "weight":  # the weight loads as usual; the state is this one
            del state_dict[key]


def _preload_bitsandbytes() -> None:
    """Import bitsandbytes the offline way before peft does (peft imports it if present)."""
    try:
        if importlib.util.find_spec("bitsandbytes") is not None:
            import_bitsandbytes()
    except (GenloopError, ValueError):
        pass  # plain LoRA does not need it; peft does without it or fails on its own


@contextmanager
def _quiet_peft() -> Iterator[None]:
    # peft reads an attribute that transformers 5 deprecates; nothing for users to do.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        yield
