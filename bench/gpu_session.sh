#!/usr/bin/env bash
# A GPU session in steps of at most 8 minutes each (`timeout 480`), for a GPU machine without
# network. Here, once (with network):
#   pip download setuptools cmake ninja pybind11 numpy pillow pyyaml tqdm pytest pytest-benchmark -d wheelhouse
# There, from the repository root, one call per step (OUT = where logs go, default gpu_out/):
#   bash bench/gpu_session.sh build      # offline install from ./wheelhouse, CUDA build, versions, driver probe
#   bash bench/gpu_session.sh doctor     # python -m fastst.doctor (every op, every backend, vs torch)
#   bash bench/gpu_session.sh sanitizer  # compute-sanitizer memcheck + racecheck on the CUDA op tests
#   bash bench/gpu_session.sh multi      # the two-device (cuda:1) tests, where two GPUs exist
#   bash bench/gpu_session.sh tests      # the test files that have GPU cases
#   bash bench/gpu_session.sh bench      # pytest bench/ at full size: bench.json + bench.md
# Each step writes OUT/<step>.log and exits non-zero when its check fails or it runs out of time;
# doctor also writes OUT/doctor.json; bench writes OUT/bench.json and OUT/bench.md (tables for
# bench/RESULTS.md).
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
STEPS=(build doctor sanitizer multi tests bench)
STEP_SECONDS=480
OUT="${OUT:-gpu_out}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
PY="${PYTHON:-$(command -v python || command -v python3)}"

usage() {
  echo "usage: bash bench/gpu_session.sh STEP   with STEP one of: ${STEPS[*]}" >&2
  echo "  (each step at most ${STEP_SECONDS} s; logs in \$OUT/<step>.log, OUT=$OUT)" >&2
  exit 2
}

# The CUDA op tests: tests/ops/test_ias_cuda.py and the cuda cases of the statistics tests.
CUDA_OP_TESTS=(tests/ops/test_ias_cuda.py tests/ops/test_stats.py)

step_build() {
  if [ -d wheelhouse ]; then
    "$PY" -m pip install --no-index -f wheelhouse setuptools cmake ninja pybind11
    # Runtime and test dependencies the machine may lack; installed only where missing.
    for pkg in numpy pillow pyyaml tqdm pytest pytest-benchmark; do
      "$PY" -m pip show "$pkg" >/dev/null 2>&1 || "$PY" -m pip install --no-index -f wheelhouse "$pkg"
    done
  fi
  nvidia-smi
  nvcc --version | tail -n 2
  # -v shows CMake's messages (architectures; a warning when torch's CUDA major differs from nvcc's).
  "$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$OUT/build_pip.log" 2>&1 ||
    { tail -n 60 "$OUT/build_pip.log"; return 1; }
  grep -E -A 6 "fastst:|CMake Warning" "$OUT/build_pip.log" || true
  "$PY" - <<'PYEOF'
import torch
import fastst._C as c
from fastst.ops import available_backends
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices",
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
print("fastst._C has_cuda", c.has_cuda, "runtime", c.cuda_runtime_version, "archs", c.cuda_archs)
print("driver probe (ok, driver, runtime, devices, error):", c._cuda_probe())
print("available backends:", available_backends())
assert c.has_cuda, "the extension was built without CUDA: is nvcc under CUDA_HOME?"
assert "cuda" in available_backends(), ("the cuda backend is off here: torch sees no GPU, or the "
                                       "driver probe failed (its warning is above)")
PYEOF
}

step_doctor() {
  "$PY" -m fastst.doctor --json "$OUT/doctor.json"
}

