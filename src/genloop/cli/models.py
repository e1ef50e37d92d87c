"""``genloop models``: list, show, compare, promote and roll back model versions."""

from __future__ import annotations

from typing import Annotated

import typer

from genloop.cli.context import console, open_workspace, print_json, print_table

app = typer.Typer(
    help="Model versions, lineage and aliases (NAME, NAME@3, NAME@production).",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command("list")
def list_(
    name: Annotated[str | None, typer.Argument(help="Only this model's versions.")] = None,
    json: JsonOpt = False,
) -> None:
    """List model versions with their aliases and headline metrics."""
    from genloop.workspace import registry

    with open_workspace() as ws:
        infos = registry.list_models(ws, name)
    if json:
        print_json([i.to_dict() for i in infos])
        return
    if not infos:
        console.print("no model versions yet")
        return
    rows = [
        [
            i.ref,
            i.family,
            ", ".join(i.aliases),
            i.parent,
            _headline(i.metrics),
            i.created_at.strftime("%Y-%m-%d %H:%M"),
        ]
        for i in infos
    ]
    print_table(None, ["model", "family", "aliases", "parent", "metrics", "created (UTC)"], rows)


def _headline(metrics: dict[str, object], limit: int = 3) -> str:
    """The few metrics worth a glance, quality first."""
    preferred = ("perplexity", "pass@1", "val_loss", "bleu", "loss")
    keys = [k for k in preferred if k in metrics] or list(metrics)
    parts = []
    for k in keys[:limit]:
        v = metrics[k]
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS.")],
    json: JsonOpt = False,
) -> None:
    """Show one version: lineage, config, metrics, aliases, artifact."""
    from genloop.workspace import registry

    with open_workspace() as ws:
        info = registry.resolve(ws, ref)
        path = ws.store.path(info.artifact)
    data = info.to_dict() | {"path": str(path)}
    if json:
        print_json(data)
        return
    for key in (
        "ref",
        "family",
        "aliases",
        "parent",
        "run_id",
        "dataset_version_id",
        "created_at",
        "path",
    ):
        console.print(f"[bold]{key}:[/] {data[key]}", highlight=False)
    if info.metrics:
        print_table("metrics", ["metric", "value"], [[k, v] for k, v in info.metrics.items()])
    if info.config:
        from genloop.workspace.registry import _flatten

        print_table("config", ["key", "value"], [[k, v] for k, v in _flatten(info.config).items()])


@app.command()
def promote(
    ref: Annotated[str, typer.Argument(help="The version to promote: NAME@VERSION (or a ref).")],
    alias: Annotated[str, typer.Option("--alias", "-a", help="Alias to point at it.")] = (
        "production"
    ),
    reason: Annotated[str, typer.Option(help="Why; kept in the alias history.")] = "",
    json: JsonOpt = False,
) -> None:
    """Point NAME@ALIAS (default: production) at a version. Servers pick it up live."""
    from genloop.workspace import registry

    with open_workspace() as ws:
        info = registry.promote(ws, ref, alias, reason=reason)
    if json:
        print_json(info.to_dict())
    else:
        console.print(f"{info.name}@{alias} → version {info.version}", highlight=False)


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias: Annotated[str, typer.Option("--alias", "-a", help="Alias to roll back.")] = (
        "production"
    ),
    reason: Annotated[str, typer.Option(help="Why; kept in the audit log.")] = "",
    json: JsonOpt = False,
) -> None:
    """Point NAME@ALIAS back at the version it had before the current one."""
    from genloop.workspace import registry

    with open_workspace() as ws:
        info = registry.rollback(ws, name, alias, reason=reason)
    if json:
        print_json(info.to_dict())
    else:
        console.print(f"{name}@{alias} rolled back → version {info.version}", highlight=False)


@app.command()
def diff(
    a: Annotated[str, typer.Argument(help="First ref.")],
    b: Annotated[str, typer.Argument(help="Second ref.")],
    json: JsonOpt = False,
) -> None:
    """Compare two versions: config differences, metric deltas, lineage."""
    from genloop.workspace import registry

    with open_workspace() as ws:
        d = registry.diff(ws, a, b)
    if json:
        print_json(d)
        return
    console.print(f"{d['a']} → {d['b']}", highlight=False)
    if d["metrics"]:
        rows = [
            [
                k,
                v["a"],
                v["b"],
                ""
                if "delta" not in v
                else f"{v['delta']:+.4g}"
                + (f" ({v['delta_pct']:+.1f}%)" if "delta_pct" in v else ""),
            ]
            for k, v in d["metrics"].items()
        ]
        print_table("metrics", ["metric", d["a"], d["b"], "delta"], rows)
    if d["config"]:
        rows = [[k, v["a"], v["b"]] for k, v in d["config"].items()]
        print_table("config", ["key", d["a"], d["b"]], rows)
    if d["lineage"]:
        rows = [[k, v["a"], v["b"]] for k, v in d["lineage"].items()]
        print_table("lineage", ["field", d["a"], d["b"]], rows)
    if not (d["metrics"] or d["config"] or d["lineage"]):
        console.print("no differences in config, metrics or lineage")
