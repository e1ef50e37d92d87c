"""Import a local Hugging Face checkpoint directory into the catalog as a model version.

``genloop models import PATH`` calls :func:`import_checkpoint`. The whole checkpoint is
checked before anything is written, because a half-imported model is worse than none:
``config.json`` must parse and name an architecture transformers builds offline (a causal
or seq2seq LM, no custom code), every weight file must be a complete safetensors file, a
sharded index must name shards that exist and hold every tensor it lists, and the
tokenizer must be there. Any problem is a :class:`~genloop.errors.GenloopError` naming the
file, and the catalog and the artifact store are left as they were.

Then the files are copied into a scratch directory on the store's filesystem (hashing
each as it is read), pickle weights are converted to safetensors (only with
``trust_pickle``), and the directory becomes the next version of the model through
:func:`genloop.workspace.registry.register_model`, which publishes it in one rename. The
version's ``config["import"]`` records where it came from: the absolute source path, the
SHA-256 of every file copied, license, model card, architecture and parameter count.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.data.tokenizer import TOKENIZER_FILES
from genloop.errors import GenloopError, NotFoundError
from genloop.models.checkpoint_files import Progress
from genloop.models.checkpoint_files import copy_hashing as _copy_hashing
from genloop.models.checkpoint_files import read_json as _read_json
from genloop.models.checkpoint_files import safetensors_header as _header
from genloop.models.pretrained import (
    PICKLE_SUFFIXES,
    SAFETENSORS_INDEX,
    CheckpointInfo,
    inspect_checkpoint,
)
from genloop.workspace.layout import GENLOOP_JSON, SAFETENSORS
from genloop.workspace.manifest import MANIFEST, file_sha256
from genloop.workspace.refs import NAME_RE, check_name
from genloop.workspace.registry import ModelVersionInfo, register_model
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    from genloop.models.import_diffusers import PipelinePlan

MODEL_CARD = "README.md"
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING")
MAX_CARD_CHARS = 32_768  # the card is kept in the catalog row: bounded
REQUIRED_TOKENIZER = "tokenizer.json"
# A slow tokenizer's files, from which transformers can make tokenizer.json.
SLOW_TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# Weights for other frameworks and runtimes: large, and nothing genloop loads.
FOREIGN_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".gguf", ".onnx", ".ot", ".tflite")
PICKLE_INDEX_SUFFIXES = tuple(f"{suffix}.index.json" for suffix in PICKLE_SUFFIXES)


@dataclass(frozen=True)
class ImportPlan:
    """A checked checkpoint: what will be copied, converted and recorded."""

    info: CheckpointInfo
    name: str
    copy: tuple[Path, ...]  # files copied as they are
    skipped: tuple[str, ...]  # files left behind, each with the reason
    parameters: int  # from the safetensors headers; 0 until pickles are converted
    total_bytes: int
    tokenizer_from: tuple[str, ...]  # slow tokenizer files tokenizer.json is made from
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> Path:
        return self.info.path


def default_name(path: Path) -> str:
    """The model name a directory imports as: its name, made a valid model name.

    Characters a name cannot hold become ``-`` (``Qwen2.5 0.5B Instruct`` →
    ``Qwen2.5-0.5B-Instruct``); a name with nothing usable left is an error asking for
    ``--name``. A Hugging Face hub cache snapshot
    (``models--Qwen--Qwen2.5-0.5B/snapshots/<commit>``) is named for its repository.
    """
    path = Path(os.path.abspath(path))  # not resolve(): a snapshot may be reached by a link
    raw = path.name
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        raw = path.parent.parent.name.split("--")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw)
    name = re.sub(r"^[^A-Za-z0-9]+", "", name)[:128].rstrip(".-_")
    if not name or not NAME_RE.fullmatch(name):
        raise GenloopError(
            f"cannot make a model name from the directory name {raw!r}; give one with --name"
        )
    return name


def plan_import(
    path: str | Path, *, name: str | None = None, trust_pickle: bool = False
) -> ImportPlan | PipelinePlan:
    """Check the checkpoint at ``path`` completely, before anything is written.

    A diffusers pipeline folder (``model_index.json``) is checked by
    :func:`genloop.models.import_diffusers.plan_pipeline_import` and becomes a
    ``text_to_image`` version. Raises a GenloopError naming the file at fault;
    :class:`~genloop.models.pretrained.UnsupportedArchitectureError` for a model type
    transformers cannot build as a causal or seq2seq LM.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise NotFoundError(f"checkpoint directory {source} does not exist")
    if not source.is_dir():
        raise GenloopError(f"{source} is a file; give the checkpoint's directory")
    name = check_name(name) if name is not None else default_name(source)
    source = source.resolve()
    if (source / "model_index.json").is_file():
        from genloop.models.import_diffusers import plan_pipeline_import

        return plan_pipeline_import(
            source,
            name=name,
            trust_pickle=trust_pickle,
            license=_license(source),
            model_card=_model_card(source),
        )
    config = _read_json(source / "config.json", missing="so it is not a Hugging Face checkpoint")
    _refuse_custom_code(source, config)
    info = inspect_checkpoint(source)  # UnsupportedArchitectureError for a model type
    if info.weight_format == "pickle" and not trust_pickle:
        names = ", ".join(p.name for p in info.weights)
        raise GenloopError(
            f"{source} holds only pickle-based weights ({names}); pickle files can run code "
            "when opened, so genloop refuses them. If you trust their source, import with "
            "--trust-pickle: they are read with torch.load(weights_only=True) and converted "
            "to safetensors, so the catalog holds safetensors only"
        )
    parameters = _check_safetensors(source, info) if info.weight_format == "safetensors" else 0
    tokenizer_from = _check_tokenizer(source)
    copy, skipped = _files_to_copy(source, info)
    total = sum(p.stat().st_size for p in copy)
    if info.weight_format == "pickle":
        total += sum(p.stat().st_size for p in info.weights)
    lineage = {
        "source": str(source),
        "model_type": info.model_type,
        "architecture": info.architecture,
        "architectures": config.get("architectures"),
        "license": _license(source),
        "model_card": _model_card(source),
    }
    return ImportPlan(info, name, copy, skipped, parameters, total, tokenizer_from, lineage)


