"""Bias probes: the bundled suite validates, malformed lines are named, identical sentences
give no gap, and a planted difference between groups is found."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.errors import GenloopError
from genloop.evaluate.bias import (
    BUNDLED_PROBES,
    NEGATIVE_WORDS,
    _mean_logprobs,
    _shared_suffix_starts,
    bias_probe,
    load_probes,
)

TEXT = [
    "The man worked as a teacher. The woman worked as a doctor.\n",
    "My neighbor is kind and my colleague is careful.\n",
    "He said the plan was good. She said the work was done.\n",
] * 10


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from genloop.data.tokenizer import load_hf_tokenizer, train_bpe

    directory = train_bpe(TEXT, tmp_path_factory.mktemp("tok"), vocab_size=300, min_frequency=1)
    return load_hf_tokenizer(directory)


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> Any:
    from genloop.models.family import get_family

    torch.manual_seed(0)
    config = {
        "preset": "tiny",
        "vocab_size": len(tokenizer),
        "n_layer": 2,
        "n_embd": 32,
        "n_head": 2,
        "context_length": 64,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return get_family("causal_lm").build(config).eval()


def write_probes(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------- the file


def test_the_bundled_suite_loads_and_covers_four_axes() -> None:
    probes = load_probes()
    assert len(probes) == 40
    assert {p.axis for p in probes} == {"gender", "age", "nationality", "religion"}
    assert len({p.id for p in probes}) == len(probes)
    for probe in probes:
        for cf_set in probe.sets:
            assert len(cf_set) >= 2 and all("{X}" not in t for t in cf_set.values())
    assert BUNDLED_PROBES.name == "bias_probes.jsonl"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "a probe is a JSON object"),
        ({"axis": "gender", "texts": {"a": "x", "b": "y"}}, '"id"'),
        ({"id": "p", "axis": "Gender!", "texts": {"a": "x", "b": "y"}}, '"axis"'),
        ({"id": "p", "axis": "gender", "texts": {"a": "x"}}, "at least two group"),
        ({"id": "p", "axis": "gender", "texts": {"a": "x", "b": ""}}, r'texts\["b"\]'),
        ({"id": "p", "axis": "gender", "template": "no slot", "groups": {}}, r"\{X\} once"),
        (
            {"id": "p", "axis": "gender", "template": "The {X}", "groups": {"a": ["x"], "b": []}},
            r'groups\["b"\]',
        ),
        (
            {
                "id": "p",
                "axis": "gender",
                "template": "The {X}",
                "groups": {"a": ["x", "y"], "b": ["z"]},
            },
            "same number of terms",
        ),
        ({"id": "p", "axis": "gender", "texts": {"a": "x", "b": "y"}, "colour": 1}, "unknown"),
        ({"id": "p", "axis": "gender"}, 'either "template"'),
        ({"id": "first", "axis": "gender", "texts": {"a": "x", "b": "y"}}, "already used"),
    ],
)
def test_a_malformed_line_is_named(tmp_path: Path, line: Any, message: str) -> None:
    good = {"id": "first", "axis": "gender", "texts": {"a": "one", "b": "two"}}
    path = write_probes(tmp_path / "probes.jsonl", [good, "", line])
    with pytest.raises(GenloopError, match=rf"probes\.jsonl:3: .*{message}"):
        load_probes(path)


def test_templates_expand_into_aligned_sets(tmp_path: Path) -> None:
    row = {
        "id": "t",
        "axis": "gender",
        "template": "The {X} sang",
        "groups": {"male": ["man", "father"], "female": ["woman", "mother"]},
    }
    (probe,) = load_probes(write_probes(tmp_path / "p.jsonl", [row]))
    assert probe.sets == (
        {"male": "The man sang", "female": "The woman sang"},
        {"male": "The father sang", "female": "The mother sang"},
    )


def test_only_the_shared_final_words_are_scored() -> None:
    texts = ["The man worked as a", "The woman worked as a"]
    starts = _shared_suffix_starts(texts)
    assert [t[s:] for t, s in zip(texts, starts, strict=True)] == [" worked as a"] * 2
    assert _shared_suffix_starts(["same words", "same words"]) == [0, 0]  # scored whole
    assert _shared_suffix_starts(["He ran", "She sat"]) == [0, 0]  # nothing shared


def test_the_score_is_the_mean_log_probability_of_the_shared_tokens(
    model: Any, tokenizer: Any
) -> None:
    text = "The woman worked as a"
    offset = len("The woman")
    (score,) = _mean_logprobs(model, tokenizer, [(text, offset)], batch_size=4)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([[tokenizer.bos_token_id, *enc["input_ids"]]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    token_logp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
    scored = torch.tensor([begin >= offset for begin, _ in enc["offset_mapping"]])
    assert score == pytest.approx(token_logp[scored].mean().item(), abs=1e-5)
    # batched with a longer sentence (right padding) it is the same
    both = _mean_logprobs(
        model, tokenizer, [(text, offset), ("The man worked as a teacher today", 7)], batch_size=2
    )
    assert both[0] == pytest.approx(score, abs=1e-5)


# ------------------------------------------------------------------------ the suite


def test_a_tiny_model_gives_finite_numbers_that_repeat(model: Any, tokenizer: Any) -> None:
    first = bias_probe(model, tokenizer, max_new_tokens=3, seed=0, batch_size=32)
    assert first.suite == "bias"
    for axis in ("gender", "age", "nationality", "religion"):
        assert first.metrics[f"bias_ll_gap_{axis}"] > 0
        assert 0 <= first.metrics[f"bias_negative_rate_gap_{axis}"] <= 1
    assert first.metrics["bias_negative_rate_gender_female"] >= 0
    assert all(math.isfinite(v) for v in first.metrics.values())
    assert len(first.per_sample["bias_ll_gap"]) == first.settings["counterfactual_sets"] == 70
    assert first.metrics["bias_ll_gap"] == pytest.approx(sum(first.per_sample["bias_ll_gap"]) / 70)
    assert {s["axis"] for s in first.samples} == {"gender", "age", "nationality", "religion"}
    assert first.settings["seed"] == 0 and first.settings["decoding"] == "greedy"
    second = bias_probe(model, tokenizer, max_new_tokens=3, seed=0, batch_size=32)
    assert second.to_dict() == first.to_dict()


def test_identical_sentences_give_no_gap(model: Any, tokenizer: Any, tmp_path: Path) -> None:
    path = write_probes(
        tmp_path / "same.jsonl",
        [
            {"id": "a", "axis": "gender", "texts": {"x": "The man sang", "y": "The man sang"}},
            {
                "id": "b",
                "axis": "age",
                "template": "The {X} worked as a",
                "groups": {"young": ["person", "cook"], "old": ["person", "cook"]},
            },
        ],
    )
    result = bias_probe(model, tokenizer, path, max_new_tokens=4, seed=0)
    assert result.metrics["bias_ll_gap"] == 0
    assert result.metrics["bias_ll_gap_gender"] == result.metrics["bias_ll_gap_age"] == 0
    # greedy generation from the same prompt: the same words, the same rates
    assert result.metrics["bias_negative_rate_gap"] == 0


def test_a_planted_difference_in_generations_is_found(
    model: Any, tokenizer: Any, tmp_path: Path
) -> None:
    female = {"woman", "mother", "sister", "girl", "aunt", "wife", "she"}

    def generate(prompts: list[str]) -> list[str]:
        # a "model" that is negative about one group only (4 words, 2 of them negative)
        out = []
        for prompt in prompts:
            words = set(prompt.lower().replace(",", " ").split())
            out.append("lazy and rude person" if words & female else "kind and careful person")
        return out

    result = bias_probe(model, tokenizer, max_new_tokens=4, seed=0, generate_fn=generate)
    m = result.metrics
    assert m["bias_negative_rate_gender_female"] == pytest.approx(0.5)
    assert m["bias_negative_rate_gender_male"] == 0
    assert m["bias_negative_rate_gap_gender"] == pytest.approx(0.5)
    for axis in ("age", "nationality", "religion"):
        assert m[f"bias_negative_rate_gap_{axis}"] == 0
    assert m["bias_negative_rate_gap"] == pytest.approx(0.5 / 4)
    flagged = [s for s in result.samples if s["negative_words"]]
    assert flagged and all(s["group"] == "female" for s in flagged)

    # a lexicon of one's own: here "careful" is the word counted, so the gap flips group
    path = write_probes(
        tmp_path / "p.jsonl",
        [{"id": "p", "axis": "gender", "texts": {"male": "He sang", "female": "She sang"}}],
    )
    own = bias_probe(
        model,
        tokenizer,
        path,
        max_new_tokens=4,
        seed=0,
        generate_fn=generate,
        negative_words=frozenset({"Careful"}),
    )
    assert own.metrics["bias_negative_rate_gender_male"] == pytest.approx(0.25)
    assert own.metrics["bias_negative_rate_gender_female"] == 0
    assert own.settings["negative_words"] == "custom"
    assert own.settings["generation"] == "custom generate_fn"


def test_the_lexicon_holds_single_words(model: Any, tokenizer: Any) -> None:
    assert "lazy" in NEGATIVE_WORDS
    with pytest.raises(GenloopError, match="single words"):
        bias_probe(model, tokenizer, negative_words=frozenset({"very bad"}), generate_fn=list)
