"""Triton twin of the TPLD vote `fastst::tpld_vote_cpp` (docs/ops.md §6).

Two kernels. The pixel pass reads the probabilities once: q = div_rn(p, lambda) per class in
class order, q's top-2 (k1, k2, q1, q2; strict '>' so the lower index wins ties), the confident
map and the value flags (kernels/cbst.h). The vote kernel runs once per iteration: every
unlabelled pixel walks its clipped window in row-major order over the previous map and the
q-at-own-label map, pooling only its two candidate classes in float64 (so the cost does not
grow with C), and scores them with the float64 weights loaded from memory (Triton passes float
scalars as float32) without FMA (the launch disables fusion): the C++ twin's arithmetic, so the
labels are equal bit for bit. Neighbour reads go through L1/L2 (a block of pixels shares most
of its window rows); iterations always run to the end (no host sync to stop early).

Why Triton and not CUDA for the GPU: the vote is memory-bound gathers with no need for warp
primitives, Triton's interpreter tests the very kernel on the CPU machines here, and
`tpld_vote` on CUDA tensors then needs no nvcc build.
"""
from __future__ import annotations

import contextlib
from typing import Tuple

import torch

from .._backend import sync_debug
from .._checks import check_triton_device
from .stats import INTERPRETED, _bit_or, _flags_of

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("fastst.ops.triton needs Triton (>= 3.2) for the 'triton' backend: "
                      "pip install triton") from exc

__all__ = ["tpld_vote_triton", "image_confidence_triton", "cbst_label_triton"]

BLOCK = 256
NUM_WARPS = 4


