"""Compile every Triton kernel configuration fastst can launch to GPU machine code, without a GPU
(docs/ops.md §2), and fail on a register spill, a slow compile or a compile error.

    python tools/check_triton_kernels.py [--arch 80 90] [--jobs 2] [--limit-s 60]
                                         [--launches MODULE:FUNCTION] [--filter TEXT]

The configurations come from `fastst.ops.triton.launch_configs.all_launches` (or any
MODULE:FUNCTION returning KernelLaunch objects; MODULE may be a dotted name or a .py path). Each
is compiled by Triton for each --arch (compute capability: 80 = A100, 90 = H100) in worker
processes without TRITON_INTERPRET and with an empty Triton cache, so every compile is a real
one, timed. Registers, stack (spill) bytes and shared memory are read from the cubin with the
cuobjdump Triton ships. Prints one row per (configuration, arch) and exits 1 if any has a stack
or local-memory frame (a spill), takes longer than --limit-s (the worker is killed), or fails to
compile; 0 otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

DEFAULT_LAUNCHES = "fastst.ops.triton.launch_configs:all_launches"
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _load_module(name: str):
    """A module by dotted name, or by the path of a .py file."""
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(name))[0], name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(name)


def _launch_to_json(launch) -> dict:
    return {"module": launch.module, "kernel": launch.kernel, "signature": list(map(list, launch.signature)),
            "constexprs": list(map(list, launch.constexprs)), "num_warps": launch.num_warps,
            "enable_fp_fusion": launch.enable_fp_fusion, "maxnreg": launch.maxnreg, "describe": launch.describe()}


# ---------------------------------------------------------------------------------------- worker

def _compile(job: dict) -> dict:
    """Compile one configuration for one arch; the resource usage or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = sys.modules.get(job["module"]) or _load_module(job.get("path") or job["module"])
    kernel = getattr(module, job["kernel"])
    types = dict(job["signature"])
    consts = {k: v for k, v in job["constexprs"]}
    signature = {n: types.get(n, "constexpr") for n in kernel.arg_names}
    try:
        source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
    except TypeError:  # triton 3.2 names them `constants`
        source = ASTSource(fn=kernel, signature=signature, constants=consts)
    options = {"num_warps": job["num_warps"], "enable_fp_fusion": job["enable_fp_fusion"]}
    if job.get("maxnreg"):
        options["maxnreg"] = job["maxnreg"]
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", job["arch"], 32), options=options)
    seconds = time.perf_counter() - start
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    found = _RESOURCES.search(out)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    regs, stack, shared, local = map(int, found.groups())
    dynamic = int(getattr(compiled.metadata, "shared", 0) or 0)
    return {"regs": regs, "spill": stack + local, "smem": shared + dynamic, "seconds": seconds}


def _cuobjdump() -> str:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    found = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("cuobjdump not found: neither bundled with triton nor on PATH")
    return found


