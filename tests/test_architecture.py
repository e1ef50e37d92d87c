"""The house's rules, checked on the code as it is (docs/architecture.md).

import-linter reads the contracts in ``pyproject.toml`` (``[tool.importlinter]``): the layers
of the loop (cli on top; serve, feedback, pipeline; tune, evaluate, optimize, train; monitor
and models; data, security, workspace, config at the ground), serving never importing
training even through another package, and no import cycle between the modules of any
package. Every import counts, those inside functions included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layers_hold_and_no_module_imports_in_a_cycle() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    ran = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "Contracts: 3 kept, 0 broken." in ran.stdout, ran.stdout
