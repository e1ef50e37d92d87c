"""``genloop augment text``: a row dataset → an augmented version of the same kind.

Methods (what each generated row is):

* ``eda``: an EDA edit of a source row (swap, delete, insert; with ``model``, a masked LM,
  also synonym replacement, and insertion inserts synonyms: the full EDA) —
  ``data/augment_text.py``;
* ``synonyms``: synonym replacement only, through the nearest neighbours of ``model``'s
  input embeddings (``models/synonyms.py``);
* ``paraphrase``: a teacher rewrites the row's text (``template``, ``{text}`` in it);
* ``continue``: a teacher continues the first half of the row's text;
* ``self-instruct`` (Wang et al. 2022): a teacher proposes new instructions from a few of
  the dataset's own (6 seed instructions and up to 2 it made before, as in the paper),
  then answers each; ``sft`` datasets only.

Teachers (``serve/teacher.py``) are a genloop text model or an OpenAI-compatible upstream.
Only the training split is augmented; the new version keeps its source's split (validation
rows stay validation rows, and nothing generated joins them). Every generated text passes
``RowFilter`` against every source text (train and validation) and the generated texts
before it; the version's stats count what was generated, kept and dropped by reason
(``stats.augment``), each generated row's ``meta.augment`` says how it was made (method,
source row hash and id, teacher, prompt, seed), and the version's lineage names the source
version, the method, its settings and the teacher.

:func:`augment_text`, read top to bottom, is the whole flow.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from genloop.data.augment_text import (
    EDA_OPS,
    ROUGE_THRESHOLD,
    EdaOp,
    RougeFilter,
    RowFilter,
    Synonyms,
    augmented_field,
    check_alpha,
    derive_seed,
    eda_copies,
    generated_row,
    row_sha256,
)
from genloop.data.clean import normalize_text
from genloop.errors import ConfigError, GenloopError

if TYPE_CHECKING:
    from genloop.data.pairs import PairsKind
    from genloop.serve.teacher import Teacher, TeacherReply, TeacherRequest
    from genloop.workspace.datasets import DatasetVersionInfo
    from genloop.workspace.workspace import Workspace

Method = Literal["eda", "synonyms", "paraphrase", "continue", "self-instruct"]
METHODS: tuple[Method, ...] = get_args(Method)
TEACHER_METHODS = ("paraphrase", "continue", "self-instruct")
ProgressFn = Callable[[int, int], None]  # (texts generated, texts to generate)

PARAPHRASE_TEMPLATE = (
    "Rewrite the following text in other words, keeping its meaning.\n\nText: {text}\nRewritten:"
)
PARAPHRASE_STOP = ("\nText:", "\n\n")  # completion mode: one rewrite, not a next example
# Self-Instruct's instruction-generation prompt (Wang et al. 2022, Table 5), one new task
INSTRUCTION_HEADER = "Come up with a series of tasks:\n\n"
RESPONSE_TEMPLATE = "Instruction: {instruction}\nResponse:"  # completion mode
SEED_TASKS, MACHINE_TASKS = 6, 2  # in-context instructions per prompt, as in the paper
MAX_COPIES = 1000
MAX_ROWS = 100_000
CHUNK = 256  # requests per teacher call (progress is reported between calls)


@dataclass
class AugmentResult:
    version: DatasetVersionInfo
    source: DatasetVersionInfo
    method: str
    generated: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version.to_dict(),
            "source": self.source.ref,
            "method": self.method,
            "generated": self.generated,
            "kept": self.kept,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }


def augment_text(
    ws: Workspace,
    dataset: str,
    method: str,
    *,
    name: str | None = None,
    copies: int = 1,
    rows: int = 20,
    alpha: float = 0.1,
    model: str | None = None,
    neighbours: int = 5,
    min_similarity: float = 0.0,
    teacher: Teacher | None = None,
    template: str | None = None,
    seed: int = 0,
    min_chars: int = 5,
    max_chars: int | None = 10_000,
    near_threshold: float | None = 0.85,
    rouge_threshold: float = ROUGE_THRESHOLD,
    max_rounds: int = 10,
    progress: ProgressFn | None = None,
) -> AugmentResult:
    """Augment dataset ``dataset`` (``NAME`` or ``NAME@VERSION``) with ``method`` and
    publish the source's training rows + the kept generated rows (+ its validation rows)
    as the next version of ``name`` (default ``<dataset name>-augmented``).

    ``copies``: generated texts per source row (every method but self-instruct, which
    makes ``rows`` new rows in at most ``max_rounds`` rounds). ``model``: the masked LM
    (ref or directory) synonyms come from: a word's ``neighbours`` nearest whole words at
    cosine similarity ``min_similarity`` or more. ``teacher``: the generator of paraphrase,
    continue and self-instruct (started and closed here).
    """
    from genloop.data.pairs import pairs_kind, read_pairs, write_pairs_dataset
    from genloop.workspace.datasets import check_trainable, resolve_dataset
    from genloop.workspace.refs import check_name

    started = time.perf_counter()
    # 1. check the request before any work
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r} (methods: {', '.join(METHODS)})")
    if not 1 <= copies <= MAX_COPIES:
        raise ConfigError(f"copies must be between 1 and {MAX_COPIES}, not {copies}")
    if not 1 <= rows <= MAX_ROWS:
        raise ConfigError(f"rows must be between 1 and {MAX_ROWS}, not {rows}")
    check_alpha(alpha)
    if method in TEACHER_METHODS and teacher is None:
        raise ConfigError(
            f"{method} needs a teacher: --teacher MODEL, or --upstream URL --upstream-model NAME"
        )
    if method not in TEACHER_METHODS and teacher is not None:
        raise ConfigError(f"{method} takes no teacher (it is for {', '.join(TEACHER_METHODS)})")
    if method == "synonyms" and model is None:
        raise ConfigError("synonyms needs --model: a masked LM whose embeddings give them")
    if method in TEACHER_METHODS and model is not None:
        raise ConfigError(f"--model is the masked LM of eda and synonyms, not of {method}")
    if template is not None and method != "paraphrase":
        raise ConfigError("--template is for paraphrase")
    if template is not None and "{text}" not in template:
        raise ConfigError("--template must hold {text}, where the row's text goes")
    if method == "continue" and teacher is not None and teacher.settings.chat:
        raise ConfigError("continue sends the text to be continued as is; drop --chat")

    # 2. the source rows
    source = check_trainable(resolve_dataset(ws, dataset))
    data_dir = ws.store.open_verified(source.artifact)
    kind = pairs_kind(data_dir)
    if method == "self-instruct" and kind != "sft":
        raise GenloopError(
            f"self-instruct writes instruction/response rows, so it needs an sft dataset; "
            f"{source.ref} is {kind}: use eda, synonyms, paraphrase or continue"
        )
    text_field = augmented_field(kind, method)
    train = read_pairs(data_dir, "train", kind)
    val = read_pairs(data_dir, "val", kind)
    out_name = check_name(name or f"{source.name}-augmented")
    skipped: Counter[str] = Counter()
    usable = []  # (row, its text): rows whose field holds text (sft rows may be messages)
    for row in train:
        if not isinstance(row.get(text_field), str):
            skipped["messages"] += 1
        elif method == "continue" and len(str(row[text_field]).split()) < 2:
            skipped["too_few_words"] += 1  # nothing to cut into a prefix and a rest
        else:
            usable.append((row, str(row[text_field])))
    if not usable:
        raise GenloopError(f"{source.ref} has no training rows with a {text_field} to augment")
    known = [text for _, text in usable] + [
        str(r[text_field]) for r in val if isinstance(r.get(text_field), str)
    ]

    # 3. generate and filter
    novelty = RougeFilter(known, rouge_threshold) if method == "self-instruct" else None
    checks = RowFilter(
        known,
        min_chars=min_chars,
        max_chars=max_chars,
        near_threshold=near_threshold,
        novelty=novelty,
    )
    settings: dict[str, Any] = {"seed": seed}
    if method in ("eda", "synonyms"):
        synonyms, synonyms_from = _synonyms(ws, model, neighbours, min_similarity)
        ops: tuple[EdaOp, ...] = (
            ("replace",)
            if method == "synonyms"
            else EDA_OPS
            if synonyms is not None
            else ("swap", "delete", "insert")
        )
        settings |= {"copies": copies, "alpha": alpha, "edits": list(ops)}
        if synonyms_from is not None:
            settings["synonyms_from"] = synonyms_from
            settings |= {"neighbours": neighbours, "min_similarity": min_similarity}
        made = _edit_rows(
            usable, text_field, method, ops, copies, alpha, seed, synonyms, checks, progress
        )
    else:
        assert teacher is not None
        settings |= {"teacher": teacher.lineage(), "teacher_settings": _plain(teacher)}
        if method == "self-instruct":
            settings |= {"rows": rows, "rouge_threshold": rouge_threshold}
            run = _self_instruct(teacher, usable, rows, max_rounds, seed, checks, progress)
        else:
            settings["copies"] = copies
            if method == "paraphrase":
                settings["template"] = template or PARAPHRASE_TEMPLATE
            run = _teacher_rows(
                teacher, usable, text_field, method, copies, template, seed, checks, progress
            )
        made = asyncio.run(_with_teacher(teacher, run))
    generated = len(made) + sum(checks.dropped.values())
    if not made:
        why = ", ".join(f"{k} {v}" for k, v in checks.dropped.most_common()) or "none made"
        if "teacher_error" in checks.details:
            why += f"; the teacher's first error: {checks.details['teacher_error']}"
        raise GenloopError(f"{method} kept no generated row of {generated} (dropped: {why})")

    # 4. publish: source train + kept rows as train, the source's validation as is
    stats: dict[str, Any] = {
        "method": method,
        "source_rows": len(train),
        "generated": generated,
        "kept": len(made),
        "dropped": dict(checks.dropped),
        "skipped": dict(skipped),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if "teacher_error" in checks.details:
        stats["first_teacher_error"] = checks.details["teacher_error"]
    lineage = {
        "source": "augment",
        "dataset": source.ref,
        "dataset_version_id": source.id,
        "method": method,
        **settings,
    }
    version = write_pairs_dataset(
        ws,
        out_name,
        cast("PairsKind", kind),  # pairs_kind read what write_pairs_dataset wrote
        [*train, *made],
        tokenizer_dir=data_dir / "tokenizer",
        val_fraction=float(source.config.get("val_fraction", 0.0)),
        seed=int(source.config.get("seed", 0)),
        lineage=lineage,
        val_rows=val,
        extra_stats={"augment": stats},
    )
    return AugmentResult(
        version,
        source,
        method,
        generated,
        len(made),
        dict(checks.dropped),
        dict(skipped),
        time.perf_counter() - started,
    )


# --------------------------------------------------------------------- edit methods


def _synonyms(
    ws: Workspace, model: str | None, k: int, min_similarity: float
) -> tuple[Synonyms | None, dict[str, Any] | None]:
    """The synonym source of masked LM ``model`` (a ref or a directory) and its lineage."""
    if model is None:
        return None, None
    from genloop.models.synonyms import MASKED_LM, load_neighbours
    from genloop.workspace import registry

    local = Path(model).expanduser()
    if ("/" in model or model.startswith(".")) and local.is_dir():
        found = load_neighbours(local, what=model, k=k, min_similarity=min_similarity)
        return found, {"model_dir": str(local.resolve())}
    info = registry.resolve(ws, model)
    if info.family != MASKED_LM:
        raise GenloopError(
            f"{info.ref} is a {info.family} model, not a masked LM; synonyms come from the "
            "input embeddings of a masked LM (family masked_lm): train or import one"
        )
    path = ws.store.open_verified(info.artifact)
    found = load_neighbours(path, what=info.ref, k=k, min_similarity=min_similarity)
    return found, {"model": info.ref, "model_version_id": info.id}


def _edit_rows(
    usable: list[tuple[dict[str, Any], str]],
    text_field: str,
    method: str,
    ops: tuple[EdaOp, ...],
    copies: int,
    alpha: float,
    seed: int,
    synonyms: Synonyms | None,
    checks: RowFilter,
    progress: ProgressFn | None,
) -> list[dict[str, Any]]:
    made = []
    for done, (row, text) in enumerate(usable, start=1):
        row_seed = derive_seed(seed, row_sha256(row))
        for op, copy_seed, new in eda_copies(text, copies, alpha, row_seed, ops, synonyms):
            if checks.reason(new) is None:
                lineage = {"method": method, "edit": op, "alpha": alpha, "seed": copy_seed}
                made.append(generated_row(row, text_field, new, lineage))
        if progress is not None:
            progress(done * copies, len(usable) * copies)
    return made


# ------------------------------------------------------------------ teacher methods


async def _with_teacher(teacher: Teacher, work: Any) -> list[dict[str, Any]]:
    await teacher.start()
    try:
        return list(await work)
    finally:
        await teacher.close()


def _plain(teacher: Teacher) -> dict[str, Any]:
    s = teacher.settings
    return {
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "chat": s.chat,
    }


async def _ask(
    teacher: Teacher, requests: list[TeacherRequest], progress: ProgressFn | None, total: int
) -> list[TeacherReply]:
    """The teacher's replies, in chunks so that progress moves."""
    replies: list[TeacherReply] = []
    for i in range(0, len(requests), CHUNK):
        replies += await teacher.generate(requests[i : i + CHUNK])
        if progress is not None:
            progress(len(replies), total)
    return replies


