"""``genloop data``: prepare versioned datasets and look at them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genloop.cli.context import console, open_workspace, print_json, print_table

app = typer.Typer(
    help="Collect and prepare data into versioned, training-ready datasets.", no_args_is_help=True
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command()
def prepare(
    config: Annotated[
        Path, typer.Argument(help="YAML file with a `data:` section (and optionally `tokenizer:`).")
    ],
    workers: Annotated[
        int | None, typer.Option("--workers", "-j", min=1, help="Worker processes [default: CPUs].")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: a.b=value (repeatable).")
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Clean, deduplicate, redact, split, tokenize and pack; register a dataset version.

    Re-running with the same inputs and config returns the existing version at once.
    """
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from genloop.config import load_config
    from genloop.data.prepare import prepare_dataset
    from genloop.errors import ConfigError

    cfg = load_config(config, set_ or [])
    if cfg.data is None:
        raise ConfigError(f"{config} has no 'data:' section; nothing to prepare")
    with (
        open_workspace() as ws,
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,} items"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=json or not console.is_terminal,
        ) as bar,
    ):
        tasks: dict[str, int] = {}

        def progress(stage: str, n: int) -> None:
            if stage not in tasks:
                label = {"clean": "cleaning records", "tokenize": "tokenizing documents"}
                tasks[stage] = bar.add_task(label.get(stage, stage), total=None)
            bar.advance(tasks[stage], n)  # type: ignore[arg-type]

        # relative source paths are read from the config file's folder
        info, created = prepare_dataset(
            ws, cfg.data, cfg.tokenizer, root=config.parent, workers=workers, progress=progress
        )
    if json:
        print_json(info.to_dict() | {"created": created})
        return
    verb = "created" if created else "unchanged, reusing"
    s = info.stats
    console.print(
        f"{verb} dataset {info.ref}: {s.get('documents', 0):,} documents, "
        f"{s.get('bytes', 0):,} bytes"
        + (f", {s['tokens']:,} tokens" if "tokens" in s else "")
        + (f" in {s['seconds']:.1f}s" if created and "seconds" in s else ""),
        highlight=False,
    )
    if created and s.get("drops"):
        console.print(
            "dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(s["drops"].items())),
            highlight=False,
        )


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="JSON Lines file, one row per line.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Dataset name in the catalog.")],
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            help="What the rows are: sft {prompt, response}, dpo {prompt, chosen, rejected}, "
            "classification {text, label}, token_classification {tokens, labels}, "
            "retrieval {query, positive[, negative]}.",
        ),
    ],
    tokenizer: Annotated[
        str,
        typer.Option(
            "--tokenizer",
            help="The model the rows are for: a model ref or a local model/tokenizer "
            "directory; its tokenizer is stored with the rows.",
        ),
    ],
    val: Annotated[
        float, typer.Option("--val", min=0.0, max=0.99, help="Share of rows for validation.")
    ] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split.")] = 0,
    json: JsonOpt = False,
) -> None:
    """Register labeled rows from a JSON Lines file as a dataset version.

    Every row is checked first; a bad one is named by file and line and nothing is
    stored. Example: genloop data import reviews.jsonl --name reviews --kind
    classification --tokenizer my-encoder
    """
    from genloop.data.pairs import PAIRS_KINDS, import_rows
    from genloop.errors import ConfigError

    if kind not in PAIRS_KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(PAIRS_KINDS)} (got {kind!r})")
    with open_workspace() as ws:
        tok_dir = Path(tokenizer).expanduser()
        if not tok_dir.is_dir():
            from genloop.workspace import registry

            tok_dir = ws.store.open_verified(registry.resolve(ws, tokenizer).artifact)
        info = import_rows(
            ws,
            file,
            name,
            kind,
            tokenizer_dir=tok_dir,
            val_fraction=val,
            seed=seed,
        )
    if json:
        print_json(info.to_dict())
        return
    splits = info.stats.get("splits", {})
    console.print(
        f"dataset {info.ref} ({kind}): {info.stats.get('rows', 0):,} rows, "
        f"{splits.get('train', {}).get('rows', 0):,} train / "
        f"{splits.get('val', {}).get('rows', 0):,} validation",
        highlight=False,
    )


@app.command("list")
def list_(
    name: Annotated[str | None, typer.Argument(help="Only this dataset's versions.")] = None,
    json: JsonOpt = False,
) -> None:
    """List dataset versions with their sizes."""
    from genloop.workspace.datasets import list_dataset_versions

    with open_workspace() as ws:
        infos = list_dataset_versions(ws, name)
    if json:
        print_json([i.to_dict() for i in infos])
        return
    if not infos:
        console.print("no datasets yet")
        return
    rows = [
        [
            i.ref,
            i.kind,
            i.status,
            f"{i.stats.get('documents', 0):,}",
            f"{i.stats.get('tokens', 0):,}" if "tokens" in i.stats else "",
            f"{i.stats.get('bytes', 0):,}",
            i.created_at.strftime("%Y-%m-%d %H:%M"),
        ]
        for i in infos
    ]
    print_table(
        None, ["dataset", "kind", "status", "documents", "tokens", "bytes", "created (UTC)"], rows
    )


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME (newest version) or NAME@VERSION.")],
    json: JsonOpt = False,
    card: Annotated[bool, typer.Option("--card", help="Print the dataset card (markdown).")] = (
        False
    ),
) -> None:
    """Show a dataset version: statistics, drops by reason, lineage, where its files are."""
    from genloop.workspace.datasets import resolve_dataset

    with open_workspace() as ws:
        info = resolve_dataset(ws, ref)
        path = ws.store.path(info.artifact)
    if json:
        print_json(info.to_dict() | {"path": str(path)})
        return
    if card:
        from rich.markdown import Markdown

        console.print(Markdown((path / "card.md").read_text(encoding="utf-8")))
        return
    s = info.stats
    console.print(f"[bold]{info.ref}[/] ({info.kind}, {info.status}) at {path}", highlight=False)
    rows = [
        [
            split,
            f"{v.get('documents', 0):,}",
            f"{v.get('bytes', 0):,}",
            f"{v['tokens']:,}" if "tokens" in v else "",
        ]
        for split, v in sorted(s.get("splits", {}).items())
    ]
    print_table("splits", ["split", "documents", "bytes", "tokens"], rows)
    steps = [
        [
            st["name"],
            f"{st['seen']:,}",
            f"{st['kept']:,}",
            f"{st['changed']:,}",
            ", ".join(f"{k} {v}" for k, v in sorted(st["dropped"].items())),
        ]
        for st in s.get("steps", [])
    ]
    print_table("preprocessing", ["step", "seen", "kept", "changed", "dropped"], steps)
    if s.get("drops"):
        console.print(
            "all drops: " + ", ".join(f"{k} {v}" for k, v in sorted(s["drops"].items())),
            highlight=False,
        )
    for src in info.lineage.get("sources", []):
        console.print("source: " + ", ".join(f"{k}={v}" for k, v in src.items()), highlight=False)
