"""Every runnable example in examples/ is a valid config; the text-to-image one names its
parts where the UNet takes them and gates on compositional accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest

from genloop.config import PART_PREFIX, load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_a_valid_config(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.data is not None or cfg.train.dataset is not None  # each says what it reads


def test_shapes_t2i_trains_its_parts_first_and_gates_on_compositional_accuracy() -> None:
    cfg = load_config(EXAMPLES[0].parent / "shapes-t2i.yaml")
    assert {p: s.model.family for p, s in cfg.parts.items()} == {
        "clip": "clip",
        "ae": "autoencoder_kl",
    }
    d = cfg.model.diffusion
    assert (d.latent_vae, d.text_encoder) == (f"{PART_PREFIX}ae", f"{PART_PREFIX}clip")
    assert cfg.eval.suites == ["t2i"]
    gated = {r.metric for r in cfg.gate.rules}
    assert gated == {"compositional_accuracy_seen", "compositional_accuracy_held_out"}


def test_text_encoder_pretrains_a_masked_lm_with_a_mask_token() -> None:
    cfg = load_config(EXAMPLES[0].parent / "text-encoder.yaml")
    assert (cfg.model.family, cfg.train.objective) == ("masked_lm", "mlm")
    assert "<|mask|>" in cfg.tokenizer.special_tokens and cfg.train.whole_word_mask
