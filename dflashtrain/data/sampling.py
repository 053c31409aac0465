"""Which rows each rank trains on, in what order, and the random draws of each row: all of it reproducible from the
seed alone, so that a resumed run and a run on another number of ranks see exactly the same batches and blocks.

* :class:`GlobalBatchSampler` cuts one shuffled order of the whole dataset per epoch into global batches of
  ``world_size × batch_size`` rows; rank r takes the r-th slice of each. W ranks with batch b therefore train on the
  very batches one process with batch W·b trains on. The position (epoch, global batches done) is its whole state.
* :class:`RowGenerators` gives each row of a batch its own ``torch.Generator``, seeded by (seed, epoch, the row's
  dataset index): the anchors of a row (and the VP drafter's prefix lengths) do not depend on which rank or which
  batch the row landed in, nor on how far the batch was padded.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, List, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class GlobalBatchSampler(Sampler[List[int]]):
    """Batches of dataset indices for one rank. Epoch e's order is a permutation seeded by (seed, e) (or 0..n−1
    without shuffling); global batch g is ``order[g·W·b : (g+1)·W·b]``, the last one completed by wrapping around to
    the start of the same order, so every rank always gets exactly b rows."""

    def __init__(self, num_rows: int, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int):
        if num_rows < 1:
            raise ValueError("the dataset has no rows")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_rows, self.batch_size, self.shuffle, self.seed = num_rows, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0  # global batches of this epoch already trained on (set by a resume)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Global batches per epoch (the same on every rank)."""
        return -(-self.num_rows // self.global_batch_size)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def set_position(self, epoch: int, batches_done: int) -> None:
        """Resume: the next iteration starts at global batch ``batches_done`` of ``epoch``."""
        self.epoch, self.start = epoch, batches_done

    def order(self) -> List[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.epoch))
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def __iter__(self) -> Iterator[List[int]]:
        order = self.order()
        size = self.global_batch_size
        padded = order * (-(-size // len(order)) + 1)  # enough to complete the last global batch
        start, self.start = self.start, 0  # the resume position applies to one iteration only
        for g in range(start, len(self)):
            first = g * size + self.rank * self.batch_size
            yield padded[first:first + self.batch_size]


class RowGenerators:
    """One generator per row of a batch, on the batch's device, seeded by (seed, epoch, row key)."""

    def __init__(self, seed: int, epoch: int, row_keys: Sequence[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(stream_seed(seed, epoch, key))
                           for key in row_keys]
        self.device = device

    def uniform(self, width: int) -> Tensor:
        """[b, width] uniform in [0, 1); row i from its own generator (the same values whatever the batch)."""
        return torch.stack([torch.rand(width, generator=g, device=self.device) for g in self.generators])

    def multinomial(self, probs: Tensor, num_samples: int) -> Tensor:
        """[b, num_samples] draws with replacement from ``probs`` [L], row i from its own generator."""
        return torch.stack([torch.multinomial(probs, num_samples, replacement=True, generator=g)
                            for g in self.generators])
