"""The Triton skeleton of the fused per-pixel losses (the twin of csrc/fastst/cpu/fused_loss.h):
one kernel serves the region loss (docs/ops.md §2) and the self-training losses (bootstrapping, docs/ops.md §6;
CRST-MRKLD, docs/ops.md §5). Only the per-pixel loss and gradient differ; the constexpr MODE picks it
at compile time, so each mode compiles to its own kernel with no runtime branch. The kernel, its
per-pixel parts and their launchers stay in one module (over 400 lines on purpose): they are one
skeleton whose pieces must change together.

Skeleton. Logits (B, C, h, w) are upsampled on the fly to the target's (H, W) and no
(B, C, H, W) tensor exists, forward or backward. The gradient is gathered, not scattered:
program (jb, i, b) owns the low-resolution gradient cells (b, :, i, jb*BLOCK_J .. +BLOCK_J). It
visits every full-resolution pixel whose bilinear taps touch those cells (rows whose upper
source row is i - 1 or i, and the matching columns, in chunks of BLOCK_X columns), recomputes
that pixel's softmax, accumulates the row weight times the pixel's gradient per column, and
contracts each chunk's columns into the cells with their weights (a loop over the cells, not
unrolled). Each cell is summed by one program in a fixed order, so gradients
are bit-identical from run to run with no atomics; the price is recomputing each pixel's softmax
about 2.2 times (twice in y, a little more in x), which is arithmetic, not memory traffic. Loss
sums are taken only over the pixels a program owns (upper source row i, left source column in
its block): NUM_SUMS float32 partials per program, added in float64 on the device, no host sync.

Per-pixel parts (p = softmax(v), u = v - max v, s = sum exp u, "labelled" = a class in [0, C)):
  REGION          sums (ce, kld, ent), gradient as kernels/region_loss.h. The constexpr flags
                  NEED_KLD / NEED_ENT (True for the other modes) leave out a term whose lambda
                  is 0: without NEED_KLD no sum of u (kld sum 0); without NEED_ENT no E, no
                  (u - E) gradient term (ent sum 0), and a row of only ignored pixels is not
                  visited at all (its gradient is 0). Loss and gradient are unchanged.
  BOOTSTRAP_HARD  c = (beta onehot(y) + (1 - beta) q) at labelled pixels, 0 elsewhere, with
                  q = div_rn(p, lambda) (IEEE division, docs/ops.md §6); sum 0 gets
                  -sum_k c_k log q_k = S log s - sum c u + sum c log lambda (S = sum_k c_k),
                  the gradient is grad_scale * (p S - c) (q is a constant: stop-gradient).
  BOOTSTRAP_SOFT  the same with y = soft target (B, C, H, W) float32 at unlabelled pixels; every
                  pixel has a target.
  BOOTSTRAP_TEACHER  BOOTSTRAP_SOFT with no label map and the targets made in the pass from a
                  teacher's logits (B, C, h, w) float32, upsampled with the student's taps:
                  q_t = div_rn(softmax, lambda), onehot(argmax q_t) where max q_t >= 1, else
                  q_t ** gamma (coef[3]) (docs/ops.md §6, tpld_soft_targets).
  MRKLD           sums (ce, kld over target crops), gradient
                  p (a + b) - b / C - a onehot(y), a = 1/n_valid, b = w/n_valid_tgt on target crops.

Arithmetic (docs/ops.md §0.6): every exp is kernels/stats.h::exp_nonpositive (stats.py's
`_exp_nonpositive`, the C++ twin's; never Triton's ex2.approx-based tl.exp), logs are
tl.log (libdevice's logf on GPUs), and the launch turns FMA contraction off, so a skipped REGION
term leaves the same bits as the full form on a GPU too.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch

from .._backend import sync_debug
from ..loss_modes import BOOTSTRAP_HARD, BOOTSTRAP_SOFT, BOOTSTRAP_TEACHER, MRKLD, REGION
from .stats import _exp_nonpositive, _exp_table, _linear_tap, _resize_scale

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError("fastst.ops.triton needs Triton (>= 3.2) for the 'triton' backend: "
                      "pip install triton") from exc

__all__ = ["NUM_SUMS", "LossTile", "labelled_mask", "launch_fused_loss", "launch_meta", "loss_tile"]

NUM_SUMS = 3
TILE_ELEMENTS = 2048  # C_PAD * BLOCK_X: the (classes x pixels) tile a program holds in registers
TEACHER_TILE_ELEMENTS = 1024  # BOOTSTRAP_TEACHER holds a second (teacher) softmax per pixel
ELEMENTS_PER_THREAD = 8  # of that tile, per thread: the warps are chosen for it (loss_tile)
TEACHER_ELEMENTS_PER_THREAD = 4
MAX_CELLS = 512  # C_PAD * the gradient columns a program owns: its (C_PAD, BJ_PAD) cell tile

# Globals read inside @triton.jit functions must be constexpr.
_REGION = tl.constexpr(REGION)
_BOOTSTRAP_SOFT = tl.constexpr(BOOTSTRAP_SOFT)
_BOOTSTRAP_TEACHER = tl.constexpr(BOOTSTRAP_TEACHER)
_MRKLD = tl.constexpr(MRKLD)


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
def _softmax_stats(v, cls_ok, exp_table_ptr):
    """For a (C_PAD, BLOCK_X) tile of logits: u = v - max, e = exp(u) (0 on padded classes),
    log s and 1 / s with s = sum e (IEEE division). exp is stats.h::exp_nonpositive (the C++
    twin's, docs/ops.md §0.6), not tl.exp, which is ex2.approx-based on GPUs."""
    m = tl.max(tl.where(cls_ok[:, None], v, float("-inf")), axis=0)
    u = v - m[None, :]
    e = tl.where(cls_ok[:, None], _exp_nonpositive(u, exp_table_ptr), 0.0)
    # s = 1 + rest: the max's e is exactly 1, kept out of the float sum (see the C++ twin)
    ones = (e == 1.0).to(tl.float32)
    rest = tl.sum(e - ones, axis=0) + (tl.sum(ones, axis=0) - 1.0)
    s = 1.0 + rest
    # log1p(rest) = log(s) * rest / (s - 1), exact in s when s rounds to 1 (Goldberg)
    log_s = tl.where(s == 1.0, rest, tl.log(s) * tl.math.div_rn(rest, tl.where(s == 1.0, 1.0, s - 1.0)))
    inv_s = tl.math.div_rn(tl.zeros_like(s) + 1.0, s)
    return u, e, log_s, inv_s


@triton.jit
def _region_pixel(u, e, log_s, inv_s, is_label, labelled, unlabelled, cls_ok, coef_ptr, C: tl.constexpr,
                  NEED_KLD: tl.constexpr, NEED_ENT: tl.constexpr):
    """Region loss (docs/ops.md §2). coef: [1/n_v, 1/(C n_i), lambda_kld, lambda_ent]. Returns the
    per-pixel (ce, kld, ent) and the gradient tile; a term not NEEDed (its lambda is 0) gives
    0 and is not computed. Without NEED_ENT the gradient p scale_p + shift is the full one's
    exactly: scale_pv is then a signed zero everywhere (kernels/region_loss.h,
    pixel_grad_without_entropy)."""
    inv_nv = tl.load(coef_ptr)
    inv_c_ni = tl.load(coef_ptr + 1)
    lambda_kld = tl.load(coef_ptr + 2)
    lambda_ent = tl.load(coef_ptr + 3)
    inv_c = 1.0 / C
    u_label = tl.sum(tl.where(is_label, u, 0.0), axis=0)
    ce = tl.where(labelled, log_s - u_label, 0.0)
    if NEED_KLD:
        u_sum = tl.sum(tl.where(cls_ok[:, None], u, 0.0), axis=0)
        kld = tl.where(labelled, log_s - u_sum * inv_c, 0.0)
    else:
        kld = tl.zeros_like(ce)
    lab = labelled.to(tl.float32)
    scale_p = lab * (1.0 + lambda_kld * inv_c) * inv_nv
    shift = lab * -lambda_kld * inv_c * inv_c * inv_nv
    p = e * inv_s[None, :]
    if NEED_ENT:
        expected = tl.sum(e * tl.where(cls_ok[:, None], u, 0.0), axis=0) * inv_s
        ent = tl.where(unlabelled, log_s - expected, 0.0)
        scale_pv = (1.0 - lab) * -lambda_ent * inv_c_ni
        g = p * (scale_p[None, :] + scale_pv[None, :] * (u - expected[None, :])) + shift[None, :]
    else:
        ent = tl.zeros_like(ce)
        g = p * scale_p[None, :] + shift[None, :]
    g = g - tl.where(is_label & labelled[None, :], inv_nv, 0.0)
    return ce, kld, ent, g


@triton.jit
def _mrkld_pixel(u, e, log_s, inv_s, is_label, labelled, cls_ok, target_crop, coef_ptr, C: tl.constexpr):
    """CRST-MRKLD (docs/ops.md §5). coef: [1/n_valid, w/n_valid_tgt] (0 for an empty set);
    target_crop: whether this image is a target-domain crop. Returns (ce, kld, 0) per pixel and
    the gradient tile."""
    inv_nv = tl.load(coef_ptr)
    w_inv_nt = tl.load(coef_ptr + 1)
    inv_c = 1.0 / C
    u_label = tl.sum(tl.where(is_label, u, 0.0), axis=0)
    u_sum = tl.sum(tl.where(cls_ok[:, None], u, 0.0), axis=0)
    in_kld = labelled & target_crop
    ce = tl.where(labelled, log_s - u_label, 0.0)
    kld = tl.where(in_kld, log_s - u_sum * inv_c, 0.0)
    a = tl.where(labelled, inv_nv, 0.0)
    b = tl.where(in_kld, w_inv_nt, 0.0)
    g = e * inv_s[None, :] * (a + b)[None, :] - (b * inv_c)[None, :]
    g = g - tl.where(is_label & labelled[None, :], a[None, :], 0.0)
    return ce, kld, tl.zeros_like(ce), g


@triton.jit
def _bootstrap_pixel(u, e, log_s, inv_s, is_label, labelled, cls_ok, y_soft, lam, log_lam, coef_ptr,
                     SOFT: tl.constexpr):
    """Bootstrapping loss (docs/ops.md §6). coef: [grad_scale, beta, 1 - beta]; lam, log_lam: (C_PAD,)
    (1 and 0 on padded classes); y_soft: the soft-target tile (SOFT). Returns
    (-sum_k c_k log q_k, 0, 0) per pixel and the gradient tile grad_scale * (p S - c)."""
    grad_scale = tl.load(coef_ptr)
    beta = tl.load(coef_ptr + 1)
    one_minus_beta = tl.load(coef_ptr + 2)
    onehot = (is_label & labelled[None, :]).to(tl.float32)
    if SOFT:
        y = tl.where(labelled[None, :], onehot, y_soft)
        has = tl.zeros_like(log_s) + 1.0
    else:
        y = onehot
        has = labelled.to(tl.float32)
    p = e * inv_s[None, :]
    q = tl.math.div_rn(p, lam[:, None] + tl.zeros_like(p))
    c = tl.where(cls_ok[:, None], has[None, :] * (beta * y + one_minus_beta * q), 0.0)
    total = tl.sum(c, axis=0)
    along_u = tl.sum(c * u, axis=0)
    along_log_lam = tl.sum(c * log_lam[:, None], axis=0)
    loss = total * log_s - along_u + along_log_lam
    g = grad_scale * (p * total[None, :] - c)
    zero = tl.zeros_like(loss)
    return loss, zero, zero, g


@triton.jit
def _upsampled(base, stride_h, stride_w, ty0, ty1, ly0, ly1, tx0, tx1, lx0, lx1, mask2, RESIZE: tl.constexpr):
    """A (C_PAD, BLOCK_X) tile of logits at one full-resolution row, bilinear from its four taps
    (RESIZE) or read in place, as float32."""
    if RESIZE:
        v = ly0 * (lx0[None, :] * tl.load(base + ty0 * stride_h + tx0[None, :] * stride_w, mask=mask2, other=0.0).to(tl.float32)
                   + lx1[None, :] * tl.load(base + ty0 * stride_h + tx1[None, :] * stride_w, mask=mask2, other=0.0).to(tl.float32)) \
            + ly1 * (lx0[None, :] * tl.load(base + ty1 * stride_h + tx0[None, :] * stride_w, mask=mask2, other=0.0).to(tl.float32)
                     + lx1[None, :] * tl.load(base + ty1 * stride_h + tx1[None, :] * stride_w, mask=mask2, other=0.0).to(tl.float32))
    else:
        v = tl.load(base + ty0 * stride_h + tx0[None, :] * stride_w, mask=mask2, other=0.0).to(tl.float32)
    return v


@triton.jit
def _teacher_targets(v, cls, cls_ok, lam, gamma, exp_table_ptr, C_PAD: tl.constexpr):
    """Soft targets (C_PAD, BLOCK_X) from a tile of teacher logits: onehot(argmax q) (lowest
    index on ties) where max q >= 1, else q ** gamma, q = div_rn(softmax(v), lambda)."""
    _, e, _, inv_s = _softmax_stats(v, cls_ok, exp_table_ptr)
    p = e * inv_s[None, :]
    q = tl.where(cls_ok[:, None], tl.math.div_rn(p, lam[:, None] + tl.zeros_like(p)), -1.0)
    best = tl.max(q, axis=0)
    first = tl.min(tl.where(q == best[None, :], cls[:, None], C_PAD), axis=0)
    onehot = (cls[:, None] == first[None, :]).to(tl.float32)
    safe = tl.where(q > 0.0, q, 1.0)
    # q < 1 wherever the power is used (best < 1), so gamma log q <= 0: the exact-bits exp of the
    # softmax, not Triton's approximate one
    power = tl.where(q > 0.0, _exp_nonpositive(gamma * tl.log(safe), exp_table_ptr),
                     tl.where(gamma == 0.0, 1.0, 0.0))
    power = tl.where(gamma == 2.0, q * q, tl.where(gamma == 1.0, q, power))
    return tl.where(best[None, :] >= 1.0, onehot, power)


@triton.jit
def _fused_loss_kernel(x_ptr, t_ptr, grad_ptr, partial_ptr, coef_ptr, lam_ptr, log_lam_ptr, soft_ptr, crop_ptr,
                       exp_table_ptr, h, w, H, W,
                       stride_b, stride_c, stride_h, stride_w,
                       scale_h, scale_w, inv_scale_h, inv_scale_w,
                       ignore_index,
                       MODE: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr, BLOCK_X: tl.constexpr,
                       BLOCK_J: tl.constexpr, BJ_PAD: tl.constexpr, X_CHUNKS: tl.constexpr,
                       ROWS: tl.constexpr, RESIZE: tl.constexpr,
                       ALIGN_CORNERS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                       NEED_KLD: tl.constexpr, NEED_ENT: tl.constexpr):
    """Program (jb, i, b). x: (B, C, h, w) float32/float16/bfloat16, any strides; t: (B, H, W)
    uint8/int64 contiguous; grad: (B, C, h, w) float32; partial: (programs, 3) float32 sums over
    the owned pixels; coef: float32 mode constants (see the per-pixel helpers); lam, log_lam: (C,)
    float32 (bootstrap); soft: (B, C, H, W) float32 contiguous (BOOTSTRAP_SOFT) or the teacher's
    (B, C, h, w) float32 contiguous logits (BOOTSTRAP_TEACHER, coef[3] = gamma); crop: (B,) uint8
    target-crop flags (MRKLD); exp_table: stats.EXP2_SIXTEENTHS (16,) float32. Pointers a mode
    does not use are never read. RESIZE: the program owns the cells (i, jb*BLOCK_J .. +BLOCK_J)
    and visits the columns that touch them in X_CHUNKS blocks of BLOCK_X, the rows in ROWS;
    BJ_PAD = next power of two >= BLOCK_J. Same size (RESIZE False): it owns row i, pixels
    jb*BLOCK_X .. +BLOCK_X, BLOCK_J == BLOCK_X and X_CHUNKS == 1. NEED_KLD / NEED_ENT: the
    REGION terms to compute (both True in the other modes). Tiles and warps: `loss_tile`.

    Longer than ~80 lines on purpose: one fused pass (resize, softmax, loss and gradient) keeps
    each pixel's logits in registers; the per-pixel maths already lives in ``@triton.jit``
    helpers, and splitting the remaining program (index setup, per-row loop, reductions) into
    more jitted calls would pass many tensors and constexprs through for no gain in clarity."""
    jb = tl.program_id(0)
    i = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pid = (tl.program_id(2) * tl.num_programs(1) + i) * tl.num_programs(0) + jb

    cls = tl.arange(0, C_PAD)
    cls_ok = cls < C
    cls64 = cls.to(tl.int64)
    if MODE == _MRKLD:
        target_crop = tl.load(crop_ptr + b) != 0
    else:
        target_crop = False
    lam = tl.full([C_PAD], 1.0, tl.float32)
    log_lam = tl.zeros([C_PAD], dtype=tl.float32)
    if MODE != _REGION:
        if MODE != _MRKLD:  # the bootstrap modes read the thresholds once per program
            lam = tl.load(lam_ptr + cls, mask=cls_ok, other=1.0)
            log_lam = tl.load(log_lam_ptr + cls, mask=cls_ok, other=0.0)

    j_start = jb * BLOCK_J
    if RESIZE:
        x_first = _first_source_index(j_start, inv_scale_w, ALIGN_CORNERS)
        y_first = _first_source_index(i, inv_scale_h, ALIGN_CORNERS)
    else:
        x_first = j_start
        y_first = i
    base = x_ptr + b * stride_b + cls64[:, None] * stride_c
    jcols = tl.arange(0, BJ_PAD)
    cells = tl.zeros([C_PAD, BJ_PAD], dtype=tl.float32)  # the owned gradient cells (RESIZE)
    sum0 = tl.zeros([BLOCK_X], dtype=tl.float32)
    sum1 = tl.zeros([BLOCK_X], dtype=tl.float32)
    sum2 = tl.zeros([BLOCK_X], dtype=tl.float32)
    # The columns the owned cells touch, X_CHUNKS blocks of BLOCK_X (1 without RESIZE): the
    # tile a program holds stays (C_PAD, BLOCK_X) however far one cell reaches.
    for xc in range(0, X_CHUNKS):
        xs = x_first + xc * BLOCK_X + tl.arange(0, BLOCK_X)
        x_ok = xs < W
        if RESIZE:
            tx0, tx1, lx0, lx1 = _linear_tap(xs, w, scale_w, ALIGN_CORNERS)
            owned_x = x_ok & (tx0 >= j_start) & (tx0 < j_start + BLOCK_J)
        else:
            tx0 = xs.to(tl.int64)
            tx1 = tx0
            lx0 = 1.0
            lx1 = 0.0
            owned_x = x_ok
        mask2 = cls_ok[:, None] & x_ok[None, :]
        acc = tl.zeros([C_PAD, BLOCK_X], dtype=tl.float32)
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
            if MODE == _REGION:
                if not NEED_ENT:
                    # without the entropy, ignored pixels have no part and a +0 gradient: a row
                    # segment with no labelled pixel needs neither its logits nor a softmax
                    row_ok = x_ok & ((xs * 0 + y) < H)  # a tensor mask: the interpreter rejects scalar ones
                    row_label = tl.load(t_ptr + (b * H + y) * W + xs, mask=row_ok, other=ignore_index).to(tl.int32)
                    row_labelled = (row_label != ignore_index) & (row_label >= 0) & (row_label < C)
                    visit = visit & (tl.max(row_labelled.to(tl.int32), axis=0) > 0)
            if visit:
                v = _upsampled(base, stride_h, stride_w, ty0, ty1, ly0, ly1, tx0, tx1, lx0, lx1, mask2, RESIZE)
                if MODE == _BOOTSTRAP_TEACHER:  # no label map: every pixel's target is the teacher's
                    label = tl.zeros([BLOCK_X], dtype=tl.int32) + ignore_index
                else:
                    label = tl.load(t_ptr + (b * H + y) * W + xs, mask=x_ok, other=ignore_index).to(tl.int32)
                labelled = (label != ignore_index) & (label >= 0) & (label < C)
                unlabelled = (label == ignore_index) | (label < 0) | (label >= C)  # no `~`: triton 3.2
                u, e, log_s, inv_s = _softmax_stats(v, cls_ok, exp_table_ptr)
                is_label = cls[:, None] == label[None, :]
                if MODE == _REGION:
                    l0, l1, l2, g = _region_pixel(u, e, log_s, inv_s, is_label, labelled, unlabelled, cls_ok, coef_ptr, C,
                                                  NEED_KLD, NEED_ENT)
                elif MODE == _MRKLD:
                    l0, l1, l2, g = _mrkld_pixel(u, e, log_s, inv_s, is_label, labelled, cls_ok, target_crop, coef_ptr, C)
                else:
                    if MODE == _BOOTSTRAP_SOFT:
                        y_soft = tl.load(soft_ptr + ((b * C + cls64[:, None]) * H + y) * W + xs[None, :],
                                         mask=mask2, other=0.0)
                    elif MODE == _BOOTSTRAP_TEACHER:  # soft_ptr: the teacher's (B, C, h, w) float32 logits
                        teacher = _upsampled(soft_ptr + (b * C + cls64[:, None]) * h * w, w, 1, ty0, ty1, ly0, ly1,
                                             tx0, tx1, lx0, lx1, mask2, RESIZE)
                        y_soft = _teacher_targets(teacher, cls, cls_ok, lam, tl.load(coef_ptr + 3),
                                                  exp_table_ptr, C_PAD)
                    else:
                        y_soft = tl.zeros([C_PAD, BLOCK_X], dtype=tl.float32)
                    l0, l1, l2, g = _bootstrap_pixel(u, e, log_s, inv_s, is_label, labelled, cls_ok, y_soft, lam, log_lam,
                                                     coef_ptr, (MODE == _BOOTSTRAP_SOFT) or (MODE == _BOOTSTRAP_TEACHER))
                owned = owned_x & owns_row
                sum0 += tl.where(owned, l0, 0.0)
                sum1 += tl.where(owned, l1, 0.0)
                sum2 += tl.where(owned, l2, 0.0)
                if COMPUTE_GRAD:
                    acc += wy * tl.where(mask2, g, 0.0)

        if COMPUTE_GRAD:
            if RESIZE:  # contract the columns into the cells they touch, cell by cell
                for jj in range(0, BLOCK_J):  # a loop, not unrolled: compile time stays flat
                    j = j_start + jj
                    wx = tl.where(tx0 == j, lx0, 0.0) + tl.where(tx1 == j, lx1, 0.0)
                    wx = tl.where(x_ok, wx, 0.0)
                    col = tl.sum(acc * wx[None, :], axis=1)
                    cells += tl.where(jcols[None, :] == jj, col[:, None], 0.0)
            else:
                tl.store(grad_ptr + (b * C + cls64[:, None]) * h * w + i * w + xs[None, :], acc, mask=mask2)

    tl.store(partial_ptr + pid * 3, tl.sum(sum0, axis=0))
    tl.store(partial_ptr + pid * 3 + 1, tl.sum(sum1, axis=0))
    tl.store(partial_ptr + pid * 3 + 2, tl.sum(sum2, axis=0))
    if COMPUTE_GRAD:
        if RESIZE:
            js = j_start + jcols
            tl.store(grad_ptr + (b * C + cls64[:, None]) * h * w + i * w + js[None, :], cells,
                     mask=cls_ok[:, None] & ((jcols < BLOCK_J) & (js < w))[None, :])


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
        raise AssertionError("fused loss (triton): source index margin too small")
    return inv, int(np.max(need_last - first + 1))


def labelled_mask(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """The kernel's rule for a pixel with a class (B, H, W) bool: != ignore_index and in
    [0, C); labels >= C only reach the kernel with FASTST_CHECK=0."""
    is_labelled = target != ignore_index
    if num_classes < 256 or target.dtype != torch.uint8:
        is_labelled &= target < num_classes
    if target.dtype != torch.uint8:
        is_labelled &= target >= 0
    return is_labelled


class LossTile(NamedTuple):
    """How the fused-loss kernel covers one input geometry (see `loss_tile`)."""
    c_pad: int          # classes padded to a power of two (>= 16)
    block_x: int        # full-resolution columns a program holds: the tile is (c_pad, block_x)
    block_j: int        # low-resolution gradient columns a program owns
    x_chunks: int       # blocks of block_x columns a program visits (the span of its cells)
    rows: int           # full-resolution rows a program visits
    resize: bool
    num_warps: int
    cells_w: int        # grid axis 0 covers cells_w columns (w, or out_w without resize)
    rows_h: int         # grid axis 1 (h, or out_h without resize)
    inv_scale_h: float
    inv_scale_w: float

    def grid(self, batch: int) -> Tuple[int, int, int]:
        return (triton.cdiv(self.cells_w, self.block_j), self.rows_h, batch)


def loss_tile(mode: int, C: int, h: int, w: int, out_h: int, out_w: int, align_corners: bool) -> LossTile:
    """The tile, loop bounds and warps of the fused-loss kernel in `mode` for logits (B, C, h, w)
    and targets (B, out_h, out_w); the launcher and the compile check (launch_configs.py) both
    use it.

    The (c_pad, block_x) tile has TILE_ELEMENTS elements (TEACHER_TILE_ELEMENTS in
    BOOTSTRAP_TEACHER; block_x >= 4, so more only for C > 256). A program owns block_j gradient
    columns (at most MAX_CELLS / c_pad) and visits the columns they touch in x_chunks blocks of
    block_x, so the tile does not grow with the upsampling factor. The warps give each thread
    ELEMENTS_PER_THREAD elements of the tile (TEACHER_ELEMENTS_PER_THREAD in BOOTSTRAP_TEACHER;
    at least 4 warps), which keeps every live tile in registers without spilling
    (tools/check_triton_kernels.py checks every configuration, docs/ops.md §2)."""
    c_pad = max(16, triton.next_power_of_2(C))
    block_x = max(4, (TEACHER_TILE_ELEMENTS if mode == BOOTSTRAP_TEACHER else TILE_ELEMENTS) // c_pad)
    resize = (h, w) != (out_h, out_w)
    if resize:
        inv_h, rows = _axis_plan(h, out_h, align_corners, 1)
        # as many cells as the block's columns cover, then the block widened to their span
        step = -(-out_w // w) + 1
        block_j = max(1, min(w, (block_x - 3) // step - 1, MAX_CELLS // c_pad))
        inv_w, span = _axis_plan(w, out_w, align_corners, block_j)
        x_chunks = triton.cdiv(span, block_x)
        cells_w, rows_h = w, h
    else:
        inv_h = inv_w = 1.0
        rows = 1
        block_x = min(block_x, max(16, triton.next_power_of_2(out_w)))
        block_j = block_x
        x_chunks = 1
        cells_w, rows_h = out_w, out_h
    per_thread = TEACHER_ELEMENTS_PER_THREAD if mode == BOOTSTRAP_TEACHER else ELEMENTS_PER_THREAD
    num_warps = max(4, c_pad * block_x // (32 * per_thread))
    return LossTile(c_pad, block_x, block_j, x_chunks, rows, resize, num_warps, cells_w, rows_h, inv_h, inv_w)


def launch_meta(mode: int, C: int, tile: LossTile, align_corners: bool, compute_grad: bool,
                need_kld: bool = True, need_ent: bool = True) -> dict:
    """The constexprs and launch options of one fused-loss launch (keyword arguments of
    `_fused_loss_kernel[grid]`). FMA contraction is off: the twin is built with
    -ffp-contract=off, and a skipped REGION term must leave the same bits as the full form
    (docs/ops.md §2), which holds only if neither is contracted. maxnreg lets ptxas give a thread
    up to its share of the register file with one program per multiprocessor (at most 255):
    without it, ptxas spilled a few bytes at 80 to 128 registers to fit more programs. The
    tiles keep the use near or below 128 (tools/check_triton_kernels.py prints it)."""
    return dict(MODE=mode, C=C, C_PAD=tile.c_pad, BLOCK_X=tile.block_x, BLOCK_J=tile.block_j,
                BJ_PAD=triton.next_power_of_2(tile.block_j) if tile.resize else 1, X_CHUNKS=tile.x_chunks,
                ROWS=tile.rows,
                RESIZE=tile.resize, ALIGN_CORNERS=bool(align_corners) and tile.resize,  # unused without resize
                COMPUTE_GRAD=bool(compute_grad),
                NEED_KLD=bool(need_kld) or mode != REGION, NEED_ENT=bool(need_ent) or mode != REGION,
                num_warps=tile.num_warps, enable_fp_fusion=False,
                maxnreg=min(255, 65536 // (32 * tile.num_warps)))


def launch_fused_loss(mode: int, logits: torch.Tensor, target: torch.Tensor, coef: torch.Tensor,
                      ignore_index: int, out_h: int, out_w: int, align_corners: bool,
                      grad: Optional[torch.Tensor], *, lambdas: Optional[torch.Tensor] = None,
                      log_lambdas: Optional[torch.Tensor] = None, soft_target: Optional[torch.Tensor] = None,
                      is_target: Optional[torch.Tensor] = None, need_kld: bool = True,
                      need_ent: bool = True) -> torch.Tensor:
    """Run the fused-loss kernel in `mode` over every pixel.

    Args:
        logits: (B, C, h, w) float32/float16/bfloat16, any strides. target: (B, out_h, out_w)
            uint8/int64 contiguous. coef: float32 constants of the mode (see the helpers).
        grad: (B, C, h, w) float32 contiguous output, or None for the loss only.
        lambdas, log_lambdas: (C,) float32 contiguous (bootstrap modes).
        soft_target: (B, C, out_h, out_w) float32 contiguous (BOOTSTRAP_SOFT), or the teacher's
            logits (B, C, h, w) float32 contiguous (BOOTSTRAP_TEACHER).
        is_target: (B,) uint8 contiguous target-crop flags (MRKLD).
        need_kld, need_ent: REGION only: False leaves out that term (its lambda must be 0);
            its sum is then 0. The other modes ignore them.
    Returns:
        (NUM_SUMS,) float64: the per-pixel sums of the mode over every pixel (device tensor).
    """
    B, C, h, w = logits.shape
    tile = loss_tile(mode, C, h, w, out_h, out_w, align_corners)
    grid = tile.grid(B)
    partial = torch.empty((grid[0] * grid[1] * grid[2], NUM_SUMS), dtype=torch.float32, device=logits.device)
    unused = coef  # stands in for pointers the mode never reads
    with torch.cuda.device(logits.device) if logits.device.type == "cuda" else contextlib.nullcontext():
        _fused_loss_kernel[grid](
            logits, target, partial if grad is None else grad, partial, coef,
            unused if lambdas is None else lambdas, unused if log_lambdas is None else log_lambdas,
            unused if soft_target is None else soft_target, unused if is_target is None else is_target,
            _exp_table(logits.device), h, w, out_h, out_w, *logits.stride(),
            _resize_scale(h, out_h, align_corners), _resize_scale(w, out_w, align_corners),
            tile.inv_scale_h, tile.inv_scale_w, ignore_index,
            **launch_meta(mode, C, tile, align_corners, grad is not None, need_kld, need_ent),
        )
    sync_debug(logits.device, "the Triton fused-loss kernel")
    return partial.sum(dim=0, dtype=torch.float64)
