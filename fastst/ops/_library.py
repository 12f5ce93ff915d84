"""torch.library custom ops around the launchers of fastst._C.

Outputs and workspaces are allocated with torch (so the caching allocator serves them); raw
pointers, sizes, dtype codes and, on CUDA, the device index and the current stream are passed
down. Each op has a fake (meta) implementation, so it traces under torch.compile.
"""
from typing import Tuple

import torch

from ._backend import extension

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


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
        stream = torch.cuda.current_stream(x.device).cuda_stream
        ext.stats_cuda(*common, x.device.index, stream)
    else:
        ext.stats_cpu(*common)
    return m, a, counts, flags


pixel_stats.register_fake(stats_fake)


@torch.library.custom_op("fastst::ias_select", mutates_args=())
def ias_select(m: torch.Tensor, a: torch.Tensor, counts: torch.Tensor, theta: torch.Tensor,
               alpha: float, beta: float, gamma: float, official: bool,
               group: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IAS thresholds and labels from the statistics pass (docs/ops.md §1), both modes, on the CPU or a
    CUDA device (no host sync there: official = histograms + one block per class, paper = one
    radix sort of packed keys + one thread per class).

    Args:
        m: (B, H, W) float32, a: (B, H, W) uint8, counts: (B, C) int64 (from pixel_stats).
        theta: (C,) float64 threshold before the first instance.
        official: docs/ops.md §1.2 (float16 values, numpy percentile, clip) instead of 1.1.
        group: images per instance.
    Returns:
        labels (B, H, W) uint8, theta_out (C,) float64, theta_per_instance (G, C) float64.
    """
    B, C = counts.shape
    G = -(-B // group)
    m, a, counts, theta = m.contiguous(), a.contiguous(), counts.contiguous(), theta.contiguous()
    labels = torch.empty(m.shape, dtype=torch.uint8, device=m.device)
    theta_out = torch.empty((C,), dtype=torch.float64, device=m.device)
    per_instance = torch.empty((G, C), dtype=torch.float64, device=m.device)
    if m.device.type == "cuda":
        ext = extension()
        stream = torch.cuda.current_stream(m.device).cuda_stream
        common = (m.data_ptr(), a.data_ptr(), counts.data_ptr(), B, C, m[0].numel())
        outputs = (theta.data_ptr(), theta_out.data_ptr(), per_instance.data_ptr(), labels.data_ptr(),
                   alpha, beta, gamma, m.device.index, stream)
        if official:
            hist = torch.zeros((G, C, ext.ias_official_bins), dtype=torch.int32, device=m.device)
            ext.ias_official_cuda(*common, group, hist.data_ptr(), *outputs)
        else:
            keys = torch.empty((2, m.numel()), dtype=torch.int64, device=m.device)
            temp_bytes = ext.ias_paper_temp_bytes(m.numel(), B * C)
            temp = torch.empty((max(temp_bytes, 1),), dtype=torch.uint8, device=m.device)
            ext.ias_paper_cuda(*common, keys[0].data_ptr(), keys[1].data_ptr(), temp.data_ptr(),
                               temp_bytes, *outputs)
        return labels, theta_out, per_instance
    extension().ias_select_cpu(m.data_ptr(), a.data_ptr(), counts.data_ptr(), B, C,
                               m[0].numel(), theta.data_ptr(), theta_out.data_ptr(),
                               per_instance.data_ptr(), labels.data_ptr(), alpha, beta, gamma,
                               official, group)
    return labels, theta_out, per_instance


@ias_select.register_fake
def _ias_select_fake(m, a, counts, theta, alpha, beta, gamma, official, group):
    B, C = counts.shape
    G = -(-B // group)
    return (m.new_empty(m.shape, dtype=torch.uint8), m.new_empty((C,), dtype=torch.float64),
            m.new_empty((G, C), dtype=torch.float64))
