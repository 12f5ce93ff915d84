"""ias_pseudo_label: every available backend against reference.py, and bad input."""
import pytest
import torch
import torch.nn.functional as F

import fastst.ops as ops
from fastst.ops import reference
from helpers import gen, mismatch, probs
from test_ias_reference import CASES

FAST = [b for b in ops.available_backends() if b != "torch"]
GPU = torch.cuda.is_available()


def _device(backend):
    return "cuda" if backend in ("cuda", "triton") and GPU else "cpu"


def test_available_backends_on_this_machine():
    names = ops.available_backends()
    assert names[-1] == "torch"
    assert "cpp" in names, "fastst._C is not built: run `pip install -e .`"


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("name,p", CASES, ids=[c[0] for c in CASES])
def test_backend_equals_reference_from_probabilities(backend, mode, name, p):
    _assert_equals_reference(p.to(_device(backend)), mode, backend)


def _assert_equals_reference(p, mode, backend):
    want = reference.ias_pseudo_label(p, None, alpha=0.2, mode=mode)
    got = ops.ias_pseudo_label(p, None, alpha=0.2, mode=mode, backend=backend)
    for w, g in zip(want, got):
        assert torch.equal(w, g), mismatch(w, g)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backend_equals_reference_large_image(backend, mode, dtype):
    if backend == "triton" and not GPU:
        pytest.skip("no GPU: the Triton interpreter is too slow for 512x1024 (runs where a GPU is)")
    _assert_equals_reference(probs(2, 19, 512, 1024, seed=21, dtype=dtype).to(_device(backend)), mode, backend)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("size", [None, (41, 57)])
def test_backend_from_logits_within_spec_tolerance(backend, mode, size):
    """docs/ops.md §0: labels may differ only where the top-2 probabilities are within 1e-6 or
    |m - theta[a]| < 1e-6; thresholds agree to 1e-6."""
    logits = (torch.randn(4, 19, 11, 15, generator=gen(22)) * 3).to(_device(backend))
    kw = dict(alpha=0.2, mode=mode, from_logits=True, size=size, align_corners=False)
    want_labels, want_theta, want_seq = reference.ias_pseudo_label(logits, None, **kw)
    labels, theta, seq = ops.ias_pseudo_label(logits, None, backend=backend, **kw)
    assert torch.allclose(seq, want_seq, rtol=0, atol=1e-6), mismatch(want_seq, seq)
    up = logits if size is None else F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    p = torch.softmax(up.double(), 1)
    top2 = p.topk(2, dim=1).values
    m, a = p.max(1)
    group = 2 if mode == "official" else 1
    theta_img = want_seq.repeat_interleave(group, 0)[: logits.shape[0]]
    near_theta = (m - theta_img.gather(1, a.flatten(1)).view_as(m)).abs() < 1e-6
    allowed = ((top2[:, 0] - top2[:, 1]) < 1e-6) | near_theta
    assert not bool(((labels != want_labels) & ~allowed).any()), mismatch(want_labels, labels)


@pytest.mark.parametrize("backend", ["torch"] + FAST)
def test_default_group_and_theta(backend):
    p = probs(5, 19, 6, 6, seed=23).to(_device(backend))
    labels, theta, seq = ops.ias_pseudo_label(p, None, alpha=0.2, mode="official", backend=backend)
    assert seq.shape == (3, 19) and torch.equal(seq[-1], theta)
    explicit = ops.ias_pseudo_label(p, torch.full((19,), 0.9, dtype=torch.float64, device=p.device),
                                    alpha=0.2, mode="official", group=2, backend=backend)
    assert torch.equal(explicit[0], labels) and torch.equal(explicit[1], theta)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["torch"] + FAST)
