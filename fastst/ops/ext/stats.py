"""The fused statistics pass (docs/ops.md §1): fastst::pixel_stats and its fake kernel."""
from typing import Tuple

import torch

from .._backend import extension, sync_debug
from . import DTYPE_CODES


def new_stats_outputs(x: torch.Tensor, out_h: int, out_w: int):
    """Fresh outputs of a statistics pass over x (B, C, h, w): m (B, H, W) float32 and a
    (B, H, W) uint8 left uninitialised, counts (B, C) int64 and flags (1,) int32 zeroed."""
    B, C = x.shape[0], x.shape[1]
    return (torch.empty((B, out_h, out_w), dtype=torch.float32, device=x.device),
            torch.empty((B, out_h, out_w), dtype=torch.uint8, device=x.device),
            torch.zeros((B, C), dtype=torch.int64, device=x.device),
            torch.zeros((1,), dtype=torch.int32, device=x.device))


def stats_fake(x, from_logits, out_h, out_w, align_corners):
    """The fake (meta) kernel of every statistics-pass op: shapes and dtypes only."""
    return new_stats_outputs(x, out_h, out_w)


@torch.library.custom_op("fastst::pixel_stats", mutates_args=())
def pixel_stats(x: torch.Tensor, from_logits: bool, out_h: int, out_w: int,
                align_corners: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused per-pixel statistics pass over scores of any strides.

    Args:
        x: (B, C, h, w) float32/float16/bfloat16 probabilities, or logits if `from_logits`.
        from_logits: compute p = softmax(x) in float32 (after the upsample) instead of p = x.
        out_h, out_w: output size (H, W); when it differs from (h, w), x is bilinearly upsampled
            on the fly exactly as F.interpolate(mode="bilinear", align_corners=align_corners).
        align_corners: as in F.interpolate.
    Returns:
        m: (B, H, W) float32, max_c p (+0.0 for a zero maximum).
        a: (B, H, W) uint8, argmax_c p, lowest index on ties.
        counts: (B, C) int64, pixels per (image, argmax class).
        flags: (1,) int32, bit 0 set if x had NaN/Inf, bit 1 if a probability was outside [0, 1].
    """
    B, C, h, w = x.shape
    m, a, counts, flags = new_stats_outputs(x, out_h, out_w)
    ext = extension()
    common = (x.data_ptr(), DTYPE_CODES[x.dtype], (B, C, h, w), (out_h, out_w), tuple(x.stride()),
              from_logits, align_corners, m.data_ptr(), a.data_ptr(), counts.data_ptr(), flags.data_ptr())
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):  # the input's device current for the launch
            stream = torch.cuda.current_stream(x.device).cuda_stream
            ext.stats_cuda(*common, x.device.index, stream)
            sync_debug(x.device, "fastst._C.stats_cuda")
    else:
        ext.stats_cpu(*common)
    return m, a, counts, flags


pixel_stats.register_fake(stats_fake)
