"""QLoRA end to end on the CPU: ``genloop train`` with ``model.lora.load_in_4bit`` trains
LoRA adapters on an NF4 base (bitsandbytes' CPU kernels), exports the adapters merged
into the dequantized base, and ``genloop generate`` runs the result.

The base is a tiny Llama (2 layers, 64 wide: whole 64-value NF4 blocks) saved from a
config; one training run is shared by the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from sqlalchemy import select

from genloop.config import LoraConfig, ModelConfig
from genloop.data.pairs import write_pairs_dataset
from genloop.data.tokenizer import load_hf_tokenizer, train_bpe
from genloop.errors import ConfigError, GenloopError
from genloop.models.causal_lm import forward_logits
from genloop.models.lora import apply_lora, check_4bit_device, import_bitsandbytes, merge_lora
from genloop.models.pretrained import load_pretrained, save_hf_dir
from genloop.train import checkpoint as ckpt
from genloop.workspace import Workspace, init_workspace, registry
from genloop.workspace.tables import RunMetric

from ..conftest import run_genloop

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

WORDS = ["red", "green", "blue", "cyan", "black", "white", "amber", "olive", "pink", "gold"]
SFT_ROWS = [{"prompt": f"colour of {w}?", "response": f"{w} is {w}"} for w in WORDS]
QLORA = {"r": 4, "alpha": 8, "dropout": 0.0, "load_in_4bit": True}
STEPS = 12
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the adapted ones (Llama default)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A workspace with the tiny base registered as ``base`` and an SFT pairs dataset."""
    from genloop.models.family import get_family

    root = tmp_path_factory.mktemp("qlora")
    texts = [f"{r['prompt']} {r['response']}" for r in SFT_ROWS] * 4
    tok_dir = train_bpe(texts, root / "tok", vocab_size=320, min_frequency=1)
    tokenizer = load_hf_tokenizer(tok_dir)
    torch.manual_seed(0)
    base = get_family("causal_lm").build(
        {
            "vocab_size": len(tokenizer),
            "n_layer": 2,
            "n_embd": 64,
            "n_head": 2,
            "context_length": 64,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": tokenizer.pad_token_id,
        }
    )
    base_dir = save_hf_dir(base, root / "base", family="causal_lm", tokenizer_dir=tok_dir)  # type: ignore[arg-type]
    workspace = init_workspace(root / "ws")
    registry.register_model(workspace, "base", "causal_lm", base_dir)
    write_pairs_dataset(
        workspace, "pairs", "sft", SFT_ROWS, tokenizer_dir=tok_dir, val_fraction=0.2
    )
    yield workspace
    workspace.close()


def write_config(ws: Workspace, name: str, lora: dict[str, Any]) -> Path:
    spec = {
        "name": name,
        "model": {"family": "causal_lm", "base_model": "base", "lora": lora},
        "train": {
            "objective": "sft",
            "dataset": "pairs",
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 0,
            "max_steps": STEPS,
            "batch_size": 4,
            "eval_every": STEPS,
            "eval_batches": 1,
            "checkpoint_every": STEPS,
            "device": "cpu",
        },
    }
    path = ws.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(ws: Workspace) -> dict[str, Any]:
    """``genloop train qlora.yaml --json``."""
    ran = run_genloop(ws, "train", write_config(ws, "qlora", QLORA), "--json")
    assert ran.returncode == 0, ran.stderr
    out: dict[str, Any] = json.loads(ran.stdout)
    return out


def base_dir(ws: Workspace) -> Path:
    return registry.artifact_path(ws, "base@1")


def qlora_model(ws: Workspace) -> Any:
    """The base in NF4 with fresh adapters, as ``genloop train`` builds it."""
    from genloop.train.text import build_model

    m = ModelConfig.model_validate({"base_model": "base", "lora": QLORA})
    return build_model(ws, m, None, torch.device("cpu")).model


