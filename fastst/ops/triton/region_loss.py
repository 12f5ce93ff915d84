"""Triton twin of the fused region loss `fastst::region_loss_cpp` (SPEC 2): parts and d loss /
d logits from the low-resolution logits and the labels, upsampling on the fly, with no
(B, C, H, W) tensor and no atomics.

The gradient is gathered, not scattered: program (jb, i, b) owns the low-resolution gradient
cells (b, :, i, jb*BLOCK_J .. +BLOCK_J). It visits every full-resolution pixel whose bilinear taps
touch those cells (rows whose upper source row is i - 1 or i, and the matching columns),
recomputes that pixel's softmax, accumulates the row weight times the pixel's gradient per
column, and contracts the columns with their weights at the end. Each cell is summed by one
program in a fixed order, so gradients are bit-identical from run to run (`deterministic=True`
holds by construction); the price is recomputing each pixel's softmax about 2.2 times (twice in
y, a little more in x), which is arithmetic, not memory traffic. The loss parts are summed only
over the pixels a program owns (upper source row i, left source column in its block), one
float32 partial per program, added in float64 on the device: no host synchronisation.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import contextlib
from typing import Tuple

import numpy as np
import torch

from .._region_loss_ops import new_region_loss_outputs, register_region_loss_op
from .stats import INTERPRETED, _linear_tap, _resize_scale

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("fastst.ops.triton needs Triton (>= 3.2) for the 'triton' backend: "
                      "pip install triton") from exc

__all__ = ["region_loss_triton"]

TILE_ELEMENTS = 8192  # C_PAD * BLOCK_X: the (classes x pixels) tile a program holds in registers


@triton.jit
def _first_source_index(cell, inv_scale, ALIGN_CORNERS: tl.constexpr):
    """A full-resolution index at or before the first one whose upper tap is `cell - 1` (the host
    checks the margin in `_axis_plan`, which evaluates the same float32 expression)."""
    c = cell.to(tl.float32)
    if ALIGN_CORNERS:
        t = (c - 1.0) * inv_scale
    else:
        t = (c - 0.5) * inv_scale - 0.5
    # cells 0 and 1 start at 0: sources below 0 are clamped to 0, so index 0 may touch cell 1
    t = tl.where((t < 0.0) | (c < 1.5), 0.0, t)
    return tl.maximum(t.to(tl.int32) - 1, 0)


@triton.jit
def _region_loss_kernel(x_ptr, t_ptr, grad_ptr, partial_ptr, coef_ptr,
                        h, w, H, W,
                        stride_b, stride_c, stride_h, stride_w,
                        scale_h, scale_w, inv_scale_h, inv_scale_w,
                        ignore_index,
                        C: tl.constexpr, C_PAD: tl.constexpr, BLOCK_X: tl.constexpr,
                        BLOCK_J: tl.constexpr, ROWS: tl.constexpr, RESIZE: tl.constexpr,
                        ALIGN_CORNERS: tl.constexpr, COMPUTE_GRAD: tl.constexpr):
    """Program (jb, i, b). x: (B, C, h, w) float32/float16/bfloat16, any strides; t: (B, H, W)
    uint8/int64 contiguous; grad: (B, C, h, w) float32; partial: (programs, 3) float32 sums of
    CE, KLD and entropy over the owned pixels; coef: float32 [1/n_v, 1/(C n_i), lambda_kld,
    lambda_ent] (0 for an empty set). Same size (RESIZE False): the program owns row i, pixels
    jb*BLOCK_X .. +BLOCK_X, and BLOCK_J == BLOCK_X."""
    jb = tl.program_id(0)
    i = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pid = (tl.program_id(2) * tl.num_programs(1) + i) * tl.num_programs(0) + jb

    inv_nv = tl.load(coef_ptr)
    inv_c_ni = tl.load(coef_ptr + 1)
    lambda_kld = tl.load(coef_ptr + 2)
    lambda_ent = tl.load(coef_ptr + 3)
    inv_c = 1.0 / C

    cls = tl.arange(0, C_PAD)
    cls_ok = cls < C
    j_start = jb * BLOCK_J
    if RESIZE:
        xs = _first_source_index(j_start, inv_scale_w, ALIGN_CORNERS) + tl.arange(0, BLOCK_X)
        x_ok = xs < W
        tx0, tx1, lx0, lx1 = _linear_tap(xs, w, scale_w, ALIGN_CORNERS)
        y_first = _first_source_index(i, inv_scale_h, ALIGN_CORNERS)
        owned_x = x_ok & (tx0 >= j_start) & (tx0 < j_start + BLOCK_J)
    else:
        xs = j_start + tl.arange(0, BLOCK_X)
        x_ok = xs < W
        tx0 = xs.to(tl.int64)
        tx1 = tx0
        y_first = i
        owned_x = x_ok
    mask2 = cls_ok[:, None] & x_ok[None, :]
    base = x_ptr + b * stride_b + cls.to(tl.int64)[:, None] * stride_c

    acc = tl.zeros([C_PAD, BLOCK_X], dtype=tl.float32)
    ce_sum = tl.zeros([BLOCK_X], dtype=tl.float32)
    kld_sum = tl.zeros([BLOCK_X], dtype=tl.float32)
    ent_sum = tl.zeros([BLOCK_X], dtype=tl.float32)
    for r in range(0, ROWS):
        y = y_first + r
        if RESIZE:
            ty0, ty1, ly0, ly1 = _linear_tap(y, h, scale_h, ALIGN_CORNERS)
            # weight of this row in cell row i; both taps count when they coincide (last row)
            wy = tl.where(ty0 == i, ly0, 0.0) + tl.where(ty1 == i, ly1, 0.0)
            owns_row = (ty0 == i) & (y < H)
        else:
            ty0 = y.to(tl.int64)
            ty1 = ty0
            ly0 = 1.0
            ly1 = 0.0
            wy = 1.0
            owns_row = y < H
        visit = owns_row
        if COMPUTE_GRAD:
            visit = visit | ((wy != 0.0) & (y < H))
        if visit:
            if RESIZE:
                v = ly0 * (lx0[None, :] * tl.load(base + ty0 * stride_h + tx0[None, :] * stride_w, mask=mask2, other=0.0).to(tl.float32)
                           + lx1[None, :] * tl.load(base + ty0 * stride_h + tx1[None, :] * stride_w, mask=mask2, other=0.0).to(tl.float32)) \
                    + ly1 * (lx0[None, :] * tl.load(base + ty1 * stride_h + tx0[None, :] * stride_w, mask=mask2, other=0.0).to(tl.float32)
                             + lx1[None, :] * tl.load(base + ty1 * stride_h + tx1[None, :] * stride_w, mask=mask2, other=0.0).to(tl.float32))
            else:
                v = tl.load(base + ty0 * stride_h + tx0[None, :] * stride_w, mask=mask2, other=0.0).to(tl.float32)
            label = tl.load(t_ptr + (b * H + y) * W + xs, mask=x_ok, other=ignore_index).to(tl.int32)
            labelled = (label != ignore_index) & (label >= 0) & (label < C)
            unlabelled = (label == ignore_index) | (label < 0) | (label >= C)  # no `~`: triton 3.2
            m = tl.max(tl.where(cls_ok[:, None], v, float("-inf")), axis=0)
            u = v - m[None, :]
            e = tl.where(cls_ok[:, None], tl.exp(u), 0.0)
            # s = 1 + rest: the max's e is exactly 1, kept out of the float sum (see the C++ twin)
            ones = (e == 1.0).to(tl.float32)
            rest = tl.sum(e - ones, axis=0) + (tl.sum(ones, axis=0) - 1.0)
            s = 1.0 + rest
            # log1p(rest) = log(s) * rest / (s - 1), exact in s when s rounds to 1 (Goldberg)
            log_s = tl.where(s == 1.0, rest, tl.log(s) * (rest / tl.where(s == 1.0, 1.0, s - 1.0)))
            inv_s = 1.0 / s
            expected = tl.sum(e * tl.where(cls_ok[:, None], u, 0.0), axis=0) * inv_s
            is_label = cls[:, None] == label[None, :]
            u_label = tl.sum(tl.where(is_label, u, 0.0), axis=0)
            u_sum = tl.sum(tl.where(cls_ok[:, None], u, 0.0), axis=0)
            owned = owned_x & owns_row
            ce_sum += tl.where(owned & labelled, log_s - u_label, 0.0)
            kld_sum += tl.where(owned & labelled, log_s - u_sum * inv_c, 0.0)
            ent_sum += tl.where(owned & x_ok & unlabelled, log_s - expected, 0.0)
            if COMPUTE_GRAD:
                lab = labelled.to(tl.float32)
                scale_p = lab * (1.0 + lambda_kld * inv_c) * inv_nv
                scale_pv = (1.0 - lab) * -lambda_ent * inv_c_ni
                shift = lab * -lambda_kld * inv_c * inv_c * inv_nv
                p = e * inv_s[None, :]
                g = p * (scale_p[None, :] + scale_pv[None, :] * (u - expected[None, :])) + shift[None, :]
                g = g - tl.where(is_label & labelled[None, :], inv_nv, 0.0)
                acc += wy * tl.where(mask2, g, 0.0)

    tl.store(partial_ptr + pid * 3, tl.sum(ce_sum, axis=0))
    tl.store(partial_ptr + pid * 3 + 1, tl.sum(kld_sum, axis=0))
    tl.store(partial_ptr + pid * 3 + 2, tl.sum(ent_sum, axis=0))
    if COMPUTE_GRAD:
        out = grad_ptr + (b * C + cls.to(tl.int64)) * h * w + i * w
        if RESIZE:
            for jj in tl.static_range(BLOCK_J):
                j = j_start + jj
                wx = tl.where(tx0 == j, lx0, 0.0) + tl.where(tx1 == j, lx1, 0.0)
                wx = tl.where(x_ok, wx, 0.0)
                col = tl.sum(acc * wx[None, :], axis=1)
                tl.store(out + j, col, mask=cls_ok & ((cls * 0 + j) < w))  # a tensor mask: the interpreter rejects scalar ones
        else:
            tl.store(out[:, None] + xs[None, :], acc, mask=mask2)


def _first_source_index_host(cells: np.ndarray, inv_scale: np.float32, align_corners: bool) -> np.ndarray:
    """`_first_source_index` evaluated in float32 on the host, operation for operation."""
    c = cells.astype(np.float32)
    if align_corners:
        t = (c - np.float32(1.0)) * inv_scale
    else:
        t = (c - np.float32(0.5)) * inv_scale - np.float32(0.5)
    t = np.where((t < 0) | (c < 1.5), np.float32(0.0), t)
    return np.maximum(t.astype(np.int64) - 1, 0)


def _upper_taps(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
    """i0 of kernels/stats.h::linear_tap for every output index, in float32 like the kernel."""
    scale = np.float32(_resize_scale(in_size, out_size, align_corners))
    dst = np.arange(out_size, dtype=np.float32)
    src = scale * dst if align_corners else scale * (dst + np.float32(0.5)) - np.float32(0.5)
    src = np.where(src < 0, np.float32(0.0), src)
    return np.minimum(src.astype(np.int64), in_size - 1)


def _inverse_scale(in_size: int, out_size: int, align_corners: bool) -> float:
    if align_corners:
        return float(np.float32(out_size - 1) / np.float32(in_size - 1)) if in_size > 1 else 0.0
    return float(np.float32(out_size) / np.float32(in_size))


def _axis_plan(in_size: int, out_size: int, align_corners: bool, block: int) -> Tuple[float, int]:
    """For cell blocks [k*block, (k+1)*block) of a resized axis: the float32 inverse scale the
    kernel starts from and the number of full-resolution indices a program must visit (span).
    Checks that the kernel's start is at or before every index that touches the block."""
    inv = _inverse_scale(in_size, out_size, align_corners)
    i0 = _upper_taps(in_size, out_size, align_corners)
    starts = np.arange(0, in_size, block)
    first = _first_source_index_host(starts, np.float32(inv), align_corners)
    need_first = np.searchsorted(i0, starts - 1, side="left")       # first index with i0 >= start-1
    need_last = np.searchsorted(i0, starts + block - 1, side="right") - 1  # last with i0 <= end-1
    if np.any(first > need_first):  # pragma: no cover - would be a bug in the margin
        raise AssertionError("region_loss_triton: source index margin too small")
    return inv, int(np.max(need_last - first + 1))


