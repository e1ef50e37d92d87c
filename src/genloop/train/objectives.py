"""Training objectives: what a batch is and what loss it gives.

An objective owns its data stream (resumable by micro-step, so ``--resume`` continues
exactly) and its loss; the loop in ``loop.py`` is the same for all of them. Each family's
builder (``families.py``) makes the objective ``train.objective`` names.

- ``lm``: next-token prediction on packed token shards (pretraining).
- ``sft``: supervised fine-tuning on prompt → response pairs, loss on the response only.
- ``dpo``: direct preference optimisation on (prompt, chosen, rejected) triples.
- ``span_corruption``: T5's seq2seq pretraining on the token shards
  (``span_corruption.py``).
- ``vae``, ``gan``, ``diffusion``: the image families' losses (``images.py``).

SFT and DPO read a pairs dataset (``genloop.data.pairs``), its rows tokenized into
examples by ``examples.py``. :func:`batch_indices` is the data order of every objective
whose examples sit in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from genloop.errors import GenloopError
from genloop.train.examples import IGNORE_INDEX, Example, collate

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

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


def spread_batches(size: int, n: int, batch_size: int) -> list[list[int]]:
    """Indices of up to ``n`` validation batches: a fixed sample spread evenly over ``size``
    windows, the same at every evaluation, so that evaluations compare."""
    count = min(size, n * batch_size)
    idx = [int(i * size / count) for i in range(count)]
    return [idx[b : b + batch_size] for b in range(0, count, batch_size)]


def batch_indices(
    n: int, batch_size: int, seed: int, start: int, *, rank: int = 0, world_size: int = 1
) -> Iterator[list[int]]:
    """Endless batches of example indices, as ``TokenDataset.batches`` orders windows.

    Micro-step ``s`` takes positions ``[s·B·W, (s+1)·B·W)`` of the concatenated epoch
    permutations (fixed by ``(seed, epoch)``) and rank ``r`` keeps its ``B`` of them, so
    ``start=k`` yields exactly what an uninterrupted run yielded from step ``k`` on.
    """
    import numpy as np

    if n < 1 or batch_size < 1 or start < 0 or not 0 <= rank < world_size:
        raise ValueError(
            f"need n ≥ 1, batch_size ≥ 1, start ≥ 0 and 0 ≤ rank < world_size; got "
            f"{n}, {batch_size}, {start}, {rank}, {world_size}"
        )
    per_step = batch_size * world_size
    pos = start * per_step + rank * batch_size
    epoch, perm = -1, np.empty(0, dtype=np.int64)
    while True:
        idx = []
        for j in range(batch_size):
            e, k = divmod(pos + j, n)
            if e != epoch:
                epoch, perm = e, np.random.default_rng([seed, e]).permutation(n)
            idx.append(int(perm[k]))
        yield idx
        pos += per_step


# ------------------------------------------------------------------------- objectives


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

        try:
            ds = self._dataset("val")
        except GenloopError:
            return []
        if len(ds) == 0:
            return []
        out = []
        for chunk in spread_batches(len(ds), n, self.batch_size):
            pairs = [ds[i] for i in chunk]
            x = torch.stack([torch.from_numpy(p[0]) for p in pairs]).to(self.device)
            y = torch.stack([torch.from_numpy(p[1]) for p in pairs]).to(self.device)
            out.append({"input_ids": x, "targets": y})
        return out

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        from genloop.models.fused_loss import can_fuse, fused_lm_loss
        from genloop.models.token_loss import token_loss

        eps, c, y = self.label_smoothing, self.z_loss, batch["targets"]
        if can_fuse(model):  # lm_head and the loss a chunk at a time, no full logits
            loss = fused_lm_loss(model, batch["input_ids"], y, label_smoothing=eps, z_loss_coef=c)
        else:
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V)
            loss = token_loss(logits, y, label_smoothing=eps, z_loss_coef=c)
        return loss, batch["targets"].numel()


@dataclass
class SupervisedFineTuning:
    """SFT: cross-entropy on the response tokens only; the prompt and padding are masked."""

    train: list[Example]
    val: list[Example]
    batch_size: int
    seed: int
    device: torch.device
    pad_id: int
    encoder_decoder: bool = False
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    name: str = "sft"

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        order = batch_indices(
            len(self.train), self.batch_size, self.seed, start, rank=rank, world_size=world_size
        )
        for idx in order:
            yield collate([self.train[i] for i in idx], self.pad_id, self.device)

    def val_batches(self, n: int) -> list[Batch]:
        count, b = min(len(self.val), n * self.batch_size), self.batch_size
        return [collate(self.val[i : i + b], self.pad_id, self.device) for i in range(0, count, b)]

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        if self.encoder_decoder:
            from genloop.models.seq2seq import seq2seq_loss as family_loss

            targets = batch["labels"]  # (B, T): decoder position t predicts labels[:, t]
        else:
            from genloop.models.causal_lm import lm_loss as family_loss

            targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
        loss = family_loss(
            model, batch, label_smoothing=self.label_smoothing, z_loss_coef=self.z_loss
        )
        return loss, int((targets != IGNORE_INDEX).sum())


def sequence_logps(model: nn.Module, batch: Batch) -> Tensor:
    """log π(response | prompt) of each row (B,): next-token log-probs summed over the
    positions whose label is not -100."""
    import torch.nn.functional as F

    from genloop.models.causal_lm import forward_logits, next_token_targets

    logits = forward_logits(model, batch)[:, :-1]  # (B, T-1, V)
    targets = next_token_targets(batch)  # (B, T-1)
    nll = F.cross_entropy(  # (B, T-1), 0 where the target is -100
        logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.sum(dim=-1)


Reference = Callable[[Batch], "Tensor"]  # a batch → the reference model's sequence_logps


def frozen_reference(model: nn.Module) -> Reference:
    """A frozen copy of ``model`` as it is now (eval mode, no gradients) as the reference."""
    import copy

    import torch

    ref = copy.deepcopy(model).eval().requires_grad_(False)

    def logps(batch: Batch) -> Tensor:
        with torch.no_grad():
            return sequence_logps(ref, batch)

    return logps


def adapter_free_reference(model: nn.Module) -> Reference:
    """A LoRA model's base as the reference: the same module with its adapters switched
    off (peft's ``disable_adapter``), so the weights are not held twice."""
    import torch

    def logps(batch: Batch) -> Tensor:
        was_training = model.training
        model.eval()  # no dropout in the reference pass
        try:
            with torch.no_grad(), model.disable_adapter():  # type: ignore[operator]
                return sequence_logps(model, batch)
        finally:
            model.train(was_training)

    return logps


@dataclass
class DirectPreference:
    """DPO (Rafailov et al., 2023) for causal LMs:

        L = -log σ(β·[(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))])

    with log π(y|x) summed over the response tokens. ``label_smoothing`` ε assumes a
    fraction ε of the preferences are flipped (conservative DPO):
    (1-ε)·L(h) + ε·L(-h). A batch holds the B chosen sequences, then the B rejected ones:
    2B rows padded together, one forward pass.
    """

    train: list[tuple[Example, Example]]
    val: list[tuple[Example, Example]]
    batch_size: int
    seed: int
    device: torch.device
    pad_id: int
    reference: Reference
    beta: float = 0.1
    label_smoothing: float = 0.0
    name: str = "dpo"

    def _collate(self, pairs: Sequence[tuple[Example, Example]]) -> Batch:
        return collate([c for c, _ in pairs] + [r for _, r in pairs], self.pad_id, self.device)

    def train_batches(self, start: int, *, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        order = batch_indices(
            len(self.train), self.batch_size, self.seed, start, rank=rank, world_size=world_size
        )
        for idx in order:
            yield self._collate([self.train[i] for i in idx])

    def val_batches(self, n: int) -> list[Batch]:
        count, b = min(len(self.val), n * self.batch_size), self.batch_size
        return [self._collate(self.val[i : i + b]) for i in range(0, count, b)]

    def margins(self, model: nn.Module, batch: Batch) -> Tensor:
        """h/β per pair (B,): how much more the policy than the reference prefers chosen."""
        import torch

        policy_c, policy_r = sequence_logps(model, batch).chunk(2)
        with torch.no_grad():
            ref_c, ref_r = self.reference(batch).chunk(2)
        return (policy_c - ref_c) - (policy_r - ref_r)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        import torch.nn.functional as F

        h = self.beta * self.margins(model, batch)  # (B,)
        eps = self.label_smoothing
        loss = -(1.0 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
        return loss.mean(), int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
