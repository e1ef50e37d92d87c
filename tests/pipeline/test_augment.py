"""``augment_text``: a row dataset → an augmented version of the same kind, with lineage.

The datasets are a few dozen made-up rows; the teacher is a 2-layer, 64-wide random Llama
registered as ``tiny`` (its text is noise, which is what the filters are for), or, where a
test needs answers it can predict, a scripted teacher behind the same ``Teacher`` seam."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from genloop.data.augment_text import row_sha256
from genloop.data.pairs import read_pairs, write_pairs_dataset
from genloop.data.tokenizer import train_bpe
from genloop.errors import ConfigError, GenloopError, NotFoundError
from genloop.pipeline.augment import augment_text
from genloop.serve.teacher import (
    TeacherReply,
    TeacherRequest,
    TeacherSettings,
    load_engine_teacher,
)
from genloop.workspace import Workspace, init_workspace, registry
from genloop.workspace.datasets import resolve_dataset

from ..models.test_synonyms import CORPUS as MLM_CORPUS
from ..models.test_synonyms import save_masked_lm
from ..serve.conftest import build_wide_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOOD = ["lovely", "warm", "bright", "clever", "happy", "gentle", "funny", "brave"]
BAD = ["dull", "cold", "flat", "clumsy", "gloomy", "harsh", "boring", "weak"]
REVIEWS = [
    {"id": f"r{i}", "text": f"The film felt {w} and the cast made every scene {w} too", "label": y}
    for i, (w, y) in enumerate([(w, "pos") for w in GOOD] + [(w, "neg") for w in BAD])
]
SEEDS = [
    "Write a short poem about the sea",
    "Explain photosynthesis to a child",
    "Give three tips for learning a language",
    "Translate good morning into French",
    "Name the planets of the solar system",
    "Suggest a name for a bakery",
    "Describe how a bicycle works",
]
SFT = [{"prompt": p, "response": f"Here is my answer to: {p.lower()}."} for p in SEEDS]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("augment")
    ws = init_workspace(root / "ws")
    texts = [r["text"] for r in REVIEWS] + SEEDS + MLM_CORPUS
    tok = train_bpe(texts * 2, root / "tok", vocab_size=400, min_frequency=1)
    write_pairs_dataset(ws, "reviews", "classification", REVIEWS, tokenizer_dir=tok)
    write_pairs_dataset(ws, "chat", "sft", SFT, tokenizer_dir=tok, val_fraction=0.0)
    tagged = [{"tokens": ["Paris", "is", "big"], "labels": ["LOC", "O", "O"]}]
    write_pairs_dataset(ws, "tags", "token_classification", tagged, tokenizer_dir=tok)
    # "happy" is the only word that is not a stop word
    mood = [{"text": f"{w} so happy", "label": "up"} for w in ("I am", "we are", "you are")]
    write_pairs_dataset(ws, "mood", "classification", mood, tokenizer_dir=tok, val_fraction=0)
    registry.register_model(
        ws, "tiny", "causal_lm", build_wide_llama(root / "lm", tok, context_length=512)
    )
    yield ws
    ws.close()


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mlm")
    tok_dir = train_bpe(MLM_CORPUS, root / "tok", vocab_size=400, min_frequency=1)
    return save_masked_lm(root / "model", tok_dir)


def rows_of(ws: Workspace, ref: str, split: str = "train") -> list[dict[str, Any]]:
    info = resolve_dataset(ws, ref)
    return read_pairs(ws.store.open_verified(info.artifact), split, info.kind)


def test_eda_writes_a_version_of_the_same_kind_with_lineage(ws: Workspace) -> None:
    source_train, source_val = rows_of(ws, "reviews"), rows_of(ws, "reviews", "val")
    assert source_val  # the split the new version must keep
    result = augment_text(ws, "reviews", "eda", copies=3, alpha=0.2, seed=1)
    version = result.version
    assert (version.ref, version.kind) == ("reviews-augmented@1", "classification")

    train, val = rows_of(ws, version.ref), rows_of(ws, version.ref, "val")
    assert val == source_val  # nothing generated joins validation
    assert train[: len(source_train)] == source_train
    made = train[len(source_train) :]
    by_hash = {row_sha256(r): r for r in source_train}
    texts = {r["text"] for r in source_train + source_val}
    for row in made:
        lineage = row["meta"]["augment"]
        source = by_hash[lineage["source_sha256"]]
        assert lineage["source_id"] == source["id"] and "id" not in row
        assert lineage["method"] == "eda" and lineage["edit"] in ("swap", "delete", "insert")
        assert isinstance(lineage["seed"], int) and lineage["alpha"] == 0.2
        assert row["label"] == source["label"] and row["text"] not in texts
    assert len({r["text"] for r in made}) == len(made)  # deduplicated among themselves

    stats = version.stats["augment"]
    assert stats["generated"] == 3 * len(source_train) == result.generated
    assert stats["kept"] == len(made) == result.kept > 0
    assert stats["generated"] == stats["kept"] + sum(stats["dropped"].values())
    assert version.lineage == {
        "source": "augment",
        "dataset": "reviews@1",
        "dataset_version_id": resolve_dataset(ws, "reviews").id,
        "method": "eda",
        "seed": 1,
        "copies": 3,
        "alpha": 0.2,
        "edits": ["swap", "delete", "insert"],
    }
    # seeded: the same call finds the same version; another seed makes another
    assert augment_text(ws, "reviews", "eda", copies=3, alpha=0.2, seed=1).version.id == version.id
    assert augment_text(ws, "reviews", "eda", copies=3, alpha=0.2, seed=2).version.version == 2


def test_synonyms_come_from_a_masked_lm(ws: Workspace, mlm_dir: Path) -> None:
    result = augment_text(ws, "mood", "synonyms", model=str(mlm_dir), neighbours=2, copies=3)
    made = rows_of(ws, result.version.ref)[3:]
    assert {r["text"].split()[-1] for r in made} == {"glad", "cheerful"}
    assert all(r["meta"]["augment"]["edit"] == "replace" for r in made)
    assert result.version.lineage["synonyms_from"] == {"model_dir": str(mlm_dir.resolve())}
    # each row has two synonyms for three copies: one copy at least repeats another
    assert result.generated == 9 and result.kept == len(made) == 6
    assert result.dropped == {"duplicate": 3}

    with pytest.raises(GenloopError, match=r"tiny@1 is a causal_lm model, not a masked LM"):
        augment_text(ws, "mood", "synonyms", model="tiny")
    with pytest.raises(ConfigError, match="synonyms needs --model"):
        augment_text(ws, "mood", "synonyms")


def test_synonyms_from_a_registered_masked_lm(ws: Workspace, mlm_dir: Path) -> None:
    if "masked_lm" not in registry.FAMILIES:
        pytest.skip("the masked_lm family is not in the registry on this branch (issue 25)")
    registry.register_model(ws, "mlm", "masked_lm", mlm_dir)
    result = augment_text(ws, "mood", "synonyms", model="mlm", neighbours=2, name="mood-reg")
    assert result.version.lineage["synonyms_from"]["model"] == "mlm@1" and result.kept == 3


def test_what_a_method_cannot_augment_is_refused(ws: Workspace) -> None:
    with pytest.raises(GenloopError, match="eda can't augment a token_classification dataset"):
        augment_text(ws, "tags", "eda")
    with pytest.raises(GenloopError, match=r"self-instruct .* needs an sft dataset"):
        augment_text(ws, "reviews", "self-instruct", teacher=Scripted(lambda p: None))
    with pytest.raises(NotFoundError, match="no dataset named 'nosuch'"):
        augment_text(ws, "nosuch", "eda")
    with pytest.raises(ConfigError, match="paraphrase needs a teacher"):
        augment_text(ws, "reviews", "paraphrase")
    with pytest.raises(ConfigError, match="unknown method 'mixup'"):
        augment_text(ws, "reviews", "mixup")
    with pytest.raises(GenloopError, match="alpha must be in"):
        augment_text(ws, "reviews", "eda", alpha=0.9)


def test_a_genloop_model_paraphrases_and_continues(ws: Workspace) -> None:
    settings = TeacherSettings(max_tokens=8, temperature=1.0)
    source = rows_of(ws, "reviews")
    result = augment_text(
        ws,
        "reviews",
        "paraphrase",
        teacher=load_engine_teacher(ws, "tiny", settings, device="cpu"),
        copies=2,
        min_chars=1,
        name="reviews-para",
    )
    assert result.generated == 2 * len(source) and result.kept > 0
    assert result.generated == result.kept + sum(result.dropped.values())
    by_hash = {row_sha256(r): r for r in source}
    for row in rows_of(ws, result.version.ref)[len(source) :]:
        lineage = row["meta"]["augment"]
        assert lineage["teacher"]["model"] == "tiny@1" and lineage["method"] == "paraphrase"
        text = by_hash[lineage["source_sha256"]]["text"]
        assert lineage["prompt"].startswith("Rewrite the following text")
        assert lineage["prompt"].endswith(f"Text: {text}\nRewritten:")
    assert result.version.lineage["teacher_settings"]["max_tokens"] == 8
    again = augment_text(
        ws,
        "reviews",
        "paraphrase",
        teacher=load_engine_teacher(ws, "tiny", settings, device="cpu"),
        copies=2,
        min_chars=1,
        name="reviews-para",
    )
    assert again.version.id == result.version.id  # the seeds make the same texts

    cont = augment_text(
        ws,
        "reviews",
        "continue",
        teacher=load_engine_teacher(ws, "tiny", settings, device="cpu"),
        name="reviews-cont",
    )
    for row in rows_of(ws, cont.version.ref)[len(source) :]:
        prefix = row["meta"]["augment"]["prompt"]
        assert row["text"].startswith(prefix + " ") and len(row["text"]) > len(prefix) + 1
        assert len(prefix.split()) == 6  # the first half of the source's 11 words


class Scripted:
    """A teacher answering from a script (a test double behind the ``Teacher`` seam)."""

    def __init__(self, answer: Callable[[str], str | None]) -> None:
        self.settings = TeacherSettings()
        self.answer = answer
        self.prompts: list[str] = []
        self.events: list[str] = []

    def lineage(self) -> dict[str, Any]:
        return {"model": "scripted"}

    async def start(self) -> None:
        self.events.append("start")

    async def close(self) -> None:
        self.events.append("close")

    async def generate(self, requests: list[TeacherRequest]) -> list[TeacherReply]:
        self.prompts += [r.prompt for r in requests]
        answers = [(r.id, self.answer(r.prompt)) for r in requests]
        return [TeacherReply(i, a, None if a is not None else "no answer") for i, a in answers]


def test_self_instruct_filters_new_instructions_and_their_responses(ws: Workspace) -> None:
    instructions = iter(
        [
            "Write a short poem about the ocean",  # ROUGE-L 0.86 with a seed: dropped
            "explain photosynthesis to a child",  # a seed again, up to case
            "",
            "List three uses of a paperclip",
            "Describe a sunrise over the mountains",  # its response is empty
        ]
    )
    responses = {"List three uses of a paperclip": "A bookmark, a hook and a zip pull."}

    def answer(prompt: str) -> str | None:
        if prompt.startswith("Come up with a series of tasks:"):
            return next(instructions, None)  # then a failed answer
        instruction = prompt.removeprefix("Instruction: ").removesuffix("\nResponse:")
        return responses.get(instruction, "")

    teacher = Scripted(answer)
    result = augment_text(ws, "chat", "self-instruct", teacher=teacher, rows=3, max_rounds=2)
    assert teacher.events == ["start", "close"]
    assert result.dropped == {
        "rouge_similar": 1,
        "duplicate": 1,
        "empty": 1,
        "teacher_error": 1,
        "response_empty": 1,
    }
    assert (result.kept, result.generated) == (1, 6)
    rows = rows_of(ws, result.version.ref)
    assert rows[:-1] == SFT and result.version.kind == "sft"
    new = rows[-1]
    assert (new["prompt"], new["response"]) == (
        "List three uses of a paperclip",
        "A bookmark, a hook and a zip pull.",
    )
    lineage = new["meta"]["augment"]
    assert lineage["method"] == "self-instruct" and lineage["teacher"] == {"model": "scripted"}
    prompt = lineage["prompt"]
    shown = prompt.splitlines()[2:-1]  # "Task 1: …" … ; the last line asks for the next
    assert prompt.startswith("Come up with a series of tasks:\n\nTask 1: ")
    assert prompt.endswith(f"\nTask {len(shown) + 1}:") and 1 <= len(shown) <= 8
    assert lineage["response_prompt"] == "Instruction: List three uses of a paperclip\nResponse:"
    assert isinstance(lineage["seed"], int) and isinstance(lineage["response_seed"], int)
    seeds = {row_sha256(r) for r in SFT}
    assert set(lineage["seed_instructions"]) <= seeds and len(lineage["seed_instructions"]) == 7
    assert json.dumps(result.version.stats["augment"]["dropped"], sort_keys=True) == json.dumps(
        result.dropped, sort_keys=True
    )


def test_self_instruct_runs_on_a_genloop_model(ws: Workspace) -> None:
    settings = TeacherSettings(max_tokens=12, temperature=1.0)
    teacher = load_engine_teacher(ws, "tiny", settings, device="cpu")
    result = augment_text(
        ws, "chat", "self-instruct", teacher=teacher, rows=3, max_rounds=2, min_chars=1
    )
    assert 1 <= result.kept <= 3 and result.generated == result.kept + sum(result.dropped.values())
    for row in rows_of(ws, result.version.ref)[len(SFT) :]:
        lineage = row["meta"]["augment"]
        assert lineage["teacher"]["model"] == "tiny@1"
        assert lineage["prompt"].startswith("Come up with a series of tasks:")
        assert row["prompt"] and row["response"]
