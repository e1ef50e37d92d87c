"""``genloop label``: labeling tasks, the queue, agreement and export to a dataset version."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from genloop.cli.context import console, open_workspace, print_json, print_table

if TYPE_CHECKING:
    from genloop.feedback.labeling.tasks import ItemInfo, TaskInfo

app = typer.Typer(
    help="Label data by hand (classification, token spans, caption edits, preferences "
    "between two generations), with model pre-labels, agreement (Cohen's kappa) and export "
    "to a dataset version that 'genloop train' reads.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
TaskArg = Annotated[str, typer.Argument(help="The task's name.", show_default=False)]
AnnotatorOpt = Annotated[
    str | None,
    typer.Option(
        "--annotator", "-a", help="Who is labeling \\[default: the OS user].", show_default=False
    ),
]
AgreementOpt = Annotated[
    bool,
    typer.Option(
        "--agreement",
        help="Items someone else labeled and you have not: a second opinion for kappa.",
    ),
]


def _annotator(name: str | None) -> str:
    import getpass

    from genloop.feedback.labeling.tasks import check_annotator

    if name is None:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (some containers)
            from genloop.errors import ConfigError

            raise ConfigError("cannot tell who you are: give --annotator NAME") from None
    return check_annotator(name)


def _actor() -> str:
    from genloop.cli.keys import cli_actor

    return cli_actor()


@app.command()
def create(
    name: TaskArg,
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            "-k",
            help="classification (a label per text), spans (a label per token), caption "
            "(edit a text), preference (choose A or B).",
        ),
    ],
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            "-d",
            help="Items from this dataset version's rows (NAME or NAME@VERSION; "
            "classification, token_classification, sft or dpo).",
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="Items from a JSON Lines file (see docs/labeling.md)."),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            "-l",
            help="The label set, comma-separated \\[default: the model's labels, else those "
            "the rows carry]. Spans: O (outside) is always allowed.",
            show_default=False,
        ),
    ] = None,
    overlap: Annotated[
        int,
        typer.Option(
            "--overlap", min=1, max=10, help="Annotators wanted per item (2+: kappa on all)."
        ),
    ] = 1,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Pre-label with this model: a masked_lm classifier (classification, spans) "
            "or a text generator (caption draft; preference: candidates A and B).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated candidates.")] = 0,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, max=4096, help="Longest generated text.")
    ] = 64,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda, for --model.")] = "cpu",
    json: JsonOpt = False,
) -> None:
    """Create a labeling task from a dataset version or a JSONL file.

    genloop label create reviews --kind classification --file reviews.jsonl --labels pos,neg
    genloop label create pick --kind preference --file prompts.jsonl --model tiny-lm
    """
    from genloop.errors import ConfigError
    from genloop.feedback.labeling.tasks import create_task

    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, not {device!r}")
    label_set = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
    with open_workspace() as ws:
        task = create_task(
            ws,
            name,
            kind,
            dataset=dataset,
            file=file,
            labels=label_set,
            overlap=overlap,
            model=model,
            seed=seed,
            max_new_tokens=max_tokens,
            device=device,
            actor=_actor(),
        )
    if json:
        print_json(task.to_dict())
        return
    labels_note = f", labels {', '.join(task.label_set)}" if task.label_set else ""
    pre = f", pre-labels from {task.prelabel_source}" if task.prelabel_source else ""
    if task.kind == "preference" and "model" in task.source:
        pre = f", candidates A and B from {task.source['model']}"
    console.print(
        f"task {task.name} ({task.kind}): {task.items:,} items{labels_note}{pre}",
        highlight=False,
        markup=False,
    )


@app.command("list")
def list_(json: JsonOpt = False) -> None:
    """List labeling tasks with their progress."""
    from genloop.feedback.labeling.queue import progress
    from genloop.feedback.labeling.tasks import list_tasks

    with open_workspace() as ws:
        tasks = list_tasks(ws)
        states = {t.name: progress(ws, t.name) for t in tasks}
    if json:
        print_json([t.to_dict() | {"progress": states[t.name]} for t in tasks])
        return
    if not tasks:
        console.print("no labeling tasks yet")
        return
    rows = [
        [
            t.name,
            t.kind,
            f"{t.items:,}",
            f"{states[t.name]['complete_items']:,}",
            f"{states[t.name]['labels']:,}",
            ", ".join(states[t.name]["annotators"]),
            t.created_at.strftime("%Y-%m-%d %H:%M"),
        ]
        for t in tasks
    ]
    print_table(
        None, ["task", "kind", "items", "done", "labels", "annotators", "created (UTC)"], rows
    )


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


@app.command()
def show(name: TaskArg, annotator: AnnotatorOpt = None, json: JsonOpt = False) -> None:
    """Show a task's progress, the pre-labels' accuracy and agreement (Cohen's kappa)."""
    from genloop.feedback.labeling.queue import progress
    from genloop.feedback.labeling.tasks import get_task

    who = _annotator(annotator)
    with open_workspace() as ws:
        task = get_task(ws, name)
        state = progress(ws, name, who)
    if json:
        print_json(task.to_dict() | {"progress": state})
        return
    out = console.print
    out(f"[bold]{task.name}[/] ({task.kind}, {task.overlap} label(s) per item)", highlight=False)
    if task.label_set:
        out("labels: " + ", ".join(task.label_set), highlight=False, markup=False)
    src = task.source
    where = f"dataset {src['dataset']}" if "dataset" in src else f"file {src.get('file')}"
    made = f"; model {src['model']}" if "model" in src else ""
    out(f"source: {where}{made}", highlight=False, markup=False)
    out(
        f"items {state['items']:,}: {state['labeled_items']:,} labeled, "
        f"{state['complete_items']:,} complete; {state['labels']:,} labels",
        highlight=False,
    )
    you = state["you"]
    out(
        f"you ({you['annotator']}): {you['labeled']:,} labeled, {you['remaining']:,} left",
        highlight=False,
        markup=False,
    )
    pre = state["prelabels"]
    if task.prelabel_source:
        out(
            f"pre-labels ({task.prelabel_source}): {pre['accepted']:,} of {pre['reviewed']:,} "
            f"accepted (accuracy {_fmt(pre['accuracy'])})",
            highlight=False,
            markup=False,
        )
    if state["annotators"]:
        print_table(
            "annotators", ["annotator", "labels"], [[a, n] for a, n in state["annotators"].items()]
        )
    if state["agreement"]:
        rows = [
            [" / ".join(p["annotators"]), p["items"], _fmt(p["observed"]), _fmt(p["kappa"])]
            for p in state["agreement"]
        ]
        print_table("agreement", ["annotators", "common items", "observed", "kappa"], rows)


def _show_item(task: TaskInfo, item: ItemInfo) -> None:
    from rich.markup import escape

    p, pre = item.payload, item.prelabel
    console.print(
        f"[bold]item {item.id}[/] (#{item.position + 1} of {task.items})", highlight=False
    )
    if task.kind == "spans":
        console.print(
            " ".join(f"{i}:{escape(t)}" for i, t in enumerate(p["tokens"])), highlight=False
        )
    if "prompt" in p:
        console.print("[bold]prompt:[/] " + escape(p["prompt"]), highlight=False)
    if "text" in p:
        console.print("[bold]text:[/] " + escape(p["text"]), highlight=False)
    if task.kind == "preference":
        console.print("[bold]A:[/] " + escape(p["a"]), highlight=False)
        console.print("[bold]B:[/] " + escape(p["b"]), highlight=False)
    if pre is not None:
        shown = (
            pre.get("label")
            or pre.get("choice")
            or pre.get("text")
            or " ".join(pre.get("labels", []))
        )
        console.print("[bold]pre-label:[/] " + escape(str(shown)), highlight=False)


@app.command("next")
def next_(
    name: TaskArg,
    annotator: AnnotatorOpt = None,
    agreement: AgreementOpt = False,
    json: JsonOpt = False,
) -> None:
    """Show the next item for you to label (and how to submit its label).

    With --json, the item is printed as JSON ({"item": null} when none is left), for scripts.
    """
    from genloop.feedback.labeling.queue import next_item
    from genloop.feedback.labeling.tasks import get_task

    who = _annotator(annotator)
    with open_workspace() as ws:
        task = get_task(ws, name)
        item = next_item(ws, name, who, agreement=agreement)
    if json:
        print_json({"item": item.to_dict() if item is not None else None, "annotator": who})
        return
    if item is None:
        console.print(f"nothing left for {who} in task {name}", highlight=False, markup=False)
        return
    _show_item(task, item)
    how = {
        "classification": "--label LABEL",
        "spans": "--labels L1,L2,…",
        "caption": '--text "…"',
        "preference": "--choice a|b",
    }[task.kind]
    accept = " (or --accept)" if item.prelabel is not None else ""
    console.print(
        f"submit: genloop label submit {name} {item.id} {how}{accept}",
        highlight=False,
        markup=False,
    )


def _value(
    kind: str,
    item: ItemInfo,
    value: str | None,
    label: str | None,
    labels: str | None,
    text: str | None,
    choice: str | None,
    accept: bool,
) -> Any:
    import json as json_

    from genloop.errors import ConfigError

    given = [x is not None for x in (value, label, labels, text, choice)] + [accept]
    if sum(given) != 1:
        raise ConfigError(
            "give the label one way: --label, --labels, --text, --choice, --accept or --value JSON"
        )
    if accept:
        if item.prelabel is None:
            raise ConfigError(f"item {item.id} has no pre-label to accept")
        return item.prelabel
    if value is not None:
        try:
            return json_.loads(value)
        except ValueError as exc:
            raise ConfigError(f"--value is not JSON ({exc})") from None
    if label is not None:
        return {"label": label}
    if labels is not None:
        return {"labels": [x.strip() for x in labels.split(",")]}
    if text is not None:
        return {"text": text}
    return {"choice": choice}


@app.command()
def submit(
    name: TaskArg,
    item_id: Annotated[int, typer.Argument(help="The item's id (from 'genloop label next').")],
    label: Annotated[str | None, typer.Option("--label", help="classification: the label.")] = None,
    labels: Annotated[
        str | None, typer.Option("--labels", help="spans: a label per token, comma-separated.")
    ] = None,
    text: Annotated[str | None, typer.Option("--text", help="caption: the edited text.")] = None,
    choice: Annotated[str | None, typer.Option("--choice", help="preference: a or b.")] = None,
    accept: Annotated[bool, typer.Option("--accept", help="Take the pre-label as it is.")] = False,
    value: Annotated[
        str | None, typer.Option("--value", help='The label as JSON, e.g. {"label": "pos"}.')
    ] = None,
    annotator: AnnotatorOpt = None,
    json: JsonOpt = False,
) -> None:
    """Submit your label of one item. A second label of the same item by you is refused."""
    from genloop.feedback.labeling.queue import submit_label
    from genloop.feedback.labeling.tasks import get_item, get_task

    who = _annotator(annotator)
    with open_workspace() as ws:
        task = get_task(ws, name)
        item = get_item(ws, name, item_id)
        checked = _value(task.kind, item, value, label, labels, text, choice, accept)
        info = submit_label(ws, name, item_id, who, checked, actor=_actor())
    if json:
        print_json(info.to_dict())
        return
    note = {True: " (pre-label accepted)", False: " (pre-label corrected)", None: ""}
    console.print(
        f"labeled item {item_id} of {name} as {who}{note[info.prelabel_accepted]}",
        highlight=False,
        markup=False,
    )


@app.command()
def annotate(
    name: TaskArg, annotator: AnnotatorOpt = None, agreement: AgreementOpt = False
) -> None:
    """Label a classification or preference task item after item in the terminal.

    Type a label (or its number; a or b for preferences), Enter to accept the pre-label,
    q to stop. Every answer is stored at once.
    """
    from rich.prompt import Prompt

    from genloop.errors import ConfigError
    from genloop.feedback.labeling.queue import next_item, progress, submit_label
    from genloop.feedback.labeling.tasks import get_task

    who = _annotator(annotator)
    done = 0
    with open_workspace() as ws:
        task = get_task(ws, name)
        if task.kind not in ("classification", "preference"):
            raise ConfigError(
                f"annotate is for classification and preference tasks; label {task.kind} "
                "items with 'genloop label next/submit' or in the web UI"
            )
        options = task.label_set if task.kind == "classification" else ["a", "b"]
        numbered = {str(i + 1): x for i, x in enumerate(options)}
        menu = "  ".join(f"{k}={v}" for k, v in numbered.items())
        while (item := next_item(ws, name, who, agreement=agreement)) is not None:
            _show_item(task, item)
            pre = item.prelabel and (item.prelabel.get("label") or item.prelabel.get("choice"))
            console.print(menu, highlight=False, markup=False)
            ask = "label (Enter: the pre-label; q to stop)" if pre else "label (q to stop)"
            prompt = Prompt(
                ask, choices=[*options, *numbered, "q"], show_choices=False, console=console
            )
            answer = str(prompt(default=pre) if pre else prompt())
            if answer == "q":
                break
            picked = numbered.get(answer, answer)
            key = "label" if task.kind == "classification" else "choice"
            submit_label(ws, name, item.id, who, {key: picked}, actor=_actor())
            done += 1
        left = progress(ws, name, who)["you"]["remaining"]
    console.print(f"{done} labeled by {who}; {left} left for you", highlight=False, markup=False)


@app.command()
def export(
    name: TaskArg,
    dataset: Annotated[
        str | None, typer.Option("--name", "-n", help="Dataset name \\[default: TASK-labels].")
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            help="The model the rows will train (a model ref or a tokenizer directory) "
            "\\[default: the source dataset's tokenizer, else the pre-label model's].",
            show_default=False,
        ),
    ] = None,
    min_labels: Annotated[
        int, typer.Option("--min-labels", min=1, help="Leave out items with fewer labels.")
    ] = 1,
    val: Annotated[
        float | None,
        typer.Option(
            "--val",
            min=0.0,
            max=0.99,
            help="Share of rows for validation \\[default: 0.1, none under 20 rows].",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split.")] = 0,
    json: JsonOpt = False,
) -> None:
    """Export the labeled items as a dataset version (classification, token_classification,
    sft or dpo) with lineage; items whose annotators tie are left out and counted."""
    from genloop.feedback.labeling.export import export_task

    with open_workspace() as ws:
        result = export_task(
            ws,
            name,
            name=dataset,
            tokenizer=tokenizer,
            min_labels=min_labels,
            val_fraction=val,
            seed=seed,
            actor=_actor(),
        )
    if json:
        print_json(result.to_dict())
        return
    left = ", ".join(f"{k} {v}" for k, v in result.counts.items() if k != "exported" and v)
    console.print(
        f"exported {result.rows} rows ({result.kind}) as dataset {result.dataset.ref}"
        + (f"; left out: {left}" if left else ""),
        highlight=False,
        markup=False,
    )
