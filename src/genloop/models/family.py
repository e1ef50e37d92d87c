"""What every model family knows, and how to find a family by name.

A family builds a network from a plain config dict, computes its default training loss on
a batch, and saves and loads its artifact directory. Text families (``causal_lm``,
``seq2seq``, ``masked_lm``) use the Hugging Face layout; image families (``vae``, ``gan``,
``diffusion``) follow the same protocol (their sampling is in ``models/image_generation.py``). Text
sampling is not a family's job (see ``serve/engine/sampling.py``), and
other objectives (SFT, DPO, …) are plain classes in ``train/objectives.py`` that call
a family's building blocks. What training makes of a family (a model sized by the model
section and the data, an objective, where it is sampled from) is ``train/families.py``.

This module stays light (no transformers import) so the CLI starts fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from genloop.errors import GenloopError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

# families whose models make images (served on /v1/images/generations, sampled by
# ``models/image_generation.py``); text ones are served by the text engines
IMAGE_FAMILIES = ("vae", "gan", "diffusion", "text_to_image")

# name -> module holding FAMILY; imported on first use.
_FAMILIES = {
    "causal_lm": "genloop.models.causal_lm",
    "seq2seq": "genloop.models.seq2seq",
    "vae": "genloop.models.vae",
    "gan": "genloop.models.gan",
    "diffusion": "genloop.models.diffusion",
    "clip": "genloop.models.clip",
    "captioning": "genloop.models.captioning",
    "autoencoder_kl": "genloop.models.autoencoder_kl",
    "text_to_image": "genloop.models.text_to_image",
    "masked_lm": "genloop.models.masked_lm",
}


@runtime_checkable
class Family(Protocol):
    """A model family. Implementations are plain classes; nothing inherits from this."""

    name: str

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        """A freshly initialised model from a plain config dict (preset, sizes, …)."""
        ...

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """The default objective's scalar loss on ``batch`` (families add keyword options)."""
        ...

    def save(
        self,
        model: nn.Module,
        out_dir: str | Path,
        *,
        tokenizer_dir: str | Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the model's artifact directory; ``extra`` goes into ``genloop.json``."""
        ...

    def load(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        trust_pickle: bool = False,
    ) -> nn.Module:
        """The model in ``path``, from safetensors (pickle only with ``trust_pickle``)."""
        ...

    def num_parameters(self, model: nn.Module, *, trainable_only: bool = False) -> int: ...


def family_names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def get_family(name: str) -> Family:
    """The family called ``name``; raises naming the known ones."""
    if name not in _FAMILIES:
        raise GenloopError(f"unknown model family {name!r} (known: {', '.join(_FAMILIES)})")
    family: Family = importlib.import_module(_FAMILIES[name]).FAMILY
    return family


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Distinct parameters of ``model`` (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
