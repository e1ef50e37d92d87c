"""Import a local diffusers Stable-Diffusion pipeline folder as a ``text_to_image`` version.

``genloop models import PATH`` comes here when ``PATH`` holds ``model_index.json``
(:func:`genloop.models.importer.plan_import` dispatches). The guarantees are the causal-LM
import's: the whole folder is checked before anything is written, and a problem is a
:class:`~genloop.errors.GenloopError` naming the file, leaving the catalog and the store as
they were::

    model_index.json   _class_name StableDiffusionPipeline; every component a diffusers or
                       transformers class genloop knows (no custom pipeline or component)
    unet/              UNet2DConditionModel: config.json + weights whose every tensor fits it
    vae/               AutoencoderKL, the same
    text_encoder/      CLIPTextModel, the same (a sharded index's shards all present)
    tokenizer/         a CLIP tokenizer: tokenizer.json, or vocab.json + merges.txt (then
                       tokenizer.json is made from them by transformers, offline)
    scheduler/         a diffusers scheduler; the noise schedule genloop samples with
    safety_checker/, feature_extractor/, image_encoder/   left out (and said so)

Pickle weights (``*.bin``) are refused unless ``trust_pickle``; then they are read with
``torch.load(weights_only=True)`` and written as safetensors. No Python file anywhere in the
folder is accepted: genloop never runs code that comes with a model.

The imported folder is the ``text_to_image`` artifact (see ``models/text_to_image.py``):
each model's weights in one safetensors file (shards are joined), ``scheduler/`` rewritten
for the sampler genloop uses (DDPM, DDIM or DPM-Solver; any other scheduler, such as SD's
PNDM, samples with DDIM on the same noise schedule, and the lineage says so), and
``text_to_image.json`` with genloop's settings. ``genloop generate``, serving and the
family's ``load`` then use it like a pipeline genloop trained, and diffusers' own
``StableDiffusionPipeline.from_pretrained`` still loads it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genloop.errors import GenloopError
from genloop.models.checkpoint_files import Progress
from genloop.workspace.manifest import file_sha256
from genloop.workspace.registry import ModelVersionInfo, register_model
from genloop.workspace.workspace import Workspace

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "StableDiffusionPipeline"
# component -> (library, class names accepted)
COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "tokenizer": (
        "transformers",
        ("CLIPTokenizer", "CLIPTokenizerFast", "PreTrainedTokenizerFast"),
    ),
    "scheduler": ("diffusers", ()),  # any diffusers scheduler class (checked below)
}
DROPPED = {
    "safety_checker": "the safety checker is not part of genloop's pipeline",
    "feature_extractor": "only the safety checker reads it",
    "image_encoder": "IP-Adapter image prompts are not supported",
}
# weight file stems per component: (safetensors stem, pickle stem)
WEIGHT_STEMS = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": ("model", "pytorch_model"),
}
SAMPLERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpm"}
GUIDANCE = 7.5  # StableDiffusionPipeline's default
TOP_LEVEL_KEPT = ("README.md", "LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING")


@dataclass(frozen=True)
class Weights:
    """One model's weight files as found: ``files`` are the tensors' files (shards in
    order), ``index`` the shard index (read, never copied)."""

    part: str
    format: str  # "safetensors" or "pickle"
    files: tuple[Path, ...]
    index: Path | None
    out_name: str  # the single safetensors file it becomes


@dataclass(frozen=True)
class PipelinePlan:
    """A checked pipeline folder: what is copied, converted, written and recorded."""

    source: Path
    name: str
    family: str
    copy: tuple[tuple[Path, str], ...]  # (file, path inside the artifact)
    weights: tuple[Weights, ...]
    scheduler: dict[str, Any]  # the scheduler/ config to write (for the sampler)
    model_index: dict[str, Any]
    settings: dict[str, Any]  # text_to_image.json
    tokenizer_from: tuple[str, ...]  # slow tokenizer files tokenizer.json is made from
    skipped: tuple[str, ...]
    parameters: int
    total_bytes: int
    lineage: dict[str, Any] = field(default_factory=dict)


def is_pipeline_dir(path: Path) -> bool:
    """Whether ``path`` looks like a diffusers pipeline folder (it has model_index.json)."""
    return (path / MODEL_INDEX).is_file()


def plan_pipeline_import(
    source: Path,
    *,
    name: str,
    trust_pickle: bool = False,
    license: str | None = None,
    model_card: str | None = None,
) -> PipelinePlan:
    """Check the pipeline folder ``source`` (resolved) completely; nothing is written."""
    from genloop.models.checkpoint_files import read_json as _read_json

    index = _read_json(source / MODEL_INDEX, missing="so it is not a diffusers pipeline")
    cls = index.get("_class_name")
    _refuse_code(source)
    if cls != PIPELINE_CLASS:
        raise GenloopError(
            f"{source / MODEL_INDEX}: the pipeline class is {cls!r}; genloop imports "
            f"{PIPELINE_CLASS} folders only (a custom or other pipeline class would need its "
            "own code, which genloop never runs)"
        )
    classes, skipped = _components(source, index)
    configs = {
        part: _read_json(source / part / "config.json", missing=f"so the {part} part is incomplete")
        for part in ("unet", "vae", "text_encoder")
    }
    scheduler_file = source / "scheduler" / "scheduler_config.json"
    scheduler_src = _read_json(scheduler_file, missing="so the scheduler part is incomplete")
    for part, config in configs.items():
        _refuse_auto_map(source / part / "config.json", config)
    _check_classes(source, configs, scheduler_src, classes)
    weights = tuple(_find_weights(source / part, part, trust_pickle) for part in WEIGHT_STEMS)
    parameters = 0
    for w in weights:
        parameters += _check_weights(w, configs[w.part], source / w.part)
    _check_fit(source, configs)
    sampler, scheduler, notes = _scheduler_for(scheduler_file, scheduler_src)
    tokenizer_from = _check_tokenizer(source / "tokenizer")

    copy: list[tuple[Path, str]] = []
    for part in ("unet", "vae", "text_encoder"):
        copy.append((source / part / "config.json", f"{part}/config.json"))
    for p in sorted((source / "tokenizer").iterdir()):
        if p.is_file() and not p.name.startswith("."):
            if p.suffix in (".json", ".txt", ".model", ".jinja"):
                copy.append((p, f"tokenizer/{p.name}"))
            else:
                skipped.append(f"tokenizer/{p.name} (not a tokenizer file)")
    for p in sorted(source.iterdir()):
        if p.name.startswith(".") or p.name == MODEL_INDEX or p.name in COMPONENTS:
            continue
        if p.name in TOP_LEVEL_KEPT and p.is_file():
            copy.append((p, p.name))
        elif p.name not in DROPPED:
            kind = "folder" if p.is_dir() else "not part of the pipeline"
            skipped.append(f"{p.name}{'/' if p.is_dir() else ''} ({kind})")
    for part in ("unet", "vae", "text_encoder"):
        used = {f.name for w in weights if w.part == part for f in w.files}
        used |= {w.index.name for w in weights if w.part == part and w.index is not None}
        for p in sorted((source / part).iterdir()):
            if p.name not in used and p.name != "config.json" and not p.name.startswith("."):
                skipped.append(f"{part}/{p.name} (not the weights imported)")
    unet = configs["unet"]
    settings = {
        "base_channels": int(unet["block_out_channels"][0]),
        "layers_per_block": int(unet.get("layers_per_block", 2)),
        "timesteps": int(scheduler.get("num_train_timesteps", 1000)),
        "beta_schedule": str(scheduler.get("beta_schedule", "linear")),
        "sampler": sampler,
        "sample_steps": 25 if sampler == "dpm" else 50,
        "guidance_scale": GUIDANCE,
        "cond_drop_prob": 0.1,
        "latent_vae": None,
        "text_encoder": None,
    }
    out_index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": index.get("_diffusers_version"),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", _scheduler_class(sampler)],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", classes["tokenizer"]],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    total = sum(p.stat().st_size for p, _ in copy) + sum(
        f.stat().st_size for w in weights for f in w.files
    )
    lineage = {
        "source": str(source),
        "model_type": "stable-diffusion",
        "architecture": PIPELINE_CLASS,
        "architectures": {part: cls for part, cls in sorted(classes.items())},
        "license": license,
        "model_card": model_card,
        "sampler": sampler,
        "notes": notes,
    }
    return PipelinePlan(
        source=source,
        name=name,
        family="text_to_image",
        copy=tuple(copy),
        weights=weights,
        scheduler=scheduler,
        model_index=out_index,
        settings=settings,
        tokenizer_from=tokenizer_from,
        skipped=tuple(skipped),
        parameters=parameters,
        total_bytes=total,
        lineage=lineage,
    )


def register_pipeline_plan(
    ws: Workspace,
    plan: PipelinePlan,
    *,
    progress: Progress | None = None,
    tags: dict[str, Any] | None = None,
) -> ModelVersionInfo:
    """Write the checked pipeline into the store as the next version of ``plan.name``
    (``tags`` are added to the version's ``source: import``)."""
    from genloop.models.checkpoint_files import copy_hashing as _copy_hashing
    from genloop.models.image_io import write_settings
    from genloop.models.text_to_image import FORMAT, SETTINGS_FILE, make_scheduler

    source = plan.source
    with ws.store.scratch() as scratch:
        staged = scratch / "model"
        staged.mkdir()
        hashes: dict[str, str] = {}
        for src, rel in plan.copy:
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            hashes[_rel(src, source)] = _copy_hashing(src, staged / rel, progress)
        parameters = plan.parameters
        converted: list[str] = []
        for w in plan.weights:
            count, read = _write_weights(w, staged / w.part, progress)
            hashes.update({_rel(p, source): digest for p, digest in read.items()})
            if w.index is not None:
                hashes[_rel(w.index, source)] = file_sha256(w.index)
            if w.format == "pickle":
                parameters += count
                converted += [_rel(p, source) for p in w.files]
        if plan.tokenizer_from:
            from transformers import AutoTokenizer

            made = scratch / "tokenizer"
            tok = AutoTokenizer.from_pretrained(str(source / "tokenizer"), local_files_only=True)
            tok.save_pretrained(str(made))
            shutil.move(made / "tokenizer.json", staged / "tokenizer" / "tokenizer.json")
        make_scheduler(plan.settings["sampler"], plan.scheduler).save_pretrained(
            staged / "scheduler"
        )
        hashes[_rel(source / MODEL_INDEX, source)] = file_sha256(source / MODEL_INDEX)
        scheduler_src = source / "scheduler" / "scheduler_config.json"
        hashes[_rel(scheduler_src, source)] = file_sha256(scheduler_src)
        (staged / MODEL_INDEX).write_text(json.dumps(plan.model_index, indent=2) + "\n")
        write_settings(staged, SETTINGS_FILE, FORMAT, plan.settings)
        lineage = plan.lineage | {
            "files": dict(sorted(hashes.items())),
            "parameters": parameters,
            "converted_from_pickle": converted,
            "tokenizer_converted_from": [f"tokenizer/{n}" for n in plan.tokenizer_from],
            "skipped": list(plan.skipped),
        }
        return register_model(
            ws,
            plan.name,
            plan.family,
            staged,
            config={"import": lineage, "model": dict(plan.settings)},
            tags={"source": "import", **(tags or {})},
            description=f"imported from {source}",
            link_files=True,
        )


# ------------------------------------------------------------------------- checks


def _rel(path: Path, source: Path) -> str:
    return path.relative_to(source).as_posix()


def _refuse_code(source: Path) -> None:
    """No Python file anywhere in the folder: a pipeline that ships code needs it to load."""
    code = sorted(
        _rel(p, source)
        for p in source.rglob("*.py")
        if not any(part.startswith(".") for part in p.relative_to(source).parts)
    )
    if code:
        raise GenloopError(
            f"{source} ships Python code ({', '.join(code[:5])}): a pipeline with custom code "
            "needs it to load, and genloop never runs code that comes with a model"
        )


def _refuse_auto_map(path: Path, config: Mapping[str, Any]) -> None:
    if "auto_map" in config:
        raise GenloopError(
            f"{path} has an auto_map: it needs custom code to load, which genloop never runs"
        )


def _components(source: Path, index: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """The class of each required component; the components left out, with the reason."""
    classes: dict[str, str] = {}
    skipped: list[str] = []
    file = source / MODEL_INDEX
    for key, value in sorted(index.items()):
        if key.startswith("_") or key == "requires_safety_checker":
            continue
        if not (isinstance(value, list | tuple) and len(value) == 2):
            raise GenloopError(f"{file}: {key} is {value!r}, not [library, class]")
        library, cls = value
        if library is None and cls is None:
            continue
        if key in DROPPED:
            skipped.append(f"{key}/ ({DROPPED[key]})")
            continue
        if key not in COMPONENTS:
            raise GenloopError(
                f"{file}: unknown component {key!r} ({library}.{cls}); genloop imports a "
                f"{PIPELINE_CLASS} of {', '.join(COMPONENTS)}"
            )
        expected_lib, accepted = COMPONENTS[key]
        if library != expected_lib or (accepted and cls not in accepted):
            want = " or ".join(f"{expected_lib}.{c}" for c in accepted) or f"a {expected_lib} class"
            raise GenloopError(
                f"{file}: {key} is {library}.{cls}, expected {want} (a custom component would "
                "need its own code, which genloop never runs)"
            )
        classes[key] = str(cls)
    missing = [k for k in COMPONENTS if k not in classes]
    if missing:
        raise GenloopError(f"{file} names no {', '.join(missing)}: the pipeline is incomplete")
    for key in COMPONENTS:
        if not (source / key).is_dir():
            raise GenloopError(f"{source / key} is missing: the pipeline is incomplete")
    return classes, skipped


def _check_classes(
    source: Path,
    configs: Mapping[str, Mapping[str, Any]],
    scheduler: Mapping[str, Any],
    classes: Mapping[str, str],
) -> None:
    """Each part's own config names the class model_index.json does."""
    import diffusers

    for part in ("unet", "vae"):
        named = configs[part].get("_class_name")
        if named is not None and named != classes[part]:
            raise GenloopError(
                f"{source / part / 'config.json'} is a {named}, model_index.json says "
                f"{classes[part]}"
            )
    text = configs["text_encoder"]
    archs = text.get("architectures") or []
    if text.get("model_type") not in ("clip_text_model", "clip") and "CLIPTextModel" not in archs:
        raise GenloopError(
            f"{source / 'text_encoder' / 'config.json'} is not a CLIPTextModel config "
            f"(model_type {text.get('model_type')!r})"
        )
    cls = scheduler.get("_class_name")
    if cls != classes["scheduler"]:
        raise GenloopError(
            f"{source / 'scheduler' / 'scheduler_config.json'} is a {cls!r}, model_index.json "
            f"says {classes['scheduler']}"
        )
    found = getattr(diffusers, str(cls), None)
    if not (isinstance(found, type) and issubclass(found, diffusers.SchedulerMixin)):
        raise GenloopError(
            f"{source / 'scheduler' / 'scheduler_config.json'}: {cls!r} is not a diffusers "
            "scheduler (a custom one would need its own code, which genloop never runs)"
        )


def _find_weights(part_dir: Path, part: str, trust_pickle: bool) -> Weights:
    """The weights of one model folder: a safetensors file or index, else (trusted) pickles."""
    from genloop.models.pretrained import _member, _shards

    stem, pickle_stem = WEIGHT_STEMS[part]
    out = f"{stem}.safetensors"
    if (part_dir / out).is_file():
        return Weights(part, "safetensors", (part_dir / out,), None, out)
    if (part_dir / f"{out}.index.json").is_file():
        index, *shards = _shards(part_dir, f"{out}.index.json")
        return Weights(part, "safetensors", tuple(shards), index, out)
    pickles = (
        [part_dir / f"{pickle_stem}.bin"] if (part_dir / f"{pickle_stem}.bin").is_file() else []
    )
    pickle_index: Path | None = None
    if not pickles and (part_dir / f"{pickle_stem}.bin.index.json").is_file():
        pickle_index = part_dir / f"{pickle_stem}.bin.index.json"
        try:
            listed = sorted(set(json.loads(pickle_index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise GenloopError(f"{pickle_index} is not a valid weight index: {exc}") from None
        for shard in listed:
            member = _member(part_dir, str(shard))
            if member is None:
                raise GenloopError(
                    f"{pickle_index} lists {shard!r}, which is not a file in {part_dir}"
                )
            pickles.append(member)
    if pickles:
        if not trust_pickle:
            shown = ", ".join(p.name for p in pickles)
            raise GenloopError(
                f"{part_dir} holds only pickle-based weights ({shown}); pickle files can run "
                "code when opened, so genloop refuses them. If you trust their source, import "
                "with --trust-pickle: they are read with torch.load(weights_only=True) and "
                "converted to safetensors"
            )
        return Weights(part, "pickle", tuple(pickles), pickle_index, out)
    others = sorted(p.name for p in part_dir.glob("*.safetensors"))
    hint = f" (found {', '.join(others)}, not under the standard name)" if others else ""
    raise GenloopError(f"{part_dir} has no {out} or {out}.index.json{hint}")


def _check_weights(w: Weights, config: Mapping[str, Any], part_dir: Path) -> int:
    """Every safetensors file complete, the index's tensors where it says, every tensor of
    the model built from ``config`` present with its shape and no others; the parameter
    count (0 for pickles, counted when converted)."""
    from genloop.models.checkpoint_files import safetensors_header as _header
    from genloop.security.safe_load import check_safetensors

    if w.format == "pickle":
        return 0
    check_safetensors(w.files)
    headers = {p.name: _header(p) for p in w.files}
    if w.index is not None:
        weight_map = json.loads(w.index.read_text(encoding="utf-8"))["weight_map"]
        for tensor, shard in sorted(weight_map.items()):
            if tensor not in headers.get(Path(shard).name, {}):
                raise GenloopError(
                    f"{w.index} says tensor {tensor!r} is in {shard}, but {part_dir / shard} "
                    "does not hold it: the shard is corrupt or from another model"
                )
    shapes = {
        k: tuple(int(d) for d in v.get("shape", [])) for h in headers.values() for k, v in h.items()
    }
    _compare(w.part, part_dir, expected_shapes(w.part, part_dir, config), shapes)
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


# buffers older checkpoints store and current versions do not (they are rebuilt)
IGNORED_EXTRA = ("text_model.embeddings.position_ids",)


def _compare(
    part: str,
    part_dir: Path,
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
) -> None:
    missing = sorted(k for k in expected if k not in found)
    extra = sorted(k for k in found if k not in expected and k not in IGNORED_EXTRA)
    wrong = sorted(k for k in expected if k in found and found[k] != expected[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} tensors it does not have (e.g. {extra[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape (e.g. {k}: {found[k]}, expected {expected[k]})"
            )
        raise GenloopError(
            f"{part_dir}: the weights do not fit {part}/config.json: {'; '.join(parts)}"
        )


def expected_shapes(
    part: str, part_dir: Path, config: Mapping[str, Any]
) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of ``part`` built from its config on the meta device (no
    memory, no weights)."""
    import torch

    try:
        with torch.device("meta"):
            if part == "text_encoder":
                from transformers import CLIPTextConfig, CLIPTextModel

                model: Any = CLIPTextModel(
                    CLIPTextConfig.from_pretrained(str(part_dir), local_files_only=True)
                )
            else:
                import diffusers

                cls = getattr(
                    diffusers, "UNet2DConditionModel" if part == "unet" else "AutoencoderKL"
                )
                model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except (TypeError, ValueError, KeyError, AttributeError, OSError) as exc:
        raise GenloopError(f"{part_dir / 'config.json'} does not build a model: {exc}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_fit(source: Path, configs: Mapping[str, Mapping[str, Any]]) -> None:
    """The parts fit each other: the UNet attends to the text encoder's states and denoises
    the autoencoder's latents."""
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    if unet.get("cross_attention_dim") != text.get("hidden_size"):
        raise GenloopError(
            f"{source}: the UNet attends to {unet.get('cross_attention_dim')}-wide text states, "
            f"the text encoder makes {text.get('hidden_size')}"
        )
    if unet.get("in_channels") != vae.get("latent_channels", 4):
        raise GenloopError(
            f"{source}: the UNet takes {unet.get('in_channels')} channels, the autoencoder's "
            f"latents have {vae.get('latent_channels', 4)}"
        )


def _scheduler_for(file: Path, config: Mapping[str, Any]) -> tuple[str, dict[str, Any], list[str]]:
    """The sampler genloop uses for the pipeline's scheduler, the config to write, notes."""
    cls = str(config.get("_class_name"))
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    notes = []
    sampler = SAMPLERS.get(cls)
    if sampler is None:
        sampler = "ddim"
        notes.append(
            f"the pipeline's {cls} is not one of genloop's samplers (DDPM, DDIM, DPM-Solver): "
            "it samples with DDIM on the same noise schedule (DDIMScheduler.from_config of it)"
        )
    if public.get("prediction_type", "epsilon") != "epsilon":
        notes.append(
            f"the UNet predicts {public['prediction_type']!r}: it samples, but genloop "
            "fine-tunes ε-prediction models only"
        )
    # what StableDiffusionPipeline.__init__ corrects in an old scheduler config, so the
    # same seed draws the same images as diffusers' pipeline
    if public.get("steps_offset", 1) != 1:
        public["steps_offset"] = 1
        notes.append("steps_offset set to 1, as diffusers' pipeline does")
    if public.get("clip_sample", sampler == "ddim" or sampler == "ddpm"):
        public["clip_sample"] = False  # DDIM and DDPM default to True; latents are unbounded
    try:
        from genloop.models.text_to_image import make_scheduler

        scheduler = dict(make_scheduler(sampler, public).config)
    except (TypeError, ValueError, NotImplementedError) as exc:  # diffusers: unknown beta_schedule
        raise GenloopError(f"{file}: the noise schedule does not build: {exc}") from None
    return sampler, {k: v for k, v in scheduler.items() if not k.startswith("_")}, notes


def _scheduler_class(sampler: str) -> str:
    from genloop.models.text_to_image import SCHEDULERS

    return SCHEDULERS[sampler]


def _check_tokenizer(tokenizer_dir: Path) -> tuple[str, ...]:
    """A fast tokenizer loads from ``tokenizer_dir``, offline and without code; the slow
    files ``tokenizer.json`` is to be made from (none when it is there)."""
    from transformers import AutoTokenizer

    config = tokenizer_dir / "tokenizer_config.json"
    if config.is_file():
        from genloop.models.checkpoint_files import read_json as _read_json

        _refuse_auto_map(config, _read_json(config, missing=""))
    has_json = (tokenizer_dir / "tokenizer.json").is_file()
    slow = tuple(n for n in ("vocab.json", "merges.txt") if (tokenizer_dir / n).is_file())
    if not has_json and len(slow) < 2:
        raise GenloopError(
            f"{tokenizer_dir} holds neither tokenizer.json nor a CLIP tokenizer's vocab.json "
            "and merges.txt"
        )
    try:
        tok = AutoTokenizer.from_pretrained(
            str(tokenizer_dir), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # transformers raises many kinds; the message says which
        raise GenloopError(
            f"{tokenizer_dir}: the tokenizer does not load ({str(exc).strip()[:200]})"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise GenloopError(f"{tokenizer_dir}: transformers has no fast version of it")
    return () if has_json else slow


# ------------------------------------------------------------------------- writing


def _write_weights(
    w: Weights, out_dir: Path, progress: Progress | None
) -> tuple[int, dict[Path, str]]:
    """One safetensors file for the model in ``out_dir``: the single safetensors file
    copied, or shards joined, or pickles converted; the parameter count and the SHA-256 of
    each file read."""
    from safetensors.torch import load_file, save_file

    from genloop.models.checkpoint_files import copy_hashing as _copy_hashing

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / w.out_name
    if w.format == "safetensors" and len(w.files) == 1 and w.index is None:
        return 0, {w.files[0]: _copy_hashing(w.files[0], target, progress)}
    read = {p: file_sha256(p) for p in w.files}
    if w.format == "safetensors":
        state = {}
        for p in w.files:
            state.update(load_file(str(p)))
    else:
        from genloop.security.safe_load import load_state_dict

        state = {}
        for p in w.files:  # torch.load(weights_only=True), in the one place that loads weights
            state.update(load_state_dict(p, trust_pickle=True))
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
        _compare(w.part, w.files[0].parent, expected_shapes(w.part, out_dir, config), shapes)
    # a plain copy of each tensor: save_file refuses tensors that share memory
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(target))
    if progress is not None:
        progress(sum(p.stat().st_size for p in w.files))
    return sum(v.numel() for v in state.values()), read
