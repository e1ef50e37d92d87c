"""ONNX export with the cache: matches PyTorch, runs in onnxruntime, quantizes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import onnxruntime
import pytest
import torch

from genloop.errors import GenloopError
from genloop.models.causal_lm import FAMILY
from genloop.models.pretrained import load_pretrained
from genloop.optimize.onnx import (
    TorchCausalLM,
    export_onnx,
    load_onnx_lm,
    providers_for,
    quantize_onnx,
    write_meta,
)
from genloop.optimize.quantize import quantize_model
from genloop.workspace import Workspace, registry


@pytest.fixture(scope="module")
def exported(
    trained: tuple[Workspace, str], optimized: dict[str, Any]
) -> tuple[Any, Path, dict[str, Any]]:
    """The ONNX export ``optimized`` made (of the pruned model), that model, and its
    description (the export is the slow part: one per test session)."""
    ws, _ = trained
    onnx = optimized["onnx"]
    out = ws.store.open_verified(onnx.artifact)
    model = FAMILY.load(ws.store.open_verified(registry.resolve(ws, onnx.parent).artifact))
    return model, out, onnx.config["optimize"]["onnx"]


def _greedy(runner: Any, prompt: torch.Tensor, n: int) -> list[int]:
    logits, past = runner.forward(prompt)
    mask = torch.ones_like(prompt)
    tokens = [int(logits[0, -1].argmax())]
    for _ in range(n - 1):
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        logits, past = runner.forward(torch.tensor([[tokens[-1]]]), mask, past=past)
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def test_export_is_verified_against_pytorch(exported: tuple[Any, Path, dict[str, Any]]) -> None:
    _, out, description = exported
    assert (out / "model.onnx").is_file() and (out / "config.json").is_file()
    check = description["verification"]
    assert check["max_abs_diff"] <= 1e-4
    assert {c["case"] for c in check["cases"]} == {"prefill", "decode"}
    assert description["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert description["inputs"][3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert description["outputs"][:2] == ["logits", "present.0.key"]
    session = load_onnx_lm(out).session
    axes = {i.name: i.shape for i in session.get_inputs()}
    assert axes["input_ids"] == ["batch", "seq"]
    assert axes["past_key_values.1.value"] == ["batch", 2, "past", 16]


def test_onnx_greedy_decoding_gives_pytorchs_tokens(
    exported: tuple[Any, Path, dict[str, Any]],
) -> None:
    model, out, _ = exported
    runner = load_onnx_lm(out)
    prompt = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf = model.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert _greedy(runner, prompt, 10) == hf[0, 6:].tolist()
    assert _greedy(TorchCausalLM(model), prompt, 10) == hf[0, 6:].tolist()


def test_onnx_batches_left_padded_prompts_of_any_shape(
    exported: tuple[Any, Path, dict[str, Any]],
) -> None:
    model, out, _ = exported
    runner = load_onnx_lm(out)
    gen = torch.Generator().manual_seed(3)
    long, short = (
        torch.randint(3, 300, (40,), generator=gen),
        torch.randint(3, 300, (5,), generator=gen),
    )
    ids = torch.zeros(3, 40, dtype=torch.long)
    mask = torch.zeros(3, 40, dtype=torch.long)
    ids[0], mask[0] = long, 1
    ids[1, -5:], mask[1, -5:] = short, 1
    ids[2, -1], mask[2, -1] = 7, 1
    logits, past = runner.forward(ids, mask)
    assert logits.shape == (3, 40, 320) and past[0][0].shape == (3, 2, 40, 16)
    with torch.no_grad():
        alone = model(input_ids=short[None]).logits[0, -1]
    assert torch.allclose(logits[1, -1], alone, atol=1e-4)
    # one decode step for the whole batch, each row at its own position
    step = torch.tensor([[11], [12], [13]])
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    logits2, past2 = runner.forward(step, mask2, past=past)
    assert past2[0][0].shape == (3, 2, 41, 16)
    with torch.no_grad():
        alone2 = model(input_ids=torch.cat([short, torch.tensor([12])])[None]).logits[0, -1]
    assert torch.allclose(logits2[1, -1], alone2, atol=1e-4)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_onnxruntime_quantized_copies_run_close_to_the_float_graph(
    exported: tuple[Any, Path, dict[str, Any]], tmp_path: Path, bits: str
) -> None:
    model, out, description = exported
    q_dir = tmp_path / bits
    quant = quantize_onnx(out, q_dir, bits)
    assert quant["bits"] == bits
    write_meta(q_dir, description, {"transform": f"onnx-{bits}"})
    size = sum(p.stat().st_size for p in q_dir.glob("model.onnx*"))
    float_size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    assert size < 0.75 * float_size
    prompt = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    logits, _ = load_onnx_lm(q_dir).forward(prompt)
    with torch.no_grad():
        reference = model(input_ids=prompt).logits
    assert float((logits - reference).norm() / reference.norm()) < 0.2
    assert len(_greedy(load_onnx_lm(q_dir), prompt[:1], 4)) == 4


def test_onnx_variants_are_refused_by_the_pytorch_loader(
    exported: tuple[Any, Path, dict[str, Any]],
) -> None:
    """Training and fine-tuning load through it: an ONNX graph has no weights to train."""
    _, out, _ = exported
    with pytest.raises(GenloopError, match="cannot be trained"):
        load_pretrained(out)


def test_as_a_transformers_model_it_generates_as_its_parent(
    exported: tuple[Any, Path, dict[str, Any]],
) -> None:
    """``OnnxForCausalLM`` runs HF ``generate``: greedy and beam search on a left-padded
    batch give the parent's tokens; seeded sampling draws the same."""
    from genloop.optimize.onnx_model import load_onnx_model

    model, out, _ = exported
    onnx = load_onnx_model(out)
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second prompt is 4 tokens, left-padded
    pad = {"pad_token_id": 0, "attention_mask": mask, "max_new_tokens": 8, "min_new_tokens": 8}
    for kwargs in ({"do_sample": False}, {"do_sample": False, "num_beams": 3}):
        with torch.no_grad():
            expected = model.generate(ids, **pad, **kwargs)
        assert torch.equal(onnx.generate(ids, **pad, **kwargs), expected), kwargs
    torch.manual_seed(5)
    with torch.no_grad():
        expected = model.generate(ids, **pad, do_sample=True, top_k=0, temperature=0.8)
    torch.manual_seed(5)
    assert torch.equal(
        onnx.generate(ids, **pad, do_sample=True, top_k=0, temperature=0.8), expected
    )
    with torch.no_grad():
        logits = onnx(input_ids=ids, attention_mask=mask, use_cache=False).logits
        reference = model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    assert float((logits[0] - reference[0]).abs().max()) < 1e-4


