"""``genloop privacy``: a user's data (right of access), erasure, and retention purges."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from genloop.cli.context import console, open_workspace, print_json

app = typer.Typer(
    help="What genloop holds about a user: export it, erase it; purge data past retention.",
    no_args_is_help=True,
)

UserOpt = Annotated[
    str, typer.Option("--user", "-u", help="The user id (the client's 'user', or the key's).")
]


@app.command()
def export(
    user: UserOpt,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write the JSON here (mode 0600) \\[default: stdout]."),
    ] = None,
) -> None:
    """Everything stored about a user, texts decrypted, as JSON (right of access)."""
    import json

    from genloop.cli.keys import cli_actor
    from genloop.security.privacy import export_user

    with open_workspace() as ws:
        data = export_user(ws, user, actor=cli_actor())
    if out is None:
        print_json(data)
        return
    text = json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    console.print(
        f"wrote {len(data['requests'])} requests, {len(data['feedback'])} feedback rows and "
        f"{len(data['log_lines'])} log lines to {out}",
        highlight=False,
        markup=False,
    )


@app.command()
def erase(
    user: UserOpt,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """Erase a user: requests, feedback, log lines, dataset versions built from their
    feedback (marked excluded, files deleted), their keys revoked. Cannot be undone."""
    from genloop.cli.keys import cli_actor
    from genloop.errors import GenloopError
    from genloop.security.privacy import count_user_rows, erase_user

    with open_workspace() as ws:
        if not yes:
            found = count_user_rows(ws, user)
            if not typer.confirm(
                f"erase user {user!r} ({found['requests']} requests, {found['feedback']} "
                "feedback rows, and their log lines and exports)? This cannot be undone"
            ):
                raise GenloopError("nothing erased")
        counts = erase_user(ws, user, cli_actor())
    if json:
        print_json(counts)
        return
    console.print(
        "erased: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()),
        highlight=False,
        markup=False,
    )


@app.command()
def purge(
    days: Annotated[
        int | None,
        typer.Option(
            "--days", min=1, help="Retention in days \\[default: security.retention_days, 90]."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML config whose security section sets retention."),
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """Delete requests, feedback and request-log files older than the retention period.

    Run it daily (cron, a systemd timer).
    """
    from genloop.cli.keys import cli_actor
    from genloop.config import SecurityConfig, load_config
    from genloop.errors import ConfigError
    from genloop.security.privacy import purge_expired

    retention = days
    if retention is None:
        security = load_config(config, []).security if config is not None else SecurityConfig()
        retention = security.retention_days
        if retention is None:
            raise ConfigError("security.retention_days is unset (keep forever): nothing to purge")
    with open_workspace() as ws:
        counts = purge_expired(ws, retention, actor=cli_actor())
    if json:
        print_json(counts)
        return
    console.print(
        f"purged data older than {retention} days: "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()),
        highlight=False,
        markup=False,
    )
