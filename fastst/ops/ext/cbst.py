"""CBST (docs/ops.md §5): labels (on the per-pixel pass of ext/tpld.py), the collection of the
confident values and the class thresholds: fastst::cbst_label_cpp, cbst_collect_cpp, cbst_thresholds_cpp."""
from typing import Tuple

import torch

from .._backend import extension
from .tpld import _pixels


@torch.library.custom_op("fastst::cbst_label_cpp", mutates_args=())
def cbst_label_cpp(probs: torch.Tensor, lambdas: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """CBST labels / TPLD confident map (docs/ops.md §5, §6) on the CPU.

    Args:
        probs: (B, C, H, W) float32/float16/bfloat16, any strides. lambdas: (C,) float32 contiguous.
    Returns:
        labels (B, H, W) uint8; flags (1,) int32 (kernels/stats.h value flags of probs).
    """
    labels, *_, flags = _pixels(probs, lambdas, vote=False, confidence=False)
    return labels, flags


@cbst_label_cpp.register_fake
def _cbst_label_fake(probs, lambdas):
    B, _, H, W = probs.shape
    return probs.new_empty((B, H, W), dtype=torch.uint8), probs.new_empty((1,), dtype=torch.int32)


@torch.library.custom_op("fastst::cbst_collect_cpp", mutates_args=())
def cbst_collect_cpp(m: torch.Tensor, a: torch.Tensor, num_classes: int, subsample: int,
                     total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The values a class-balanced threshold keeps (docs/ops.md §5), on the CPU.

    Args:
        m: (B, H, W) float32 max probability; a: (B, H, W) uint8 argmax (< num_classes).
        total: sum over (image, class) of ceil(count / subsample), the number of kept values.
    Returns:
        values (total,) float32 and classes (total,) uint8, row-major per image.
    """
    B = m.shape[0]
    m, a = m.contiguous(), a.contiguous()
    values = torch.empty((total,), dtype=torch.float32, device=m.device)
    classes = torch.empty((total,), dtype=torch.uint8, device=m.device)
    extension().cbst_collect_cpu(m.data_ptr(), a.data_ptr(), B, m[0].numel(), num_classes, subsample,
                                 values.data_ptr(), classes.data_ptr())
    return values, classes


@cbst_collect_cpp.register_fake
def _cbst_collect_fake(m, a, num_classes, subsample, total):
    return m.new_empty((total,), dtype=torch.float32), m.new_empty((total,), dtype=torch.uint8)


@torch.library.custom_op("fastst::cbst_thresholds_cpp", mutates_args=())
def cbst_thresholds_cpp(values: torch.Tensor, classes: torch.Tensor, num_classes: int,
                        portion: float) -> torch.Tensor:
    """Exact class-balanced thresholds (C,) float32 from the kept values (docs/ops.md §5), on the CPU."""
    values, classes = values.contiguous(), classes.contiguous()
    lambdas = torch.empty((num_classes,), dtype=torch.float32, device=values.device)
    extension().cbst_thresholds_cpu(values.data_ptr(), classes.data_ptr(), values.numel(), num_classes,
                                    portion, lambdas.data_ptr())
    return lambdas


@cbst_thresholds_cpp.register_fake
def _cbst_thresholds_fake(values, classes, num_classes, portion):
    return values.new_empty((num_classes,), dtype=torch.float32)
