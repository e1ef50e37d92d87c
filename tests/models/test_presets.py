from __future__ import annotations

import pytest

from genloop.errors import ConfigError
from genloop.models.causal_lm import FAMILY
from genloop.models.presets import (
    NOMINAL_SIZES,
    PRESETS,
    causal_lm_spec,
    estimate_params,
    flops_per_token,
    mlp_size,
    spec_from_hf_config,
)
from genloop.models.seq2seq import FAMILY as SEQ2SEQ
from genloop.models.seq2seq import seq2seq_spec


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_have_their_nominal_size_at_vocab_8192(preset: str) -> None:
    assert estimate_params(preset, 8192) == pytest.approx(NOMINAL_SIZES[preset], rel=0.25)


def test_the_tiny_preset_has_the_estimated_size() -> None:
    assert FAMILY.num_parameters(FAMILY.build({"preset": "tiny"})) == estimate_params("tiny")


@pytest.mark.parametrize(
    "overrides",
    [
        {"n_kv_head": 1},
        {"tie_embeddings": False, "intermediate_size": 100},
        {"n_embd": 96, "n_head": 3, "activation": "gelu"},
    ],
)
def test_estimate_matches_the_built_model(overrides: dict[str, object]) -> None:
    config = {"vocab_size": 100, "n_layer": 2, "n_embd": 64, "n_head": 4, **overrides}
    model = FAMILY.build(config)
    assert FAMILY.num_parameters(model) == estimate_params("tiny", **{**config, "vocab_size": 100})


def test_seq2seq_estimate_matches_the_built_model() -> None:
    overrides = {"n_layer": 2, "n_decoder_layer": 1, "n_embd": 64, "n_head": 4}
    model = SEQ2SEQ.build({"vocab_size": 100, **overrides})
    assert (
        SEQ2SEQ.num_parameters(model) == seq2seq_spec(vocab_size=100, **overrides).num_parameters()
    )


def test_overrides_map_onto_llama_config() -> None:
    spec = causal_lm_spec(
        "small",
        vocab_size=1000,
        n_layer=3,
        n_kv_head=2,
        activation="gelu",
        context_length=256,
        dropout=0.1,
        tie_embeddings=False,
        rope_theta=500000.0,
        norm_eps=1e-6,
        eos_token_id=2,
    )
    config = spec.to_llama_config()
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (3, 512, 8)
    assert (config.num_key_value_heads, config.head_dim, config.intermediate_size) == (2, 64, 1408)
    assert (config.hidden_act, config.max_position_embeddings) == ("gelu", 256)
    assert (config.attention_dropout, config.tie_word_embeddings) == (0.1, False)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert (config.rms_norm_eps, config.eos_token_id, config.vocab_size) == (1e-6, 2, 1000)


def test_derived_sizes_follow_the_width_unless_given() -> None:
    spec = causal_lm_spec("tiny", n_embd=512, n_head=8)
    assert (spec.intermediate_size, spec.n_kv_head) == (mlp_size(512), 8) == (1408, 8)
    assert causal_lm_spec("tiny", n_embd=512, intermediate_size=1000).intermediate_size == 1000
    # None means "not given", so a config with every field present still works
    assert causal_lm_spec("tiny", n_layer=None, n_kv_head=None) == causal_lm_spec("tiny")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_layers": 2}, r"unknown causal_lm setting 'n_layers' \(valid: .*n_layer, n_embd"),
        ({"n_embd": 100, "n_head": 3}, r"n_embd \(100\) must be divisible by n_head \(3\)"),
        ({"n_head": 4, "n_kv_head": 3}, r"n_head \(4\) must be divisible by n_kv_head \(3\)"),
        ({"activation": "swish"}, r"unknown activation 'swish' \(activations: silu"),
        ({"n_layer": "4"}, r"n_layer must be a positive integer \(got '4'\)"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        ({"tie_embeddings": 1}, r"tie_embeddings must be true or false"),
    ],
)
def test_bad_overrides_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        causal_lm_spec("tiny", **kwargs)


def test_unknown_presets_are_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'huge' \(presets: tiny, small, base\)"):
        causal_lm_spec("huge")
    with pytest.raises(ConfigError, match=r"unknown seq2seq setting 'n_kv_head'"):
        seq2seq_spec("tiny", n_kv_head=2)


def test_flops_per_token_is_6n_plus_attention() -> None:
    spec = causal_lm_spec("base")
    n = spec.num_parameters(non_embedding=True) + spec.vocab_size * spec.n_embd  # + output head
    attention = 12 * 16 * 12 * 64 * 1024  # 12·L·H·Q·T
    assert flops_per_token(spec, seq_len=1024) == 6 * n + attention
    assert flops_per_token(spec) == 6 * n + 12 * 16 * 12 * 64 * 2048  # T = context length


def test_flops_of_a_built_model_match_its_spec() -> None:
    spec = causal_lm_spec("tiny", vocab_size=300, n_layer=2, n_kv_head=2, tie_embeddings=False)
    model = FAMILY.build({"vocab_size": 300, "n_layer": 2, "n_kv_head": 2, "tie_embeddings": False})
    from_model = spec_from_hf_config(model.config)
    assert from_model.num_parameters() == spec.num_parameters() == FAMILY.num_parameters(model)
    assert flops_per_token(from_model, 128) == flops_per_token(spec, 128)
