"""``genloop models``: import, list, show, compare, promote and roll back model versions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from genloop.cli.context import console, err_console, open_workspace, print_json, print_table

if TYPE_CHECKING:
    from genloop.models.pretrained import UnsupportedArchitectureError

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


@app.command("import")
def import_(
    path: Annotated[
        Path,
        typer.Argument(
            help="A local Hugging Face checkpoint directory (causal, seq2seq or masked LM), "
            "or a diffusers Stable Diffusion pipeline folder (model_index.json)."
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option("--name", help="Model name [default: the directory's name, made valid]."),
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Accept pickle weights (.bin/.pt), for sources you trust: read with "
            "torch.load(weights_only=True) and stored as safetensors.",
        ),
    ] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the new version as JSON.")] = False,
) -> None:
    """Import a local Hugging Face checkpoint as the next version of a model.

    The whole checkpoint is checked first (config, weights, shards, tokenizer); a problem
    names the file and nothing is registered. The version records its source, the SHA-256
    of every file, license, model card, architecture and parameter count. A diffusers
    StableDiffusionPipeline folder becomes a text_to_image version (safety checker left
    out; a scheduler genloop does not sample with is mapped to DDIM, and it says so).

    Example: genloop models import ./Qwen2.5-0.5B-Instruct --name qwen
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from genloop.models.importer import plan_import, register_plan
    from genloop.models.pretrained import UnsupportedArchitectureError

    try:
        plan = plan_import(path, name=name, trust_pickle=trust_pickle)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(_unsupported(exc), exc.model_type) from None
    with (
        open_workspace() as ws,
        Progress(
            TextColumn("copying {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
            disable=json or not err_console.is_terminal,
        ) as bar,
    ):
        task = bar.add_task(plan.source.name, total=plan.total_bytes)
        info = register_plan(ws, plan, progress=lambda n: bar.advance(task, n))
    if json:
        print_json(info.to_dict())
        return
    lineage = info.config["import"]
    console.print(
        f"imported {info.ref}: {lineage['architecture']} ({info.family}), "
        f"{_count(lineage['parameters'])} parameters, {len(lineage['files'])} files, "
        f"license {lineage['license'] or 'not stated'}",
        highlight=False,
    )
    if lineage["converted_from_pickle"]:
        console.print(
            f"converted {', '.join(lineage['converted_from_pickle'])} to safetensors",
            highlight=False,
        )
    if lineage["tokenizer_converted_from"]:
        made_from = ", ".join(lineage["tokenizer_converted_from"])
        console.print(f"made tokenizer.json from {made_from}", highlight=False)
    for item in lineage["skipped"]:
        console.print(f"left out: {item}", highlight=False)
    for note in lineage.get("notes", []):
        console.print(f"note: {note}", highlight=False)
    if info.family == "masked_lm":  # an encoder: trained on, evaluated, not served for text
        console.print(
            f"fine-tune it:  model.base_model: {info.ref} (train.objective mlm, "
            "classification, token_classification or embedding)",
            highlight=False,
        )
        return
    console.print(f"serve it:  genloop serve -m {info.ref}", highlight=False)


def _unsupported(exc: UnsupportedArchitectureError) -> str:
    """The import error for an architecture transformers cannot build, with what can run.

    The CLI composes it: the list of batched architectures lives in the serving layer,
    which the import logic (in ``models``) may not import.
    """
    from genloop.serve.engine.architectures import BATCHED_MODEL_TYPES

    return (
        f"{exc.message}. genloop's native engine batches {', '.join(BATCHED_MODEL_TYPES)} "
        "models and runs other causal and seq2seq transformers architectures; to serve an "
        "architecture transformers here cannot build, set serve.engine: vllm"
    )


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS.")],
    json: JsonOpt = False,
    card: Annotated[
        bool, typer.Option("--card", help="Print the model card of an imported version.")
    ] = False,
) -> None:
    """Show one version: lineage, config, metrics, aliases, artifact."""
    from genloop.workspace import registry

    with open_workspace() as ws:
        info = registry.resolve(ws, ref)
        path = ws.store.path(info.artifact)
    data = info.to_dict() | {"path": str(path)}
    imported: dict[str, Any] = info.config.get("import") or {}
    if card:
        if not imported.get("model_card"):
            from genloop.errors import NotFoundError

            raise NotFoundError(f"{info.ref} has no model card (only imported versions have one)")
        sys.stdout.write(imported["model_card"].rstrip("\n") + "\n")  # as written, unwrapped
        return
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
    if imported:
        _show_import(imported)
    config = {k: v for k, v in info.config.items() if k != "import"}
    if config:
        from genloop.workspace.registry import _flatten

        print_table("config", ["key", "value"], [[k, v] for k, v in _flatten(config).items()])


def _show_import(lineage: dict[str, Any]) -> None:
    """Where an imported version came from, and the files it was made of."""
    card = lineage.get("model_card")
    for label, value in (
        ("imported from", lineage.get("source")),
        ("architecture", f"{lineage.get('architecture')} (model_type {lineage.get('model_type')})"),
        ("parameters", f"{lineage.get('parameters', 0):,}"),
        ("license", lineage.get("license") or "not stated"),
        ("model card", f"{len(card):,} characters (--card prints it)" if card else "none"),
    ):
        console.print(f"[bold]{label}:[/] {value}", highlight=False)
    if lineage.get("converted_from_pickle"):
        converted = ", ".join(lineage["converted_from_pickle"])
        console.print(f"[bold]converted to safetensors:[/] {converted}", highlight=False)
    files = lineage.get("files") or {}
    print_table("imported files", ["file", "sha256"], [[k, v] for k, v in files.items()])


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
        rows = [[k, _short(v["a"]), _short(v["b"])] for k, v in d["config"].items()]
        print_table("config", ["key", d["a"], d["b"]], rows)
    if d["lineage"]:
        rows = [[k, v["a"], v["b"]] for k, v in d["lineage"].items()]
        print_table("lineage", ["field", d["a"], d["b"]], rows)
    if not (d["metrics"] or d["config"] or d["lineage"]):
        console.print("no differences in config, metrics or lineage")


def _short(value: object, limit: int = 120) -> object:
    """A long text value (an imported model card) cut to one line for a table; --json has
    it whole."""
    if not isinstance(value, str) or (len(value) <= limit and "\n" not in value):
        return value
    first = value.strip().splitlines()[0] if value.strip() else ""
    return f"{first[: limit - 1]}… ({len(value):,} characters)"
