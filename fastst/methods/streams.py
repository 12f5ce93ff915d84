"""Endless, seeded, resumable batch streams over a data set.

A stream visits its data set epoch after epoch; epoch e is ``torch.randperm(N)`` drawn from a
generator seeded with ``derive_seed(seed, e)``, cut into ``N // batch_size`` full batches (the
rest of the epoch is dropped, as ``drop_last``). Before each epoch the data set's ``set_epoch(e)``
is called, so its seeded augmentations (fastst.data) change per epoch, and a fresh DataLoader is
made for that epoch alone: no worker can prefetch an item under another epoch's seed. Batch k of
the stream is therefore a pure function of (seed, k), which is what makes a resumed run equal to
an uninterrupted one: ``batches(start=k)`` continues exactly where batch k - 1 left off.

In a run of ``world_size`` processes (``fastst.distributed``) every rank draws the same epoch
order and the same global batches of ``batch_size`` items; rank r takes the r-th of
``world_size`` equal consecutive slices of each, ``batch_size / world_size`` items (which must
divide evenly). The ranks together thus see exactly the batches of a one-process run, batch k
of each rank is still a pure function of (seed, k, rank, world_size), and resumption stays exact.
(torch's DistributedSampler would deal the items of an epoch round-robin instead and pad the
epoch with repeats; slicing each global batch keeps the one-process batches and drop_last.)
"""
import hashlib
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["derive_seed", "BatchStream"]


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (run seed, stage name, role, epoch, ...): the same
    in every process and every run, and unrelated for different parts."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BatchStream:
    """Batches of ``batch_size`` items of ``dataset`` in a seeded order, forever (this rank's
    ``batch_size / world_size`` of each in a multi-process run).

    Args:
        dataset: a map-style data set (fastst.data items are dicts, collated by the default
            collate function); ``set_epoch`` is called when it has one.
        batch_size: items per (global) batch; the data set must hold at least this many.
        seed: the order seed; epoch e uses ``derive_seed(seed, e)``.
        workers, pin_memory: passed to each epoch's DataLoader.
        shuffle: False visits every epoch in index order (for tests and inspection).
        rank, world_size: this process's share of each batch (see the module docstring); the
            batches it yields hold ``local_batch_size = batch_size // world_size`` items.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, *, workers: int = 0,
                 pin_memory: bool = False, shuffle: bool = True, name: str = "data set",
                 rank: int = 0, world_size: int = 1) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if batch_size % world_size:
            raise ValueError(f"the batch size {batch_size} of the {name} is not divisible by the "
                             f"{world_size} processes; each takes batch_size / world_size "
                             "items of every batch, so choose a batch size that is a multiple "
                             "of the number of processes (torchrun --nproc_per_node)")
        if len(dataset) < batch_size:
            raise ValueError(f"the {name} has {len(dataset)} items, fewer than one batch of "
                             f"{batch_size}; lower the batch size or add data")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = batch_size // world_size
        self.seed = int(seed)
        self.workers = int(workers)
        self.pin_memory = bool(pin_memory)
        self.shuffle = shuffle
        self.batches_per_epoch = len(dataset) // batch_size

    def order(self, epoch: int) -> torch.Tensor:
        """int64 (N,) item indices of ``epoch``."""
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, int(epoch)))
        return torch.randperm(n, generator=generator)

    def batches(self, start: int = 0, stop: Optional[int] = None) -> Iterator[dict]:
        """Batches ``start``, ``start + 1``, ... (up to ``stop``, exclusive, or forever)."""
        index = int(start)
        while stop is None or index < stop:
            epoch, offset = divmod(index, self.batches_per_epoch)
            end = self.batches_per_epoch if stop is None else \
                min(self.batches_per_epoch, offset + stop - index)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            window = self.order(epoch)[offset * self.batch_size:end * self.batch_size]
            # (global batches, ranks, local items) -> this rank's slice of every global batch.
            indices = window.view(-1, self.world_size, self.local_batch_size)[:, self.rank]
            loader = DataLoader(self.dataset, batch_size=self.local_batch_size,
                                sampler=indices.reshape(-1).tolist(), num_workers=self.workers,
                                pin_memory=self.pin_memory, drop_last=True)
            for batch in loader:
                yield batch
                index += 1
