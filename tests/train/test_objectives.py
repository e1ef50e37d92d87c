"""SFT and DPO: the data order, the losses, and the objectives the text builder makes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from genloop.config import TrainConfig
from genloop.data.pairs import PairsKind, write_pairs_dataset
from genloop.data.tokenizer import load_hf_tokenizer, train_bpe
from genloop.errors import GenloopError
from genloop.train.examples import IGNORE_INDEX, collate
from genloop.train.families import TrainingData
from genloop.train.objectives import DirectPreference, SupervisedFineTuning, sequence_logps
from genloop.train.text import make_objective
from genloop.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["red", "green", "blue", "cyan", "black", "white", "amber", "olive", "pink", "gold"]
SFT_ROWS = [{"prompt": f"colour of {w}?", "response": f"{w} is {w}"} for w in WORDS]
DPO_ROWS = [
    {"prompt": f"colour of {w}?", "chosen": f"{w} is {w}", "rejected": f"{w} is {v}"}
    for w, v in zip(WORDS, WORDS[1:] + WORDS[:1], strict=True)
]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [f"{r['prompt']} {r['response']}" for r in SFT_ROWS] * 4
    return train_bpe(texts, tmp_path_factory.mktemp("tok"), vocab_size=320, min_frequency=1)


@pytest.fixture(scope="module")
def tokenizer(tok_dir: Path) -> Any:
    return load_hf_tokenizer(tok_dir)


def tiny_llama(tokenizer: Any, seed: int = 0) -> Any:
    from genloop.models.causal_lm import FAMILY

    torch.manual_seed(seed)
    config = {"vocab_size": len(tokenizer), "n_layer": 2, "n_embd": 32, "n_head": 2}
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": tokenizer.pad_token_id}
    return FAMILY.build({**config, "context_length": 64, **ids})


def config(objective: str, **train: Any) -> TrainConfig:
    return TrainConfig.model_validate({"objective": objective, "batch_size": 4, "seed": 3, **train})


def data_dir(ws: Workspace, kind: PairsKind, rows: list[dict[str, Any]], tok_dir: Path) -> Path:
    info = write_pairs_dataset(ws, kind, kind, rows, tokenizer_dir=tok_dir, val_fraction=0.25)
    return ws.store.open_verified(info.artifact)


def pairs(data: Path, tok_dir: Path) -> TrainingData:
    return TrainingData(ref="pairs@1", dir=data, tokenizer_dir=tok_dir, seq_len=256)


# ---------------------------------------------------------------------------- SFT


def test_sft_batches_pad_right_and_resume_from_any_micro_step(
    workspace: Workspace, tok_dir: Path, tokenizer: Any
) -> None:
    cfg = config("sft")
    objective = make_objective(
        cfg,
        pairs(data_dir(workspace, "sft", SFT_ROWS, tok_dir), tok_dir),
        tiny_llama(tokenizer),
        CPU,
    )
    assert isinstance(objective, SupervisedFineTuning)
    stream = objective.train_batches(0)
    first = [next(stream) for _ in range(5)]
    for batch in first:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 4
        lengths = mask.sum(dim=1)
        assert lengths.max() == ids.shape[1]  # padded to the longest in the batch
        for row, n in enumerate(lengths.tolist()):
            assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
            assert (ids[row, n:] == tokenizer.pad_token_id).all()
            assert (labels[row, n:] == IGNORE_INDEX).all()
    resumed = objective.train_batches(3)
    for expected in first[3:]:
        got = next(resumed)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    # two ranks share out each step's examples
    rank0 = next(objective.train_batches(1, rank=0, world_size=2))["input_ids"]
    rank1 = next(objective.train_batches(1, rank=1, world_size=2))["input_ids"]
    assert {tuple(r.tolist()) for r in rank0}.isdisjoint({tuple(r.tolist()) for r in rank1})
    val, again = objective.val_batches(5), objective.val_batches(5)
    assert 0 < sum(len(b["input_ids"]) for b in val) < len(SFT_ROWS)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(val, again, strict=True) for k in a)


def test_sft_loss_is_the_cross_entropy_of_the_response_tokens(
    workspace: Workspace, tok_dir: Path, tokenizer: Any
) -> None:
    model = tiny_llama(tokenizer)
    data = data_dir(workspace, "sft", SFT_ROWS, tok_dir)
    objective = make_objective(config("sft"), pairs(data, tok_dir), model, CPU)
    batch = next(objective.train_batches(0))
    with torch.no_grad():
        loss, n_tokens = objective.loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = 0.0, 0
    for row in range(len(batch["input_ids"])):
        for t in range(batch["input_ids"].shape[1] - 1):
            target = int(batch["labels"][row, t + 1])
            if target != IGNORE_INDEX:
                total -= float(torch.log_softmax(logits[row, t], dim=-1)[target])
                count += 1
    assert n_tokens == count
    assert math.isclose(float(loss), total / count, rel_tol=1e-5)


# ---------------------------------------------------------------------------- DPO


def dpo_steps(objective: DirectPreference, model: Any, steps: int) -> tuple[list[float], Any]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batches = objective.train_batches(0)
    losses = []
    model.train()
    for _ in range(steps):
        loss, _ = objective.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, optimizer


def test_dpo_starts_at_log_2_and_learns_the_preferences(
    workspace: Workspace, tok_dir: Path, tokenizer: Any
) -> None:
    model = tiny_llama(tokenizer)
    data = data_dir(workspace, "dpo", DPO_ROWS, tok_dir)
    objective = make_objective(config("dpo", dpo_beta=0.5), pairs(data, tok_dir), model, CPU)
    assert isinstance(objective, DirectPreference)
    batch = collate(
        [c for c, _ in objective.train] + [r for _, r in objective.train], objective.pad_id, CPU
    )
    # the n chosen rows, then the n rejected ones; labels on the responses only
    assert batch["input_ids"].shape[0] == 2 * len(objective.train)
    loss, n_tokens = objective.loss(model, batch)
    assert math.isclose(float(loss.detach()), math.log(2), rel_tol=1e-5)  # policy == reference
    assert n_tokens == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def margin() -> float:  # log π(chosen) - log π(rejected), summed over the pairs
        with torch.no_grad():
            chosen, rejected = sequence_logps(model.eval(), batch).chunk(2)
        return float((chosen - rejected).sum())

    before = margin()
    losses, _ = dpo_steps(objective, model, 20)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.05
    assert margin() > before + 1.0
    ref_chosen, ref_rejected = objective.reference(batch).chunk(2)  # where it started
    assert math.isclose(float((ref_chosen - ref_rejected).sum()), before, rel_tol=1e-4)


def test_dpo_with_lora_uses_the_base_as_reference(
    workspace: Workspace, tok_dir: Path, tokenizer: Any
) -> None:
    from genloop.models.lora import apply_lora

    model = apply_lora(tiny_llama(tokenizer), r=4, alpha=8, dropout=0.0)
    data = data_dir(workspace, "dpo", DPO_ROWS, tok_dir)
    objective = make_objective(config("dpo", dpo_beta=0.5), pairs(data, tok_dir), model, CPU)
    assert isinstance(objective, DirectPreference)
    batch = next(objective.train_batches(0))
    with torch.no_grad():
        reference = objective.reference(batch)
    losses, _ = dpo_steps(objective, model, 8)
    assert losses[-1] < losses[0]
    assert model.training  # the reference pass put it back in training mode
    with torch.no_grad():
        assert torch.allclose(objective.reference(batch), reference)
        assert not torch.allclose(sequence_logps(model, batch), reference)


# --------------------------------------------------------------------------- errors


def test_make_objective_needs_a_pairs_dataset_of_its_kind(
    workspace: Workspace, tok_dir: Path, tokenizer: Any
) -> None:
    model = tiny_llama(tokenizer)
    sft_data = data_dir(workspace, "sft", SFT_ROWS, tok_dir)
    with pytest.raises(GenloopError, match="objective is dpo, but the dataset holds sft rows"):
        make_objective(config("dpo"), pairs(sft_data, tok_dir), model, CPU)
    with pytest.raises(GenloopError, match="holds no rows"):
        make_objective(config("sft"), pairs(tok_dir, tok_dir), model, CPU)
    with pytest.raises(GenloopError, match="z_loss does not apply"):
        dpo_data = data_dir(workspace, "dpo", DPO_ROWS, tok_dir)
        make_objective(config("dpo", z_loss=1e-4), pairs(dpo_data, tok_dir), model, CPU)
    with pytest.raises(GenloopError, match=r"train\.objective vae needs model\.family vae"):
        make_objective(config("vae"), pairs(sft_data, tok_dir), model, CPU)
    small = tiny_llama(tokenizer)
    small.config.vocab_size = 100
    with pytest.raises(GenloopError, match="the model only 100"):
        make_objective(config("sft"), pairs(sft_data, tok_dir), small, CPU)
