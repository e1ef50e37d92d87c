"""``genloop feedback``: list, show, approve, reject and export user feedback."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from genloop.cli.context import console, open_workspace, print_json, print_table

if TYPE_CHECKING:
    from genloop.config import GenloopConfig

app = typer.Typer(
    help="Ratings and corrections users gave on served responses (POST /v1/feedback): "
    "look at them, review them, export them as a dataset version.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config whose feedback section (per_user_cap, review_required) applies.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key: feedback.per_user_cap=5 (repeatable)."),
]


def _config(config: Path | None, set_: list[str] | None) -> GenloopConfig:
    from genloop.config import load_config, parse_config

    return load_config(config, set_ or []) if config else parse_config({}, set_ or [])


@app.command("list")
def list_(
    status: Annotated[
        str | None, typer.Option("--status", "-s", help="pending, approved or rejected.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Only feedback on this model's responses.")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="Only this user's.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many.")] = 100,
    json: JsonOpt = False,
) -> None:
    """List feedback, newest first (texts are not shown: see 'genloop feedback show ID')."""
    from genloop.feedback.store import list_feedback

    with open_workspace() as ws:
        rows = list_feedback(ws, status=status, model=model, user_id=user, limit=limit)
    if json:
        print_json([r.to_dict() for r in rows])
        return
    if not rows:
        console.print("no feedback yet")
        return
    table = [
        [
            r.id,
            f"{r.rating:+d}",
            r.status,
            r.model,
            r.user_id,
            "yes" if r.has_correction else "",
            r.exported_to,
            r.created_at.strftime("%Y-%m-%d %H:%M"),
        ]
        for r in rows
    ]
    columns = ["id", "rating", "status", "model", "user", "correction", "exported to"]
    print_table(None, [*columns, "created (UTC)"], table)


@app.command()
def show(
    feedback_id: Annotated[int, typer.Argument(help="Feedback id.")],
    json: JsonOpt = False,
) -> None:
    """Show one feedback row with its prompt, response, correction and comment (decrypted)."""
    from genloop.feedback.store import get_feedback
    from genloop.security.crypto import load_cipher

    with open_workspace() as ws:
        info = get_feedback(ws, load_cipher(ws), feedback_id)
    data = info.to_dict()
    if json:
        print_json(data)
        return
    from rich.markup import escape

    for key in ("id", "rating", "status", "model", "endpoint", "user_id", "response_id"):
        console.print(f"[bold]{key}:[/] {escape(str(data[key]))}", highlight=False)
    for key in ("prompt", "response", "correction", "comment"):
        if data[key] is not None:
            console.print(f"[bold]{key}:[/]", highlight=False)
            console.print(data[key], highlight=False, markup=False)


def _review(ids: list[int], decision: Literal["approved", "rejected"]) -> None:
    from genloop.feedback.store import review

    with open_workspace() as ws:
        changed = review(ws, ids, decision, actor="cli")
    unchanged = len(set(ids)) - len(changed)
    note = f" ({unchanged} already {decision})" if unchanged else ""
    console.print(f"{decision} {len(changed)} feedback row(s){note}", highlight=False)


@app.command()
def approve(ids: Annotated[list[int], typer.Argument(help="Feedback ids.")]) -> None:
    """Approve feedback rows for training (needed when feedback.review_required is on)."""
    _review(ids, "approved")


@app.command()
def reject(ids: Annotated[list[int], typer.Argument(help="Feedback ids.")]) -> None:
    """Reject feedback rows: they are never trained on."""
    _review(ids, "rejected")


@app.command()
def export(
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="sft (corrections and upvoted answers), dpo (chosen vs rejected answers "
            "per prompt) or jsonl (the curated rows).",
        ),
    ] = "sft",
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Only feedback on this model (NAME or a ref); sft and dpo take its tokenizer.",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Dataset name \\[default: NAME-feedback, or feedback]."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json: JsonOpt = False,
) -> None:
    """Curate the usable feedback (dedup, per-user cap, outliers, PII redaction) and
    publish it as a dataset version that 'genloop train' can read."""
    from genloop.errors import GenloopError
    from genloop.feedback.export import export_feedback
    from genloop.security.crypto import load_cipher

    fb = _config(config, set_).feedback
    with open_workspace() as ws:
        result = export_feedback(
            ws,
            load_cipher(ws),
            format_,
            name=name,
            model=model,
            per_user_cap=fb.per_user_cap,
            review_required=fb.review_required,
        )
    if json:
        print_json(result.to_dict())
        if result.dataset is None:
            raise typer.Exit(1)
        return
    report = result.report
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(report.dropped.items())) or "none"
    console.print(
        f"curated {report.input} feedback rows: kept {report.kept} from {report.users} "
        f"user(s); dropped: {dropped}; redacted: {report.redacted}",
        highlight=False,
    )
    if result.dataset is None:
        raise GenloopError(f"no {format_} rows left to export after curation")
    console.print(f"exported {result.rows} rows as dataset {result.dataset.ref}", highlight=False)
