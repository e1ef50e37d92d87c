"""What an image feature extractor is: the one type the image metrics and every extractor
(the dataset's classifier, InceptionV3 in ``evaluate/inception.py``) share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class Extractor:
    """Images → features (FID, KID) and logits (IS); ``id`` names it in every report."""

    id: str
    kind: str  # "classifier" | "inception"
    features: Callable[[Tensor], Tensor]  # uint8 (N, C, H, W) → (N, F)
    logits: Callable[[Tensor], Tensor]  # uint8 (N, C, H, W) → (N, K)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def suffix(self) -> str:
        """What metric names carry: nothing for the dataset classifier, ``_inception``."""
        return "" if self.kind == "classifier" else f"_{self.kind}"