def test_the_base_is_4bit_and_only_the_adapters_train(ws: Workspace) -> None:
    import bitsandbytes as bnb

    model = qlora_model(ws)
    layer = model.get_base_model().model.layers[0]
    for name in PROJECTIONS:  # adapted: a peft LoRA layer around a 4-bit linear
        assert isinstance(getattr(layer.self_attn, name).base_layer, bnb.nn.Linear4bit)
    for name in ("gate_proj", "up_proj", "down_proj"):  # not adapted: 4-bit all the same
        assert isinstance(getattr(layer.mlp, name), bnb.nn.Linear4bit)
    packed = [p for p in model.parameters() if isinstance(p, bnb.nn.Params4bit)]
    assert len(packed) == 2 * 7 and all(p.dtype == torch.uint8 for p in packed)
    assert {p.quant_state.quant_type for p in packed} == {"nf4"}  # type: ignore[attr-defined]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(PROJECTIONS) * 2  # A and B per projection, per layer

    fp32 = load_pretrained(base_dir(ws))  # the same base in float32
    assert model.get_memory_footprint() < 0.8 * fp32.get_memory_footprint()


def test_validation_leaves_the_base_and_the_gradients_as_they_were(ws: Workspace) -> None:
    """An eval-mode forward without gradients (the loop's validation) between two training
    steps changes neither the 4-bit base nor the adapters' gradients. (bitsandbytes alone
    repacks the weights for its CPU inference kernel there, on AVX512-BF16 CPUs, and the
    gradient then stops at every 4-bit layer.)"""
    model = qlora_model(ws)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the layers below a gradient path
            torch.nn.init.normal_(param, std=0.1)
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))

    def gradients() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before, state = gradients(), {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = gradients()
    assert before.keys() == after.keys()
    for name, grad in before.items():
        assert torch.equal(grad, after[name]), name
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_loss_goes_down_and_the_checkpoint_holds_the_4bit_base(
    ws: Workspace, trained: dict[str, Any]
) -> None:
    with ws.catalog.session() as s:
        losses = s.scalars(
            select(RunMetric.value)
            .where(RunMetric.run_id == trained["run_id"], RunMetric.key == "loss")
            .order_by(RunMetric.id)
        ).all()
    assert len(losses) == STEPS and sum(losses[-3:]) < sum(losses[:3])

    # the weights the loop trained, as its checkpoint at the last step holds them
    found = ckpt.load_latest(ws.store, trained["run_id"])
    assert found is not None and found.step == STEPS
    weights = load_file(str(found.path / "model.safetensors"))
    fresh = qlora_model(ws).state_dict()
    for key, value in weights.items():
        if "lora_" in key:
            continue
        assert torch.equal(value, fresh[key]), f"{key} changed"  # the base stayed frozen
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    packed = weights[f"{q}.base_layer.weight"]
    assert packed.dtype == torch.uint8 and packed.numel() == 64 * 64 // 2  # two codes a byte
    assert weights[f"{q}.lora_B.default.weight"].abs().sum() > 0  # B starts at zero


def test_a_checkpoint_restores_into_a_fresh_4bit_model(
    ws: Workspace, trained: dict[str, Any]
) -> None:
    """What ``--resume`` does: the base is quantized again, the checkpoint's adapters and
    optimizer state load into it, and its copy of the 4-bit base is checked, not loaded."""
    from genloop.train.loop import make_optimizer

    found = ckpt.load_latest(ws.store, trained["run_id"])
    assert found is not None
    model = qlora_model(ws)
    optimizer = make_optimizer(
        model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device=torch.device("cpu")
    )
    ckpt.restore(found, model, optimizer)
    saved = load_file(str(found.path / "model.safetensors"))
    state = model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in saved)  # adapters, base, its state

    changed = dict(saved)
    absmax = "base_model.model.model.layers.1.mlp.up_proj.weight.absmax"
    changed[absmax] = changed[absmax] + 1  # another base, quantized: another block scale
    with pytest.raises(GenloopError, match="differs from the base loaded now"):
        model.load_state_dict(changed, strict=False)


