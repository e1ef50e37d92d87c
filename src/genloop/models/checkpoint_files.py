"""Small file helpers shared by the checkpoint and pipeline imports: bounded JSON configs,
safetensors headers, and copying while hashing."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genloop.errors import GenloopError

MAX_CONFIG_BYTES = 16 * 2**20  # config.json is a few kilobytes; anything near this is not one
CHUNK = 8 * 2**20

Progress = Callable[[int], None]  # called with the bytes just copied


def read_json(path: Path, *, missing: str) -> dict[str, Any]:
    if not path.is_file():
        raise GenloopError(f"{path} is missing, {missing}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise GenloopError(f"{path} is over {MAX_CONFIG_BYTES // 2**20} MiB: not a model config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GenloopError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise GenloopError(f"{path} does not hold a JSON object")
    return data


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors header (already checked to parse)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def copy_hashing(src: Path, dst: Path, progress: Progress | None) -> str:
    """Copy ``src`` to ``dst``, returning the SHA-256 of the bytes copied."""
    digest = hashlib.sha256()
    try:
        with src.open("rb") as fin, dst.open("wb") as fout:
            while chunk := fin.read(CHUNK):
                digest.update(chunk)
                fout.write(chunk)
                if progress is not None:
                    progress(len(chunk))
    except OSError as exc:  # unreadable source, full disk: say which file, not a traceback
        raise GenloopError(f"copying {src} into the workspace failed: {exc.strerror}") from None
    return digest.hexdigest()
