"""TPLD / CBST operators: every backend against the reference op and a direct torch
implementation of the vote (per-class box filters with conv2d), and the streamed thresholds.

Shapes (issue 8): tpld_vote C = 19, 512x1024, B in {1, 4}; thresholds over 100 batches of
256x512 images; the fused bootstrapping (hard and soft targets) and MRKLD losses (forward +
backward) from 1/8-resolution logits (cpp on the CPU, triton on CUDA, against the reference);
the easy-crop loss with its soft targets made inside the fused loss from a teacher's logits
(teacher_logits=) against the materialised path, time and peak memory.
FASTST_BENCH_QUICK=1: 128x256, B = 1, 10 batches.

Before an implementation is timed its output is checked against the reference on the same input
(bench/_value_checks.py, the tolerances of tests/ops): labels, thresholds and confidences equal
to the reference op's, losses and gradients within the fused-loss tolerance of the torch path's,
the compiled self-information within float rounding of the eager one, the in-pass phase-2 loss
within the fused-loss tolerance of the materialised one.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastst.ops as ops
from _value_checks import assert_equal, assert_loss_close
from conftest import QUICK
from fastst.ops import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
C = 19
H, W = (128, 256) if QUICK else (512, 1024)
BATCHES = [1] if QUICK else [1, 4]
# On the CPU the Triton backend runs in its interpreter: not a speed to report.
VOTE_IMPLS = [b for b in ops.available_backends() if b in ("cuda", "triton", "cpp")
              and not (b == "triton" and DEVICE == "cpu")] + ["reference", "torch_boxfilter"]


def _inputs(B, h=H, w=W):
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(B, C, h, w, generator=g) * 3, 1).to(DEVICE)
    lam = (torch.rand(C, generator=g) * 0.4 + 0.5).to(DEVICE)
    return p, lam


def torch_boxfilter_vote(p, lam, window=7, weight=0.7, iterations=3):
    """A direct torch implementation: per-class box sums of q and of counts over the labelled
    map (depthwise conv2d with a window x window kernel of ones, float64), then the top-2 rule."""
    q = p.float() / lam.float().view(1, -1, 1, 1)
    best, k1 = q.max(1)
    labels = torch.where(best >= 1, k1, torch.full_like(k1, 255))
    k2 = q.scatter(1, k1.unsqueeze(1), -1.0).argmax(1)
    ones = torch.ones(C, 1, window, window, dtype=torch.float64, device=p.device)
    q64 = q.double()
    for _ in range(iterations):
        onehot = F.one_hot(torch.where(labels == 255, C, labels), C + 1)[..., :C].permute(0, 3, 1, 2).double()
        sums = F.conv2d(onehot * q64, ones, padding=window // 2, groups=C)
        counts = F.conv2d(onehot, ones, padding=window // 2, groups=C)
        pool = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
        s = weight * q64 + (1 - weight) * pool
        s1, s2 = s.gather(1, k1.unsqueeze(1)).squeeze(1), s.gather(1, k2.unsqueeze(1)).squeeze(1)
        choice = torch.where(s1 >= s2, k1, k2)
        labels = torch.where((labels == 255) & (torch.maximum(s1, s2) > 1.0), choice, labels)
    return labels.to(torch.uint8)


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("impl", VOTE_IMPLS)
def test_tpld_vote(benchmark, run, impl, B):
    p, lam = _inputs(B)
    group = f"tpld_vote window 7, 3 iterations, B={B} C={C} {H}x{W} {DEVICE}"
    if impl == "reference":
        fn = lambda: reference.tpld_vote(p, lam)  # noqa: E731
    elif impl == "torch_boxfilter":
        fn = lambda: torch_boxfilter_vote(p, lam)  # noqa: E731
    else:
        fn = lambda: ops.tpld_vote(p, lam, backend=impl)  # noqa: E731
    if impl != "reference":
        assert_equal(impl, fn(), reference.tpld_vote(p, lam), "tpld_vote labels")
    labels = run(benchmark, group, impl, fn, device=DEVICE, rounds=2 if impl != VOTE_IMPLS[0] else None)
    assert tuple(labels.shape) == (B, H, W)


def _reference_thresholds(p, n, *, subsample, portion):
    """The reference ops' thresholds over ``n`` copies of the batch ``p``: the kept pixels'
    (max probability, argmax) (``reference.cbst_keep_mask``), then
    ``reference.class_balanced_thresholds``."""
    m, a = p.max(1)
    keep = reference.cbst_keep_mask(a.flatten(1), C, subsample)
    values, classes = m.flatten(1)[keep], a.flatten(1)[keep]
    return reference.class_balanced_thresholds(values.repeat(n), classes.repeat(n), C, portion)


@pytest.mark.parametrize("impl", ["cpp", "cpp_histogram", "torch"] if DEVICE == "cpu" else ["torch", "torch_histogram"])
def test_thresholds_stream(benchmark, run, impl):
    n = 10 if QUICK else 100
    h, w = (64, 128) if QUICK else (256, 512)
    p, _ = _inputs(1, h, w)
    backend, _, store = impl.partition("_")

    def stream():
        acc = ops.ClassBalancedThresholds(C, 4, backend=backend, store=store or "values")
        for _ in range(n):
            acc.update(p)
        if acc.needs_refinement:  # the bounded-memory store reads every batch twice
            acc.begin_refinement(0.2)
            for _ in range(n):
                acc.update(p)
        return acc.thresholds(0.2)

    group = f"ClassBalancedThresholds subsample 4, {n} batches of 1x{C}x{h}x{w} + thresholds {DEVICE}"
    assert_equal(impl, stream(), _reference_thresholds(p, n, subsample=4, portion=0.2),
                 "class-balanced thresholds")
    lam = run(benchmark, group, impl, stream, device=DEVICE, rounds=1 if not QUICK else 2)
    assert lam.shape == (C,)


@pytest.mark.parametrize("impl", ["cpp", "torch"] if DEVICE == "cpu" else ["triton", "torch"])
def test_image_confidence(benchmark, run, impl):
    p, lam = _inputs(1)
    group = f"image_confidence B=1 C={C} {H}x{W} {DEVICE}"
    assert_equal(impl, ops.image_confidence(p, lam, backend=impl), reference.image_confidence(p, lam),
                 "image_confidence")
    conf = run(benchmark, group, impl, lambda: ops.image_confidence(p, lam, backend=impl), device=DEVICE)
    assert conf.shape == (1,)


# The fused losses: cpp on the CPU; triton on CUDA only (its interpreter is not a speed to report).
LOSS_IMPLS = (["cpp", "torch"] if DEVICE == "cpu"
              else [b for b in ("triton",) if b in ops.available_backends()] + ["torch"])


@pytest.mark.parametrize("mode", ["hard", "soft", "mrkld"])
@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_bootstrap_loss_forward_backward(benchmark, run, impl, mode):
    B = 2
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, C, H // 8, W // 8, generator=g) * 3).to(DEVICE)
    target = torch.randint(0, C, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < 0.3] = 255
    target = target.to(DEVICE)
    lam = (torch.rand(C, generator=g) * 0.4 + 0.5).to(DEVICE)
    soft = None
    if mode == "soft":
        teacher = torch.softmax(torch.randn(B, C, H, W, generator=g) * 2, 1).to(DEVICE)
        soft = ops.tpld_soft_targets(teacher, lam)
    is_target = torch.tensor([True, False], device=DEVICE)

    def step(backend=impl, with_loss=False):
        x = logits.clone().requires_grad_(True)
        if mode == "mrkld":
            loss = ops.mrkld_loss(x, target, is_target, backend=backend)
        else:
            loss = ops.bootstrap_loss(x, target, lam, soft_target=soft, backend=backend)
        loss.backward()
        return (loss, x.grad) if with_loss else x.grad

    if impl != "torch":  # the torch backend is the reference formulation
        assert_loss_close(impl, step(with_loss=True), step("torch", with_loss=True))

    name = "mrkld_loss fwd+bwd" if mode == "mrkld" else f"bootstrap_loss fwd+bwd {mode}"
    group = f"{name}, logits {B}x{C}x{H // 8}x{W // 8} -> {H}x{W} {DEVICE}"
    grad = run(benchmark, group, impl, step, device=DEVICE)
    assert grad.shape == logits.shape


_SELF_INFORMATION_COMPILED = {}


def _self_information_fn(impl):
    """eager: the op (a torch expression); compile: torch.compile of it (does it fuse?)."""
    if impl == "eager":
        return ops.self_information
    if impl not in _SELF_INFORMATION_COMPILED:
        _SELF_INFORMATION_COMPILED[impl] = torch.compile(lambda p: ops.self_information(p), dynamic=False)
    return _SELF_INFORMATION_COMPILED[impl]


@pytest.mark.parametrize("impl", ["eager"] if QUICK else ["eager", "compile"])
def test_self_information(benchmark, run, impl):
    p, _ = _inputs(2)
    fn = _self_information_fn(impl)
    if impl != "eager":  # the compiled op against the eager one (float rounding may differ)
        got, want = fn(p), ops.self_information(p)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), f"{impl}: self_information " \
            f"differs from eager by {float((got - want).abs().max()):.3g}"
    out = run(benchmark, f"self_information B=2 C={C} {H}x{W}", impl, lambda: fn(p), device=DEVICE)
    assert out.shape == p.shape and torch.isfinite(out).all()


PHASE2_B = 2


def _phase2_inputs(B=PHASE2_B, h=H // 8, w=W // 8):
    """(student logits, teacher logits) (B, C, h, w) float32 and lambdas (C,) on DEVICE."""
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(B, C, h, w, generator=g) * 3).to(DEVICE)
    teacher = (torch.randn(B, C, h, w, generator=g) * 3).to(DEVICE)
    lam = (torch.rand(C, generator=g) * 0.4 + 0.5).to(DEVICE)
    return logits, teacher, lam


def _phase2_step(impl, logits, teacher, lam, size=(H, W), with_loss=False):
    """One easy-crop loss, forward + backward; returns d loss / d logits. `in_pass` makes the soft
    targets inside the fused loss (teacher_logits=); `materialised` builds them at full size:
    the teacher's probabilities at full size (F.interpolate + softmax), the confident map and
    tpld_soft_targets as (B, C, H, W) tensors, then the same fused loss with soft_target=."""
    backend = LOSS_IMPLS[0]
    x = logits.clone().requires_grad_(True)
    if impl == "in_pass":
        loss = ops.bootstrap_loss(x, None, lam, teacher_logits=teacher, size=size, backend=backend)
    else:
        probs = torch.softmax(F.interpolate(teacher, size=size, mode="bilinear", align_corners=True), 1)
        loss = ops.bootstrap_loss(x, ops.cbst_pseudo_label(probs, lam), lam,
                                  soft_target=ops.tpld_soft_targets(probs, lam), backend=backend)
    loss.backward()
    return (loss, x.grad) if with_loss else x.grad


def _phase2_group():
    return (f"phase-2 easy loss fwd+bwd ({LOSS_IMPLS[0]}), teacher {PHASE2_B}x{C}x{H // 8}x{W // 8} -> "
            f"{H}x{W} {DEVICE}")


@pytest.mark.parametrize("impl", ["in_pass", "materialised"])
def test_phase2_easy_loss_from_teacher(benchmark, run, impl):
    """TPLD phase 2's easy-crop loss from the teacher's 1/8-resolution logits, forward + backward
    (`_phase2_step`); cpp on the CPU, triton on CUDA."""
    logits, teacher, lam = _phase2_inputs()
    if impl == "in_pass":  # against the materialised targets (tests/ops/test_bootstrap_loss_teacher.py)
        assert_loss_close(impl, _phase2_step(impl, logits, teacher, lam, with_loss=True),
                          _phase2_step("materialised", logits, teacher, lam, with_loss=True))
    grad = run(benchmark, _phase2_group(), impl, lambda: _phase2_step(impl, logits, teacher, lam), device=DEVICE)
    assert grad.shape == logits.shape


# Run in a fresh process (argv: impl): the growth of the peak resident set across one step, after
# a warm-up on a tiny input, so the number is what the step itself holds at its peak.
_PHASE2_PEAK_SCRIPT = """
import sys
sys.path.insert(0, {bench!r})
from _peak_memory import peak_rss_bytes
from test_tpld import _phase2_inputs, _phase2_step
impl = sys.argv[1]
_phase2_step(impl, *_phase2_inputs(1, 2, 4), size=(16, 32))
inputs = _phase2_inputs()
before = peak_rss_bytes()
_phase2_step(impl, *inputs)
print(max(0, peak_rss_bytes() - before))
"""


def test_phase2_easy_loss_peak_memory(note):
    """Peak extra memory of one phase-2 easy-crop step: host VmHWM growth in a fresh process on
    the CPU, torch.cuda.max_memory_allocated above the inputs on CUDA."""
    peaks = {}
    for impl in ("in_pass", "materialised"):
        if DEVICE == "cuda":
            inputs = _phase2_inputs()
            _phase2_step(impl, *inputs)  # warm-up: kernels compiled, caching allocator filled
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _phase2_step(impl, *inputs)
            torch.cuda.synchronize()
            peaks[impl] = torch.cuda.max_memory_allocated() - base
        else:
            script = _PHASE2_PEAK_SCRIPT.format(bench=os.path.dirname(os.path.abspath(__file__)))
            out = subprocess.run([sys.executable, "-c", script, impl], check=True, capture_output=True, text=True)
            peaks[impl] = int(out.stdout.strip().splitlines()[-1])
    full = PHASE2_B * C * H * W * 4  # one (B, C, H, W) float32 tensor
    note("phase-2 easy loss peak extra memory (fwd+bwd)",
         f"{_phase2_group()}: in_pass {peaks['in_pass'] / 2**20:8.1f} MiB, materialised "
         f"{peaks['materialised'] / 2**20:8.1f} MiB; one (B,C,H,W) fp32 tensor = {full / 2**20:.0f} MiB")
    assert peaks["materialised"] > full  # the full-size teacher probabilities at least
    assert peaks["in_pass"] < full  # nothing of that size in the in-pass path
