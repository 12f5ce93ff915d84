"""SYNTHIA RAND_CITYSCAPES (Ros et al. 2016): root/RGB/*.png with root/GT/LABELS/*.png of the same
name, 16-bit PNGs whose first channel holds the SYNTHIA class id, mapped by the class set's
`synthia_ids` (ids.ClassSet: 19 classes with lane marking ignored, or 16 with it as road)."""
from __future__ import annotations

from pathlib import Path
from typing import List

from .base import FileDataset, Layout
from .io import png_files

# SYNTHIA's classes are 0 (void) .. 22 (lane marking); the class set maps some of them to train ids.
SYNTHIA_LABEL_IDS = frozenset(range(23))


class SynthiaLayout(Layout):
    name = "SYNTHIA"
    splits = ("train", "all")

    def describe(self, split: str) -> str:
        return f"{self.root}/RGB/*.png and {self.root}/GT/LABELS/*.png (RAND_CITYSCAPES)"

    def image_files(self, split: str) -> List[Path]:
        return png_files(self.root / "RGB")

    def label_files(self, split: str) -> List[Path]:
        return png_files(self.root / "GT" / "LABELS")

    def id_map(self, label: Path) -> dict:
        return self.class_set.synthia_ids

    def valid_ids(self, label: Path) -> frozenset:
        return SYNTHIA_LABEL_IDS


class Synthia(FileDataset):
    """SYNTHIA RAND_CITYSCAPES images with train-id labels; split "train" or "all" (both: every
    image, or those of `list_file`). See `FileDataset` for the arguments."""

    layout_class = SynthiaLayout

    def __init__(self, root, split: str = "train", **kwargs):
        super().__init__(root, split, **kwargs)
