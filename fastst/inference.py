"""Multi-scale, flip-averaged class probabilities of a segmentation model (SPEC section 3).

Convention (IAST's released evaluation and SPEC section 1): every resize is bilinear with
`align_corners=True`; the image is resized to each scale, the logits are upsampled to the output
size and turned into probabilities there (softmax after the upsample, as the pseudo-label op does
with `from_logits=True`), and the softmax maps of all scales and flips are summed before any
argmax. IAST's evaluation script takes the softmax before the upsample; the two differ only in
the argmax of a few boundary pixels. Pass `align_corners=False` for the other convention."""
import contextlib
import math

import torch
import torch.nn.functional as F

__all__ = ["predict_probs", "scaled_size"]


def scaled_size(size, scale):
    """(round(H * scale), round(W * scale)), at least 1 each."""
    return tuple(max(1, int(round(side * scale))) for side in size)


@torch.no_grad()
def predict_probs(model, images, *, scales=(1.0,), flip=False, out_size=None, input_size=None,
                  align_corners=True, autocast_dtype=None):
    """Sum of softmax maps over scales (and horizontal flips) of `model` on `images`.

    images: float (B, 3, H, W), already normalised, on the model's device.
    scales: positive factors applied to `input_size` (default (H, W)) to get each input size.
    flip: also run each scaled image mirrored and add its (mirrored back) probabilities.
    out_size: (H', W') of the output, default (H, W); logits are upsampled to it.
    autocast_dtype: e.g. torch.bfloat16 to run the model under autocast; softmax stays float32.
    Returns float32 (B, C, H', W'): per pixel the sum of len(scales) * (2 if flip else 1)
    probability vectors. The model's train/eval mode is left as the caller set it (call
    `model.eval()` first for evaluation); no gradients are recorded."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be a float tensor (normalised), got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    scales = tuple(float(s) for s in scales)
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales}")
    size = tuple(images.shape[-2:])
    base_size = size if input_size is None else _pair("input_size", input_size)
    out_size = size if out_size is None else _pair("out_size", out_size)
    amp = torch.autocast(device_type=images.device.type, dtype=autocast_dtype) \
        if autocast_dtype is not None else contextlib.nullcontext()

    total = None
    for scale in scales:
        target_size = scaled_size(base_size, scale)
        scaled = images if target_size == size else F.interpolate(
            images, size=target_size, mode="bilinear", align_corners=align_corners)
        views = (scaled, scaled.flip(-1)) if flip else (scaled,)
        for view_index, view in enumerate(views):
            with amp:
                logits = model(view)
            if logits.dim() != 4 or logits.shape[0] != images.shape[0]:
                raise ValueError(f"model must return (B, C, h, w) logits, got "
                                 f"{tuple(logits.shape)}")
            logits = logits.float()
            if tuple(logits.shape[-2:]) != out_size:
                logits = F.interpolate(logits, size=out_size, mode="bilinear",
                                       align_corners=align_corners)
            probs = torch.softmax(logits, dim=1)
            if view_index == 1:
                probs = probs.flip(-1)
            total = probs if total is None else total.add_(probs)
    return total


def _pair(name, value):
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (H, W) of positive ints, got {value!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"{name} must be a pair (H, W) of positive ints, got {value!r}")
    return height, width
