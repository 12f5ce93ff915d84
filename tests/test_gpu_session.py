"""bench/gpu_session.sh without a GPU: the usage message, every step handled, and each step's
commands and logs, with stand-ins for python's pytest/pip/doctor runs, nvidia-smi, nvcc and
compute-sanitizer (README "Tests and benchmarks on a GPU machine")."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"
STEPS = ["build", "doctor", "sanitizer", "multi", "tests", "bench"]

# python stand-in: records its arguments; pytest, pip and the doctor only pretend; anything else
# runs on the real interpreter.
PYTHON_STUB = """#!/usr/bin/env bash
echo "python $*" >> "$STUB_LOG"
case "$1 $2" in
  "-m pytest")
    for a in "$@"; do case "$a" in --benchmark-json=*) cp "$STUB_BENCH_JSON" "${a#--benchmark-json=}";; esac; done
    echo "${STUB_PYTEST_OUT:-3 passed}"; exit "${STUB_PYTEST_RC:-0}";;
  "-m pip") exit 0;;
  "-m fastst.doctor") echo "doctor table"; exit "${STUB_DOCTOR_RC:-0}";;
  "-c import torch; print(torch.cuda.device_count())") echo "${STUB_GPUS:-1}"; exit 0;;
esac
exec "$REAL_PYTHON" "$@"
"""
RECORDER = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
"""
BENCH_JSON = {"datetime": "2026-12-10T10:00:00", "machine_info": {"cpu": {"brand_raw": "a CPU"}},
              "benchmarks": [
                  {"name": "t1", "group": "stats B=2", "extra_info": {"impl": "cuda"},
                   "stats": {"median": 0.002, "rounds": 50}},
                  {"name": "t2", "group": "stats B=2", "extra_info": {"impl": "reference"},
                   "stats": {"median": 0.010, "rounds": 20}}]}


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("args", [[], ["nope"], ["--help"]])
def test_usage_lists_every_step(args):
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: bash bench/gpu_session.sh STEP")
    assert re.search(r"STEP one of: (\S+ ?)+", done.stderr).group(0).split(": ")[1].split() == STEPS


def test_every_step_is_handled():
    text = SCRIPT.read_text()
    case = re.search(r"^  ([a-z |]+)\) ;;$", text, re.M).group(1)
    assert [s.strip() for s in case.split("|")] == STEPS
    for step in STEPS:
        assert re.search(rf"^step_{step}\(\) {{$", text, re.M), step
    assert re.search(r"^STEP_SECONDS=480$", text, re.M)
    assert 'timeout --kill-after=15 "$STEP_SECONDS" bash "$SELF" --run "$step"' in text


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(PYTHON_STUB)
    for name in ("nvidia-smi", "nvcc", "compute-sanitizer"):
        (bin_dir / name).write_text(RECORDER)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "bench.json").write_text(json.dumps(BENCH_JSON))
    env = {**os.environ, "CUDA_HOME": str(tmp_path / "cuda"), "PYTHON": str(bin_dir / "python"),
           "REAL_PYTHON": sys.executable, "STUB_LOG": str(tmp_path / "calls.log"),
           "STUB_BENCH_JSON": str(tmp_path / "bench.json"), "OUT": str(tmp_path / "out")}

    def run(step, **extra):
        done = subprocess.run(["bash", str(SCRIPT), step], env={**env, **extra}, capture_output=True,
                              text=True, cwd=tmp_path, timeout=120)
        calls = (tmp_path / "calls.log").read_text() if (tmp_path / "calls.log").exists() else ""
        (tmp_path / "calls.log").unlink(missing_ok=True)
        log = (tmp_path / "out" / f"{step}.log").read_text()
        assert log.startswith(f"== {step} (") and "at most 480 s" in log
        return done.returncode, calls, log

    return run


def test_doctor_step(stubs):
    rc, calls, log = stubs("doctor")
    assert rc == 0 and "python -m fastst.doctor --json" in calls and "doctor table" in log
    assert "doctor.json" in calls  # the report for bench/RESULTS.md
    assert stubs("doctor", STUB_DOCTOR_RC="1")[0] == 1


def test_sanitizer_step_runs_memcheck_and_racecheck_on_the_cuda_op_tests(stubs):
    rc, calls, _ = stubs("sanitizer")
    assert rc == 0
    for tool in ("memcheck", "racecheck"):
        line = next(c for c in calls.splitlines() if f"--tool {tool}" in c)
        assert "--error-exitcode 97" in line and "-m pytest tests/ops/test_ias_cuda.py tests/ops/test_stats.py -k cuda" in line


def test_multi_step(stubs):
    rc, calls, log = stubs("multi", STUB_GPUS="1")
    assert rc == 0 and "needs cuda:1; nothing to run" in log and "pytest" not in calls
    rc, calls, log = stubs("multi", STUB_GPUS="2")
    assert rc == 0 and "-m pytest tests/ops/test_ias_cuda.py" in calls
    rc, _, log = stubs("multi", STUB_GPUS="2", STUB_PYTEST_OUT="SKIPPED [2] no second GPU: needs cuda:1")
    assert rc == 1 and "two-device test was skipped" in log


def test_tests_step_runs_the_files_with_gpu_cases(stubs):
    rc, calls, log = stubs("tests")
    assert rc == 0
    for name in ("tests/ops/test_ias_cuda.py", "tests/ops/test_gpu_no_host_sync.py", "tests/ops/test_stats.py"):
        assert name in calls
    assert stubs("tests", STUB_PYTEST_RC="1")[0] == 1  # a failing test fails the step


def test_bench_step_writes_json_and_markdown(stubs, tmp_path):
    rc, calls, log = stubs("bench")
    assert rc == 0 and f"--benchmark-json={tmp_path}/out/bench.json" in calls
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "**stats B=2**" in table and "| cuda | 2.000 | 50 | 5.0x |" in table
    assert "| reference | 10.000 | 20 | 1.0x |" in table and "2026-12-10" in table


def test_build_step_fails_when_the_cuda_backend_is_off(stubs):
    """Here fastst._C cannot run CUDA (no GPU): the build step must say so and fail."""
    rc, calls, log = stubs("build")
    assert "nvidia-smi" in calls and "-m pip install -v --no-build-isolation --no-deps -e ." in calls
    assert rc != 0 and ("built without CUDA" in log or "the cuda backend is off here" in log)