@torch.library.custom_op("fastst::region_loss_triton", mutates_args=())
def region_loss_triton(logits: torch.Tensor, target: torch.Tensor, lambda_kld: float,
                       lambda_ent: float, ignore_index: int, out_h: int, out_w: int,
                       align_corners: bool, compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused region loss (Triton): arguments and outputs as `fastst::region_loss_cpp`
    (parts (4,) float32; grad (B, C, h, w) float32 or (0,)). CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1."""
    B, C, h, w = logits.shape
    parts, grad = new_region_loss_outputs(logits, compute_grad)
    if logits.device.type != "cuda" and not INTERPRETED:
        raise ValueError("fastst::region_loss_triton runs on CUDA tensors, or on CPU tensors only "
                         "under Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)")
    target = target.contiguous()
    # The kernel's rule for a labelled pixel; classes >= C only pass with FASTST_CHECK=0.
    is_labelled = target != ignore_index
    if C < 256 or target.dtype != torch.uint8:
        is_labelled &= target < C
    if target.dtype != torch.uint8:
        is_labelled &= target >= 0
    labelled = is_labelled.sum(dtype=torch.float64)
    ignored = float(B * out_h * out_w) - labelled
    one = torch.ones((), dtype=torch.float64, device=logits.device)
    coef64 = torch.stack([torch.where(labelled > 0, 1.0 / torch.maximum(labelled, one), 0.0 * one),
                          torch.where(ignored > 0, 1.0 / (C * torch.maximum(ignored, one)), 0.0 * one),
                          lambda_kld * one, lambda_ent * one])
    coef = coef64.to(torch.float32)

    c_pad = max(16, triton.next_power_of_2(C))
    resize = (h, w) != (out_h, out_w)
    if resize:
        inv_h, rows = _axis_plan(h, out_h, align_corners, 1)
        # widest x block that keeps the tile in registers, then as many cells as fit in it
        block_x = max(16, TILE_ELEMENTS // c_pad)
        step = -(-out_w // w) + 1
        block_j = max(1, min(w, (block_x - 3) // step - 1))
        inv_w, span = _axis_plan(w, out_w, align_corners, block_j)
        block_x = max(block_x, triton.next_power_of_2(span))
        grid = (triton.cdiv(w, block_j), h, B)
    else:
        inv_h = inv_w = 1.0
        rows = 1
        block_x = min(max(16, TILE_ELEMENTS // c_pad), max(16, triton.next_power_of_2(out_w)))
        block_j = block_x
        grid = (triton.cdiv(out_w, block_x), out_h, B)
    partial = torch.empty((grid[0] * grid[1] * grid[2], 3), dtype=torch.float32, device=logits.device)
    with torch.cuda.device(logits.device) if logits.device.type == "cuda" else contextlib.nullcontext():
        _region_loss_kernel[grid](
            logits, target, grad if compute_grad else partial, partial, coef,
            h, w, out_h, out_w, *logits.stride(),
            _resize_scale(h, out_h, align_corners), _resize_scale(w, out_w, align_corners),
            inv_h, inv_w, ignore_index,
            C=C, C_PAD=c_pad, BLOCK_X=block_x, BLOCK_J=block_j, ROWS=rows, RESIZE=resize,
            ALIGN_CORNERS=bool(align_corners), COMPUTE_GRAD=bool(compute_grad),
            num_warps=4,
        )
    sums = partial.sum(dim=0, dtype=torch.float64)
    ce = sums[0] * coef64[0]
    kld = sums[1] * coef64[0] / C
    ent = sums[2] * coef64[1]
    parts.copy_(torch.stack([ce + lambda_kld * kld + lambda_ent * ent, ce, kld, ent]))
    return parts, grad


register_region_loss_op(region_loss_triton)
