"""``genloop gate`` and ``genloop eval`` as a user (or a CI pipeline) runs them.

The gate's exit codes are checked in real subprocesses on evaluations stored directly in
the catalog; ``genloop eval`` runs end to end on a tiny trained model through the
console entry point in this process (which spares importing torch and transformers again).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from genloop.evaluate.results import SuiteResult
from genloop.evaluate.store import save_evaluation
from genloop.workspace import Workspace, init_workspace, registry
from genloop.workspace.datasets import register_dataset_version

from ..conftest import CliResult, run_genloop, write_corpus

pytestmark = pytest.mark.usefixtures("no_report_plots")


def subprocess_genloop(ws: Workspace, *args: str | Path) -> CliResult:
    env = {k: v for k, v in os.environ.items() if k != "GENLOOP_DATABASE_URL"}
    proc = subprocess.run(
        [sys.executable, "-m", "genloop", *map(str, args)],
        env=env | {"GENLOOP_HOME": str(ws.root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------------------------------
# genloop gate: exit codes in subprocesses
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gate_ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """m@1 (production, perplexity 10), m@2 (10.1: within 2 %), m@3 (10.5: +5 %)."""
    root = tmp_path_factory.mktemp("gate_cmd")
    ws = init_workspace(root / "ws")
    ds = register_dataset_version(ws, "fx", "a" * 64, lambda d: (d / "stats.json").write_text(""))
    src = root / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    for ppl in (10.0, 10.1, 10.5):
        info = registry.register_model(ws, "m", "causal_lm", src)
        save_evaluation(ws, info.id, ds.id, [SuiteResult("perplexity", {"perplexity": ppl})])
    registry.promote(ws, "m@1")
    (root / "rules.yaml").write_text(
        "rules:\n  - {metric: perplexity, op: max_increase_pct, value: 2}\n"
    )
    (root / "bad.yaml").write_text("rules:\n  - {metric: perplexity, op: at_most, value: 2}\n")
    yield ws
    ws.close()


def test_gate_passes_with_exit_0(gate_ws: Workspace) -> None:
    rules = gate_ws.root.parent / "rules.yaml"
    ran = subprocess_genloop(gate_ws, "gate", "m@2", "--against", "m@production", "--rules", rules)
    assert ran.returncode == 0, ran.stderr
    assert "PASS perplexity may rise at most 2%" in ran.stdout
    assert ran.stdout.rstrip().endswith("gate passed")


def test_gate_fails_on_a_planted_regression_with_exit_1(gate_ws: Workspace) -> None:
    ran = subprocess_genloop(gate_ws, "gate", "m@3", "--against", "m@production", "--json")
    assert ran.returncode == 1, ran.stderr
    result = json.loads(ran.stdout)
    assert result["passed"] is False and result["candidate"] == "m@3"
    (check,) = result["checks"]
    assert check["candidate"] == 10.5 and check["against"] == 10.0 and not check["passed"]
    assert "+5.00%" in check["message"]


def test_gate_config_errors_exit_2(gate_ws: Workspace) -> None:
    bad = gate_ws.root.parent / "bad.yaml"
    ran = subprocess_genloop(gate_ws, "gate", "m@3", "--against", "m@production", "--rules", bad)
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.startswith("error: ") and "Traceback" not in ran.stderr


def test_gate_output_names_the_failed_rule(gate_ws: Workspace) -> None:
    ran = run_genloop(gate_ws, "gate", "m@3", "--against", "m@production")
    assert ran.returncode == 1
    assert "FAIL perplexity may rise at most 2%" in ran.stdout
    assert "gate FAILED: perplexity may rise at most 2%" in ran.stdout
    missing = run_genloop(gate_ws, "gate", "m@3", "--against", "nobody@production")
    assert missing.returncode == 1 and "no model named 'nobody'" in missing.stderr


# ---------------------------------------------------------------------------------------
# genloop eval end to end
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A workspace with the fixture dataset and ``tiny@1``, trained on it for 10 steps."""
    import torch

    from genloop.config import DataConfig, GenloopConfig, TokenizerConfig
    from genloop.data.prepare import prepare_dataset
    from genloop.train.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_cmd")
    corpus = write_corpus(root / "corpus")
    ws = init_workspace(root / "ws")
    data = DataConfig.model_validate(
        {
            "name": "fx",
            "sources": [{"type": "files", "paths": [str(corpus)]}],
            "split": {"val": 0.1, "test": 0.1},
            "workers": 1,
        }
    )
    prepare_dataset(ws, data, TokenizerConfig(vocab_size=320, seq_len=32))
    cfg = GenloopConfig.model_validate(
        {
            "name": "tiny",
            "tokenizer": {"vocab_size": 320, "seq_len": 32},
            "model": {"preset": "tiny", "n_layer": 2, "n_embd": 32, "n_head": 2},
            "train": {
                "dataset": "fx",
                "max_steps": 10,
                "warmup_steps": 2,
                "batch_size": 8,
                "eval_every": 10,
                "eval_batches": 1,
                "device": "cpu",
            },
        }
    )
    train(ws, cfg)
    try:
        yield ws
    finally:
        ws.close()
        torch.set_num_threads(threads)