@triton.jit
def _tpld_pixels_kernel(p_ptr, lam_ptr, labels_ptr, k1_ptr, k2_ptr, q1_ptr, q2_ptr, flags_ptr, counts_ptr,
                        H, W, stride_b, stride_c, stride_h, stride_w,
                        C: tl.constexpr, BLOCK: tl.constexpr, COUNT: tl.constexpr, TOP2: tl.constexpr,
                        NUM_BINS: tl.constexpr):
    """Program (block, b): BLOCK pixels of image b. p: (B, C, H, W) any float dtype and strides;
    lam: (C,) float32; outputs (B, H, W) contiguous. COUNT: also add each pixel to counts
    (B, C, 2) int32 [N_k, N*_k] at k = argmax p (lowest index on ties), N* where q_k >= 1
    (image_confidence, docs/ops.md §6), through block histograms of NUM_BINS (a power of two
    > C) bins. TOP2: also store k1, k2, q1, q2 (the vote's inputs)."""
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < H * W
    y = (pix // W).to(tl.int64)
    x = (pix % W).to(tl.int64)
    base = p_ptr + b * stride_b + y * stride_h + x * stride_w
    q1 = tl.full([BLOCK], -1.0, tl.float32)
    q2 = tl.full([BLOCK], -1.0, tl.float32)
    k1 = tl.zeros([BLOCK], dtype=tl.int32)
    k2 = tl.zeros([BLOCK], dtype=tl.int32)
    p_best = tl.full([BLOCK], -1.0, tl.float32)
    k_best = tl.zeros([BLOCK], dtype=tl.int32)
    flags = tl.zeros([BLOCK], dtype=tl.int32)
    for c in range(0, C):
        p = tl.load(base + tl.cast(c, tl.int64) * stride_c, mask=mask, other=0.0).to(tl.float32)
        lam = tl.load(lam_ptr + c + tl.zeros([BLOCK], dtype=tl.int32))
        q = tl.math.div_rn(p, lam)
        flags = flags | _flags_of(p, False)
        if COUNT:
            gt_p = p > p_best
            k_best = tl.where(gt_p, c, k_best)
            p_best = tl.where(gt_p, p, p_best)
        gt1 = q > q1
        gt2 = q > q2
        q2 = tl.where(gt1, q1, tl.where(gt2, q, q2))
        k2 = tl.where(gt1, k1, tl.where(gt2, c, k2))
        q1 = tl.where(gt1, q, q1)
        k1 = tl.where(gt1, c, k1)
    out = b * H * W + pix
    tl.store(labels_ptr + out, tl.where(q1 >= 1.0, k1, 255).to(tl.uint8), mask=mask)
    if TOP2:
        tl.store(k1_ptr + out, k1.to(tl.uint8), mask=mask)
        tl.store(k2_ptr + out, k2.to(tl.uint8), mask=mask)
        tl.store(q1_ptr + out, q1, mask=mask)
        tl.store(q2_ptr + out, q2, mask=mask)
    if COUNT:
        # Per-block histograms of k (all pixels, and those with q_k >= 1), then one atomic per
        # (block, class present, counter) rather than two per pixel, as stats.py does. Lanes
        # not counted go to bin NUM_BINS - 1 >= C, which is dropped.
        q_best = tl.math.div_rn(p_best, tl.load(lam_ptr + k_best, mask=mask, other=1.0))
        n_all = tl.histogram(tl.where(mask, k_best, NUM_BINS - 1), NUM_BINS)
        n_sure = tl.histogram(tl.where(mask & (q_best >= 1.0), k_best, NUM_BINS - 1), NUM_BINS)
        bins = tl.arange(0, NUM_BINS)
        slot = counts_ptr + (b * C + bins) * 2
        tl.atomic_add(slot, n_all, mask=(bins < C) & (n_all > 0), sem="relaxed")
        tl.atomic_add(slot + 1, n_sure, mask=(bins < C) & (n_sure > 0), sem="relaxed")
    block_flags = tl.reduce(tl.where(mask, flags, 0), 0, _bit_or)
    tl.atomic_or(flags_ptr + tl.zeros([1], dtype=tl.int32), block_flags + tl.zeros([1], dtype=tl.int32),
                 mask=(block_flags + tl.zeros([1], dtype=tl.int32)) != 0, sem="relaxed")


@triton.jit
def _tpld_vote_kernel(lab_in, q_in, lab_out, q_out, k1_ptr, k2_ptr, q1_ptr, q2_ptr, weights_ptr,
                      H, W, WINDOW: tl.constexpr, BLOCK: tl.constexpr):
    """One iteration for BLOCK pixels of image program_id(1): lab_in/q_in the previous map and
    the q of each labelled pixel at its label (0 elsewhere); weights = [weight, 1 - weight]
    float64."""
    b = tl.program_id(1).to(tl.int64)
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < H * W
    y = pix // W
    x = pix % W
    image = b * H * W
    own = tl.load(lab_in + image + pix, mask=mask, other=255).to(tl.int32)
    own_q = tl.load(q_in + image + pix, mask=mask, other=0.0)
    k1 = tl.load(k1_ptr + image + pix, mask=mask, other=0).to(tl.int32)
    k2 = tl.load(k2_ptr + image + pix, mask=mask, other=0).to(tl.int32)
    q1 = tl.load(q1_ptr + image + pix, mask=mask, other=0.0)
    q2 = tl.load(q2_ptr + image + pix, mask=mask, other=0.0)
    todo = mask & (own == 255)
    sum1 = tl.zeros([BLOCK], dtype=tl.float64)
    sum2 = tl.zeros([BLOCK], dtype=tl.float64)
    n1 = tl.zeros([BLOCK], dtype=tl.int32)
    n2 = tl.zeros([BLOCK], dtype=tl.int32)
    for dy in range(0, WINDOW):
        yy = y + (dy - WINDOW // 2)
        row_ok = todo & (yy >= 0) & (yy < H)
        for dx in range(0, WINDOW):
            xx = x + (dx - WINDOW // 2)
            ok = row_ok & (xx >= 0) & (xx < W)
            at = image + yy * W + xx
            lab = tl.load(lab_in + at, mask=ok, other=255).to(tl.int32)
            qv = tl.load(q_in + at, mask=ok, other=0.0).to(tl.float64)
            hit1 = lab == k1
            hit2 = lab == k2
            sum1 += tl.where(hit1, qv, 0.0)
            sum2 += tl.where(hit2, qv, 0.0)
            n1 += hit1.to(tl.int32)
            n2 += hit2.to(tl.int32)
    weight = tl.load(weights_ptr + tl.zeros([BLOCK], dtype=tl.int32))
    rest = tl.load(weights_ptr + 1 + tl.zeros([BLOCK], dtype=tl.int32))
    # float64 `/` lowers to div.rn.f64 (PTX has no approximate float64 division)
    pool1 = tl.where(n1 > 0, sum1 / tl.maximum(n1, 1).to(tl.float64), 0.0)
    pool2 = tl.where(n2 > 0, sum2 / tl.maximum(n2, 1).to(tl.float64), 0.0)
    s1 = weight * q1.to(tl.float64) + rest * pool1
    s2 = weight * q2.to(tl.float64) + rest * pool2
    first = s1 >= s2
    best = tl.where(first, s1, s2)
    take = todo & (best > 1.0)
    label = tl.where(take, tl.where(first, k1, k2), own)
    label_q = tl.where(take, tl.where(first, q1, q2), own_q)
    tl.store(lab_out + image + pix, label.to(tl.uint8), mask=mask)
    tl.store(q_out + image + pix, label_q, mask=mask)


@torch.library.custom_op("fastst::tpld_vote_triton", mutates_args=())
def tpld_vote_triton(probs: torch.Tensor, lambdas: torch.Tensor, window: int, weight: float,
                     iterations: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """TPLD voting (Triton): arguments and outputs as `fastst::tpld_vote_cpp` (labels (B, H, W)
    uint8, flags (1,) int32). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    labels, k1, k2, q1, q2, flags = _pixel_pass("fastst::tpld_vote_triton", probs, lambdas)
    if iterations == 0:
        return labels, flags
    B, _, H, W = probs.shape
    dev = probs.device
    own_q = torch.where(labels != 255, q1, torch.zeros_like(q1))
    weights = vote_weights(weight, dev)
    other, other_q = torch.empty_like(labels), torch.empty_like(own_q)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        for _ in range(iterations):
            _tpld_vote_kernel[_grid(B, H, W)](labels, own_q, other, other_q, k1, k2, q1, q2, weights, H, W,
                                              **vote_meta(window))
            labels, other = other, labels
            own_q, other_q = other_q, own_q
            sync_debug(dev, "the Triton vote kernel")
    return labels, flags


_VOTE_WEIGHTS = {}  # (device, weight) -> float64 (2,) [weight, 1 - weight] there


def vote_weights(weight: float, device: torch.device) -> torch.Tensor:
    """[weight, 1 - weight] (1 - weight in float64) as a float64 tensor on ``device``, made once
    per device and weight: a tensor made from Python numbers is a blocking host-to-device copy
    (and cannot be made during CUDA graph capture), so each call must not make its own."""
    key = (torch.device(device), float(weight))
    if key not in _VOTE_WEIGHTS:
        _VOTE_WEIGHTS[key] = torch.tensor([weight, 1.0 - weight], dtype=torch.float64,
                                          device=device)
    return _VOTE_WEIGHTS[key]


def pixels_meta(C: int, count: bool, top2: bool) -> dict:
    """Constexprs and launch options of `_tpld_pixels_kernel` (the launcher and the compile
    check, launch_configs.py, both use it): BLOCK pixels, two per thread; no FMA contraction
    (the C++ twin is built with -ffp-contract=off; q is an IEEE division either way)."""
    return dict(C=C, BLOCK=BLOCK, COUNT=count, TOP2=top2, NUM_BINS=triton.next_power_of_2(C + 1),
                num_warps=NUM_WARPS, enable_fp_fusion=False)


def vote_meta(window: int) -> dict:
    """Constexprs and launch options of `_tpld_vote_kernel`: the float64 scores are not contracted
    into FMAs, so they round like the C++ twin's."""
    return dict(WINDOW=window, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)


def _grid(B: int, H: int, W: int) -> Tuple[int, int]:
    return (triton.cdiv(H * W, BLOCK), B)


def _pixel_pass(op_name: str, probs: torch.Tensor, lambdas: torch.Tensor, counts=None, top2: bool = True):
    """The pixel kernel over probs (B, C, H, W): (labels uint8, k1, k2 uint8, q1, q2 float32, all
    (B, H, W), or None without ``top2``; flags (1,) int32), adding to counts (B, C, 2) int32
    when given."""
    check_triton_device(op_name, probs.device, INTERPRETED)
    B, C, H, W = probs.shape
    dev = probs.device
    labels = torch.empty((B, H, W), dtype=torch.uint8, device=dev)
    flags = torch.zeros((1,), dtype=torch.int32, device=dev)
    k1 = k2 = q1 = q2 = None
    if top2:
        k1, k2 = torch.empty_like(labels), torch.empty_like(labels)
        q1 = torch.empty((B, H, W), dtype=torch.float32, device=dev)
        q2 = torch.empty_like(q1)
    unused = flags  # stands in for outputs the launch does not write
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _tpld_pixels_kernel[_grid(B, H, W)](probs, lambdas.contiguous(), labels, *(t if top2 else unused for t in (k1, k2, q1, q2)),
                                            flags, unused if counts is None else counts, H, W, *probs.stride(),
                                            **pixels_meta(C, counts is not None, top2))
    sync_debug(dev, "the Triton TPLD pixel kernel")
    return labels, k1, k2, q1, q2, flags


@tpld_vote_triton.register_fake
def _tpld_vote_triton_fake(probs, lambdas, window, weight, iterations):
    B, _, H, W = probs.shape
    return probs.new_empty((B, H, W), dtype=torch.uint8), probs.new_empty((1,), dtype=torch.int32)


@torch.library.custom_op("fastst::image_confidence_triton", mutates_args=())
def image_confidence_triton(probs: torch.Tensor,
                            lambdas: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """conf_t per image fused with the confident-label pass (docs/ops.md §6), Triton: arguments and
    outputs as `fastst::image_confidence_cpp` (labels (B, H, W) uint8, conf (B,) float64, flags
    (1,) int32). One pass over probs counts N_k and N*_k per image (block histograms, then one
    integer atomic per block and class present, so the counts do not depend on the order); conf then follows in float64 with the classes added in
    ascending order (reference.confidence_from_counts). No host synchronisation."""
    from .. import reference
    B, C = probs.shape[:2]
    counts = torch.zeros((B, C, 2), dtype=torch.int32, device=probs.device)
    labels, *_, flags = _pixel_pass("fastst::image_confidence_triton", probs, lambdas, counts, top2=False)
    conf = reference.confidence_from_counts(counts[..., 0], counts[..., 1], lambdas)
    return labels, conf, flags


@image_confidence_triton.register_fake
def _image_confidence_triton_fake(probs, lambdas):
    B, _, H, W = probs.shape
    return (probs.new_empty((B, H, W), dtype=torch.uint8), probs.new_empty((B,), dtype=torch.float64),
            probs.new_empty((1,), dtype=torch.int32))


@torch.library.custom_op("fastst::cbst_label_triton", mutates_args=())
def cbst_label_triton(probs: torch.Tensor, lambdas: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """CBST labels / TPLD confident map (docs/ops.md §5, §6) in Triton: arguments and outputs as
    `fastst::cbst_label_cpp` (labels (B, H, W) uint8, flags (1,) int32); one pass over probs."""
    labels, *_, flags = _pixel_pass("fastst::cbst_label_triton", probs, lambdas, top2=False)
    return labels, flags


@cbst_label_triton.register_fake
def _cbst_label_triton_fake(probs, lambdas):
    B, _, H, W = probs.shape
    return probs.new_empty((B, H, W), dtype=torch.uint8), probs.new_empty((1,), dtype=torch.int32)
