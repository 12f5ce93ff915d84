"""Fused region loss (forward + backward) against the released formulation in eager PyTorch and
its torch.compile: time (pytest-benchmark) and peak extra host memory (a fresh process per
measurement, bench/_peak_memory.py). C = 19, logits at 1/8 resolution upsampled to the labels'
size inside the loss, and the same-size case. `test_region_loss_lambdas`: the fused loss with
IAST's lambdas (0.1, 3.0) against terms turned off (a zero lambda skips the term's work;
(0, 0) is plain mean cross-entropy), with scattered and with block-shaped ignored regions."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import QUICK
from fastst.ops import _backend
from _region_loss_impls import make_inputs, region_loss_impl

pytestmark = pytest.mark.skipif(_backend.extension() is None, reason="fastst._C is not built")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, W = (128, 256) if QUICK else (512, 1024)
# (B, h, w): 1/8-resolution logits upsampled in the loss, and logits already at (H, W)
CASES = ([(2, H // 8, W // 8), (2, H, W)] if QUICK else
         [(1, H // 8, W // 8), (2, H // 8, W // 8), (8, H // 8, W // 8), (1, H, W), (2, H, W)])
FUSED = "triton" if DEVICE == "cuda" else "cpp"
IMPLS = [FUSED, "eager"] + ([] if QUICK else ["compile"])
LAMBDAS = [(0.1, 3.0), (0.0, 3.0), (0.1, 0.0), (0.0, 0.0)]


def _group(B, h, w):
    kind = f"logits {h}x{w} -> {H}x{W}" if (h, w) != (H, W) else f"logits {H}x{W} (no upsample)"
    return f"region_loss fwd+bwd B={B} C=19 {kind}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_{}x{}".format(*c))
def test_region_loss_fwd_bwd(benchmark, run, impl, case):
    B, h, w = case
    x, t = make_inputs(B, h, w, H, W, device=DEVICE)
    x.requires_grad_(True)
    fn = region_loss_impl(impl)

    def step():
        x.grad = None
        loss = fn(x, t)
        loss.backward()
        return loss

    loss = run(benchmark, _group(B, h, w), impl, step, device=DEVICE)
    assert torch.isfinite(loss) and x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.skipif(DEVICE == "cuda", reason="host-memory measurement; GPU memory is measured by the GPU run")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_{}x{}".format(*c))
def test_region_loss_peak_memory(note, case):
    B, h, w = case
    script = os.path.join(os.path.dirname(__file__), "_peak_memory.py")
    peaks = {}
    for impl in ("cpp", "eager"):
        out = subprocess.run([sys.executable, script, impl, str(B), str(h), str(w), str(H), str(W)],
                             check=True, capture_output=True, text=True)
        peaks[impl] = int(out.stdout.strip().splitlines()[-1])
    full = B * 19 * H * W * 4  # one (B, C, H, W) float32 tensor
    note("region_loss peak extra host memory (fwd+bwd, fresh process, VmHWM growth)",
         f"{_group(B, h, w)}: cpp {peaks['cpp'] / 2**20:8.1f} MiB, eager {peaks['eager'] / 2**20:8.1f} MiB"
         f" ({peaks['eager'] / max(peaks['cpp'], 2**20):.0f}x less; cpp counted as >= 1 MiB), one (B,C,H,W) fp32 tensor = {full / 2**20:.0f} MiB")
    assert peaks["eager"] > full  # the eager formulation materialises full-resolution tensors


@pytest.mark.parametrize("lambdas", LAMBDAS, ids=lambda lam: "kld{}_ent{}".format(*lam))
@pytest.mark.parametrize("ignored", ["pixels", "blocks"])
@pytest.mark.parametrize("case", [(2, H // 8, W // 8), (2, H, W)], ids=lambda c: "B{}_{}x{}".format(*c))
def test_region_loss_lambdas(benchmark, run, lambdas, ignored, case):
    B, h, w = case
    x, t = make_inputs(B, h, w, H, W, device=DEVICE, ignored=ignored)
    x.requires_grad_(True)
    fn = region_loss_impl(FUSED, lambda_kld=lambdas[0], lambda_ent=lambdas[1])

    def step():
        x.grad = None
        loss = fn(x, t)
        loss.backward()
        return loss

    group = f"{FUSED} by lambdas, ignored {ignored}: {_group(B, h, w)}"
    loss = run(benchmark, group, "lambdas {}/{}".format(*lambdas), step, device=DEVICE, rounds=30 if QUICK else 5)
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
