"""ONNX export of a causal LM with its key/value cache, checked against PyTorch, and a runner.

The exported graph is one decoder step of any length, with the cache in and out:

==========================  ============================  =================================
input                       shape                         meaning
==========================  ============================  =================================
``input_ids``               (B, T) int64                  new tokens
``attention_mask``          (B, P + T) int64              1 = attend, 0 = padding
``position_ids``            (B, T) int64                  positions of the new tokens
``past_key_values.{i}.key`` (B, K, P, Q) float32          layer i's cache (``.value`` too)
==========================  ============================  =================================

Outputs: ``logits`` (B, T, V) and ``present.{i}.key`` / ``.value`` (B, K, P + T, Q), the
cache to feed back. P = 0 (empty cache tensors) is a prompt's first pass. The names follow
Hugging Face Optimum's, so tools that read those graphs read these.

Export uses ``torch.onnx.export(dynamo=True)`` (the ``torch.export`` exporter, the default
since torch 2.9; the TorchScript one is deprecated) with dynamic batch, sequence and cache
lengths. :func:`verify_onnx` runs the graph in onnxruntime on a prompt and a decode step
(with left padding) and compares logits and cache with PyTorch's within a tolerance.
Positions that are padding are left out: their values are meaningless in both.

:func:`load_onnx_lm` gives an :class:`OnnxCausalLM` with the same forward for the serving
engine and the trade-off report. Providers: CPU by default; ``device="cuda"`` uses CUDA,
``device="tensorrt"`` TensorRT then CUDA (onnxruntime builds that have them; an error
names the available ones otherwise). :func:`quantize_onnx` makes int8 (dynamic, per
channel, onnxruntime's quantizer) or int4 (MatMulNBits, weight-only) copies.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from genloop.errors import GenloopError
from genloop.models.pretrained import cache_argument, optimize_meta
from genloop.workspace.layout import ONNX_FILE

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

OPSET = 18
ATOL = 1e-4
RTOL = 1e-4
Past = tuple[tuple[Tensor, Tensor], ...]  # per layer (key, value), each (B, K, P, Q)


def input_names(num_layers: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def _shape(model: PreTrainedModel) -> tuple[int, int, int, int]:
    """(layers L, kv heads K, head dim Q, vocabulary V) of a decoder."""
    c = model.config
    if getattr(c, "is_encoder_decoder", False):
        raise GenloopError("ONNX export with a cache supports decoder-only (causal) models")
    n_head = int(c.num_attention_heads)
    n_kv = int(getattr(c, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // n_head)
    return int(c.num_hidden_layers), n_kv, head_dim, int(c.vocab_size)


class _StepWithCache(nn.Module):
    """The model with its cache as flat tensors: what the ONNX graph computes."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.num_layers = _shape(model)[0]
        self.cache_kw = cache_argument(model)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor
    ) -> tuple[Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kw: cache},
        )
        present: list[Tensor] = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]  # type: ignore[union-attr, list-item]
        return (out.logits, *present)


