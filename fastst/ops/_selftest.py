"""The self-check that guards the default backend choice on CUDA (docs/ops.md §0.7).

The first default-chosen use of an op on a backend (cuda, then triton) for CUDA tensors runs that
op's cases (fastst/ops/_selftest_cases.py) at the small shape against the reference on the CPU,
once per device name, backend and build; the verdict is kept in memory and cached on disk
(FASTST_SELFTEST_DIR, default ~/.cache/fastst/selftest). A backend that fails or mismatches is
passed over for the next one (cuda -> triton -> torch) with one warning naming the op, the
backend and `python -m fastst.doctor`. FASTST_SELFTEST=0 turns it off; an explicit `backend=`
or FASTST_BACKEND is never checked; nothing runs while torch.compile traces or a CUDA graph is
captured, or for CPU tensors.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

import fastst
from fastst.atomic import read_json, write_json_atomic

from ._backend import extension
from ._selftest_cases import CASES, SMALL, Shape, reference_outputs, run_case, short_error, sync_debug_mode

SELFTEST_VARIABLE = "FASTST_SELFTEST"
DIR_VARIABLE = "FASTST_SELFTEST_DIR"
DOCTOR = "python -m fastst.doctor"


def selftest_op(op: str, backend: str, device: torch.device, shape: Shape = SMALL) -> Optional[str]:
    """The self-check: every case of `op` on `backend` and `device` at `shape` against the
    reference on the CPU. Returns None when all agree, else the first failure's reason."""
    cpu = torch.device("cpu")
    # The caller's autocast and sync-debug mode are not the check's (the comparison reads back).
    with torch.autocast("cpu", enabled=False), _autocast_off(device), sync_debug_mode(device, "default"):
        for case in CASES:
            if case.op != op:
                continue
            inputs, want = reference_outputs(case, shape, cpu)
            row = run_case(case, backend, device, inputs, want, shape=shape)
            if row.status != "ok":
                return f"{case.label}: {row.status} {row.reason}"
    return None


def _autocast_off(device: torch.device):
    return torch.autocast(device.type, enabled=False) if device.type == "cuda" else contextlib.nullcontext()


class SelfTestWarning(UserWarning):
    """A backend failed its self-check and an op moved to the next backend."""


_DEVICE_TYPES = frozenset({"cuda"})
_verdicts: Dict[Tuple[str, str, str], Optional[str]] = {}  # (op, backend, device) -> None or reason
_warned: set = set()
_lock = threading.RLock()


def applies_to(device_type: str) -> bool:
    """Whether default choices on tensors of this device type are self-checked (CUDA only: the
    CPU backends are tested where they are built)."""
    return device_type in _DEVICE_TYPES


def enabled() -> bool:
    return os.environ.get(SELFTEST_VARIABLE, "1") != "0"


def cache_dir() -> Path:
    return Path(os.environ.get(DIR_VARIABLE) or Path.home() / ".cache" / "fastst" / "selftest")


def default_choice(op: str, device: torch.device, candidates: Sequence[str]) -> str:
    """The default backend for `op` on `device` from the usable `candidates` (preference order,
    "torch" last): the first that passes its self-check. Nothing is checked (the first
    candidate is returned) while torch.compile traces, for device types the check does not apply
    to, with FASTST_SELFTEST=0, or for ops with one candidate. The reference ("torch") is never
    checked."""
    if torch.compiler.is_compiling() or len(candidates) < 2 or not applies_to(device.type):
        return candidates[0]
    if not enabled():
        return candidates[0]
    for position, name in enumerate(candidates[:-1]):
        if name == "torch":
            return name
        reason = verdict(op, name, device)
        if reason is None:
            return name
        _warn_once(op, name, device, reason, candidates[position + 1])
    return candidates[-1]


