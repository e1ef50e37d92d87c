"""Where records come from: one small module per source kind.

A :class:`Source` streams :class:`~genloop.data.records.Record` objects (and
:class:`~genloop.data.records.Quarantined` ones for input it cannot read, so a bad line
never stops a run), gives a content fingerprint for dataset versioning and describes
itself for lineage. :func:`build_source` makes one from a plain dict, as written in a
pipeline config::

    {"type": "files", "paths": ["corpus/**/*.jsonl"], "field": "text"}
    {"type": "code", "path": "src", "extensions": [".py"], "exclude": ["*_pb2.py"]}
    {"type": "builtin", "name": "python-stdlib"}        # or python-docs, digits
    {"type": "builtin", "name": "shapes", "count": 20000, "size": 32, "seed": 0}
    {"type": "url", "urls": ["https://example.org/"], "max_bytes": 2000000, "timeout_s": 5}
    {"type": "hf_disk", "path": "saved/ds", "split": "train", "field": "text"}
    {"type": "hf_disk", "path": "saved/pics", "image_field": "image", "field": "caption"}
    {"type": "images", "path": "pictures"}               # labels from sub-folders
    {"type": "images", "path": "captioned", "text_column": "text"}  # with metadata.jsonl
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any, Protocol, runtime_checkable

from genloop.data.records import Quarantined, Record
from genloop.data.sources.builtin import BuiltinSource
from genloop.data.sources.code import CodeSource
from genloop.data.sources.files import FilesSource
from genloop.data.sources.hf_disk import HfDiskSource
from genloop.data.sources.images import ImagesSource
from genloop.data.sources.url import UrlSource
from genloop.errors import ConfigError

__all__ = [
    "SPEC_KEYS",
    "BuiltinSource",
    "CodeSource",
    "FilesSource",
    "HfDiskSource",
    "ImagesSource",
    "Source",
    "UrlSource",
    "build_source",
]


@runtime_checkable
class Source(Protocol):
    kind: str  # what its records carry in ``Record.source``

    def records(self) -> Iterator[Record | Quarantined]:
        """Stream the records; never holds the whole corpus in memory."""
        ...

    def fingerprint(self) -> str:
        """sha256 hex of the inputs: same inputs → same fingerprint."""
        ...

    def describe(self) -> dict[str, Any]:
        """Lineage: kind, paths/urls/name, file count."""
        ...


# type → {key: (expected shape, required)}; the same names as the constructors' arguments
# and as the source models in genloop.config. Shapes: "str", "path" (a string or a Path),
# "strs" (a string or a list of strings), "list" (a list of strings), "int", "number",
# "bool".
SPEC_KEYS: dict[str, dict[str, tuple[str, bool]]] = {
    "files": {
        "paths": ("strs", True),
        "field": ("str", False),
        "columns": ("strs", False),
        "encoding": ("str", False),
    },
    "code": {
        "path": ("path", True),
        "extensions": ("list", False),
        "languages": ("list", False),
        "exclude": ("list", False),
        "max_bytes": ("int", False),
    },
    "builtin": {
        "name": ("str", True),
        "max_files": ("int", False),
        "count": ("int", False),
        "size": ("int", False),
        "seed": ("int", False),
    },
    "url": {
        "urls": ("strs", True),
        "allow_private": ("bool", False),
        "max_bytes": ("int", False),
        "timeout_s": ("number", False),
        "respect_robots": ("bool", False),
        "user_agent": ("str", False),
    },
    "hf_disk": {
        "path": ("path", True),
        "split": ("str", False),
        "field": ("str", False),
        "image_field": ("str", False),
    },
    "images": {
        "path": ("path", True),
        "extensions": ("list", False),
        "text_column": ("str", False),
    },
}

_CLASSES: dict[str, Callable[..., Source]] = {
    "files": FilesSource,
    "code": CodeSource,
    "builtin": BuiltinSource,
    "url": UrlSource,
    "hf_disk": HfDiskSource,
    "images": ImagesSource,
}
_LOCAL = frozenset({"files", "code", "hf_disk", "images"})  # take relative paths


def build_source(spec: Mapping[str, Any], *, root: Path | None = None) -> Source:
    """The source ``spec`` describes (a plain dict, e.g. a genloop.config source model's
    ``model_dump()``). A key set to None counts as not given: the default applies.
    Relative paths are taken from ``root`` (say, the config file's folder) or else the
    working folder. Raises ConfigError naming a bad or missing key, GenloopError for a
    path that does not exist."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"a data source must be a mapping, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in SPEC_KEYS:
        raise ConfigError(
            f"data source: 'type' must be one of {', '.join(SPEC_KEYS)}, got {kind!r}"
        )
    keys = SPEC_KEYS[kind]
    for key in spec:
        if key != "type" and key not in keys:
            raise ConfigError(
                f"{kind} source: unknown key {key!r}; valid keys: type, {', '.join(keys)}"
            )
    kwargs: dict[str, Any] = {}
    for key, (shape, required) in keys.items():
        if spec.get(key) is None:
            if required:
                raise ConfigError(f"{kind} source: missing key {key!r}")
            continue
        if not _has_shape(spec[key], shape):
            raise ConfigError(f"{kind} source: {key!r} must be {_SHAPES[shape]}, got {spec[key]!r}")
        kwargs[key] = spec[key]
    if kind in _LOCAL:
        kwargs["root"] = root
    return _CLASSES[kind](**kwargs)


_SHAPES = {
    "str": "a string",
    "path": "a path",
    "strs": "a string or a list of strings",
    "list": "a list of strings",
    "int": "an integer",
    "number": "a number",
    "bool": "true or false",
}


def _has_shape(value: object, shape: str) -> bool:
    is_str_list = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if shape == "str":
        return isinstance(value, str)
    if shape == "path":
        return isinstance(value, str | PurePath)
    if shape == "strs":
        return isinstance(value, str) or is_str_list
    if shape == "list":
        return is_str_list
    if shape == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if shape == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, bool)
