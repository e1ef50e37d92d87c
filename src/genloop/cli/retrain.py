"""``genloop retrain NAME@production`` and ``genloop loop``: retrain on user feedback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genloop.cli.context import console, err_console, open_workspace, print_json

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config: its feedback (retrain, replay_ratio, per_user_cap …), train "
        "(device, seed), eval (suites) and gate (rules) sections apply.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key: feedback.retrain.max_steps=100 (repeatable)."),
]
LeaseOpt = Annotated[
    float,
    typer.Option(
        "--lease-s",
        min=1,
        help="How long a worker's claim on a model lasts without renewal: a crashed "
        "worker's retrain is taken over after this.",
    ),
]


def retrain(
    model: Annotated[
        str, typer.Argument(help="NAME@ALIAS to retrain and promote to, e.g. NAME@production.")
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    eval_dataset: Annotated[
        str | None,
        typer.Option(
            "--eval-dataset",
            help="Dataset NAME\\[@VERSION] both models are evaluated on \\[default: the "
            "production model's original training data].",
        ),
    ] = None,
    lease_s: LeaseOpt = 300.0,
    json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Fine-tune the model on its new feedback (plus a replay sample of its original data),
    evaluate it against the current version, and promote it if it passes the gate.

    Exits 0 when the candidate was promoted or there was nothing to retrain on, 1 when the
    gate kept it out (production stays as it was; the reason is recorded).
    """
    from genloop.config import load_config, parse_config
    from genloop.feedback.retrain import retrain as run_retrain
    from genloop.security.crypto import load_cipher

    cfg = load_config(config, set_ or []) if config else parse_config({}, set_ or [])
    with open_workspace() as ws, err_console.status("starting") as status:

        def stage(message: str) -> None:
            status.update(message)
            if not json:
                console.print(f"· {message}", highlight=False, markup=False)

        def step(done: int, total: int, metrics: dict[str, float]) -> None:
            status.update(f"fine-tuning: step {done}/{total}, loss {metrics['loss']:.4f}")

        result = run_retrain(
            ws,
            load_cipher(ws),
            model,
            cfg,
            eval_dataset=eval_dataset,
            lease_s=lease_s,
            actor="cli",
            on_stage=stage,
            train_progress=step,
        )
    if json:
        print_json(result.to_dict())
    else:
        if result.gate is not None:
            for check in result.gate["checks"]:
                mark = "PASS" if check["passed"] else "FAIL"
                console.print(
                    f"  {mark} {check['description']}: {check['message']}",
                    highlight=False,
                    markup=False,
                )
        console.print(f"{result.outcome}: {result.reason}", highlight=False, markup=False)
    if result.outcome in ("rejected", "production_changed"):
        raise typer.Exit(1)


def loop(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Watch this model (NAME or NAME@ALIAS; repeatable) \\[default: every model "
            "with a production alias].",
        ),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Check once, retrain what is due, and exit.")
    ] = False,
    lease_s: LeaseOpt = 300.0,
) -> None:
    """Run the retrain worker: retrain a model when feedback.min_items new feedback rows
    have arrived or on feedback.schedule, one retrain of a model at a time, with
    exponential backoff after failures. Stops cleanly on Ctrl-C or SIGTERM.
    """
    import signal
    import threading
    from datetime import datetime

    from genloop.config import load_config, parse_config
    from genloop.feedback.loop import Worker
    from genloop.security.crypto import load_cipher

    cfg = load_config(config, set_ or []) if config else parse_config({}, set_ or [])
    stop = threading.Event()

    def echo(message: str) -> None:
        at = datetime.now().strftime("%H:%M:%S")
        console.print(f"{at} {message}", highlight=False, markup=False, soft_wrap=True)

    def on_signal(signum: int, _frame: object) -> None:
        echo(f"{signal.Signals(signum).name}: stopping after the current retrain")
        stop.set()

    with open_workspace() as ws:
        worker = Worker(ws, load_cipher(ws), cfg, models=model, lease_s=lease_s, echo=echo)
        if once:
            results = worker.cycle()
            if any(isinstance(r, BaseException) for r in results):
                raise typer.Exit(1)
            return
        previous = signal.signal(signal.SIGTERM, on_signal)
        fb = cfg.feedback
        echo(
            f"watching {', '.join(model) if model else 'every model@production'}: retrain at "
            f"{fb.min_items} new feedback rows"
            + (f" or every {fb.schedule}" if fb.schedule else "")
            + f", checking every {fb.poll_interval_s:g} s"
        )
        try:
            worker.run(stop)
        except KeyboardInterrupt:
            echo("interrupted: stopped")
        finally:
            signal.signal(signal.SIGTERM, previous)
