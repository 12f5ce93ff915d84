"""The Triton compile check (tools/check_triton_kernels.py, docs/ops.md §2) and its enumeration
(fastst/ops/triton/launch_configs.py): real launches of every Triton op, recorded without running
them, are found among the enumerated configurations, so the two cannot drift; the check passes a
clean kernel and fails a spilling one, one that does not compile and one that compiles too
slowly. The check compiles for sm_80/sm_90 with Triton's own ptxas: no GPU is needed."""
import os
import re
import subprocess
import sys

import pytest
import torch

from fastst.ops import _backend
from fastst.ops.loss_modes import BOOTSTRAP_HARD, BOOTSTRAP_SOFT, BOOTSTRAP_TEACHER, MRKLD

pytestmark = pytest.mark.skipif("triton" not in _backend.available_backends(), reason="needs triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "check_triton_kernels.py")
KERNELS = os.path.join(ROOT, "tests", "ops", "_triton_check_kernels.py")


class _Recorder:
    """Stands in for a kernel: `rec[grid](*args, **kwargs)` records the launch, runs nothing."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getattr__(self, name):  # arg_names, fn: the enumeration reads them from the kernel
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        from fastst.ops.triton.launch_configs import launch_from_call

        def launch(*args, **kwargs):
            self.calls.append(launch_from_call(self.kernel, args, kwargs))
        return launch


@pytest.fixture
def recorded(monkeypatch):
    from fastst.ops.triton import fused_loss, stats, tpld
    calls = []
    for module, name in ((stats, "_stats_kernel"), (tpld, "_tpld_pixels_kernel"), (tpld, "_tpld_vote_kernel"),
                         (fused_loss, "_fused_loss_kernel")):
        monkeypatch.setattr(module, name, _Recorder(getattr(module, name), calls))
    monkeypatch.setenv("FASTST_CHECK", "0")  # the recorded kernels write nothing to check
    return calls


def _run_every_op(dtype, labels_dtype, C, h, w, H, W, align):
    """Each Triton op once per variant, at the enumeration's representative sizes."""
    from fastst.ops.triton.region_loss import region_loss_triton
    from fastst.ops.triton.st_loss import st_loss_triton
    from fastst.ops.triton.stats import pixel_stats_triton
    from fastst.ops.triton.tpld import cbst_label_triton, image_confidence_triton, tpld_vote_triton
    g = torch.Generator().manual_seed(C)
    logits = torch.randn(1, C, h, w, generator=g).to(dtype)
    probs = torch.softmax(torch.randn(1, C, H, W, generator=g), 1).to(dtype)
    lambdas = torch.full((C,), 0.5)
    target = torch.randint(0, C, (1, H, W), generator=g).to(labels_dtype)
    for from_logits in (True, False):
        pixel_stats_triton(logits, from_logits, H, W, align)
    tpld_vote_triton(probs, lambdas, 7, 0.7, 1)
    image_confidence_triton(probs, lambdas)
    cbst_label_triton(probs, lambdas)
    for grad in (True, False):
        for kld, ent in ((0.1, 3.0), (0.0, 3.0), (0.1, 0.0), (0.0, 0.0)):
            region_loss_triton(logits, target, kld, ent, 255, H, W, align, False, grad)
        soft = torch.softmax(torch.randn(1, C, H, W, generator=g), 1)
        for mode, soft_target, is_target in ((BOOTSTRAP_HARD, None, None), (BOOTSTRAP_SOFT, soft, None),
                                             (MRKLD, None, torch.ones(1, dtype=torch.bool))):
            st_loss_triton(logits, target, lambdas, soft_target, is_target, mode, 0.9, 0.1, 2.0, False, 255,
                           H, W, align, grad)
        st_loss_triton(logits, torch.empty(0, dtype=torch.uint8), lambdas, logits.float(), None, BOOTSTRAP_TEACHER,
                       0.9, 0.1, 2.0, False, 255, H, W, align, grad)


@pytest.mark.parametrize("C", [19, 150])
@pytest.mark.parametrize("geometry", [(64, 128, 64, 128, True), (64, 128, 256, 512, True),
                                      (64, 128, 96, 192, False)], ids=["same", "4x", "1.5x"])
def test_real_launches_are_enumerated(recorded, C, geometry):
    from fastst.ops.triton.launch_configs import all_launches
    _run_every_op(torch.float32, torch.uint8, C, *geometry)
    kernels = {launch.kernel for launch in recorded}
    assert kernels == {"_stats_kernel", "_tpld_pixels_kernel", "_tpld_vote_kernel", "_fused_loss_kernel"}
    assert len(recorded) == 2 + 2 + 1 + 1 + 2 * (4 + 3 + 1)
    enumerated = set(all_launches())
    missing = [launch.describe() for launch in recorded if launch not in enumerated]
    assert not missing, "launched but not enumerated:\n" + "\n".join(missing)


@pytest.mark.parametrize("dtype,labels", [(torch.float16, torch.uint8), (torch.bfloat16, torch.uint8),
                                          (torch.float32, torch.int64)], ids=["fp16", "bf16", "int64-labels"])
def test_real_launches_in_other_dtypes_are_enumerated(recorded, dtype, labels):
    from fastst.ops.triton.launch_configs import all_launches
    _run_every_op(dtype, labels, 150, 64, 128, 256, 512, True)
    enumerated = set(all_launches())
    missing = [launch.describe() for launch in recorded if launch not in enumerated]
    assert not missing, "launched but not enumerated:\n" + "\n".join(missing)


def test_enumeration_names_every_kernel_with_fusion_decided():
    from fastst.ops.triton.launch_configs import all_launches
    launches = all_launches()
    assert {l.kernel for l in launches} == {"_stats_kernel", "_tpld_pixels_kernel", "_tpld_vote_kernel",
                                           "_fused_loss_kernel"}
    assert all(l.enable_fp_fusion is False for l in launches)  # bit-exact twins: no contraction anywhere
    assert len(launches) == len(set(launches))


def _check(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


def _rows(out):
    """{(kernel, arch): row} of the check's table."""
    return {tuple(line.split()[:2]): line for line in out.splitlines() if re.match(r"^_\w+\s+sm_\d+", line)}


def test_check_passes_a_clean_kernel_and_fails_a_spill_and_a_compile_error():
    result = _check("--launches", f"{KERNELS}:good_spilling_broken")
    assert result.returncode == 1, result.stdout + result.stderr
    rows = _rows(result.stdout)
    for arch in ("sm_80", "sm_90"):
        assert "FAIL" not in rows[("_scale", arch)]
        assert re.search(r"FAIL: spills \d+ bytes", rows[("_normalise_block", arch)])
        assert "FAIL: compile error" in rows[("_not_a_power_of_two", arch)]
    assert "6 compiles (3 configurations x 2 archs), 4 compiled, 4 failed" in result.stdout
    clean = _check("--launches", f"{KERNELS}:good")
    assert clean.returncode == 0 and "0 failed" in clean.stdout, clean.stdout + clean.stderr


def test_check_stops_a_compile_over_the_limit():
    result = _check("--launches", f"{KERNELS}:slow", "--arch", "90", "--limit-s", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL: compile over 2 s (stopped)" in _rows(result.stdout)[("_unrolled", "sm_90")]
