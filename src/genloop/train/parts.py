"""The models a config trains before its own (``parts``), and their refs put in place.

Stable Diffusion is trained in stages: the autoencoder first, then the text encoder, then
the UNet on the frozen autoencoder's latents, conditioned on the frozen text encoder. A
config says so with ``parts``; the main model (or a later part) names a part by
``part:NAME`` wherever it takes a model ref::

    parts:
      vae:  {model: {family: vae, ...},  train: {objective: vae, ...}}
    model:
      family: diffusion
      diffusion: {latent_vae: part:vae}

    cfg, refs = train_parts(ws, cfg, train, model_name="digits-ldm")
    # refs == {"vae": "digits-ldm-vae@1"}; cfg.model.diffusion.latent_vae == "digits-ldm-vae@1"

Every part trains on the main model's dataset version (prepared once, here). A part whose
newest version was trained from the same model and train sections on the same dataset
version is reused, not trained again, so re-running a pipeline after changing only the
UNet's settings retrains only the UNet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from genloop.config import PART_PREFIX, GenloopConfig, ModelConfig
from genloop.errors import ConfigError
from genloop.workspace.workspace import Workspace

# the train section's keys that say how a run is driven, not what it trains
_RUN_KEYS = {"dataset", "resume", "log_to"}

Say = Callable[[str], None]


class TrainFn(Protocol):
    """``genloop.train.loop.train`` (passed in: the loop calls this module first)."""

    def __call__(
        self,
        ws: Workspace,
        cfg: GenloopConfig,
        *,
        model_name: str,
        root: Path | None,
        trust_pickle: bool,
    ) -> Any: ...


def part_model_name(name: str, part: str) -> str:
    """The name a part is registered under."""
    return f"{name}-{part}"


def with_parts(cfg: GenloopConfig, refs: Mapping[str, str]) -> GenloopConfig:
    """``cfg`` with every ``part:NAME`` in its model section replaced by the part's ref."""
    return cfg.model_copy(update={"model": resolve_model(cfg.model, refs)})


def resolve_model(model: ModelConfig, refs: Mapping[str, str]) -> ModelConfig:
    def put(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(PART_PREFIX):
            part = value[len(PART_PREFIX) :]
            if part not in refs:
                raise ConfigError(f"{value}: no such part has been trained")
            return refs[part]
        if isinstance(value, dict):
            return {k: put(v) for k, v in value.items()}
        if isinstance(value, list):
            return [put(v) for v in value]
        return value

    return ModelConfig.model_validate(put(model.model_dump()))


def train_parts(
    ws: Workspace,
    cfg: GenloopConfig,
    train: TrainFn,
    *,
    model_name: str,
    root: Path | None = None,
    say: Say | None = None,
    trust_pickle: bool = False,
) -> tuple[GenloopConfig, dict[str, str]]:
    """Train (or reuse) each part in order; returns ``cfg`` on the dataset version they
    used, with the part refs in place, and the refs (part name → ``NAME@VERSION``)."""
    if not cfg.parts:
        return cfg, {}
    cfg = _on_one_dataset(ws, cfg, root)
    refs: dict[str, str] = {}
    for part, section in cfg.parts.items():
        name = part_model_name(model_name, part)
        part_cfg = cfg.model_copy(
            update={
                "name": name,
                "parts": {},
                "model": resolve_model(section.model, refs),
                "train": section.train.model_copy(update={"dataset": cfg.train.dataset}),
            },
            deep=True,
        )
        found = _trained_before(ws, name, part_cfg)
        if found is not None:
            refs[part] = found
            if say is not None:
                say(f"part {part}: {found} (same config and data: reused)")
            continue
        if say is not None:
            say(f"part {part}: training {name}")
        result = train(ws, part_cfg, model_name=name, root=root, trust_pickle=trust_pickle)
        assert result.model is not None
        refs[part] = result.model.ref
    return with_parts(cfg, refs), refs


def _on_one_dataset(ws: Workspace, cfg: GenloopConfig, root: Path | None) -> GenloopConfig:
    """``cfg`` with ``train.dataset`` set: the version its data section prepares (once)."""
    if cfg.train.dataset is not None:
        return cfg
    if cfg.data is None:
        raise ConfigError("parts need a data section or train.dataset to train on")
    from genloop.data.prepare import prepare_dataset

    info, _ = prepare_dataset(ws, cfg.data, cfg.tokenizer, root=root)  # captions: tokenized
    train = cfg.train.model_copy(update={"dataset": info.ref})
    return cfg.model_copy(update={"train": train})


def _what_trains(config: Mapping[str, Any]) -> tuple[Any, Any]:
    train = {k: v for k, v in config.get("train", {}).items() if k not in _RUN_KEYS}
    return config.get("model"), train


def _trained_before(ws: Workspace, name: str, cfg: GenloopConfig) -> str | None:
    """The newest version of ``name`` trained from ``cfg``'s model and train sections on
    its dataset version, if any."""
    from genloop.workspace import registry, runs
    from genloop.workspace.datasets import resolve_dataset

    assert cfg.train.dataset is not None
    dataset_id = resolve_dataset(ws, cfg.train.dataset).id
    wanted = _what_trains(cfg.model_dump(mode="json"))
    for info in sorted(registry.list_models(ws, name), key=lambda v: -v.version):
        if info.run_id is None or info.dataset_version_id != dataset_id:
            continue
        run = runs.get_run(ws, info.run_id)
        if run.status == "completed" and _what_trains(run.config) == wanted:
            return info.ref
    return None
