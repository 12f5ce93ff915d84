"""Pseudo labels on disk (docs/formats.md §3): `<label_dir>/<image stem>_pseudo_label.png`, 8-bit, class id
or 255 per pixel, stored at the pseudo-label size; optionally `<stem>_pseudo_color.png` with the
Cityscapes palette for viewing. `PseudoLabelDataset` pairs a data set's images with them."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .ids import palette_bytes
from .base import SegmentationDataset, Transform
from .io import read_label, write_png_atomic
from .transforms import resize_label

LABEL_SUFFIX = "_pseudo_label.png"
COLOUR_SUFFIX = "_pseudo_color.png"


def pseudo_label_path(label_dir, name: str) -> Path:
    """Where the pseudo label of the image with stem `name` lives."""
    return Path(label_dir) / f"{name}{LABEL_SUFFIX}"


def save_pseudo_labels(out_dir, names: Sequence[str], labels: torch.Tensor,
                       colour: bool = False, num_classes: Optional[int] = None) -> List[Path]:
    """Write `labels` (uint8 (B,H,W), any device; class ids or 255) as
    `<out_dir>/<names[b]>_pseudo_label.png`, and with `colour` also `<names[b]>_pseudo_color.png`
    (palette PNG, the Cityscapes colours of the class set with `num_classes` classes,
    ids.palette_for; ignore black). Each file is written atomically; safe to call from several
    threads. Returns the label paths."""
    if not isinstance(labels, (torch.Tensor, np.ndarray)) or labels.ndim != 3:
        raise ValueError(f"labels must be a uint8 (B,H,W) tensor, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    if isinstance(labels, torch.Tensor):
        if labels.dtype != torch.uint8:
            raise ValueError(f"labels must be uint8 (class ids or 255), got {labels.dtype}")
        labels = labels.detach().cpu().numpy()
    elif labels.dtype != np.uint8:
        raise ValueError(f"labels must be uint8 (class ids or 255), got {labels.dtype}")
    names = list(names)
    if len(names) != labels.shape[0]:
        raise ValueError(f"got {len(names)} names for {labels.shape[0]} label maps")
    for name in names:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"names must be image file stems without directories, got {name!r}")
    out_dir = Path(out_dir)
    paths = []
    for name, label in zip(names, labels):
        paths.append(write_png_atomic(pseudo_label_path(out_dir, name), label))
        if colour:
            write_png_atomic(out_dir / f"{name}{COLOUR_SUFFIX}", label,
                             palette=palette_bytes(num_classes))
    return paths


class PseudoLabelDataset(SegmentationDataset):
    """The images of `image_dataset` (after its fixed resize, before its transform) with the
    pseudo labels in `label_dir`, nearest-upsampled to the image size before `transform`.

    Items as every data set: {"image": float32 (3,H,W) normalised, "label": int64 (H,W),
    "name": str}. `seed` defaults to the image data set's."""

    def __init__(self, image_dataset: SegmentationDataset, label_dir, transform: Optional[Transform] = None,
                 seed: Optional[int] = None):
        if not hasattr(image_dataset, "load_resized"):
            raise TypeError(f"image_dataset must be a fastst data set (with load_resized), got "
                            f"{type(image_dataset).__name__}")
        super().__init__(transform=transform, seed=image_dataset.seed if seed is None else seed)
        self.image_dataset = image_dataset
        self.label_dir = Path(label_dir)
        if not self.label_dir.is_dir():
            raise FileNotFoundError(f"pseudo-label directory {self.label_dir} not found; run the "
                                    f"pseudo-label pass first (python -m fastst.pseudo ...)")

    def __len__(self) -> int:
        return len(self.image_dataset)

    def load_raw(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, str]:
        image, _, name = self.image_dataset.load_resized(index)
        path = pseudo_label_path(self.label_dir, name)
        if not path.is_file():
            raise FileNotFoundError(f"pseudo label {path} not found for image {name!r}; run the "
                                    f"pseudo-label pass first (python -m fastst.pseudo ...)")
        label = read_label(path)
        if label.dtype != np.uint8:
            raise ValueError(f"pseudo label {path} must be an 8-bit PNG, got {label.dtype} values")
        label = resize_label(torch.from_numpy(label), image.shape[-2:])
        return image, label, name
