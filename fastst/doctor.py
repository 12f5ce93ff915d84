"""``python -m fastst.doctor``: is this machine's fastst right? (README "First run on a GPU")

Prints the versions (Python, torch and its CUDA, the CUDA runtime of fastst._C and the driver,
Triton, the compilers fastst._C was built with), the build (has_cuda, CUDA architectures), the
devices; then runs every public op of fastst.ops on every available backend and device against
the torch reference (fastst/ops/_selftest_cases.py, the agreement of docs/ops.md §0.5) and times
each call (median of a few synchronised calls; losses: forward and backward). On CUDA a second
call, after the checked first one, runs under ``torch.cuda.set_sync_debug_mode``: "error" for
the backends documented not to synchronise the host (docs/ops.md §0.4, value checks off), else
"warn" (counted in the result). Shapes: small (2x19x33x47) everywhere, tiny ones for the Triton
interpreter on the CPU, and B=8, C=19, 1024x2048 on CUDA (on the CPU with --large).

Ends with a markdown table for bug reports. Exit status: 0 all ok, 1 a mismatch or an error,
2 bad arguments. An explicit backend is passed for every call, so FASTST_BACKEND and the
self-check do not apply.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

import fastst
from fastst.ops import _backend, _cuda_probe
from fastst.ops._selftest_cases import (CASES, LARGE, SMALL, TINY, Row, backends_on, op_names,
                                        reference_outputs, run_case, short_error)

ENVIRONMENT_VARIABLES = ("FASTST_BACKEND", "FASTST_CHECK", "FASTST_SELFTEST", "FASTST_SELFTEST_DIR",
                         "FASTST_CUDA_SYNC_DEBUG", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
REPEAT = {"tiny": 2, "small": 5, "large": 3}


def _package_version(name: str) -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _compilers(path: Optional[str]) -> str:
    """The host compiler and nvcc release recorded in the extension's binary ("" if unknown)."""
    try:
        data = Path(path).read_bytes() if path else b""
    except OSError:
        return ""
    found = re.findall(rb"(GCC: \([^)]*\) [\w.\-]+|clang version [\w.\-]+|Cuda compilation tools, "
                       rb"release [\d.]+, V[\d.]+)", data)
    return "; ".join(dict.fromkeys(item.decode(errors="replace") for item in found))


def environment() -> dict:
    """Versions, build, backends and the environment variables that change what ops do."""
    ext = _backend.extension()
    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "torch CUDA": torch.version.cuda or "none (CPU build)",
            "triton": _package_version("triton"), "fastst": f"{fastst.__version__} ({Path(fastst.__file__).parent})"}
    if ext is None:
        info["fastst._C"] = "not built: run `pip install -e .` in the repository"
    else:
        info["fastst._C"] = ext.__file__
        info["has_cuda"] = bool(ext.has_cuda)
        if ext.has_cuda:
            info["CUDA architectures"] = ",".join(getattr(ext, "cuda_archs", []) or ["unknown"])
            try:
                probe = _cuda_probe.read_probe(ext)
                info["CUDA runtime (fastst._C)"] = _cuda_probe.version_text(probe.runtime_version)
                release = _cuda_probe._driver_release()
                info["CUDA driver"] = "none found" if not probe.driver_version else (
                    f"{release or 'release unknown'}, supports CUDA up to "
                    f"{_cuda_probe.version_text(probe.driver_version)}")
                if probe.error:
                    info["CUDA probe"] = probe.error
            except Exception as error:  # noqa: BLE001 - a report, never a crash
                info["CUDA probe"] = short_error(error)
        info["compilers (recorded in fastst._C)"] = _compilers(ext.__file__) or "unknown"
    info["available backends"] = ", ".join(_backend.available_backends())
    if torch.cuda.is_available() and ext is not None and ext.has_cuda:
        reason = _cuda_probe.cuda_unusable_reason(ext)
        info["cuda backend"] = "usable" if reason is None else f"off: {reason}"
    for name in ENVIRONMENT_VARIABLES:
        if name in os.environ:
            info[name] = os.environ[name]
    return info


def devices() -> List[torch.device]:
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def describe(device: torch.device) -> str:
    if device.type == "cpu":
        return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    p = torch.cuda.get_device_properties(device)
    return (f"{p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
            f"{p.multi_processor_count} SMs")


