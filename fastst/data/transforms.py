"""Joint image/label augmentations of the released IAST recipe (docs/recipes.md §4), in torch ops.

Every transform is a callable `(image uint8 (3,H,W), label uint8 (H,W), generator) -> (image,
label)` that draws all its randomness from the passed `torch.Generator` (a CPU one) and keeps
the tensors on their device. Images are resized bilinearly, labels by nearest neighbour, so a
label only ever holds values of its input. Normalisation (`normalize`) is the data set's last
step, after the transform.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_size(size, what: str) -> Tuple[int, int]:
    """`size` as a (height, width) tuple of positive ints, or a ValueError naming `what`."""
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (height, width), got {size!r}") from None
    if height <= 0 or width <= 0 or (height, width) != tuple(size):
        raise ValueError(f"{what} must be two positive integers (height, width), got {size!r}")
    return height, width


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3,H,W) RGB -> float32 (3,H,W): (image / 255 - IMAGENET_MEAN) / IMAGENET_STD."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=image.device).view(3, 1, 1)
    return (image.float() / 255.0 - mean) / std


def resize_image(image: torch.Tensor, size: Sequence[int], antialias: bool = True) -> torch.Tensor:
    """uint8 (3,H,W) -> uint8 (3,size[0],size[1]), bilinear (half-pixel centres; antialiased
    when shrinking if `antialias`), rounded to the nearest integer."""
    size = check_size(size, "size")
    if tuple(image.shape[-2:]) == size:
        return image
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                            antialias=antialias)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def nearest_indices(out_len: int, in_len: int, device=None) -> torch.Tensor:
    """int64 (out_len,): the input index under the centre of each of ``out_len`` output pixels
    spanning ``in_len`` input pixels, floor((i + 0.5) * in_len / out_len) in exact integers."""
    return (2 * torch.arange(out_len, device=device) + 1) * in_len // (2 * out_len)


def resize_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(H,W) integer label -> (size[0], size[1]) by nearest neighbour with half-pixel centres:
    output pixel (y, x) takes the input pixel under its centre, (floor((y + 0.5) * H / h),
    floor((x + 0.5) * W / w)) (`nearest_indices`), the position `resize_image` samples the image
    at (PIL's NEAREST and torch's "nearest-exact" up to exact ties); exact integer arithmetic, any
    dtype and device. OpenCV's INTER_NEAREST (torch's "nearest": floor(y * H / h)) would leave
    the label half an output pixel behind the image, an offset that self-training feeds back into
    its labels round after round (docs/recipes.md §4.4)."""
    out_h, out_w = check_size(size, "size")
    in_h, in_w = label.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return label
    rows = nearest_indices(out_h, in_h, label.device)
    cols = nearest_indices(out_w, in_w, label.device)
    return label.index_select(-2, rows).index_select(-1, cols)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high], both ends included."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _coin(generator: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=generator, dtype=torch.float64)) < p


def _check_probability(p: float, what: str) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {p}")
    return p


class Compose:
    """Apply `transforms` in order, all with the same generator."""

    def __init__(self, transforms):
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise TypeError(f"every transform must be callable, got {type(t).__name__}")

    def __call__(self, image, label, generator):
        for t in self.transforms:
            image, label = t(image, label, generator)
        return image, label

    def __repr__(self):
        return f"Compose({self.transforms!r})"


class Resize:
    """Fixed resize to `size` = (height, width): image bilinear, label nearest."""

    def __init__(self, size: Sequence[int], antialias: bool = True):
        self.size = check_size(size, "size")
        self.antialias = antialias

    def __call__(self, image, label, generator=None):
        return resize_image(image, self.size, self.antialias), resize_label(label, self.size)

    def __repr__(self):
        return f"Resize(size={self.size})"


