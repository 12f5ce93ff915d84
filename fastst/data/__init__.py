"""Data sets for domain-adaptive segmentation: GTA5, SYNTHIA (RAND_CITYSCAPES), Cityscapes and
the synthetic demo domains, with the released augmentations and pseudo labels on disk.

`build_dataset(name, root, split, **kw)` gives a data set whose items are {"image": float32
(3,H,W) ImageNet-normalised RGB, "label": int64 (H,W) train ids (255 = ignore), "name": str}.
"""
from __future__ import annotations

from .check import CheckReport, check_dataset
from .cityscapes import Cityscapes
from .gta5 import GTA5
from .ids import (CLASS_NAMES, CLASS_SETS, CLASSES_13, CLASSES_16, IGNORE_INDEX, NUM_CLASSES,
                  PALETTE, ClassSet, class_set_for, get_class_set)
from .base import SegmentationDataset
from .io import read_image, read_label, write_png_atomic
from .mining import MiningSizedCrop, mining_train_transform
from .mixed import MixedDomainDataset, sample_source_indices
from .pseudo_label import PseudoLabelDataset, pseudo_label_path, save_pseudo_labels
from .synthia import Synthia
from .transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform, val_transform

DATASETS = {"gta5": GTA5, "synthia": Synthia, "cityscapes": Cityscapes}
DATASET_NAMES = ("gta5", "synthia", "cityscapes", "synthetic")
SYNTHETIC_DOMAINS = ("source", "target")


def build_dataset(name: str, root, split: str, **kwargs) -> SegmentationDataset:
    """The data set `name` ("gta5", "synthia", "cityscapes" or "synthetic") under `root`.

    kwargs for every name: transform, resize, seed, labels, list_file, class_set (the classes
    labels are mapped to: "cityscapes19" (default) or "synthia16", see ids.ClassSet; see
    FileDataset).
    "synthetic" also takes domain="source"|"target" (required) and synthetic={...}, the keyword
    arguments of fastst.data.synthetic.ensure_synthetic (num_train, height, ...): the domain is
    generated once under root/<domain> and read with the Cityscapes loader."""
    if name == "synthetic":
        domain = kwargs.pop("domain", None)
        options = kwargs.pop("synthetic", None) or {}
        if domain not in SYNTHETIC_DOMAINS:
            raise ValueError(f"synthetic data needs domain= one of {', '.join(SYNTHETIC_DOMAINS)}, "
                             f"got {domain!r}")
        from .synthetic import ensure_synthetic

        return Cityscapes(ensure_synthetic(root, domain, **options), split, **kwargs)
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return DATASETS[name](root, split, **kwargs)


__all__ = [
    "build_dataset", "DATASET_NAMES", "GTA5", "Synthia", "Cityscapes", "PseudoLabelDataset",
    "SegmentationDataset", "save_pseudo_labels", "pseudo_label_path", "train_transform",
    "val_transform", "read_image", "read_label", "write_png_atomic", "check_dataset",
    "CheckReport", "IMAGENET_MEAN", "IMAGENET_STD", "CLASS_NAMES", "NUM_CLASSES", "IGNORE_INDEX",
    "CLASSES_16", "CLASSES_13", "PALETTE", "CLASS_SETS", "ClassSet", "get_class_set",
    "class_set_for", "MiningSizedCrop", "mining_train_transform",
    "MixedDomainDataset", "sample_source_indices",
]