step_sanitizer() {
  local sanitizer
  sanitizer="$(command -v compute-sanitizer || echo "$CUDA_HOME/compute-sanitizer/compute-sanitizer")"
  [ -x "$sanitizer" ] || { echo "compute-sanitizer not found (looked on PATH and under $CUDA_HOME)"; return 1; }
  # No caching allocator under memcheck: an access past a tensor's end must leave its allocation.
  echo "== memcheck"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 300 "$sanitizer" --tool memcheck --error-exitcode 97 \
    "$PY" -m pytest "${CUDA_OP_TESTS[@]}" -k cuda -q -rs -p no:cacheprovider
  echo "== racecheck"
  "$sanitizer" --tool racecheck --error-exitcode 97 \
    "$PY" -m pytest "${CUDA_OP_TESTS[@]}" -k cuda -q -rs -p no:cacheprovider
}

step_multi() {
  local count
  count="$("$PY" -c "import torch; print(torch.cuda.device_count())")"
  if [ "$count" -lt 2 ]; then
    echo "$count GPU(s): the two-device check needs cuda:1; nothing to run"
    return 0
  fi
  "$PY" -m pytest tests/ops/test_ias_cuda.py -q -rs -p no:cacheprovider | tee "$OUT/.multi"
  if grep -q "no second GPU" "$OUT/.multi"; then
    echo "a two-device test was skipped although $count GPUs are visible"
    return 1
  fi
}

step_tests() {
  # Every test file with a GPU case (those that look for a CUDA device).
  local files
  mapfile -t files < <(grep -rlE "cuda\.is_available|cuda\.device_count" tests --include='test_*.py' | sort)
  echo "${#files[@]} test files: ${files[*]}"
  "$PY" -m pytest "${files[@]}" -q -rs -p no:cacheprovider
}

step_bench() {
  FASTST_BENCH_QUICK=0 "$PY" -m pytest bench -q -s -p no:cacheprovider --benchmark-json="$OUT/bench.json"
  "$PY" - "$OUT/bench.json" "$OUT/bench.md" <<'PYEOF'
"""bench.json (pytest-benchmark) -> one markdown table per group, as in bench/RESULTS.md."""
import json
import subprocess
import sys
from collections import defaultdict

data = json.load(open(sys.argv[1]))
groups = defaultdict(list)
for b in data["benchmarks"]:
    impl = b.get("extra_info", {}).get("impl") or b["name"]
    groups[b.get("group") or b["name"]].append((impl, b["stats"]["median"], b["stats"]["rounds"]))
info = data.get("machine_info", {})
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = "?"
try:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
except Exception as error:  # the table is still written
    device, versions = "?", f"torch: {error}"
lines = [f"{device}, {data.get('datetime', '')[:10]}, commit {commit}, {versions}, "
         f"{info.get('cpu', {}).get('brand_raw', '')}. Command: "
         "`FASTST_BENCH_QUICK=0 python -m pytest bench -q -s` (bench/gpu_session.sh bench). "
         "Medians in ms; speed-up = the group's slowest median / this one.", ""]
for group, rows in sorted(groups.items()):
    slowest = max(m for _, m, _ in rows)
    lines += [f"**{group}**", "", "| impl | median (ms) | rounds | speed-up |", "|---|---|---|---|"]
    lines += [f"| {impl} | {m * 1e3:.3f} | {r} | {slowest / m:.1f}x |" for impl, m, r in sorted(rows, key=lambda x: x[1])]
    lines.append("")
open(sys.argv[2], "w").write("\n".join(lines))
print("\n".join(lines))
PYEOF
}

step="${1:-}"
case "$step" in
  build | doctor | sanitizer | multi | tests | bench) ;;
  --run)  # internal: run one step's function (under the timeout of the call below)
    "step_${2:?}"
    exit 0
    ;;
  *) usage ;;
esac
mkdir -p "$OUT"
echo "== $step ($(date -u +%FT%TZ), at most ${STEP_SECONDS} s)" | tee "$OUT/$step.log"
# timeout signals the step's whole process group (pytest and its children included).
timeout --kill-after=15 "$STEP_SECONDS" bash "$SELF" --run "$step" 2>&1 | tee -a "$OUT/$step.log"
