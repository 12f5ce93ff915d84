"""Can the CUDA kernels of fastst._C run on this machine? (docs/design.md §1.3)

fastst._C links the CUDA runtime of the toolkit that built it statically, so it needs a driver
for that runtime's CUDA major version (13.x: driver >= 580), while torch brings its own runtime
and may run on an older driver. The first time the `cuda` backend is considered, the module's
probe (`fastst._C._cuda_probe`: cudaGetDeviceCount, cudaDriverGetVersion, cudaRuntimeGetVersion)
runs once; when the driver is too old or the probe fails, `cuda` is not usable, the default
choice falls back to `triton`, one warning says why and how to fix it, and an explicit
`backend="cuda"` raises ValueError with the same text.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

# The oldest Linux driver for each CUDA major version (NVIDIA's CUDA compatibility table).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


class Probe(NamedTuple):
    """What the runtime linked into fastst._C sees: `ok` (cudaGetDeviceCount succeeded), the
    driver's and the runtime's CUDA versions as ints (12020 = 12.2; the driver's is 0 without a
    driver), the device count and the CUDA error ("" when ok)."""
    ok: bool
    driver_version: int
    runtime_version: int
    device_count: int
    error: str


def version_text(version: int) -> str:
    """12020 -> "12.2" (CUDA's encoding: 1000 * major + 10 * minor)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def _driver_release() -> str:
    """The installed NVIDIA kernel driver's release, e.g. "535.183.01", or "" where unknown."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return ""
    for word in text.split():
        if word[:1].isdigit() and word.count(".") >= 1:
            return word
    return ""


def unusable_reason(probe: Probe, torch_cuda: Optional[str], driver_release: str = "") -> Optional[str]:
    """Why the cuda backend cannot run given `probe` (None: it can). `torch_cuda` is
    torch.version.cuda (e.g. "12.6"), used to name the toolkit that would match torch."""
    needed = probe.runtime_version // 1000
    too_old = probe.driver_version // 1000 < needed
    if probe.ok and probe.device_count > 0 and not too_old:
        return None
    built = version_text(probe.runtime_version)
    driver = "no NVIDIA driver" if probe.driver_version == 0 else (
        f"NVIDIA driver {driver_release + ' ' if driver_release else ''}"
        f"(supports CUDA up to {version_text(probe.driver_version)})")
    if too_old:
        minimum = MIN_DRIVER.get(needed)
        what = (f"fastst._C was built with the CUDA {built} runtime, which needs a driver for CUDA "
                f"{needed}.x{f' (>= {minimum})' if minimum else ''}; this machine has {driver}")
    else:
        what = (f"fastst._C (CUDA {built} runtime) cannot use the GPU: {probe.error or 'no device'}; "
                f"this machine has {driver}")
    toolkit = f"/usr/local/cuda-{torch_cuda}" if torch_cuda else "/usr/local/cuda-<torch.version.cuda>"
    return (f"{what}. Fix: update the NVIDIA driver, or rebuild fastst with a CUDA toolkit matching "
            f"torch's (torch.version.cuda = {torch_cuda}): `CUDA_HOME={toolkit} pip install -e .` "
            f"(README \"CUDA build\")")


def read_probe(ext) -> Probe:
    """Run the probe of `ext` (the module fastst._C or None); never raises, and without the
    module or a CUDA build returns ok False."""
    if ext is None or not hasattr(ext, "_cuda_probe"):
        return Probe(False, 0, 0, 0, "fastst._C is not built (or predates the probe): run `pip install -e .`")
    return Probe(*ext._cuda_probe())


_UNSET = object()
_reason: object = _UNSET  # the cached verdict: _UNSET until the first check, then None or a string


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing (fullgraph safe)
def cuda_unusable_reason(ext) -> Optional[str]:
    """The cached verdict of `unusable_reason` for `ext` (fastst._C) on this machine; the first
    call probes and, when cuda cannot run, warns once that ops fall back to triton. Call only
    where torch sees a GPU."""
    global _reason
    if _reason is _UNSET:
        reason = unusable_reason(read_probe(ext), torch.version.cuda, _driver_release())
        if reason is not None:
            warnings.warn(f"fastst: the cuda backend is off, ops on CUDA tensors use triton (or "
                          f"torch): {reason}", RuntimeWarning, stacklevel=2)
        _reason = reason
    return _reason  # type: ignore[return-value]
