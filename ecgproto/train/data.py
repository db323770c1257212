"""Batches from the memory-mapped store: only a batch of records is ever read into memory.

Shuffling and augmentation are seeded per (seed, epoch), so an epoch is the same whether a run
went straight through or resumed from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ecgproto.data.store import ArrayStore


@dataclass
class Batch:
    x: torch.Tensor  # (B, 12, n) float32 mV
    y: torch.Tensor  # (B, 71) float32 multi-hot
    index: np.ndarray  # positions in the split (0..len-1)
    beats: torch.Tensor  # (B, K) int64 beat positions in samples, -1 padded (after the same time roll as x)


class SplitData:
    """One split of a store: its rows, labels and record ids."""

    def __init__(self, store: ArrayStore, split: str) -> None:
        if store.labels is None:
            raise ValueError(f"{store.path}: store has no labels; training needs a PTB-XL-layout store")
        m = store.manifest
        m = m[m["split"] == split].sort_values("row")
        if m.empty:
            raise ValueError(f"{store.path}: split {split!r} is empty; check the strat_fold column of the dataset")
        self.store, self.split = store, split
        self.rows = m["row"].to_numpy()
        self.record_ids = m["record_id"].astype(str).to_numpy()

    def __len__(self) -> int:
        return len(self.rows)

    @cached_property
    def labels(self) -> np.ndarray:
        """(N, 71) uint8, small enough to hold."""
        assert self.store.labels is not None
        return np.asarray(self.store.labels[self.rows])

    def signals(self, index: np.ndarray) -> np.ndarray:
        """(len(index), 12, n) float32 read from the memmap (sorted reads, original order kept)."""
        index = np.asarray(index)
        order = np.argsort(self.rows[index], kind="stable")
        out = np.empty((len(index), *self.store.signals.shape[1:]), dtype=np.float32)
        out[order] = self.store.signals[self.rows[index][order]]
        return out

    def beats(self, index: np.ndarray) -> np.ndarray:
        """(len(index), K) int64 beat positions of the records at `index`, -1 padded."""
        return np.asarray(self.store.beats[self.rows[np.asarray(index)]], dtype=np.int64)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        time_roll: bool = False,
        label_index: np.ndarray | None = None,
        part: tuple[int, int] = (0, 1),
    ) -> Iterator[Batch]:
        """Batches of `batch_size` records; with part=(rank, world) only this rank's slice of each batch
        (the same draws as one process makes, so `world` ranks together see exactly its batches)."""
        rank, world = part
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            shifts = rng.integers(0, self.store.signals.shape[-1], len(idx)) if time_roll else None
            if world > 1:
                mine = np.array_split(np.arange(len(idx)), world)[rank]
                idx = idx[mine]
                shifts = shifts[mine] if shifts is not None else None
            x, beats = self.signals(idx), self.beats(idx)
            if shifts is not None:
                n = x.shape[-1]
                cols = (np.arange(n)[None, :] - shifts[:, None]) % n
                x = np.take_along_axis(x, cols[:, None, :], axis=-1)
                # beats move with their samples (a window around one may now cross the wrap point: branches that
                # crop beats train without the roll, see ecgproto.train.stages)
                beats = np.where(beats >= 0, (beats + shifts[:, None]) % n, -1)
                beats = np.sort(np.where(beats >= 0, beats, n), axis=1)
                beats[beats == n] = -1
            y = self.labels[idx] if label_index is None else self.labels[idx][:, label_index]
            yield Batch(torch.from_numpy(x), torch.from_numpy(y.astype(np.float32)), idx, torch.from_numpy(beats))