def export_onnx(
    model: PreTrainedModel,
    out_dir: Path,
    *,
    opset: int = OPSET,
    verify: bool = True,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> dict[str, Any]:
    """Write ``out_dir/model.onnx`` (+ ``model.onnx.data``), config files; the description.

    The model must be a float (not quantized) causal LM. With ``verify`` the graph is
    checked against PyTorch (:func:`verify_onnx`) and the description holds the largest
    difference seen.
    """
    from genloop.models.quantized import is_quantized

    if is_quantized(model):
        raise GenloopError(
            "export the float model to ONNX and quantize there (--export onnx --quantize "
            "int8 does both); PyTorch-quantized layers do not export"
        )
    num_layers, n_kv, head_dim, vocab = _shape(model)
    module: nn.Module = model  # nn.Module's typed float/eval (transformers wraps them)
    module.float().eval()
    device = next(model.parameters()).device
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ONNX_FILE
    # a sample with B, T, P > 1, so no dimension is specialised to 0 or 1
    b, t, p = 2, 3, 4
    gen = torch.Generator().manual_seed(0)
    sample = (
        torch.randint(0, vocab, (b, t), generator=gen).to(device),
        torch.ones(b, p + t, dtype=torch.long, device=device),
        torch.arange(p, p + t, device=device).expand(b, t).contiguous(),
        *(
            torch.randn(b, n_kv, p, head_dim, generator=gen).to(device)
            for _ in range(2 * num_layers)
        ),
    )
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * num_layers)),
    }
    with warnings.catch_warnings(), torch.no_grad(), quiet_logs("torch.onnx"):
        warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations
        program = torch.onnx.export(
            _StepWithCache(model),
            sample,
            input_names=input_names(num_layers),
            output_names=output_names(num_layers),
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        assert program is not None
        program.save(str(path), external_data=True)
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    description: dict[str, Any] = {
        "format": "onnx",
        "file": ONNX_FILE,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "opset": opset,
        "num_layers": num_layers,
        "num_kv_heads": n_kv,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "inputs": input_names(num_layers),
        "outputs": output_names(num_layers),
        "weights": "float32",
    }
    if verify:
        description["verification"] = verify_onnx(model, out_dir, atol=atol, rtol=rtol)
    return description


def verify_onnx(
    model: PreTrainedModel,
    onnx_dir: Path,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the exported graph and PyTorch on the same inputs; raise beyond the tolerance.

    Cases: a batch of two prompts, the first left-padded, with an empty cache; then one
    decode step each way fed with its own cache. Compared: logits and the new cache at
    the positions that are not padding, ``|onnx − torch| ≤ atol + rtol·|torch|``.
    """
    vocab = _shape(model)[3]
    runner = OnnxCausalLM(onnx_dir, meta=_meta_for(model), threads=torch.get_num_threads())
    torch_runner = TorchCausalLM(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0  # left padding in the first row
    worst = 0.0
    cases: list[dict[str, Any]] = []
    with torch.no_grad():
        o_logits, o_past = runner.forward(ids, mask)
        t_logits, t_past = torch_runner.forward(ids, mask)
        worst = max(
            worst, _compare("prefill", o_logits, t_logits, o_past, t_past, mask, cases, atol, rtol)
        )
        nxt = torch.randint(0, vocab, (2, 1), generator=gen)
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        o_logits, o_past = runner.forward(nxt, mask2, past=o_past)
        t_logits, t_past = torch_runner.forward(nxt, mask2, past=t_past)
        worst = max(
            worst, _compare("decode", o_logits, t_logits, o_past, t_past, mask2, cases, atol, rtol)
        )
    bad = [c for c in cases if not c["ok"]]
    if bad:
        first = bad[0]
        raise GenloopError(
            f"the ONNX graph disagrees with PyTorch on {first['case']} {first['what']}: max "
            f"|diff| {first['max_abs_diff']:.3g} (tolerance {atol:g} + {rtol:g}·|x|)"
        )
    return {"atol": atol, "rtol": rtol, "max_abs_diff": worst, "cases": cases}


def _meta_for(model: PreTrainedModel) -> dict[str, Any]:
    num_layers, n_kv, head_dim, vocab = _shape(model)
    return {
        "num_layers": num_layers,
        "num_kv_heads": n_kv,
        "head_dim": head_dim,
        "vocab_size": vocab,
    }


def _compare(
    case: str,
    o_logits: Tensor,
    t_logits: Tensor,
    o_past: Past,
    t_past: Past,
    mask: Tensor,
    out: list[dict[str, Any]],
    atol: float = ATOL,
    rtol: float = RTOL,
) -> float:
    """Record each comparison in ``out``; the largest difference."""
    seq = o_logits.shape[1]
    keep_q = mask[:, -seq:].bool()  # (B, T) positions whose outputs mean something
    keep_kv = mask.bool()  # (B, P + T)
    pairs: list[tuple[str, Tensor, Tensor]] = [
        ("logits", o_logits[keep_q], t_logits.float()[keep_q])
    ]
    for i, ((ok, ov), (tk, tv)) in enumerate(zip(o_past, t_past, strict=True)):
        # (B, K, S, Q) → (kept positions, K, Q)
        pairs.append((f"cache {i}", ok.transpose(1, 2)[keep_kv], tk.transpose(1, 2)[keep_kv]))
        pairs.append((f"cache {i}", ov.transpose(1, 2)[keep_kv], tv.transpose(1, 2)[keep_kv]))
    worst = 0.0
    for what, a, b in pairs:
        diff = (a - b).abs()
        within = bool((diff <= atol + rtol * b.abs()).all())
        value = float(diff.max()) if diff.numel() else 0.0
        worst = max(worst, value)
        if what == "logits" or not within:
            out.append({"case": case, "what": what, "max_abs_diff": value, "ok": within})
    return worst


# ------------------------------------------------------------------------------ runners


class TorchCausalLM:
    """A PyTorch causal LM behind :class:`OnnxCausalLM`'s forward (for side-by-side use)."""

    kind = "torch"

    def __init__(self, model: PreTrainedModel) -> None:
        module: nn.Module = model
        module.eval()
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.config.vocab_size)
        self.cache_kw = cache_argument(model)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past: Any = None,
    ) -> tuple[Tensor, Any]:
        """Logits (B, T, V) in fp32 and the cache to pass back (a ``DynamicCache``)."""
        from transformers import DynamicCache

        if isinstance(past, _PairsCache):  # what the previous call returned
            past = past.cache
        elif isinstance(past, tuple):  # (key, value) pairs, as the ONNX runner gives
            cache = DynamicCache(config=self.model.config)
            for i, (k, v) in enumerate(past):
                cache.update(k.to(self.device), v.to(self.device), i)
            past = cache
        if past is None:
            past = DynamicCache(config=self.model.config)
        ids = input_ids.to(self.device)
        mask = _mask(ids, attention_mask, _past_len(past)).to(self.device)
        pos = _positions(mask, ids.shape[1]) if position_ids is None else position_ids
        with torch.no_grad():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos.to(self.device),
                use_cache=True,
                **{self.cache_kw: past},
            )
        cache = past  # updated in place
        as_pairs = tuple((layer.keys, layer.values) for layer in cache.layers)
        return out.logits.float(), _PairsCache(cache, as_pairs)


