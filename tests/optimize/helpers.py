"""Run ``genloop`` through its console entry point in this process (no torch re-import)."""

from __future__ import annotations

import io
import logging
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from genloop.workspace import Workspace


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def genloop(ws: Workspace, *args: str | Path) -> Ran:
    from genloop.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    logger = logging.getLogger("genloop")  # the CLI sets it up; put it back afterwards
    with pytest.MonkeyPatch.context() as m, redirect_stdout(out), redirect_stderr(err):
        m.setenv("GENLOOP_HOME", str(ws.root))
        m.setattr(sys, "argv", ["genloop", *map(str, args)])
        m.setattr(logger, "handlers", list(logger.handlers))
        m.setattr(logger, "propagate", logger.propagate)
        m.setattr(logger, "level", logger.level)
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return Ran(code, out.getvalue(), err.getvalue())
