"""Endless, seeded, resumable batch streams over a data set.

A stream visits its data set epoch after epoch; epoch e is ``torch.randperm(N)`` drawn from a
generator seeded with ``derive_seed(seed, e)``, cut into ``N // batch_size`` full batches (the
rest of the epoch is dropped, as ``drop_last``). Before each epoch the data set's ``set_epoch(e)``
is called, so its seeded augmentations (fastst.data) change per epoch, and a fresh DataLoader is
made for that epoch alone: no worker can prefetch an item under another epoch's seed. Batch k of
the stream is therefore a pure function of (seed, k), which is what makes a resumed run equal to
an uninterrupted one: ``batches(start=k)`` continues exactly where batch k - 1 left off.
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
    """Batches of ``batch_size`` items of ``dataset`` in a seeded order, forever.

    Args:
        dataset: a map-style data set (fastst.data items are dicts, collated by the default
            collate function); ``set_epoch`` is called when it has one.
        batch_size: items per batch; the data set must hold at least this many.
        seed: the order seed; epoch e uses ``derive_seed(seed, e)``.
        workers, pin_memory: passed to each epoch's DataLoader.
        shuffle: False visits every epoch in index order (for tests and inspection).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, *, workers: int = 0,
                 pin_memory: bool = False, shuffle: bool = True, name: str = "data set") -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if len(dataset) < batch_size:
            raise ValueError(f"the {name} has {len(dataset)} items, fewer than one batch of "
                             f"{batch_size}; lower the batch size or add data")
        self.dataset = dataset
        self.batch_size = batch_size
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
            indices = self.order(epoch)[offset * self.batch_size:end * self.batch_size].tolist()
            loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices,
                                num_workers=self.workers, pin_memory=self.pin_memory,
                                drop_last=True)
            for batch in loader:
                yield batch
                index += 1
