"""What a model version *is*, as the Models view shows it: format, size, measured numbers.

The registry knows a version's family, parent and transform (``config.optimize`` and
``tags.optimize``, written by ``genloop optimize``); this module adds what a person asks
next: the weights' format (``fp32``, ``bf16``, ``int8``, ``int4``, ``onnx``, ``gguf``…),
the artifact's size on disk and the newest measured latency and perplexity.

Everything is cheap per request: the size is the sum of ``stat`` sizes of the files the
manifest lists (no file is read), the format comes from the catalog row or, for a plain
checkpoint, from the dtypes in a safetensors *header* (a few kilobytes), and both are
cached per artifact until its manifest changes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from genloop.errors import IntegrityError
from genloop.evaluate.store import list_evaluations
from genloop.workspace import registry
from genloop.workspace.manifest import MANIFEST, read_manifest
from genloop.workspace.registry import ModelVersionInfo
from genloop.workspace.workspace import Workspace

PERPLEXITY = ("perplexity", "val_ppl", "ppl")  # first found wins, evaluations before training
LATENCY = ("latency_ms_p50", "latency_ms")
DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F64": "fp64", "I8": "int8", "U8": "int8"}
MAX_HEADER = 16 * 1024 * 1024  # a safetensors header larger than this is not read
_CACHE: dict[tuple[str, int], tuple[int | None, int, str | None]] = {}  # (key, mtime) → facts
_CACHE_MAX = 4096


def _header_format(path: Path) -> str | None:
    """The dtype holding most bytes in a safetensors file, read from its header only."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return None
    weight: dict[str, int] = {}
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        start, end = entry.get("data_offsets", (0, 0))
        dtype = str(entry.get("dtype"))
        weight[dtype] = weight.get(dtype, 0) + int(end) - int(start)
    if not weight:
        return None
    top = max(weight, key=lambda d: weight[d])
    return DTYPES.get(top, top.lower())


def _artifact_facts(ws: Workspace, key: str) -> tuple[int | None, int, str | None]:
    """(bytes, files, format from the files) of a published artifact; cached per manifest.

    ``None`` bytes: no readable manifest (a missing or damaged artifact), which loading the
    version reports by name; one broken version does not hide the others.
    """
    root = ws.store.path(key)
    manifest = root / MANIFEST
    try:
        stamp = manifest.stat().st_mtime_ns
    except OSError:
        return None, 0, None
    cached = _CACHE.get((key, stamp))
    if cached is not None:
        return cached
    try:
        names = sorted(read_manifest(root))
    except IntegrityError:
        return None, 0, None
    total = 0
    for name in names:
        try:
            total += (root / name).stat().st_size
        except OSError:
            continue  # a missing file: verification reports it when the model is loaded
    fmt: str | None = None
    if any(n.endswith(".gguf") for n in names):
        fmt = "gguf"
    elif any(n.endswith(".onnx") for n in names):
        fmt = "onnx"
    else:
        weights = [n for n in names if n.endswith(".safetensors")]
        # the main weights first: model.safetensors, then diffusers' unet/ or transformer/
        weights.sort(key=lambda n: (n.count("/"), "unet" not in n, n))
        fmt = _header_format(root / weights[0]) if weights else None
    facts: tuple[int | None, int, str | None] = (total, len(names), fmt)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[(key, stamp)] = facts
    return facts


def version_format(info: ModelVersionInfo, from_files: str | None) -> str | None:
    """``onnx``/``int8``/``int4`` from the transform ``genloop optimize`` recorded, else what
    the files hold (``gguf``, or the dominant safetensors dtype: ``fp32``, ``bf16``…)."""
    spec = info.config.get("optimize")
    if isinstance(spec, dict):
        if spec.get("format") == "onnx":
            return "onnx"
        quant = spec.get("quantization")
        if isinstance(quant, dict) and quant.get("bits") in ("int8", "int4"):
            return str(quant["bits"])
    return from_files


def _first(metrics: dict[str, Any], names: tuple[str, ...]) -> tuple[str, float] | None:
    for name in names:
        value = metrics.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return name, float(value)
    return None


def model_variants(ws: Workspace, name: str | None = None) -> list[dict[str, Any]]:
    """Every version (of ``name``) with its format, size, measured numbers and lineage.

    ``latency_ms`` and ``perplexity`` are the newest stored evaluation values, else the
    version's own registry metrics (training's ``val_ppl``); ``None`` when never measured,
    with ``measured`` saying where each came from.
    """
    infos = registry.list_models(ws, name)
    measured: dict[int, dict[str, tuple[str, float, str]]] = {}
    for record in list_evaluations(ws):  # newest first: the first value of a metric wins
        seen = measured.setdefault(record.model_version_id, {})
        source = f"evaluation {record.id}" + (f" on {record.dataset}" if record.dataset else "")
        for what, names in (("latency_ms", LATENCY), ("perplexity", PERPLEXITY)):
            found = _first(record.metrics, names)
            if what not in seen and found is not None:
                seen[what] = (found[0], found[1], source)
    out = []
    for info in infos:
        size, files, from_files = _artifact_facts(ws, info.artifact)
        numbers = measured.get(info.id, {})
        row: dict[str, Any] = {
            "id": info.id,
            "ref": info.ref,
            "name": info.name,
            "version": info.version,
            "family": info.family,
            "format": version_format(info, from_files),
            "transform": info.tags.get("optimize"),
            "size_bytes": size,
            "files": files,
            "parent": info.parent,
            "aliases": info.aliases,
            "created_at": info.created_at.isoformat(),
            "description": info.description,
            "measured": {},
        }
        for what, names in (("latency_ms", LATENCY), ("perplexity", PERPLEXITY)):
            if what in numbers:
                metric, value, source = numbers[what]
            else:
                own = _first(info.metrics, names)
                if own is None:
                    row[what] = None
                    continue
                metric, value, source = own[0], own[1], "registry metrics"
            row[what] = value
            row["measured"][what] = {"metric": metric, "source": source}
        out.append(row)
    return out
