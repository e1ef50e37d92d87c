"""``MANIFEST.sha256``: the list of an artifact's files and their SHA-256, written last.

The format is the one ``sha256sum`` prints (``<hex>  <relative path>``), so a user can
check an artifact with ``sha256sum -c MANIFEST.sha256`` too. A directory is only trusted
when its manifest exists, lists every regular file in it, and every digest matches.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from genloop.errors import IntegrityError

MANIFEST = "MANIFEST.sha256"


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(directory: Path) -> list[Path]:
    """Every entry under ``directory`` except the manifest, sorted; symlinks are refused."""
    out = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_symlink():
            raise IntegrityError(
                f"{directory}: {rel} is a symbolic link; artifacts hold files only"
            )
        if path.is_file() and rel.as_posix() != MANIFEST:
            out.append(path)
    return out


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> Path:
    """Hash every file under ``directory`` and write the manifest last, durably."""
    lines = []
    for p in _files(directory):
        rel = p.relative_to(directory).as_posix()
        if "\n" in rel:  # one line per file: a newline in a name would corrupt the list
            raise IntegrityError(f"{p}: file names in an artifact may not contain a newline")
        # surrogateescape: a name that is not UTF-8 is written back as the same bytes.
        lines.append(f"{file_sha256(p)}  {rel}\n".encode("utf-8", "surrogateescape"))
    target = directory / MANIFEST
    tmp = directory / (MANIFEST + ".tmp")
    with tmp.open("wb") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(directory)
    return target


def read_manifest(directory: Path) -> dict[str, str]:
    path = directory / MANIFEST
    if not path.is_file():
        raise IntegrityError(
            f"{directory}: no {MANIFEST}; the artifact is incomplete or not genloop's"
        )
    entries: dict[str, str] = {}
    # Split on '\n' only: str.splitlines() and text mode would also break names that
    # contain '\r', '\x85' or '\u2028', which are legal in file names.
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    for n, line in enumerate(text.removesuffix("\n").split("\n") if text else [], 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel:
            raise IntegrityError(f"{path}: line {n} is malformed")
        entries[rel] = digest
    return entries


def verify_manifest(directory: Path) -> dict[str, str]:
    """Check every file against the manifest; raise naming the first file that differs."""
    expected = read_manifest(directory)
    present = {p.relative_to(directory).as_posix(): p for p in _files(directory)}
    for rel in expected:
        if rel not in present:
            raise IntegrityError(f"{directory / rel}: listed in {MANIFEST} but missing")
    for rel, path in present.items():
        if rel not in expected:
            raise IntegrityError(f"{path}: not listed in {MANIFEST} (added after it was written)")
        if file_sha256(path) != expected[rel]:
            raise IntegrityError(f"{path}: content does not match {MANIFEST} (tampered or corrupt)")
    return expected
