"""Multi-scale, flip-averaged class scores of a segmentation model (README "Evaluation").

Convention (IAST's released evaluation): every resize is bilinear with `align_corners=True`; the
image is resized to each scale, the logits are upsampled to the output size and turned into
probabilities there (softmax after the upsample, as the pseudo-label op does with
`from_logits=True`), and the softmax maps of all scales and flips are summed before any argmax
(`predict_probs`). `predict_scores` also gives the released evaluations' other orders: IAST's
network upsamples its logits to the input size itself (the softmax is taken there and the flip
pair summed there before the resize to the output), CRST averages upsampled logits instead of
probabilities. They differ only in the argmax of a few boundary pixels. Pass
`align_corners=False` for the other resize convention."""
import contextlib
import math

import torch
import torch.nn.functional as F

__all__ = ["COMBINE_MODES", "predict_probs", "predict_scores", "scaled_size"]

# What predict_scores sums over the views: softmax maps or logits.
COMBINE_MODES = ("softmax", "logits")


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
    _check_images(images)
    scales = tuple(float(s) for s in scales)
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales}")
    base_size = tuple(images.shape[-2:]) if input_size is None else _pair("input_size", input_size)
    return predict_scores(model, images, [scaled_size(base_size, s) for s in scales], flip=flip,
                          out_size=out_size, align_corners=align_corners,
                          autocast_dtype=autocast_dtype)


@torch.no_grad()
def predict_scores(model, images, sizes, *, flip=False, out_size=None, combine="softmax",
                   at_input_size=False, align_corners=True, autocast_dtype=None):
    """Class scores of `model` on `images` summed over input sizes (and horizontal flips); their
    argmax over classes is the prediction.

    images: float (B, 3, H, W), already normalised, on the model's device.
    sizes: the (h, w) sizes the images are resized to, one model input each.
    flip: also run each resized image mirrored and add its (mirrored back) scores.
    out_size: (H', W') of the output, default (H, W).
    combine: "softmax" sums probability maps, "logits" sums logits (their mean, as CRST averages,
    has the same argmax).
    at_input_size: False upsamples the logits straight to `out_size`; True first upsamples them to
    the input size (h, w), as IAST's released network does, takes the softmax there, sums the flip
    pair there and resizes that sum to `out_size`.
    autocast_dtype: e.g. torch.bfloat16 to run the model under autocast; scores stay float32.
    Returns float32 (B, C, H', W'). The model's train/eval mode is left as the caller set it;
    no gradients are recorded."""
    _check_images(images)
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)}, got {combine!r}")
    sizes = [_pair("sizes", size) for size in sizes]
    if not sizes:
        raise ValueError("sizes must name at least one input size (H, W)")
    size = tuple(images.shape[-2:])
    out_size = size if out_size is None else _pair("out_size", out_size)
    amp = torch.autocast(device_type=images.device.type, dtype=autocast_dtype) \
        if autocast_dtype is not None else contextlib.nullcontext()

    total = None
    for input_size in sizes:
        scaled = images if input_size == size else F.interpolate(
            images, size=input_size, mode="bilinear", align_corners=align_corners)
        score_size = input_size if at_input_size else out_size
        views = (scaled, scaled.flip(-1)) if flip else (scaled,)
        pair = None
        for view_index, view in enumerate(views):
            with amp:
                logits = model(view)
            if logits.dim() != 4 or logits.shape[0] != images.shape[0]:
                raise ValueError(f"model must return (B, C, h, w) logits, got "
                                 f"{tuple(logits.shape)}")
            logits = logits.float()
            if tuple(logits.shape[-2:]) != score_size:
                logits = F.interpolate(logits, size=score_size, mode="bilinear",
                                       align_corners=align_corners)
            scores = torch.softmax(logits, dim=1) if combine == "softmax" else logits
            if view_index == 1:
                scores = scores.flip(-1)
            pair = scores if pair is None else pair.add_(scores)
        if tuple(pair.shape[-2:]) != out_size:
            pair = F.interpolate(pair, size=out_size, mode="bilinear", align_corners=align_corners)
        total = pair if total is None else total.add_(pair)
    return total


def _check_images(images):
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be a float tensor (normalised), got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")


def _pair(name, value):
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (H, W) of positive ints, got {value!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"{name} must be a pair (H, W) of positive ints, got {value!r}")
    return height, width
