"""Triton twin of the fused statistics pass `fastst::pixel_stats` (docs/ops.md §1.3): one read of the
scores gives, per output pixel, m = max_c p, a = argmax_c p (lowest index on ties), the per-(image,
class) counts of a and the value-check flags, where p = x (probabilities) or p = softmax(x) in
float32 (logits), after an optional on-the-fly bilinear upsample. The (B, C, H, W) upsampled
logits or probabilities are never materialised: the kernel reads the low-resolution input (a second
time for logits, from cache if the block's values are still there) and writes 5 bytes per output
pixel plus one atomic per (block, class present).

The arithmetic mirrors csrc/fastst/kernels/stats.h operation by operation (float32 taps computed
like ATen, the max/argmax pass, then for logits the class-ordered sum of stats.h's table-and-cubic
exp_nonpositive with its explicit FMAs, IEEE division for 1/sum, and no other FMA contraction), so
the outputs equal those of the C++/CUDA twins bit for bit, from logits too.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before
triton is first imported).
"""
from __future__ import annotations

import contextlib
from typing import Tuple

import numpy as np
import torch

from .._backend import sync_debug
from .._checks import check_triton_device
from ..ext.stats import new_stats_outputs, stats_fake

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("fastst.ops.triton needs Triton (>= 3.2) for the 'triton' backend: "
                      "pip install triton") from exc

__all__ = ["pixel_stats_triton", "stats_meta", "INTERPRETED"]

# Bits of the flags output (kernels/stats.h::StatsFlag), for callers decoding it.
NON_FINITE = 1
OUT_OF_UNIT_RANGE = 2
BLOCK = 256  # output pixels per program, 2 per thread with NUM_WARPS (stats_meta)
NUM_WARPS = 4
# 2^(j/16) for j < 16 rounded to float32: the table of stats.h::exp_nonpositive (kExp2Sixteenths).
EXP2_SIXTEENTHS = (2.0 ** (np.arange(16) / 16.0)).astype(np.float32)
_EXP_TABLES = {}  # device -> EXP2_SIXTEENTHS as a float32 tensor there


def _exp_table(device: torch.device) -> torch.Tensor:
    if device not in _EXP_TABLES:
        _EXP_TABLES[device] = torch.from_numpy(EXP2_SIXTEENTHS.copy()).to(device)
    return _EXP_TABLES[device]


@triton.jit
def _linear_tap(dst, in_size, scale, ALIGN_CORNERS: tl.constexpr):
    """One axis of a bilinear resize for a block of output indices `dst` (int32): source
    indices i0, i1 (int64) and weights l0, l1 (float32), as kernels/stats.h::linear_tap."""
    dst_f = dst.to(tl.float32)
    if ALIGN_CORNERS:
        src = scale * dst_f
    else:
        src = scale * (dst_f + 0.5) - 0.5
    src = tl.where(src < 0.0, 0.0, src)
    i0 = src.to(tl.int64)  # truncation == floor for src >= 0
    i0 = tl.minimum(i0, in_size - 1)
    i1 = i0 + (i0 < in_size - 1).to(tl.int64)
    l1 = src - i0.to(tl.float32)
    l0 = 1.0 - l1
    return i0, i1, l0, l1


