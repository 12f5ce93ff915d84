"""Pseudo-label quality where the target has labels (the synthetic target does; Cityscapes train
does): the labelled proportion and the pseudo-label mIoU (P-mIoU of IAST Table 4), per class.

The pseudo labels on disk (``<stem>_pseudo_label.png`` at the pseudo-label size) are compared
with the true labels of the same images resized to that size (nearest neighbour, as the images
are for the pass). P-mIoU counts only labelled pixels (255 in the pseudo label is "no label", not
a class); the labelled proportion counts every pixel.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch

from fastst.data.io import read_label
from fastst.data.pseudo_label import pseudo_label_path
from fastst.data.transforms import resize_label
from fastst.evaluate import results_dict
from fastst.metrics import ConfusionMatrix

__all__ = ["pseudo_label_quality", "target_has_labels"]


def target_has_labels(dataset) -> bool:
    """Whether the items of ``dataset`` (a target role built with ``labels=True``) carry real
    labels: the first item's label is not all 255."""
    if len(dataset) == 0:
        return False
    return bool((dataset[0]["label"] != 255).any())


def pseudo_label_quality(label_dir, dataset, num_classes: int, class_names=None
                         ) -> Optional[Dict[str, Any]]:
    """{"labelled_proportion", "p_miou", "p_iou": {name: IoU or None}, "labelled_proportion_per
    _class": [C]} of the pseudo labels in ``label_dir`` against ``dataset``'s labels.

    dataset: items {"label": int64 (H, W) true train ids (255 = ignore), "name": str}, with the
    images resized to the pseudo-label size (e.g. ``build_role(config, "target",
    resize=pseudo_size, labels=True)``). Returns None when the data set has no labels."""
    if not target_has_labels(dataset):
        return None
    confusion = ConfusionMatrix(num_classes)
    labelled = torch.zeros(num_classes, dtype=torch.int64)
    pixels = 0
    for index in range(len(dataset)):
        item = dataset[index]
        truth = item["label"]
        pseudo = torch.from_numpy(np.asarray(read_label(pseudo_label_path(label_dir,
                                                                          item["name"]))))
        if tuple(pseudo.shape) != tuple(truth.shape):
            truth = resize_label(truth, pseudo.shape)
        pseudo = pseudo.long()
        # Unlabelled pseudo pixels (255) are not predictions: ignored, not misses.
        confusion.update(pseudo, torch.where(pseudo == 255, torch.full_like(truth, 255), truth))
        labelled += torch.bincount(pseudo[pseudo < num_classes], minlength=num_classes)
        pixels += pseudo.numel()
    scores = results_dict(confusion, [] if class_names is None else list(class_names))
    return {"labelled_proportion": int(labelled.sum()) / max(1, pixels),
            "p_miou": scores["miou"], "p_iou": scores["iou"],
            "labelled_proportion_per_class": (labelled.double() / max(1, pixels)).tolist()}