async def _teacher_rows(
    teacher: Teacher,
    usable: list[tuple[dict[str, Any], str]],
    text_field: str,
    method: str,
    copies: int,
    template: str | None,
    seed: int,
    checks: RowFilter,
    progress: ProgressFn | None,
) -> list[dict[str, Any]]:
    """paraphrase / continue: ``copies`` teacher texts per source row."""
    from genloop.serve.teacher import TeacherRequest

    chat = teacher.settings.chat
    plan = []  # (source row, prompt, the part of the text kept before the answer)
    requests = []
    stop: tuple[str, ...] | None
    for i, (row, text) in enumerate(usable):
        if method == "paraphrase":
            prompt, prefix = (template or PARAPHRASE_TEMPLATE).replace("{text}", text), None
            stop = None if chat or template is not None else PARAPHRASE_STOP
        else:
            words = text.split()
            prompt = prefix = " ".join(words[: math.ceil(len(words) / 2)])
            stop = ("\n\n",)
        row_seed = derive_seed(seed, row_sha256(row))
        for c in range(copies):
            request_seed = derive_seed(row_seed, c)
            requests.append(TeacherRequest(f"{i}-{c}", prompt, request_seed, stop))
            plan.append((row, prompt, prefix))
    replies = await _ask(teacher, requests, progress, len(requests))
    made = []
    for (row, prompt, prefix), request, reply in zip(plan, requests, replies, strict=True):
        if reply.text is None:
            checks.drop("teacher_error", reply.error)
            continue
        answer = normalize_text(reply.text)  # NFC, no control characters, trimmed
        if prefix is not None:  # continue: the prefix and what the teacher added
            if not answer:
                checks.drop("empty")
                continue
            answer = f"{prefix} {answer}"
        if checks.reason(answer) is None:
            lineage = {
                "method": method,
                "teacher": teacher.lineage(),
                "prompt": prompt,
                "seed": request.seed,
            }
            made.append(generated_row(row, text_field, answer, lineage))
    return made


