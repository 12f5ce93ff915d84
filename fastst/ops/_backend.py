"""Backend registry and choice (docs/ops.md §0).

Backends: "cuda" (nvcc kernels in fastst._C), "triton", "cpp" (C++/OpenMP kernels in fastst._C),
"torch" (fastst/ops/reference.py, the definition of truth). Default: CUDA tensors -> cuda if built,
else triton; CPU tensors -> cpp if built, else torch. `FASTST_BACKEND` or an op's `backend=`
argument overrides the choice; an explicit choice that cannot run is an error, never a silent
fallback.
"""
from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Iterable, Optional

import torch

from . import _cuda_probe

BACKENDS = ("cuda", "triton", "cpp", "torch")


def _first(op: str, device: torch.device, usable: list) -> str:
    return usable[0]


# The default choice among the usable backends (op, device, usable in preference order) -> name.
# fastst/ops/__init__.py installs the self-check's (fastst/ops/_selftest.py, docs/ops.md §0.7),
# which runs the ops and so cannot be imported here.
_default_choice = _first


def set_default_choice(choice=None) -> None:
    """Install `choice(op, device, usable) -> backend` as the default choice (None: the first
    usable backend)."""
    global _default_choice
    _default_choice = _first if choice is None else choice


def _load_extension() -> Optional[ModuleType]:
    try:
        from fastst import _C
    except ImportError:
        return None
    return _C


# Looked up once at import: plain module constants (no lru_cache) keep torch.compile tracing clean.
_EXTENSION = _load_extension()
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


SYNC_DEBUG_VARIABLE = "FASTST_CUDA_SYNC_DEBUG"


def sync_debug(device: torch.device, what: str) -> None:
    """``FASTST_CUDA_SYNC_DEBUG=1``: synchronise ``device`` after a kernel launch and raise a
    RuntimeError naming ``what`` when the device reports an error (illegal address, launch
    failure), instead of a later, unrelated call. Off (the default) or on the CPU: nothing, no
    sync. Called after every CUDA and Triton launch of fastst.ops."""
    if device.type != "cuda" or os.environ.get(SYNC_DEBUG_VARIABLE) != "1":
        return
    try:
        torch.cuda.synchronize(device)
    except RuntimeError as error:
        raise RuntimeError(f"{what} failed on {device} ({SYNC_DEBUG_VARIABLE}=1 synchronises "
                           f"after every launch): {error}") from error


def extension() -> Optional[ModuleType]:
    """The compiled module fastst._C, or None when the package was not built."""
    return _EXTENSION


def _triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def _backend_usable(name: str) -> bool:
    ext = extension()
    if name == "torch":
        return True
    if name == "cpp":
        return ext is not None
    if name == "cuda":
        return (ext is not None and bool(ext.has_cuda) and torch.cuda.is_available()
                and _cuda_probe.cuda_unusable_reason(ext) is None)
    if name == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        return _triton_importable() and (torch.cuda.is_available() or interpreted)
    return False


def _cuda_hint() -> str:
    """Why an explicit backend="cuda" cannot run: the driver probe's reason (_cuda_probe.py) where
    the build and torch have CUDA, else what is missing."""
    ext = extension()
    if ext is not None and ext.has_cuda and torch.cuda.is_available():
        return _cuda_probe.cuda_unusable_reason(ext) or "the CUDA driver probe failed"
    return ("it needs fastst._C built with nvcc (CUDA_HOME set at `pip install -e .`) and a "
            "visible CUDA device")


def available_backends() -> list[str]:
    """Backends that can run on this machine, in preference order, e.g. ["cpp", "torch"]."""
    return [name for name in BACKENDS if _backend_usable(name)]


def _devices_of(name: str) -> tuple[str, ...]:
    if name == "cuda":
        return ("cuda",)
    if name == "cpp":
        return ("cpu",)
    if name == "triton":
        return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
    return ("cpu", "cuda")


def choose_backend(op: str, device: torch.device, implemented: Iterable[str],
                   requested: Optional[str] = None) -> str:
    """Pick the backend that runs `op` on tensors of `device`.

    Args:
        op: the op's public name, for error messages.
        device: where the op's inputs live.
        implemented: the backends this op has.
        requested: the op's `backend=` argument (None: use FASTST_BACKEND, then the default).
    Raises:
        ValueError: unknown backend name, a backend this op lacks, one not built here, or one
            that cannot run on `device`.
    """
    implemented = tuple(implemented)
    source = "backend="
    if requested is None and os.environ.get("FASTST_BACKEND"):
        requested, source = os.environ["FASTST_BACKEND"], "FASTST_BACKEND="
    if requested is None:
        preference = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch")
        usable = [name for name in preference
                  if name in implemented and _backend_usable(name) and device.type in _devices_of(name)]
        # The first usable backend that passes its self-check (CUDA only; docs/ops.md §0.7).
        return _default_choice(op, device, usable) if usable else "torch"
    if requested not in BACKENDS:
        raise ValueError(f"{op}: unknown {source}{requested!r}; choose one of {list(BACKENDS)}")
    if requested not in implemented:
        raise ValueError(f"{op}: {source}{requested!r} is not implemented for this op; "
                         f"it has {list(implemented)}")
    if not _backend_usable(requested):
        hint = _cuda_hint() if requested == "cuda" else {
            "cpp": "fastst._C is not built: run `pip install -e .` in the repository",
            "triton": "it needs `pip install triton` and a CUDA device (or TRITON_INTERPRET=1)",
        }[requested]
        raise ValueError(f"{op}: {source}{requested!r} is not available here: {hint}; "
                         f"available: {available_backends()}")
    if device.type not in _devices_of(requested):
        raise ValueError(f"{op}: {source}{requested!r} cannot run on {device.type} tensors; "
                         f"move the inputs or choose another backend")
    return requested
