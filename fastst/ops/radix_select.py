"""Exact per-class order statistics of non-negative float32 values by a two-round radix select
over their bits, with memory bounded by the histograms (CBST thresholds, docs/ops.md §5).

Non-negative floats order like their bit patterns. Round 1 counts, per class, the high 16 bits
of every value: a (C, 65536) int64 histogram locates the bin holding each class's sought element
and its index inside the bin. Round 2 counts the low 16 bits of only the values in that bin: a
second (C, 65536) histogram locates the element itself. Both rounds are sums, so they can be
streamed over batches, split over processes and added (``reduce``), and resumed from a snapshot.

The sought element is CBST's: with len_k values of class k and n_k = floor(len_k * portion)
(float64), lambda_k = (values sorted descending)[n_k - 1], i.e. ascending index len_k - n_k;
lambda_k = 1 when n_k = 0.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

RADIX = 1 << 16

Reduce = Optional[Callable[[torch.Tensor], torch.Tensor]]


def float_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 (n,) bit patterns of float32 ``values`` (n,) >= 0 (-0.0 read as +0.0), which order
    like the values."""
    return (values.float() + 0.0).contiguous().view(torch.int32).long() & 0xFFFFFFFF


def new_histogram(num_classes: int, device) -> torch.Tensor:
    """A zero (C, 65536) int64 histogram."""
    return torch.zeros((num_classes, RADIX), dtype=torch.int64, device=device)


def add_high(histogram: torch.Tensor, keys: torch.Tensor, classes: torch.Tensor) -> None:
    """Round 1: count each key's high 16 bits in its class's row of ``histogram`` (C, 65536)."""
    flat = classes.long() * RADIX + (keys >> 16)
    histogram.view(-1).index_add_(0, flat, torch.ones_like(flat))


def add_low(histogram: torch.Tensor, keys: torch.Tensor, classes: torch.Tensor,
            chosen_high: torch.Tensor) -> torch.Tensor:
    """Round 2: count the low 16 bits of the keys whose high 16 bits equal their class's
    ``chosen_high`` (C,) int64 (-1: none sought). Returns bool (n,), which keys were counted."""
    classes = classes.long()
    inside = (keys >> 16) == chosen_high[classes]
    flat = classes[inside] * RADIX + (keys[inside] & 0xFFFF)
    histogram.view(-1).index_add_(0, flat, torch.ones_like(flat))
    return inside


def selected_counts(kept: List[int], portion: float) -> List[int]:
    """n_k = floor(len_k * portion) per class, in float64 (Python float times int)."""
    return [int(math.floor(count * portion)) for count in kept]


def locate(histogram: torch.Tensor, position: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each row c of ``histogram`` (C, 65536) int64, the bin holding the element at 0-based
    ascending ``position[c]`` and that element's index inside the bin: two int64 (C,)."""
    cumulative = histogram.cumsum(1)
    found = torch.searchsorted(cumulative, position.unsqueeze(1), right=True).squeeze(1)
    found = found.clamp(max=RADIX - 1)
    before = torch.where(found > 0, cumulative.gather(1, (found - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                         torch.zeros_like(found))
    return found, position - before


def plan_refinement(high: torch.Tensor, portion: float) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """After round 1: (chosen_high (C,) int64, -1 where nothing is sought; index inside that bin
    (C,) int64; n_k per class) for ``portion``."""
    kept = high.sum(1).tolist()
    selected = selected_counts(kept, portion)
    position = torch.tensor([count - n if n > 0 else 0 for count, n in zip(kept, selected)],
                            dtype=torch.int64, device=high.device)
    chosen, inside = locate(high, position)
    sought = torch.tensor([n > 0 for n in selected], device=high.device)
    return torch.where(sought, chosen, torch.full_like(chosen, -1)), inside, selected


def finish(chosen_high: torch.Tensor, inside: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """After round 2: lambda float32 (C,), the value at each class's sought position, 1 where
    nothing is sought (chosen_high -1)."""
    chosen_low, _ = locate(low, inside)
    found = ((chosen_high.clamp(min=0) << 16) | chosen_low).to(torch.int32).view(torch.float32)
    return torch.where(chosen_high >= 0, found, torch.ones_like(found))


def thresholds_from_values(values: torch.Tensor, classes: torch.Tensor, num_classes: int, portion: float,
                           reduce: Reduce = None) -> torch.Tensor:
    """Both rounds over values held in memory: float32 (C,) thresholds of ``values`` (n,) float32
    >= +0 with class ids ``classes`` (n,). ``reduce`` (e.g. a sum over processes, in place,
    returning the tensor) is applied to each round's histogram, so every process gets the
    thresholds of all processes' values together."""
    keys = float_keys(values)
    high = new_histogram(num_classes, values.device)
    add_high(high, keys, classes)
    if reduce is not None:
        high = reduce(high)
    chosen_high, inside, _ = plan_refinement(high, portion)
    low = new_histogram(num_classes, values.device)
    add_low(low, keys, classes, chosen_high)
    if reduce is not None:
        low = reduce(low)
    return finish(chosen_high, inside, low)
