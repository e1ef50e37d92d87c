"""``genloop secrets``: named secrets in the workspace, encrypted (upstream keys)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from genloop.cli.context import console, open_workspace, print_json
from genloop.cli.keys import cli_actor

app = typer.Typer(
    help="Named secrets kept encrypted in the workspace: the keys genloop sends to upstream "
    "servers (serve.upstreams[].api_key_secret).",
    no_args_is_help=True,
)

NameArg = Annotated[str, typer.Argument(help="The secret's name (letters, digits, _ . -).")]


@app.command("set")
def set_(name: NameArg) -> None:
    """Store a secret; its value is read from stdin (piped) or a hidden prompt, never from
    the command line (it would stay in the shell's history)."""
    from genloop.security.secret_store import check_name, set_secret

    check_name(name)
    if sys.stdin.isatty():
        value = typer.prompt(f"value of {name}", hide_input=True)
    else:
        value = sys.stdin.readline()
    with open_workspace() as ws:
        replaced = set_secret(ws, name, value, actor=cli_actor())
    console.print(f"{'replaced' if replaced else 'stored'} secret {name} (encrypted)")


@app.command("list")
def list_(
    json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The names of the stored secrets (never their values)."""
    from genloop.security.secret_store import list_secrets

    with open_workspace() as ws:
        names = list_secrets(ws)
    if json:
        print_json(names)
    else:
        console.print("\n".join(names) if names else "no secrets stored", highlight=False)


@app.command("rm")
def rm(name: NameArg) -> None:
    """Delete a secret."""
    from genloop.security.secret_store import delete_secret

    with open_workspace() as ws:
        delete_secret(ws, name, actor=cli_actor())
    console.print(f"deleted secret {name}", highlight=False)
