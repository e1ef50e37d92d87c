"""The one place genloop reads weight files: safetensors, and pickle only when told to.

A pickle-based file (PyTorch's ``.bin``/``.pt``/``.pth``/``.ckpt``, plain ``.pkl``) can run
any code the moment it is opened. genloop's own artifacts are safetensors only, so a
pickle is refused with a message that says why, unless the user passes ``--trust-pickle``
(``trust_pickle=True``); even then it is read with ``torch.load(weights_only=True)``, which
unpickles tensors and plain containers only and refuses anything that would call code.

A file is judged by its bytes, not its name: a "safetensors" file must parse as one (an
8-byte little-endian header length, then a JSON header), and anything that looks like a
pickle (protocol 2+ opcode, or a zip archive holding one, which is what ``torch.save``
writes) is treated as a pickle whatever it is called.

Whole checkpoint directories (config, tokenizer, weights) are read by
:func:`genloop.models.pretrained.load_pretrained`, which finds the weight files, passes
``use_safetensors=True`` to transformers and reads pickles through :func:`load_state_dict`.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from genloop.errors import GenloopError, NotFoundError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header

FileKind = Literal["safetensors", "pickle", "unknown"]


class UnsafeWeightsError(GenloopError):
    """A weight file that could run code when opened, and no permission to open it."""


def sniff(path: str | Path) -> FileKind:
    """What a weight file holds, judged by its first bytes (and its name for pickles)."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(16)
        size = path.stat().st_size
    if len(head) >= 10 and not head.startswith(b"PK"):
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= min(MAX_HEADER_BYTES, size - 8) and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"  # the PROTO opcode
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                if any(n.endswith((".pkl", "/data.pkl")) for n in z.namelist()):
                    return "pickle"  # torch.save's zip format
        except zipfile.BadZipFile:
            pass
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "pickle"  # protocol 0/1 pickles have no magic; the name is enough to refuse
    return "unknown"


def refuse_pickle(path: Path) -> UnsafeWeightsError:
    return UnsafeWeightsError(
        f"{path} is a pickle-based file, which can run code when opened; genloop loads "
        "weights from safetensors only. Convert it to safetensors, or pass --trust-pickle "
        "(trust_pickle=True) if you trust its source: it is then read with "
        "torch.load(weights_only=True)"
    )


def load_safetensors(path: str | Path, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; anything else is refused without opening it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"weight file {path} does not exist")
    check_safetensors([path])
    try:
        return load_file(path, device=device)
    except (SafetensorError, json.JSONDecodeError, OSError, ValueError) as exc:
        raise GenloopError(f"{path} is not a valid safetensors file: {exc}") from None


def check_safetensors(paths: Iterable[Path]) -> None:
    """Refuse, by name, any of ``paths`` that is not really a safetensors file (a pickle
    renamed ``model.safetensors``, a truncated download), before a library opens it."""
    for path in paths:
        kind = sniff(path)
        if kind == "pickle":
            raise refuse_pickle(path)
        if kind != "safetensors":
            raise GenloopError(f"{path} is not a safetensors file (its header does not parse)")
        _check_extent(path)


def _check_extent(path: Path) -> None:
    """The header's tensors must end exactly where the file does (not truncated)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(n))
            ends = [
                int(v["data_offsets"][1])
                for k, v in header.items()
                if k != "__metadata__" and isinstance(v, dict)
            ]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise GenloopError(f"{path} is not a valid safetensors file (bad header)") from None
    if max(ends, default=0) != size - 8 - n:
        raise GenloopError(
            f"{path} is truncated or corrupt: its header describes {max(ends, default=0):,} "
            f"bytes of tensors, the file holds {size - 8 - n:,}"
        )


def load_state_dict(
    path: str | Path, *, trust_pickle: bool = False, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` mapping from a weight file.

    Safetensors always; a pickle only with ``trust_pickle``, and then through
    ``torch.load(weights_only=True)``, which refuses anything but tensors and plain data.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"weight file {path} does not exist")
    kind = sniff(path)
    if kind == "safetensors":
        return load_safetensors(path, device=device)
    if kind == "unknown":
        raise GenloopError(f"{path} is neither a safetensors file nor a PyTorch checkpoint")
    if not trust_pickle:
        raise refuse_pickle(path)
    try:
        loaded = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeWeightsError(
            f"{path}: refused by torch.load(weights_only=True) ({first}); it holds more than "
            "plain tensors"
        ) from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise GenloopError(f"{path} does not hold a flat mapping of names to tensors")
    return loaded


def check_weights_dir(path: str | Path, *, trust_pickle: bool = False) -> list[Path]:
    """The pickle-based files in a directory of weights; refused unless ``trust_pickle``.

    For loaders that hand a directory to a library (transformers, diffusers, peft): call
    this first, then load with ``use_safetensors=True``.
    """
    root = Path(path)
    pickles = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and p.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles and not trust_pickle:
        raise refuse_pickle(pickles[0])
    return pickles
