"""What the loop trains, per family: one place turns a model section into a model, an
objective and a sampler.

    builder = get_builder(model_cfg.family)
    model, model_config, parent = builder.build_model(ws, model_cfg, data, device)
    objective = builder.make_objective(train_cfg, data, model, device)
    builder.sampler     # where the trained model is sampled from ("module:function")

Builders take plain arguments: the model section (``ModelConfig``), the train section
(``TrainConfig``) and :class:`TrainingData` (the dataset version's folders and sequence
length), never the whole config, so ``loop.py`` is the same for every family. The network
side of a family (build from a config dict, loss, save, load) is ``genloop.models.family``.

Adding a family: a module with a ``BUILDERS`` dict (family name → builder, see
``text.py`` and ``images.py``), and its name here in ``_BUILDERS``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from genloop.errors import ConfigError, GenloopError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from genloop.config import ModelConfig, TrainConfig
    from genloop.train.objectives import Objective
    from genloop.workspace.workspace import Workspace

# family -> module holding BUILDERS[family]; imported on first use
_BUILDERS = {
    "causal_lm": "genloop.train.text",
    "seq2seq": "genloop.train.text",
    "vae": "genloop.train.images",
    "gan": "genloop.train.images",
    "diffusion": "genloop.train.images",
    "clip": "genloop.train.multimodal",
    "captioning": "genloop.train.captioning",
    "autoencoder_kl": "genloop.train.text_to_image",
    "text_to_image": "genloop.train.text_to_image",
    "masked_lm": "genloop.train.encoders",
}


@dataclass(frozen=True)
class TrainingData:
    """The dataset version a run trains on, as the builders see it."""

    ref: str  # NAME@VERSION, for messages
    dir: Path  # its verified artifact directory
    tokenizer_dir: Path | None  # its tokenizer/ (text datasets)
    seq_len: int  # tokenizer.seq_len: lm windows, the least context, seq2seq lengths
    image_normalize: str | None = None  # data.images.normalize, when the config has data


class BuiltModel(NamedTuple):
    model: nn.Module  # on the device
    config: dict[str, Any]  # what rebuilds it (registered with the version)
    parent: str | None  # the model ref it continues from, if any


class Builder(Protocol):
    """A family as the training loop sees it. Implementations are plain classes."""

    family: str
    sampler: str  # "module:function" that samples a trained model (not imported here)

    def build_model(
        self,
        ws: Workspace,
        m: ModelConfig,
        data: TrainingData,
        device: torch.device,
        *,
        trust_pickle: bool = False,
    ) -> BuiltModel:
        """The model to train: from scratch, sized by ``m`` and the data, or ``m.base_model``."""
        ...

    def make_objective(
        self, t: TrainConfig, data: TrainingData, model: nn.Module, device: torch.device
    ) -> Objective:
        """The objective ``t.objective`` names, on ``data``, for ``model`` (before wrapping)."""
        ...


def builder_names() -> tuple[str, ...]:
    return tuple(_BUILDERS)


def get_builder(family: str) -> Builder:
    """The builder of ``family``; raises naming the known ones."""
    if family not in _BUILDERS:
        raise GenloopError(f"unknown model family {family!r} (known: {', '.join(_BUILDERS)})")
    builder: Builder = importlib.import_module(_BUILDERS[family]).BUILDERS[family]
    return builder


def wrong_family(objective: str) -> ConfigError:
    """The error for a family's builder asked for an objective of other families."""
    from genloop.config import OBJECTIVE_FAMILIES

    families = " or ".join(OBJECTIVE_FAMILIES.get(objective, ()))
    return ConfigError(f"train.objective {objective} needs model.family {families}")


def base_model_dir(ws: Workspace, base: str) -> tuple[Path, str | None]:
    """A local checkpoint directory (and no parent), or a model ref resolved in the
    registry (and its ref)."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path, None
    from genloop.workspace import registry

    info = registry.resolve(ws, base)
    return ws.store.open_verified(info.artifact), info.ref
