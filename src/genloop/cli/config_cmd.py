"""``genloop config``: show a resolved config, validate it, export the JSON Schema."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from genloop.cli.context import console, print_json

if TYPE_CHECKING:
    from genloop.config import GenloopConfig

app = typer.Typer(
    help="Pipeline configs: show one resolved, validate it, export the JSON Schema.",
    no_args_is_help=True,
)

FileArg = Annotated[Path, typer.Argument(help="Pipeline YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a key, e.g. --set train.lr=3e-4 (value read as YAML); repeatable.",
        show_default=False,
    ),
]


def _load(file: Path, overrides: list[str] | None) -> GenloopConfig:
    from genloop.config import load_config

    return load_config(file, overrides or ())


@app.command()
def show(
    file: FileArg,
    set_: SetOpt = None,
    json: Annotated[bool, typer.Option("--json", help="Print JSON instead of YAML.")] = False,
) -> None:
    """Print the config with every default filled in and overrides applied.

    Passwords inside URLs (database_url, redis_url) are masked.
    """
    data = _mask_passwords(_load(file, set_).model_dump(mode="json"))
    if json:
        print_json(data)
        return
    text = _to_yaml(data)
    if console.is_terminal:
        from rich.syntax import Syntax

        console.print(Syntax(text, "yaml", background_color="default"))
    else:
        sys.stdout.write(text)


@app.command()
def validate(file: FileArg, set_: SetOpt = None) -> None:
    """Check a config; print 'FILE: ok' or one line naming what is wrong (exit 2)."""
    _load(file, set_)
    console.print(f"{file}: ok", highlight=False, markup=False)


@app.command()
def schema(
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write to this file instead of printing.", dir_okay=False),
    ] = None,
) -> None:
    """Export the JSON Schema of pipeline files (for editor completion and checks)."""
    import json

    from genloop.config import config_schema

    data = config_schema()
    if out is None:
        print_json(data)
        return
    out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    console.print(f"wrote {out}", highlight=False, markup=False)


def _mask_passwords(value: Any) -> Any:
    """``scheme://user:secret@host`` → ``scheme://user:***@host``, anywhere in the data."""
    if isinstance(value, dict):
        return {k: _mask_passwords(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_passwords(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"^([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@/\s]+@", r"\1***@", value)
    return value


def _to_yaml(data: dict[str, Any]) -> str:
    """YAML in the field order of the models; multi-line strings as ``|`` blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def str_block(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, str_block)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True)