class RandomSizedCrop:
    """Crop of random height h in `height_range` (both ends included) and width
    int(h * aspect), each clipped to the image, at a uniformly random position, then resized to
    `out_size` = (height, width) (image bilinear, label nearest); `out_size=None` keeps the crop.
    Randomness (albumentations' RandomSizedCrop order): h, then the top row, then the left column."""

    def __init__(self, height_range: Sequence[int] = (341, 950), aspect: float = 2.0,
                 out_size: Optional[Sequence[int]] = (512, 1024), antialias: bool = True):
        low, high = check_size(height_range, "height_range")
        if low > high:
            raise ValueError(f"height_range must be (min, max) with min <= max, got {height_range!r}")
        if not aspect > 0:
            raise ValueError(f"aspect must be positive, got {aspect}")
        self.height_range = (low, high)
        self.aspect = float(aspect)
        self.out_size = None if out_size is None else check_size(out_size, "out_size")
        self.antialias = antialias

    def __call__(self, image, label, generator):
        height, width = image.shape[-2:]
        crop_h = _randint(generator, *self.height_range)
        crop_w = min(max(1, int(crop_h * self.aspect)), width)
        crop_h = min(crop_h, height)
        top, left = self.corner(label, crop_h, crop_w, generator)
        image = image[:, top:top + crop_h, left:left + crop_w]
        label = label[top:top + crop_h, left:left + crop_w]
        if self.out_size is not None:
            image = resize_image(image, self.out_size, self.antialias)
            label = resize_label(label, self.out_size)
        return image, label

    def corner(self, label, crop_h: int, crop_w: int, generator) -> Tuple[int, int]:
        """(top, left) of the crop: uniformly random (subclasses choose otherwise)."""
        height, width = label.shape[-2:]
        return _randint(generator, 0, height - crop_h), _randint(generator, 0, width - crop_w)

    def __repr__(self):
        return (f"RandomSizedCrop(height_range={self.height_range}, aspect={self.aspect}, "
                f"out_size={self.out_size})")


class HorizontalFlip:
    """Mirror image and label left-right with probability `p`."""

    def __init__(self, p: float = 0.5):
        self.p = _check_probability(p, "p")

    def __call__(self, image, label, generator):
        if _coin(generator, self.p):
            return image.flip(-1), label.flip(-1)
        return image, label

    def __repr__(self):
        return f"HorizontalFlip(p={self.p})"


class BrightnessContrast:
    """With probability `p`: alpha = 1 + U(-contrast, contrast), beta = U(-brightness,
    brightness) * 255, image = trunc(clip(alpha * image + beta, 0, 255)) in float32, as
    albumentations' RandomBrightnessContrast (brightness_by_max) does through a lookup table.
    The label is untouched."""

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, p: float = 0.3):
        if not (brightness >= 0 and contrast >= 0):
            raise ValueError(f"brightness and contrast limits must be >= 0, got {brightness}, {contrast}")
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.p = _check_probability(p, "p")

    def __call__(self, image, label, generator):
        if not _coin(generator, self.p):
            return image, label
        alpha = 1.0 + _uniform(generator, -self.contrast, self.contrast)
        beta = _uniform(generator, -self.brightness, self.brightness) * 255.0
        values = torch.arange(256, dtype=torch.float32, device=image.device)
        lut = (values * alpha + beta).clamp_(0, 255).to(torch.uint8)
        return lut[image.long()], label

    def __repr__(self):
        return f"BrightnessContrast(brightness={self.brightness}, contrast={self.contrast}, p={self.p})"


def train_transform(crop_height_range: Sequence[int] = (341, 950), crop_size: Sequence[int] = (512, 1024),
                    aspect: float = 2.0, flip_p: float = 0.5, brightness: float = 0.2,
                    contrast: float = 0.2, brightness_contrast_p: float = 0.3) -> Compose:
    """The released training augmentation (docs/recipes.md §4): random sized crop resized to `crop_size`,
    horizontal flip, brightness/contrast. Height ranges: GTA5 (341, 950), Cityscapes at
    2048x1024 (341, 1000), SYNTHIA (341, 640)."""
    return Compose([
        RandomSizedCrop(crop_height_range, aspect, crop_size),
        HorizontalFlip(flip_p),
        BrightnessContrast(brightness, contrast, brightness_contrast_p),
    ])


def val_transform(size: Optional[Sequence[int]] = None) -> Compose:
    """Evaluation transform: a fixed resize to `size` = (height, width), or nothing if None."""
    return Compose([] if size is None else [Resize(size)])
