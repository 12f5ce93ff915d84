"""ias_pseudo_label: every backend against the reference op, the released NumPy loop and (on a
GPU) a naive torch port, from full-resolution probabilities and from 1/8-resolution logits.

Shapes (issue 4): C = 19, 512x1024, B in {1, 2, 8}; FASTST_BENCH_QUICK=1: 128x256, B = 2.
From probabilities, each backend's bytes read per second is also given as a share of a measured
copy of the same tensor (issue 4's GPU target: >= 60 %).

Before an implementation is timed its labels (and, for the backends, thresholds) are checked
against the reference op's on the same input (``check_values``; bench/_value_checks.py, the
tolerances of tests/ops): a backend that computes something else fails the benchmark.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastst.ops as ops
from _value_checks import assert_ias_close
from conftest import QUICK
from fastst.ops import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, W = (128, 256) if QUICK else (512, 1024)
BATCHES = [2] if QUICK else [1, 2, 8]
C = 19
# On the CPU the Triton backend runs in its interpreter: not a speed to report.
BACKENDS = [b for b in ops.available_backends() if b != "torch" and not (b == "triton" and DEVICE == "cpu")]
IMPLS = BACKENDS + ["reference", "released_numpy"] + (["naive_torch"] if DEVICE == "cuda" else [])


def _released_numpy(probs, alpha=0.2, beta=0.9, gamma=8.0, group=2):
    """The released IAST pseudo-label loop (docs/ops.md §1.2) on NumPy arrays, per group of images,
    with its per-pixel threshold lookup."""
    cls_thresh = np.ones(C) * 0.9
    out = []
    for g0 in range(0, probs.shape[0], group):
        p = probs[g0:g0 + group]
        logits_pred, label_pred = p.max(axis=1), p.argmax(axis=1)
        conf = {c: [cls_thresh[c]] for c in range(C)}
        for cls in range(C):
            conf[cls].extend(logits_pred[label_pred == cls].astype(np.float16))
        tmp = np.ones(C, dtype=np.float32)
        for c in range(C):
            tmp[c] = np.percentile(np.array(conf[c]), 100 * (1 - alpha * cls_thresh[c] ** gamma))
        cls_thresh = beta * cls_thresh + (1 - beta) * tmp
        cls_thresh[cls_thresh >= 1] = 0.999
        labels = label_pred.copy()
        labels[logits_pred < cls_thresh[labels]] = 255
        out.append(labels.astype(np.uint8))
    return np.concatenate(out)


def _naive_torch(p, alpha=0.2, beta=0.9, gamma=8.0):
    """A straightforward GPU port: per image, per class a boolean mask and kthvalue."""
    theta = torch.full((C,), 0.9, dtype=torch.float64, device=p.device)
    labels = []
    for b in range(p.shape[0]):
        m, a = p[b].max(0)
        for c in range(C):
            values = m[a == c]
            if values.numel():
                k = int(alpha * float(theta[c]) ** gamma * values.numel())
                psi = values.kthvalue(max(values.numel() - k, 1)).values.double()
                theta[c] = beta * theta[c] + (1 - beta) * psi
        labels.append(torch.where(m.double() > theta[a], a, 255).to(torch.uint8))
    return torch.stack(labels)


def _inputs(B, source):
    g = torch.Generator().manual_seed(0)
    if source == "logits_x8":
        return (torch.randn(B, C, H // 8, W // 8, generator=g) * 3).to(DEVICE)
    return torch.softmax(torch.randn(B, C, H, W, generator=g) * 3, 1).to(DEVICE)


# The reference op's (labels, theta, theta per group), by (mode, source, B): the values every
# implementation is checked against.
_REFERENCE = {}


def check_values(impl, mode, source, x, kw, fn):
    """Assert that ``impl`` (its op for a backend, else ``fn``'s labels: the released loop, the
    naive port) gives the reference's values on ``x`` (``assert_ias_close``)."""
    if impl == "reference":
        return
    key = (mode, source, x.shape[0])
    if key not in _REFERENCE:
        _REFERENCE[key] = reference.ias_pseudo_label(x, None, **kw)
    got = ops.ias_pseudo_label(x, None, backend=impl, **kw) if impl in BACKENDS else (fn(),)
    got = tuple(torch.as_tensor(g) for g in got)
    assert_ias_close(impl, got, _REFERENCE[key], x, from_logits=kw["from_logits"], mode=mode,
                     size=kw["size"])


# The released code has only the official mode; the naive port follows the paper's rule.
CASES = [(impl, mode) for impl in IMPLS for mode in ("official", "paper")
         if not (impl == "released_numpy" and mode == "paper") and not (impl == "naive_torch" and mode == "official")]


# Median seconds of copying the (B, C, H, W) float32 probabilities, by B (test_copy_bandwidth).
_COPY_SECONDS = {}
BANDWIDTH = "IAS from probabilities: bytes read per second against a measured copy"


@pytest.mark.parametrize("B", BATCHES)
def test_copy_bandwidth(benchmark, run, B):
    """The yardstick of issue 4's bandwidth target: dst.copy_(probs) moves 2 x the bytes the op
    reads (read + write)."""
    x = _inputs(B, "probs")
    dst = torch.empty_like(x)
    run(benchmark, f"copy of the probabilities B={B} C={C} {H}x{W} {DEVICE}", "copy", lambda: dst.copy_(x),
        device=DEVICE)
    _COPY_SECONDS[B] = benchmark.stats.stats.median


def _note_bandwidth(note, impl, mode, B, seconds):
    """The op's probabilities read per second, as a share of the copy's bytes moved per second."""
    read = B * C * H * W * 4
    copy_rate = 2 * read / _COPY_SECONDS[B]
    note(BANDWIDTH, f"{mode:<8} B={B} {impl:<7} {read / seconds / 1e9:7.1f} GB/s = {read / seconds / copy_rate:6.1%} "
                    f"of copy ({copy_rate / 1e9:.1f} GB/s read + write)")


@pytest.mark.parametrize("source", ["probs", "logits_x8"])
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("impl,mode", CASES)
def test_ias(benchmark, run, note, impl, mode, B, source):
    x = _inputs(B, source)
    from_logits = source == "logits_x8"
    kw = dict(alpha=0.2, mode=mode, from_logits=from_logits, size=(H, W) if from_logits else None)
    group = f"ias_pseudo_label {mode} {source} B={B} C={C} {H}x{W} {DEVICE}"
    rounds = 2 if (impl == "released_numpy" and B == 8) else None

    def softmax_input():
        if not from_logits:
            return x
        return torch.softmax(F.interpolate(x, size=(H, W), mode="bilinear", align_corners=True), 1)

    if impl == "released_numpy":  # the released pipeline: torch softmax, then the NumPy loop
        fn = lambda: _released_numpy(softmax_input().cpu().numpy())  # noqa: E731
    elif impl == "naive_torch":
        fn = lambda: _naive_torch(softmax_input())  # noqa: E731
    elif impl == "reference":
        fn = lambda: reference.ias_pseudo_label(x, None, **kw)[0]  # noqa: E731
    else:
        fn = lambda: ops.ias_pseudo_label(x, None, backend=impl, **kw)[0]  # noqa: E731
    check_values(impl, mode, source, x, kw, fn)
    labels = run(benchmark, group, impl, fn, device=DEVICE, rounds=rounds)
    assert tuple(labels.shape) == (B, H, W)
    if source == "probs" and impl in BACKENDS and B in _COPY_SECONDS:
        _note_bandwidth(note, impl, mode, B, benchmark.stats.stats.median)
