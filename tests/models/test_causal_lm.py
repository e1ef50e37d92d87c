from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from genloop.errors import ConfigError, ConflictError, GenloopError
from genloop.models.causal_lm import FAMILY, forward_logits, lm_loss
from genloop.models.token_loss import token_loss


@torch.no_grad()
def _logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    return forward_logits(model, {"input_ids": tokens})


def test_build_maps_the_config_onto_llama(llama: Any) -> None:
    config = llama.config
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert config._attn_implementation == "sdpa"
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert (config.vocab_size, config.max_position_embeddings) == (128, 64)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight  # tied by default


def test_build_rejects_an_unknown_key() -> None:
    with pytest.raises(ConfigError, match=r"'n_layers'.*valid:.*n_layer"):
        FAMILY.build({"preset": "tiny", "n_layers": 2})


def test_save_load_round_trip_is_exact(llama: Any, tokens: torch.Tensor, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = FAMILY.save(llama, tmp_path / "model", extra={"run_id": "r1"})
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "genloop.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    assert json.loads((out / "genloop.json").read_text()) == {"family": "causal_lm", "run_id": "r1"}
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)

    expected = _logits(llama, tokens)
    loaded = FAMILY.load(out)
    assert not loaded.training
    assert torch.equal(_logits(loaded, tokens), expected)
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert torch.equal(_logits(plain, tokens), expected)


def test_load_casts_to_the_requested_dtype(llama: Any, tmp_path: Path) -> None:
    out = FAMILY.save(llama, tmp_path / "model")
    assert FAMILY.load(out, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(GenloopError, match="unknown dtype 'float8'"):
        FAMILY.load(out, dtype="float8")


def test_save_copies_the_tokenizer_files(llama: Any, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "world": 5}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "model.safetensors").write_bytes(b"not a tokenizer file")

    out = FAMILY.save(llama, tmp_path / "model", tokenizer_dir=tmp_path / "tok")
    assert (out / "tokenizer.json").is_file()
    assert (out / "model.safetensors").read_bytes() != b"not a tokenizer file"
    reloaded = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert reloaded("hello world")["input_ids"] == [4, 5]


def test_save_refuses_a_non_empty_directory(llama: Any, tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "stale.bin").write_bytes(b"x")
    with pytest.raises(ConflictError, match="not an empty directory"):
        FAMILY.save(llama, tmp_path / "model")


def test_save_refuses_a_missing_tokenizer_dir(llama: Any, tmp_path: Path) -> None:
    with pytest.raises(GenloopError, match="tokenizer directory"):
        FAMILY.save(llama, tmp_path / "model", tokenizer_dir=tmp_path / "nope")
    assert not (tmp_path / "model").exists()  # checked before anything is written


def test_loss_falls_on_a_repeated_batch(llama: Any, tokens: torch.Tensor) -> None:
    optimizer = torch.optim.AdamW(llama.parameters(), lr=3e-3, foreach=True)
    llama.train()
    losses = []
    for _ in range(30):
        loss = FAMILY.loss(llama, {"input_ids": tokens})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 4.0  # about ln(128) ≈ 4.85 at initialisation
    assert losses[-1] < 0.5 * losses[0]


def test_loss_is_next_token_cross_entropy(llama: Any, tokens: torch.Tensor) -> None:
    logits = _logits(llama, tokens)
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 128), tokens[:, 1:].reshape(-1))
    with torch.no_grad():
        assert torch.allclose(FAMILY.loss(llama, {"input_ids": tokens}), manual, atol=1e-6)
        same = FAMILY.loss(llama, {"input_ids": tokens, "labels": tokens.clone()})
    assert torch.allclose(same, manual, atol=1e-6)


def test_labels_mask_the_prompt(llama: Any, tokens: torch.Tensor) -> None:
    prompt_len = 6
    labels = tokens.clone()
    labels[:, :prompt_len] = -100
    logits = _logits(llama, tokens)
    # Position t predicts token t+1: the response tokens are t+1 ≥ prompt_len.
    log_probs = logits.log_softmax(-1)
    picked = [
        -log_probs[b, t, tokens[b, t + 1]]
        for b in range(tokens.size(0))
        for t in range(prompt_len - 1, tokens.size(1) - 1)
    ]
    manual = torch.stack(picked).mean()
    with torch.no_grad():
        loss = FAMILY.loss(llama, {"input_ids": tokens, "labels": labels})
    assert torch.allclose(loss, manual, atol=1e-5)


def test_attention_mask_excludes_padding(llama: Any, tokens: torch.Tensor) -> None:
    mask = torch.ones_like(tokens)
    mask[1, 10:] = 0
    logits = forward_logits(llama.eval(), {"input_ids": tokens, "attention_mask": mask})
    targets = tokens[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, 128), targets.reshape(-1))
    with torch.no_grad():
        loss = FAMILY.loss(llama, {"input_ids": tokens, "attention_mask": mask})
    assert torch.allclose(loss, manual, atol=1e-6)


def test_z_loss_adds_the_squared_log_normaliser(llama: Any, tokens: torch.Tensor) -> None:
    batch = {"input_ids": tokens}
    logits = _logits(llama, tokens)[:, :-1]
    log_z = torch.logsumexp(logits, dim=-1)  # (B, T-1)
    with torch.no_grad():
        plain = FAMILY.loss(llama, batch)
        with_z = FAMILY.loss(llama, batch, z_loss_coef=1e-2)
    assert with_z > plain
    assert torch.allclose(with_z - plain, 1e-2 * log_z.square().mean(), atol=1e-6)


def test_label_smoothing_mixes_in_the_uniform_distribution(
    llama: Any, tokens: torch.Tensor
) -> None:
    eps = 0.1
    log_probs = _logits(llama, tokens)[:, :-1].log_softmax(-1)  # (B, T-1, V)
    nll = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    uniform = -log_probs.mean(-1)  # cross-entropy against the uniform distribution
    manual = ((1 - eps) * nll + eps * uniform).mean()
    with torch.no_grad():
        loss = FAMILY.loss(llama, {"input_ids": tokens}, label_smoothing=eps)
    assert torch.allclose(loss, manual, atol=1e-5)


def test_sum_reduction_and_an_all_masked_batch(llama: Any, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        mean = lm_loss(llama, {"input_ids": tokens})
        total = lm_loss(llama, {"input_ids": tokens}, reduction="sum")
        empty = lm_loss(llama, {"input_ids": tokens, "labels": torch.full_like(tokens, -100)})
    assert torch.allclose(total, mean * tokens[:, 1:].numel(), rtol=1e-5)
    assert empty.item() == 0.0


def test_bad_batches_are_named(llama: Any, tokens: torch.Tensor) -> None:
    with pytest.raises(GenloopError, match="needs input_ids"):
        FAMILY.loss(llama, {"labels": tokens})
    with pytest.raises(GenloopError, match="unexpected batch keys doc_ids"):
        FAMILY.loss(llama, {"input_ids": tokens, "doc_ids": tokens})
    with pytest.raises(GenloopError, match="shape of input_ids"):
        FAMILY.loss(llama, {"input_ids": tokens, "labels": tokens[:, 1:]})
    with pytest.raises(GenloopError, match="label_smoothing"):
        token_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), label_smoothing=1.0)
