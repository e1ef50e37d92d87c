"""``genloop augment``: write a synthetic labelled image dataset from a conditional model."""

from __future__ import annotations

from typing import Annotated

import typer

from genloop.cli.context import console, open_workspace, print_json


def augment(
    model: Annotated[
        str, typer.Argument(help="A class-conditional image model: NAME, NAME@VERSION, NAME@ALIAS.")
    ],
    per_class: Annotated[
        int, typer.Option("--per-class", "-n", help="Images generated for every class.")
    ],
    name: Annotated[
        str | None,
        typer.Option("--name", help="Dataset name \\[default: MODEL_NAME-synthetic]."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed, the same images.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    json: Annotated[
        bool, typer.Option("--json", help="Print the dataset version as JSON.")
    ] = False,
) -> None:
    """Generate --per-class images of every class and store them as a dataset version.

    It holds a training split of labelled images and trains like any prepared dataset.

    'genloop eval MODEL --suite augment' then reports its downstream effect.

    The same model, count and seed find the version written before.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from genloop.models.augment_synthetic import synthetic_dataset

    with (
        open_workspace() as ws,
        Progress(
            TextColumn("generating"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} images"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=json,
        ) as bar,
    ):
        task = bar.add_task("augment", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        info, created = synthetic_dataset(
            ws, model, per_class, name=name, seed=seed, device=device, progress=progress
        )
    if json:
        print_json(info.to_dict() | {"created": created})
        return
    what = "wrote" if created else "found (unchanged)"
    console.print(
        f"{what} dataset {info.ref}: {info.stats.get('documents')} images, "
        f"{info.stats.get('per_class')} per class, from {info.config.get('model')}",
        highlight=False,
    )
    if created:
        console.print(
            f"measure it: genloop eval {info.config.get('model')} --suite augment",
            highlight=False,
        )
