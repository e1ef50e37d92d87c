"""``genloop data prepare | list | show`` as a user runs them: the real command in a
subprocess, a workspace in ``GENLOOP_HOME``, a config file next to its corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genloop.workspace import init_workspace

_SCRIPT = Path(sys.executable).with_name("genloop")
GENLOOP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "genloop"]

CONFIG = """\
data:
  name: notes
  sources:
    - type: files
      paths: [corpus]          # relative: taken from this file's folder
  split: {val: 0.2, test: 0.2}
tokenizer:
  vocab_size: 300
"""


def genloop(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENLOOP_")}
    env |= {"GENLOOP_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [*GENLOOP, *args], env=env, cwd=home.parent, capture_output=True, text=True, timeout=120
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """A user error: exit ``code``, one line on stderr, no traceback."""
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An initialized workspace; commands run from tmp_path, not from the project folder."""
    home = tmp_path / "ws"
    init_workspace(home).close()  # `genloop init` itself is tested in test_cli.py
    return home


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """``project/cfg.yaml`` and the corpus it names: 12 documents and 2 malformed lines."""
    project = tmp_path / "project"
    corpus = project / "corpus"
    corpus.mkdir(parents=True)
    for i in range(8):
        text = f"Note {i}: the river carries quiet stones under bridge number {i * 7} today."
        (corpus / f"{i}.txt").write_text(text, encoding="utf-8")
    lines = [
        json.dumps({"text": f"Row {i}: markets trade bread and maps, item {i * 13}."})
        for i in range(4)
    ]
    lines[1:1] = ["{broken", "[1, 2"]
    (corpus / "rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (project / "cfg.yaml").write_text(CONFIG, encoding="utf-8")
    return project


def test_prepare_list_show(home: Path, project: Path) -> None:
    cfg = str(project / "cfg.yaml")
    out = ok(genloop("data", "prepare", cfg, "--workers", "1", home=home))
    lines = out.splitlines()
    assert lines[0].startswith("created dataset notes@1: 12 documents, ")
    assert "tokens in " in lines[0]
    assert lines[1] == "dropped: bad_json 2"

    again = ok(genloop("data", "prepare", cfg, home=home))
    assert again.startswith("unchanged, reusing dataset notes@1: 12 documents")

    changed = genloop(
        "data", "prepare", cfg, "-j", "1", "--set", "data.clean.min_chars=60", "--json", home=home
    )
    info = json.loads(ok(changed))
    assert (info["ref"], info["created"]) == ("notes@2", True)
    assert info["stats"]["drops"]["too_short"] > 0

    listed = json.loads(ok(genloop("data", "list", "--json", home=home)))
    assert [(d["name"], d["version"]) for d in listed] == [("notes", 1), ("notes", 2)]
    assert listed[0]["stats"]["documents"] == 12

    shown = json.loads(ok(genloop("data", "show", "notes", "--json", home=home)))
    assert shown["version"] == 2 and Path(shown["path"]).is_dir()
    assert (Path(shown["path"]) / "card.md").is_file()

    first = ok(genloop("data", "show", "notes@1", home=home))
    assert first.startswith("notes@1 (text, ready) at ")
    for word in ("splits", "train", "normalize", "quality", "pii", "all drops: bad_json 2"):
        assert word in first
    card = ok(genloop("data", "show", "notes@1", "--card", home=home))
    assert "Dataset card: notes" in card and "bad_json" in card

    table = ok(genloop("data", "list", home=home))
    assert "notes@1" in table and "notes@2" in table

    assert "no version 9" in one_line_error(genloop("data", "show", "notes@9", home=home), 1)
    assert "no dataset named 'nope'" in one_line_error(
        genloop("data", "show", "nope", home=home), 1
    )
    assert "invalid dataset ref" in one_line_error(genloop("data", "show", "notes@x", home=home), 2)


def test_config_mistakes_are_one_line(home: Path, project: Path) -> None:
    unknown = project / "unknown.yaml"
    unknown.write_text(CONFIG.replace("  split:", "  dedupe: {exact: true}\n  split:"))
    line = one_line_error(genloop("data", "prepare", str(unknown), home=home), 2)
    assert "'data.dedupe'" in line and "did you mean 'data.dedup'" in line

    missing = project / "missing.yaml"
    missing.write_text(CONFIG.replace("[corpus]", "[no-such-folder/*.txt]"))
    line = one_line_error(genloop("data", "prepare", str(missing), home=home), 1)
    assert "'no-such-folder'" in line

    nosection = project / "nodata.yaml"
    nosection.write_text("tokenizer: {vocab_size: 300}\n")
    assert "no 'data:' section" in one_line_error(
        genloop("data", "prepare", str(nosection), home=home), 2
    )
    pretrained = project / "pretrained.yaml"
    pretrained.write_text(CONFIG.replace("  vocab_size: 300", "  kind: pretrained\n  path: tok"))
    assert "'tok' does not exist" in one_line_error(
        genloop("data", "prepare", str(pretrained), home=home), 1
    )
    bad_set = genloop(
        "data",
        "prepare",
        str(project / "cfg.yaml"),
        "--set",
        "data.clean.min_chars=many",
        home=home,
    )
    assert "data.clean.min_chars" in one_line_error(bad_set, 2)


def test_import_labeled_rows(home: Path, tmp_path: Path) -> None:
    from genloop.data.tokenizer import train_bpe

    tok = train_bpe(["a fine film", "a dull film"] * 20, tmp_path / "tok", vocab_size=300)
    rows = tmp_path / "reviews.jsonl"
    labels = ["pos", "neg"] * 10
    rows.write_text(
        "".join(
            json.dumps({"text": f"film {i} was {lab}", "label": lab}) + "\n"
            for i, lab in enumerate(labels)
        ),
        encoding="utf-8",
    )
    args = ["data", "import", str(rows), "--name", "reviews", "--kind", "classification"]
    out = ok(genloop(*args, "--tokenizer", str(tok), "--json", home=home))
    info = json.loads(out)
    assert info["ref"] == "reviews@1" and info["kind"] == "classification"
    assert info["stats"]["rows"] == 20
    assert info["lineage"]["file"] == "reviews.jsonl"
    # the same file again is the same version, not a new one
    assert "reviews@1" in ok(genloop(*args, "--tokenizer", str(tok), home=home))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a film"}) + "\n", encoding="utf-8")
    line = one_line_error(
        genloop(
            "data",
            "import",
            str(bad),
            "-n",
            "bad",
            "--kind",
            "classification",
            "--tokenizer",
            str(tok),
            home=home,
        ),
        1,
    )
    assert "bad.jsonl:1: missing label" in line
    kind = one_line_error(
        genloop(
            "data",
            "import",
            str(rows),
            "-n",
            "x",
            "--kind",
            "labels",
            "--tokenizer",
            str(tok),
            home=home,
        ),
        2,
    )
    assert "--kind must be one of" in kind


CODE_CONFIG = """\
data:
  name: code
  kind: code
  sources: [{type: code, path: src}]
  code: {require_parse: false, format: true}
  split: {val: 0.0, test: 0.0}
tokenizer:
  vocab_size: 300
"""


def test_prepare_formats_code_with_ruff(home: Path, tmp_path: Path) -> None:
    project = tmp_path / "code"
    src = project / "src"
    src.mkdir(parents=True)
    for i in range(3):  # badly formatted, and the same once formatted
        (src / f"messy{i}.py").write_text(f"def f{i}(a,b):\n\treturn {{'k':a+b, 'i':{i}}}\n")
    (src / "tidy.py").write_text('def tidy(a: int) -> int:\n    return {"k": a}["k"]\n')
    (src / "broken.py").write_text("def broken(:\n    return 1\n")
    (src / "docstring.py").write_text('def g():\n  """Ruff re-indents this.\n  """\n')
    (src / "app.js").write_text("function f(a) {\n  return a + 1;\n}\n")
    (project / "cfg.yaml").write_text(CODE_CONFIG)
    out = ok(genloop("data", "prepare", str(project / "cfg.yaml"), "-j", "2", "--json", home=home))
    stats = json.loads(out)["stats"]
    step = next(s for s in stats["steps"] if s["name"] == "format_code")
    assert (step["seen"], step["kept"], step["changed"]) == (7, 6, 4)
    assert step["dropped"] == {"unformattable": 1}
    assert stats["drops"] == {"unformattable": 1}

    shown = json.loads(ok(genloop("data", "show", "code", "--json", home=home)))
    path = Path(shown["path"])
    docs = {
        d["id"]: d["text"]
        for d in map(json.loads, (path / "docs" / "train.jsonl").read_text().splitlines())
    }
    assert sorted(docs) == [
        "app.js",
        "docstring.py",
        "messy0.py",
        "messy1.py",
        "messy2.py",
        "tidy.py",
    ]
    assert docs["docstring.py"] == 'def g():\n    """Ruff re-indents this."""'  # kept, re-indented
    assert docs["messy1.py"] == 'def f1(a, b):\n    return {"k": a + b, "i": 1}'
    quarantine = [json.loads(line) for line in (path / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["id"], q["stage"], q["reason"]) for q in quarantine] == [
        ("broken.py", "format_code", "unformattable")
    ]
    assert quarantine[0]["detail"].startswith("1:12: ")  # ruff's line:column
    card = (path / "card.md").read_text()
    assert "| format_code | 7 | 6 | 4 | unformattable: 1 |" in card
