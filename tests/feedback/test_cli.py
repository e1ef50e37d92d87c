"""``genloop feedback …``, ``genloop retrain`` and ``genloop loop`` as a user runs them."""

from __future__ import annotations

import json
from typing import Any

from genloop.feedback.store import submit_feedback
from genloop.security.crypto import Cipher
from genloop.workspace import Workspace, registry

SKY = "Q: what colour is the sky over {}? A:"


def test_list_show_review_and_export(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, cli: Any
) -> None:
    model = new_model()
    ids = [
        submit_feedback(
            ws,
            cipher,
            response_id=log(model, SKY.format(city), " green."),
            rating=-1,
            correction=" blue.",
            comment="[bold]not markup[/]",
            user_id=f"u{i}",
        )
        for i, city in enumerate(["oslo", "lima", "rome"])
    ]
    ran = cli("feedback", "list", "--model", model.name, "--json")
    assert ran.returncode == 0, ran.stderr
    listed = json.loads(ran.stdout)
    assert [r["id"] for r in listed] == ids[::-1] and listed[0]["correction"] is None

    ran = cli("feedback", "show", str(ids[0]))
    assert ran.returncode == 0, ran.stderr
    assert "Q: what colour is the sky over oslo? A:" in ran.stdout and " blue." in ran.stdout
    assert "[bold]not markup[/]" in ran.stdout  # user text is printed as it is
    shown = json.loads(cli("feedback", "show", str(ids[0]), "--json").stdout)
    assert shown["correction"] == " blue." and shown["model"] == model.ref

    assert cli("feedback", "approve", str(ids[0]), str(ids[1])).stdout.startswith("approved 2")
    assert cli("feedback", "reject", str(ids[2])).returncode == 0
    ran = cli("feedback", "list", "-m", model.name, "-s", "pending", "--json")
    assert json.loads(ran.stdout) == []

    ran = cli(
        "feedback", "export", "--format", "sft", "--model", model.name,
        "--set", "feedback.review_required=true", "--json",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["rows"] == 2 and out["dataset"] == f"{model.name}-feedback@1"  # approved only
    assert out["curation"]["input"] == 2 and out["curation"]["dropped"] == {}

    ran = cli("feedback", "show", "999999")
    assert ran.returncode == 1 and ran.stderr.strip() == "error: no feedback with id 999999"
    ran = cli("feedback", "export", "--format", "csv", "--model", model.name)
    assert ran.returncode == 1 and "unknown export format 'csv'" in ran.stderr


def test_retrain_exits_1_when_the_gate_keeps_the_candidate_out(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, cli: Any, config: Any, yaml_config: Any
) -> None:
    model = new_model()
    for i, city in enumerate(["oslo", "lima", "rome"]):
        rid = log(model, SKY.format(city), " green.")
        submit_feedback(ws, cipher, response_id=rid, rating=-1, correction=" blue.", user_id=f"{i}")
    strict = config(gate={"rules": [{"metric": "perplexity", "op": "max", "value": 1.0}]})
    ran = cli("retrain", f"{model.name}@production", "--config", yaml_config(strict), "--json")
    assert ran.returncode == 1, ran.stderr
    out = json.loads(ran.stdout)
    assert out["outcome"] == "rejected" and out["production"] == model.ref
    assert registry.resolve(ws, f"{model.name}@production").ref == model.ref

    ran = cli("retrain", model.name)
    assert ran.returncode == 2 and "retrain needs NAME@ALIAS" in ran.stderr


def test_loop_once_retrains_what_is_due(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, cli: Any, config: Any, yaml_config: Any
) -> None:
    model = new_model()
    other = new_model()  # no feedback: not due
    for i, city in enumerate(["oslo", "lima", "rome"]):
        rid = log(model, SKY.format(city), " green.")
        submit_feedback(ws, cipher, response_id=rid, rating=-1, correction=" blue.", user_id=f"{i}")
    path = yaml_config(config())
    ran = cli("loop", "--once", "--config", path, "-m", model.name, "-m", other.name)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"{model.name}@production: retraining (min_items: 3 new" in ran.stdout
    assert f"{model.name}@production: promoted" in ran.stdout
    assert other.name not in ran.stdout
    assert registry.resolve(ws, f"{model.name}@production").version == 2


def test_an_export_that_curation_empties_fails(
    ws: Workspace, cipher: Cipher, new_model: Any, log: Any, cli: Any
) -> None:
    model = new_model()
    rid = log(model, SKY.format("oslo"), " green.")
    submit_feedback(ws, cipher, response_id=rid, rating=-1)  # no correction: no sft answer
    ran = cli("feedback", "export", "--model", model.name, "--json")
    assert ran.returncode == 1 and json.loads(ran.stdout)["dataset"] is None
    ran = cli("feedback", "export", "--model", model.name)
    assert ran.returncode == 1 and "no sft rows left to export after curation" in ran.stderr
