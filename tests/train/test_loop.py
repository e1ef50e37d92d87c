"""The training loop through its Python API, on a 2-layer, 32-wide model and a fixture corpus.

The dataset is prepared once for the module; every test trains its own model name in the
shared workspace (``train.dataset`` reuses the prepared version). The real CLI, with
SIGKILL and ``--resume`` in subprocesses, is in ``tests/cli/test_train_cmd.py``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from genloop.config import GenloopConfig
from genloop.errors import GenloopError
from genloop.train import checkpoint as ckpt
from genloop.train import loop
from genloop.train.loop import TrainingDiverged, TrainResult, train
from genloop.workspace import Workspace, registry
from genloop.workspace.tables import Run, RunMetric

from ..conftest import prose_workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATASET = "fx"
SERIES = {"loss", "lr", "grad_norm", "tokens_per_s", "memory_mb", "val_loss"}


def config(name: str, **train: Any) -> GenloopConfig:
    """A 2-layer, 32-wide model with attention dropout (so the RNG matters) on ``fx``."""
    spec = {
        "name": name,
        "tokenizer": {"vocab_size": 320, "seq_len": 32},
        "model": {"preset": "tiny", "n_layer": 2, "n_embd": 32, "n_head": 2, "dropout": 0.1},
        "train": {
            "dataset": DATASET,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 3,
            "max_steps": 30,
            "batch_size": 8,
            "eval_every": 10,
            "eval_batches": 2,
            "checkpoint_every": 10,
            "device": "cpu",
            **train,
        },
    }
    return GenloopConfig.model_validate(spec)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A workspace holding the prepared fixture dataset ``fx``."""
    workspace = prose_workspace(tmp_path_factory.mktemp("loop"), DATASET)
    yield workspace
    workspace.close()


@pytest.fixture(scope="module")
def baseline(ws: Workspace) -> TrainResult:
    """30 uninterrupted steps; the progress callback also records the run's status."""
    seen: list[tuple[int, int, dict[str, float], str]] = []

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        seen.append((step, total, dict(metrics), run_row(ws, name="base").status))

    result = train(ws, config("base"), progress=progress)
    result.progress_seen = seen  # type: ignore[attr-defined]
    return result


def run_row(ws: Workspace, run_id: str | None = None, *, name: str | None = None) -> Run:
    with ws.catalog.session() as s:
        query = select(Run).where(Run.id == run_id if run_id else Run.name == name)
        row = s.scalars(query.order_by(Run.started_at.desc())).first()
        assert row is not None
        s.expunge(row)
        return row


def series(ws: Workspace, run_id: str, key: str) -> list[tuple[int, float]]:
    """The run's ``key`` points in the catalog as (step, value), in insertion order."""
    with ws.catalog.session() as s:
        rows = s.execute(
            select(RunMetric.step, RunMetric.value)
            .where(RunMetric.run_id == run_id, RunMetric.key == key)
            .order_by(RunMetric.id)
        ).all()
    return [(int(step), float(value)) for step, value in rows]


def series_keys(ws: Workspace, run_id: str) -> set[str]:
    with ws.catalog.session() as s:
        return set(s.scalars(select(RunMetric.key).where(RunMetric.run_id == run_id)))


def model_weights(ws: Workspace, result: TrainResult) -> dict[str, torch.Tensor]:
    assert result.model is not None
    path = ws.store.open_verified(registry.resolve(ws, result.model.ref).artifact)
    return load_file(str(path / "model.safetensors"))


def checkpoint_weights(ws: Workspace, run_id: str, step: int) -> dict[str, torch.Tensor]:
    found = ckpt.load_checkpoint(ws.store, ckpt.checkpoint_key(run_id, step))
    return load_file(str(found.path / "model.safetensors"))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    common = a.keys() & b.keys()  # a registered model leaves out the tied output matrix
    assert len(common) >= len(a) - 1 and len(common) >= len(b) - 1
    return all(torch.equal(a[k], b[k]) for k in common)


def steps_left(ws: Workspace, run_id: str) -> list[int]:
    return sorted(step for step, _ in ckpt.list_checkpoints(ws.store, run_id))