class _PairsCache(tuple):  # type: ignore[type-arg]
    """(key, value) pairs that also carry the ``DynamicCache`` they came from."""

    cache: Any

    def __new__(cls, cache: Any, pairs: Past) -> _PairsCache:
        obj = super().__new__(cls, pairs)
        obj.cache = cache
        return obj


def _past_len(past: Any) -> int:
    if isinstance(past, _PairsCache):
        return int(past.cache.get_seq_length())
    if past is None:
        return 0
    if isinstance(past, tuple):
        return int(past[0][0].shape[2]) if past else 0
    return int(past.get_seq_length())


def _mask(ids: Tensor, attention_mask: Tensor | None, past_len: int) -> Tensor:
    b, t = ids.shape
    if attention_mask is None:
        return torch.ones(b, past_len + t, dtype=torch.long)
    mask = torch.as_tensor(attention_mask).long().cpu()
    if mask.shape != (b, past_len + t):
        raise GenloopError(
            f"attention_mask must be (batch, past + new) = ({b}, {past_len + t}), "
            f"not {tuple(mask.shape)}"
        )
    return mask


def _positions(mask: Tensor, seq: int) -> Tensor:
    """Each new token's position: the count of attended tokens before it (left padding)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -seq:]


class OnnxCausalLM:
    """An exported causal LM in onnxruntime: ``forward(ids, mask, positions, past)``.

    Tensors in and out are torch CPU tensors (numpy arrays are accepted too); ``past`` is
    None for a prompt's first pass, else the cache the previous call returned. To decode
    sequences of different lengths in one batch, pad their caches on the left to the same
    length and mark those positions 0 in ``attention_mask``.
    """

    kind = "onnx"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        threads: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        path = self.model_dir / ONNX_FILE
        if not path.is_file():
            raise GenloopError(f"{self.model_dir} has no {ONNX_FILE}")
        info = meta or (optimize_meta(self.model_dir) or {}).get("onnx")
        if not isinstance(info, dict):
            raise GenloopError(f"{self.model_dir}/genloop.json does not describe an ONNX export")
        self.num_layers = int(info["num_layers"])
        self.num_kv_heads = int(info["num_kv_heads"])
        self.head_dim = int(info["head_dim"])
        self.vocab_size = int(info["vocab_size"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # no busy-waiting between calls: the engine's own work runs on the same cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.providers = providers_for(device)
        self.session = ort.InferenceSession(str(path), options, providers=self.providers)
        self._inputs = input_names(self.num_layers)
        self.device = torch.device("cpu")

    def empty_past(self, batch: int) -> Past:
        empty = torch.zeros(batch, self.num_kv_heads, 0, self.head_dim)
        return tuple((empty, empty) for _ in range(self.num_layers))

    def forward(
        self,
        input_ids: Tensor | np.ndarray,
        attention_mask: Tensor | np.ndarray | None = None,
        position_ids: Tensor | np.ndarray | None = None,
        past: Past | None = None,
    ) -> tuple[Tensor, Past]:
        """Logits (B, T, V) fp32 and the new cache ((B, K, P + T, Q) per layer)."""
        ids = torch.as_tensor(input_ids).long().cpu()
        if ids.dim() != 2:
            raise GenloopError(f"input_ids must be (batch, seq), not {tuple(ids.shape)}")
        b, t = ids.shape
        past = self.empty_past(b) if past is None else past
        if len(past) != self.num_layers:
            raise GenloopError(f"past has {len(past)} layers; the model has {self.num_layers}")
        given = None if attention_mask is None else torch.as_tensor(attention_mask)
        mask = _mask(ids, given, int(past[0][0].shape[2]))
        pos = _positions(mask, t) if position_ids is None else torch.as_tensor(position_ids)
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids.numpy(),
            "attention_mask": mask.numpy(),
            "position_ids": pos.long().cpu().numpy(),
        }
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_values.{i}.key"] = _f32(k)
            feeds[f"past_key_values.{i}.value"] = _f32(v)
        outputs = self.session.run(None, feeds)
        logits = torch.from_numpy(outputs[0])
        present = tuple(
            (torch.from_numpy(outputs[1 + 2 * i]), torch.from_numpy(outputs[2 + 2 * i]))
            for i in range(self.num_layers)
        )
        return logits, present

    __call__ = forward


def _f32(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().contiguous().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def providers_for(device: str) -> list[Any]:
    """onnxruntime execution providers for ``cpu``, ``cuda`` or ``tensorrt``."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "tensorrt": [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ],
    }
    if device not in wanted:
        raise GenloopError(f"unknown ONNX device {device!r} (choose from: {', '.join(wanted)})")
    missing = [p for p in wanted[device][:1] if p not in available]
    if missing:
        raise GenloopError(
            f"onnxruntime here has no {missing[0]} (available: {', '.join(available)}); "
            "install onnxruntime-gpu (with TensorRT for 'tensorrt') on a GPU machine"
        )
    return [p for p in wanted[device] if p in available]


