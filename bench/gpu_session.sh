#!/usr/bin/env bash
# One GPU session in few calls (the lent GPU machine has no network and a 10-minute limit per
# command). Here, once:  pip download setuptools cmake ninja pybind11 numpy pillow pyyaml tqdm -d wheelhouse
# There, from the repository root (OUT = where logs go; the device tool sets it):
#   bash bench/gpu_session.sh build    # offline install of the build tools, CUDA build, versions
#   bash bench/gpu_session.sh tests    # the whole test suite (CUDA and Triton cases run on the GPU)
#   bash bench/gpu_session.sh bench    # full-size benchmarks, JSON + tables for bench/RESULTS.md
# Each step writes OUT/<step>.log; bench also OUT/bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
PY="${PYTHON:-$(command -v python || command -v python3)}"

step="${1:-}"
case "$step" in
  build)
    {
      if [ -d wheelhouse ]; then
        "$PY" -m pip install --no-index -f wheelhouse setuptools cmake ninja pybind11
        # Runtime dependencies the machine may lack; installed only where missing.
        for pkg in numpy pillow pyyaml tqdm; do
          "$PY" -m pip show "$pkg" >/dev/null 2>&1 || "$PY" -m pip install --no-index -f wheelhouse "$pkg"
        done
      fi
      nvidia-smi
      "$PY" -m pip install --no-build-isolation --no-deps -e .
      "$PY" - <<'PYEOF'
import torch, fastst._C as c
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
print("fastst._C has_cuda =", c.has_cuda)
assert c.has_cuda, "the extension was built without CUDA: is nvcc under CUDA_HOME?"
PYEOF
    } 2>&1 | tee "$OUT/build.log"
    ;;
  tests)
    "$PY" -m pytest tests -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
    ;;
  bench)
    FASTST_BENCH_QUICK=0 "$PY" -m pytest bench -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
      2>&1 | tee "$OUT/bench.log"
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh build|tests|bench" >&2
    exit 2
    ;;
esac
