"""Corpora present on every machine, nothing downloaded.

- ``python-stdlib``: the running interpreter's standard-library ``.py`` sources, test
  packages and site-packages left out; ids are paths like ``json/decoder.py``.
- ``python-docs``: the docstrings of the same files (module, class, function; read with
  ``ast``, nothing imported) and the pydoc topics (``pydoc_data.topics``).
- ``digits``: scikit-learn's bundled 8×8 handwritten digits (1797 images, labels 0–9),
  each as PNG bytes in ``data`` scaled from 0–16 to 0–255.
- ``shapes``: the procedurally drawn shapes corpus (:mod:`genloop.data.shapes`): ``count``
  RGB images of ``size``×``size`` pixels from ``seed``, PNG bytes in ``data``, the caption
  in ``text``, the scene's objects in ``meta``. Seen combinations only: held-out
  (colour, shape) pairs never reach a dataset.
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

NAMES = ("python-stdlib", "python-docs", "digits", "shapes")
SHAPES_COUNT, SHAPES_SIZE = 20_000, 32
# Folder names never entered: test packages (test/, tests/, idlelib/idle_test, lib2to3/tests,
# */test/*), installed third-party packages, bytecode and the build configuration.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
_SKIP_DIRS |= {"__pycache__", "lib-dynload"}

Item = Record | Quarantined


class BuiltinSource:
    def __init__(
        self,
        name: str,
        max_files: int | None = None,
        count: int | None = None,
        size: int | None = None,
        seed: int | None = None,
    ) -> None:
        if name not in NAMES:
            raise GenloopError(f"builtin source: unknown name {name!r}; choose from {NAMES}")
        if max_files is not None and max_files < 1:
            raise GenloopError(f"builtin source: max_files must be at least 1, not {max_files}")
        if name != "shapes":
            for key, value in (("count", count), ("size", size), ("seed", seed)):
                if value is not None:
                    detail = f"{key!r} is for 'shapes' only, not {name!r}"
                    raise GenloopError(f"builtin source: {detail}")
        if count is not None and count < 1:
            raise GenloopError(f"builtin source: count must be at least 1, not {count}")
        if size is not None and not 12 <= size <= 1024:
            raise GenloopError(f"builtin source: size must be 12 to 1024 pixels, not {size}")
        self.name = name
        self.kind = f"builtin:{name}"
        self.max_files = max_files
        self.count = SHAPES_COUNT if count is None else count
        self.size = SHAPES_SIZE if size is None else size
        self.seed = 0 if seed is None else seed

    def records(self) -> Iterator[Item]:
        if self.name == "python-stdlib":
            return self._stdlib()
        if self.name == "python-docs":
            return self._docs()
        if self.name == "shapes":
            return self._shapes()
        return self._digits()

    def fingerprint(self) -> str:
        if self.name == "digits":
            return _digits_fingerprint()
        if self.name == "shapes":
            return _shapes_fingerprint(self._shapes_options())
        return local.fingerprint(
            {"kind": self.kind, "python": _python(), "max_files": self.max_files},
            self._files(),
        )

    def describe(self) -> dict[str, Any]:
        if self.name == "digits":
            import sklearn

            return {"kind": self.kind, "name": self.name, "scikit-learn": sklearn.__version__}
        if self.name == "shapes":
            return {"kind": self.kind, "name": self.name, **self._shapes_options()}
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

    # -- shapes ----------------------------------------------------------------------

    def _shapes_options(self) -> dict[str, Any]:
        return {"count": self.count, "size": self.size, "seed": self.seed}

    def _shapes(self) -> Iterator[Item]:
        from PIL import Image

        from genloop.data.shapes import generate

        for i, (image, text, scene) in enumerate(
            generate(self.count, self.seed, size=self.size, split="seen")
        ):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
            yield Record(
                f"shapes:{i}",
                self.kind,
                text=text,
                data=buffer.getvalue(),
                meta={"index": i, "objects": scene.to_dicts()},
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


def _shapes_fingerprint(options: dict[str, Any]) -> str:
    """The images follow from the options, the drawing code and the libraries drawing."""
    import numpy
    import PIL

    from genloop.data import shapes

    versions = {"kind": "builtin:shapes", "numpy": numpy.__version__, "pillow": PIL.__version__}
    h = hashlib.sha256(json.dumps({**versions, **options}, sort_keys=True).encode())
    h.update(Path(shapes.__file__).read_bytes())
    return h.hexdigest()
