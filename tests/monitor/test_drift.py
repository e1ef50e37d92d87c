"""Drift: divergences, features, reference profiles, and alerts on synthetic traffic.

Traffic goes through the real ``record_request`` for copies of a tiny model trained on
the fixture corpus, so features come from its real tokenizer and the training profile
from its real token shards.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from genloop.config import MonitorConfig
from genloop.monitor.alerts import list_alerts
from genloop.monitor.drift import (
    TOKEN_BUCKETS,
    DriftMonitor,
    Featurizer,
    bernoulli_psi,
    featurizer_for,
    histogram,
    is_refusal,
    kl_divergence,
    load_profile,
    psi,
    quantile_edges,
    repetition,
    reset_profile,
    series,
)
from genloop.monitor.usage import RequestRecord, record_request, record_requests
from genloop.workspace import Workspace, registry

PROSE = (
    "the cat sat on the mat and the dog ran to the park while birds sang in the tall green "
    "trees near a quiet river where children play every sunny day"
)
WORDS = PROSE.split()
GREEK_PROSE = "η γάτα κάθισε στο χαλί και ο σκύλος έτρεξε στο πάρκο ενώ τα πουλιά τραγουδούσαν"
GREEK = GREEK_PROSE.split()

Request = tuple[str, str, float]  # prompt, response, mean logprob
Traffic = Callable[[random.Random], Request]


def sentence(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n)) + "."


def normal(rng: random.Random) -> Request:
    """Prompts and answers like the training corpus."""
    return (
        sentence(rng, WORDS, rng.randint(5, 15)),
        sentence(rng, WORDS, rng.randint(8, 20)),
        rng.gauss(-2.0, 0.3),
    )


def foreign(rng: random.Random) -> Request:
    """Drifted prompts: another script, three times longer."""
    return (
        sentence(rng, GREEK, rng.randint(20, 40)),
        sentence(rng, WORDS, rng.randint(8, 20)),
        rng.gauss(-2.0, 0.3),
    )


def degenerate(rng: random.Random) -> Request:
    """Usual prompts, but the model loops, answers longer and is less sure of itself."""
    loop = " ".join(["the cat sat on the mat"] * rng.randint(4, 8))
    return sentence(rng, WORDS, rng.randint(5, 15)), loop, rng.gauss(-3.5, 0.3)


def refusing(rng: random.Random) -> Request:
    prompt, response, lp = normal(rng)
    if rng.random() < 0.4:
        response = "I'm sorry, but I can't help with that."
    return prompt, response, lp


def send(ws: Workspace, model: str, traffic: Traffic, n: int, seed: int) -> None:
    """``n`` requests of ``model``@1, recorded in batches as the server's recorder does."""
    rng = random.Random(seed)
    feat = featurizer_for(ws, model, 1)
    assert feat is not None
    batch = []
    for _ in range(n):
        prompt, response, lp = traffic(rng)
        batch.append(
            RequestRecord(
                request_id=uuid.uuid4().hex,
                endpoint="completions",
                model_name=model,
                model_version=1,
                prompt=prompt,
                response=response,
                prompt_tokens=len(feat.encode(prompt)),
                completion_tokens=len(feat.encode(response)),
                latency_ms=20.0,
                mean_logprob=lp,
            )
        )
    for i in range(0, n, 50):
        record_requests(ws, None, batch[i : i + 50], store_text=False)


def clone(ws: Workspace, ref: str, name: str) -> str:
    """A copy of the trained model under a new name (its own traffic and profile)."""
    info = registry.resolve(ws, ref)
    registry.register_model(
        ws,
        name,
        "causal_lm",
        ws.store.path(info.artifact),
        dataset_version_id=info.dataset_version_id,
    )
    return name


CFG = MonitorConfig(reference_window=200, window=200)


# ------------------------------------------------------------------------- the maths


def test_psi_and_kl_properties() -> None:
    a, b = [500, 300, 200], [200, 300, 500]
    assert psi(a, a) == 0 and kl_divergence(a, a) == 0
    assert psi(a, b) == pytest.approx(psi(b, a))  # PSI is symmetric …
    assert kl_divergence([900, 100], [500, 500]) != pytest.approx(
        kl_divergence([500, 500], [900, 100])
    )  # … KL is not
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    big = 10**9  # smoothing negligible: the textbook values
    assert psi(q * big, p * big) == pytest.approx(float(np.sum((p - q) * np.log(p / q))))
    assert kl_divergence(p * big, q * big) == pytest.approx(float(np.sum(p * np.log(p / q))))
    assert math.isfinite(psi([10, 0], [0, 10]))  # empty bins are smoothed, not infinite
    assert bernoulli_psi((10, 1000), (10, 1000)) == 0
    with pytest.raises(ValueError, match="differ in size"):
        psi([1, 2], [1, 2, 3])


