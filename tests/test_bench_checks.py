"""The benchmarks check values before they time (bench/_value_checks.py, issue 24 item 6): a
backend made wrong fails ``pytest bench/`` instead of printing a speed-up, and the quick mode's
table says that its ratios are not a measurement."""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench_module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checks = _bench_module("_value_checks")


def test_equal_labels_pass_and_one_changed_label_fails():
    want = torch.tensor([[0, 3, 255], [7, 7, 1]], dtype=torch.uint8)
    checks.assert_equal("cpp", want.clone(), want)
    wrong = want.clone()
    wrong[1, 2] = 2
    with pytest.raises(AssertionError, match=r"cpp: labels differs from the reference: 1 of 6 "
                                             r"values differ; first at \(1, 2\)"):
        checks.assert_equal("cpp", wrong, want, "labels")


def test_ias_from_logits_allows_ties_only():
    from fastst.ops import reference

    x = torch.randn(2, 5, 6, 8, generator=torch.Generator().manual_seed(0)) * 3
    kw = dict(alpha=0.2, mode="official", from_logits=True, size=(12, 16))
    want = reference.ias_pseudo_label(x, None, **kw)
    checks.assert_ias_close("cpp", want, want, x, from_logits=True, mode="official", size=(12, 16))
    labels = want[0].clone()
    labels[0, 5, 5] = 255 if labels[0, 5, 5] != 255 else 0
    with pytest.raises(AssertionError, match="1 labels differ from the reference"):
        checks.assert_ias_close("cpp", (labels,), want, x, from_logits=True, mode="official",
                                size=(12, 16))
    seq = want[2] + 1e-5
    with pytest.raises(AssertionError, match="theta per group differs"):
        checks.assert_ias_close("cpp", (want[0], want[1], seq), want, x, from_logits=True,
                                mode="official", size=(12, 16))


def test_loss_tolerances_are_those_of_tests_ops():
    grad = torch.linspace(-1, 1, 50)
    loss = torch.tensor(2.0)
    checks.assert_loss_close("cpp", (loss * (1 + 5e-6), grad + 5e-5), (loss, grad))
    with pytest.raises(AssertionError, match="cpp: loss"):
        checks.assert_loss_close("cpp", (loss * (1 + 1e-4), grad), (loss, grad))
    with pytest.raises(AssertionError, match="cpp: gradient differs"):
        checks.assert_loss_close("cpp", (loss, grad + 2e-4), (loss, grad))


def test_quick_table_is_labelled_not_a_measurement(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    conftest = _bench_module("conftest")
    results = {"op B=2": {"cpp": 0.001, "reference": 0.01}}
    quick = "\n".join(conftest.speedup_lines(results, quick=True))
    assert "not a measurement" in quick.splitlines()[0]
    assert "[op B=2] (not a measurement)" in quick
    assert "(not a measurement: 10.0x vs reference)" in quick
    full = "\n".join(conftest.speedup_lines(results, quick=False))
    assert "not a measurement" not in full and "10.0x vs reference" in full


# A pytest plugin for the benchmark run below: the cpp backend's IAS labels and TPLD vote get one
# pixel wrong (the first one), everything else stays as it is.
_BREAK_CPP = textwrap.dedent("""
    import fastst.ops as ops

    def _one_pixel_wrong(labels):
        labels = labels.clone()
        flat = labels.view(-1)
        flat[0] = 0 if int(flat[0]) == 255 else 255
        return labels

    _ias, _vote = ops.ias_pseudo_label, ops.tpld_vote

    def ias_pseudo_label(*args, backend=None, **kwargs):
        out = _ias(*args, backend=backend, **kwargs)
        return (_one_pixel_wrong(out[0]), *out[1:]) if backend == "cpp" else out

    def tpld_vote(*args, backend=None, **kwargs):
        out = _vote(*args, backend=backend, **kwargs)
        return _one_pixel_wrong(out) if backend == "cpp" else out

    ops.ias_pseudo_label, ops.tpld_vote = ias_pseudo_label, tpld_vote
""")


def test_a_wrong_backend_fails_the_benchmark_before_it_is_timed(tmp_path):
    (tmp_path / "break_cpp.py").write_text(_BREAK_CPP)
    env = dict(os.environ, FASTST_BENCH_QUICK="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    selected = "test_ias and cpp-official-2-probs or test_tpld_vote and cpp or reference-paper-2-probs"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "break_cpp", "-p", "no:cacheprovider", "-q",
         str(BENCH / "test_ias.py"), str(BENCH / "test_tpld.py"), "-k", selected],
        cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "2 failed, 1 passed" in out, out  # the reference itself still runs and is timed
    assert "cpp: labels differs from the reference: 1 of 65536 values differ" in out
    assert "cpp: tpld_vote labels differs from the reference: 1 of 32768 values differ" in out
