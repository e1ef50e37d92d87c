from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from genloop.errors import GenloopError
from genloop.models import Family, family_names, get_family
from genloop.models.seq2seq import FAMILY as SEQ2SEQ


class _WritesMarker:
    """Unpickling this calls open(path, "w"): a stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _checkpoint_with_pickle(model: Any, directory: Path, payload: object) -> Path:
    directory.mkdir()
    model.config.save_pretrained(directory)
    with (directory / "pytorch_model.bin").open("wb") as f:
        pickle.dump(payload, f, protocol=2)
    return directory


@pytest.mark.parametrize("name", ["causal_lm", "seq2seq", "vae", "gan", "diffusion"])
def test_families_satisfy_the_protocol(name: str) -> None:
    family = get_family(name)
    assert isinstance(family, Family)
    assert family.name == name
    assert name in family_names()


def test_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(
        GenloopError, match=r"unknown model family 'rnn' \(known: causal_lm, seq2seq, vae"
    ):
        get_family("rnn")


def test_num_parameters_counts_tied_weights_once(llama: Any) -> None:
    family = get_family("causal_lm")
    total = family.num_parameters(llama)
    assert total == sum(p.numel() for p in set(llama.parameters()))
    for p in llama.model.layers.parameters():
        p.requires_grad_(False)
    assert family.num_parameters(llama, trainable_only=True) < total


def test_pickle_weights_are_refused(llama: Any, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    path.mkdir()
    llama.config.save_pretrained(path)
    torch.save(llama.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(GenloopError, match=r"pickle-based weights.*trust_pickle=True"):
        get_family("causal_lm").load(path)


def test_trusted_pickle_weights_load_with_weights_only(
    llama: Any, tokens: torch.Tensor, tmp_path: Path
) -> None:
    path = tmp_path / "ckpt"
    path.mkdir()
    llama.config.save_pretrained(path)
    torch.save(llama.state_dict(), path / "pytorch_model.bin")
    loaded = get_family("causal_lm").load(path, trust_pickle=True)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, llama.eval()(tokens).logits)


@pytest.mark.parametrize("trust_pickle", [False, True])
def test_a_malicious_pickle_never_runs(llama: Any, tmp_path: Path, trust_pickle: bool) -> None:
    marker = tmp_path / "pwned"
    path = _checkpoint_with_pickle(llama, tmp_path / "ckpt", _WritesMarker(marker))
    with pytest.raises(GenloopError) as info:
        get_family("causal_lm").load(path, trust_pickle=trust_pickle)
    assert not marker.exists()
    assert ("weights_only" if trust_pickle else "refused unless trust_pickle") in str(info.value)


def test_safetensors_beside_a_pickle_are_used_and_the_pickle_never_opened(
    llama: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    out = get_family("causal_lm").save(llama, tmp_path / "model")
    with (out / "pytorch_model.bin").open("wb") as f:
        pickle.dump(_WritesMarker(marker), f, protocol=2)
    get_family("causal_lm").load(out)
    assert not marker.exists()


def test_loading_with_the_wrong_family_says_which(llama: Any, tmp_path: Path) -> None:
    out = get_family("causal_lm").save(llama, tmp_path / "model")
    with pytest.raises(GenloopError, match="llama model, which is family causal_lm, not seq2seq"):
        SEQ2SEQ.load(out)


def test_seq2seq_save_load_round_trip_is_exact(t5: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    batch = {
        "input_ids": torch.randint(2, 128, (2, 10)),
        "labels": torch.randint(2, 128, (2, 6)),
    }
    from genloop.models.seq2seq import forward_logits

    with torch.no_grad():
        expected = forward_logits(t5.eval(), batch)
        out = SEQ2SEQ.save(t5, tmp_path / "model")
        assert torch.equal(forward_logits(SEQ2SEQ.load(out), batch), expected)
        plain = AutoModelForSeq2SeqLM.from_pretrained(out, local_files_only=True)
        assert torch.equal(forward_logits(plain.eval(), batch), expected)


def test_seq2seq_loss_matches_transformers_and_masks_padding(t5: Any) -> None:
    labels = torch.randint(2, 128, (2, 6))
    labels[1, 4:] = -100
    batch = {"input_ids": torch.randint(2, 128, (2, 10)), "labels": labels}
    t5.eval()
    with torch.no_grad():
        ours = SEQ2SEQ.loss(t5, batch)
        theirs = t5(input_ids=batch["input_ids"], labels=labels).loss
        logits = t5(input_ids=batch["input_ids"], labels=labels).logits
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(ours, F.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1)))


def test_seq2seq_loss_falls(t5: Any) -> None:
    batch = {"input_ids": torch.randint(2, 128, (4, 8)), "labels": torch.randint(2, 128, (4, 5))}
    optimizer = torch.optim.AdamW(t5.parameters(), lr=5e-3, foreach=True)
    t5.train()
    losses = []
    for _ in range(10):
        loss = SEQ2SEQ.loss(t5, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_seq2seq_batches_need_labels(t5: Any) -> None:
    with pytest.raises(GenloopError, match="needs labels"):
        SEQ2SEQ.loss(t5, {"input_ids": torch.ones(1, 3, dtype=torch.long)})