def test_quantile_bins() -> None:
    values = list(range(100))
    edges = quantile_edges(values, 4)
    assert edges == pytest.approx([0, 24.75, 49.5, 74.25, 99])
    assert edges[-1] > 99  # just above the maximum
    assert histogram(values, edges) == [0, 25, 25, 25, 25, 0]
    assert histogram([-5, 150], edges) == [1, 0, 0, 0, 0, 1]  # outside what was seen
    zeros = quantile_edges([0.0] * 50, 10)  # ties merge into fewer bins …
    assert len(zeros) == 2
    assert histogram([0.0, 0.0, 0.8], zeros) == [0, 2, 1]  # … but "more" stays apart


def test_text_features() -> None:
    assert repetition(list("abcdef")) == 0
    assert repetition(("the cat sat " * 10).split()) > 0.8
    assert repetition(["a", "b"]) == 0
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("  As an AI, I cannot do that")
    assert not is_refusal("Sure! The cat sat on the mat.")


def test_featurizer_counts_unknown_tokens(trained: tuple[Workspace, str]) -> None:
    ws, ref = trained
    feat = Featurizer.from_dir(ws.store.path(registry.resolve(ws, ref).artifact))
    english = feat.encode("the cat sat on the mat")
    greek = feat.encode("η γάτα κάθισε στο χαλί")
    counts, unk = feat.token_stats(english)
    assert unk == 0 and counts.sum() == len(english) and counts.size == TOKEN_BUCKETS
    _, unk_greek = feat.token_stats(greek)
    assert unk_greek > len(greek) / 2  # Greek falls apart into bytes the merges never saw
    _, unk_bad = feat.token_stats([10**6])  # an id outside the vocabulary is unknown too
    assert unk_bad == 1


def test_training_profile_comes_from_the_token_shards(trained: tuple[Workspace, str]) -> None:
    ws, ref = trained
    model = clone(ws, ref, "drift-profile")
    profile = DriftMonitor().profile(ws, CFG, model)
    training = profile["training"]
    assert training["dataset"] == "fx@1" and training["documents"] > 10
    assert sum(training["tokens"]) > 1000
    k, n = training["rates"]["unk_rate"]
    assert n == sum(training["tokens"]) and k == 0  # ASCII prose: nothing unknown
    assert profile["traffic"] is None  # no requests yet
    assert load_profile(ws, model) == profile  # stored in the artifact store


def test_undrifted_traffic_is_quiet_and_drifted_traffic_alerts(
    trained: tuple[Workspace, str], receiver: Any
) -> None:
    ws, ref = trained
    model = clone(ws, ref, "drift-prompts")
    cfg = CFG.model_copy(update={"webhook_url": receiver.url})
    monitor = DriftMonitor()

    send(ws, model, normal, 150, seed=1)
    early = monitor.check(ws, cfg, model)  # no traffic reference yet: training data only
    assert early.status == "warming_up" and early.drifted == []
    assert "kl_tokens_train" in early.scores  # scored, but no alert before the reference

    send(ws, model, normal, 50, seed=2)  # completes the 200-request reference
    send(ws, model, normal, 200, seed=3)
    quiet = monitor.check(ws, cfg, model)
    assert quiet.status == "ok" and quiet.drifted == [] and quiet.alert_id is None
    assert quiet.reference_requests == 200 and quiet.recent_requests == 200
    assert {"psi_prompt_len", "psi_output_len", "psi_logprob", "kl_tokens"} <= set(quiet.scores)
    against_reference = {k: v for k, v in quiet.scores.items() if "train" not in k}
    assert all(v < 0.1 for v in against_reference.values()), quiet.scores
    assert list_alerts(ws, source=model) == []

    send(ws, model, foreign, 200, seed=4)
    drifted = monitor.check(ws, cfg, model)
    assert drifted.status == "drift" and drifted.alert_id is not None
    assert {"psi_prompt_len", "kl_tokens", "psi_unk_rate"} <= set(drifted.drifted)
    assert "psi_output_len" not in drifted.drifted  # the answers did not change
    [alert] = list_alerts(ws, source=model)
    assert alert.kind == "drift" and alert.id == drifted.alert_id
    assert alert.details["scores"]["kl_tokens"] > cfg.kl_threshold
    [body] = receiver.wait(1)
    assert body["id"] == alert.id and body["kind"] == "drift"

    again = monitor.check(ws, cfg, model)  # still drifted: cooling down, no second alert
    assert again.status == "drift" and again.alert_id is None
    assert len(list_alerts(ws, source=model)) == 1

    points = series(ws, model)  # every check's scores, over time
    assert len(points["kl_tokens"]) == 3 and points["kl_tokens"][-1][1] > cfg.kl_threshold


