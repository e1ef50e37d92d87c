"""One logging setup for every genloop process, and the per-request log files.

``console`` (default): readable lines on stderr through rich. ``json``: one JSON object
per line, with any ``extra={...}`` fields a caller attaches, for log shippers.

Served requests are also appended, one JSON object per line, to
``<workspace>/logs/requests-YYYY-MM-DD.jsonl`` (UTC days) by
:func:`genloop.monitor.usage.record_request`, which removes keys and personal data first.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

LogFormat = Literal["console", "json"]

# Attributes every LogRecord has; anything else came from ``extra=`` and is emitted.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(fmt: LogFormat = "console", level: str | int = "INFO") -> None:
    """Configure the ``genloop`` logger (idempotent: replaces earlier handlers)."""
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(
            console=Console(stderr=True), show_path=False, rich_tracebacks=False, markup=False
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("genloop")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    logger.propagate = False


# ----------------------------------------------------------------------- request logs

REQUEST_LOGGER = "genloop.requests"
LOGS_DIR = "logs"
_file_lock = threading.Lock()


def request_log_path(workspace_root: Path, day: datetime) -> Path:
    """``<workspace>/logs/requests-YYYY-MM-DD.jsonl`` for the UTC day of ``day``."""
    return workspace_root / LOGS_DIR / f"requests-{day.astimezone(UTC):%Y-%m-%d}.jsonl"


def write_request_line(workspace_root: Path, entry: dict[str, Any], at: datetime) -> Path:
    """Append ``entry`` as one JSON line to the day's request log and to the
    ``genloop.requests`` logger. The caller has already removed keys and personal data."""
    path = request_log_path(workspace_root, at)
    line = json.dumps(entry, default=str, ensure_ascii=False, separators=(",", ":")) + "\n"
    with _file_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: lines from several processes (replicas, workers) never interleave
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
    logging.getLogger(REQUEST_LOGGER).info(
        "%s %s %s %s ms",
        entry.get("request_id"),
        entry.get("model"),
        entry.get("status"),
        entry.get("latency_ms"),
        extra={"request": entry},
    )
    return path