def _device_key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def verdict(op: str, backend: str, device: torch.device) -> Optional[str]:
    """None if `op` on `backend` passed its self-check on `device`, else why not: from memory,
    else the disk cache, else by running it (and caching the result). During CUDA graph capture
    nothing runs: an unknown verdict counts as passed."""
    device = _device_key(device)
    key = (op, backend, str(device))
    with _lock:
        if key in _verdicts:
            return _verdicts[key]
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        path = cache_path(op, backend, device)
        found, reason = _read(path)
        broken = None if found else _context_error(device)
        if broken is not None:
            # An earlier error (another backend's check) left the CUDA context unusable: this
            # backend cannot be judged here, and nothing is cached for it.
            reason = f"not checked, the CUDA context is unusable after an earlier error ({broken})"
        elif not found:
            try:
                reason = selftest_op(op, backend, device)
            except Exception as error:  # noqa: BLE001 - a check that cannot run is a failure
                reason = short_error(error)
            _write(path, op, backend, device, reason)
        _verdicts[key] = reason
        return reason


def _context_error(device: torch.device) -> Optional[str]:
    """None while `device` still runs work, else the error a synchronisation raises (a sticky
    error such as an illegal address poisons the context for every later kernel)."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except RuntimeError as error:
        return short_error(error)
    return None


def _warn_once(op: str, backend: str, device: torch.device, reason: str, instead: str) -> None:
    device = _device_key(device)
    key = (op, backend, str(device))
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"fastst: the self-check of {op} on the {backend!r} backend failed on {device} "
        f"({_device_name(device)}): {reason}. {op} uses {instead!r} by default from now on. "
        f"Run `{DOCTOR}` for the full report (and attach its table to a bug report); "
        f"{SELFTEST_VARIABLE}=0 turns the check off; the result is cached in {cache_dir()}.",
        SelfTestWarning, stacklevel=5)


def clear_memory() -> None:
    """Forget the verdicts and warnings of this process (the disk cache stays)."""
    with _lock:
        _verdicts.clear()
        _warned.clear()


# ---------------------------------------------------------------------------------- the disk cache
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _file_stamp(path: Optional[str]) -> Optional[list]:
    if not path:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def build_key(backend: str, device: torch.device) -> dict:
    """What a verdict depends on: the device's name, the backend, and the build (torch, triton
    and fastst versions, the size and mtime of fastst._C and of the Python sources of
    fastst.ops, which hold the Triton kernels)."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    sources = sorted(Path(__file__).parent.rglob("*.py"))
    digest = hashlib.sha256()
    for source in sources:
        digest.update(f"{source.name}:{_file_stamp(str(source))}".encode())
    key = {"device": _device_name(device), "backend": backend, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "triton": triton_version, "fastst": fastst.__version__,
           "extension": _file_stamp(getattr(extension(), "__file__", None)),
           "sources": digest.hexdigest()[:16]}
    if device.type == "cuda":
        key["capability"] = list(torch.cuda.get_device_capability(device))
    return key


def cache_path(op: str, backend: str, device: torch.device) -> Path:
    key = json.dumps(build_key(backend, device), sort_keys=True)
    return cache_dir() / f"{op}.{backend}.{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def _read(path: Path) -> Tuple[bool, Optional[str]]:
    """(found, reason): (True, None) for a cached pass, (True, why) for a failure, (False, None)
    when there is no readable entry."""
    entry = read_json(path)
    if not isinstance(entry, dict) or not isinstance(entry.get("passed"), bool):
        return False, None
    return True, (None if entry["passed"] else str(entry.get("reason") or "failed"))


def _write(path: Path, op: str, backend: str, device: torch.device, reason: Optional[str]) -> None:
    """Atomically (fastst/atomic.py); a cache that cannot be written is skipped (the verdict
    stays in memory for this process)."""
    entry = {"op": op, "backend": backend, "device": str(device), "passed": reason is None,
             "reason": reason or "", "key": build_key(backend, device),
             "checked": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with contextlib.suppress(OSError):
        write_json_atomic(entry, path)
