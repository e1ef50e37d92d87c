"""A causal LM as one GGUF file, for llama.cpp and the tools built on it (Ollama, LM Studio).

``genloop export REF --format gguf`` calls :func:`write_gguf`, which follows llama.cpp's
``convert_hf_to_gguf.py`` for the Llama architecture, with the ``gguf`` package writing:

1. the model's hyperparameters under ``llama.*`` (context, widths, heads, RoPE base, RMS
   norm epsilon);
2. the tokenizer: genloop's byte-level BPE is GPT-2's, so ``tokenizer.ggml.model`` is
   ``gpt2`` and ``tokenizer.ggml.pre`` is ``gpt-2`` (llama.cpp's pre-tokenizer with GPT-2's
   split regex, ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)``,
   the one ``tokenizers``' ``ByteLevel(use_regex=True)`` applies); the tokens in their
   byte-level spelling, the merges, token types (special added tokens are ``CONTROL``),
   bos/eos/unk/pad ids and the chat template (transformers' ``{% generation %}`` markers
   removed: llama.cpp's template engine does not know them, and they change no text);
3. the tensors under llama.cpp's names (``gguf.get_tensor_name_map``), with the query and
   key projections permuted: Hugging Face's Llama rotates the two halves of each head
   (``rotate_half``), llama.cpp adjacent pairs, so the rows of each head are reordered
   from (2, Q/2) to (Q/2, 2) — the same attention, computed llama.cpp's way.

Weights: ``f16`` (every matrix in float16), ``q8_0`` (blocks of 32 weights with one
float16 scale, gguf's own quantizer), ``q4_0`` (4-bit blocks of 32; the embedding and the
output head stay q8_0, the tensors most sensitive to 4 bits, where llama.cpp's own
quantizer uses 6-bit ones), ``q4_k_m`` (llama.cpp's ``Q4_K_M`` mix, see :func:`q4_k_m_type`;
the k-quants written by :mod:`genloop.optimize.gguf_quants`, as gguf's package only reads
them). Norms stay float32, matrices whose rows are not a multiple of 32 float16. A
quantized genloop variant is exported from its dequantized weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor, nn

from genloop.errors import ConfigError, GenloopError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")
# gguf.LlamaFileType.MOSTLY_F16, _Q8_0, _Q4_0, _Q4_K_M
FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}
SUPPORTED_MODEL_TYPES = ("llama",)  # what genloop's causal_lm presets build
BLOCK = 32  # weights per q8_0 / q4_0 block
PRE_TOKENIZER = "gpt-2"
_GENERATION_TAGS = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


@dataclass(frozen=True)
class GgufResult:
    path: Path
    quant: str
    tensors: int
    vocab_size: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "quant": self.quant,
            "tensors": self.tensors,
            "vocab_size": self.vocab_size,
            "bytes": self.bytes,
        }


def check_quant(quant: str) -> None:
    """Raise a ConfigError (exit 2) naming the choices unless ``quant`` is one of them."""
    if quant not in QUANTS:
        raise ConfigError(f"unknown --quant {quant!r} (choose from: {', '.join(QUANTS)})")


def check_architecture(config: dict[str, Any], what: str) -> None:
    """Raise a GenloopError unless llama.cpp's ``llama`` graph computes this model."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GenloopError(
            f"{what} is a {model_type or 'non-transformers'} model; GGUF export covers "
            f"causal LMs of the Llama architecture (model_type: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}), which genloop's causal_lm presets build"
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise GenloopError(
            f"{what} uses the {act} activation; llama.cpp's Llama graph is SwiGLU (silu), "
            "so only models trained with activation: silu export to GGUF"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise GenloopError(f"{what} has {flag}; GGUF export covers Llama models without")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise GenloopError(
            f"{what} uses {rope['rope_type']} RoPE scaling; GGUF export covers plain RoPE"
        )


def write_gguf(
    model_dir: Path, out: Path, quant: str = "f16", *, name: str | None = None
) -> GgufResult:
    """Write the causal LM in ``model_dir`` (a genloop model version or a local Hugging Face
    Llama checkpoint with ``tokenizer.json``) to the GGUF file ``out``."""
    import gguf

    from genloop.models.pretrained import load_pretrained

    check_quant(quant)
    config = json.loads((model_dir / "config.json").read_text())
    check_architecture(config, name or str(model_dir))
    model = load_pretrained(model_dir, family="causal_lm", dtype="float32")
    vocab_size = int(config["vocab_size"])

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    # 1. hyperparameters
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    rope = config.get("rope_parameters") or {}
    writer.add_name(name or model_dir.name)
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(
        int(config.get("num_key_value_heads") or config["num_attention_heads"])
    )
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # 2. tokenizer
    write_vocab(writer, model_dir, vocab_size)
    # 3. tensors
    count = 0
    tensors = float_tensors(model, config)
    tied = not any(hf_name == "lm_head.weight" for hf_name, _ in tensors)
    for hf_name, tensor in tensors:
        gguf_name, data, qtype = _gguf_tensor(hf_name, tensor, config, quant, tied=tied)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufResult(out, quant, count, vocab_size, out.stat().st_size)


# ---------------------------------------------------------------------------- tensors


def float_tensors(model: PreTrainedModel, config: dict[str, Any]) -> list[tuple[str, Tensor]]:
    """The model's weights in Hugging Face names, float32; a genloop quantized layer gives
    its dequantized weight. A head tied to the embedding is left out (llama.cpp then uses
    ``token_embd`` as the output, as the tied model does)."""
    from genloop.models.quantized import QUANTIZED_MODULES

    out: dict[str, Tensor] = {}
    quantized = set()
    for module_name, module in model.named_modules():
        if isinstance(module, QUANTIZED_MODULES):
            quantized.add(module_name + ".")
            out[f"{module_name}.weight"] = module.dequantized()
            if module.bias is not None:
                out[f"{module_name}.bias"] = module.bias.detach().float()
    for key, tensor in model.state_dict().items():
        if not any(key.startswith(prefix) for prefix in quantized):
            out[key] = tensor.detach().float()
    head = model.get_submodule("lm_head")
    if config.get("tie_word_embeddings", False) and type(head) is nn.Linear:
        out.pop("lm_head.weight", None)
    return sorted(out.items())


def permute_rope(weight: Tensor, n_head: int) -> Tensor:
    """Rows of each head from Hugging Face's (2, Q/2) halves to llama.cpp's (Q/2, 2)
    pairs; ``n_head`` is the number of heads the projection has (K for keys)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _gguf_tensor(
    hf_name: str, tensor: Tensor, config: dict[str, Any], quant: str, *, tied: bool
) -> tuple[str, np.ndarray, Any]:
    import gguf

    n_layer = int(config["num_hidden_layers"])
    name = _tensor_map(n_layer).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise GenloopError(f"no GGUF name for the tensor {hf_name} (not a Llama tensor)")
    if hf_name.endswith("q_proj.weight"):
        tensor = permute_rope(tensor, int(config["num_attention_heads"]))
    elif hf_name.endswith("k_proj.weight"):
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        tensor = permute_rope(tensor, int(heads))
    data = tensor.contiguous().numpy().astype(np.float32)
    q = gguf.GGMLQuantizationType
    if data.ndim == 1:  # norms stay float32, as in llama.cpp's own conversions
        return name, data, q.F32
    if quant == "f16" or data.shape[-1] % BLOCK:
        return name, data.astype(np.float16), q.F16
    if quant == "q4_k_m":
        qtype = q4_k_m_type(name, data.shape[-1], n_layer, tied=tied)
    elif quant == "q4_0" and name not in ("token_embd.weight", "output.weight"):
        qtype = q.Q4_0
    else:
        qtype = q.Q8_0
    return name, quantize(data, qtype), qtype


def quantize(data: np.ndarray, qtype: Any) -> np.ndarray:
    """``data`` as the bytes of ``qtype``: gguf's quantizers, and genloop's for the
    k-quants gguf cannot write."""
    import gguf

    from genloop.optimize.gguf_quants import quantize_q4_k, quantize_q6_k

    if qtype == gguf.GGMLQuantizationType.Q4_K:
        return quantize_q4_k(data)
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        return quantize_q6_k(data)
    return gguf.quants.quantize(data, qtype)


def use_more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's layers that get 6 bits in Q4_K_M: the first and last eighth, and every
    third one in between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def q4_k_m_type(name: str, row: int, n_layer: int, *, tied: bool) -> Any:
    """The GGML type of the matrix ``name`` (rows of ``row`` weights) in llama.cpp's
    ``Q4_K_M`` mix (``llama_tensor_get_type`` in ``src/llama-quant.cpp``, Llama, no
    importance matrix): Q6_K for the output head (the embedding when the head is tied to
    it) and for ``attn_v`` and ``ffn_down`` in :func:`use_more_bits` layers, Q4_K for the
    rest. A row that is not a multiple of 256 falls back as llama.cpp's does: the head to
    Q8_0, Q4_K to Q5_0, Q6_K to Q8_0 (the caller keeps rows not a multiple of 32 in f16)."""
    import gguf

    q = gguf.GGMLQuantizationType
    layer = re.match(r"blk\.(\d+)\.", name)
    head = name == "output.weight" or (tied and name == "token_embd.weight")
    sensitive = name.endswith(("attn_v.weight", "ffn_down.weight"))
    more_bits = layer is not None and sensitive and use_more_bits(int(layer.group(1)), n_layer)
    qtype = q.Q6_K if head or more_bits else q.Q4_K
    if row % 256:
        return {q.Q4_K: q.Q5_0, q.Q6_K: q.Q8_0}[qtype]
    return qtype


_MAPS: dict[int, Any] = {}


def _tensor_map(n_layer: int) -> Any:
    import gguf

    if n_layer not in _MAPS:
        _MAPS[n_layer] = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    return _MAPS[n_layer]


# ---------------------------------------------------------------------------- tokenizer


def write_vocab(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """The ``tokenizer.ggml.*`` fields of a byte-level BPE ``tokenizer.json``."""
    tokens, types, merges = gguf_vocab(model_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = special_token_ids(model_dir)
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if ids.get(key) is not None:
            add(ids[key])
    # genloop's tokenizer adds no bos/eos of its own: prompts are their text's ids
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    template = chat_template(model_dir)
    if template is not None:
        writer.add_chat_template(template)


def gguf_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """``(tokens by id, token types, merges "a b")``; ids the tokenizer lacks up to the
    model's ``vocab_size`` are ``[PAD<id>]`` of type UNUSED (as llama.cpp's converter)."""
    import gguf

    from genloop.data.tokenizer import load_tokenizer, tokenizer_file

    raw = json.loads(tokenizer_file(model_dir).read_text(encoding="utf-8"))
    model = raw.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(raw):
        raise GenloopError(
            f"{model_dir}'s tokenizer is not a byte-level BPE (GPT-2 style); GGUF export "
            "maps that kind to llama.cpp's gpt2 tokenizer"
        )
    tok = load_tokenizer(model_dir)
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = tok.get_added_tokens_decoder()
    if by_id and max(by_id) >= vocab_size:
        raise GenloopError(
            f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary is {vocab_size}"
        )
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = added[i].special
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, [int(t) for t in types], merges


def _byte_level(raw: dict[str, Any]) -> bool:
    pre = raw.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def special_token_ids(model_dir: Path) -> dict[str, int | None]:
    """bos/eos/unk/pad ids from ``tokenizer_config.json``'s token names."""
    from genloop.data.tokenizer import CONFIG_FILE, load_tokenizer

    path = model_dir / CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    tok = load_tokenizer(model_dir)
    ids: dict[str, int | None] = {}
    for key in ("bos", "eos", "unk", "pad"):
        value = config.get(f"{key}_token")
        if isinstance(value, dict):  # the AddedToken form
            value = value.get("content")
        ids[key] = tok.token_to_id(value) if isinstance(value, str) else None
    return ids


def chat_template(model_dir: Path) -> str | None:
    """The tokenizer's chat template without transformers' ``{% generation %}`` markers."""
    from genloop.data.tokenizer import CONFIG_FILE

    template: Any = None
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    elif (model_dir / CONFIG_FILE).is_file():
        template = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8")).get(
            "chat_template"
        )
    if not isinstance(template, str):
        return None
    return _GENERATION_TAGS.sub("", template)
