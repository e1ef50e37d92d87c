"""Local Hugging Face checkpoint directories: inspect, load and write them, safely.

A checkpoint directory holds ``config.json``, weights and usually tokenizer files. genloop
reads weights from safetensors only: a pickle-based file (``pytorch_model.bin``, ``*.pt``,
``*.pkl``, …) can run arbitrary code when it is opened, so a directory that has nothing
else is refused unless the caller passes ``trust_pickle=True``, and even then it is read
with ``torch.load(weights_only=True)``. Nothing is ever downloaded (``local_files_only``),
and no code from a checkpoint is run (``trust_remote_code=False``).

A variant made by ``genloop optimize`` records its transform under ``"optimize"`` in
``genloop.json`` (:func:`variant_format` reads it): pruned and distilled ones are plain
checkpoints, a quantized one is rebuilt by :func:`genloop.models.quantized.restore`, and an
ONNX one (a graph for onnxruntime, no PyTorch weights) is refused here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from genloop.data.tokenizer import TOKENIZER_FILES
from genloop.errors import ConflictError, GenloopError, NotFoundError
from genloop.workspace.layout import GENLOOP_JSON, ONNX_FILE, SAFETENSORS

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TextFamily = Literal["causal_lm", "seq2seq"]
CheckpointFamily = Literal["causal_lm", "seq2seq", "clip", "masked_lm"]  # clip.py, masked_lm.py
WeightFormat = Literal["safetensors", "pickle"]
VariantFormat = Literal["onnx", "quantized", "torch"]

OPTIMIZE_KEY = "optimize"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class UnsupportedArchitectureError(GenloopError):
    """A checkpoint whose ``model_type`` is not a causal, seq2seq or masked LM that this
    version of transformers builds offline (``model_type`` None: the config names none)."""

    def __init__(self, message: str, model_type: str | None) -> None:
        super().__init__(message)
        self.model_type = model_type


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint directory holds, as far as loading it is concerned."""

    path: Path
    model_type: str
    family: CheckpointFamily
    architecture: str  # the transformers class that loads it, e.g. "LlamaForCausalLM"
    weight_format: WeightFormat
    weights: tuple[Path, ...]
    tokenizer_files: tuple[str, ...]


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Check that ``path`` is a loadable checkpoint directory and say what it holds.

    Raises a GenloopError naming the problem: a missing directory or ``config.json``, a
    model type transformers cannot build offline, or no weight files.
    """
    path = Path(path)
    if not path.is_dir():
        raise NotFoundError(f"checkpoint directory {path} does not exist")
    config = _read_config(path)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UnsupportedArchitectureError(
            f"{path / 'config.json'}: no model_type, so it is not a transformers config", None
        )
    family, architecture = _family_of(model_type, config, path)
    weight_format, weights = _weight_files(path, config)
    tokenizer = tuple(name for name in TOKENIZER_FILES if (path / name).is_file())
    return CheckpointInfo(path, model_type, family, architecture, weight_format, weights, tokenizer)


def load_pretrained(
    path: str | Path,
    *,
    family: CheckpointFamily | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    trust_pickle: bool = False,
    load_in_4bit: bool = False,
) -> PreTrainedModel:
    """Load the model in a local checkpoint directory, in eval mode, for inference or tuning.

    ``family`` (when given) must match the checkpoint; ``dtype`` None keeps the stored one;
    ``load_in_4bit`` loads the base in NF4 for QLoRA: bitsandbytes on a CUDA GPU or the
    CPU; its linear layers become ``bitsandbytes.nn.Linear4bit`` (a clear error where it
    cannot run on ``device``).
    """
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no tqdm in our output
    # a quantized variant (genloop optimize) rebuilds its modules; an ONNX one is refused
    optimized = _load_optimized(Path(path), device=device, dtype=_dtype(dtype))
    if optimized is not None:
        return optimized
    info = inspect_checkpoint(path)
    if family is not None and info.family != family:
        raise GenloopError(
            f"{info.path} holds a {info.model_type} model, which is family {info.family}, "
            f"not {family}"
        )
    model_cls = getattr(transformers, info.architecture)
    torch_dtype = _dtype(dtype)
    kwargs: dict[str, Any] = {
        # attention: transformers' default, SDPA wherever the architecture supports it
        "dtype": "auto" if torch_dtype is None else torch_dtype,
        "local_files_only": True,
        "trust_remote_code": False,
    }
    if load_in_4bit:
        from genloop.models.lora import qlora_quantization_config

        kwargs["quantization_config"] = qlora_quantization_config(device)
        kwargs["device_map"] = {"": str(device)}
    if info.weight_format == "pickle":
        if not trust_pickle:
            names = ", ".join(p.name for p in info.weights)
            raise GenloopError(
                f"{info.path} holds only pickle-based weights ({names}); pickle files can run "
                "code when opened, so they are refused unless trust_pickle=True is given "
                "(--trust-pickle), and then read with torch.load(weights_only=True). "
                "Better: convert them to safetensors."
            )
        config = transformers.AutoConfig.from_pretrained(
            info.path, local_files_only=True, trust_remote_code=False
        )
        state_dict = read_pickle_weights(info.weights)
        loaded = model_cls.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    else:
        from genloop.security.safe_load import check_safetensors

        check_safetensors(p for p in info.weights if p.suffix == ".safetensors")
        loaded = model_cls.from_pretrained(info.path, use_safetensors=True, **kwargs)
    if load_in_4bit:  # placed by device_map; kept in the layout that gradients go through
        from genloop.models.lora import keep_4bit_trainable

        keep_4bit_trainable(loaded)
    else:
        loaded.to(device)
    model: PreTrainedModel = loaded.eval()
    return model


def optimize_meta(model_dir: Path) -> dict[str, Any] | None:
    """The ``optimize`` entry of ``model_dir/genloop.json``; None for a plain checkpoint.

    At the top level in a freshly written directory, under ``"config"`` once the registry
    has stored it (``register_model`` rewrites the file with the version's metadata).
    """
    path = Path(model_dir) / GENLOOP_JSON
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GenloopError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        return None
    found = meta.get(OPTIMIZE_KEY)
    if found is None and isinstance(meta.get("config"), dict):
        found = meta["config"].get(OPTIMIZE_KEY)
    return found if isinstance(found, dict) else None


def variant_format(model_dir: Path) -> VariantFormat:
    """``onnx``, ``quantized`` or ``torch`` (a plain Hugging Face checkpoint)."""
    meta = optimize_meta(model_dir) or {}
    if meta.get("format") == "onnx" or (Path(model_dir) / ONNX_FILE).is_file():
        return "onnx"
    if isinstance(meta.get("quantization"), dict):
        return "quantized"
    return "torch"


def _load_optimized(
    model_dir: Path, *, device: str | torch.device, dtype: torch.dtype | None
) -> PreTrainedModel | None:
    """The model of a quantized variant; None for a plain checkpoint (load it as usual).

    An ONNX variant is refused with a pointer to the onnxruntime loader.
    """
    kind = variant_format(model_dir)
    if kind == "onnx":
        raise GenloopError(
            f"{model_dir} is an ONNX variant: it runs in onnxruntime, not in PyTorch, so it "
            "cannot be trained or fine-tuned (genloop serve, generate and eval run it; from "
            "Python, genloop.optimize.onnx_model.load_onnx_model)"
        )
    if kind == "torch":
        return None
    from genloop.models.quantized import restore

    meta = optimize_meta(model_dir)
    assert meta is not None
    return restore(model_dir, meta["quantization"], device=device, dtype=dtype)


def save_hf_dir(
    model: nn.Module,
    out_dir: str | Path,
    *,
    family: CheckpointFamily,
    tokenizer_dir: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory ``out_dir`` (new or empty).

    Files: ``config.json``, ``model.safetensors`` (shards and an index past 5 GB),
    ``generation_config.json``, the tokenizer files found in ``tokenizer_dir``, and
    ``genloop.json`` holding ``{"family": family, **extra}``.
    """
    from transformers import PreTrainedModel

    out = Path(out_dir)
    if getattr(model, "peft_config", None) is not None:
        raise GenloopError(
            "this model carries LoRA adapters; merge them first (genloop.models.lora.merge_lora) "
            "or save the adapters alone (genloop.models.lora.save_adapter)"
        )
    if not isinstance(model, PreTrainedModel):
        raise GenloopError(
            f"expected a transformers model, got {type(model).__name__}; unwrap torch.compile "
            "(._orig_mod) or DDP/FSDP (.module) wrappers before saving"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConflictError(f"{out} already exists and is not an empty directory")
    tokenizer_files = _tokenizer_files(Path(tokenizer_dir)) if tokenizer_dir is not None else []
    meta = {"family": family, **(extra or {})}
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    except TypeError as exc:
        raise GenloopError(f"extra metadata must be JSON-serializable: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # genloop shows its own progress; no tqdm in our output
    model.save_pretrained(out, max_shard_size="5GB")  # safetensors only in transformers ≥ 5
    for source in tokenizer_files:
        shutil.copyfile(source, out / source.name)
    (out / GENLOOP_JSON).write_text(meta_text)
    pickles = [p.name for p in out.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:  # a guard on our own contract, should transformers' behaviour change
        raise GenloopError(f"saving wrote pickle-based files {pickles}; refusing to continue")
    return out


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise GenloopError(f"{path} has no config.json, so it is not a Hugging Face checkpoint")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GenloopError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise GenloopError(f"{config_path} does not hold a JSON object")
    return config


def _family_of(
    model_type: str, config: Mapping[str, Any], path: Path
) -> tuple[CheckpointFamily, str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as SEQ2SEQ,
    )

    if model_type == "clip":  # the dual encoder (models/clip.py)
        return "clip", "CLIPModel"
    masked = _masked_lm_architecture(model_type, config, path)
    if masked is not None:  # a BERT-class encoder (models/masked_lm.py)
        return "masked_lm", masked
    if model_type in SEQ2SEQ and (model_type not in CAUSAL or config.get("is_encoder_decoder")):
        return "seq2seq", str(SEQ2SEQ[model_type])
    if model_type in CAUSAL:
        return "causal_lm", str(CAUSAL[model_type])
    custom = (
        " (its config asks for custom code, which genloop never runs)"
        if "auto_map" in config
        else ""
    )
    raise UnsupportedArchitectureError(
        f"{path}: model_type {model_type!r} is not a causal, seq2seq or masked language model "
        f"this version of transformers can build{custom}; supported include llama, gpt2, "
        "mistral, qwen2, phi3, gemma, t5, bart, bert, modernbert",
        model_type,
    )


def _masked_lm_architecture(model_type: str, config: Mapping[str, Any], path: Path) -> str | None:
    """The class of an encoder checkpoint (BERT, ModernBERT, RoBERTa, …) under a head the
    masked_lm family trains; None for any other checkpoint.

    An encoder type is one transformers builds a masked LM of (and not an encoder-decoder
    such as BART). Its ``architectures`` say the head: ``…ForMaskedLM``,
    ``…ForSequenceClassification``, ``…ForTokenClassification`` or the bare model keep
    theirs; ``…ForPreTraining`` (MLM + next-sentence heads) loads as the masked LM, whose
    weights it holds; a decoder head (``BertLMHeadModel``, or ``is_decoder`` without
    architectures) stays a causal LM. Any other head is refused by name.
    """
    from transformers.models.auto import modeling_auto as auto

    masked = auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if model_type not in masked or model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return None
    names = config.get("architectures")
    first = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    if first is None:
        return None if config.get("is_decoder") else str(masked[model_type])
    if first == auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type):
        return None
    heads = {
        str(mapping[model_type])
        for mapping in (
            masked,
            auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
            auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
            auto.MODEL_MAPPING_NAMES,
        )
        if model_type in mapping
    }
    if first in heads:
        return first
    if first.endswith("ForPreTraining"):
        return str(masked[model_type])
    raise UnsupportedArchitectureError(
        f"{path}: {first} is a {model_type} head genloop does not train; the masked_lm "
        f"family takes {', '.join(sorted(heads))}",
        model_type,
    )


def _weight_files(path: Path, config: Mapping[str, Any]) -> tuple[WeightFormat, tuple[Path, ...]]:
    explicit = config.get("transformers_weights")
    if explicit is not None:
        # transformers would load this file whatever its kind; allow safetensors only.
        if not isinstance(explicit, str) or not explicit.endswith(
            (".safetensors", ".safetensors.index.json")
        ):
            raise GenloopError(
                f"{path / 'config.json'}: transformers_weights={explicit!r} is not a safetensors "
                "file; genloop loads weights from safetensors only"
            )
        target = _member(path, explicit)
        if target is None:
            raise GenloopError(f"{path}: transformers_weights={explicit!r} is not a file in it")
        index = explicit if explicit.endswith(".index.json") else None
        return "safetensors", _shards(path, index) if index else (target,)
    if (path / SAFETENSORS).is_file():
        return "safetensors", (path / SAFETENSORS,)
    if (path / SAFETENSORS_INDEX).is_file():
        return "safetensors", _shards(path, SAFETENSORS_INDEX)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        return "pickle", tuple(pickles)
    others = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f" (found {', '.join(others)}, but not under the standard names)" if others else ""
    raise GenloopError(f"{path} has no {SAFETENSORS} or {SAFETENSORS_INDEX}{hint}")


def _shards(path: Path, index_name: str) -> tuple[Path, ...]:
    index_path = path / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise GenloopError(f"{index_path} is not a valid weight index: {exc}") from None
    shards = []
    for name in names:
        shard = _member(path, str(name))
        if shard is None:
            raise GenloopError(f"{index_path} lists {name!r}, which is not a file in {path}")
        if shard.suffix != ".safetensors":
            raise GenloopError(f"{index_path} lists {name!r}, which is not a safetensors file")
        shards.append(shard)
    return (index_path, *shards)


def _member(path: Path, name: str) -> Path | None:
    """``path / name`` when ``name`` is a file in the checkpoint directory ``path``, else None.

    The name is judged as written: it may not leave the directory (no absolute path, no
    ``..``). The file itself may be a symbolic link, as in a Hugging Face hub cache
    snapshot, where every file links to a blob outside the snapshot's folder.
    """
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        return None
    member = path / relative
    return member if member.is_file() else None


def read_pickle_weights(files: tuple[Path, ...]) -> dict[str, torch.Tensor]:
    """Merge the state dicts in ``files``, read with ``torch.load(weights_only=True)``."""
    hf_names = [p for p in files if p.name.startswith("pytorch_model")]
    chosen = hf_names or list(files)
    if len(chosen) > 1 and not hf_names:
        names = ", ".join(p.name for p in chosen)
        raise GenloopError(f"several pickle files ({names}); cannot tell which holds the weights")
    from genloop.security.safe_load import load_state_dict

    state: dict[str, torch.Tensor] = {}
    for file in chosen:  # torch.load(weights_only=True), in the one place that loads weights
        state.update(load_state_dict(file, trust_pickle=True))
    return state


def _tokenizer_files(tokenizer_dir: Path) -> list[Path]:
    if not tokenizer_dir.is_dir():
        raise NotFoundError(f"tokenizer directory {tokenizer_dir} does not exist")
    found = []
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name
        if source.is_symlink():
            raise GenloopError(f"{source} is a symbolic link; copy the file itself")
        if source.is_file():
            found.append(source)
    if not found:
        raise GenloopError(
            f"{tokenizer_dir} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})"
        )
    return found


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise GenloopError(f"unknown dtype {dtype!r} (dtypes: auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def cache_argument(model: Any) -> str:
    """The keyword a model's forward takes its KV cache under: ``cache`` since transformers
    renamed ``past_key_values`` (the old name goes in 5.40). Caches are updated in place,
    so callers keep the object they passed and need not read it back from the output."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
