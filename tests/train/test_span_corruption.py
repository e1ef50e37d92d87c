"""T5 span corruption: inputs and targets rebuild the original, the noise statistics hold,
a tiny T5 learns through the real training loop, and a tokenizer without sentinels is a
clear error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from genloop.config import GenloopConfig, TokenizerConfig
from genloop.data.pack import ShardWriter
from genloop.data.tokenizer import (
    encode_documents,
    eos_token_id,
    load_tokenizer,
    sentinel_ids,
    train_bpe,
)
from genloop.errors import ConfigError
from genloop.models.pretrained import load_pretrained
from genloop.train.loop import train
from genloop.train.span_corruption import (
    SpanCorruption,
    corrupt,
    lengths,
    noise_mask,
    restore,
    span_counts,
)
from genloop.workspace import Workspace, init_workspace, registry

from ..conftest import PROSE, write_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SENTINELS = list(range(1, 1001))  # ids 1..1000 stand for <extra_id_N> in the id-level tests
EOS = 0
TOKENS = (1001, 5000)  # the range of the other ids


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    return train_bpe([PROSE] * 4, out, vocab_size=400, min_frequency=1, sentinel_tokens=100)


def test_bpe_sentinels_are_special_tokens(tok_dir: Path) -> None:
    from genloop.data.tokenizer import load_hf_tokenizer

    sentinels = sentinel_ids(load_tokenizer(tok_dir))
    assert len(sentinels) == 100 and len(set(sentinels)) == 100
    hf = load_hf_tokenizer(tok_dir)
    assert hf.convert_tokens_to_ids("<extra_id_99>") == sentinels[99]
    assert hf.decode([sentinels[0], *hf.encode("a river")], skip_special_tokens=True) == "a river"
    # a document that spells a sentinel's name holds text, never the sentinel itself
    ids = encode_documents(tok_dir, ["see <extra_id_0> here"])[0]
    assert not set(ids.tolist()) & set(sentinels)


# ------------------------------------------------------------------------ the transform


def test_lengths_are_t5s() -> None:
    # t5.data.preprocessors.random_spans_helper / compute_input_and_target_lengths
    assert lengths(512, 0.15, 3.0) == (568, 512, 114)
    assert lengths(32, 0.15, 3.0) == (34, 32, 8)
    for seq_len in range(3, 300):
        raw, inputs, _ = lengths(seq_len, 0.15, 3.0)
        assert inputs <= seq_len < lengths(seq_len + 1, 0.15, 3.0)[1] + 1
        noise, spans = span_counts(raw, 0.15, 3.0)
        assert inputs == raw - noise + spans + 1


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(2, 600),
    seed=st.integers(0, 2**32 - 1),
    density=st.sampled_from([0.15, 0.3, 0.5]),
    mean=st.sampled_from([1.0, 3.0, 8.0]),
)
def test_inputs_and_targets_rebuild_the_tokens(
    length: int, seed: int, density: float, mean: float
) -> None:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(*TOKENS, size=length)  # no sentinel or eos ids in the data
    mask = noise_mask(length, density, mean, rng)
    inputs, targets = corrupt(tokens, mask, SENTINELS, EOS)
    assert np.array_equal(restore(inputs, targets, SENTINELS, EOS), tokens)
    noise, spans = span_counts(length, density, mean)
    assert int(mask.sum()) == noise and not mask[0] and mask[-1]  # kept first, noise last
    assert len(inputs) == length - noise + spans + 1 and len(targets) == noise + spans + 1
    # each sentinel once, in order, in both; the target opens with the first one
    assert inputs[np.isin(inputs, SENTINELS)].tolist() == SENTINELS[:spans]
    assert targets[np.isin(targets, SENTINELS)].tolist() == SENTINELS[:spans]
    assert targets[0] == SENTINELS[0] and inputs[-1] == targets[-1] == EOS


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=300), seed=st.integers(0, 2**32 - 1))
def test_corrupted_text_rebuilds_the_original_text(tok_dir: Path, text: str, seed: int) -> None:
    tokenizer = load_tokenizer(tok_dir)
    sentinels, eos = sentinel_ids(tokenizer), eos_token_id(tok_dir, tokenizer)
    ids = encode_documents(tok_dir, [text])[0].astype(np.int64)  # the text's ids + eos
    mask = noise_mask(len(ids), 0.15, 3.0, np.random.default_rng(seed))
    inputs, targets = corrupt(ids, mask, sentinels, eos)
    rebuilt = restore(inputs, targets, sentinels, eos)
    assert np.array_equal(rebuilt, ids)
    assert tokenizer.decode(rebuilt[:-1].tolist(), skip_special_tokens=False) == text
    # the encoder reads the sentinels' names where spans were
    shown = tokenizer.decode(inputs.tolist(), skip_special_tokens=False)
    assert "<extra_id_0>" in shown


def test_noise_density_and_mean_span_length_hold() -> None:
    rng = np.random.default_rng(0)
    for density, mean in ((0.15, 3.0), (0.3, 5.0)):
        masks = [noise_mask(int(n), density, mean, rng) for n in rng.integers(200, 600, 400)]
        spans = np.concatenate(
            [np.diff(np.flatnonzero(np.diff(np.r_[0, m, 0])))[::2] for m in masks]
        )
        tokens = sum(len(m) for m in masks)
        assert abs(spans.sum() / tokens - density) < 0.002  # the share of noise tokens
        assert abs(spans.mean() - mean) < 0.05  # the mean span length
        assert spans.min() == 1 and spans.max() > 3 * mean  # lengths vary, as in T5
        # noise spreads over the window: each tenth of it is noise about `density` of the
        # time, but for the ends (T5's masks start with kept tokens and end in noise)
        tenths = np.array(
            [
                [m[len(m) * k // 10 : len(m) * (k + 1) // 10].mean() for k in range(10)]
                for m in masks
            ]
        ).mean(axis=0)
        assert np.all(np.abs(tenths[1:-1] - density) < 0.02)
        assert tenths[0] < density < tenths[-1]
    first = noise_mask(100, 0.15, 3.0, np.random.default_rng(7))
    assert np.array_equal(first, noise_mask(100, 0.15, 3.0, np.random.default_rng(7)))
    assert not np.array_equal(first, noise_mask(100, 0.15, 3.0, np.random.default_rng(8)))


# ------------------------------------------------------------------------ the objective


def token_shards(root: Path, docs: int = 30) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        writer = ShardWriter(root, split, vocab_size=5000)
        for _ in range(docs):
            writer.add(np.r_[rng.integers(*TOKENS, int(rng.integers(5, 40))), EOS])
        writer.close()
    return root


def test_batches_have_fixed_shapes_and_resume_exactly(tmp_path: Path) -> None:
    objective = SpanCorruption(
        token_shards(tmp_path), 32, 4, 0, torch.device("cpu"), SENTINELS, EOS
    )
    assert (objective.raw_length, objective.target_length) == (34, 8)
    stream = objective.train_batches(0)
    first = [next(stream) for _ in range(5)]
    assert all(b["input_ids"].shape == (4, 32) and b["labels"].shape == (4, 8) for b in first)
    resumed = next(objective.train_batches(3))
    assert all(torch.equal(resumed[k], first[3][k]) for k in ("input_ids", "labels"))
    assert not torch.equal(first[0]["labels"], first[1]["labels"])
    # two ranks split each step's windows between them
    rank1 = next(objective.train_batches(0, rank=1, world_size=2))
    both = next(objective.train_batches(0, world_size=2))
    assert not torch.equal(rank1["input_ids"], both["input_ids"])
    val = objective.val_batches(2)
    again = objective.val_batches(2)
    assert len(val) == 2 and all(
        torch.equal(a["labels"], b["labels"]) for a, b in zip(val, again, strict=True)
    )


def test_without_sentinels_the_error_names_the_fix(tmp_path: Path) -> None:
    shards = token_shards(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"needs 2 sentinel tokens .* \(it has none\): set tokenizer.sentinel_tokens",
    ):
        SpanCorruption(shards, 32, 4, 0, torch.device("cpu"), [], EOS)
    with pytest.raises(ConfigError, match=r"at seq_len 64 needs 3 sentinel tokens .* \(it has 2\)"):
        SpanCorruption(shards, 64, 4, 0, torch.device("cpu"), [1, 2], EOS)


def test_config_checks() -> None:
    with pytest.raises(ValidationError, match=r"does not fit model\.family 'causal_lm'"):
        GenloopConfig.model_validate(
            {
                "name": "x",
                "model": {"family": "causal_lm"},
                "train": {"objective": "span_corruption"},
            }
        )
    with pytest.raises(ValidationError, match="sentinel_tokens is only used with kind 'bpe'"):
        TokenizerConfig(kind="pretrained", path=Path("t5"), sentinel_tokens=100)


# ---------------------------------------------------------------- through the real loop


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A workspace with the fixture corpus prepared twice: with sentinels and without."""
    from genloop.config import DataConfig
    from genloop.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("t5")
    workspace = init_workspace(root / "ws")
    corpus = str(write_corpus(root / "corpus"))
    for name, sentinels in (("spans", 100), ("plain", 0)):
        data = DataConfig.model_validate(
            {
                "name": name,
                "sources": [{"type": "files", "paths": [corpus]}],
                "split": {"val": 0.1, "test": 0.0},
                "workers": 1,
            }
        )
        tok = TokenizerConfig(vocab_size=420, seq_len=32, sentinel_tokens=sentinels)
        prepare_dataset(workspace, data, tok)
    yield workspace
    workspace.close()


