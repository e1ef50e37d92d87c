"""``genloop optimize``: compress and export a model version, top to bottom.

    1. the parent     ``registry.resolve``, its verified directory, loaded once (fp32, CPU)
    2. the data       ``--dataset``, else the parent's training dataset (needed by
                      distillation, recovery fine-tuning and the perplexity of the report)
    3. distill        a student of a smaller preset from the parent's logits     → version
    4. prune          magnitude or structured, then optional recovery steps      → version
    5. quantize       int8 (dynamic / weight-only) or int4 weight-only, PyTorch  → version
    6. export         ONNX with the cache, verified against PyTorch              → version
                      and, with --quantize, an onnxruntime-quantized copy        → version
    7. report         every variant measured side by side; with a budget the fastest
                      within it is picked (and promoted with --promote)

Steps chain: a distilled student is what gets pruned, the pruned model is what gets
quantized and exported. Every output is a new version of the parent's name whose
``parent`` is the model it was made from, with ``config.optimize`` (and ``genloop.json``)
describing the transform and ``tags.optimize`` naming it (``int8-dynamic``, ``onnx``…).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genloop.config import OptimizeConfig
from genloop.errors import GenloopError
from genloop.workspace import registry
from genloop.workspace.workspace import Workspace

if TYPE_CHECKING:
    from torch import Tensor, nn
    from transformers import PreTrainedModel

    from genloop.optimize.tradeoff import TradeoffReport, Workload
    from genloop.workspace.datasets import DatasetVersionInfo
    from genloop.workspace.registry import ModelVersionInfo

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (what, step, total)

TRAIN_BATCH = 8  # sequences per distillation / recovery step
DISTILL_LR = 1e-3
RECOVERY_LR = 1e-4


@dataclass
class OptimizeResult:
    parent: str
    variants: list[ModelVersionInfo] = field(default_factory=list)
    report: TradeoffReport | None = None
    picked: str | None = None
    promoted: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "parent": self.parent,
            "variants": [
                {"ref": v.ref, "parent": v.parent, "transform": v.tags.get("optimize")}
                for v in self.variants
            ],
            "report": self.report.to_dict() if self.report is not None else None,
            "picked": self.picked,
            "promoted": self.promoted,
        }


@dataclass
class _Current:
    """The model the next step starts from."""

    model: PreTrainedModel
    info: ModelVersionInfo
    model_dir: Path  # its artifact directory (tokenizer files are copied from it)


def optimize_model(
    ws: Workspace,
    ref: str,
    cfg: OptimizeConfig,
    *,
    dataset: str | None = None,
    report: bool = False,
    workload: Workload | None = None,
    isolate: bool = True,
    alias: str = "production",
    device: str = "cpu",
    progress: ProgressFn | None = None,
) -> OptimizeResult:
    """Run the transforms ``cfg`` asks for on model ``ref``; each output is registered.

    ``report`` (or a ``cfg.budget``) measures the parent and the new variants (with no
    transform: the parent's whole lineage) side by side; ``isolate`` measures each in its
    own process. ``device`` is where distillation and recovery train (``cpu`` or ``cuda``).
    """
    from genloop.optimize.tradeoff import parse_budget

    transforms = bool(cfg.distill or cfg.prune or cfg.quantize or cfg.export)
    if not transforms and not report and not cfg.budget:
        raise GenloopError(
            "nothing to do: give --quantize, --prune, --distill or --export (any mix), or "
            "--report / --budget to compare the existing variants"
        )
    if cfg.promote and not cfg.budget:
        raise GenloopError("--promote needs --budget: the budget decides what to promote")
    if cfg.prune_structured and cfg.prune is None:
        raise GenloopError("--structured needs --prune AMOUNT")
    if cfg.recovery_steps and cfg.prune is None:
        raise GenloopError("--recovery-steps fine-tunes after pruning: give --prune AMOUNT")
    if cfg.quantize == "int4" and cfg.quantize_mode == "dynamic":
        if "quantize_mode" in cfg.model_fields_set:  # asked for, not the int8 default
            raise GenloopError("int4 quantization is weight-only: use --quantize-mode weight_only")
        cfg = cfg.model_copy(update={"quantize_mode": "weight_only"})
    if cfg.budget:
        parse_budget(cfg.budget)  # a bad budget fails before hours of work

    # 1. the parent
    parent = registry.resolve(ws, ref)
    if parent.family != "causal_lm":
        raise GenloopError(
            f"{parent.ref} is a {parent.family} model; optimize supports causal_lm models"
        )
    result = OptimizeResult(parent=parent.ref)
    parent_dir = ws.store.open_verified(parent.artifact)

    # 2. the data, when a step needs it
    needs_data = bool(cfg.distill) or cfg.recovery_steps > 0
    ds = _dataset(ws, dataset, parent, required=needs_data)

    if transforms:
        current = _Current(_load(parent_dir, parent), parent, parent_dir)
        # 3. distill
        if cfg.distill:
            assert ds is not None
            current = _distill(ws, current, cfg, ds, device, progress)
            result.variants.append(current.info)
        # 4. prune
        if cfg.prune is not None:
            current = _prune(ws, current, cfg, ds, device, progress)
            result.variants.append(current.info)
        # 5. quantize (PyTorch)
        if cfg.quantize:
            result.variants.append(_quantize(ws, current, cfg, progress))
        # 6. export
        if cfg.export == "onnx":
            result.variants.extend(_export(ws, current, cfg, progress))

    # 7. the trade-off report and the budget
    if report or cfg.budget:
        from genloop.optimize.tradeoff import tradeoff_report

        def measuring(what: str, i: int, n: int) -> None:
            if progress is not None:
                progress(f"measuring {what}", i, n)

        variants = [parent, *result.variants] if result.variants else None
        result.report = tradeoff_report(
            ws,
            parent.ref,
            variants=variants,
            dataset=ds.ref if ds is not None else None,
            workload=workload,
            budget=cfg.budget,
            isolate=isolate,
            progress=measuring,
        )
        result.picked = result.report.picked
        if cfg.promote and result.picked is not None:
            promoted = registry.promote(
                ws, result.picked, alias, actor="optimize", reason=f"budget {cfg.budget}"
            )
            result.promoted = f"{promoted.name}@{alias} → {promoted.ref}"
            result.report.promoted = result.promoted
    return result


# ---------------------------------------------------------------------------- the steps


def _distill(
    ws: Workspace,
    current: _Current,
    cfg: OptimizeConfig,
    ds: DatasetVersionInfo,
    device: str,
    progress: ProgressFn | None,
) -> _Current:
    from genloop.optimize.distill import build_student, distill, student_config

    assert cfg.distill is not None
    teacher = current.model
    _move(teacher, device)
    student = build_student(teacher, cfg.distill)
    losses = distill(
        teacher,
        student,
        _batches(ws, ds, device),
        cfg.distill_steps,
        temperature=cfg.distill_temperature,
        alpha=cfg.distill_alpha,
        lr=DISTILL_LR,
        progress=_steps(progress, f"distilling into {cfg.distill}"),
    )
    _move(teacher, "cpu")
    _move(student, "cpu")
    spec = {
        "transform": f"distill-{cfg.distill}",
        "preset": cfg.distill,
        "teacher": current.info.ref,
        "steps": cfg.distill_steps,
        "temperature": cfg.distill_temperature,
        "alpha": cfg.distill_alpha,
        "lr": DISTILL_LR,
        "batch_size": TRAIN_BATCH,
        "dataset": ds.ref,
    }
    info = _register_torch(
        ws,
        current,
        student,
        spec,
        metrics={"distill_loss": losses[-1]},
        model_config=student_config(teacher, cfg.distill),
        dataset_version_id=ds.id,
    )
    return _Current(student, info, ws.store.open_verified(info.artifact))


def _prune(
    ws: Workspace,
    current: _Current,
    cfg: OptimizeConfig,
    ds: DatasetVersionInfo | None,
    device: str,
    progress: ProgressFn | None,
) -> _Current:
    from genloop.optimize import prune

    assert cfg.prune is not None
    _require_float(current)
    if progress is not None:
        progress(f"pruning {cfg.prune:.0%}", 0, 1)
    if cfg.prune_structured:
        model, details = prune.structured_prune(current.model, cfg.prune)
        masks = None
        name = f"prune-structured-{cfg.prune:g}"
    else:
        import copy

        model = copy.deepcopy(current.model)
        details = prune.magnitude_prune(model, cfg.prune)
        masks = prune.weight_masks(model)
        name = f"prune-{cfg.prune:g}"
    metrics: dict[str, Any] = {}
    if cfg.recovery_steps:
        assert ds is not None
        _move(model, device)
        if masks is not None:
            masks = {k: m.to(device) for k, m in masks.items()}
        losses = prune.recover(
            model,
            _batches(ws, ds, device),
            cfg.recovery_steps,
            lr=RECOVERY_LR,
            masks=masks,
            progress=_steps(progress, "recovery fine-tuning"),
        )
        _move(model, "cpu")
        metrics["recovery_loss"] = losses[-1]
        details["recovery"] = {"steps": cfg.recovery_steps, "lr": RECOVERY_LR, "dataset": ds.ref}
    if not cfg.prune_structured:
        details["sparsity"] = prune.sparsity(model)  # measured after recovery too
        metrics["sparsity"] = details["sparsity"]
    else:
        metrics["head_sparsity"] = details["head_sparsity"]
        metrics["channel_sparsity"] = details["channel_sparsity"]
    spec = {"transform": name, "source": current.info.ref, **details}
    model_config = dict(current.info.config.get("model") or {})
    if cfg.prune_structured:
        model_config.update(
            n_head=model.config.num_attention_heads,
            n_kv_head=model.config.num_key_value_heads,
            intermediate_size=model.config.intermediate_size,
        )
    info = _register_torch(ws, current, model, spec, metrics=metrics, model_config=model_config)
    return _Current(model, info, ws.store.open_verified(info.artifact))


def _quantize(
    ws: Workspace, current: _Current, cfg: OptimizeConfig, progress: ProgressFn | None
) -> ModelVersionInfo:
    import copy

    from genloop.optimize.quantize import quantize_model, save_quantized, scheme_name

    assert cfg.quantize is not None
    _require_float(current)
    name = scheme_name(cfg.quantize, cfg.quantize_mode)
    if progress is not None:
        progress(f"quantizing ({name})", 0, 1)
    model = copy.deepcopy(current.model)
    description = quantize_model(model, cfg.quantize, cfg.quantize_mode)
    spec = {"transform": name, "source": current.info.ref}
    with ws.store.scratch() as tmp:
        out = save_quantized(
            model, tmp / "model", description, tokenizer_dir=current.model_dir, extra=spec
        )
        return _register(ws, current, out, {**spec, "quantization": description}, {})


def _export(
    ws: Workspace, current: _Current, cfg: OptimizeConfig, progress: ProgressFn | None
) -> list[ModelVersionInfo]:
    from genloop.optimize.onnx import copy_tokenizer, export_onnx, quantize_onnx, write_meta

    _require_float(current)
    if progress is not None:
        progress("exporting to ONNX", 0, 1)
    out: list[ModelVersionInfo] = []
    with ws.store.scratch() as tmp:
        onnx_dir = tmp / "onnx"
        meta = export_onnx(current.model, onnx_dir)
        copy_tokenizer(current.model_dir, onnx_dir)
        spec = {"transform": "onnx", "source": current.info.ref}
        write_meta(onnx_dir, meta, spec)
        metrics = {"onnx_max_abs_diff": meta["verification"]["max_abs_diff"]}
        onnx_info = _register(
            ws, current, onnx_dir, {**spec, "format": "onnx", "onnx": meta}, metrics
        )
        out.append(onnx_info)
        if cfg.quantize:
            if progress is not None:
                progress(f"quantizing the ONNX graph ({cfg.quantize})", 0, 1)
            q_dir = tmp / "onnx-q"
            quant = quantize_onnx(onnx_dir, q_dir, cfg.quantize)
            copy_tokenizer(current.model_dir, q_dir)
            q_meta = {**meta, "weights": cfg.quantize, "quantization": quant}
            q_meta.pop("verification", None)
            q_spec = {"transform": f"onnx-{cfg.quantize}", "source": onnx_info.ref}
            write_meta(q_dir, q_meta, q_spec)
            onnx_current = _Current(current.model, onnx_info, onnx_dir)
            out.append(
                _register(ws, onnx_current, q_dir, {**q_spec, "format": "onnx", "onnx": q_meta}, {})
            )
    return out


# ------------------------------------------------------------------------------ helpers


def _register_torch(
    ws: Workspace,
    current: _Current,
    model: PreTrainedModel,
    spec: dict[str, Any],
    *,
    metrics: dict[str, Any],
    model_config: dict[str, Any] | None = None,
    dataset_version_id: int | None = None,
) -> ModelVersionInfo:
    from genloop.models.causal_lm import FAMILY

    with ws.store.scratch() as tmp:
        out = tmp / "model"
        FAMILY.save(model, out, tokenizer_dir=current.model_dir, extra={"optimize": spec})
        return _register(
            ws,
            current,
            out,
            spec,
            metrics,
            model_config=model_config,
            dataset_version_id=dataset_version_id,
        )


def _register(
    ws: Workspace,
    current: _Current,
    source: Path,
    spec: dict[str, Any],
    metrics: dict[str, Any],
    *,
    model_config: dict[str, Any] | None = None,
    dataset_version_id: int | None = None,
) -> ModelVersionInfo:
    """A new version of the parent's name; ``config.optimize`` describes the transform."""
    config: dict[str, Any] = {"optimize": spec}
    model_cfg = model_config if model_config is not None else current.info.config.get("model")
    if model_cfg:
        config["model"] = model_cfg
    info = registry.register_model(
        ws,
        current.info.name,
        "causal_lm",
        source,
        parent=current.info.ref,
        dataset_version_id=dataset_version_id or current.info.dataset_version_id,
        config=config,
        metrics=metrics,
        tags={"optimize": spec["transform"]},
        description=f"{spec['transform']} of {current.info.ref}",
    )
    log.debug("registered %s (%s of %s)", info.ref, spec["transform"], current.info.ref)
    return info


def _load(model_dir: Path, info: ModelVersionInfo) -> PreTrainedModel:
    from genloop.models.pretrained import load_pretrained, variant_format

    if variant_format(model_dir) == "onnx":
        raise GenloopError(
            f"{info.ref} is an ONNX variant; optimize its PyTorch parent ({info.parent}) instead"
        )
    _quiet_transformers()
    model = load_pretrained(model_dir, family="causal_lm", device="cpu", dtype="float32")
    return model


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # we show our own


def _move(model: PreTrainedModel, device: str) -> None:
    module: nn.Module = model  # nn.Module's typed to (transformers wraps it)
    module.to(device)


def _require_float(current: _Current) -> None:
    from genloop.models.quantized import is_quantized

    if is_quantized(current.model):
        raise GenloopError(
            f"{current.info.ref} is already quantized; prune, quantize or export its float "
            f"parent ({current.info.parent}) instead"
        )


def _dataset(
    ws: Workspace, ref: str | None, info: ModelVersionInfo, *, required: bool
) -> DatasetVersionInfo | None:
    from genloop.workspace.datasets import get_dataset_version, resolve_dataset

    if ref is not None:
        return resolve_dataset(ws, ref)
    if info.dataset_version_id is not None:
        return get_dataset_version(ws, info.dataset_version_id)
    if required:
        raise GenloopError(
            f"{info.ref} records no training dataset, and distillation and recovery "
            "fine-tuning train on one: give --dataset NAME[@VERSION]"
        )
    return None


def _batches(ws: Workspace, ds: DatasetVersionInfo, device: str) -> Iterator[dict[str, Tensor]]:
    """Endless training batches (``input_ids``, ``targets``) from the dataset's windows."""
    import torch

    from genloop.train.objectives import LanguageModeling

    data_dir = ws.store.open_verified(ds.artifact)
    tok = ds.stats.get("tokenizer") or (ds.config.get("tokenizer") or {})
    seq_len = tok.get("seq_len") if isinstance(tok, dict) else None
    if not (data_dir / "tokens").is_dir() or not isinstance(seq_len, int):
        raise GenloopError(
            f"dataset {ds.ref} has no token shards; prepare it with a tokenizer section"
        )
    objective = LanguageModeling(data_dir / "tokens", seq_len, TRAIN_BATCH, 0, torch.device(device))
    return objective.train_batches(0)


def _steps(progress: ProgressFn | None, what: str) -> Callable[[int, int, float], None] | None:
    if progress is None:
        return None

    def report(step: int, total: int, loss: float) -> None:
        progress(f"{what} (loss {loss:.3f})", step, total)

    return report
