"""``genloop augment``: synthetic training data — ``images`` from a class-conditional image
model, ``text`` rows from a row dataset (EDA edits, masked-LM synonyms, a teacher's
paraphrases, continuations or self-instruct rows).

``genloop augment MODEL --per-class N``, the form from before ``text`` existed, is short for
``genloop augment images MODEL --per-class N`` (a model named ``images`` or ``text`` needs
the long form).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from genloop.cli import images
from genloop.cli.context import console, err_console, open_workspace, print_json


class _ImagesByDefault(TyperGroup):
    """A group whose first argument, when it names no subcommand, goes to ``images`` (as
    ``genloop eval MODEL`` is ``genloop eval run MODEL``)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: a click Context
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["images", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_ImagesByDefault,
    help="Synthetic training data: images from a class-conditional model, text rows from a "
    "row dataset. 'genloop augment MODEL --per-class N' is short for 'genloop augment images "
    "MODEL --per-class N'.",
    no_args_is_help=True,
)
app.command("images")(images.augment)


@app.command("text")
def text(
    dataset: Annotated[
        str,
        typer.Argument(
            help="A row dataset (classification, sft, dpo, retrieval): NAME\\[@VERSION]."
        ),
    ],
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            help="eda (swap, delete, insert; + synonyms with --model), synonyms (--model), "
            "paraphrase, continue, self-instruct (the last three need a teacher).",
        ),
    ],
    copies: Annotated[
        int, typer.Option("--copies", "-n", min=1, help="Generated texts per source row.")
    ] = 1,
    rows: Annotated[
        int, typer.Option("--rows", min=1, help="self-instruct: new instruction rows to make.")
    ] = 20,
    alpha: Annotated[
        float,
        typer.Option("--alpha", help="eda, synonyms: share of a text's words each edit touches."),
    ] = 0.1,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="eda, synonyms: a masked LM (ref or directory) whose input embeddings give "
            "synonyms.",
        ),
    ] = None,
    neighbours: Annotated[
        int,
        typer.Option(
            "--neighbours", min=1, help="eda, synonyms: synonyms per word (nearest first)."
        ),
    ] = 5,
    min_similarity: Annotated[
        float,
        typer.Option(
            "--min-similarity", min=-1.0, max=1.0, help="eda, synonyms: least cosine similarity."
        ),
    ] = 0.0,
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", help="A genloop text model (ref or directory) that generates."),
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option("--upstream", help="Or an OpenAI-compatible server: http(s)://host:port/v1."),
    ] = None,
    upstream_model: Annotated[
        str | None, typer.Option("--upstream-model", help="The model the upstream serves.")
    ] = None,
    api_key_env: Annotated[
        str,
        typer.Option("--api-key-env", help="Environment variable holding the upstream's key."),
    ] = "OPENAI_API_KEY",
    chat: Annotated[
        bool, typer.Option("--chat", help="Send prompts to the teacher as user messages.")
    ] = False,
    template: Annotated[
        str | None,
        typer.Option("--template", help="paraphrase: the prompt, with {text} where the text goes."),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Most tokens per teacher answer.")
    ] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="Teacher: 0 decodes greedily.")
    ] = 0.7,
    top_p: Annotated[
        float, typer.Option("--top-p", min=0.0, max=1.0, help="Teacher: nucleus sampling cut.")
    ] = 0.95,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Dataset written \\[default: DATASET_NAME-augmented]."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="The same seed, the same edits.")] = 0,
    min_chars: Annotated[
        int, typer.Option("--min-chars", min=0, help="Shorter generated texts are dropped.")
    ] = 5,
    rouge_threshold: Annotated[
        float,
        typer.Option(
            "--rouge-threshold",
            min=0.01,
            max=1.0,
            help="self-instruct: an instruction this ROUGE-L-similar to one before is dropped.",
        ),
    ] = 0.7,
    device: Annotated[str, typer.Option("--device", help="Teacher: auto, cpu or cuda.")] = "auto",
    json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Augment a row dataset's training rows; write them with the source as a new version.

    Generated rows are deduplicated against the source and each other and quality-filtered.

    Each carries its lineage in meta.augment; the version's stats count drops by reason.

    genloop augment text reviews --method eda -n 4
    genloop augment text reviews --method synonyms --model my-bert -n 2
    genloop augment text reviews --method paraphrase --teacher tiny-lm@production
    genloop augment text chat --method self-instruct --rows 200 --upstream URL --upstream-model M
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from genloop.pipeline.augment import augment_text
    from genloop.serve.teacher import TeacherSettings, open_teacher

    settings = TeacherSettings(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, chat=chat
    )
    with (
        open_workspace() as ws,
        Progress(
            TextColumn(f"augment ({method})"),
            BarColumn(),
            MofNCompleteColumn(),
            console=err_console,
            transient=True,
            disable=json,
        ) as bar,
    ):
        task = bar.add_task("augment", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        generator = open_teacher(
            ws,
            settings,
            model=teacher,
            upstream=upstream,
            upstream_model=upstream_model,
            key_env=api_key_env,
            device=device,
        )
        result = augment_text(
            ws,
            dataset,
            method,
            name=name,
            copies=copies,
            rows=rows,
            alpha=alpha,
            model=model,
            neighbours=neighbours,
            min_similarity=min_similarity,
            teacher=generator,
            template=template,
            seed=seed,
            min_chars=min_chars,
            rouge_threshold=rouge_threshold,
            progress=progress,
        )
    if json:
        print_json(result.to_dict())
        return
    v = result.version
    splits: dict[str, Any] = v.stats.get("splits", {})
    dropped = ", ".join(f"{k} {n}" for k, n in sorted(result.dropped.items())) or "none"
    console.print(
        f"dataset {v.ref} ({v.kind}): {v.stats.get('rows', 0):,} rows "
        f"({splits.get('train', {}).get('rows', 0):,} train / "
        f"{splits.get('val', {}).get('rows', 0):,} validation) from {result.source.ref}; "
        f"{result.method} generated {result.generated:,}, kept {result.kept:,}, "
        f"dropped: {dropped}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