def test_output_quality_drift_alerts_without_prompt_drift(trained: tuple[Workspace, str]) -> None:
    ws, ref = trained
    model = clone(ws, ref, "drift-quality")
    send(ws, model, normal, 200, seed=5)
    send(ws, model, degenerate, 200, seed=6)
    report = DriftMonitor().check(ws, CFG, model)
    assert report.status == "drift"
    assert {"psi_repetition", "psi_output_len", "psi_logprob"} <= set(report.drifted)
    assert not {"psi_prompt_len", "kl_tokens", "psi_unk_rate"} & set(report.drifted)


def test_refusal_rate_drift(trained: tuple[Workspace, str]) -> None:
    ws, ref = trained
    model = clone(ws, ref, "drift-refusals")
    send(ws, model, normal, 200, seed=7)
    send(ws, model, refusing, 200, seed=8)
    report = DriftMonitor().check(ws, CFG, model)
    assert "psi_refusal_rate" in report.drifted


def test_foreign_traffic_from_the_start_alerts_against_the_training_data(
    trained: tuple[Workspace, str],
) -> None:
    ws, ref = trained
    model = clone(ws, ref, "drift-early")
    send(ws, model, foreign, 60, seed=9)
    report = DriftMonitor().check(ws, CFG, model)
    assert report.status == "drift" and report.drifted == ["psi_unk_rate_train"]
    assert report.scores["kl_tokens_train"] > CFG.kl_threshold


def test_reset_takes_a_new_reference_and_little_traffic_is_no_verdict(
    trained: tuple[Workspace, str],
) -> None:
    ws, ref = trained
    model = clone(ws, ref, "drift-reset")
    send(ws, model, normal, 200, seed=10)
    monitor = DriftMonitor()
    assert monitor.check(ws, CFG, model).status == "no_traffic"  # nothing after the reference
    assert monitor.profile(ws, CFG, model)["traffic"]["requests"] == 200
    reset_profile(ws, model)
    assert load_profile(ws, model)["traffic"] is None  # type: ignore[index]
    send(ws, model, foreign, 200, seed=11)  # the new normal
    assert monitor.profile(ws, CFG, model)["traffic"]["requests"] == 200
    send(ws, model, foreign, 200, seed=12)
    report = monitor.check(ws, CFG, model)
    assert "kl_tokens" not in report.drifted and "psi_prompt_len" not in report.drifted
    # the reference itself is far from the training data, so that is not an alert
    assert report.scores["kl_tokens_train"] > CFG.kl_threshold
    assert "kl_tokens_train" not in report.drifted


def test_a_model_genloop_does_not_have_is_monitored_on_traffic_only(
    workspace: Workspace,
) -> None:
    for i in range(60):
        record_request(
            workspace,
            None,
            RequestRecord(
                request_id=f"r{i}",
                endpoint="chat.completions",
                model_name="upstream-gpt",
                prompt="hi",
                response="hello " * (i % 5 + 1),
                prompt_tokens=3,
                completion_tokens=i % 5 + 1,
            ),
            store_text=False,
        )
    cfg = MonitorConfig(reference_window=30, window=30)
    report = DriftMonitor().check(workspace, cfg, "upstream-gpt")
    assert report.status == "ok" and "kl_tokens" not in report.scores
    assert "psi_output_len" in report.scores


def test_cli_drift_alerts_and_profile(trained: tuple[Workspace, str]) -> None:
    ws, ref = trained
    model = clone(ws, ref, "drift-cli")
    send(ws, model, normal, 200, seed=13)
    send(ws, model, foreign, 200, seed=14)
    sets = ["--set", "monitor.reference_window=200", "--set", "monitor.window=200"]

    checked = genloop("monitor", "drift", model, *sets, "--json", home=ws.root)
    report = json.loads(checked.stdout)
    assert report["status"] == "drift" and "kl_tokens" in report["drifted"]
    alert_id = report["alert_id"]
    listed = json.loads(
        genloop("monitor", "alerts", "--kind", "drift", "--json", home=ws.root).stdout
    )
    assert alert_id in [a["id"] for a in listed]

    shown = genloop("monitor", "profile", model, *sets, home=ws.root).stdout
    assert "fx@1" in shown and "200 requests" in shown


def genloop(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """The real command in a subprocess (user errors return, others fail the test)."""
    script = Path(sys.executable).with_name("genloop")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "genloop"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENLOOP_")}
    env |= {"GENLOOP_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"}
    done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode in (0, 1, 2), done.stderr
    return done
