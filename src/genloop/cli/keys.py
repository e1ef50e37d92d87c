"""``genloop keys``: create, list and revoke API keys; rotate the encryption key."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from genloop.cli.context import console, err_console, open_workspace, print_json, print_table

app = typer.Typer(
    help="API keys (shown once, stored as a hash) and the key that encrypts stored text.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

_LIMIT_HELP = "a number, 'unlimited' or 'default' (serve.rate_limit's)"
RpmOpt = Annotated[
    str | None, typer.Option("--rpm", help=f"Requests per minute for this key: {_LIMIT_HELP}.")
]
TpmOpt = Annotated[
    str | None, typer.Option("--tpm", help=f"Tokens per minute for this key: {_LIMIT_HELP}.")
]
DayOpt = Annotated[
    str | None,
    typer.Option("--tokens-per-day", help=f"Tokens per UTC day for this key: {_LIMIT_HELP}."),
]
MonthOpt = Annotated[
    str | None,
    typer.Option(
        "--tokens-per-month", help=f"Tokens per UTC calendar month for this key: {_LIMIT_HELP}."
    ),
]


def _limit_changes(
    rpm: str | None, tpm: str | None, day: str | None, month: str | None
) -> dict[str, int | None]:
    """The limits given on the command line, parsed (None: back to the default)."""
    from genloop.security.keys import parse_limit

    given = {
        "requests_per_min": ("--rpm", rpm),
        "tokens_per_min": ("--tpm", tpm),
        "tokens_per_day": ("--tokens-per-day", day),
        "tokens_per_month": ("--tokens-per-month", month),
    }
    return {k: parse_limit(v, opt) for k, (opt, v) in given.items() if v is not None}


def _describe_limits(limits: dict[str, int | None]) -> str:
    names = {
        "requests_per_min": "rpm",
        "tokens_per_min": "tpm",
        "tokens_per_day": "tokens/day",
        "tokens_per_month": "tokens/month",
    }
    parts = [
        f"{names[k]} {'unlimited' if v == 0 else v}" for k, v in limits.items() if v is not None
    ]
    return ", ".join(parts) or "server defaults"


def cli_actor() -> str:
    """How the audit log names whoever runs a command here: ``cli:<OS user>``."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "cli"


@app.command()
def create(
    name: Annotated[str, typer.Option("--name", help="What the key is for (shown in lists).")],
    scopes: Annotated[
        str,
        typer.Option(
            "--scopes",
            help="Comma-separated: generate (completions, chat, images, embeddings), feedback, "
            "label (the labeling queue), metrics (GET /metrics, for a Prometheus scraper), "
            "admin (admin implies the others).",
        ),
    ] = "generate",
    expires: Annotated[
        str | None,
        typer.Option("--expires", help="Lifetime: 30d, 12h, 15m, 2w \\[default: never]."),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option(
            "--user",
            help="User id recorded on this key's requests when the client names none.",
        ),
    ] = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    tokens_per_day: DayOpt = None,
    tokens_per_month: MonthOpt = None,
    json: Annotated[
        bool, typer.Option("--json", help="Print the key and its details as JSON.")
    ] = False,
) -> None:
    """Create a key and print it ONCE: only its SHA-256 is stored, it cannot be shown again."""
    from genloop.security.keys import create_key, parse_duration
    from genloop.security.ratelimit import Limits

    lifetime = parse_duration(expires) if expires is not None else None
    limits = Limits(**_limit_changes(rpm, tpm, tokens_per_day, tokens_per_month))
    with open_workspace() as ws:
        created = create_key(
            ws.catalog,
            name=name,
            scopes=scopes,
            expires_in=lifetime,
            user_id=user,
            limits=limits,
            actor=cli_actor(),
        )
    info = created.info
    if json:
        print_json({"key": created.plaintext, **info.to_dict()})
        return
    sys.stdout.write(created.plaintext + "\n")  # plain, so that `$(genloop keys create …)` works
    expiry = info.expires_at.strftime("%Y-%m-%d %H:%M UTC") if info.expires_at else "never"
    err_console.print(  # on stderr: stdout holds the key alone
        f"key {info.id} ({info.prefix}…, scopes {','.join(info.scopes)}, expires {expiry}, "
        f"limits: {_describe_limits(info.limits.to_dict())}). "
        "Store it now: it is not shown again.",
        highlight=False,
        markup=False,
    )


