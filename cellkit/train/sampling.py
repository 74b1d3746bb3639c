"""The trainer's batch plan: seeded per epoch, split by rank, optionally bucketed by length."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from .._errors import ConfigError

__all__ = ["EpochBatchSampler"]


class EpochBatchSampler(Sampler[list[int]]):
    """Global batches of a map-style dataset; each rank takes its equal share of every batch.

    The order depends only on ``(seed, epoch)``, so a run with one process and a run with
    ``world_size`` processes see the same global batches, and a resumed run can skip the batches
    it already did (:meth:`skip`).

    Parameters
    ----------
    n
        Number of cells.
    batch_size
        Cells per global batch (all ranks together); must be divisible by ``world_size``.
    shuffle
        Shuffle differently every epoch.
    seed
        Seed of the shuffling.
    rank, world_size
        This process's share.
    drop_last
        Drop the last, incomplete global batch. When kept, it is split as evenly as possible.
    lengths
        ``(n,)`` tokens per cell: cells of similar length are batched together (chunks of
        ``bucket_size`` batches are sorted by length; the batch order is shuffled).
    bucket_size
        Batches per length-sorted chunk.
    lockstep
        Training under DDP: every rank must run the same number of steps, so a last batch with
        fewer cells than ranks is left out. Evaluation (``False``) keeps every cell.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        lengths: Sequence[int] | np.ndarray | None = None,
        bucket_size: int = 50,
        lockstep: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        if batch_size % world_size:
            raise ConfigError(
                f"batch_size ({batch_size}) is the global batch over all {world_size} processes and must be "
                "divisible by their number."
            )
        if lengths is not None and len(lengths) != n:
            raise ConfigError(f"lengths has {len(lengths)} entries for {n} cells.")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.bucket_size, self.lockstep = bucket_size, lockstep
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, n_batches: int) -> None:
        """Leave out the first ``n_batches`` of the current epoch (resuming mid-epoch)."""
        self.start = int(n_batches)

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """Every global batch of ``epoch`` (cell indices)."""
        epoch = self.epoch if epoch is None else epoch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        # int32 positions below 2**31 cells (half the memory of an atlas's epoch plan); torch draws
        # the same permutation, and leaves the generator in the same state, for either dtype
        dtype = (torch.int32, np.int32) if self.n < 2**31 else (torch.int64, np.int64)
        order = (
            torch.randperm(self.n, generator=g, dtype=dtype[0]).numpy()
            if self.shuffle
            else np.arange(self.n, dtype=dtype[1])
        )
        bs = self.batch_size
        if self.lengths is not None:
            chunk = bs * self.bucket_size
            order = np.concatenate(
                [
                    part[np.argsort(self.lengths[part], kind="stable")]
                    for part in (order[i : i + chunk] for i in range(0, self.n, chunk))
                ]
                or [order]
            )
        batches = [order[i : i + bs] for i in range(0, self.n, bs)]
        if batches and self.drop_last and len(batches[-1]) < bs:
            batches.pop()
        if self.lengths is not None and self.shuffle and len(batches) > 1:
            perm = torch.randperm(len(batches), generator=g).numpy()
            batches = [batches[i] for i in perm]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.global_batches()[self.start :]:
            if len(b) < self.world_size and self.lockstep:  # too small to give every rank a cell
                continue
            share = np.array_split(b, self.world_size)[self.rank]
            if len(share):
                yield share.tolist()
        self.start = 0

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        last = bool(rest) and not self.drop_last and (rest >= self.world_size or not self.lockstep)
        return full + int(last) - self.start
