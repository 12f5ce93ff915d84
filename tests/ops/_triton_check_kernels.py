"""Kernels for tests/ops/test_triton_compile_check.py: one that compiles cleanly, one that must
spill (every thread holds 512 float32 values across a reduction), one that does not compile
(a block of 100, not a power of two) and one whose fully unrolled loop takes many seconds to
compile. Each function returns KernelLaunch objects for
tools/check_triton_kernels.py (--launches this_file.py:FUNCTION)."""
import triton
import triton.language as tl

from fastst.ops.triton.launch_configs import launch_of


@triton.jit
def _scale(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)


@triton.jit
def _normalise_block(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x / tl.sum(x, axis=0))  # x stays live across the reduction


@triton.jit
def _not_a_power_of_two(x_ptr):
    offs = tl.arange(0, 100)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)


@triton.jit
def _unrolled(x_ptr, STEPS: tl.constexpr):
    offs = tl.arange(0, 128)
    acc = tl.load(x_ptr + offs)
    for i in tl.static_range(STEPS):
        acc = acc * 0.999 + tl.sqrt(acc + i)
    tl.store(x_ptr + offs, acc)


def good():
    return [launch_of(_scale, ["*fp32", "*fp32", "i32"], dict(BLOCK=256, num_warps=4, enable_fp_fusion=False))]


def good_spilling_broken():
    options = dict(num_warps=1, enable_fp_fusion=False)
    return good() + [launch_of(_normalise_block, ["*fp32", "*fp32"], dict(BLOCK=16384, **options)),
                     launch_of(_not_a_power_of_two, ["*fp32"], options)]


def slow():
    return [launch_of(_unrolled, ["*fp32"], dict(STEPS=3000, num_warps=4, enable_fp_fusion=False))]
