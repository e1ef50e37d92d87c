"""``genloop plan`` on a tiny corpus with tiny candidates: the plan's structure, real
measured throughput, and a pick that grows with the budget."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from genloop.config import GenloopConfig, parse_config
from genloop.errors import ConfigError, GenloopError
from genloop.train.plan import Candidate, default_candidates, plan, recommend
from genloop.workspace import Workspace, init_workspace

WORDS = ["the", "a", "model", "learns", "patterns", "from", "data", "every", "day"]
WORDS += ["rivers", "carry", "quiet", "stones", "under", "bright", "green"]
# Two tiny architectures (model-section keys), so measuring both takes a second or two.
TINY_CANDIDATES: dict[str, dict[str, Any]] = {
    "micro": {"preset": "tiny", "n_layer": 1, "n_embd": 32, "n_head": 2},
    "mini": {"preset": "tiny", "n_layer": 2, "n_embd": 64, "n_head": 4},
}


def write_corpus(root: Path, docs: int = 40) -> Path:
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for i in range(docs):
        rng = random.Random(i)
        text = " ".join(rng.choice(WORDS) for _ in range(80)) + f" (document {i})."
        (corpus / f"d{i}.txt").write_text(text, encoding="utf-8")
    return corpus


def tiny_config(corpus: Path, **train: Any) -> GenloopConfig:
    return parse_config(
        {
            "data": {
                "name": "plan-corpus",
                "sources": [{"type": "files", "paths": [str(corpus)]}],
                "dedup": {"near": False},
                "pii": {"enabled": False},
            },
            "tokenizer": {"vocab_size": 300, "seq_len": 32},
            "train": {"batch_size": 2, "max_steps": 10, "warmup_steps": 1, **train},
        }
    )


@pytest.fixture
def cfg(tmp_path: Path) -> GenloopConfig:
    return tiny_config(write_corpus(tmp_path))


def test_plan_measures_each_candidate_and_explains_its_pick(
    workspace: Workspace, cfg: GenloopConfig
) -> None:
    result = plan(workspace, cfg, 1.0, 2, candidates=TINY_CANDIDATES, max_epochs=1e9)

    assert result.family == "causal_lm"
    assert result.objective == "lm"
    assert result.dataset == "plan-corpus@1"
    assert result.tokens_available > 0
    assert result.seq_len == 32
    assert result.tokens_per_step == 2 * 32
    assert [c.name for c in result.candidates] == ["micro", "mini"]  # smallest first
    micro, mini = result.candidates
    assert 0 < micro.params < mini.params
    for c in result.candidates:
        assert c.rule_tokens == math.ceil(20 * c.params)
        assert c.epochs == pytest.approx(c.rule_tokens / result.tokens_available)
        assert c.tokens_per_s is not None and c.tokens_per_s > 0
        assert c.step_seconds is not None and c.step_seconds > 0
        assert c.hours == pytest.approx(c.rule_tokens / c.tokens_per_s / 3600)
        assert c.peak_memory_mb is not None and c.peak_memory_mb >= 0
    assert result.recommended in ("micro", "mini")
    assert result.suggested_max_steps is not None and result.suggested_max_steps > 0
    assert result.reasons and result.reasons[0].startswith("family causal_lm")
    # the JSON form is plain data
    assert json.loads(json.dumps(result.to_dict()))["candidates"][0]["name"] == "micro"


def test_a_tiny_budget_picks_a_smaller_model_than_a_huge_one(
    workspace: Workspace, cfg: GenloopConfig
) -> None:
    small = plan(workspace, cfg, 1e-9, 1, candidates=TINY_CANDIDATES, max_epochs=1e9)
    large = plan(workspace, cfg, 1e9, 1, candidates=TINY_CANDIDATES, max_epochs=1e9)

    assert small.recommended == "micro"  # nothing fits: the smallest, with what it lacks
    assert "no candidate fits" in " ".join(small.reasons)
    assert large.recommended == "mini"  # everything fits: the largest
    assert "mini:" in large.reasons[1]


def test_the_data_limits_the_size(workspace: Workspace, cfg: GenloopConfig) -> None:
    # a few thousand tokens cannot feed 20 × ~30k parameters in 4 epochs
    result = plan(workspace, cfg, 1e9, 1, candidates=TINY_CANDIDATES, presets=["micro"])

    assert [c.name for c in result.candidates] == ["micro"]
    (micro,) = result.candidates
    assert micro.fits_budget and not micro.fits_data
    assert "the data supports about" in " ".join(result.reasons)


def test_recommend_takes_the_largest_that_fits() -> None:
    def cand(name: str, params: int, hours: float, epochs: float) -> Candidate:
        c = Candidate(name, {"preset": "tiny"}, params, 20 * params, epochs)
        c.tokens_per_s, c.hours = 20 * params / hours / 3600, hours
        c.fits_budget, c.fits_data = hours <= 2, epochs <= 4
        return c

    cands = [cand("a", 10, 0.5, 1), cand("b", 20, 1.5, 2), cand("c", 40, 3, 3), cand("d", 80, 1, 8)]
    pick, reasons = recommend(cands, 2, 4, 1000)

    assert pick is not None and pick.name == "b"
    assert any(r.startswith("c is larger but needs") for r in reasons)
    assert any(r.startswith("d is larger but wants 8 epochs") for r in reasons)


def test_default_candidates_are_the_presets_plus_the_configured_architecture(
    tmp_path: Path,
) -> None:
    plain = tiny_config(tmp_path)
    assert list(default_candidates(plain)) == ["tiny", "small", "base"]
    custom = plain.model_copy(update={"model": plain.model.model_copy(update={"n_layer": 2})})
    assert default_candidates(custom)["config"] == {"preset": "tiny", "n_layer": 2}


def test_bad_requests_are_clear_errors(workspace: Workspace, cfg: GenloopConfig) -> None:
    with pytest.raises(ConfigError, match="unknown candidate 'huge'"):
        plan(workspace, cfg, 1.0, 1, presets=["huge"])
    with pytest.raises(ConfigError, match="positive number of hours"):
        plan(workspace, cfg, 0.0, 1)
    base = cfg.model.model_copy(update={"base_model": "some-model"})
    with pytest.raises(GenloopError, match="trained from scratch"):
        plan(workspace, cfg.model_copy(update={"model": base}), 1.0, 1)


@pytest.mark.integration
def test_cli_prints_a_json_plan(tmp_path: Path) -> None:
    init_workspace(tmp_path / "ws").close()
    corpus = write_corpus(tmp_path)
    config = tmp_path / "plan.yaml"
    config.write_text(
        json.dumps(
            {
                "data": {
                    "name": "plan-corpus",
                    "sources": [{"type": "files", "paths": [str(corpus)]}],
                    "dedup": {"near": False},
                },
                "tokenizer": {"vocab_size": 300, "seq_len": 32},
                "model": {"n_layer": 1, "n_embd": 32, "n_head": 2},
                "train": {"batch_size": 2, "max_steps": 10, "warmup_steps": 1},
            }
        )
    )
    args = ["plan", str(config), "--presets", "config", "--steps", "1", "--budget-hours", "2"]
    out = subprocess.run(
        [sys.executable, "-m", "genloop", "-w", str(tmp_path / "ws"), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["candidates"][0]["name"] == "config"
    assert result["candidates"][0]["configured"] is True
    assert result["candidates"][0]["tokens_per_s"] > 0
    assert result["budget_hours"] == 2
