"""The ``lm_eval`` suite: ``genloop eval MODEL --lm-eval-tasks task.yaml`` runs
lm-evaluation-harness in process on local task files and records its metrics like any suite.

The model is a 2-layer, 32-wide random Llama registered in a fresh workspace (no dataset:
the suite needs none); the reference is a Hugging Face forward's log-likelihood of each
choice, summed over the continuation, argmax.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from genloop.workspace import Workspace, init_workspace, registry

from ..conftest import run_genloop
from ..serve.conftest import CORPUS, build_model

pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency (pip install -e .[dev])")

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_report_plots")

ITEMS = [
    ("The cat sat on the", ["mat", "tree", "river"], 0),
    ("The dog ran in the", ["park", "night", "town"], 0),
    ("A bird sang in the", ["mat", "tree", "rain"], 1),
    ("Rain fell on the quiet", ["town", "cat", "print"], 0),
    ("Hello there! How are", ["you", "we", "the"], 0),
    ("I am fine, thank", ["you", "the", "dog"], 0),
]

TASK = """task: genloop_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workspace, Path]]:
    from genloop.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("harness")
    tok = train_bpe(CORPUS, root / "tok", vocab_size=320, min_frequency=1)
    model_dir = build_model(root / "m", tok, seed=0)
    workspace = init_workspace(root / "ws")
    registry.register_model(workspace, "tiny", "causal_lm", model_dir)
    yield workspace, model_dir
    workspace.close()


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    data = tmp_path / "mc.jsonl"
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in ITEMS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    path = tmp_path / "mc.yaml"
    path.write_text(TASK.format(data=data), encoding="utf-8")
    return path


def reference_correct(model_dir: Path) -> list[float]:
    """Whether the likeliest choice (a HF forward's summed log-likelihood) is the answer."""
    from genloop.data.tokenizer import load_hf_tokenizer
    from genloop.models.pretrained import load_pretrained

    model, tok = load_pretrained(model_dir), load_hf_tokenizer(model_dir)
    correct = []
    for question, choices, answer in ITEMS:
        context = len(tok(question, add_special_tokens=False).input_ids)
        sums = []
        for choice in choices:
            ids = tok(f"{question} {choice}", add_special_tokens=False).input_ids
            with torch.inference_mode():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            sums.append(sum(lp[i - 1, ids[i]].item() for i in range(context, len(ids))))
        correct.append(float(max(range(len(sums)), key=sums.__getitem__) == answer))
    return correct


def test_eval_runs_lm_eval_task_files_and_records_their_metrics(
    ws: tuple[Workspace, Path], task_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace, model_dir = ws
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    result = run_genloop(
        workspace, "eval", "tiny", "--lm-eval-tasks", task_file, "--device", "cpu", "--json"
    )
    assert result.returncode == 0, result.output
    record = json.loads(result.stdout)
    correct = reference_correct(model_dir)
    assert record["suite"] == "lm_eval"
    assert record["metrics"]["genloop_mc/acc"] == pytest.approx(sum(correct) / len(correct))
    settings = record["settings"]["suites"]["lm_eval"]
    assert settings["tasks"][0]["file"] == str(task_file.resolve())
    assert settings["lm_eval_version"].startswith("0.4.")

    from genloop.evaluate.store import get_evaluation, load_results

    stored = load_results(workspace, get_evaluation(workspace, record["id"]))[0]
    assert stored.per_sample["genloop_mc/acc"] == correct  # for compare's bootstrap CIs
    assert registry.resolve(workspace, "tiny").metrics["genloop_mc/acc"] == pytest.approx(
        sum(correct) / len(correct)
    )
    import os

    assert "HF_DATASETS_OFFLINE" not in os.environ  # offline only while the harness ran


def test_bad_task_files_are_one_clear_line_before_the_model_loads(
    ws: tuple[Workspace, Path], tmp_path: Path
) -> None:
    workspace, _ = ws
    not_a_task = tmp_path / "other.yaml"
    not_a_task.write_text("name: something\n")
    hub = tmp_path / "hub.yaml"
    hub.write_text(
        "task: hub_task\ndataset_path: someone/their_dataset\noutput_type: loglikelihood\n"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: [unclosed\n")
    cases = {
        tmp_path / "missing.yaml": "does not exist",
        not_a_task: "has no 'task'",
        hub: "genloop never downloads",
        broken: "not valid YAML",
        tmp_path: "is not a file",
    }
    for path, message in cases.items():
        result = run_genloop(workspace, "eval", "tiny", "--lm-eval-tasks", path, "--device", "cpu")
        assert result.returncode != 0
        assert message in result.output and "Traceback" not in result.output, result.output
    result = run_genloop(workspace, "eval", "tiny", "--suite", "lm_eval", "--device", "cpu")
    assert result.returncode != 0 and "--lm-eval-tasks" in result.output
