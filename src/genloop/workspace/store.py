"""The artifact store: one directory per artifact under ``<workspace>/artifacts``.

Keys are ``/``-separated names (``models/coder/3``, ``datasets/stdlib/1``). An artifact is
built in a private temporary directory, its manifest is written last, and then it is
renamed into place in one step, so readers see either nothing or the whole artifact.
Reading verifies the manifest, so a tampered or truncated file is refused by name.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from genloop.errors import ConflictError, NotFoundError
from genloop.workspace.manifest import fsync_dir, verify_manifest, write_manifest
from genloop.workspace.paths import ensure_within, safe_join, split_key

_TMP = ".tmp"


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        """Where ``key`` lives (whether or not it exists); never outside the store."""
        return safe_join(self.root, key)

    def exists(self, key: str) -> bool:
        return self.path(key).is_dir()

    def file(self, key: str, relpath: str) -> Path:
        """A file inside artifact ``key``; ``relpath`` may not leave the artifact."""
        base = self.path(key)
        return ensure_within(base, safe_join(base, relpath, what="file name"), what=relpath)

    @contextmanager
    def writer(self, key: str, *, overwrite: bool = False) -> Iterator[Path]:
        """Yield an empty directory to fill; on success it becomes artifact ``key``.

        On an exception the partial directory is removed and nothing is published.
        """
        final = self.path(key)
        if final.exists() and not overwrite:
            raise ConflictError(f"artifact {key} already exists")
        tmp_root = self.root / _TMP
        tmp_root.mkdir(parents=True, exist_ok=True)
        staging = tmp_root / uuid.uuid4().hex
        staging.mkdir()
        try:
            yield staging
            write_manifest(staging)
            final.parent.mkdir(parents=True, exist_ok=True)
            if overwrite and final.exists():  # move the old one aside first, then drop it
                old = tmp_root / (uuid.uuid4().hex + ".old")
                os.replace(final, old)
                os.replace(staging, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                try:
                    os.replace(staging, final)
                except OSError:
                    # Another writer published the same key since the check above
                    # (rename(2) will not replace a non-empty directory).
                    if final.exists():
                        raise ConflictError(f"artifact {key} already exists") from None
                    raise
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A private working directory on the store's filesystem, removed afterwards.

        Files built here move into an artifact with a cheap rename (see ``writer``).
        """
        tmp_root = self.root / _TMP
        tmp_root.mkdir(parents=True, exist_ok=True)
        path = tmp_root / ("work-" + uuid.uuid4().hex)
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def put_dir(self, key: str, source: Path, *, overwrite: bool = False) -> Path:
        """Copy a directory's files into a new artifact ``key``."""
        with self.writer(key, overwrite=overwrite) as staging:
            for path in sorted(source.rglob("*")):
                if path.name == "MANIFEST.sha256" and path.parent == source:
                    continue
                rel = path.relative_to(source)
                if path.is_symlink():
                    raise ConflictError(f"{path}: symbolic links cannot be stored as artifacts")
                if path.is_dir():
                    (staging / rel).mkdir(parents=True, exist_ok=True)
                elif path.is_file():
                    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, staging / rel)
        return self.path(key)

    def open_verified(self, key: str) -> Path:
        """The artifact's directory after checking every file against its manifest."""
        path = self.path(key)
        if not path.is_dir():
            raise NotFoundError(f"artifact {key} not found in {self.root}")
        verify_manifest(path)
        return path

    def delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir():
            shutil.rmtree(path)

    def keys(self, prefix: str = "") -> list[str]:
        """Keys of the published artifacts under ``prefix`` (those with a manifest)."""
        base = self.path(prefix) if prefix else self.root.resolve()
        if not base.is_dir():
            return []
        root = self.root.resolve()
        found = [
            m.parent.relative_to(root).as_posix()
            for m in base.rglob("MANIFEST.sha256")
            if _TMP not in m.relative_to(root).parts
        ]
        return sorted(k for k in found if split_key(k))
