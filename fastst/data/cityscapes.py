"""Cityscapes (Cordts et al. 2016): root/leftImg8bit/<split>/<city>/<base>_leftImg8bit.png with
root/gtFine/<split>/<city>/<base>_gtFine_labelTrainIds.png (the 19 Cityscapes train ids) or else
<base>_gtFine_labelIds.png (label ids, mapped). Both are mapped to the class set's train ids
(ids.ClassSet: the identity for the 19 classes). A split without a gtFine directory (the test
split as usually downloaded) gives all-255 labels."""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from .gta5 import CITYSCAPES_LABEL_IDS
from .ids import IGNORE_INDEX, NUM_CLASSES
from .base import FileDataset, Layout
from .io import png_files, subdirectories

IMAGE_SUFFIX = "_leftImg8bit"
LABEL_IDS_SUFFIX = "_gtFine_labelIds"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds"
TRAIN_IDS = frozenset(range(NUM_CLASSES)) | {IGNORE_INDEX}


def _base(stem: str, suffix: str) -> str:
    return stem[:-len(suffix)] if stem.endswith(suffix) else stem


class CityscapesLayout(Layout):
    name = "Cityscapes"
    splits = ("train", "val", "test")

    def describe(self, split: str) -> str:
        return (f"{self.root}/leftImg8bit/{split}/<city>/*{IMAGE_SUFFIX}.png and "
                f"{self.root}/gtFine/{split}/<city>/*{LABEL_IDS_SUFFIX}.png (or "
                f"*{TRAIN_IDS_SUFFIX}.png)")

    def image_files(self, split: str) -> List[Path]:
        return [p for city in subdirectories(self.root / "leftImg8bit" / split)
                for p in png_files(city, IMAGE_SUFFIX + ".png")]

    def label_files(self, split: str) -> List[Path]:
        labels = []
        for city in subdirectories(self.root / "gtFine" / split):
            by_base = {}
            # labelTrainIds files come second so that they replace the labelIds of the same base.
            for suffix in (LABEL_IDS_SUFFIX, TRAIN_IDS_SUFFIX):
                by_base.update((_base(p.stem, suffix), p) for p in png_files(city, suffix + ".png"))
            labels.extend(by_base[base] for base in sorted(by_base))
        return labels

    def image_key(self, image: Path) -> Tuple[str, str]:
        return image.parent.name, _base(image.stem, IMAGE_SUFFIX)

    def label_key(self, label: Path) -> Tuple[str, str]:
        return label.parent.name, _base(_base(label.stem, TRAIN_IDS_SUFFIX), LABEL_IDS_SUFFIX)

    def list_keys(self, image: Path) -> Tuple[str, ...]:
        return image.stem, _base(image.stem, IMAGE_SUFFIX)

    def has_labels(self, split: str) -> bool:
        return (self.root / "gtFine" / split).is_dir()

    def id_map(self, label: Path) -> dict:
        if label.stem.endswith(TRAIN_IDS_SUFFIX):
            return self.class_set.from_cityscapes_train_ids
        return self.class_set.cityscapes_ids

    def valid_ids(self, label: Path) -> frozenset:
        return TRAIN_IDS if label.stem.endswith(TRAIN_IDS_SUFFIX) else CITYSCAPES_LABEL_IDS


class Cityscapes(FileDataset):
    """Cityscapes images with train-id labels; split "train", "val" or "test". The item name is
    the image file stem (e.g. "aachen_000000_000019_leftImg8bit"). See `FileDataset` for the
    arguments."""

    layout_class = CityscapesLayout

    def __init__(self, root, split: str = "train", **kwargs):
        super().__init__(root, split, **kwargs)
