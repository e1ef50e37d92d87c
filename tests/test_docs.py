"""The CLI and HTTP reference pages are generated from the code: they must stay current."""

from __future__ import annotations

from pathlib import Path

from genloop.docs_gen import cli_reference, http_reference

DOCS = Path(__file__).resolve().parents[1] / "docs"
HOW = "out of date: run '.venv/bin/python scripts/gen_docs.py'"


def test_cli_reference_is_current() -> None:
    text = cli_reference()
    assert "`genloop quickstart`" in text and "`genloop serve`" in text
    assert (DOCS / "cli.md").read_text() == text, HOW


def test_http_reference_is_current_and_names_each_scope() -> None:
    text = http_reference()
    assert "## `POST /v1/chat/completions`" in text and "Scope: `admin`" in text
    assert (DOCS / "http.md").read_text() == text, HOW
