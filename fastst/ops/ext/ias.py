"""IAS thresholds and labels (docs/ops.md §1): fastst::ias_select and its fake kernel."""
from typing import Tuple

import torch

from .._backend import extension, sync_debug


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
        # The input's device is current for the launch and the CUB workspace query (torch's
        # guard switches only when needed and restores on every path; the C++ guard then has
        # nothing to switch).
        with torch.cuda.device(m.device):
            ext = extension()
            stream = torch.cuda.current_stream(m.device).cuda_stream
            common = (m.data_ptr(), a.data_ptr(), counts.data_ptr(), B, C, m[0].numel())
            outputs = (theta.data_ptr(), theta_out.data_ptr(), per_instance.data_ptr(),
                       labels.data_ptr(), alpha, beta, gamma, m.device.index, stream)
            if official:
                hist = torch.zeros((G, C, ext.ias_official_bins), dtype=torch.int32, device=m.device)
                ext.ias_official_cuda(*common, group, hist.data_ptr(), *outputs)
                sync_debug(m.device, "fastst._C.ias_official_cuda")
            else:
                keys = torch.empty((2, m.numel()), dtype=torch.int64, device=m.device)
                temp_bytes = ext.ias_paper_temp_bytes(m.numel(), B * C)
                temp = torch.empty((max(temp_bytes, 1),), dtype=torch.uint8, device=m.device)
                ext.ias_paper_cuda(*common, keys[0].data_ptr(), keys[1].data_ptr(), temp.data_ptr(),
                                   temp_bytes, *outputs)
                sync_debug(m.device, "fastst._C.ias_paper_cuda")
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
