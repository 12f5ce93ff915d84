"""Every configuration in which fastst launches a Triton kernel, for the compile check
(tools/check_triton_kernels.py, docs/ops.md §2): kernel, constexprs, warps, FMA fusion and the
types of the arguments.

The constexprs and launch options come from the functions the launchers call (`stats_meta`,
`pixels_meta`, `vote_meta`, `loss_tile` and `launch_meta`), so the two cannot drift;
tests/ops/test_triton_compile_check.py records real launches and finds each one here.

What is enumerated. The statistics and TPLD kernels: every constexpr and launch option, crossed
with the three score dtypes, at two class counts (19 and 150: C only bounds loops the compiler
does not unroll, and these give the smallest and the largest histogram) and the vote's default
WINDOW 7 (a loop bound too). The fused loss, whose tile depends on C only through C_PAD (the
next power of two >= C, at least 16) and on the geometry only through BLOCK_J (cells per
program; X_CHUNKS and ROWS are loop bounds): every mode (REGION with each term on or off) x three
geometries (same size; 4x, the usual decoder upsample; 1.5x, the most cells per program) x with
and without the gradient, at C = 19 and 150 with float32 logits and uint8 labels; the two modes
with the most live tiles (teacher; REGION with every term) the same way at the other C_PADs 16,
64 and 128; and every mode with and without the gradient for float16 and bfloat16 logits and for
int64 labels at C = 150, 4x. Class counts above 256 (possible with int64 labels) are not covered.

Importing this module needs triton but no GPU; nothing here compiles.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from ..loss_modes import BOOTSTRAP_HARD, BOOTSTRAP_SOFT, BOOTSTRAP_TEACHER, MRKLD, REGION
from . import fused_loss, stats, tpld

__all__ = ["KernelLaunch", "all_launches", "launch_from_call", "launch_of", "type_of",
           "stats_launches", "tpld_launches", "fused_loss_launches"]

STATS_CLASSES = (19, 150)
# one class count per C_PAD of the fused loss: 16, 32, 64, 128, 256
LOSS_CLASSES = (4, 19, 60, 124, 150)
VOTE_WINDOW = 7
SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


@dataclass(frozen=True)
class KernelLaunch:
    """One compiled variant of a kernel: `module.kernel` with `signature` (name, Triton type) for
    every runtime argument in order, `constexprs` (name, value) and the launch options."""
    module: str
    kernel: str
    signature: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[str, object], ...]
    num_warps: int
    enable_fp_fusion: bool
    maxnreg: Optional[int] = None

    def describe(self) -> str:
        """A short one-line name: the constexprs, the warps and the non-float32 pointer types."""
        consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs)
        types = " ".join(f"{k}:{t[1:]}" for k, t in self.signature if t.startswith("*") and t != "*fp32")
        regs = f" maxnreg={self.maxnreg}" if self.maxnreg else ""
        return f"{consts} warps={self.num_warps}{regs}" + (f" {types}" if types else "")


def type_of(value) -> str:
    """The Triton type of a launch argument: `*fp32` for a float32 tensor, `i32`/`i64` for an
    int (by range, as Triton specialises), `fp32` for a float, `i1` for a bool."""
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


def launch_of(kernel, types: Sequence[str], meta: dict) -> KernelLaunch:
    """A KernelLaunch of `kernel` (a JITFunction of this package) with runtime argument types in
    the order of its parameters and `meta` as passed at launch (constexprs and options)."""
    meta = dict(meta)
    num_warps = meta.pop("num_warps")
    fusion = meta.pop("enable_fp_fusion")
    maxnreg = meta.pop("maxnreg", None)
    names = [n for n in kernel.arg_names if n not in meta]
    if len(names) != len(types):
        raise ValueError(f"{kernel.__name__}: {len(types)} argument types for parameters {names}")
    fn = getattr(kernel, "fn", kernel)
    return KernelLaunch(fn.__module__, fn.__name__, tuple(zip(names, types)),
                        tuple((n, meta[n]) for n in kernel.arg_names if n in meta), num_warps, fusion, maxnreg)


def launch_from_call(kernel, args: Sequence, kwargs: dict) -> KernelLaunch:
    """The KernelLaunch of a real call `kernel[grid](*args, **kwargs)`."""
    return launch_of(kernel, [type_of(a) for a in args], kwargs)


def _t(dtype: torch.dtype) -> str:
    return "*" + _TRITON_TYPES[dtype]


def stats_launches() -> Iterator[KernelLaunch]:
    """`_stats_kernel`: scores dtype x logits/probabilities x (same size, resize with and without
    align_corners) x STATS_CLASSES."""
    geometries = ((False, True), (True, True), (True, False))  # (resize, align_corners)
    for C, dtype, from_logits, (resize, align) in itertools.product(STATS_CLASSES, SCORE_DTYPES, (True, False),
                                                                    geometries):
        types = [_t(dtype), "*fp32", "*u8", "*i64", "*i32", "*fp32"] + ["i32"] * 8 + ["fp32"] * 2
        yield launch_of(stats._stats_kernel, types, stats.stats_meta(C, from_logits, resize, align))


def tpld_launches() -> Iterator[KernelLaunch]:
    """`_tpld_pixels_kernel` for the vote (top-2), image_confidence (counts) and the labels alone,
    per probabilities dtype and STATS_CLASSES; `_tpld_vote_kernel` with VOTE_WINDOW."""
    for C, dtype, (count, top2) in itertools.product(STATS_CLASSES, SCORE_DTYPES,
                                                     ((False, True), (True, False), (False, False))):
        unused = "*i32"  # the flags tensor stands in for outputs a variant does not write
        outs = ["*u8", "*u8", "*fp32", "*fp32"] if top2 else [unused] * 4
        types = [_t(dtype), "*fp32", "*u8"] + outs + ["*i32", "*i32" if count else unused] + ["i32"] * 6
        yield launch_of(tpld._tpld_pixels_kernel, types, tpld.pixels_meta(C, count, top2))
    types = ["*u8", "*fp32", "*u8", "*fp32", "*u8", "*u8", "*fp32", "*fp32", "*fp64", "i32", "i32"]
    yield launch_of(tpld._tpld_vote_kernel, types, tpld.vote_meta(VOTE_WINDOW))


# (mode, need_kld, need_ent): REGION with each term on or off, then the other modes
_LOSS_MODES = [(REGION, k, e) for k in (True, False) for e in (True, False)] + \
    [(m, True, True) for m in (BOOTSTRAP_HARD, BOOTSTRAP_SOFT, BOOTSTRAP_TEACHER, MRKLD)]
# (h, w, out_h, out_w, align_corners): same size; 4x (align_corners, the usual
# decoder-output upsample); 1.5x, the most cells per program, without align_corners
_LOSS_GEOMETRIES = ((64, 128, 64, 128, True), (64, 128, 256, 512, True), (64, 128, 96, 192, False))


def _loss_types(mode: int, logits: torch.dtype, labels: torch.dtype) -> List[str]:
    """Argument types of `_fused_loss_kernel` as launch_fused_loss passes them (coef, float32,
    stands in for the pointers a mode does not read; partial, float32, for a missing gradient)."""
    labels = torch.uint8 if mode == BOOTSTRAP_TEACHER else labels  # no labels: an empty uint8 tensor
    return ([_t(logits), _t(labels)] + ["*fp32"] * 6 + ["*u8" if mode == MRKLD else "*fp32", "*fp32"]
            + ["i32"] * 8 + ["fp32"] * 4 + ["i32"])


def fused_loss_launches() -> Iterator[KernelLaunch]:
    """`_fused_loss_kernel`, at float32 logits and uint8 labels: every mode (REGION with each term
    on or off) x geometry x with and without the gradient, for C = 19 and 150; the two modes with
    the most live tiles (BOOTSTRAP_TEACHER, REGION with every term) the same way for the other
    C_PADs (LOSS_CLASSES); then at the 4x geometry and C = 150, every mode with and without the
    gradient for float16 and bfloat16 logits and for int64 labels."""
    def one(mode, kld, ent, geometry, grad, C, logits=torch.float32, labels=torch.uint8):
        h, w, out_h, out_w, align = geometry
        tile = fused_loss.loss_tile(mode, C, h, w, out_h, out_w, align)
        meta = fused_loss.launch_meta(mode, C, tile, align, grad, kld, ent)
        return launch_of(fused_loss._fused_loss_kernel, _loss_types(mode, logits, labels), meta)

    heavy = [(BOOTSTRAP_TEACHER, True, True), (REGION, True, True)]
    for C in LOSS_CLASSES:
        modes = _LOSS_MODES if C in (19, 150) else heavy
        for (mode, kld, ent), geometry, grad in itertools.product(modes, _LOSS_GEOMETRIES, (True, False)):
            yield one(mode, kld, ent, geometry, grad, C)
    for (mode, kld, ent), grad, (logits, labels) in itertools.product(
            _LOSS_MODES, (True, False),
            ((torch.float16, torch.uint8), (torch.bfloat16, torch.uint8), (torch.float32, torch.int64))):
        if mode == BOOTSTRAP_TEACHER and labels == torch.int64:
            continue  # the teacher mode reads no labels
        yield one(mode, kld, ent, _LOSS_GEOMETRIES[1], grad, 150, logits, labels)


def all_launches() -> List[KernelLaunch]:
    """Every configuration above, without duplicates, in a stable order."""
    seen, out = set(), []
    for launch in itertools.chain(stats_launches(), tpld_launches(), fused_loss_launches()):
        if launch not in seen:
            seen.add(launch)
            out.append(launch)
    return out
