"""``genloop quickstart``: the whole loop on this machine, then the server with its UI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from genloop.cli.context import console, err_console, open_workspace

if TYPE_CHECKING:
    from genloop.pipeline.quickstart import Sample
    from genloop.pipeline.runner import StageOutcome


def quickstart(
    steps: Annotated[
        int | None,
        typer.Option(help="Training steps \\[default: 480; 40 with --quick].", show_default=False),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="A reduced run (60 source files, 40 steps): a first look, and CI."
        ),
    ] = False,
    serve: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Start the server with the UI afterwards.")
    ] = True,
    host: Annotated[str, typer.Option(help="Bind address of the server.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the server (0: any free one).")] = 8000,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: a.b=value (repeatable).")
    ] = None,
) -> None:
    """Prepare the python-stdlib corpus, train a tokenizer and a small code model, evaluate
    it (perplexity, BLEU/ROUGE, pass@k), quantize it to int8, gate, register and promote it,
    show what it writes after three held-out function openings beside the untrained model,
    create an admin key and serve it with the web UI, printing the URL and the key.

    Nothing is downloaded. A re-run skips every stage whose inputs did not change.
    """
    from genloop.pipeline.quickstart import quickstart_config, run_quickstart
    from genloop.workspace import init_workspace

    overrides = list(set_ or [])
    if steps is not None:
        overrides += [f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 10)}"]
        overrides += [f"train.checkpoint_every={steps}", f"train.eval_every={max(1, steps // 3)}"]
    cfg = quickstart_config(quick=quick, overrides=overrides)
    from genloop.cli.context import state

    init_workspace(state.workspace).close()  # a fresh machine: create (or migrate) it

    def report(o: StageOutcome) -> None:
        what = ", ".join(f"{k}={v}" for k, v in o.outputs.items() if k != "variants")
        note = f" ({o.note})" if o.note else ""
        console.print(f"  {o.stage:<9} {o.status:<8} {o.seconds:6.1f}s  {what}{note}")

    def progress(message: str) -> None:
        err_console.print(f"[dim]  … {message}[/]", highlight=False)

    with open_workspace() as ws:
        console.print(f"workspace: {ws.root}", highlight=False)
        console.print("pipeline: data → train → eval → optimize → register → gate → deploy")
        result = run_quickstart(ws, cfg, report=report, progress=progress)
        if result.perplexity is not None and result.untrained_perplexity is not None:
            console.print(
                f"held-out perplexity: {result.perplexity:.2f} trained vs "
                f"{result.untrained_perplexity:.1f} untrained "
                f"({result.improvement:.1f}× lower)",
                highlight=False,
            )
        _show_samples(result.samples)
        console.print(f"production: {cfg.name}@production → {result.model}", highlight=False)
        if not serve:
            return
        _serve(ws, cfg, host, port)


# A completion is shown up to this many lines, each up to this many characters.
SHOWN_LINES, SHOWN_WIDTH = 6, 88


def _show_samples(samples: list[Sample]) -> None:
    """Each held-out prompt, then what the trained and the untrained model write after it."""
    from genloop.pipeline.quickstart import SAMPLE_NEW_TOKENS, SAMPLE_TEMPERATURE

    if not samples:
        return
    console.print(
        f"held-out completions ({len(samples)} functions from the test split, "
        f"{SAMPLE_NEW_TOKENS} new tokens at temperature {SAMPLE_TEMPERATURE}):",
        highlight=False,
    )
    for i, s in enumerate(samples, 1):
        console.print(f"── {i}. {s.source} ".ljust(SHOWN_WIDTH, "─"), highlight=False, markup=False)
        console.print(_shown(s.prompt), highlight=False, markup=False)
        for heading, text in (("trained", s.trained), ("untrained", s.untrained)):
            console.print(f"  ┄ {heading}:", highlight=False)
            console.print(_shown(text) or "  (nothing)", highlight=False, markup=False)


def _shown(text: str) -> str:
    """``text`` cut to SHOWN_LINES lines of at most SHOWN_WIDTH characters, "…" where cut."""
    lines = text.strip("\n").expandtabs(4).splitlines()
    shown = [line if len(line) <= SHOWN_WIDTH else line[: SHOWN_WIDTH - 1] + "…" for line in lines]
    if len(shown) > SHOWN_LINES:
        shown = [*shown[:SHOWN_LINES], "…"]
    return "\n".join(line.rstrip() for line in shown)


def _serve(ws: object, cfg: object, host: str, port: int) -> None:
    from genloop.cli.serve import run_server
    from genloop.config import GenloopConfig
    from genloop.evaluate.run import evaluate_model
    from genloop.security.keys import create_key
    from genloop.serve.app import create_app
    from genloop.workspace import Workspace

    assert isinstance(ws, Workspace) and isinstance(cfg, GenloopConfig)
    created = create_key(ws.catalog, name="quickstart-admin", scopes=["admin"])
    serve_cfg = cfg.serve.model_copy(
        update={"models": [f"{cfg.name}@production"], "host": host, "port": port}
    )
    cfg = cfg.model_copy(update={"serve": serve_cfg})
    console.print(f"admin key (shown once): {created.plaintext}", highlight=False, markup=False)
    console.print("open the URL below and sign in with the key; Ctrl-C stops the server")
    run_server(create_app(ws, cfg, evaluate=evaluate_model), cfg)