def t5_config(dataset: str, sentinels: int) -> GenloopConfig:
    return GenloopConfig.model_validate(
        {
            "name": f"t5-{dataset}",
            "tokenizer": {"vocab_size": 420, "seq_len": 32, "sentinel_tokens": sentinels},
            "model": {"family": "seq2seq", "n_layer": 2, "n_embd": 32, "n_head": 2},
            "train": {
                "objective": "span_corruption",
                "dataset": dataset,
                "lr": 3e-3,
                "min_lr": 3e-4,
                "warmup_steps": 3,
                "max_steps": 40,
                "batch_size": 8,
                "eval_every": 20,
                "eval_batches": 2,
                "checkpoint_every": 40,
                "device": "cpu",
            },
        }
    )


def test_a_tiny_t5_learns_span_corruption(ws: Workspace) -> None:
    result = train(ws, t5_config("spans", 100))
    history = result.history
    assert len(history) == 40
    assert sum(history[-5:]) / 5 < 0.7 * sum(history[:5]) / 5  # the loss falls (6.2 → 3.8)
    assert "val_loss" in result.metrics
    info = result.model
    assert info is not None and info.family == "seq2seq"

    # the registered model answers a corrupted sentence with the first sentinel, as T5 does
    path = registry.artifact_path(ws, info.ref)
    tokenizer = load_tokenizer(path)
    sentinels, eos = sentinel_ids(tokenizer), eos_token_id(path, tokenizer)
    ids = encode_documents(path, [PROSE[:200]])[0].astype(np.int64)
    inputs, _ = corrupt(
        ids, noise_mask(len(ids), 0.15, 3.0, np.random.default_rng(0)), sentinels, eos
    )
    model = load_pretrained(path).eval()
    with torch.no_grad():
        out = model.generate(torch.from_numpy(inputs)[None], max_new_tokens=2, do_sample=False)
    assert int(out[0, 1]) == sentinels[0]  # out[0, 0] is the decoder start (pad)


def test_a_dataset_without_sentinels_is_refused(ws: Workspace) -> None:
    with pytest.raises(ConfigError, match=r"set tokenizer\.sentinel_tokens"):
        train(ws, t5_config("plain", 0))
