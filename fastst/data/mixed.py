"""The mixed source + target list of the CBST/CRST rounds (docs/recipes.md §5): a sampled portion of the
labelled source images followed by every pseudo-labelled target image, each item flagged with
the domain it comes from."""
from __future__ import annotations

import math
import operator
from numbers import Real
from typing import List, Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["MixedDomainDataset", "sample_source_indices"]

ITEM_KEYS = ("image", "label", "name")


def _check_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def sample_source_indices(num_source: int, portion: float, seed: int) -> List[int]:
    """floor(num_source * portion) distinct source indices, sorted ascending: the first ones of
    ``torch.randperm(num_source)`` drawn from ``torch.Generator().manual_seed(seed)`` (the
    released code samples without replacement too, with NumPy, so its picks differ).

    Raises ValueError for a negative ``num_source`` or a ``portion`` outside [0, 1]."""
    num_source = _check_int("num_source", num_source)
    seed = _check_int("seed", seed)
    if num_source < 0:
        raise ValueError(f"num_source must be >= 0, got {num_source}")
    if isinstance(portion, bool) or not isinstance(portion, Real):
        raise TypeError(f"portion must be a number in [0, 1], got {portion!r}")
    portion = float(portion)
    if not 0.0 <= portion <= 1.0:
        raise ValueError(f"source portion must be in [0, 1] (the share of the source images mixed "
                         f"into the target list), got {portion}")
    count = math.floor(num_source * portion)
    order = torch.randperm(num_source, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:count].tolist())


class MixedDomainDataset(Dataset):
    """``source[source_indices[0]], source[source_indices[1]], ...`` followed by every item of
    ``target``.

    Item i is the underlying item dict ({"image": float32 (3,H,W), "label": int64 (H,W),
    "name": str}; exactly the keys ``keys``) plus ``"is_target"``: a bool tensor of shape (),
    so the default collate gives a (B,) bool tensor per batch. ``set_epoch(e)`` is passed on to
    both data sets when they have it, so their seeded augmentations change per epoch.

    Raises ValueError for a source index outside [0, len(source)), and, when an item is read,
    for an item that is not a dict with exactly the keys ``keys``."""

    def __init__(self, source: Dataset, target: Dataset, source_indices: Sequence[int],
                 keys: Sequence[str] = ITEM_KEYS):
        num_source = len(source)
        indices = [_check_int("source_indices[...]", i) for i in source_indices]
        bad = [i for i in indices if not 0 <= i < num_source]
        if bad:
            raise ValueError(f"source_indices must be in [0, {num_source}) (the source data set has "
                             f"{num_source} items), got {bad[:5]}")
        self.keys = frozenset(keys)
        if "is_target" in self.keys:
            raise ValueError("keys must not contain 'is_target': MixedDomainDataset adds it")
        self.source = source
        self.target = target
        self.source_indices = indices
        self.num_target = len(target)

    def __len__(self) -> int:
        return len(self.source_indices) + self.num_target

    @property
    def num_source(self) -> int:
        """How many source items the list holds (they come first)."""
        return len(self.source_indices)

    def __getitem__(self, index: int) -> dict:
        index = _check_int("index", index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mixed data set of {len(self)} items")
        is_target = index >= self.num_source
        if is_target:
            domain, item = "target", self.target[index - self.num_source]
        else:
            domain, item = "source", self.source[self.source_indices[index]]
        if not isinstance(item, dict) or set(item) != self.keys:
            got = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise ValueError(f"the {domain} data set gave item {got} for mixed index {index}; "
                             f"source and target items must both be dicts with the keys "
                             f"{sorted(self.keys)}")
        return {**item, "is_target": torch.tensor(is_target)}

    def set_epoch(self, epoch: int) -> None:
        """Pass epoch ``epoch`` to the source and target data sets (those that take one)."""
        for dataset in (self.source, self.target):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
