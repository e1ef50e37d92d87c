"""``genloop config show | validate | schema``, in process and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from genloop.cli.main import app
from genloop.config import GenloopConfig, load_config
from genloop.errors import ConfigError

runner = CliRunner()

GOOD = """\
name: demo
data:
  name: stdlib
  kind: code
  sources:
    - type: builtin
      name: python-stdlib
train:
  lr: 3e-4
  max_steps: 200
"""

BAD = """\
train:
  lerning_rate: 3e-4
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_show_prints_the_resolved_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = runner.invoke(
        app, ["config", "show", str(path), "--set", "train.warmup_steps=5", "-s", "serve.port=9001"]
    )
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["lr"] == 3e-4 and shown["train"]["warmup_steps"] == 5
    assert shown["serve"]["port"] == 9001
    assert shown["serve"]["host"] == "127.0.0.1"  # defaults are filled in
    assert shown["tokenizer"]["chat_template"] == GenloopConfig().tokenizer.chat_template
    # what show prints loads back to the same config
    again = load_config(write(tmp_path, result.stdout, "shown.yaml"))
    assert again == load_config(path, ["train.warmup_steps=5", "serve.port=9001"])


def test_show_json(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "show", str(write(tmp_path, GOOD)), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["data"]["sources"] == [
        {
            "type": "builtin",
            "name": "python-stdlib",
            "max_files": None,
            "count": None,
            "size": None,
            "seed": None,
        }
    ]
    assert data["tune"] is None


def test_validate(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{path}: ok"
    result = runner.invoke(app, ["config", "validate", str(path), "--set", "train.lr=-1"])
    assert isinstance(result.exception, ConfigError)
    assert "invalid value for 'train.lr' in --set train.lr=-1" in str(result.exception)


def test_schema_prints_or_writes_json(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "schema"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert "train" in printed["properties"]
    out = tmp_path / "genloop.schema.json"
    result = runner.invoke(app, ["config", "schema", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text(encoding="utf-8")) == printed


def test_bad_config_in_a_real_process_is_one_line_and_exit_2(tmp_path: Path) -> None:
    write(tmp_path, BAD, "bad.yaml")
    exe = Path(sys.executable).with_name("genloop")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "genloop"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENLOOP_")}
    proc = subprocess.run(
        [*command, "config", "show", "bad.yaml"],
        cwd=tmp_path,
        env=env | {"COLUMNS": "60"},  # a narrow terminal must not wrap the line
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unknown key 'train.lerning_rate' in bad.yaml")
    assert "did you mean 'train.lr'?" in lines[0]
    assert "Traceback" not in proc.stderr


def test_show_masks_passwords_in_urls(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "workspace:\n  database_url: postgresql+psycopg://app:s3cret@db:5432/genloop\n"
        "serve:\n  redis_url: redis://:hunter2@127.0.0.1:6379/0\n"
        "  upstreams: {m: ['https://10.0.0.1:8000/v1@x']}\n",
    )
    result = runner.invoke(app, ["config", "show", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.stdout and "hunter2" not in result.stdout
    data = json.loads(result.stdout)
    assert data["workspace"]["database_url"] == "postgresql+psycopg://app:***@db:5432/genloop"
    assert data["serve"]["redis_url"] == "redis://:***@127.0.0.1:6379/0"
    # an "@" in a path is no password: the URL is shown as it is
    assert [u["url"] for u in data["serve"]["upstreams"]["m"]] == ["https://10.0.0.1:8000/v1@x"]