@triton.jit
def _channel_value(p00, p01, p10, p11, off, mask, h0, h1, w0, w1, RESIZE: tl.constexpr):
    """Value of one channel (element offset `off`) at a block of output pixels, in float32:
    the input pixel, or stats.h::channel_value's bilinear mix of four, in ATen's order (along the
    row first, then across rows)."""
    if RESIZE:
        v = h0 * (w0 * tl.load(p00 + off, mask=mask, other=0.0).to(tl.float32)
                  + w1 * tl.load(p01 + off, mask=mask, other=0.0).to(tl.float32)) \
            + h1 * (w0 * tl.load(p10 + off, mask=mask, other=0.0).to(tl.float32)
                    + w1 * tl.load(p11 + off, mask=mask, other=0.0).to(tl.float32))
    else:
        v = tl.load(p00 + off, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _exp_nonpositive(x, table_ptr):
    """stats.h::exp_nonpositive: exp(x) for x <= 0 (0 at or below -87). k = round(16 x / ln 2),
    r = x - k ln2/16 by two FMAs, then 2^(k >> 4) * T[k & 15] * (1 + r + r^2 (1/2 + r/6)) with
    T = EXP2_SIXTEENTHS at `table_ptr`, operation for operation with explicit FMAs (the launch
    disables fusion elsewhere), so the result has the C++/CUDA bits rather than those of Triton's
    ex2.approx-based tl.exp."""
    in_range = x > -87.0  # false for NaN; other lanes compute junk (index still k & 15) and give 0
    shifted = tl.fma(x, 23.083120346069336, 12582912.0)  # 1.5 * 2^23 + k
    k = shifted - 12582912.0
    r = tl.fma(k, -0.043321698904037476, x)
    r = tl.fma(k, 1.1904088825787085e-10, r)
    k_bits = shifted.to(tl.int32, bitcast=True)  # k in the low bits, two's complement
    t = tl.load(table_ptr + (k_bits & 15))
    em1 = tl.fma(r * r, tl.fma(r, 0.1666666716337204, 0.5), r)  # exp(r) - 1
    e = tl.fma(t, em1, t)
    exponent = (k_bits << 19) & -8388608  # (k >> 4) << 23; -8388608 is 0xff800000 as int32
    return tl.where(in_range, (e.to(tl.int32, bitcast=True) + exponent).to(tl.float32, bitcast=True), 0.0)


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _flags_of(v, FROM_LOGITS: tl.constexpr):
    """kernels/stats.h flags of one value per lane: NaN/Inf by the exponent bits (1), and for
    probabilities anything outside [0, 1], NaN included (2)."""
    bits = v.to(tl.int32, bitcast=True)
    f = ((bits & 0x7F800000) == 0x7F800000).to(tl.int32)
    if not FROM_LOGITS:
        # == !(v >= 0 && v <= 1), spelled without `~` on int1, which triton 3.2's interpreter lacks
        f = f | (((v < 0.0) | (v > 1.0) | (v != v)).to(tl.int32) << 1)
    return f


@triton.jit
def _stats_kernel(x_ptr, m_ptr, a_ptr, counts_ptr, flags_ptr, exp_table_ptr,
                  h, w, H, W,
                  stride_b, stride_c, stride_h, stride_w,
                  scale_h, scale_w,
                  C: tl.constexpr, FROM_LOGITS: tl.constexpr, RESIZE: tl.constexpr,
                  ALIGN_CORNERS: tl.constexpr, BLOCK: tl.constexpr, NUM_BINS: tl.constexpr):
    """Statistics of BLOCK output pixels of image `program_id(1)`.

    x: (B, C, h, w) float32/float16/bfloat16 at any element strides; m (B, H, W) float32,
    a (B, H, W) uint8, counts (B, C) int64 and flags (1,) int32, the last two zeroed by the
    caller and accumulated atomically; exp_table: EXP2_SIXTEENTHS (16,) float32. `scale_h`, `scale_w` are the float32 resize scales
    (ATen's area_pixel_compute_scale), used only when RESIZE. NUM_BINS: a power of two > C.
    C is a compile-time constant: one compilation per class count (a model has one), and
    triton 3.2's interpreter cannot loop to a runtime bound under NumPy 2.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pix = pid * BLOCK + tl.arange(0, BLOCK)
    mask = pix < H * W
    y = pix // W
    xo = pix % W
    # 64-bit offsets: permuted inputs have large strides, and B*C*h*w may pass 2**31.
    base = x_ptr + b * stride_b
    if RESIZE:
        # The taps are per pixel and shared by all C classes: computed once, outside the loops.
        y0, y1, h0, h1 = _linear_tap(y, h, scale_h, ALIGN_CORNERS)
        x0, x1, w0, w1 = _linear_tap(xo, w, scale_w, ALIGN_CORNERS)
        p00 = base + y0 * stride_h + x0 * stride_w
        p01 = base + y0 * stride_h + x1 * stride_w
        p10 = base + y1 * stride_h + x0 * stride_w
        p11 = base + y1 * stride_h + x1 * stride_w
    else:
        p00 = base + y.to(tl.int64) * stride_h + xo.to(tl.int64) * stride_w
        p01, p10, p11 = p00, p00, p00
        h0, h1, w0, w1 = 1.0, 0.0, 1.0, 0.0

    # Pass 1 (kernels/stats.h::pixel_stats): max/argmax and flags, classes in order. Channel
    # offsets in 64 bits too: a class-major view (x.permute(1, 0, 2, 3)) has a large stride_c.
    best = _channel_value(p00, p01, p10, p11, 0, mask, h0, h1, w0, w1, RESIZE)
    arg = tl.zeros([BLOCK], dtype=tl.int32)
    flags = _flags_of(best, FROM_LOGITS)
    for c in range(1, C):
        off = tl.cast(c, tl.int64) * stride_c
        v = _channel_value(p00, p01, p10, p11, off, mask, h0, h1, w0, w1, RESIZE)
        flags = flags | _flags_of(v, FROM_LOGITS)
        greater = v > best  # strict: the lowest index wins ties (and NaN never wins)
        best = tl.where(greater, v, best)
        arg = tl.where(greater, c, arg)

    if FROM_LOGITS:
        # Pass 2: m = 1 / sum_c exp(x_c - max), the sum in class order with stats.h's exp, so the
        # bits equal the C++/CUDA twins'. It re-reads the block's C values (BLOCK * C * 4 bytes,
        # 78 KB for C = 19 fp32), which the first pass has just brought into L2, so DRAM should
        # see x about once (not yet measured on a GPU).
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(0, C):
            off = tl.cast(c, tl.int64) * stride_c
            v = _channel_value(p00, p01, p10, p11, off, mask, h0, h1, w0, w1, RESIZE)
            total = total + _exp_nonpositive(v - best, exp_table_ptr)
        m = tl.math.div_rn(tl.full([BLOCK], 1.0, tl.float32), total)  # IEEE, as 1.0f / sum
    else:
        m = best + 0.0  # -0 becomes +0, so the float bits of m sort like its value
    out = b * H * W + pix
    tl.store(m_ptr + out, m, mask=mask)
    tl.store(a_ptr + out, arg.to(tl.uint8), mask=mask)

    # Counts: a block histogram, then one atomic per class present instead of one per pixel
    # (per-pixel atomics would serialise on C addresses). Masked lanes go to bin NUM_BINS-1 >= C,
    # which is dropped (tl.histogram's mask argument is newer than triton 3.2).
    hist = tl.histogram(tl.where(mask, arg, NUM_BINS - 1), NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    tl.atomic_add(counts_ptr + b * C + bins, hist.to(tl.int64), mask=(bins < C) & (hist > 0),
                  sem="relaxed")
    block_flags = tl.reduce(tl.where(mask, flags, 0), 0, _bit_or)
    tl.atomic_or(flags_ptr, block_flags, mask=block_flags != 0, sem="relaxed")


def _is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


# Triton decides at decoration time whether kernels are compiled or interpreted.
INTERPRETED = _is_interpreted(_stats_kernel)
if INTERPRETED:
    from ._exact_fma import install as _install_exact_fma

    _install_exact_fma()  # older interpreters round tl.fma twice; the exp needs it rounded once


def _resize_scale(in_size: int, out_size: int, align_corners: bool) -> float:
    """ATen's area_pixel_compute_scale in float32 (kernels/stats.h::linear_tap). Computed on the
    host because Triton's fp32 `/` is approximate on GPUs; the float32 value is passed exactly."""
    if align_corners:
        return float(np.float32(in_size - 1) / np.float32(out_size - 1)) if out_size > 1 else 0.0
    return float(np.float32(in_size) / np.float32(out_size))


def stats_meta(C: int, from_logits: bool, resize: bool, align_corners: bool) -> dict:
    """The constexprs and launch options of `_stats_kernel` for C classes (the launcher and the
    compile check, launch_configs.py, both use it). One BLOCK for every image size (one
    compilation per class count and mode); 2 pixels per thread keep each pixel's resize taps and
    pointers in registers (8 per thread took 255 registers; 4 spilled on sm_80). No FMA
    contraction beyond the exp's explicit tl.fma, so the taps and the exp round like the C++
    twin (-ffp-contract=off) and the CUDA one (explicit _rn intrinsics)."""
    # align_corners matters only when resizing: one compilation for both without
    return dict(C=C, FROM_LOGITS=from_logits, RESIZE=resize, ALIGN_CORNERS=align_corners and resize, BLOCK=BLOCK,
                NUM_BINS=triton.next_power_of_2(C + 1), num_warps=NUM_WARPS, enable_fp_fusion=False)


@torch.library.custom_op("fastst::pixel_stats_triton", mutates_args=())
def pixel_stats_triton(x: torch.Tensor, from_logits: bool, out_h: int, out_w: int,
                       align_corners: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused per-pixel statistics pass (Triton): arguments, outputs (m, a, counts, flags) and
    bits exactly those of `fastst::pixel_stats` (fastst/ops/ext/stats.py). x may have any strides
    (read in place); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    B, C, h, w = x.shape
    m, a, counts, flags = new_stats_outputs(x, out_h, out_w)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    check_triton_device("fastst::pixel_stats_triton", x.device, INTERPRETED)
    pixels = out_h * out_w
    if B == 0 or pixels == 0:
        return m, a, counts, flags
    if C < 1 or h < 1 or w < 1:
        raise ValueError(f"x must have C >= 1 classes and h, w >= 1, got shape {tuple(x.shape)}")
    resize = (h, w) != (out_h, out_w)
    meta = stats_meta(C, bool(from_logits), resize, bool(align_corners))
    grid = (triton.cdiv(pixels, meta["BLOCK"]), B)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _stats_kernel[grid](
            x, m, a, counts, flags, _exp_table(x.device),
            h, w, out_h, out_w,
            *x.stride(),
            _resize_scale(h, out_h, align_corners), _resize_scale(w, out_w, align_corners),
            **meta)
    sync_debug(x.device, "the Triton statistics kernel")
    return m, a, counts, flags


pixel_stats_triton.register_fake(stats_fake)
