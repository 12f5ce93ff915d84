"""The self-check of the default backend (docs/ops.md §0.7, fastst/ops/_selftest.py).

It applies to CUDA tensors only; here its device gate is widened to the CPU, where the chain is
cpp -> torch, and a kernel is made to fail (raise) or to mismatch (wrong labels) by replacing
the cpp implementation the op calls. On a GPU (skipped without one) every op's cuda and triton
backends pass the real check.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastst.ops as ops
from fastst.ops import _backend, _selftest, cbst, reference
from fastst.ops._selftest_cases import CASES, SMALL, op_names, reference_outputs
from helpers import probs

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def selftest(monkeypatch, tmp_path):
    """The self-check on, applied to CPU tensors, caching in a fresh directory, with no verdicts
    or warnings in memory (before and after)."""
    monkeypatch.setenv("FASTST_SELFTEST", "1")
    monkeypatch.setenv("FASTST_SELFTEST_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTST_BACKEND", raising=False)
    monkeypatch.setattr(_selftest, "_DEVICE_TYPES", frozenset({"cuda", "cpu"}))
    _selftest.clear_memory()
    yield tmp_path / "cache"
    _selftest.clear_memory()


def _inputs():
    p = probs(2, 5, 6, 7, seed=3)
    lam = torch.full((5,), 0.4)
    return p, lam


def _failing(calls):
    def cbst_label_cpp(p, lam):
        calls.append(1)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return cbst_label_cpp


def _mismatching(calls):
    original = cbst.cbst_label_cpp

    def cbst_label_cpp(p, lam):
        calls.append(1)
        labels, flags = original(p, lam)
        return torch.where(labels == 255, 0, 255).to(torch.uint8), flags
    return cbst_label_cpp


def _ours(caught):
    return [w for w in caught if issubclass(w.category, _selftest.SelfTestWarning)]


def _cache_entries(cache):
    return [json.loads(path.read_text()) for path in sorted(cache.glob("*.json"))]


@pytest.mark.parametrize("make,what", [(_failing, "illegal memory access"), (_mismatching, "MISMATCH labels")],
                         ids=["raises", "mismatches"])
def test_a_bad_kernel_moves_the_op_to_the_next_backend_with_one_warning(selftest, monkeypatch, make, what):
    calls = []
    monkeypatch.setattr(cbst, "cbst_label_cpp", make(calls))
    p, lam = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ops.cbst_pseudo_label(p, lam)
        second = ops.cbst_pseudo_label(p, lam)
        chosen = _backend.choose_backend("cbst_pseudo_label", CPU, cbst.LABEL_BACKENDS)
    want = reference.cbst_pseudo_label(p, lam)
    assert torch.equal(first, want) and torch.equal(second, want)
    assert chosen == "torch"
    assert len(calls) == 1, "the check ran the kernel once; later calls no longer use it"
    ours = _ours(caught)
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    for text in ("cbst_pseudo_label", "'cpp'", "'torch'", "python -m fastst.doctor", "FASTST_SELFTEST=0", what):
        assert text in message, (text, message)
    entries = _cache_entries(selftest)
    assert len(entries) == 1 and entries[0]["passed"] is False and what in entries[0]["reason"]
    assert entries[0]["op"] == "cbst_pseudo_label" and entries[0]["backend"] == "cpp"
    assert not list(selftest.glob("*.tmp")), "the cache is written through a renamed temporary file"


def test_a_passing_backend_stays_the_default_and_is_checked_once(selftest, monkeypatch):
    calls = []
    original = cbst.cbst_label_cpp
    monkeypatch.setattr(cbst, "cbst_label_cpp", lambda p, lam: calls.append(1) or original(p, lam))
    p, lam = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert torch.equal(ops.cbst_pseudo_label(p, lam), reference.cbst_pseudo_label(p, lam))
    assert len(calls) == 1 + 3  # the check's call, then the three calls
    entries = _cache_entries(selftest)
    assert [(e["op"], e["backend"], e["passed"]) for e in entries] == [("cbst_pseudo_label", "cpp", True)]


def test_a_cleared_memory_reads_the_disk_cache_and_does_not_rerun(selftest, monkeypatch):
    calls = []
    monkeypatch.setattr(cbst, "cbst_label_cpp", _failing(calls))
    p, lam = _inputs()
    with pytest.warns(_selftest.SelfTestWarning):
        ops.cbst_pseudo_label(p, lam)
    _selftest.clear_memory()  # as a new process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(ops.cbst_pseudo_label(p, lam), reference.cbst_pseudo_label(p, lam))
    assert len(calls) == 1, "the cached verdict was used, the check did not run again"
    assert len(_ours(caught)) == 1  # a new process is told once too


def test_a_second_process_reads_the_cache(selftest, monkeypatch):
    monkeypatch.setattr(cbst, "cbst_label_cpp", _failing([]))
    p, lam = _inputs()
    with pytest.warns(_selftest.SelfTestWarning):
        ops.cbst_pseudo_label(p, lam)
    script = (
        "import warnings, torch\n"
        "from fastst.ops import _backend, _selftest, cbst\n"
        "_selftest._DEVICE_TYPES = frozenset({'cuda', 'cpu'})\n"
        "def never(*args):\n"
        "    raise SystemExit('the check ran again')\n"
        "cbst.cbst_label_cpp = never\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    print(_backend.choose_backend('cbst_pseudo_label', torch.device('cpu'), cbst.LABEL_BACKENDS))\n"
        "print(sum(issubclass(w.category, _selftest.SelfTestWarning) for w in caught))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["torch", "1"]


def test_a_corrupt_cache_entry_counts_as_missing(selftest, monkeypatch):
    calls = []
    monkeypatch.setattr(cbst, "cbst_label_cpp", _failing(calls))
    path = _selftest.cache_path("cbst_pseudo_label", "cpp", CPU)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.warns(_selftest.SelfTestWarning):
        assert _backend.choose_backend("cbst_pseudo_label", CPU, cbst.LABEL_BACKENDS) == "torch"
    assert len(calls) == 1 and json.loads(path.read_text())["passed"] is False


def test_after_a_sticky_error_the_next_backend_is_not_judged_nor_cached(selftest, monkeypatch):
    """An illegal address in one backend's check poisons the CUDA context: a later backend's
    check would fail for that reason, so it is not run and nothing is cached for it."""
    ran = []
    monkeypatch.setattr(_selftest, "selftest_op", lambda *args: ran.append(args))
    monkeypatch.setattr(_selftest, "_context_error", lambda device: "RuntimeError: illegal memory access")
    reason = _selftest.verdict("tpld_vote", "cpp", CPU)
    assert "not checked, the CUDA context is unusable" in reason and "illegal memory access" in reason
    assert ran == [] and not selftest.exists()


def test_off_with_fastst_selftest_0(selftest, monkeypatch):
    calls = []
    monkeypatch.setattr(cbst, "cbst_label_cpp", _failing(calls))
    monkeypatch.setenv("FASTST_SELFTEST", "0")
    p, lam = _inputs()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        ops.cbst_pseudo_label(p, lam)
    assert len(calls) == 1 and not selftest.exists()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_an_explicit_backend_is_never_checked_nor_overridden(selftest, monkeypatch, how):
    calls = []
    monkeypatch.setattr(cbst, "cbst_label_cpp", _failing(calls))
    p, lam = _inputs()
    with pytest.warns(_selftest.SelfTestWarning):
        ops.cbst_pseudo_label(p, lam)  # the default: checked, failed, now torch
    if how == "environment":
        monkeypatch.setenv("FASTST_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        ops.cbst_pseudo_label(p, lam, backend="cpp" if how == "argument" else None)
    assert len(calls) == 2


def test_cpu_tensors_are_not_checked_by_default(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTST_SELFTEST", "1")
    monkeypatch.setenv("FASTST_SELFTEST_DIR", str(tmp_path))
    assert not _selftest.applies_to("cpu") and _selftest.applies_to("cuda")
    ran = []
    monkeypatch.setattr(_selftest, "verdict", lambda *args: ran.append(args))
    assert _backend.choose_backend("cbst_pseudo_label", CPU, cbst.LABEL_BACKENDS) == "cpp"
    assert ran == [] and not any(tmp_path.iterdir())


def test_nothing_is_checked_while_torch_compile_traces(selftest, monkeypatch):
    ran = []
    monkeypatch.setattr(_selftest, "verdict", lambda *args: ran.append(args) or "broken")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _selftest.default_choice("tpld_vote", CPU, ["cpp", "torch"]) == "cpp"
    assert ran == []


def test_the_chain_goes_cuda_triton_torch_with_one_warning_per_failed_backend(selftest, monkeypatch):
    broken = {"cuda": "MISMATCH labels", "triton": "RuntimeError: out of resources"}
    asked = []

    def verdict(op, backend, device):
        asked.append(backend)
        return broken.get(backend)

    monkeypatch.setattr(_selftest, "verdict", verdict)
    device = torch.device("cuda", 0)
    monkeypatch.setattr(_selftest, "_device_name", lambda device: "a GPU")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _selftest.default_choice("ias_pseudo_label", device, ["cuda", "triton", "torch"]) == "torch"
        assert _selftest.default_choice("ias_pseudo_label", device, ["cuda", "triton", "torch"]) == "torch"
    messages = [str(w.message) for w in _ours(caught)]
    assert len(messages) == 2 and asked == ["cuda", "triton"] * 2
    assert "'cuda' backend failed" in messages[0] and "uses 'triton'" in messages[0]
    assert "'triton' backend failed" in messages[1] and "uses 'torch'" in messages[1]
    del broken["cuda"]
    assert _selftest.default_choice("ias_pseudo_label", device, ["cuda", "triton", "torch"]) == "cuda"


def test_the_cache_key_names_the_device_backend_and_build(selftest, monkeypatch):
    key = _selftest.build_key("cpp", CPU)
    assert key["backend"] == "cpp" and key["torch"] == torch.__version__ and key["device"] == "cpu"
    first = _selftest.cache_path("tpld_vote", "cpp", CPU)
    assert first != _selftest.cache_path("tpld_vote", "torch", CPU)
    assert first != _selftest.cache_path("image_confidence", "cpp", CPU)
    monkeypatch.setattr(_selftest, "_file_stamp", lambda path: [1, 2])  # another build of fastst._C
    assert first != _selftest.cache_path("tpld_vote", "cpp", CPU)
    monkeypatch.setenv("FASTST_SELFTEST_DIR", "/somewhere/else")
    assert str(_selftest.cache_path("tpld_vote", "cpp", CPU)).startswith("/somewhere/else/")
    monkeypatch.delenv("FASTST_SELFTEST_DIR")
    assert _selftest.cache_dir() == Path.home() / ".cache" / "fastst" / "selftest"


def test_every_op_has_a_case():
    """Every public op, and every name an op passes to choose_backend, is checked."""
    import ast

    public = set(ops.__all__) - {"available_backends"}
    assert public == set(op_names())
    named = set()
    for path in (REPO / "fastst" / "ops").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "choose_backend" \
                    and isinstance(node.args[0], ast.Constant):
                named.add(node.args[0].value)
    assert named == set(op_names())
    for case in CASES:
        assert "torch" in case.backends and set(case.sync_free) <= set(case.backends)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: the cuda and triton backends run only there")
def test_every_cuda_and_triton_backend_passes_its_check_on_this_gpu():
    device = torch.device("cuda", 0)
    failures = {}
    for op in op_names():
        for backend in ("cuda", "triton"):
            if any(case.op == op and backend in case.backends for case in CASES) \
                    and backend in ops.available_backends():
                reason = _selftest.selftest_op(op, backend, device)
                if reason is not None:
                    failures[(op, backend)] = reason
    assert not failures, failures


def _case(label):
    return next(case for case in CASES if case.label == label)


def test_the_loss_comparison_holds_values_and_gradients_to_the_spec():
    """docs/ops.md §0.5: losses to relative 1e-5 (region_loss parts 2e-5), gradients to 1e-4 x
    the largest gradient element."""
    case = _case("bootstrap_loss (hard)")
    inputs, want = reference_outputs(case, SMALL, CPU)
    loss, grad = want
    scale = float(grad.abs().max())
    assert case.compare(inputs, want, want) is None
    assert case.compare(inputs, want, (loss * (1 + 5e-6), grad + 0.5e-4 * scale)) is None
    assert case.compare(inputs, want, (loss * (1 + 3e-5), grad)).startswith("loss: ")
    assert case.compare(inputs, want, (loss, grad + 2e-4 * scale)).startswith("grad: max abs error")
    region = _case("region_loss")
    inputs, want = reference_outputs(region, SMALL, CPU)
    kld_off = want[:2] + (want[2] * 1.01,) + want[3:]
    assert region.compare(inputs, want, kld_off).startswith("kld: ")


def test_the_ias_from_logits_comparison_allows_only_near_ties():
    case = _case("ias_pseudo_label (paper, logits)")
    inputs, want = reference_outputs(case, SMALL, CPU)
    labels, theta, seq = want
    assert case.compare(inputs, want, want) is None
    assert case.compare(inputs, want, (labels, theta + 5e-7, seq + 5e-7)) is None  # within 1e-6
    assert case.compare(inputs, want, (labels, theta + 5e-7, seq)) == "theta_out is not the last instance's theta"
    assert case.compare(inputs, want, (labels, (seq + 2e-6)[-1], seq + 2e-6)).startswith("theta_per_instance")
    flipped = labels.clone()
    flipped[0, 5, 5] = (int(labels[0, 5, 5]) + 1) % 19 if labels[0, 5, 5] != 255 else 0
    assert case.compare(inputs, want, (flipped, theta, seq)).endswith("(not at a near-tie)")