def load_onnx_lm(
    model_dir: Path, *, device: str = "cpu", threads: int | None = None
) -> OnnxCausalLM:
    """The ONNX variant in ``model_dir`` as an :class:`OnnxCausalLM`."""
    return OnnxCausalLM(Path(model_dir), device=device, threads=threads)


# --------------------------------------------------------------------------- quantized


def quantize_onnx(
    src_dir: Path, out_dir: Path, bits: str, *, block_size: int = 32
) -> dict[str, Any]:
    """An int8 (dynamic, per channel) or int4 (MatMulNBits) copy of an exported graph.

    Copies the config files; returns the description of the quantization.
    """
    import onnx

    src = Path(src_dir) / ONNX_FILE
    if not src.is_file():
        raise GenloopError(f"{src_dir} has no {ONNX_FILE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / ONNX_FILE
    if bits == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with quiet_logs(""):  # it logs a pre-processing hint on the root logger
            quantize_dynamic(
                src,
                dst,
                op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=True,
                weight_type=QuantType.QInt8,
                # protobuf caps a file at 2 GB: big graphs keep their weights beside it
                use_external_data_format=sum(p.stat().st_size for p in onnx_files(src_dir))
                > 1.5 * 2**30,
            )
        description: dict[str, Any] = {"bits": "int8", "mode": "dynamic"}
        description["tool"] = "onnxruntime.quantize_dynamic"
    elif bits == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(str(src))
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=False)
        with quiet_logs(""):
            quantizer.process()
        onnx.save_model(quantizer.model.model, str(dst))
        description = {
            "bits": "int4",
            "mode": "weight_only",
            "block_size": block_size,
            "tool": "onnxruntime MatMulNBitsQuantizer",
        }
    else:
        raise GenloopError(f"ONNX quantization takes int8 or int4, not {bits!r}")
    for name in ("config.json", "generation_config.json"):
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, out_dir / name)
    return description


@contextmanager
def quiet_logs(name: str) -> Iterator[None]:
    """Only errors from logger ``name`` ("" is the root) while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def onnx_files(model_dir: Path) -> list[Path]:
    """The graph and its external weight files."""
    return sorted(p for p in Path(model_dir).iterdir() if p.name.startswith(ONNX_FILE))


def write_meta(out_dir: Path, onnx_meta: dict[str, Any], extra: dict[str, Any]) -> None:
    """``genloop.json`` of an ONNX variant directory (before registration)."""
    meta = {"family": "causal_lm", "optimize": {**extra, "format": "onnx", "onnx": onnx_meta}}
    (out_dir / "genloop.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(src_dir: Path, out_dir: Path, names: Sequence[str] | None = None) -> None:
    from genloop.data.tokenizer import TOKENIZER_FILES

    for name in names or TOKENIZER_FILES:
        src = Path(src_dir) / name
        if src.is_file() and not src.is_symlink():
            shutil.copyfile(src, out_dir / name)
