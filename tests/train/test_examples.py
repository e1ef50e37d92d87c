"""SFT and DPO examples: the loss masks of chat and seq2seq rows, truncation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from genloop.data.tokenizer import DEFAULT_CHAT_TEMPLATE, load_hf_tokenizer, train_bpe
from genloop.train.examples import IGNORE_INDEX, chat_tokens, dpo_example, sft_example

WORDS = ["red", "green", "blue", "cyan", "black", "white", "amber", "olive", "pink", "gold"]
SFT_ROWS = [{"prompt": f"colour of {w}?", "response": f"{w} is {w}"} for w in WORDS]
DPO_ROWS = [
    {"prompt": f"colour of {w}?", "chosen": f"{w} is {w}", "rejected": f"{w} is {v}"}
    for w, v in zip(WORDS, WORDS[1:] + WORDS[:1], strict=True)
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [f"{r['prompt']} {r['response']}" for r in SFT_ROWS] * 4
    return train_bpe(texts, tmp_path_factory.mktemp("tok"), vocab_size=320, min_frequency=1)


@pytest.fixture(scope="module")
def tokenizer(tok_dir: Path) -> Any:
    return load_hf_tokenizer(tok_dir)


# ------------------------------------------------------------------ tokens and masks


def test_sft_masks_the_prompt_exactly(tokenizer: Any) -> None:
    row = SFT_ROWS[2]
    example = sft_example(tokenizer, row, max_len=64)
    assert example is not None
    # the prompt as the user's turn, the assistant's header: never a target
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True
    )["input_ids"]
    response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert example.input_ids[: len(prompt)] == prompt
    assert example.input_ids[len(prompt) :] == [*response, eos, *tokenizer("\n")["input_ids"]]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + [*response, eos, IGNORE_INDEX]
    assert tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX]) == (
        "blue is blue<|endoftext|>"
    )


def test_every_assistant_turn_of_a_conversation_is_trained_on(tokenizer: Any) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "red?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "gold?"},
            {"role": "assistant", "content": "gold"},
        ]
    }
    example = sft_example(tokenizer, row, max_len=64)
    assert example is not None
    trained = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
    assert trained == "red<|endoftext|>gold<|endoftext|>"


def test_a_template_without_generation_marks_trains_on_the_last_turn(tokenizer: Any) -> None:
    plain = DEFAULT_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    messages = [{"role": "user", "content": "red?"}, {"role": "assistant", "content": "red"}]
    marked_ids, marked_mask = chat_tokens(tokenizer, messages)
    tokenizer.chat_template = plain
    try:
        ids, mask = chat_tokens(tokenizer, messages)
    finally:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    assert ids == marked_ids
    # the same tokens, plus the newline the template writes after the turn
    assert mask == [*marked_mask[:-1], 1]


def test_truncation_keeps_the_start_and_drops_examples_without_a_response(
    tokenizer: Any,
) -> None:
    full = sft_example(tokenizer, SFT_ROWS[0], max_len=64)
    assert full is not None
    first_target = next(i for i, t in enumerate(full.labels) if t != IGNORE_INDEX)
    cut = sft_example(tokenizer, SFT_ROWS[0], max_len=first_target + 1)
    assert cut is not None
    assert cut.input_ids == full.input_ids[: first_target + 1]
    assert sft_example(tokenizer, SFT_ROWS[0], max_len=first_target) is None
    assert dpo_example(tokenizer, DPO_ROWS[0], max_len=first_target) is None


def test_seq2seq_examples_put_the_prompt_in_the_encoder(tokenizer: Any) -> None:
    example = sft_example(tokenizer, SFT_ROWS[1], max_len=64, encoder_decoder=True)
    assert example is not None
    eos = tokenizer.eos_token_id
    assert example.input_ids == [*tokenizer("colour of green?")["input_ids"], eos]
    assert example.labels == [*tokenizer("green is green")["input_ids"], eos]