# -- a run from start to finish -------------------------------------------------------------


def test_loss_falls_and_val_loss_is_recorded(baseline: TrainResult) -> None:
    history = baseline.history
    assert baseline.steps == 30 and len(history) == 30
    assert statistics.mean(history[-5:]) < statistics.mean(history[:5]) - 1.0
    assert math.isfinite(baseline.metrics["val_loss"])
    assert baseline.metrics["val_loss"] < history[0]
    assert baseline.metrics["val_ppl"] == pytest.approx(math.exp(baseline.metrics["val_loss"]))
    assert baseline.metrics["loss"] == history[-1]


def test_progress_is_reported_every_step_while_the_run_is_running(
    baseline: TrainResult,
) -> None:
    seen = baseline.progress_seen  # type: ignore[attr-defined]
    assert [step for step, *_ in seen] == list(range(1, 31))
    assert {total for _, total, *_ in seen} == {30}
    assert {status for *_, status in seen} == {"running"}
    assert [step for step, _, m, _ in seen if "val_loss" in m] == [10, 20, 30]
    assert [m["loss"] for _, _, m, _ in seen] == baseline.history
    assert all(m["tokens_per_s"] > 0 and m["memory_mb"] > 0 for _, _, m, _ in seen)


def test_the_catalog_holds_the_series_and_the_completed_run(
    ws: Workspace, baseline: TrainResult
) -> None:
    run = run_row(ws, baseline.run_id)
    assert run.status == "completed" and run.error is None and run.ended_at is not None
    assert run.summary["loss"] == baseline.metrics["loss"]
    assert run.summary["val_loss"] == baseline.metrics["val_loss"]
    assert run.config["train"]["max_steps"] == 30

    assert series_keys(ws, baseline.run_id) >= SERIES
    assert series(ws, baseline.run_id, "loss") == list(enumerate(baseline.history, 1))
    assert [step for step, _ in series(ws, baseline.run_id, "val_loss")] == [10, 20, 30]
    lr = [value for _, value in series(ws, baseline.run_id, "lr")]
    assert lr[:3] == pytest.approx([1e-3, 2e-3, 3e-3])  # warmup
    assert lr[2:] == sorted(lr[2:], reverse=True) and lr[-1] >= 3e-4  # cosine to min_lr
    for key in ("grad_norm", "tokens_per_s", "memory_mb"):
        values = [value for _, value in series(ws, baseline.run_id, key)]
        assert len(values) == 30 and all(math.isfinite(v) and v > 0 for v in values), key