def shapes(backend: str, device: torch.device, with_large: bool) -> list:
    """The shapes a backend is checked at on `device`: the Triton interpreter on the CPU the
    tiny one, everything else the small one, and the large one when `with_large`."""
    if device.type == "cpu" and backend == "triton":
        return [TINY]
    return [SMALL, LARGE] if with_large else [SMALL]


def wants_large(device: torch.device, large: Optional[bool], done: set) -> bool:
    """--large / --no-large / default (None: CUDA devices only, once per device model in `done`)."""
    if large is None:
        return device.type == "cuda" and describe(device) not in done
    return large and describe(device) not in done


def run(ops: Sequence[str], large: Optional[bool], log=sys.stderr) -> List[Row]:
    """Every case of `ops` on every backend and device; `large`: None = on CUDA only."""
    rows: List[Row] = []
    cpu = torch.device("cpu")
    large_done: set = set()
    for device in devices():
        with_large = wants_large(device, large, large_done)
        if with_large:
            large_done.add(describe(device))
        for case in [c for c in CASES if c.op in ops]:
            plan: dict = {}
            for backend in backends_on(case, device):
                for shape in shapes(backend, device, with_large):
                    plan.setdefault(shape, []).append(backend)
            for shape, backends in plan.items():
                rows += _run_shape(case, shape, backends, device, cpu if shape is not LARGE else device, log)
    return rows


def _run_shape(case, shape, backends, device, reference_device, log) -> List[Row]:
    rows = []
    try:
        inputs, want = reference_outputs(case, shape, reference_device)
    except Exception as error:  # noqa: BLE001
        reason = f"the reference failed: {short_error(error)}"
        return [Row(case.label, b, str(device), case.shape_text(shape), "ERROR", reason) for b in backends]
    for backend in backends:
        row = run_case(case, backend, device, inputs, want, shape=shape, repeat=REPEAT[shape.name],
                    sync_debug=True)
        if backend == "torch" and reference_device == device and row.status == "ok":
            row.reason = row.reason or "the reference"
        ms = "" if row.ms is None else f"{row.ms:.3f} ms"
        print(f"  {row.status:8} {row.op} [{backend}, {device}, {row.shape}] {ms} {row.reason}",
              file=log, flush=True)
        rows.append(row)
    del inputs, want
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows: Sequence[Row]) -> str:
    """The markdown table of `rows`: op, backend, device, shape, result (+ reason), ms."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| op | backend | device | shape | result | ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        result = r.status + (f": {r.reason}" if r.reason else "")
        ms = "" if r.ms is None else f"{r.ms:.3f}"
        lines.append(f"| {cell(r.op)} | {r.backend} | {r.device} | {r.shape} | {cell(result)} | {ms} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastst.doctor",
        description="Check this machine's fastst: versions, build, devices, then every op on every "
                    "backend against the torch reference, timed; ends with a table for bug reports "
                    "(README \"First run on a GPU\").",
        epilog="Exit status: 0 all ok, 1 a mismatch or an error, 2 bad arguments.")
    parser.add_argument("--json", metavar="FILE", help="also write the report (environment, devices, rows) as JSON")
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=None,
                        help="the B=8, C=19, 1024x2048 shape (default: on CUDA devices only)")
    parser.add_argument("--ops", metavar="A,B", help=f"only these ops (default: all): {', '.join(op_names())}")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    ops = op_names()
    if args.ops is not None:
        ops = tuple(name.strip() for name in args.ops.split(",") if name.strip())
        unknown = [name for name in ops if name not in op_names()]
        if unknown or not ops:
            parser.error(f"--ops: unknown op {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(op_names())}")
    info = environment()
    device_list = {str(d): describe(d) for d in devices()}
    print("## fastst doctor\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    for name, text in device_list.items():
        print(f"- device {name}: {text}")
    print(flush=True)
    rows = run(ops, args.large)
    bad = [r for r in rows if r.status != "ok"]
    print(f"\n{len(rows)} checks: {len(rows) - len(bad)} ok, "
          f"{sum(r.status == 'MISMATCH' for r in rows)} MISMATCH, {sum(r.status == 'ERROR' for r in rows)} ERROR\n")
    print(table(rows))
    if args.json:
        report = {"environment": info, "devices": device_list, "ok": not bad,
                  "rows": [dataclasses.asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
