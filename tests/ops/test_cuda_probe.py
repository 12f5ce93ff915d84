"""The driver probe of fastst._C and the cuda backend's fallback (fastst/ops/_cuda_probe.py,
docs/design.md §1.3): a driver too old for the runtime fastst._C was built with, or a failing probe,
turns `cuda` off with one warning; the default choice falls back to triton (or torch) and an
explicit backend="cuda" raises with the same text. Old drivers are simulated on the CPU."""
import re
import types
import warnings
from pathlib import Path

import pytest
import torch

from fastst.ops import _backend, _cuda_probe
from fastst.ops._cuda_probe import Probe, unusable_reason

EXT = _backend.extension()
ROOT = Path(__file__).resolve().parents[2]
ALL = ("cuda", "triton", "cpp", "torch")
OLD_DRIVER = Probe(False, 12020, 13000, 0,
                   "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version")


@pytest.mark.skipif(EXT is None, reason="fastst._C is not built")
def test_probe_returns_a_sane_tuple_without_raising():
    result = EXT._cuda_probe()
    assert isinstance(result, tuple) and len(result) == 5
    ok, driver, runtime, count, error = result
    assert isinstance(ok, bool) and isinstance(error, str)
    assert all(isinstance(v, int) and v >= 0 for v in (driver, runtime, count))
    assert ok == (error == "") and (count > 0 or not ok)
    if EXT.has_cuda:
        assert runtime == EXT.cuda_runtime_version >= 11000
    else:
        assert (ok, runtime, EXT.cuda_runtime_version, EXT.cuda_archs) == (False, 0, 0, [])
    if not torch.cuda.is_available():
        assert not ok and error  # here: no driver or no device, reported, not raised


@pytest.mark.skipif(EXT is None or not EXT.has_cuda, reason="fastst._C built without CUDA (no nvcc)")
def test_build_facts():
    assert EXT.cuda_archs and all(re.fullmatch(r"\d+[a-z]?(-real|-virtual)?|all|all-major|native", a)
                                  for a in EXT.cuda_archs), EXT.cuda_archs


def test_default_architectures_ship_ptx_for_newer_gpus():
    """Machine code for sm_80 and sm_90 and PTX the driver compiles on Blackwell (README "CUDA
    build"); FASTST_CUDA_ARCHS overrides."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    default = re.findall(r'set\(CMAKE_CUDA_ARCHITECTURES "(\d[^"]+)"\)', cmake)[0].split(";")
    assert {"80-real", "90-real"} <= set(default) or {"80", "90"} <= set(default)
    assert any(a.endswith("-virtual") or a.isdigit() for a in default), default
    assert "FASTST_CUDA_ARCHS" in cmake


def test_reason_names_driver_runtime_and_fix():
    reason = unusable_reason(OLD_DRIVER, "12.6", "535.183.01")
    for part in ("535.183.01", "CUDA up to 12.2", "CUDA 13.0 runtime", "CUDA 13.x (>= 580",
                 "update the NVIDIA driver", "`CUDA_HOME=/usr/local/cuda-12.6 pip install -e .`"):
        assert part in reason, part
    # The same driver passes the probe of a build with torch's toolkit (same major version).
    assert unusable_reason(Probe(True, 12020, 12060, 1, ""), "12.6") is None
    assert unusable_reason(Probe(True, 13000, 13000, 2, ""), "13.0") is None
    # A new enough driver whose probe still fails: the CUDA error is named.
    failed = unusable_reason(Probe(False, 13000, 13000, 0, "cudaErrorNoDevice: no CUDA-capable device"),
                             "13.0")
    assert "cudaErrorNoDevice: no CUDA-capable device" in failed and "update the NVIDIA driver" in failed
    # A probe that succeeded on an older major driver (should not happen) is still refused.
    assert "needs a driver for CUDA 13.x" in unusable_reason(Probe(True, 12080, 13000, 1, ""), "12.8")


def _fake_cuda_machine(monkeypatch, probe):
    """torch sees a GPU; fastst._C is a CUDA build whose probe returns `probe`; nothing probed yet."""
    calls = []

    def fake_probe():
        calls.append(1)
        return tuple(probe)

    fake = types.SimpleNamespace(has_cuda=True, cuda_runtime_version=probe.runtime_version, _cuda_probe=fake_probe)
    monkeypatch.setattr(_backend, "_EXTENSION", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_backend, "_TRITON_IMPORTABLE", True)
    monkeypatch.setattr(_cuda_probe, "_reason", _cuda_probe._UNSET)
    monkeypatch.setattr(_cuda_probe, "_driver_release", lambda: "535.183.01")
    monkeypatch.delenv("FASTST_BACKEND", raising=False)
    return calls


def _choose(op, implemented, requested=None):
    return _backend.choose_backend(op, torch.device("cuda"), implemented, requested)


@pytest.mark.parametrize("probe", [OLD_DRIVER, Probe(False, 13000, 13000, 0, "cudaErrorUnknown: unknown error")],
                         ids=["old_driver", "probe_error"])
def test_unusable_cuda_falls_back_with_one_warning(monkeypatch, probe):
    calls = _fake_cuda_machine(monkeypatch, probe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _choose("ias_pseudo_label", ALL) == "triton"
        assert _choose("ClassBalancedThresholds", ("cpp", "torch")) == "torch"
        assert _choose("tpld_vote", ("triton", "cpp", "torch")) == "triton"
        assert "cuda" not in _backend.available_backends()
        with pytest.raises(ValueError) as error:
            _choose("ias_pseudo_label", ALL, "cuda")
    ours = [w for w in caught if "cuda backend is off" in str(w.message)]
    assert len(ours) == 1 and len(calls) == 1, (len(ours), len(calls))
    reason = unusable_reason(probe, torch.version.cuda, "535.183.01")
    assert reason in str(ours[0].message)
    assert f"ias_pseudo_label: backend='cuda' is not available here: {reason}" in str(error.value)
    assert "pip install -e ." in str(error.value)


def test_usable_cuda_is_chosen_without_warning(monkeypatch):
    calls = _fake_cuda_machine(monkeypatch, Probe(True, 12040, 12060, 1, ""))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _choose("ias_pseudo_label", ALL) == "cuda"
        assert _choose("ias_pseudo_label", ALL, "cuda") == "cuda"
    assert calls == [1]  # probed once, cached


@pytest.mark.skipif(EXT is None or not EXT.has_cuda or torch.cuda.is_available(),
                    reason="needs the CUDA build on a machine without a usable GPU driver")
def test_the_real_probe_here_turns_cuda_off(monkeypatch):
    """This machine's real probe (no driver) behind a torch that claims a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_cuda_probe, "_reason", _cuda_probe._UNSET)
    monkeypatch.delenv("FASTST_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match=r"cuda backend is off.*CUDA 1\d\.\d runtime"):
        assert not _backend._backend_usable("cuda")
    assert _choose("ias_pseudo_label", ("cuda", "torch")) == "torch"


def test_probe_traces_under_torch_compile(monkeypatch):
    """Ops choose their backend inside torch.compile(fullgraph=True) regions: the first probe may
    happen while tracing and must not break the graph."""
    calls = []
    monkeypatch.setattr(_cuda_probe, "_reason", _cuda_probe._UNSET)
    ext = types.SimpleNamespace(_cuda_probe=lambda: calls.append(1) or tuple(OLD_DRIVER))

    def f(x):
        return x + (1.0 if _cuda_probe.cuda_unusable_reason(ext) is None else 2.0)

    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="cuda backend is off"):
        out = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2))
    assert out.tolist() == [2.0, 2.0] and calls == [1]