def test_the_export_is_the_trained_model_merged_into_the_dequantized_base(
    ws: Workspace, trained: dict[str, Any]
) -> None:
    assert trained["model"] == "qlora@1"
    info = registry.resolve(ws, "qlora@1")
    assert info.parent == "base@1" and info.config["lora"]["load_in_4bit"] is True
    out = registry.artifact_path(ws, info.ref)
    exported, base = (
        load_file(str(out / "model.safetensors")),
        load_file(str(base_dir(ws) / "model.safetensors")),
    )
    assert exported.keys() == base.keys()  # a plain checkpoint of the same architecture
    assert all(v.dtype == torch.float32 for v in exported.values())  # the base's dtype
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    # the model training ended with: NF4 base + the adapters from the last checkpoint
    found = ckpt.load_latest(ws.store, trained["run_id"])
    assert found is not None
    adapters = load_file(str(found.path / "model.safetensors"))
    qlora = qlora_model(ws)
    qlora.load_state_dict({k: v for k, v in adapters.items() if "lora_" in k}, strict=False)
    merged = load_pretrained(out)
    batch = {
        "input_ids": torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    }
    with torch.no_grad():
        expected = forward_logits(qlora.eval(), batch)
        got = forward_logits(merged, batch)
        original = forward_logits(load_pretrained(base_dir(ws)), batch)
    assert torch.allclose(got, expected, atol=1e-4)
    # … which is not the full-precision base plus the same update: NF4 moved the weights
    assert not torch.allclose(original, expected, atol=1e-3)


def test_a_bfloat16_base_merges_back_to_bfloat16(ws: Workspace, tmp_path: Path) -> None:
    bf16 = load_pretrained(base_dir(ws)).to(torch.bfloat16)
    stored = save_hf_dir(bf16, tmp_path / "bf16", family="causal_lm")
    qlora = apply_lora(load_pretrained(stored, load_in_4bit=True), r=4, alpha=8, dropout=0.0)
    for name, param in qlora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    merged = merge_lora(qlora)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert not hasattr(merged.config, "quantization_config")
    batch = {"input_ids": torch.randint(5, 300, (1, 8), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        got = forward_logits(merged, batch).float()
        expected = forward_logits(qlora.eval(), batch).float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 rounding only


def test_generate_runs_the_result(ws: Workspace, trained: dict[str, Any]) -> None:
    ran = run_genloop(
        ws, "generate", trained["model"], "-p", "colour of red?", "--max-tokens", "4", "--json"
    )
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert 1 <= out["choices"][0]["completion_tokens"] <= 4


def test_a_missing_bitsandbytes_is_one_error_line(ws: Workspace) -> None:
    """bitsandbytes blocked from importing in a fresh process: exit 1, no traceback."""
    block = (
        "import sys; sys.modules['bitsandbytes'] = None; "
        "from genloop.cli.main import main; sys.argv = ['genloop', *sys.argv[1:]]; main()"
    )
    config = write_config(ws, "nobnb", QLORA)
    env = {k: v for k, v in os.environ.items() if k != "GENLOOP_DATABASE_URL"}
    env |= {"GENLOOP_HOME": str(ws.root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", block, "train", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "needs bitsandbytes" in errors[0], proc.stderr
    assert "plain LoRA" in errors[0]


def test_a_device_bitsandbytes_cannot_use_is_a_clear_error(ws: Workspace) -> None:
    with pytest.raises(GenloopError, match="runs on cpu or cuda, not meta"):
        check_4bit_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(GenloopError, match="needs a CUDA GPU, and none is visible"):
            load_pretrained(base_dir(ws), device="cuda", load_in_4bit=True)
    assert check_4bit_device("cpu") == torch.device("cpu")  # this machine: the CPU kernels
    assert import_bitsandbytes().__version__.startswith("0.50")


def test_a_text_to_image_base_is_not_quantized() -> None:
    from genloop.train.text_to_image import with_lora

    lora = LoraConfig.model_validate(QLORA)
    with pytest.raises(ConfigError, match="load_in_4bit is for text models"):
        with_lora(None, lora)  # type: ignore[arg-type]  # refused before the pipeline is read
