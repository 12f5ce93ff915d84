"""GTA5 (Richter et al. 2016): root/images/*.png with root/labels/*.png of the same name, the
labels holding Cityscapes label ids (8-bit; palette PNGs are read as their indices), mapped by the
class set's `cityscapes_ids` (ids.ClassSet)."""
from __future__ import annotations

from pathlib import Path
from typing import List

from .base import FileDataset, Layout
from .io import png_files

# The Cityscapes label definition has ids 0..33; the 19 in the map are trained on, the others
# (unlabeled, ego vehicle, ground, parking, guard rail, ...) are valid but ignored.
CITYSCAPES_LABEL_IDS = frozenset(range(34))


class GTA5Layout(Layout):
    name = "GTA5"
    splits = ("train", "all")

    def describe(self, split: str) -> str:
        return f"{self.root}/images/*.png and {self.root}/labels/*.png"

    def image_files(self, split: str) -> List[Path]:
        return png_files(self.root / "images")

    def label_files(self, split: str) -> List[Path]:
        return png_files(self.root / "labels")

    def id_map(self, label: Path) -> dict:
        return self.class_set.cityscapes_ids

    def valid_ids(self, label: Path) -> frozenset:
        return CITYSCAPES_LABEL_IDS


class GTA5(FileDataset):
    """GTA5 images with train-id labels; split "train" or "all" (both: every image, or those of
    `list_file`). See `FileDataset` for the arguments and `SegmentationDataset` for the items."""

    layout_class = GTA5Layout

    def __init__(self, root, split: str = "train", **kwargs):
        super().__init__(root, split, **kwargs)