def test_the_model_version_has_lineage_and_loads_with_plain_transformers(
    ws: Workspace, baseline: TrainResult
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genloop.workspace.datasets import resolve_dataset

    info = baseline.model
    assert info is not None and info.ref == "base@1"
    assert info.run_id == baseline.run_id
    assert info.dataset_version_id == resolve_dataset(ws, DATASET).id
    assert info.config["model"]["n_layer"] == 2 and info.config["train"]["max_steps"] == 30
    assert info.metrics == baseline.metrics

    path = ws.store.open_verified(info.artifact)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    ids = tokenizer("the cat sat on the mat", return_tensors="pt").input_ids
    assert ids.shape[1] > 1 and int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_checkpoints_keep_the_newest_and_the_best(ws: Workspace, baseline: TrainResult) -> None:
    # every 10 steps with keep_last 2; val loss fell at each evaluation, so the best is 30
    assert steps_left(ws, baseline.run_id) == [20, 30]
    assert same_weights(checkpoint_weights(ws, baseline.run_id, 30), model_weights(ws, baseline))


# -- resume ----------------------------------------------------------------------------------


def stop_at(step: int) -> loop.ProgressFn:
    def progress(done: int, total: int, metrics: dict[str, float]) -> None:
        if done == step:
            raise KeyboardInterrupt

    return progress


def test_an_interrupted_run_resumes_exactly_from_its_last_good_checkpoint(
    ws: Workspace, baseline: TrainResult, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config("interrupted")
    with pytest.raises(KeyboardInterrupt):
        train(ws, cfg, progress=stop_at(23))
    run = run_row(ws, name="interrupted")
    assert run.status == "interrupted" and run.error == "interrupted by the user"
    assert steps_left(ws, run.id) == [10, 20]  # Ctrl-C writes no checkpoint of its own
    assert [step for step, _ in series(ws, run.id, "loss")] == list(range(1, 24))

    # the newest checkpoint is damaged: resume falls back to step 10 and forgets 11-23
    model_file = ws.store.path(ckpt.checkpoint_key(run.id, 20)) / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    result = train(ws, cfg, resume=True)

    assert "step 20 is unusable" in caplog.text
    assert result.run_id == run.id and result.steps == 30
    assert result.history == baseline.history  # the same losses, bit for bit
    assert same_weights(model_weights(ws, result), model_weights(ws, baseline))
    assert series(ws, run.id, "loss") == list(enumerate(baseline.history, 1))  # once each
    assert [step for step, _ in series(ws, run.id, "val_loss")] == [10, 20, 30]
    run = run_row(ws, run.id)
    assert run.status == "completed" and run.error is None


def test_a_run_that_failed_after_its_last_step_resumes_to_registration(
    ws: Workspace, baseline: TrainResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    def registry_down(*args: Any, **kwargs: Any) -> Any:
        raise GenloopError("registry down")

    with monkeypatch.context() as m:
        m.setattr(loop, "finish", registry_down)
        with pytest.raises(GenloopError, match="registry down"):
            train(ws, config("late"))
    run = run_row(ws, name="late")
    assert run.status == "failed" and run.error is not None and "registry down" in run.error

    # train.resume in the config continues it: no step left to train, only the version
    result = train(ws, config("late", resume=True))
    assert result.run_id == run.id and result.steps == 30
    assert result.history == baseline.history
    for key in ("loss", "val_loss", "best_val_loss", "val_ppl"):
        assert result.metrics[key] == baseline.metrics[key], key
    assert result.model is not None and result.model.metrics == result.metrics
    assert same_weights(model_weights(ws, result), model_weights(ws, baseline))
    assert len(series(ws, run.id, "loss")) == 30
    assert run_row(ws, run.id).status == "completed"


def test_a_completed_run_is_not_resumed(ws: Workspace, baseline: TrainResult) -> None:
    with pytest.raises(GenloopError, match="already completed"):
        train(ws, config("base"), resume=baseline.run_id)
    with pytest.raises(GenloopError, match="no unfinished training run of 'base'"):
        train(ws, config("base"), resume=True)


def test_train_resume_in_the_config_starts_fresh_when_there_is_nothing_to_resume(
    ws: Workspace,
) -> None:
    result = train(ws, config("fresh", resume=True, max_steps=2, warmup_steps=0))
    assert result.steps == 2 and run_row(ws, result.run_id).status == "completed"


# -- stopping --------------------------------------------------------------------------------


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from genloop.train.objectives import LanguageModeling

    real = LanguageModeling.loss
    calls = []

    def inf_at_step_5(self: Any, model: Any, batch: Any) -> Any:
        loss, n = real(self, model, batch)
        if model.training:
            calls.append(1)
            if len(calls) == 5:
                return loss * math.inf, n
        return loss, n

    monkeypatch.setattr(LanguageModeling, "loss", inf_at_step_5)
    with pytest.raises(TrainingDiverged, match=r"\binf\b.* at step 5\b") as caught:
        train(ws, config("diverged", checkpoint_every=2, eval_every=2))
    run = run_row(ws, name="diverged")
    assert run.status == "failed" and run.error is not None and "step 5" in run.error
    assert str(caught.value) in run.error
    assert steps_left(ws, run.id) == [2, 4]
    found = ckpt.load_latest(ws.store, run.id)  # verifies its manifest
    assert found is not None and found.step == 4
    assert registry.list_models(ws, "diverged") == []
    assert [step for step, _ in series(ws, run.id, "loss")] == [1, 2, 3, 4]


def test_an_absurd_learning_rate_stops_before_a_bad_checkpoint(ws: Workspace) -> None:
    cfg = config("absurd", lr=1e6, min_lr=0, grad_clip=None, warmup_steps=0, checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match=r"at step (\d+)") as caught:
        train(ws, cfg)
    run = run_row(ws, name="absurd")
    assert run.status == "failed" and str(caught.value) in (run.error or "")
    found = ckpt.load_latest(ws.store, run.id)
    assert found is not None
    weights = load_file(str(found.path / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())  # never NaN weights
    for key in ("loss", "grad_norm", "lr"):  # and never a NaN in the catalog
        assert all(math.isfinite(v) for _, v in series(ws, run.id, key))


def scripted_val(monkeypatch: pytest.MonkeyPatch, values: list[float], delay: float = 0.0) -> None:
    """Make the validation loss follow ``values``, one per evaluation."""
    queue = list(values)

    def evaluate(*args: Any) -> float:
        time.sleep(delay)
        return queue.pop(0)

    monkeypatch.setattr(loop, "evaluate_loss", evaluate)


def test_early_stopping_stops_and_restores_the_best_weights(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted_val(monkeypatch, [3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    cfg = config("patience", eval_every=2, checkpoint_every=100, early_stopping_patience=2)
    result = train(ws, cfg)
    assert result.stopped_early and result.steps == 8  # evaluations at 2, 4 (best), 6, 8
    assert result.metrics["best_val_loss"] == 2.0
    assert result.metrics["val_loss"] == 2.0  # the registered weights' validation loss
    best, last = checkpoint_weights(ws, result.run_id, 4), checkpoint_weights(ws, result.run_id, 8)
    assert not same_weights(best, last)
    assert same_weights(model_weights(ws, result), best)
    assert run_row(ws, result.run_id).status == "completed"


def test_keep_last_k_and_the_best(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_val(monkeypatch, [3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    cfg = config("retention", max_steps=12, eval_every=2, checkpoint_every=2, keep_last=2)
    result = train(ws, cfg)
    assert steps_left(ws, result.run_id) == [4, 10, 12]
    assert ckpt.load_latest(ws.store, result.run_id) is not None


# -- the step itself -------------------------------------------------------------------------


def test_gradient_accumulation_matches_one_bigger_batch(ws: Workspace) -> None:
    def first_step(name: str, batch_size: int, grad_accum: int) -> tuple[TrainResult, Any]:
        cfg = config(name, max_steps=1, warmup_steps=0, batch_size=batch_size)
        cfg.model.dropout = 0.0
        cfg.train.grad_accum = grad_accum
        # fp32: in bf16 the two batch shapes round g differently, and Adam's first update
        # (about lr·sign(g)) flips wherever g is near 0
        cfg.train.precision = "fp32"
        result = train(ws, cfg)
        return result, model_weights(ws, result)

    big, big_weights = first_step("batch8", 8, 1)
    acc, acc_weights = first_step("batch4x2", 4, 2)
    _, small_weights = first_step("batch4", 4, 1)
    assert acc.history[0] == pytest.approx(big.history[0], rel=1e-6)
    # Adam's first update is about lr·sign(g) (lr = 3e-3): rounding in g moves it by far
    # less than 0.1% of that, while a different batch moves it by the whole update
    for key, value in big_weights.items():
        torch.testing.assert_close(acc_weights[key], value, rtol=0, atol=3e-6)
    worst = max(float((small_weights[k] - v).abs().max()) for k, v in big_weights.items())
    assert worst > 1e-3  # the test can tell a different batch apart


def test_tokens_per_s_counts_training_time_only(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted_val(monkeypatch, [3.0, 2.9], delay=0.3)  # a slow evaluation ...
    real_save = ckpt.save_checkpoint

    def slow_save(*args: Any, **kwargs: Any) -> str:
        time.sleep(0.3)  # ... and a slow disk
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", slow_save)
    rates: list[float] = []
    cfg = config("throughput", max_steps=2, warmup_steps=0, eval_every=1, checkpoint_every=1)
    train(ws, cfg, progress=lambda step, total, m: rates.append(m["tokens_per_s"]))
    tokens_per_step = 8 * 32
    # one step of this model takes well under 0.25 s; with eval and checkpoint time
    # counted, a step would "take" over 0.6 s
    assert len(rates) == 2 and min(rates) > tokens_per_step / 0.25
