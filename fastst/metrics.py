"""Confusion matrix and IoU for semantic segmentation (docs/formats.md §3).

Rows are ground-truth classes, columns predicted classes. mIoU-16 and mIoU-13 (SYNTHIA) are read
off the matrix of a class set (`fastst.data.ids.ClassSet.miou_subsets`): subsets of the 19
Cityscapes classes, or all 16 classes and a subset of them for the "synthia16" class set."""
import math
from typing import Mapping, Optional

import torch

from .data.ids import class_set_for, get_class_set

__all__ = ["ConfusionMatrix", "RARE_CLASS_NAMES", "rare_class_miou"]


class ConfusionMatrix:
    """Accumulates an int64 (C, C) confusion matrix, `matrix[target, pred]`, and int64 (C,)
    `missed[target]`: the pixels of each true class predicted outside [0, C). Those are misses
    (false negatives of the true class, in no class's false positives), as in the official
    Cityscapes evaluation, where a prediction of a class it does not score (e.g. label id 0,
    "unlabeled") lands in a column of its own.

    `device=None` keeps the counts on the CPU; give the evaluation device (e.g. "cuda") to keep
    updates free of host synchronisation. Counts are computed with `torch.bincount` on the device
    of the inputs and added to the counts (moved if the devices differ)."""

    def __init__(self, num_classes, device=None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        device = torch.device("cpu") if device is None else device
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.missed = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def update(self, pred, target):
        """Count the pixels of `pred` against `target`: integer tensors of the same shape (any
        rank, any device). Pixels whose target is outside [0, C) (255 = ignore) are left out; a
        prediction outside [0, C) at any other pixel counts in `missed`."""
        for name, tensor in (("pred", pred), ("target", target)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dtype.is_floating_point or tensor.dtype.is_complex or \
                    tensor.dtype == torch.bool:
                raise TypeError(f"{name} must hold integer class ids, got {tensor.dtype}; take "
                                f"the argmax of scores first")
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} "
                             f"and {tuple(target.shape)}")
        if pred.device != target.device:
            raise ValueError(f"pred and target must be on the same device, got {pred.device} "
                             f"and {target.device}")
        C = self.num_classes
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        valid = (target >= 0) & (target < C)
        target, pred = target[valid], pred[valid]
        # Column C of the (C, C + 1) counts collects the predictions outside [0, C).
        pred = torch.where((pred >= 0) & (pred < C), pred, C)
        counts = torch.bincount(target * (C + 1) + pred, minlength=C * (C + 1)).reshape(C, C + 1)
        counts = counts.to(self.matrix.device)
        self.matrix += counts[:, :C]
        self.missed += counts[:, C]
        return self

    def reset(self):
        self.matrix.zero_()
        self.missed.zero_()
        return self

    def merge(self, other):
        """Add the counts of another ConfusionMatrix with the same number of classes."""
        if not isinstance(other, ConfusionMatrix) or other.num_classes != self.num_classes:
            raise ValueError("merge needs a ConfusionMatrix with the same num_classes")
        self.matrix += other.matrix.to(self.matrix.device)
        self.missed += other.missed.to(self.missed.device)
        return self

    def all_reduce(self, context=None):
        """Sum the counts over all processes when torch.distributed is initialised (moved to
        the process group's communication device for the collective and back); no-op
        otherwise. Every process then holds the counts of the whole data set. context: a
        `fastst.distributed.DistributedContext` (default: the process's)."""
        from .distributed import current

        context = current() if context is None else context
        context.all_reduce_(self.matrix)
        context.all_reduce_(self.missed)
        return self

    def iou(self):
        """float64 (C,) intersection over union per class on the CPU: TP / (TP + FP + FN), the
        misses of `missed` among the FN; NaN for classes absent from both prediction and
        target."""
        matrix = self.matrix.detach().to("cpu", torch.float64)
        intersection = matrix.diagonal()
        union = matrix.sum(0) + matrix.sum(1) + self.missed.detach().to("cpu", torch.float64) \
            - intersection
        return torch.where(union > 0, intersection / union.clamp_min(1),
                           torch.full_like(union, math.nan))

    def miou(self, classes=None):
        """Mean IoU (a float in [0, 1]) over `classes` (a sequence of class ids; all classes when
        None), leaving out NaN classes; NaN if every class left is NaN."""
        iou = self.iou()
        if classes is not None:
            classes = [int(c) for c in classes]
            bad = [c for c in classes if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(f"classes {bad} are outside 0..{self.num_classes - 1}")
            iou = iou[classes]
        present = iou[~iou.isnan()]
        return float(present.mean()) if present.numel() else math.nan

    def class_set(self, class_set=None):
        """The `ids.ClassSet` named by `class_set` (a name or ClassSet), checked to have this
        matrix's number of classes; for None the class set with that many classes (19:
        cityscapes19, 16: synthia16), or None where there is none."""
        if class_set is None:
            return class_set_for(self.num_classes)
        class_set = get_class_set(class_set)
        if class_set.num_classes != self.num_classes:
            raise ValueError(f"class set {class_set.name!r} has {class_set.num_classes} classes, "
                             f"the confusion matrix {self.num_classes}")
        return class_set

    def summary(self, class_set=None):
        """{"miou": the mean over all classes, "iou": [per-class floats or NaN], then the class
        set's mIoU variants: "miou16" and "miou13" for both "cityscapes19" (subsets of the 19)
        and "synthia16" ("miou16" = "miou")}. class_set: see `class_set` (None: by the number
        of classes; other numbers of classes report "miou" and "iou" only)."""
        result = {"miou": self.miou(), "iou": self.iou().tolist()}
        class_set = self.class_set(class_set)
        for key, _, classes in () if class_set is None else class_set.miou_subsets():
            result[key] = self.miou(classes)
        return result

    def table(self, class_names=None, class_set=None):
        """Per-class IoU in percent, one line a class (named by `class_names`, default the class
        set's names), then the mIoU lines: mIoU-C over all C classes of a class set and its
        other variants (mIoU-19/16/13 for cityscapes19, mIoU-16/13 for synthia16), or "mIoU" where
        there is no class set. 'n/a' marks classes absent from both."""
        class_set = self.class_set(class_set)
        if class_names is None:
            class_names = class_set.names if class_set is not None else \
                [f"class {c}" for c in range(self.num_classes)]
        if len(class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for "
                             f"{self.num_classes} classes")
        width = max(len("mIoU-19"), *(len(name) for name in class_names)) + 2
        lines = [f"{'class':<{width}}IoU"]
        for name, value in zip(class_names, self.iou().tolist()):
            lines.append(f"{name:<{width}}{_percent(value)}")
        if class_set is None:
            lines.append(f"{'mIoU':<{width}}{_percent(self.miou())}")
        else:
            lines.append(f"{f'mIoU-{self.num_classes}':<{width}}{_percent(self.miou())}")
            everything = tuple(range(self.num_classes))
            for _, label, classes in class_set.miou_subsets():
                if classes != everything:
                    lines.append(f"{label:<{width}}{_percent(self.miou(classes))}")
        return "\n".join(lines)


def _percent(value):
    return "  n/a" if math.isnan(value) else f"{100.0 * value:5.2f}"


# The classes TPLD (Shin et al., ECCV 2020, Table 1) marks as rare, after CLAN (Luo et al., CVPR
# 2019), and averages into its rare-class mIoU (R-mIoU); the mean over exactly these 12 classes
# reproduces every R-mIoU of that table (README "Pseudo-label quality, semi-supervised mode, the
# paper's tables").
RARE_CLASS_NAMES = ("wall", "fence", "pole", "traffic light", "traffic sign", "terrain", "rider",
                    "truck", "bus", "train", "motorcycle", "bicycle")


def rare_class_miou(iou: Mapping[str, Optional[float]]) -> Optional[float]:
    """TPLD's rare-class mIoU (R-mIoU): the mean IoU over the classes of ``RARE_CLASS_NAMES``
    that ``iou`` holds with a value. ``iou``: class name -> IoU in [0, 1], or None / NaN for a
    class absent from both prediction and truth (the "iou" of a stage's ``result.json``). A class
    set without some rare classes (SYNTHIA's 16: no terrain, truck, train) averages the others.
    Returns a float, or None when no rare class has a value."""
    if not isinstance(iou, Mapping):
        raise TypeError(f"iou must map class names to IoU values (a result's 'iou'), got "
                        f"{type(iou).__name__}")
    values = [float(iou[name]) for name in RARE_CLASS_NAMES
              if iou.get(name) is not None and not math.isnan(float(iou[name]))]
    return sum(values) / len(values) if values else None
