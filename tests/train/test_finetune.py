"""Fine-tuning end to end through ``genloop.train.loop.train``: full SFT, LoRA SFT, seq2seq
SFT and DPO, each from a tiny local Hugging Face checkpoint (2 layers, 32 wide)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from genloop.config import GenloopConfig
from genloop.data.pairs import PairsKind, write_pairs_dataset
from genloop.data.tokenizer import load_hf_tokenizer, train_bpe
from genloop.models.causal_lm import forward_logits
from genloop.models.lora import apply_lora
from genloop.models.pretrained import load_pretrained, save_hf_dir
from genloop.train import checkpoint as ckpt
from genloop.train.loop import TrainResult, train
from genloop.workspace import Workspace, registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["red", "green", "blue", "cyan", "black", "white", "amber", "olive", "pink", "gold"]
SFT_ROWS = [{"prompt": f"colour of {w}?", "response": f"{w} is {w}"} for w in WORDS]
DPO_ROWS = [
    {"prompt": f"colour of {w}?", "chosen": f"{w} is {w}", "rejected": f"{w} is {v}"}
    for w, v in zip(WORDS, WORDS[1:] + WORDS[:1], strict=True)
]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [f"{r['prompt']} {r['response']}" for r in SFT_ROWS] * 4
    return train_bpe(texts, tmp_path_factory.mktemp("tok"), vocab_size=320, min_frequency=1)


def _save_base(family: str, tok_dir: Path, out: Path) -> Path:
    from genloop.models.family import get_family

    tokenizer = load_hf_tokenizer(tok_dir)
    size = {"vocab_size": len(tokenizer), "n_layer": 2, "n_embd": 32, "n_head": 2}
    if family == "causal_lm":
        ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": tokenizer.pad_token_id}
        size |= {"context_length": 64, **ids}
    else:
        size |= {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    model = get_family(family).build(size)
    return save_hf_dir(model, out, family=family, tokenizer_dir=tok_dir)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def llama_dir(tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_base("causal_lm", tok_dir, tmp_path_factory.mktemp("llama") / "base")


def finetune(
    ws: Workspace,
    base_model: str,
    objective: PairsKind,
    rows: list[dict[str, Any]],
    tok_dir: Path,
    *,
    family: str = "causal_lm",
    lora: dict[str, Any] | None = None,
    steps: int = 10,
    **train_cfg: Any,
) -> TrainResult:
    """Write the pairs dataset, then train ``steps`` steps on it from ``base_model``."""
    write_pairs_dataset(ws, "pairs", objective, rows, tokenizer_dir=tok_dir, val_fraction=0.2)
    cfg = GenloopConfig.model_validate(
        {
            "name": "tuned",
            "model": {"family": family, "base_model": base_model, "lora": lora},
            "train": {
                "objective": objective,
                "dataset": "pairs",
                "lr": 3e-3,
                "min_lr": 3e-4,
                "warmup_steps": 0,
                "max_steps": steps,
                "batch_size": 4,
                "eval_every": steps,
                "eval_batches": 1,
                "checkpoint_every": steps,
                "device": "cpu",
                **train_cfg,
            },
        }
    )
    return train(ws, cfg)


def falls(history: list[float]) -> bool:
    return sum(history[-3:]) / 3 < sum(history[:3]) / 3


def test_full_sft_from_a_local_checkpoint(
    workspace: Workspace, tok_dir: Path, llama_dir: Path
) -> None:
    result = finetune(workspace, str(llama_dir), "sft", SFT_ROWS, tok_dir)
    assert falls(result.history) and "val_loss" in result.metrics
    info = result.model
    assert info is not None and info.family == "causal_lm"
    assert info.parent is None  # a local directory is not a registered model …
    assert info.config["base_model"] == str(llama_dir)  # … but the config records it
    assert info.config["lora"] is None
    assert info.dataset_version_id is not None
    tuned = load_pretrained(registry.artifact_path(workspace, info.ref))
    base = load_pretrained(llama_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tuned.state_dict()[name], base.state_dict()[name])  # all trained
    assert (registry.artifact_path(workspace, info.ref) / "tokenizer.json").is_file()


def test_lora_sft_trains_only_adapters_and_merges_to_the_same_logits(
    workspace: Workspace, tok_dir: Path, llama_dir: Path
) -> None:
    base_info = registry.register_model(workspace, "base", "causal_lm", llama_dir)
    result = finetune(workspace, "base", "sft", SFT_ROWS, tok_dir, lora=LORA)
    assert falls(result.history)
    info = result.model
    assert info is not None and info.parent == base_info.ref == "base@1"
    assert info.config["base_model"] == "base" and info.config["lora"]["r"] == 4

    # the adapted model at the end of training, as its last checkpoint holds it
    found = ckpt.load_latest(workspace.store, result.run_id)
    assert found is not None and found.step == 10
    trained = load_file(str(found.path / "model.safetensors"))
    adapted = apply_lora(load_pretrained(llama_dir), r=4, alpha=8, dropout=0.0)
    base_weights = load_pretrained(llama_dir).state_dict()
    for key, value in trained.items():
        if "lora_" in key:
            continue
        # base_model.model.<name>, with .base_layer inside the adapted projections
        name = key.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, base_weights[name]), f"{name} changed"
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())  # B starts at 0
    adapted.load_state_dict(trained)

    merged = load_pretrained(registry.artifact_path(workspace, info.ref))
    assert not any("lora_" in n for n in merged.state_dict())
    batch = {
        "input_ids": torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    }
    with torch.no_grad():
        expected = forward_logits(adapted.eval(), batch)
        got = forward_logits(merged, batch)
    assert torch.allclose(got, expected, atol=1e-5)


def test_seq2seq_sft_on_pairs(
    workspace: Workspace, tok_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    t5_dir = _save_base("seq2seq", tok_dir, tmp_path_factory.mktemp("t5") / "base")
    result = finetune(workspace, str(t5_dir), "sft", SFT_ROWS, tok_dir, family="seq2seq")
    assert falls(result.history)
    assert result.model is not None and result.model.family == "seq2seq"
    tuned = load_pretrained(registry.artifact_path(workspace, result.model.ref))
    assert type(tuned).__name__ == "T5ForConditionalGeneration"


def test_dpo_from_a_tiny_base(workspace: Workspace, tok_dir: Path, llama_dir: Path) -> None:
    result = finetune(workspace, str(llama_dir), "dpo", DPO_ROWS, tok_dir, steps=20, dpo_beta=0.5)
    assert math.isclose(result.history[0], math.log(2), rel_tol=1e-4)  # policy == reference
    assert falls(result.history) and result.history[-1] < math.log(2)
    assert result.model is not None and result.model.config["train"]["objective"] == "dpo"