def _worker() -> int:
    """Read jobs (JSON lines) on stdin; answer {"start": i} when starting one, then its result.
    The answers go to the original stdout; anything else printed (by Triton, ptxas) to stderr."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        job = json.loads(line)
        print(json.dumps({"start": job["index"]}), file=answers, flush=True)
        try:
            result = _compile(job)
        except Exception as exc:  # reported per configuration, the check goes on
            lines = [l for l in str(exc).splitlines() if l.strip()]
            result = {"error": f"{type(exc).__name__}: {lines[-1].strip()[:200] if lines else ''}"}
        result["index"] = job["index"]
        print(json.dumps(result), file=answers, flush=True)
    return 0


# ---------------------------------------------------------------------------------------- parent

class _Worker:
    def __init__(self, env: Dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.job: Optional[int] = None
        self.started: Optional[float] = None
        self.sent = time.monotonic()

    def send(self, job: dict) -> None:
        self.job, self.started, self.sent = job["index"], None, time.monotonic()
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _worker_env(cache: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    env["TRITON_CACHE_DIR"] = cache  # empty: every compile is timed for real
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_jobs(jobs: List[dict], n_workers: int, limit_s: float) -> List[dict]:
    """Compile `jobs` on `n_workers` processes; a job running past `limit_s` (timed from its start,
    import time excluded) is killed and reported with "timeout"."""
    results: List[Optional[dict]] = [None] * len(jobs)
    pending = list(range(len(jobs)))[::-1]
    with tempfile.TemporaryDirectory(prefix="fastst-triton-check-") as cache:
        env = _worker_env(cache)
        sel = selectors.DefaultSelector()
        workers: List[_Worker] = []

        def feed(wk: _Worker) -> None:
            if pending:
                wk.send(jobs[pending.pop()])
            else:
                wk.job = None

        def spawn() -> None:
            wk = _Worker(env)
            workers.append(wk)
            sel.register(wk.proc.stdout, selectors.EVENT_READ, wk)
            feed(wk)

        def retire(wk: _Worker) -> None:
            sel.unregister(wk.proc.stdout)
            wk.stop()
            workers.remove(wk)

        for _ in range(min(n_workers, len(jobs))):
            spawn()
        try:
            while any(wk.job is not None for wk in workers):
                for key, _ in sel.select(timeout=0.2):
                    wk = key.data
                    line = wk.proc.stdout.readline()
                    if not line:  # the worker died (not by us): report its job, replace it
                        if wk.job is not None:
                            results[wk.job] = {"index": wk.job, "error": "the compiler process died"}
                        retire(wk)
                        spawn()
                        continue
                    msg = json.loads(line)
                    if "start" in msg:
                        wk.started = time.monotonic()
                    else:
                        results[msg["index"]] = msg
                        feed(wk)
                now = time.monotonic()
                for wk in list(workers):
                    if wk.job is None:
                        continue
                    # a compile past the limit, or a worker that never starts one (stuck importing)
                    since = wk.started if wk.started is not None else wk.sent + 300
                    if now - since > limit_s:
                        results[wk.job] = {"index": wk.job, "timeout": True, "seconds": now - since}
                        retire(wk)
                        spawn()
        finally:
            for wk in list(workers):
                retire(wk)
    return results


def failures_of(result: Optional[dict], limit_s: float) -> List[str]:
    """Why a compiled configuration fails the check (empty if it passes)."""
    if result is None:
        return ["no result from the compiler processes"]
    if result.get("error"):
        return [f"compile error: {result['error']}"]
    if result.get("timeout"):
        return [f"compile over {limit_s:g} s (stopped)"]
    why = []
    if result["spill"] > 0:
        why.append(f"spills {result['spill']} bytes")
    if result["seconds"] > limit_s:
        why.append(f"compile took {result['seconds']:.1f} s > {limit_s:g} s")
    return why


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 90)")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes (2)")
    parser.add_argument("--limit-s", type=float, default=60.0, help="longest allowed compile (60 s)")
    parser.add_argument("--launches", default=DEFAULT_LAUNCHES, help="MODULE:FUNCTION giving the configurations")
    parser.add_argument("--filter", default="", help="only configurations whose kernel or constexprs contain TEXT")
    args = parser.parse_args(argv)
    if args.worker:
        return _worker()
    os.environ.pop("TRITON_INTERPRET", None)  # the worker processes compile (they inherit nothing else)
    module_name, _, function = args.launches.rpartition(":")
    module = _load_module(module_name)
    launches = [l for l in getattr(module, function)() if args.filter in f"{l.kernel} {l.describe()}"]
    if not launches:
        print(f"no configurations from {args.launches} match {args.filter!r}", file=sys.stderr)
        return 1
    path = module.__file__ if module_name.endswith(".py") else None
    jobs = []
    for launch in launches:
        for arch in args.arch:
            job = dict(_launch_to_json(launch), arch=arch, index=len(jobs))
            if launch.module == getattr(module, "__name__", None) and path:
                job["path"] = path
            jobs.append(job)
    start = time.monotonic()
    results = run_jobs(jobs, args.jobs, args.limit_s)
    bad = 0
    print(f"{'kernel':<22} {'arch':>5} {'regs':>5} {'spill':>6} {'smem':>7} {'s':>6}  config")
    for job, result in zip(jobs, results):
        why = failures_of(result, args.limit_s)
        bad += bool(why)
        result = result or {}
        if "regs" not in result:
            regs = spill = smem = "-"
        else:
            regs, spill, smem = result["regs"], result["spill"], result["smem"]
        seconds = f"{result['seconds']:.1f}" if "seconds" in result else "-"
        print(f"{job['kernel']:<22} {'sm_' + str(job['arch']):>5} {regs:>5} {spill:>6} {smem:>7} {seconds:>6}  "
              f"{job['describe']}" + (f"  FAIL: {'; '.join(why)}" if why else ""))
    done = sum(r is not None and "regs" in r for r in results)
    print(f"{len(jobs)} compiles ({len(launches)} configurations x {len(args.arch)} archs), {done} compiled, "
          f"{bad} failed, {time.monotonic() - start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
