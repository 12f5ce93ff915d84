"""Rare-class mining crops of the released CRST code (docs/recipes.md §5): with probability `mine_p`, a crop
centred on a pixel of a rare class that the (pseudo) label holds, instead of a uniformly random
crop.

Mining reads the label before the crop, so it runs as the first transform, on the full-size
image and label. 255 (ignore) is never a class and cannot be mined.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple

import torch

from .ids import IGNORE_INDEX
from .transforms import (BrightnessContrast, Compose, HorizontalFlip, RandomSizedCrop,
                         _check_probability, _coin, _randint)

__all__ = ["MiningSizedCrop", "mining_train_transform"]


def _check_mine_classes(mine_classes: Sequence[int]) -> Tuple[int, ...]:
    """The class ids as a tuple of ints in [0, 255), duplicates dropped (first one kept), so
    that every present class has the same chance of being mined."""
    if isinstance(mine_classes, (str, bytes)) or not hasattr(mine_classes, "__iter__"):
        raise TypeError(f"mine_classes must be a sequence of class ids, got {mine_classes!r}")
    classes: List[int] = []
    for value in mine_classes:
        if isinstance(value, bool):
            raise TypeError(f"mine_classes must hold integer class ids, got {value!r}")
        try:
            class_id = operator.index(value)
        except TypeError:
            raise TypeError(f"mine_classes must hold integer class ids, got {value!r}") from None
        if not 0 <= class_id < IGNORE_INDEX:
            raise ValueError(f"mine_classes must be class ids in [0, {IGNORE_INDEX - 1}] "
                             f"({IGNORE_INDEX} is the ignore label and is never mined), got {class_id}")
        if class_id not in classes:
            classes.append(class_id)
    return tuple(classes)


class MiningSizedCrop(RandomSizedCrop):
    """RandomSizedCrop with rare-class mining.

    The crop size is RandomSizedCrop's: height h in `height_range` (both ends included), width
    int(h * aspect), each clipped to the image. Then, when `mine_p > 0` and `mine_classes` is not
    empty, a coin with probability `mine_p`; if it lands and the label holds any of
    `mine_classes`, one of the present ones is picked uniformly (in the order of
    `mine_classes`), then one of its pixels uniformly (row-major order), and the crop is centred
    on that pixel (top = y - h // 2, left = x - w // 2), shifted to stay inside the image, so it
    always contains the pixel. Otherwise top and left are uniform, as in RandomSizedCrop.
    The crop is resized to `out_size` (image bilinear, label nearest); None keeps it.

    Randomness, all from the passed generator: h; the coin (not drawn when `mine_p == 0` or
    `mine_classes` is empty, so that then the output and the generator's state equal
    RandomSizedCrop's); then the class and the pixel, or top and left.

    Call: (image uint8 (3,H,W), label uint8 (H,W) class ids or 255, generator) ->
    (image uint8 (3,h',w'), label uint8 (h',w')), on the input device.
    """

    def __init__(self, height_range: Sequence[int] = (341, 950), aspect: float = 2.0,
                 out_size: Optional[Sequence[int]] = (512, 1024), antialias: bool = True, *,
                 mine_classes: Sequence[int] = (), mine_p: float = 0.8):
        super().__init__(height_range, aspect, out_size, antialias)
        self.mine_classes = _check_mine_classes(mine_classes)
        self.mine_p = _check_probability(mine_p, "mine_p")

    def __call__(self, image, label, generator):
        if image.ndim != 3 or label.ndim != 2 or tuple(image.shape[-2:]) != tuple(label.shape):
            raise ValueError(f"MiningSizedCrop needs an image (3,H,W) and its label (H,W) of the "
                             f"same size, got {tuple(image.shape)} and {tuple(label.shape)}")
        return super().__call__(image, label, generator)

    def corner(self, label, crop_h: int, crop_w: int, generator) -> Tuple[int, int]:
        """A mined corner (after the coin) when a mine class is present, else a random one."""
        if self.mine_classes and self.mine_p > 0 and _coin(generator, self.mine_p):
            mined = self._mined_corner(label, crop_h, crop_w, generator)
            if mined is not None:
                return mined
        return super().corner(label, crop_h, crop_w, generator)

    def _mined_corner(self, label: torch.Tensor, crop_h: int, crop_w: int,
                      generator: torch.Generator) -> Optional[Tuple[int, int]]:
        """(top, left) of a crop centred on a random pixel of a random present mine class, or
        None when the label holds none of them (nothing drawn then)."""
        hits = torch.stack([(label == c).any() for c in self.mine_classes]).tolist()
        present = [c for c, hit in zip(self.mine_classes, hits) if hit]
        if not present:
            return None
        chosen = present[_randint(generator, 0, len(present) - 1)]
        pixels = (label.reshape(-1) == chosen).nonzero().view(-1)
        flat = int(pixels[_randint(generator, 0, pixels.numel() - 1)])
        height, width = label.shape
        y, x = divmod(flat, width)
        top = min(max(y - crop_h // 2, 0), height - crop_h)
        left = min(max(x - crop_w // 2, 0), width - crop_w)
        return top, left

    def __repr__(self):
        return (f"MiningSizedCrop(height_range={self.height_range}, aspect={self.aspect}, "
                f"out_size={self.out_size}, mine_classes={list(self.mine_classes)}, "
                f"mine_p={self.mine_p})")


def mining_train_transform(mine_classes: Sequence[int], mine_p: float,
                           crop_height_range: Sequence[int] = (341, 950),
                           crop_size: Sequence[int] = (512, 1024), aspect: float = 2.0,
                           flip_p: float = 0.5, brightness: float = 0.2, contrast: float = 0.2,
                           brightness_contrast_p: float = 0.3) -> Compose:
    """`transforms.train_transform` with the random sized crop replaced by a MiningSizedCrop:
    mining crop resized to `crop_size`, horizontal flip, brightness/contrast. With `mine_p == 0`
    or no `mine_classes` it gives exactly what train_transform gives for the same generator."""
    return Compose([
        MiningSizedCrop(crop_height_range, aspect, crop_size, mine_classes=mine_classes, mine_p=mine_p),
        HorizontalFlip(flip_p),
        BrightnessContrast(brightness, contrast, brightness_contrast_p),
    ])