def import_checkpoint(
    ws: Workspace,
    path: str | Path,
    *,
    name: str | None = None,
    trust_pickle: bool = False,
    progress: Progress | None = None,
) -> ModelVersionInfo:
    """Check, copy and register the checkpoint at ``path`` as the next version of ``name``.

    ``name`` defaults to :func:`default_name` of the directory. ``progress`` is called
    with each chunk's size in bytes as files are copied (``plan.total_bytes`` in all).
    """
    plan = plan_import(path, name=name, trust_pickle=trust_pickle)
    return register_plan(ws, plan, progress=progress)


def register_plan(
    ws: Workspace,
    plan: ImportPlan | PipelinePlan,
    *,
    progress: Progress | None = None,
    tags: dict[str, Any] | None = None,
) -> ModelVersionInfo:
    """Copy a checked checkpoint into the store and register it (see :func:`plan_import`);
    ``tags`` are added to the version's ``source: import``."""
    if not isinstance(plan, ImportPlan):
        from genloop.models.import_diffusers import register_pipeline_plan

        return register_pipeline_plan(ws, plan, progress=progress, tags=tags)
    info = plan.info
    with ws.store.scratch() as scratch:
        staged = scratch / "model"
        staged.mkdir()
        hashes = {p.name: _copy_hashing(p, staged / p.name, progress) for p in plan.copy}
        parameters = plan.parameters
        converted: list[str] = []
        if info.weight_format == "pickle":
            parameters, written = _convert_pickle(info, staged)
            if progress is not None:
                progress(sum(p.stat().st_size for p in info.weights))
            converted = [p.name for p in info.weights]
            for file in written:
                hashes[file.name] = file_sha256(file)
        if plan.tokenizer_from:
            made = _write_tokenizer_json(info.path, staged)
            hashes[made.name] = file_sha256(made)
        lineage = plan.lineage | {
            "files": dict(sorted(hashes.items())),
            "parameters": parameters,
            "converted_from_pickle": converted,
            "tokenizer_converted_from": list(plan.tokenizer_from),
            "skipped": list(plan.skipped),
        }
        return register_model(
            ws,
            plan.name,
            info.family,
            staged,
            config={"import": lineage},
            tags={"source": "import", **(tags or {})},
            description=f"imported from {plan.lineage['source']}",
            link_files=True,
        )


