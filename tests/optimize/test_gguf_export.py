"""``genloop export --format gguf``: the file read back with gguf's own reader, the CLI's
errors, and (where llama.cpp's environment exists: ``make llamacpp``) llama.cpp running
the file: the same tokens as genloop for the same prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from genloop.errors import GenloopError
from genloop.optimize.gguf_export import permute_rope, write_gguf
from genloop.workspace import Workspace, init_workspace, registry

from ..conftest import run_genloop
from ..serve.conftest import CORPUS, build_wide_llama

ROOT = Path(__file__).resolve().parents[2]
LLAMACPP_PYTHON = Path(
    os.environ.get("GENLOOP_LLAMACPP_PYTHON") or ROOT / ".venv-llamacpp" / "bin" / "python"
)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide Llama (2 query heads, 1 key/value head) on a genloop BPE."""
    from genloop.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("gguf")
    tok = train_bpe(CORPUS, root / "tok", vocab_size=320, min_frequency=1)
    return build_wide_llama(root / "wide", tok, n_head=2, n_kv_head=1, context_length=256)


@pytest.fixture(scope="module")
def deep(wide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8-layer, 256-wide Llama (tied head, MLP 704 wide) on the same tokenizer: rows of
    256 take the k-quants, the MLP's down projection (rows of 704) their fallback. Weights
    drawn at std 0.075 (0.15 · √(64/256): each layer's gain as in ``wide``)."""
    root = tmp_path_factory.mktemp("gguf-deep")
    return build_wide_llama(root / "deep", wide, std=0.075, n_layer=8, n_embd=256, n_head=4,
                            n_kv_head=2, context_length=256)  # fmt: skip


def _reader(path: Path) -> Any:
    import gguf

    return gguf.GGUFReader(path)


def _field(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def _tensors(reader: Any) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def _float(tensor: Any) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


def test_f16_round_trip_holds_the_weights_tokenizer_and_metadata(
    wide: Path, tmp_path: Path
) -> None:
    import gguf
    from safetensors.torch import load_file

    from genloop.data.tokenizer import load_tokenizer

    result = write_gguf(wide, tmp_path / "m.gguf", "f16")
    r = _reader(result.path)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "llama.block_count") == 2 and _field(r, "llama.embedding_length") == 64
    assert _field(r, "llama.attention.head_count") == 2
    assert _field(r, "llama.attention.head_count_kv") == 1
    assert _field(r, "llama.rope.dimension_count") == 32
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    # the tokenizer: genloop's vocabulary id for id, merges, types, specials, template
    tok = load_tokenizer(wide)
    vocab = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert tokens == [vocab[i] for i in range(len(tokens))] and len(tokens) == 320
    merges = json.loads((wide / "tokenizer.json").read_text())["model"]["merges"]
    assert len(_field(r, "tokenizer.ggml.merges")) == len(merges) > 0
    types = _field(r, "tokenizer.ggml.token_type")
    eos = tok.token_to_id("<|endoftext|>")
    assert types[eos] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    assert _field(r, "tokenizer.ggml.eos_token_id") == eos
    assert _field(r, "tokenizer.ggml.bos_token_id") == eos
    assert _field(r, "tokenizer.ggml.padding_token_id") == tok.token_to_id("<|pad|>")
    assert _field(r, "tokenizer.ggml.add_bos_token") is False
    template = _field(r, "tokenizer.chat_template")
    assert "<|assistant|>" in template and "% generation %" not in template
    # the tensors: llama.cpp's names, the tied head left out, q/k permuted for its RoPE
    tensors = _tensors(r)
    layer = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"}
    layer |= {"ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    expected = {"token_embd.weight", "output_norm.weight"}
    expected |= {f"blk.{i}.{n}.weight" for i in range(2) for n in layer}
    assert set(tensors) == expected and result.tensors == len(expected)
    state = load_file(str(wide / "model.safetensors"))
    q = state["model.layers.1.self_attn.q_proj.weight"]
    stored = _float(tensors["blk.1.attn_q.weight"])
    assert tensors["blk.1.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert np.allclose(stored, permute_rope(q, 2).numpy(), atol=1e-3)
    assert not np.allclose(stored, q.numpy(), atol=1e-3)  # the permutation did something
    k = state["model.layers.0.self_attn.k_proj.weight"]
    assert np.allclose(
        _float(tensors["blk.0.attn_k.weight"]), permute_rope(k, 1).numpy(), atol=1e-3
    )
    norm = tensors["blk.0.ffn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(_float(norm), state["model.layers.0.post_attention_layernorm.weight"])


def test_q8_0_dequantizes_close_and_q4_0_keeps_the_embedding_at_8_bits(
    wide: Path, tmp_path: Path
) -> None:
    import gguf
    from safetensors.torch import load_file

    state = load_file(str(wide / "model.safetensors"))
    q8 = _tensors(_reader(write_gguf(wide, tmp_path / "q8.gguf", "q8_0").path))
    Q = gguf.GGMLQuantizationType
    for gguf_name, hf_name in (
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ("token_embd.weight", "model.embed_tokens.weight"),
    ):
        assert q8[gguf_name].tensor_type == Q.Q8_0
        original = state[hf_name].numpy()
        blocks = np.abs(original).reshape(-1, 32).max(axis=1, keepdims=True)  # (B, 1)
        error = np.abs(_float(q8[gguf_name]) - original).reshape(-1, 32)
        # half a step of each block's scale (amax / 127), plus float16 scale rounding
        assert (error <= blocks / 127 * 0.5 + blocks * 1e-3).all(), gguf_name
    q4 = _tensors(_reader(write_gguf(wide, tmp_path / "q4.gguf", "q4_0").path))
    assert q4["blk.0.ffn_up.weight"].tensor_type == Q.Q4_0
    assert q4["token_embd.weight"].tensor_type == Q.Q8_0
    rel = np.linalg.norm(
        _float(q4["blk.0.ffn_up.weight"]) - state["model.layers.0.mlp.up_proj.weight"].numpy()
    ) / np.linalg.norm(state["model.layers.0.mlp.up_proj.weight"].numpy())
    assert rel < 0.15


def test_a_quantized_variant_exports_its_dequantized_weights(wide: Path, tmp_path: Path) -> None:
    from genloop.models.pretrained import load_pretrained
    from genloop.optimize.quantize import quantize_model, save_quantized

    model = load_pretrained(wide, dtype="float32")
    description = quantize_model(model, "int8", "weight_only")
    out = save_quantized(model, tmp_path / "q", description, tokenizer_dir=wide)
    (out / "genloop.json").write_text(
        json.dumps({"optimize": {"quantization": description}})
    )  # as registered
    tensors = _tensors(_reader(write_gguf(out, tmp_path / "q.gguf", "f16").path))
    down = model.get_submodule("model.layers.0.mlp.down_proj").dequantized().numpy()
    assert np.allclose(_float(tensors["blk.0.ffn_down.weight"]), down, atol=1e-3)
    # the quantized head is no longer the embedding: it is written as llama.cpp's output
    assert "output.weight" in tensors


# ------------------------------------------------------------------ Q4_K / Q6_K / q4_k_m


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    outlier = rng.normal(0, 1, (4, 512)).astype(np.float32)
    outlier[:, 37] = 100.0  # one weight 100σ out in each super-block's first half
    mixed = rng.normal(0, 1, (4, 512)).astype(np.float32)
    mixed *= np.repeat(10.0 ** rng.uniform(-3, 1, (4, 32)), 16, axis=1)  # (4, 512) scales
    return {
        "normal": rng.normal(0, 0.02, (64, 512)).astype(np.float32),
        "uniform": rng.uniform(-1, 1, (8, 256)).astype(np.float32),
        "zeros": np.zeros((2, 256), np.float32),
        "constant": np.full((2, 256), 0.37, np.float32),
        "negative constant": np.full((2, 256), -0.37, np.float32),
        "negative only": -np.abs(rng.normal(0, 1, (4, 256))).astype(np.float32),
        "positive only": np.abs(rng.normal(0, 1, (4, 256))).astype(np.float32),
        "one outlier": outlier,
        "sub-blocks of mixed scale": mixed,
    }


def _bound(x: np.ndarray, sub: int, levels: int, scale_levels: int) -> np.ndarray:
    """Per weight: one quant step of its own sub-block (its range / ``levels``) plus one
    step of the super-block's 6- or 8-bit scale grid (the super-block's range /
    ``scale_levels``), plus float16 rounding of the two super-block scales."""
    blocks = x.reshape(-1, 256)  # (B, 256)
    subs = blocks.reshape(blocks.shape[0], -1, sub)  # (B, 256 / sub, sub)
    own = np.ptp(subs, axis=-1, keepdims=True) / levels  # (B, S, 1)
    whole = np.ptp(blocks, axis=-1)[:, None, None] / scale_levels  # (B, 1, 1)
    big = np.abs(blocks).max(axis=-1)[:, None, None]
    return np.broadcast_to(own + whole + 2e-3 * big, subs.shape).reshape(x.shape)


@pytest.mark.parametrize("case", list(_inputs()))
def test_k_quant_bytes_read_back_by_ggufs_own_dequantizer_within_the_bound(case: str) -> None:
    """Q4_K: |error| ≤ range_j/15 + R/63 (+fp16), 8 sub-blocks of 32 with 6-bit scales;
    Q6_K: ≤ range_j/63 + R/256, 16 sub-blocks of 16 with int8 scales (R the super-block's
    range). A byte in the wrong place gives errors of the order of the range itself."""
    import gguf

    from genloop.optimize.gguf_quants import quantize_q4_k, quantize_q6_k

    x = _inputs()[case]
    Q = gguf.GGMLQuantizationType
    for quantizer, qtype, sub, levels, scale_levels, nbytes in (
        (quantize_q4_k, Q.Q4_K, 32, 15, 63, 144),
        (quantize_q6_k, Q.Q6_K, 16, 63, 256, 210),
    ):
        raw = quantizer(x)
        assert raw.dtype == np.uint8 and raw.shape == (x.shape[0], x.shape[1] // 256 * nbytes)
        back = gguf.quants.dequantize(raw, qtype)  # dequantize_blocks, as llama.cpp's layout
        assert back.shape == x.shape
        error = np.abs(back - x)
        assert (error <= _bound(x, sub, levels, scale_levels)).all(), (case, qtype.name)
        if case in ("zeros", "constant", "negative constant"):
            assert np.allclose(back, x, rtol=1e-3, atol=0), (case, qtype.name)
    if case == "normal":  # the typical error: a fraction of the weights' spread
        assert (
            np.sqrt(((gguf.quants.dequantize(quantize_q4_k(x), Q.Q4_K) - x) ** 2).mean())
            < 0.08 * x.std()
        )
        assert (
            np.sqrt(((gguf.quants.dequantize(quantize_q6_k(x), Q.Q6_K) - x) ** 2).mean())
            < 0.02 * x.std()
        )


def test_k_quants_refuse_rows_that_are_not_whole_super_blocks() -> None:
    from genloop.optimize.gguf_quants import quantize_q4_k

    with pytest.raises(ValueError, match="not a multiple of 256"):
        quantize_q4_k(np.zeros((2, 320), np.float32))


def test_use_more_bits_is_llama_cpps_half_of_the_layers() -> None:
    from genloop.optimize.gguf_export import use_more_bits

    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    # a 32-layer Llama: the first and last 4, and every third layer from 6 to 27
    assert [i for i in range(32) if use_more_bits(i, 32)] == [
        0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31
    ]  # fmt: skip


def test_q4_k_m_mixes_the_types_as_llama_quantize(deep: Path, tmp_path: Path) -> None:
    import gguf
    from safetensors.torch import load_file

    from genloop.optimize.gguf_export import q4_k_m_type

    result = write_gguf(deep, tmp_path / "k.gguf", "q4_k_m")
    r = _reader(result.path)
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M == 15
    Q = gguf.GGMLQuantizationType
    more = {0, 3, 6, 7}  # use_more_bits of 8 layers
    expected = {"token_embd.weight": Q.Q6_K, "output_norm.weight": Q.F32}  # tied: the head
    for i in range(8):
        for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            expected[f"blk.{i}.{n}.weight"] = Q.Q4_K
        expected[f"blk.{i}.attn_v.weight"] = Q.Q6_K if i in more else Q.Q4_K
        # rows of 704: Q6_K falls back to Q8_0, Q4_K to Q5_0
        expected[f"blk.{i}.ffn_down.weight"] = Q.Q8_0 if i in more else Q.Q5_0
        expected[f"blk.{i}.attn_norm.weight"] = expected[f"blk.{i}.ffn_norm.weight"] = Q.F32
    tensors = _tensors(r)
    assert {n: t.tensor_type for n, t in tensors.items()} == expected
    # the weights read back close to the model's
    state = load_file(str(deep / "model.safetensors"))
    for gguf_name, hf_name, most in (
        ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight", 0.08),  # Q4_K
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", 0.02),  # Q6_K
        ("token_embd.weight", "model.embed_tokens.weight", 0.02),  # Q6_K
        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight", 0.05),  # Q5_0
    ):
        original = state[hf_name].numpy()
        rel = np.linalg.norm(_float(tensors[gguf_name]) - original) / np.linalg.norm(original)
        assert rel < most, (gguf_name, rel)
    # an untied head, and rows too short for the k-quants
    assert q4_k_m_type("output.weight", 256, 8, tied=False) == Q.Q6_K
    assert q4_k_m_type("token_embd.weight", 256, 8, tied=False) == Q.Q4_K
    assert q4_k_m_type("output.weight", 64, 8, tied=False) == Q.Q8_0
    assert q4_k_m_type("blk.2.attn_q.weight", 64, 8, tied=False) == Q.Q5_0


# ------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def export_ws(wide: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    from genloop.models.causal_lm import FAMILY
    from genloop.models.vae import FAMILY as VAE

    root = tmp_path_factory.mktemp("export-ws")
    ws = init_workspace(root / "ws")
    registry.register_model(ws, "lm", "causal_lm", wide)
    vae_dir = root / "vae"
    VAE.save(
        VAE.build({"image_size": 8, "channels": 1, "latent_dim": 4, "base_channels": 8}), vae_dir
    )
    registry.register_model(ws, "vae", "vae", vae_dir)
    gelu = FAMILY.build({"preset": "tiny", "vocab_size": 320, "n_layer": 1, "n_embd": 64,
                         "n_head": 2, "activation": "gelu"})  # fmt: skip
    FAMILY.save(gelu, root / "gelu", tokenizer_dir=wide)
    registry.register_model(ws, "gelu", "causal_lm", root / "gelu")
    return ws


def test_cli_writes_the_file_and_names_it_after_the_version(
    export_ws: Workspace, tmp_path: Path
) -> None:
    out = tmp_path / "lm.gguf"
    ran = run_genloop(export_ws, "export", "lm@1", "--format", "gguf", "-q", "q8_0", "-o", out)
    assert ran.returncode == 0, ran.output
    assert f"wrote {out} (q8_0, 20 tensors, vocabulary 320" in ran.stdout
    assert _field(_reader(out), "general.name") == "lm-v1"
    again = run_genloop(export_ws, "export", "lm@1", "--format", "gguf", "-q", "q8_0", "-o", out)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_cli_accepts_q4_k_m(export_ws: Workspace, tmp_path: Path, monkeypatch: Any) -> None:
    import gguf

    monkeypatch.chdir(tmp_path)  # the default output: ./NAME-vVERSION-QUANT.gguf
    ran = run_genloop(export_ws, "export", "lm@1", "--format", "gguf", "--quant", "q4_k_m")
    assert ran.returncode == 0, ran.output
    out = tmp_path / "lm-v1-q4_k_m.gguf"
    assert f"wrote {out} (q4_k_m, 20 tensors" in ran.stdout
    r = _reader(out)
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    # 64-wide rows: llama.cpp's fallbacks (the tied embedding Q8_0, the rest Q5_0 or Q8_0)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q5_0


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["lm", "--format", "onnx"], 2, "unknown --format 'onnx' (choose from: gguf)"),
        (["lm", "--format", "gguf", "--quant", "q3"], 2, "(choose from: f16, q8_0, q4_0, q4_k_m)"),
        (["lm", "--format", "gguf", "--quant", "Q4_K_M"], 2, "unknown --quant 'Q4_K_M'"),
        (["vae", "--format", "gguf"], 1, "vae model; GGUF export covers causal_lm models"),
        (["gelu", "--format", "gguf"], 1, "gelu activation; llama.cpp's Llama graph is SwiGLU"),
        (["nothing", "--format", "gguf"], 1, "nothing"),
    ],
)
def test_cli_bad_input_is_one_clear_line(
    export_ws: Workspace, args: list[str], code: int, message: str
) -> None:
    ran = run_genloop(export_ws, "export", *args)
    assert ran.returncode == code, ran.output
    assert message in ran.stderr and "Traceback" not in ran.output


def test_a_seq2seq_checkpoint_is_refused(tmp_path: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    ran = run_genloop(tmp_path / "ws", "export", tmp_path / "t5", "--format", "gguf")
    assert ran.returncode == 1 and "seq2seq model; GGUF export covers causal_lm" in ran.stderr
    with pytest.raises(GenloopError, match="model_type: llama"):
        write_gguf(tmp_path / "t5", tmp_path / "t5.gguf")


# ---------------------------------------------------------------------- llama.cpp


# the perplexity llama.cpp may add over genloop's: f16 rounds weights and activations to
# float16, q8_0 weights to 8 bits per block of 32; q4_k_m on this 64-wide model is all
# fallbacks (rows under 256: Q5_0, the head Q8_0; test_llama_cpp_runs_the_q4_k_m_export
# runs the k-quants)
PPL_DELTA = {"f16": 0.002, "q8_0": 0.02, "q4_k_m": 0.05}


@pytest.mark.skipif(
    not LLAMACPP_PYTHON.exists(), reason="no llama.cpp environment ('make llamacpp')"
)
def test_llama_cpp_runs_the_export_token_for_token(wide: Path, tmp_path: Path) -> None:
    """f16: llama.cpp's greedy tokens are genloop's, and the perplexities agree; q8_0 and
    q4_k_m: the perplexity within PPL_DELTA; and llama.cpp tokenizes text as genloop does (its gpt-2
    pre-tokenizer and the merges)."""
    from genloop.data.tokenizer import load_tokenizer
    from genloop.models.pretrained import load_pretrained

    tok = load_tokenizer(wide)
    model = load_pretrained(wide, dtype="float32")
    texts = ["The cat sat on the mat.", "def add(a, b):\n    return a + b", "Hello there! I'm fine"]
    prompt = tok.encode("Rain fell on the quiet").ids
    windows = [tok.encode(text).ids for text in CORPUS[:4]]
    with torch.no_grad():
        ours = model.generate(
            torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False
        )[0, len(prompt) :].tolist()
        nll = sum(
            float(model(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss) * (len(w) - 1)
            for w in windows
        )
    ppl = float(np.exp(nll / sum(len(w) - 1 for w in windows)))
    for quant in ("f16", "q8_0", "q4_k_m"):
        path = write_gguf(wide, tmp_path / f"{quant}.gguf", quant).path
        request = {"model": str(path), "prompt_ids": prompt, "new_tokens": 16, "texts": texts,
                   "windows": windows}  # fmt: skip
        ran = subprocess.run(
            [str(LLAMACPP_PYTHON), str(ROOT / "scripts" / "llamacpp_probe.py")],
            input=json.dumps(request), capture_output=True, text=True, timeout=300,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr[-2000:]
        answer = json.loads(ran.stdout)
        theirs = float(np.exp(answer["nll"] / answer["tokens"]))
        assert abs(theirs / ppl - 1) < PPL_DELTA[quant], (quant, theirs, ppl)
        if quant == "f16":
            assert answer["greedy"] == ours
        assert answer["tokenized"] == [tok.encode(t).ids for t in texts]


def _unpermute_rope(weight: Tensor, n_head: int) -> Tensor:
    """The inverse of :func:`permute_rope`: llama.cpp's pairs back to Hugging Face's halves."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _perplexity(model: Any, windows: list[list[int]]) -> float:
    with torch.no_grad():
        nll = sum(
            float(model(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss) * (len(w) - 1)
            for w in windows
        )
    return float(np.exp(nll / sum(len(w) - 1 for w in windows)))


def _probe(path: Path, windows: list[list[int]], prompt: list[int]) -> dict[str, Any]:
    request = {"model": str(path), "prompt_ids": prompt, "new_tokens": 4, "texts": [],
               "windows": windows}  # fmt: skip
    ran = subprocess.run(
        [str(LLAMACPP_PYTHON), str(ROOT / "scripts" / "llamacpp_probe.py")],
        input=json.dumps(request), capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    return dict(json.loads(ran.stdout))


# llama.cpp's perplexity on the q4_k_m file: next to genloop's fp32 model (the cost of the
# quantization), and next to genloop run on the file's own dequantized weights (what is left
# is llama.cpp's 8-bit activations in its k-quant dot products, not the weights)
Q4_K_M_PPL_DELTA = 0.05
Q4_K_M_SAME_WEIGHTS_DELTA = 0.01


@pytest.mark.skipif(
    not LLAMACPP_PYTHON.exists(), reason="no llama.cpp environment ('make llamacpp')"
)
def test_llama_cpp_runs_the_q4_k_m_export(deep: Path, tmp_path: Path) -> None:
    import gguf

    from genloop.data.tokenizer import load_tokenizer
    from genloop.models.pretrained import load_pretrained

    tok = load_tokenizer(deep)
    model = load_pretrained(deep, dtype="float32")
    windows = [tok.encode(text).ids for text in CORPUS[:4]]
    ppl = _perplexity(model, windows)
    path = write_gguf(deep, tmp_path / "k.gguf", "q4_k_m").path
    answer = _probe(path, windows, tok.encode("Rain fell on the quiet").ids)
    theirs = float(np.exp(answer["nll"] / answer["tokens"]))
    # genloop on the weights llama.cpp read: each tensor dequantized by gguf's reader
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 8)
    stored = {t.name: t for t in _reader(path).tensors}
    state = model.state_dict()
    with torch.no_grad():
        for hf_name, param in state.items():
            if hf_name == "lm_head.weight":
                continue  # tied to the embedding
            name = names.get_name(hf_name, try_suffixes=(".weight",))
            weight = torch.from_numpy(_float(stored[name]).reshape(param.shape).copy())
            if hf_name.endswith("q_proj.weight"):
                weight = _unpermute_rope(weight, 4)
            elif hf_name.endswith("k_proj.weight"):
                weight = _unpermute_rope(weight, 2)
            param.copy_(weight)
    same_weights = _perplexity(model, windows)
    assert abs(theirs / same_weights - 1) < Q4_K_M_SAME_WEIGHTS_DELTA, (theirs, same_weights)
    assert abs(theirs / ppl - 1) < Q4_K_M_PPL_DELTA, (theirs, ppl)
    assert same_weights != ppl  # the weights were quantized