def test_eval_compare_and_gate_end_to_end(trained: Workspace) -> None:
    ws = trained
    args = ["--suite", "perplexity", "--suite", "generation", "--device", "cpu"]
    args += ["--set", "eval.max_samples=3", "--set", "eval.max_new_tokens=8"]
    ran = run_genloop(ws, "eval", "tiny", *args, "--json")
    assert ran.returncode == 0, ran.stderr
    first = json.loads(ran.stdout)
    assert first["model"] == "tiny@1" and first["dataset"] == "fx@1"
    assert {"perplexity", "bleu", "rouge1", "rouge2", "rougeL", "exact_match"} <= set(
        first["metrics"]
    )
    assert Path(first["report_dir"], "report.html").is_file()
    ws.store.open_verified(first["report"])

    # the explicit form, printing a table; its perplexity is the newest, the generation
    # metrics still come from the first evaluation
    ran = run_genloop(ws, "eval", "run", "tiny@1", "-s", "perplexity", *args[4:])
    assert ran.returncode == 0, ran.stderr
    assert "perplexity" in ran.stdout and f"evaluation {first['id'] + 1} stored" in ran.stdout

    ran = run_genloop(ws, "eval", "compare", "tiny@1", "tiny", "--json")
    assert ran.returncode == 0, ran.stderr
    d = json.loads(ran.stdout)
    assert d["evaluations"] == {"a": [first["id"] + 1, first["id"]]} | {
        "b": [first["id"] + 1, first["id"]]
    }
    ppl, rouge = d["metrics"]["perplexity"], d["metrics"]["rouge1"]
    assert ppl["a"] == ppl["b"] == first["metrics"]["perplexity"]  # same model and seed
    assert ppl["delta"] == 0 and ppl["ci"] == [0.0, 0.0]
    assert rouge["delta"] == 0 and rouge["ci"] == [0.0, 0.0]
    table = run_genloop(ws, "eval", "compare", "tiny@1", "tiny")
    assert table.returncode == 0 and "95% CI" in table.stdout

    listed = json.loads(run_genloop(ws, "eval", "list", "tiny", "--json").stdout)
    assert [e["id"] for e in listed] == [first["id"] + 1, first["id"]]
    shown = run_genloop(ws, "eval", "show", str(first["id"]))
    assert shown.returncode == 0 and "report_dir" in shown.stdout

    registry.promote(ws, "tiny@1")
    ran = run_genloop(ws, "gate", "tiny@1", "--against", "tiny@production")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "gate passed" in ran.stdout


def test_eval_errors_are_one_line(trained: Workspace) -> None:
    ran = run_genloop(trained, "eval", "tiny", "--suite", "image")
    assert ran.returncode == 1 and "vae, gan, diffusion families" in ran.stderr
    assert "Traceback" not in ran.stderr
    ran = run_genloop(trained, "eval", "tiny", "--set", "eval.splt=val")
    assert ran.returncode == 2 and "did you mean 'eval.split'" in ran.stderr
    ran = run_genloop(trained, "eval", "compare", "tiny", "nobody")
    assert ran.returncode == 1 and "no model named 'nobody'" in ran.stderr