def test_genloop_eval_runs_an_onnx_variant_like_its_parent(
    trained: tuple[Workspace, str], optimized: dict[str, Any]
) -> None:
    """``genloop eval`` (and so the pipeline's gate) on the ONNX variant: the same
    perplexity and the same greedy generations as the model it was exported from."""
    from genloop.config import EvalConfig
    from genloop.evaluate.run import evaluate_model

    ws, _ = trained
    onnx = optimized["onnx"]
    cfg = EvalConfig(max_samples=4, max_new_tokens=6, temperature=0.0)
    suites = ["perplexity", "generation"]
    mine = evaluate_model(ws, onnx.ref, dataset="fx", suites=suites, cfg=cfg, device="cpu")
    parent = evaluate_model(ws, onnx.parent, dataset="fx", suites=suites, cfg=cfg, device="cpu")
    assert mine.metrics["perplexity"] == pytest.approx(parent.metrics["perplexity"], rel=1e-4)
    generation = [name for name in parent.metrics if name not in ("perplexity", "nll")]
    assert generation  # BLEU, ROUGE, distinct-n …: texts compared through their scores
    for name in generation:
        value = parent.metrics[name]
        if value is not None:
            assert mine.metrics[name] == pytest.approx(value, rel=1e-6), name


def test_unavailable_providers_and_quantized_exports_are_clear_errors(
    exported: tuple[Any, Path, dict[str, Any]], tmp_path: Path
) -> None:
    model, _, _ = exported
    with pytest.raises(GenloopError, match="unknown ONNX device 'gpu'"):
        providers_for("gpu")
    if "TensorrtExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(GenloopError, match="no TensorrtExecutionProvider"):
            providers_for("tensorrt")
    quantized = copy.deepcopy(model)
    quantize_model(quantized, "int8", "dynamic")
    with pytest.raises(GenloopError, match="export the float model"):
        export_onnx(quantized, tmp_path / "q")
