"""TPLD voting and image confidence (docs/ops.md §6): the per-pixel pass of fastst._C (shared with
the CBST labels, ext/cbst.py), fastst::tpld_vote_cpp and fastst::image_confidence_cpp."""
from typing import Tuple

import torch

from .._backend import extension
from . import DTYPE_CODES


def _pixels(probs: torch.Tensor, lambdas: torch.Tensor, *, vote: bool, confidence: bool):
    """Run the per-pixel pass; returns (labels, k1, k2, q1, q2, conf, flags), unused ones None."""
    B, C, H, W = probs.shape
    labels = torch.empty((B, H, W), dtype=torch.uint8, device=probs.device)
    k1 = k2 = q1 = q2 = conf = None
    if vote:
        k1, k2 = torch.empty_like(labels), torch.empty_like(labels)
        q1 = torch.empty((B, H, W), dtype=torch.float32, device=probs.device)
        q2 = torch.empty_like(q1)
    if confidence:
        conf = torch.empty((B,), dtype=torch.float64, device=probs.device)
    flags = torch.zeros((1,), dtype=torch.int32, device=probs.device)
    address = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    extension().tpld_pixels_cpu(probs.data_ptr(), DTYPE_CODES[probs.dtype], (B, C, H, W), tuple(probs.stride()),
                                lambdas.data_ptr(), labels.data_ptr(), address(k1), address(k2), address(q1),
                                address(q2), address(conf), flags.data_ptr())
    return labels, k1, k2, q1, q2, conf, flags


@torch.library.custom_op("fastst::image_confidence_cpp", mutates_args=())
def image_confidence_cpp(probs: torch.Tensor, lambdas: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """conf_t per image fused with the confident-label pass (docs/ops.md §6) on the CPU.

    Returns:
        labels (B, H, W) uint8, conf (B,) float64, flags (1,) int32.
    """
    labels, _, _, _, _, conf, flags = _pixels(probs, lambdas, vote=False, confidence=True)
    return labels, conf, flags


@image_confidence_cpp.register_fake
def _image_confidence_fake(probs, lambdas):
    B, _, H, W = probs.shape
    return (probs.new_empty((B, H, W), dtype=torch.uint8), probs.new_empty((B,), dtype=torch.float64),
            probs.new_empty((1,), dtype=torch.int32))


@torch.library.custom_op("fastst::tpld_vote_cpp", mutates_args=())
def tpld_vote_cpp(probs: torch.Tensor, lambdas: torch.Tensor, window: int, weight: float,
                  iterations: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """TPLD voting (docs/ops.md §6) on the CPU: one pass for q, top-2 and the confident map, then one
    window pass per iteration over the two candidate classes.

    Returns:
        labels (B, H, W) uint8, flags (1,) int32.
    """
    labels, k1, k2, q1, q2, _, flags = _pixels(probs, lambdas, vote=iterations > 0, confidence=False)
    if iterations > 0:
        B, _, H, W = probs.shape
        extension().tpld_vote_cpu(labels.data_ptr(), k1.data_ptr(), k2.data_ptr(), q1.data_ptr(), q2.data_ptr(),
                                  B, H, W, window, weight, iterations)
    return labels, flags


@tpld_vote_cpp.register_fake
def _tpld_vote_fake(probs, lambdas, window, weight, iterations):
    B, _, H, W = probs.shape
    return probs.new_empty((B, H, W), dtype=torch.uint8), probs.new_empty((1,), dtype=torch.int32)
