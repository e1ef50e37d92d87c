"""What the image families share: their sizes, their artifact files and label handling.

A VAE or GAN artifact is a directory with ``config.json`` (the plain config dict that
rebuilds the network, plus ``format`` and ``format_version``) and ``model.safetensors``
(the state dict). The diffusion family keeps the diffusers layout and stores a VAE the same
way in its ``vae/`` folder. Nothing is pickled; a directory that carries a
``MANIFEST.sha256`` is verified before anything is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genloop.errors import ConflictError, GenloopError, IntegrityError, NotFoundError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
MAX_IMAGE_SIZE = 256  # the families are small convolutional networks


def down_levels(image_size: int) -> tuple[int, int]:
    """How many stride-2 steps take ``image_size`` down to at most 4 pixels (stopping at
    an odd size), and the side after them: 8 → (1, 4), 32 → (3, 4), 28 → (2, 7)."""
    if not 4 <= image_size <= MAX_IMAGE_SIZE:
        raise GenloopError(f"image_size must be between 4 and {MAX_IMAGE_SIZE}, not {image_size}")
    levels, size = 0, image_size
    while size > 4 and size % 2 == 0:
        levels, size = levels + 1, size // 2
    return levels, size


def check_labels(labels: torch.Tensor, num_classes: int | None) -> None:
    """Labels of a class-conditional model must be class ids in range."""
    if num_classes is None:
        return
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise GenloopError(f"label {bad} is out of range for a model with {num_classes} classes")


def verify_dir(path: Path) -> None:
    """Check ``path`` is a directory and, when it has a manifest, that every file matches."""
    from genloop.workspace.manifest import MANIFEST, verify_manifest

    if not path.is_dir():
        raise NotFoundError(f"model directory {path} does not exist")
    if (path / MANIFEST).is_file():
        verify_manifest(path)


def prepare_out(out: Path) -> None:
    """``out`` as a new, empty folder (an existing non-empty one is refused)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConflictError(f"{out} already exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)


def write_settings(
    out: Path,
    file_name: str,
    fmt: str,
    settings: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """genloop's settings file beside a diffusers-layout artifact's own configs:
    ``{format, format_version, **settings, **extra}``."""
    payload = {"format": fmt, "format_version": FORMAT_VERSION, **settings, **(extra or {})}
    (out / file_name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_settings(path: Path, file_name: str, fmt: str) -> dict[str, Any]:
    """The settings :func:`write_settings` wrote into ``path``, without the format keys."""
    file = path / file_name
    if not file.is_file():
        raise NotFoundError(f"{path} has no {file_name}, so it is not a {fmt} model")
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(settings, dict) or settings.get("format") != fmt:
        raise GenloopError(f"{file} is not a {fmt} settings file")
    if settings.get("format_version") != FORMAT_VERSION:
        raise GenloopError(
            f"{file}: format_version {settings.get('format_version')!r} is not supported"
        )
    return {k: v for k, v in settings.items() if k not in ("format", "format_version")}


def save_module_dir(
    module: nn.Module, out_dir: str | Path, fmt: str, config: Mapping[str, Any]
) -> Path:
    """Write ``config.json`` ({format, format_version, **config}) and ``model.safetensors``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    prepare_out(out)
    payload = {"format": fmt, "format_version": FORMAT_VERSION, **config}
    try:
        text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    except TypeError as exc:
        raise GenloopError(f"the model config must be JSON-serializable: {exc}") from None
    (out / CONFIG_FILE).write_text(text, encoding="utf-8")
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": fmt})
    return out


def read_config(path: Path, fmt: str) -> dict[str, Any]:
    """The config dict in ``path/config.json``, checked to be of format ``fmt``."""
    file = path / CONFIG_FILE
    if not file.is_file():
        raise NotFoundError(f"{path} has no {CONFIG_FILE}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != fmt:
        found = config.get("format") if isinstance(config, dict) else None
        raise GenloopError(f"{path} does not hold a {fmt} model (format: {found!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise GenloopError(
            f"{path}: format_version {config.get('format_version')!r} is not supported "
            f"(this genloop reads {FORMAT_VERSION})"
        )
    return {k: v for k, v in config.items() if k not in ("format", "format_version")}


def load_state(module: nn.Module, path: Path) -> None:
    """Load ``path/model.safetensors`` into ``module``; every key must match exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise NotFoundError(f"{path} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise IntegrityError(f"{file}: unreadable weights ({exc})") from None
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        first = str(exc).strip().splitlines()[-1].strip()
        raise IntegrityError(f"{file} does not fit its config.json ({first})") from None
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:5]}" if missing else ""
        if unexpected:
            detail += ("; " if detail else "") + f"unexpected {sorted(unexpected)[:5]}"
        raise IntegrityError(f"{file} does not fit its config.json ({detail})")


def class_names_of(config: Mapping[str, Any]) -> list[str]:
    """The label names a model was trained with (empty for an unconditional one)."""
    names = config.get("class_names") or []
    num = config.get("num_classes")
    if num is None:
        return [str(n) for n in names]
    if len(names) != num:
        return [str(i) for i in range(int(num))]
    return [str(n) for n in names]


def check_dtype(dtype: torch.dtype | str | None) -> None:
    """Image models load in float32 (they are small); another dtype is refused."""
    if dtype not in (None, "auto", "float32", "fp32", torch.float32):
        raise GenloopError(f"image models load in float32, not {dtype}")


def check_image_config(config: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Every key is present; sizes are positive; num_classes is None or ≥ 1."""
    missing = [k for k in keys if k not in config]
    if missing:
        raise GenloopError(f"image model config is missing {', '.join(missing)}")
    down_levels(int(config["image_size"]))
    if config["channels"] not in (1, 3):
        raise GenloopError(f"channels must be 1 or 3, not {config['channels']}")
    num = config.get("num_classes")
    if num is not None and (not isinstance(num, int) or num < 1):
        raise GenloopError(f"num_classes must be a positive integer or null, not {num!r}")