def instruction_prompt(instructions: list[str]) -> str:
    """Self-Instruct's prompt: the instructions as numbered tasks, then the next number."""
    lines = [f"Task {i}: {' '.join(text.split())}" for i, text in enumerate(instructions, 1)]
    return INSTRUCTION_HEADER + "\n".join(lines) + f"\nTask {len(instructions) + 1}:"


async def _self_instruct(
    teacher: Teacher,
    usable: list[tuple[dict[str, Any], str]],
    rows: int,
    max_rounds: int,
    seed: int,
    checks: RowFilter,
    progress: ProgressFn | None,
) -> list[dict[str, Any]]:
    """Rounds of: new instructions (filtered) → their responses (filtered) → new rows."""
    from genloop.data.clean import QualityFilter
    from genloop.data.records import Dropped, Record
    from genloop.serve.teacher import TeacherRequest

    chat = teacher.settings.chat
    response_quality = QualityFilter(min_chars=1, max_chars=checks.quality.max_chars)
    made: list[dict[str, Any]] = []
    machine: list[tuple[str, str]] = []  # (instruction, its row's hash): instructions made
    for round_ in range(max_rounds):
        want = rows - len(made)
        if want <= 0:
            break
        rng = random.Random(derive_seed(seed, "round", round_))  # noqa: S311 (not a secret)
        # 1. instructions: each prompt shows 6 seed tasks and up to 2 made ones (the paper)
        requests, shown = [], []
        for j in range(want):
            picked = rng.sample(usable, min(SEED_TASKS + MACHINE_TASKS, len(usable)))
            tasks = [(text, row_sha256(row)) for row, text in picked]
            made_ones = rng.sample(machine, min(MACHINE_TASKS, len(machine)))
            tasks = tasks[: max(SEED_TASKS, len(tasks) - len(made_ones))] + made_ones
            prompt = instruction_prompt([t for t, _ in tasks])
            request_seed = derive_seed(seed, "instruction", round_, j)
            requests.append(TeacherRequest(f"i{round_}-{j}", prompt, request_seed, ("\n",)))
            shown.append([h for _, h in tasks])
        replies = await teacher.generate(requests)
        instructions = []
        for request, reply, hashes in zip(requests, replies, shown, strict=True):
            if reply.text is None:
                checks.drop("teacher_error", reply.error)
                continue
            text = normalize_text(reply.text)
            if checks.reason(text) is None:
                instructions.append((text, request, hashes))
        # 2. a response to each new instruction
        answers = [
            TeacherRequest(
                f"r{round_}-{k}",
                text if chat else RESPONSE_TEMPLATE.replace("{instruction}", text),
                derive_seed(seed, "response", round_, k),
                None if chat else ("\nInstruction:",),
            )
            for k, (text, _, _) in enumerate(instructions)
        ]
        responses = await teacher.generate(answers) if answers else []
        for (text, request, hashes), answer, reply in zip(
            instructions, answers, responses, strict=True
        ):
            if reply.text is None:
                checks.drop("teacher_error", reply.error)
                continue
            response = normalize_text(reply.text)
            verdict = response_quality(Record(id="", source="augment", text=response))
            if isinstance(verdict, Dropped):
                checks.drop(f"response_{verdict.reason}")
                continue
            lineage = {
                "method": "self-instruct",
                "teacher": teacher.lineage(),
                "prompt": request.prompt,
                "seed": request.seed,
                "response_prompt": answer.prompt,
                "response_seed": answer.seed,
                "seed_instructions": hashes,
            }
            row = {"prompt": text, "response": response, "meta": {"augment": lineage}}
            made.append(row)
            machine.append((text, row_sha256(row)))
        if progress is not None:
            progress(len(made), rows)
    return made