@pytest.mark.parametrize("call,match", [
    (lambda b: ops.ias_pseudo_label(probs(2, 19, 4, 4)[0], None, alpha=0.2, backend=b), r"x must have shape \(B, C, H, W\)"),
    (lambda b: ops.ias_pseudo_label(probs(2, 19, 4, 4), torch.full((18,), 0.9, dtype=torch.float64), alpha=0.2, backend=b), r"theta must have shape \(19,\)"),
    (lambda b: ops.ias_pseudo_label(probs(2, 1, 4, 4), None, alpha=0.2, backend=b), r"x must have 2 <= C <= 254"),
    (lambda b: ops.ias_pseudo_label(probs(0, 19, 4, 4), None, alpha=0.2, backend=b), r"x: empty batch"),
    (lambda b: ops.ias_pseudo_label(probs(2, 19, 4, 4), None, alpha=0.0, backend=b), r"alpha must be finite and in \(0.0, 1.0\]"),
    (lambda b: ops.ias_pseudo_label(probs(2, 19, 4, 4), None, alpha=1.5, backend=b), r"alpha must be"),
    (lambda b: ops.ias_pseudo_label(probs(2, 19, 4, 4), None, alpha=float("nan"), backend=b), r"alpha must be"),
    (lambda b: ops.ias_pseudo_label(probs(2, 19, 4, 4), None, alpha=0.2, beta=1.1, backend=b), r"beta must be"),
    (lambda b: ops.ias_pseudo_label(probs(2, 19, 4, 4), None, alpha=0.2, gamma=-1, backend=b), r"gamma must be"),
    (lambda b: ops.ias_pseudo_label(probs(2, 19, 4, 4), None, alpha=0.2, mode="fast", backend=b), r"mode must be one of"),
    (lambda b: ops.ias_pseudo_label(probs(2, 19, 4, 4), None, alpha=0.2, group=2, backend=b), r"group must be None or 1"),
    (lambda b: ops.ias_pseudo_label(probs(2, 19, 4, 4), None, alpha=0.2, size=(8, 8), backend=b), r"from_logits=False"),
    (lambda b: ops.ias_pseudo_label(probs(2, 19, 4, 4) * 2, None, alpha=0.2, backend=b), r"x has values outside \[0, 1\]"),
    (lambda b: ops.ias_pseudo_label(probs(2, 19, 4, 4).double(), None, alpha=0.2, backend=b), r"x must have dtype"),
    (lambda b: ops.ias_pseudo_label(probs(2, 19, 4, 4), None, alpha=0.2, backend="fastest"), r"unknown backend="),
])
def test_bad_input_names_the_argument(backend, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(backend)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # interpreter, NaN
@pytest.mark.parametrize("backend", ["torch"] + FAST)
@pytest.mark.parametrize("from_logits", [False, True])
def test_nan_input_raises_unless_checks_are_off(backend, from_logits, monkeypatch):
    x = probs(2, 19, 4, 4)
    x[1, 3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        ops.ias_pseudo_label(x, None, alpha=0.2, from_logits=from_logits, backend=backend)
    monkeypatch.setenv("FASTST_CHECK", "0")
    labels, _, _ = ops.ias_pseudo_label(x, None, alpha=0.2, from_logits=from_logits, backend=backend)
    assert labels.shape == (2, 4, 4)


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("FASTST_BACKEND", "triton")
    if "triton" not in ops.available_backends():
        with pytest.raises(ValueError, match="FASTST_BACKEND='triton'"):
            ops.ias_pseudo_label(probs(1, 3, 2, 2), None, alpha=0.2)
    monkeypatch.setenv("FASTST_BACKEND", "torch")
    assert ops.ias_pseudo_label(probs(1, 3, 2, 2), None, alpha=0.2)[0].shape == (1, 2, 2)


@pytest.mark.parametrize("backend", [b for b in FAST if b != "cpp"])
@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("size", [None, (23, 31)])
def test_gpu_backends_equal_cpp_bit_for_bit_from_logits(backend, mode, size):
    """The statistics pass shares its arithmetic (kernels/stats.h: no FMA, one exp) across
    backends, so from logits too every backend equals cpp exactly."""
    if "cpp" not in FAST:
        pytest.skip("fastst._C is not built")
    logits = torch.randn(4, 19, 9, 13, generator=gen(24)) * 3
    kw = dict(alpha=0.2, mode=mode, from_logits=True, size=size, align_corners=True)
    want = ops.ias_pseudo_label(logits, None, backend="cpp", **kw)
    got = ops.ias_pseudo_label(logits.to(_device(backend)), None, backend=backend, **kw)
    for w, g in zip(want, got):
        assert torch.equal(w, g.cpu()), mismatch(w, g)


def _float16_midpoints():
    """float32 values exactly halfway between two float16 neighbours (ties to even both ways),
    normal and subnormal, plus values just off the midpoint."""
    values = []
    for lower in (0.5, 0.5 + 2 ** -11, 0.75, 0.999, 2 ** -14 * 3, 2 ** -20, 2 ** -24, 5 * 2 ** -24):
        low = torch.tensor(lower, dtype=torch.float16)
        high = torch.nextafter(low, torch.tensor(1.0, dtype=torch.float16))
        mid = (low.double() + high.double()) / 2
        for v in (mid, mid * (1 + 2 ** -20), mid * (1 - 2 ** -20)):
            values.append(float(torch.tensor(float(v), dtype=torch.float32)))
    return values


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("value", _float16_midpoints())
def test_official_float16_rounding_of_m(backend, value):
    """With beta = 0 the threshold is float32(percentile) of float16(m) values: any error in
    the kernels' float16 rounding (ties to even, subnormals) shows in theta."""
    x = torch.zeros(2, 3, 4, 5)
    x[:, 0] = value
    x[1, 0, 0, 0] = 0.0  # one pixel of another class
    x[1, 1, 0, 0] = value / 2
    x = x.to(_device(backend))
    want = reference.ias_pseudo_label(x, None, alpha=0.5, beta=0.0, mode="official")
    got = ops.ias_pseudo_label(x, None, alpha=0.5, beta=0.0, mode="official", backend=backend)
    assert want[1][0].item() == float(torch.tensor(value).half().float())
    for w, g in zip(want, got):
        assert torch.equal(w, g.cpu()), mismatch(w, g)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.5, 8.0, 1e3, 1e30])
@pytest.mark.parametrize("mode", ["paper", "official"])
def test_gamma_values_match_reference(backend, gamma, mode):
    """Integer gammas use the shared double-double powering, others (and huge ones) pow."""
    p = probs(4, 7, 9, 9, seed=41).to(_device(backend))
    theta = torch.linspace(0.5, 0.99, 7, dtype=torch.float64, device=p.device)
    want = reference.ias_pseudo_label(p, theta, alpha=0.5, gamma=gamma, mode=mode)
    got = ops.ias_pseudo_label(p, theta, alpha=0.5, gamma=gamma, mode=mode, backend=backend)
    for w, g in zip(want, got):
        assert torch.equal(w, g.cpu()), mismatch(w, g)


@pytest.mark.parametrize("backend", ops.available_backends())
def test_official_instance_too_large_for_int32_counts_is_refused(backend):
    """An official-mode instance of group x H x W >= 2^31 pixels would overflow the int32
    histogram counts of the fused selection: refused by name before any pass (issue 23)."""
    logits = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"2 x 1073741824 >= 2\^31 .*smaller group"):
        ops.ias_pseudo_label(logits, None, alpha=0.2, mode="official", from_logits=True,
                             size=(32768, 32768), backend=backend)
