"""Public CBST / CRST operators (docs/ops.md §5): `ClassBalancedThresholds`, `cbst_pseudo_label`;
validation, backend choice and dispatch (the MRKLD loss is fastst.ops.bootstrap_loss).

Backends: "cpp" (C++/OpenMP in fastst._C, the CPU default) and "torch" (reference.py; also what
`ClassBalancedThresholds` runs on CUDA tensors); `cbst_pseudo_label` also has "triton" (the
CUDA default).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from . import _checks, radix_select, reference
from ._backend import choose_backend
from .ext.cbst import cbst_collect_cpp, cbst_label_cpp, cbst_thresholds_cpp

IMPLEMENTED = ("cpp", "torch")
LABEL_BACKENDS = ("triton", "cpp", "torch")


def cbst_pseudo_label(probs: torch.Tensor, lambdas: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """CBST pseudo labels (docs/ops.md §5): w = p / lambda (float32 IEEE division); the label is
    argmax w (lowest index on ties) where max w >= 1, else 255.

    Args:
        probs: (B, C, H, W) float32/float16/bfloat16 probabilities, any strides.
        lambdas: (C,) class thresholds (ClassBalancedThresholds.thresholds), same device.
        backend: "triton" (the CUDA default), "cpp" or "torch" (default: docs/ops.md §0).
    Returns:
        (B, H, W) uint8.
    """
    probs = _checks.check_probs("probs", probs)
    lambdas = _checks.check_lambdas(lambdas, probs.shape[1], probs.device)
    name = choose_backend("cbst_pseudo_label", probs.device, LABEL_BACKENDS, backend)
    if name == "torch":
        _checks.check_prob_values("probs", probs)
        return reference.cbst_pseudo_label(probs, lambdas)
    op = cbst_label_cpp
    if name == "triton":
        from .triton.tpld import cbst_label_triton as op  # imports triton only when asked
    labels, flags = op(probs, lambdas)
    _checks.raise_on_flags("probs", flags)
    return labels


STORES = ("values", "histogram")


class ClassBalancedThresholds:
    """Class-balanced confidence thresholds over a whole target set (CBST, docs/ops.md §5), streamed.

    For each class k: the max probabilities of the pixels whose argmax is k (lowest index on
    ties), subsampled per image and class to positions 0, s, 2s, ... in row-major order, sorted
    descending; lambda_k = sorted[floor(len_k * portion) - 1], or 1 when that count is 0.

    Two exact stores:

    - ``store="values"`` (one pass): the kept values are stored (float32 + a uint8 class each, in
      buffers that grow by doubling on the device of the first batch) and `thresholds` takes
      exact per-class order statistics (cpp: counting sort by class + nth_element; torch: sort).
      5 bytes per kept value: about 7.8 GB for the 2,975 Cityscapes images at 1024x2048 with
      subsample 4.
    - ``store="histogram"`` (two passes, bounded memory): 2 x C x 65,536 int64 counters (20 MB
      at C = 19) whatever the data-set size, by the two-round radix select of
      `fastst.ops.radix_select`. Feed every batch, call ``begin_refinement(portion)``, feed the
      same images again (any order or batching, each image whole), then ``thresholds(portion)``.
      The refinement must see the same probabilities (a deterministic model): it checks that
      its per-class counts agree with the first pass and raises otherwise.

    Args:
        num_classes: C, 2..254.
        subsample: s >= 1.
        backend: "cpp" or "torch" for every call (default: docs/ops.md §0, from the first batch).
        store: "values" or "histogram" (keyword only).
    """

    def __init__(self, num_classes: int, subsample: int = 1, *, backend: Optional[str] = None,
                 store: str = "values"):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= _checks.MAX_CLASSES:
            raise ValueError(f"num_classes must be an int in [2, {_checks.MAX_CLASSES}], got {num_classes!r}")
        if isinstance(subsample, bool) or not isinstance(subsample, int) or subsample < 1:
            raise ValueError(f"subsample must be an int >= 1 (the released code uses 4), got {subsample!r}")
        if store not in STORES:
            raise ValueError(f"store must be one of {STORES} ('histogram' bounds the memory at the cost of a "
                             f"second pass), got {store!r}")
        self.num_classes = num_classes
        self.subsample = subsample
        self.backend = backend
        self.store = store
        self.reset()

    def reset(self) -> None:
        """Forget every value and count (start of a self-training round)."""
        self._values: Optional[torch.Tensor] = None
        self._classes: Optional[torch.Tensor] = None
        self._size = 0
        self._counts: Optional[torch.Tensor] = None
        # histogram store: round 1 histogram, then the refinement's plan, histogram and check
        self._high: Optional[torch.Tensor] = None
        self._refining: Optional[Dict[str, Any]] = None

    @property
    def needs_refinement(self) -> bool:
        """True for the histogram store: thresholds need a second pass (begin_refinement)."""
        return self.store == "histogram"

    def _append(self, values: torch.Tensor, classes: torch.Tensor) -> None:
        need = self._size + values.numel()
        if self._values is None or need > self._values.numel():
            capacity = max(need, 2 * (0 if self._values is None else self._values.numel()), 1024)
            grown_v = values.new_empty((capacity,))
            grown_c = classes.new_empty((capacity,))
            if self._values is not None:
                grown_v[: self._size] = self._values[: self._size]
                grown_c[: self._size] = self._classes[: self._size]
            self._values, self._classes = grown_v, grown_c
        self._values[self._size:need] = values
        self._classes[self._size:need] = classes
        self._size = need

    def _kept_batch(self, probs: torch.Tensor):
        """(values float32 (n,), classes uint8 (n,), argmax counts int64 (C,)) of one batch."""
        probs = _checks.check_probs("probs", probs)
        if probs.shape[1] != self.num_classes:
            raise ValueError(f"probs has C = {probs.shape[1]} classes but the accumulator was made for "
                             f"num_classes = {self.num_classes}")
        device = self._counts.device if self._counts is not None else (
            self._high.device if self._high is not None else None)
        if device is not None and probs.device != device:
            raise ValueError(f"probs is on {probs.device} but earlier batches were on {device}")
        name = choose_backend("ClassBalancedThresholds", probs.device, IMPLEMENTED, self.backend)
        B, C, H, W = probs.shape
        if name == "cpp":
            from .ext.stats import pixel_stats
            m, a, counts, flags = pixel_stats(probs, False, H, W, True)
            _checks.raise_on_flags("probs", flags)
            total = int((-(-counts // self.subsample)).sum())  # ceil(count / s) per (image, class)
            values, classes = cbst_collect_cpp(m, a, C, self.subsample, total)
            return values, classes, counts.sum(0)
        _checks.check_prob_values("probs", probs)
        m, a = reference.pixel_stats(probs, from_logits=False, size=None, align_corners=True)
        a = a.reshape(B, -1)
        counts = torch.bincount(a.reshape(-1), minlength=C)
        keep = reference.cbst_keep_mask(a, C, self.subsample)
        return m.reshape(B, -1)[keep], a[keep].to(torch.uint8), counts

    def update(self, probs: torch.Tensor) -> None:
        """Add one batch of probabilities (B, C, H, W) float32/float16/bfloat16 (any strides):
        to the values or the first histogram, or, after ``begin_refinement``, to the second."""
        values, classes, counts = self._kept_batch(probs)
        if self._refining is not None:
            self._refine(values, classes)
            return
        self._counts = counts if self._counts is None else self._counts + counts
        if self.store == "values":
            self._append(values, classes)
            return
        if self._high is None:
            self._high = radix_select.new_histogram(self.num_classes, values.device)
        radix_select.add_high(self._high, radix_select.float_keys(values), classes)

    def _refine(self, values: torch.Tensor, classes: torch.Tensor) -> None:
        plan = self._refining
        keys = radix_select.float_keys(values)
        radix_select.add_low(plan["low"], keys, classes, plan["chosen_high"])
        # What the check compares with round 1: the kept values per class, and those at or above
        # the chosen bin.
        classes = classes.long()
        plan["kept"].index_add_(0, classes, torch.ones_like(classes))
        at_or_above = (keys >> 16) >= plan["chosen_high"][classes]
        plan["at_or_above"].index_add_(0, classes[at_or_above], torch.ones_like(classes[at_or_above]))

    def begin_refinement(self, portion: float, reduce: radix_select.Reduce = None) -> None:
        """Histogram store: end the first pass and start the refinement pass for ``portion``.

        reduce: None, or a function applied to the first pass's histogram before it is read (e.g.
            ``DistributedContext.all_reduce_``: every process then refines the same bins)."""
        if self.store != "histogram":
            raise RuntimeError("begin_refinement is for store='histogram'; the values store needs no "
                               "second pass")
        if self._refining is not None:
            raise RuntimeError("the refinement pass has already begun; call reset() to start over")
        portion = _checks.check_real("portion", portion, low=0.0, high=1.0)
        high = self._high if self._high is not None else radix_select.new_histogram(
            self.num_classes, self._device())
        if reduce is not None:
            high = reduce(high)
        self._high = high
        chosen_high, inside, _ = radix_select.plan_refinement(high, portion)
        device = high.device
        rows = torch.arange(self.num_classes, device=device)
        cumulative_above = high.flip(1).cumsum(1).flip(1)  # [c, b] = values of class c in bins >= b
        # Classes with nothing sought (chosen_high -1) count every value as at or above.
        want_at_or_above = cumulative_above[rows, chosen_high.clamp(min=0)]
        self._refining = {
            "portion": portion, "chosen_high": chosen_high, "inside": inside,
            "low": radix_select.new_histogram(self.num_classes, device),
            "kept": torch.zeros(self.num_classes, dtype=torch.int64, device=device),
            "at_or_above": torch.zeros(self.num_classes, dtype=torch.int64, device=device),
            "want_kept": high.sum(1), "want_at_or_above": want_at_or_above,
        }

    def _device(self) -> torch.device:
        for tensor in (self._counts, self._high, self._values):
            if tensor is not None:
                return tensor.device
        return torch.device("cpu")

    def kept(self) -> "tuple[torch.Tensor, torch.Tensor]":
        """(values float32 (n,), classes uint8 (n,)): the subsampled max probabilities kept so
        far and their argmax classes (views of the accumulator's buffers; empty before the
        first batch). What several processes merge to get the thresholds of their union.
        Values store only."""
        if self.store != "values":
            raise RuntimeError("kept() needs store='values': the histogram store keeps counts, not values")
        if self._values is None:
            return torch.zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.uint8)
        return self._values[: self._size], self._classes[: self._size]

    def class_counts(self) -> torch.Tensor:
        """Pixels per argmax class over every batch of the first pass, not subsampled: int64 (C,)."""
        if self._counts is None:
            return torch.zeros(self.num_classes, dtype=torch.int64)
        return self._counts.clone()

    def thresholds(self, portion: float, reduce: radix_select.Reduce = None) -> torch.Tensor:
        """lambda (C,) float32 for the selected `portion` in [0, 1] (1 for classes with too few
        values), on the device of the batches.

        reduce: histogram store only, as in ``begin_refinement``: applied to the refinement's
            histogram and counts (every process gets the thresholds of all processes' images)."""
        portion = _checks.check_real("portion", portion, low=0.0, high=1.0)
        if self.store == "histogram":
            return self._refined_thresholds(portion, reduce)
        if reduce is not None:
            raise ValueError("reduce is for store='histogram'; merge values stores with "
                             "fastst.ops.radix_select.thresholds_from_values")
        if self._values is None:
            return torch.ones(self.num_classes, dtype=torch.float32)
        values, classes = self._values[: self._size], self._classes[: self._size]
        name = choose_backend("ClassBalancedThresholds", values.device, IMPLEMENTED, self.backend)
        if name == "cpp":
            return cbst_thresholds_cpp(values, classes, self.num_classes, portion)
        return reference.class_balanced_thresholds(values, classes, self.num_classes, portion)

    def _refined_thresholds(self, portion: float, reduce: radix_select.Reduce) -> torch.Tensor:
        plan = self._refining
        if plan is None:
            raise RuntimeError("store='histogram' needs a refinement pass before thresholds(): call "
                               "begin_refinement(portion), then update() with the same images again")
        if portion != plan["portion"]:
            raise ValueError(f"thresholds(portion={portion}) but the refinement pass was begun for "
                             f"portion={plan['portion']}; a histogram store answers one portion per pass")
        low, kept, at_or_above = plan["low"], plan["kept"], plan["at_or_above"]
        if reduce is not None:
            low, kept, at_or_above = reduce(low.clone()), reduce(kept.clone()), reduce(at_or_above.clone())
        if not (torch.equal(kept, plan["want_kept"]) and torch.equal(at_or_above, plan["want_at_or_above"])):
            raise ValueError(
                "the refinement pass saw other probabilities than the first pass (per-class counts "
                f"{kept.tolist()} vs {plan['want_kept'].tolist()}): feed it the same images once each, "
                "from a deterministic model (torch.backends.cudnn.deterministic = True on a GPU)")
        return radix_select.finish(plan["chosen_high"], plan["inside"], low)

    # -- snapshots (histogram store) ------------------------------------------------------------
    def state_dict(self, reduce: radix_select.Reduce = None) -> Dict[str, Any]:
        """The histogram store's state (CPU tensors, small); ``reduce`` sums the counters that
        this process added (for one snapshot of all processes)."""
        if self.store != "histogram":
            raise RuntimeError("state_dict() is for store='histogram' (the values store can be GBs)")
        apply = (lambda t: t.clone()) if reduce is None else (lambda t: reduce(t.clone()))  # noqa: E731
        counts = self._counts if self._counts is not None else torch.zeros(
            self.num_classes, dtype=torch.int64, device=self._device())
        state: Dict[str, Any] = {"num_classes": self.num_classes, "subsample": self.subsample,
                                 "counts": apply(counts).cpu()}
        if self._refining is None:
            high = self._high if self._high is not None else radix_select.new_histogram(
                self.num_classes, self._device())
            state["high"] = apply(high).cpu()
            return state
        plan = self._refining
        state["high"] = self._high.cpu()  # already every process's (begin_refinement reduced it)
        state["refining"] = {key: (apply(value) if key in ("low", "kept", "at_or_above") else value).cpu()
                             if isinstance(value, torch.Tensor) else value for key, value in plan.items()}
        return state

    def load_state_dict(self, state: Dict[str, Any], *, own_counters: bool = True,
                        device=None) -> None:
        """Restore ``state_dict()``'s output (onto ``device``). own_counters=False starts this
        process's additive counters at zero (another process carries the snapshot's)."""
        if self.store != "histogram":
            raise RuntimeError("load_state_dict() is for store='histogram'")
        if state.get("num_classes") != self.num_classes or state.get("subsample") != self.subsample:
            raise ValueError(f"the state is for num_classes={state.get('num_classes')}, subsample="
                             f"{state.get('subsample')}, not {self.num_classes}, {self.subsample}")
        keep = (lambda t: t.to(device)) if own_counters else (lambda t: torch.zeros_like(t, device=device))  # noqa: E731
        self.reset()
        self._counts = keep(state["counts"])
        refining = state.get("refining")
        if refining is None:
            self._high = keep(state["high"])
            return
        self._high = state["high"].to(device)
        self._refining = {key: (keep(value) if key in ("low", "kept", "at_or_above") else value.to(device))
                          if isinstance(value, torch.Tensor) else value for key, value in refining.items()}
