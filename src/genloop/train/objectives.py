"""Training objectives: what a batch is and what loss it gives.

An objective owns its data stream (resumable by micro-step, so ``--resume`` continues
exactly) and its loss; the loop in ``loop.py`` is the same for all of them.

- ``lm``: next-token prediction on packed token shards (pretraining).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from genloop.config import GenloopConfig

Batch = dict[str, "Tensor"]


class Objective(Protocol):
    name: str

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Endless micro-batches from micro-step ``start`` on (deterministic)."""
        ...

    def val_batches(self, n: int) -> list[Batch]:
        """The first ``n`` validation batches (the same every evaluation)."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        """Mean loss over the batch's target tokens, and how many tokens it trained on."""
        ...


@dataclass
class LanguageModeling:
    """Pretraining: windows of ``seq_len`` tokens from the packed shards; x → y = x shifted."""

    tokens_dir: Path
    seq_len: int
    batch_size: int
    seed: int
    device: torch.device
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    name: str = "lm"

    def _dataset(self, split: str):  # type: ignore[no-untyped-def]
        from genloop.data.pack import TokenDataset

        return TokenDataset(self.tokens_dir, split, self.seq_len)

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        import torch

        ds = self._dataset("train")
        for x, y in ds.batches(self.batch_size, self.seed, start, rank=rank, world_size=world_size):
            yield {
                "input_ids": torch.from_numpy(x).to(self.device),
                "targets": torch.from_numpy(y).to(self.device),
            }

    def val_batches(self, n: int) -> list[Batch]:
        import torch

        from genloop.errors import GenloopError

        try:
            ds = self._dataset("val")
        except GenloopError:
            return []
        if len(ds) == 0:
            return []
        out = []
        # a fixed, evenly spread sample of windows: comparable across evaluations
        count = min(len(ds), n * self.batch_size)
        idx = [int(i * len(ds) / count) for i in range(count)]
        for b in range(0, count, self.batch_size):
            pairs = [ds[i] for i in idx[b : b + self.batch_size]]
            x = torch.stack([torch.from_numpy(p[0]) for p in pairs]).to(self.device)
            y = torch.stack([torch.from_numpy(p[1]) for p in pairs]).to(self.device)
            out.append({"input_ids": x, "targets": y})
        return out

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        from genloop.models.token_loss import token_loss

        logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V)
        loss = token_loss(
            logits, batch["targets"], label_smoothing=self.label_smoothing, z_loss_coef=self.z_loss
        )
        return loss, batch["targets"].numel()


def make_objective(
    name: str,
    cfg: GenloopConfig,
    data_dir: Path,
    tokenizer_dir: Path | None,
    model: nn.Module,
    device: torch.device,
) -> Objective:
    """The objective ``train.objective`` names, for objectives other than ``lm``."""
    from genloop.errors import GenloopError

    raise GenloopError(f"objective {name!r} is not available for this model family yet")