@app.command("list")
def list_(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's keys.")] = None,
    json: JsonOpt = False,
) -> None:
    """List keys: id, name, prefix, scopes, status, expiry and last use. Never the keys."""
    from genloop.security.keys import list_keys

    with open_workspace() as ws:
        infos = list_keys(ws.catalog, user_id=user)
    if json:
        print_json([i.to_dict() for i in infos])
        return
    if not infos:
        console.print("no API keys yet; create one with 'genloop keys create --name NAME'")
        return

    def when(d: object) -> str:
        return d.strftime("%Y-%m-%d %H:%M") if hasattr(d, "strftime") else "-"

    print_table(
        None,
        [
            "id",
            "name",
            "prefix",
            "scopes",
            "user",
            "status",
            "limits",
            "expires (UTC)",
            "last used (UTC)",
        ],
        [
            [
                i.id,
                i.name,
                i.prefix + "…",
                ",".join(i.scopes),
                i.user_id or "-",
                i.status,
                _describe_limits(i.limits.to_dict()),
                when(i.expires_at),
                when(i.last_used_at),
            ]
            for i in infos
        ],
    )


@app.command()
def revoke(
    key: Annotated[str, typer.Argument(help="The key's id or prefix (as 'keys list' shows).")],
    json: JsonOpt = False,
) -> None:
    """Revoke a key. Servers refuse it within a few seconds (at once in this process)."""
    from genloop.security.keys import revoke_key

    with open_workspace() as ws:
        info = revoke_key(ws.catalog, key, actor=cli_actor())
    if json:
        print_json(info.to_dict())
    else:
        console.print(f"revoked key {info.id} ({info.prefix}…, {info.name})", highlight=False)


@app.command("set-limits")
def set_limits(
    key: Annotated[
        str, typer.Argument(help="The key's id, prefix (as 'keys list' shows) or name.")
    ],
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    tokens_per_day: DayOpt = None,
    tokens_per_month: MonthOpt = None,
    json: JsonOpt = False,
) -> None:
    """Set a key's own limits, overriding serve.rate_limit for it ('default' drops one).

    Servers apply the change within a few seconds (at once in this process)."""
    from genloop.security.keys import set_key_limits

    changes = _limit_changes(rpm, tpm, tokens_per_day, tokens_per_month)
    with open_workspace() as ws:
        info = set_key_limits(ws.catalog, key, changes, actor=cli_actor())
    if json:
        print_json(info.to_dict())
        return
    console.print(
        f"key {info.id} ({info.prefix}…, {info.name}): {_describe_limits(info.limits.to_dict())}",
        highlight=False,
        markup=False,
    )


@app.command("rotate-secret")
def rotate_secret(
    keep_old: Annotated[
        bool,
        typer.Option(
            "--keep-old",
            help="Keep the old encryption keys in secret.key (they can still decrypt).",
        ),
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Re-encrypt stored prompts, responses and feedback under a new encryption key.

    With <workspace>/secret.key: a new key is made and the old ones removed afterwards;
    running servers take the new key within a second, no restart needed.
    With $GENLOOP_SECRET_KEY: put the new key first (NEW,OLD) in every server's
    environment and restart them, run this, then drop OLD.
    """
    from genloop.security.crypto import rotate_secret as rotate

    with open_workspace() as ws:
        result = rotate(ws, prune=not keep_old, actor=cli_actor())
    if json:
        print_json(result.to_dict())
        return
    console.print(
        f"re-encrypted {result.reencrypted} rows under key {result.key_id} ({result.source})",
        highlight=False,
        markup=False,
    )
    if result.pruned:
        console.print(f"removed old keys {', '.join(result.pruned)}", highlight=False)
    if result.unreadable:
        console.print(
            f"[yellow]{result.unreadable} rows were sealed with a key that is not in the "
            "ring and were left as they were[/]",
            highlight=False,
        )
    if result.source.startswith("$"):
        console.print(
            "now remove the old keys from $GENLOOP_SECRET_KEY (keep only the first)",
            highlight=False,
        )