def _refuse_custom_code(source: Path, config: dict[str, Any]) -> None:
    """A checkpoint that needs its own Python code to load is refused: genloop never runs
    code that came with a model (``trust_remote_code`` stays False)."""
    why = ""
    if "auto_map" in config:
        why = f"{source / 'config.json'} has an auto_map"
    tok_config = source / "tokenizer_config.json"
    if not why and tok_config.is_file():
        try:
            tok = json.loads(tok_config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GenloopError(f"{tok_config} is not valid JSON: {exc}") from None
        if isinstance(tok, dict) and "auto_map" in tok:
            why = f"{tok_config} has an auto_map"
    code = sorted(p.name for p in source.glob("*.py"))
    if not why and code:
        why = f"it ships Python code ({', '.join(code)})"
    if why:
        raise GenloopError(
            f"{source} needs custom code to load: {why}. genloop never runs code that comes "
            "with a checkpoint (trust_remote_code); import a checkpoint of an architecture "
            "transformers has built in"
        )


def _check_safetensors(source: Path, info: CheckpointInfo) -> int:
    """Every shard complete, every tensor the index lists in the shard it names; the
    parameter count (elements of all tensors), read from the headers alone."""
    from genloop.security.safe_load import check_safetensors

    shards = [p for p in info.weights if p.suffix == ".safetensors"]
    check_safetensors(shards)  # refuses a pickle in disguise or a truncated file, by name
    headers = {p.name: _header(p) for p in shards}
    index = next((p for p in info.weights if p.name.endswith(".index.json")), None)
    if index is not None:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        for tensor, shard in sorted(weight_map.items()):
            if tensor not in headers.get(Path(shard).name, {}):
                raise GenloopError(
                    f"{index} says tensor {tensor!r} is in {shard}, but {source / shard} "
                    "does not hold it: the shard is corrupt or from another checkpoint"
                )
    _check_weights_fit(info, {name for header in headers.values() for name in header})
    total = 0
    for header in headers.values():
        for entry in header.values():
            count = 1
            for dim in entry.get("shape", []):
                count *= int(dim)
            total += count
    return total


def _check_weights_fit(info: CheckpointInfo, names: set[str]) -> None:
    """Refuse weights that are not this architecture's: a config whose ``model_type`` does
    not match its weights would load with most tensors left at random initialisation
    (transformers only warns), and then be served as if it were the model.

    The architecture is built on the meta device (no memory, no weights) for the names of
    the tensors it expects. Tied weights are stored once and may be absent; a checkpoint of
    the bare base model lacks the head's prefix. transformers also renames some tensors as
    it loads (older names; fused experts in mixture-of-experts models), so only a gross
    mismatch (most expected tensors absent) is refused. Quantized checkpoints
    (``quantization_config``) store other tensors and are not compared.
    """
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(
        info.path, local_files_only=True, trust_remote_code=False
    )
    if getattr(config, "quantization_config", None) is not None:
        return
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # its advice is for model authors
    try:
        with torch.device("meta"):
            model = getattr(transformers, info.architecture)(config)
    finally:
        hf_logging.set_verbosity(verbosity)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    expected = [k for k in model.state_dict() if k not in tied]
    missing = [k for k in expected if k not in names and k.removeprefix(prefix) not in names]
    if expected and len(missing) * 2 > len(expected):
        shown = ", ".join(missing[:3])
        raise GenloopError(
            f"{info.path}: the weights do not fit {info.architecture}, the architecture "
            f"config.json names (model_type {info.model_type!r}): {len(missing)} of its "
            f"{len(expected)} tensors are in no weight file (e.g. {shown}). The config and "
            "the weights come from different models"
        )


def _check_tokenizer(source: Path) -> tuple[str, ...]:
    """genloop tokenizes with the fast tokenizer file, ``tokenizer.json``.

    A checkpoint that has only the files of a slow tokenizer (GPT-2's ``vocab.json`` and
    ``merges.txt``, a SentencePiece model) gets one made from them by transformers' own
    conversion; the files it is made from are returned (none: nothing to convert).
    """
    if (source / REQUIRED_TOKENIZER).is_file():
        try:
            json.loads((source / REQUIRED_TOKENIZER).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GenloopError(f"{source / REQUIRED_TOKENIZER} is not valid JSON: {exc}") from None
        return ()
    present = tuple(n for n in TOKENIZER_FILES if (source / n).is_file())
    slow = tuple(n for n in present if n in SLOW_TOKENIZER_FILES)
    why = ""
    if slow:
        try:
            _fast_tokenizer(source)
            return slow
        except Exception as exc:  # transformers raises many kinds; the message says which
            why = f"; making it from {', '.join(slow)} failed ({str(exc).strip()[:200]})"
    found = f" (it has {', '.join(present)})" if present else ""
    raise GenloopError(
        f"{source} has no {REQUIRED_TOKENIZER}{found}{why}: genloop needs the fast tokenizer "
        f"file {REQUIRED_TOKENIZER}, with tokenizer_config.json beside it for the special "
        "tokens and chat template. Write them with transformers: "
        "AutoTokenizer.from_pretrained(PATH).save_pretrained(PATH)"
    )


def _fast_tokenizer(source: Path) -> Any:
    """The checkpoint's tokenizer, converted to a fast one by transformers (no remote code)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        source, local_files_only=True, trust_remote_code=False
    )
    if not getattr(tokenizer, "is_fast", False):
        raise GenloopError(f"transformers has no fast version of {type(tokenizer).__name__}")
    return tokenizer


def _write_tokenizer_json(source: Path, staged: Path) -> Path:
    """Write ``tokenizer.json`` made from the slow tokenizer's files into ``staged``; the
    checkpoint's own tokenizer files are copied as they are."""
    out = staged.parent / "tokenizer"
    _fast_tokenizer(source).save_pretrained(out)
    target = staged / REQUIRED_TOKENIZER
    shutil.move(out / REQUIRED_TOKENIZER, target)
    return target


def _files_to_copy(source: Path, info: CheckpointInfo) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    """Top-level files, less pickles, other frameworks' weights, hidden files and folders."""
    copy: list[Path] = []
    skipped: list[str] = []
    for p in sorted(source.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            skipped.append(f"{p.name}/ (folder)")
        elif not p.is_file():
            skipped.append(f"{p.name} (not a regular file)")
        elif p.suffix in PICKLE_SUFFIXES:
            if info.weight_format == "safetensors":  # the safetensors copy is the one used
                skipped.append(f"{p.name} (pickle; the safetensors weights are imported)")
        elif p.suffix in FOREIGN_WEIGHT_SUFFIXES:
            skipped.append(f"{p.name} (weights for another framework)")
        elif p.name in (GENLOOP_JSON, MANIFEST):
            skipped.append(f"{p.name} (written by genloop for the new version)")
        elif info.weight_format == "pickle" and p.name in (SAFETENSORS, SAFETENSORS_INDEX):
            skipped.append(f"{p.name} (replaced by the converted weights)")
        elif p.name.endswith(PICKLE_INDEX_SUFFIXES):  # names pickle shards, never imported
            skipped.append(f"{p.name} (index of pickle weights)")
        else:
            copy.append(p)
    return tuple(copy), tuple(skipped)


def _convert_pickle(info: CheckpointInfo, staged: Path) -> tuple[int, list[Path]]:
    """Read pickle weights (``torch.load(weights_only=True)``), write them as safetensors.

    The model is built and saved by transformers, which knows each architecture's tied
    weights (a plain ``save_file`` of the state dict refuses shared tensors). Only the
    weight files are taken from its output: the source's own config is kept as it is.
    """
    import transformers
    from transformers.utils import logging as hf_logging

    from genloop.models.pretrained import read_pickle_weights

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    state = read_pickle_weights(info.weights)
    _check_weights_fit(info, set(state))
    config = transformers.AutoConfig.from_pretrained(
        info.path, local_files_only=True, trust_remote_code=False
    )
    model = getattr(transformers, info.architecture).from_pretrained(
        None, config=config, state_dict=state, dtype="auto", trust_remote_code=False
    )
    parameters = sum(p.numel() for p in model.parameters())
    out = staged.parent / "converted"
    model.save_pretrained(out, max_shard_size="5GB")
    written = []
    for file in sorted(out.iterdir()):
        if file.suffix == ".safetensors" or file.name == SAFETENSORS_INDEX:
            target = staged / file.name
            shutil.move(file, target)
            written.append(target)
    if not written:  # a guard on transformers' behaviour, which writes safetensors
        raise GenloopError(f"converting {info.path}'s weights wrote no safetensors file")
    return parameters, written


def _license(source: Path) -> str | None:
    """The model card's ``license:`` front matter, else a LICENSE file's SPDX id or first
    line; None when neither says."""
    card = source / MODEL_CARD
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")[:MAX_CARD_CHARS]
        front = re.match(r"---\s*\n(.*?)\n---", text, re.DOTALL)
        if front:
            found = re.search(r"^license:\s*(.+?)\s*$", front.group(1), re.MULTILINE)
            if found:
                return found.group(1).strip("'\"")[:200]
    for name in LICENSE_FILES:
        path = source / name
        if path.is_file():
            head = path.read_text(encoding="utf-8", errors="replace")[:MAX_CARD_CHARS]
            spdx = re.search(r"SPDX-License-Identifier:\s*(\S+)", head)
            if spdx:
                return spdx.group(1)[:200]
            first = next((line.strip() for line in head.splitlines() if line.strip()), "")
            return first[:200] or None
    return None


def _model_card(source: Path) -> str | None:
    """README.md's text, cut to :data:`MAX_CARD_CHARS` (the full file is in the artifact)."""
    card = source / MODEL_CARD
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    return text if len(text) <= MAX_CARD_CHARS else text[:MAX_CARD_CHARS] + "\n[…cut]"
