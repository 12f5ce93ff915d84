"""An exactly rounded float32 fused multiply-add in NumPy, and its use by Triton's interpreter.

Triton interpreters before 3.4 or so evaluate `tl.fma(x, y, z)` on float32 as `x * y + z` in float32,
rounding twice; a GPU rounds once. The statistics kernel's exp uses tl.fma, so under such an
interpreter its bits would differ from the C++/CUDA twins in rare lanes. `install()` checks the
interpreter on a case where the two differ and, only if it rounds twice, makes its float32 fma
exact with `fma_float32`. Newer interpreters (already exact) are left alone.
"""
from __future__ import annotations

import numpy as np

__all__ = ["fma_float32", "install"]


def fma_float32(a, b, c) -> np.ndarray:
    """float32 a * b + c rounded once (IEEE fma, ties to even), through float64: the product is
    exact there, and a float64 sum that lands exactly halfway between two float32 values is moved
    by the sign of its own rounding error (TwoSum) before the rounding to float32, so nothing is
    rounded twice. a, b, c: float32 arrays (broadcast); returns float32."""
    a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    with np.errstate(all="ignore"):
        product = a * b
        s = product + c
        s_b = s - product
        error = (product - (s - s_b)) + (c - s_b)  # s + error == product + c exactly (finite s)
        r = s.astype(np.float32)
        toward_s = np.nextafter(r, np.where(s > r, np.float32(np.inf), np.float32(-np.inf)))
        halfway = (s != r) & (np.abs(s - r) * 2 == np.abs(toward_s.astype(np.float64) - r))
        beyond = halfway & (error != 0) & (np.sign(error) == np.sign(s - r))
    return np.where(beyond, toward_s, r).astype(np.float32)


# a * b + c = (1 + 2^-23) + 2^-24 - 2^-70: rounded once it is 1 + 2^-23; rounding the product first
# gives the midpoint 1 + 2^-23 + 2^-24, which ties to the even 1 + 2^-22.
_PROBE = (np.float32(2 ** -12 * (1 + 2 ** -23)), np.float32(2 ** -12 * (1 - 2 ** -23)), np.float32(1 + 2 ** -23))


def install() -> bool:
    """Make the Triton interpreter's float32 fma exact if it is not; True if it was patched."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or getattr(builder.create_fma, "_fastst_exact", False):
        return False
    import triton.language as tl

    a, b, c = (handle(np.array([v], np.float32), tl.float32) for v in _PROBE)
    if builder.create_fma(builder.__new__(builder), a, b, c).data[0] == _PROBE[2]:
        return False  # already rounds once
    original = builder.create_fma

    def create_fma(self, x, y, z):
        if np.asarray(z.data).dtype == np.float32:
            return handle(fma_float32(*np.broadcast_arrays(x.data, y.data, z.data)), z.dtype.scalar)
        return original(self, x, y, z)

    create_fma._fastst_exact = True
    builder.create_fma = create_fma
    return True
