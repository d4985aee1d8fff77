"""A seeded, resumable, DDP-aware stream of micro-batch indices."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class ResumableBatchSampler:
    """Infinite stream of this process's micro-batches of dataset indices.

    Global micro-batch `m` (batch_size * num_processes samples) is block `m` of the
    concatenated epoch permutations, epoch e being `default_rng([seed, e]).permutation(n)`; the
    incomplete tail of an epoch is dropped so every process always gets a full batch. Process r
    takes the r-th `batch_size` slice of each global micro-batch, so the union over processes is
    exactly what one process with batch_size * num_processes would see.

    The whole position is `m`, the number of global micro-batches consumed: the trainer counts
    them itself (DataLoader workers prefetch ahead of what was trained on) and resumes with
    `start=m`. Datasets must be deterministic in the index (or seed any randomness from it).
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int, rank: int = 0,
                 num_processes: int = 1, start: int = 0) -> None:  # fmt: skip
        self.n, self.batch_size, self.seed = dataset_len, batch_size, seed
        self.rank, self.num_processes, self.start = rank, num_processes, start
        self.per_epoch = dataset_len // (batch_size * num_processes)
        if self.per_epoch == 0:
            raise ValueError(
                f"dataset of {dataset_len} samples is smaller than one global micro-batch "
                f"({batch_size} x {num_processes} processes)"
            )

    def position(self, micro_batches: int) -> tuple[int, int]:
        """(epoch, global micro-batch index within the epoch) after `micro_batches` consumed."""
        return divmod(micro_batches, self.per_epoch)

    def __iter__(self) -> Iterator[list[int]]:
        m, epoch, perm = self.start, -1, np.empty(0, dtype=np.int64)
        while True:
            e, i = self.position(m)
            if e != epoch:  # one permutation per epoch, made lazily
                epoch, perm = e, np.random.default_rng([self.seed, e]).permutation(self.n)
            lo = (i * self.num_processes + self.rank) * self.batch_size
            yield perm[lo : lo + self.batch_size].tolist()
            m += 1
