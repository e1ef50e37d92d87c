"""The unit that flows through data preparation, and what a step may answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Record:
    """One document, code file or image.

    ``id`` is stable across runs (source + path + position), so re-runs and quarantine
    entries can name it. Text records carry ``text``; images carry their raw file bytes in
    ``data`` until the image step decodes them. ``meta`` holds source metadata
    (``path``, ``language``, ``url``, ``field`` …) and ends up in the dataset's samples.
    """

    id: str
    source: str  # the source kind: files, code, builtin:python-stdlib, url, hf_disk, images
    text: str | None = None
    data: bytes | None = None
    label: int | str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Dropped:
    """A step's answer when a record must not go on.

    ``reason`` is a short stable code counted in the report (``too_short``,
    ``duplicate``, ``near_duplicate``, ``unparseable``, ``corrupt_image``, ``bad_json`` …);
    ``detail`` is a human sentence for the quarantine file. ``quarantine`` says whether the
    record is kept in the quarantine file (bad input) or only counted (a filter's choice).
    """

    reason: str
    detail: str = ""
    quarantine: bool = False


StepResult = Record | Dropped


@dataclass(frozen=True, slots=True)
class Quarantined:
    """What a source yields for input it cannot read (a malformed JSONL line, an unreadable
    file): it goes to the quarantine file with its reason, and the run goes on."""

    id: str
    source: str
    reason: str
    detail: str = ""
