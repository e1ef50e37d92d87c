"""Corpora present on every machine, nothing downloaded.

- ``python-stdlib``: the running interpreter's standard-library ``.py`` sources, test
  packages and site-packages left out; ids are paths like ``json/decoder.py``.
- ``python-docs``: the docstrings of the same files (module, class, function; read with
  ``ast``, nothing imported) and the pydoc topics (``pydoc_data.topics``).
- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1797 images, labels 0–9),
  each as PNG bytes in ``data`` scaled from 0–16 to 0–255.
"""

from __future__ import annotations

import ast
import hashlib
import io
import itertools
import json
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from genloop.data.records import Quarantined, Record
from genloop.data.sources import local
from genloop.data.sources.local import LocalFile
from genloop.errors import GenloopError

NAMES = ("python-stdlib", "python-docs", "digits")
# Folder names never entered: test packages (test/, tests/, idlelib/idle_test, lib2to3/tests,
# */test/*), installed third-party packages, bytecode and the build configuration.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
_SKIP_DIRS |= {"__pycache__", "lib-dynload"}

Item = Record | Quarantined


class BuiltinSource:
    def __init__(self, name: str, max_files: int | None = None) -> None:
        if name not in NAMES:
            raise GenloopError(f"builtin source: unknown name {name!r}; choose from {NAMES}")
        if max_files is not None and max_files < 1:
            raise GenloopError(f"builtin source: max_files must be at least 1, not {max_files}")
        self.name = name
        self.kind = f"builtin:{name}"
        self.max_files = max_files

    def records(self) -> Iterator[Item]:
        if self.name == "python-stdlib":
            return self._stdlib()
        if self.name == "python-docs":
            return self._docs()
        return self._digits()

    def fingerprint(self) -> str:
        if self.name == "digits":
            return _digits_fingerprint()
        return local.fingerprint(
            {"kind": self.kind, "python": _python(), "max_files": self.max_files},
            self._files(),
        )

    def describe(self) -> dict[str, Any]:
        if self.name == "digits":
            import sklearn

            return {"kind": self.kind, "name": self.name, "scikit-learn": sklearn.__version__}
        return {
            "kind": self.kind,
            "name": self.name,
            "python": _python(),
            "path": str(_stdlib_root()),
            "files": sum(1 for _ in self._files()),
        }

    def _files(self) -> Iterator[LocalFile]:
        files = _stdlib_files()
        return files if self.max_files is None else itertools.islice(files, self.max_files)

    # -- python-stdlib ---------------------------------------------------------------

    def _stdlib(self) -> Iterator[Item]:
        for f, source in self._sources():
            if isinstance(source, Quarantined):
                yield source
            else:
                meta = {"path": f.rel, "language": "python"}
                yield Record(f.rel, self.kind, text=source, meta=meta)

    def _sources(self) -> Iterator[tuple[LocalFile, str | Quarantined]]:
        for f in self._files():
            if f.path is None:
                yield f, Quarantined(f.rel, self.kind, "outside_base", "a link that leads out")
                continue
            try:
                yield f, f.path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                yield f, Quarantined(f.rel, self.kind, "undecodable", f"not UTF-8: {e.reason}")
            except OSError as e:
                yield f, Quarantined(f.rel, self.kind, "unreadable", str(e))

    # -- python-docs -----------------------------------------------------------------

    def _docs(self) -> Iterator[Item]:
        for f, source in self._sources():
            if isinstance(source, Quarantined):
                yield source
                continue
            try:
                tree = ast.parse(source, filename=f.rel)
            except (SyntaxError, ValueError) as e:
                yield Quarantined(f.rel, self.kind, "unparseable", str(e))
                continue
            module = f.rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            for qualname, kind, doc in _docstrings(tree):
                item_id = f"{f.rel}:{qualname}" if qualname else f.rel
                name = f"{module}.{qualname}" if qualname else module
                meta = {"path": f.rel, "object": name, "type": kind}
                yield Record(item_id, self.kind, text=doc, meta=meta)
        yield from self._topics()

    def _topics(self) -> Iterator[Item]:
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions ship Python without pydoc_data
            detail = "this Python has no pydoc_data package"
            yield Quarantined("pydoc_data.topics", self.kind, "missing_module", detail)
            return
        for name in sorted(topics):
            meta = {"path": "pydoc_data/topics.py", "topic": name}
            yield Record(f"topics:{name}", self.kind, text=topics[name], meta=meta)

    # -- digits ----------------------------------------------------------------------

    def _digits(self) -> Iterator[Item]:
        import numpy as np
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        # (1797, 8, 8) floats in 0..16 → uint8 in 0..255
        pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        for i, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")  # (8, 8) uint8 → mode "L"
            yield Record(
                f"digits:{i}",
                self.kind,
                data=buffer.getvalue(),
                label=int(label),
                meta={"index": i},
            )


def _python() -> str:
    return f"{platform.python_implementation()} {platform.python_version()}"


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> Iterator[LocalFile]:
    def keep_dir(name: str) -> bool:
        return not (name in _SKIP_DIRS or name.startswith((".", "config-")))

    for f in local.walk(_stdlib_root(), keep_dir):
        if f.rel.endswith(".py"):
            yield f


def _docstrings(tree: ast.Module) -> Iterator[tuple[str, str, str]]:
    """(qualname, "module" | "class" | "function", docstring), the module's first with an
    empty qualname, then classes and functions at any depth in source order."""
    doc = ast.get_docstring(tree)
    if doc:
        yield "", "module", doc

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                qualname = prefix + child.name
                doc = ast.get_docstring(child)
                if doc:
                    yield qualname, "class" if isinstance(child, ast.ClassDef) else "function", doc
                yield from visit(child, qualname + ".")
            elif isinstance(child, ast.stmt | ast.excepthandler):  # defs under if/try/with
                yield from visit(child, prefix)

    yield from visit(tree, "")


def _digits_fingerprint() -> str:
    import PIL
    import sklearn
    from sklearn.datasets import load_digits

    digits = load_digits()
    versions = {"kind": "builtin:digits", "scikit-learn": sklearn.__version__}
    versions["pillow"] = PIL.__version__  # the PNG bytes depend on the encoder
    h = hashlib.sha256(json.dumps(versions, sort_keys=True).encode())
    h.update(digits.images.tobytes())
    h.update(digits.target.tobytes())
    return h.hexdigest()
