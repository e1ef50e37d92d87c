"""Comparing stored evaluations: deltas and paired bootstrap intervals."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest

from genloop.errors import NotFoundError
from genloop.evaluate.compare import compare, paired_bootstrap_ci
from genloop.evaluate.results import SuiteResult
from genloop.evaluate.store import save_evaluation
from genloop.workspace import Workspace, init_workspace, registry
from genloop.workspace.datasets import DatasetVersionInfo, register_dataset_version
from genloop.workspace.registry import ModelVersionInfo

pytestmark = pytest.mark.usefixtures("no_report_plots")

_ids = itertools.count()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    ws = init_workspace(tmp_path_factory.mktemp("compare") / "ws")
    yield ws
    ws.close()


def new_version(ws: Workspace, name: str) -> ModelVersionInfo:
    src = ws.root / f"src-{next(_ids)}"
    src.mkdir()
    (src / "config.json").write_text("{}")
    return registry.register_model(ws, name, "causal_lm", src)


def new_dataset(ws: Workspace, content: str = "a") -> DatasetVersionInfo:
    return register_dataset_version(
        ws, f"d{next(_ids)}", content * 64, lambda d: (d / "stats.json").write_text("{}")
    )


def generation(scores: np.ndarray, **settings: object) -> SuiteResult:
    """A generation suite whose rouge1 is the mean of per-sample ``scores``."""
    values = [float(v) for v in scores]
    return SuiteResult(
        "generation",
        {"rouge1": float(np.mean(values)), "bleu": 10.0},
        per_sample={"rouge1": values},
        settings={"seed": 0, **settings},
    )


def test_interval_contains_the_true_delta_and_excludes_zero() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(0.2, 0.8, size=400)  # per-sample scores of model A
    b = a + 0.05 + rng.normal(0, 0.05, size=400)  # B is better by 0.05 on average
    lo, hi = paired_bootstrap_ci(a, b)
    assert lo < 0.05 < hi
    assert lo > 0  # a clear difference: zero is outside
    assert hi - lo < 0.02  # pairing removes the spread between samples
    assert paired_bootstrap_ci(a, b) == (lo, hi)  # a fixed seed: the same interval


def test_interval_contains_zero_without_a_difference() -> None:
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 1, size=200)
    b = a + rng.normal(0, 0.1, size=200)  # noise only
    lo, hi = paired_bootstrap_ci(a, b)
    assert lo < 0 < hi


def test_interval_coverage() -> None:
    """Over many synthetic data sets, the 95 % interval holds the true delta ~95 % of the
    time (a loose check of the method, not of one draw)."""
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(100):
        a = rng.uniform(0, 1, size=100)
        b = a + 0.1 + rng.normal(0, 0.2, size=100)
        lo, hi = paired_bootstrap_ci(a, b, resamples=400)
        hits += lo <= 0.1 <= hi
    assert 85 <= hits <= 100


def test_interval_of_a_derived_statistic() -> None:
    nll_a = np.full(50, math.log(10.0))
    nll_b = np.full(50, math.log(12.0))
    lo, hi = paired_bootstrap_ci(nll_a, nll_b, statistic=lambda x: np.exp(x.mean(axis=-1)))
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)


def test_unpaired_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])


def test_compare_stored_evaluations(workspace: Workspace) -> None:
    a, b = new_version(workspace, "cmp"), new_version(workspace, "cmp")
    ds = new_dataset(workspace)
    rng = np.random.default_rng(4)
    base = rng.uniform(0.2, 0.6, size=60)
    save_evaluation(workspace, a.id, ds.id, [generation(base)])
    nll = list(rng.normal(3.0, 0.2, size=30))
    ppl_a = SuiteResult("perplexity", {"perplexity": math.exp(np.mean(nll))}, {"nll": nll})
    nll_b = [x - 0.1 for x in nll]
    ppl_b = SuiteResult("perplexity", {"perplexity": math.exp(np.mean(nll_b))}, {"nll": nll_b})
    save_evaluation(workspace, a.id, ds.id, [ppl_a])
    save_evaluation(workspace, b.id, ds.id, [generation(base + 0.1), ppl_b])

    d = compare(workspace, a.ref, b.ref)
    assert (d["a"], d["b"], d["dataset"]) == (a.ref, b.ref, ds.ref)
    rouge = d["metrics"]["rouge1"]
    assert rouge["delta"] == pytest.approx(0.1) and rouge["n"] == 60
    assert rouge["ci"][0] == pytest.approx(0.1) and rouge["ci"][1] == pytest.approx(0.1)
    bleu = d["metrics"]["bleu"]  # corpus-level: no per-sample values, no interval
    assert bleu["delta"] == 0 and bleu["ci"] is None
    ppl = d["metrics"]["perplexity"]
    assert ppl["delta"] < 0 and ppl["delta_pct"] == pytest.approx(100 * (math.exp(-0.1) - 1))
    lo, hi = ppl["ci"]  # exp(mean NLL) of each resample, so a (narrow) interval
    assert lo < ppl["delta"] < hi < 0
    assert not d["warnings"]
    assert len(d["evaluations"]["a"]) == 2 and len(d["evaluations"]["b"]) == 1


def test_no_interval_when_samples_do_not_pair(workspace: Workspace) -> None:
    a, b = new_version(workspace, "unpaired"), new_version(workspace, "unpaired")
    ds = new_dataset(workspace)
    save_evaluation(workspace, a.id, ds.id, [generation(np.full(10, 0.5))])
    save_evaluation(workspace, b.id, ds.id, [generation(np.full(12, 0.6))])
    d = compare(workspace, a.ref, b.ref)
    assert d["metrics"]["rouge1"]["ci"] is None
    assert d["metrics"]["rouge1"]["delta"] == pytest.approx(0.1)
    assert any("10 vs 12 samples" in w for w in d["warnings"])

    save_evaluation(workspace, b.id, ds.id, [generation(np.full(10, 0.6), seed=1)])
    d = compare(workspace, a.ref, b.ref)
    assert d["metrics"]["rouge1"]["ci"] is None
    assert any("settings differ (seed)" in w for w in d["warnings"])


def test_different_datasets_warn(workspace: Workspace) -> None:
    a, b = new_version(workspace, "apart"), new_version(workspace, "apart")
    save_evaluation(workspace, a.id, new_dataset(workspace).id, [generation(np.full(5, 0.5))])
    save_evaluation(workspace, b.id, new_dataset(workspace).id, [generation(np.full(5, 0.7))])
    d = compare(workspace, a.ref, b.ref)
    assert d["dataset"] is None and d["metrics"]["rouge1"]["ci"] is None
    assert "no dataset version both were evaluated on" in d["warnings"][0]


def test_a_model_without_evaluation_is_an_error(workspace: Workspace) -> None:
    a, b = new_version(workspace, "bare"), new_version(workspace, "bare")
    save_evaluation(workspace, a.id, None, [generation(np.full(5, 0.5))])
    with pytest.raises(NotFoundError, match="run 'genloop eval bare@2' first"):
        compare(workspace, a.ref, b.ref)


def test_a_suites_figures_are_stored_beside_the_report_and_shown_in_it(
    workspace: Workspace,
) -> None:
    import io

    from PIL import Image

    from genloop.evaluate.store import RESULTS_FILE, load_results

    def png(colour: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
        return buf.getvalue()

    version = new_version(workspace, "figs")
    figures = {'"a red circle" <left>': png("red"), "a blue square": png("blue")}
    result = SuiteResult("t2i", {"score": 1.0}, figures=figures)
    record = save_evaluation(workspace, version.id, None, [result])
    assert record.report is not None
    folder = workspace.store.open_verified(record.report)  # the manifest covers them
    assert (folder / "figures" / "t2i-000.png").read_bytes() == figures['"a red circle" <left>']
    assert (folder / "figures" / "t2i-001.png").read_bytes() == figures["a blue square"]
    markdown = (folder / "report.md").read_text()
    assert "(figures/t2i-001.png)" in markdown
    page = (folder / "report.html").read_text()
    assert page.count('<img alt="') >= 2 and "&quot;a red circle&quot; &lt;left&gt;" in page
    assert "<left>" not in page  # titles are escaped
    stored = (folder / RESULTS_FILE).read_text()
    assert "iVBOR" not in stored  # the PNGs stay out of results.json
    (loaded,) = load_results(workspace, record)
    assert loaded.metrics == {"score": 1.0}
