"""CBST / CRST (docs/ops.md §5): ClassBalancedThresholds against the released code's Python-list sort
(every subsample, portions 0.2 / 0.5 / edge values, empty classes, several batches), the
backends against each other, cbst_pseudo_label against a loop, mrkld_loss against its formula
and between backends (cpp; triton, in its interpreter without a GPU: with and without the fused
upsample, both align_corners, bf16, C = 2), bad input, opcheck, torch.compile."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastst.ops as ops
from fastst.ops import _backend, reference
from fastst.ops.ext.bootstrap_loss import st_loss_cpp
from fastst.ops.ext.cbst import cbst_collect_cpp, cbst_label_cpp, cbst_thresholds_cpp
from helpers import gen, mismatch, probs

import _tpld_transcriptions as loops

BACKENDS = ["torch", "cpp"]
CUDA = torch.cuda.is_available()
TRITON = "triton" in _backend.available_backends()
MRKLD_BACKENDS = BACKENDS + (["triton"] if TRITON else [])
FUSED_MRKLD = [b for b in MRKLD_BACKENDS if b != "torch"]


def _batches(C, seed, n=3, shape=(2, 9, 11), absent=()):
    out = []
    for i in range(n):
        logits = torch.randn(shape[0], C, *shape[1:], generator=gen(seed + i)) * 2.5
        for k in absent:
            logits[:, k] -= 30.0
        out.append(torch.softmax(logits, 1))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("subsample", [1, 2, 4])
@pytest.mark.parametrize("C", [2, 19])
def test_thresholds_equal_released_sort(backend, subsample, C):
    batches = _batches(C, seed=C * 10 + subsample, absent=(C - 1,) if C > 2 else ())
    acc = ops.ClassBalancedThresholds(C, subsample, backend=backend)
    for b in batches:
        acc.update(b)
    for portion in (0.2, 0.5, 0.0, 1.0, 0.05):
        want = loops.cbst_thresholds_loop([b.numpy() for b in batches], C, portion, subsample)
        got = acc.thresholds(portion)
        assert got.dtype == torch.float32 and got.shape == (C,)
        assert torch.equal(got, torch.from_numpy(want)), f"portion {portion}: {mismatch(torch.from_numpy(want), got)}"
    if C > 2:
        assert acc.thresholds(0.5)[C - 1] == 1.0  # empty class
    counts = torch.stack([torch.bincount(b.argmax(1).flatten(), minlength=C) for b in batches]).sum(0)
    assert torch.equal(acc.class_counts(), counts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_thresholds_low_precision_ties_and_reset(backend):
    C = 5
    x = probs(2, C, 16, 16, seed=3, dtype=torch.float16)  # many equal float16 values
    acc = ops.ClassBalancedThresholds(C, 4, backend=backend)
    acc.update(x)
    want = loops.cbst_thresholds_loop([x.float().numpy()], C, 0.3, 4)
    assert torch.equal(acc.thresholds(0.3), torch.from_numpy(want))
    acc.reset()
    assert torch.equal(acc.thresholds(0.3), torch.ones(C)) and int(acc.class_counts().sum()) == 0
    y = x[:, :, ::2, 1::3]  # strided input
    acc.update(y)
    assert torch.equal(acc.thresholds(0.3), torch.from_numpy(loops.cbst_thresholds_loop([y.float().numpy()], C, 0.3, 4)))


def test_backends_store_the_same_values_in_the_same_order():
    batches = _batches(7, seed=4, n=2, shape=(3, 40, 50))
    accs = [ops.ClassBalancedThresholds(7, 3, backend=b) for b in BACKENDS]
    for b in batches:
        for acc in accs:
            acc.update(b)
    v0, v1 = (a._values[: a._size] for a in accs)
    c0, c1 = (a._classes[: a._size] for a in accs)
    assert torch.equal(v0, v1) and torch.equal(c0, c1)
    for portion in (0.2, 0.25, 0.5):
        assert torch.equal(accs[0].thresholds(portion), accs[1].thresholds(portion))


def test_collect_large_image_spans_several_chunks():
    """The C++ collect splits images into chunks of 32768 pixels: ranks must carry across."""
    x = probs(1, 3, 200, 300, seed=5)
    m, a = reference.pixel_stats(x, from_logits=False, size=None, align_corners=True)
    a8 = a.to(torch.uint8)
    counts = torch.bincount(a.flatten(), minlength=3)
    total = int((-(-counts // 4)).sum())
    values, classes = cbst_collect_cpp(m, a8, 3, 4, total)
    keep = reference.cbst_keep_mask(a.reshape(1, -1), 3, 4)
    assert torch.equal(values, m.reshape(1, -1)[keep]) and torch.equal(classes, a8.reshape(1, -1)[keep])
    torch.library.opcheck(cbst_collect_cpp, (m, a8, 3, 4, total))
    torch.library.opcheck(cbst_thresholds_cpp, (values, classes, 3, 0.2))


LABEL_BACKENDS = BACKENDS + (["triton"] if "triton" in ops.available_backends() else [])


def _on(backend, *tensors):
    """The tensors where `backend` runs them: triton on the GPU when there is one."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("backend", LABEL_BACKENDS)
@pytest.mark.parametrize("C", [2, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cbst_labels_equal_loop(backend, C, dtype):
    p = probs(2, C, 7, 8, seed=C).to(dtype)
    lam = torch.rand(C, generator=gen(C)) * 0.6 + 0.3
    want = torch.from_numpy(loops.confident_map(loops.q_map(p.float().numpy(), lam.numpy())).astype(np.uint8))
    got = ops.cbst_pseudo_label(*_on(backend, p, lam), backend=backend).cpu()
    assert got.dtype == torch.uint8 and torch.equal(got, want), mismatch(want, got)
    assert bool((got == 255).any()) and bool((got != 255).any())


def test_cbst_label_rule_at_exactly_one_and_ties():
    # q = p / lambda exactly 1 labels; equal w picks the lower class
    p = torch.tensor([0.5, 0.25, 0.25]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    p[0, :, 0, 1] = torch.tensor([0.2, 0.4, 0.4])
    lam = torch.tensor([0.5, 0.4, 0.4])
    for backend in LABEL_BACKENDS:
        assert ops.cbst_pseudo_label(*_on(backend, p, lam), backend=backend)[0, 0].tolist() == [0, 1]
        assert ops.cbst_pseudo_label(*_on(backend, p, lam * 1.01), backend=backend)[0, 0].tolist() == [255, 255]
    torch.library.opcheck(cbst_label_cpp, (p, lam))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.ClassBalancedThresholds(1), r"num_classes must be an int in \[2, 254\]"),
    (lambda: ops.ClassBalancedThresholds(5, 0), r"subsample must be an int >= 1"),
    (lambda: ops.ClassBalancedThresholds(5).update(probs(1, 4, 3, 3)), r"C = 4 classes but .* num_classes = 5"),
    (lambda: ops.ClassBalancedThresholds(4).update(probs(1, 4, 3, 3) + 1), r"outside \[0, 1\]"),
    (lambda: ops.ClassBalancedThresholds(4).thresholds(1.5), r"portion must be"),
    (lambda: ops.cbst_pseudo_label(probs(1, 4, 3, 3), torch.full((4,), -1.0)), r"lambdas must be finite and > 0"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---------------------------------------------------------------------------- MRKLD
def _loss_inputs(B, C, h, w, H, W, seed, ignore=0.3):
    g = gen(seed)
    logits = torch.randn(B, C, h, w, generator=g) * 3
    target = torch.randint(0, C, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < ignore] = 255
    return logits, target


def _mrkld_formula(logits, target, is_target, w, align_corners=True):
    """docs/ops.md §5 in float64, written out: per-pixel -log p_y and -(1/C) sum_c log p_c."""
    x = logits.double()
    H, W = target.shape[1:]
    if x.shape[2:] != (H, W):
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=align_corners)
    logp = torch.log_softmax(x, 1)
    ce_sum = kld_sum = 0.0
    n_valid = n_tgt = 0
    for b in range(x.shape[0]):
        for yy in range(H):
            for xx in range(W):
                y = int(target[b, yy, xx])
                if y == 255:
                    continue
                n_valid += 1
                ce_sum += -float(logp[b, y, yy, xx])
                if is_target[b]:
                    n_tgt += 1
                    kld_sum += -float(logp[b, :, yy, xx].sum()) / x.shape[1]
    if n_valid == 0:
        return 0.0
    return ce_sum / n_valid + (w * kld_sum / n_tgt if n_tgt else 0.0)


def _loss_device(backend):
    """Where a backend's inputs live: triton on the GPU when there is one (else interpreted)."""
    return "cuda" if backend == "triton" and CUDA else "cpu"


def _st_loss_op(backend):
    if backend == "triton":
        from fastst.ops.triton.st_loss import st_loss_triton
        return st_loss_triton
    return st_loss_cpp


def _mrkld_run(backend, logits, target, flags, **kw):
    """(loss, d loss / d logits) as float64 on the CPU, through the public op."""
    d = _loss_device(backend)
    x = logits.to(d).clone().requires_grad_(True)
    loss = ops.mrkld_loss(x, target.to(d), flags.to(d), backend=backend, **kw)
    loss.backward()
    return loss.detach().double().cpu(), x.grad.double().cpu()


@pytest.mark.parametrize("backend", MRKLD_BACKENDS)
@pytest.mark.parametrize("is_target", [[True, False], [False, False], [True, True]])
@pytest.mark.parametrize("size", [(5, 6, 5, 6), (3, 4, 9, 11)])
@pytest.mark.parametrize("align_corners", [True, False])
def test_mrkld_value_and_gradient(backend, is_target, size, align_corners):
    h, w, H, W = size
    logits, target = _loss_inputs(2, 4, h, w, H, W, seed=sum(size))
    flags = torch.tensor(is_target)
    loss, grad = _mrkld_run(backend, logits, target, flags, mrkld_weight=0.5, align_corners=align_corners)
    assert loss.item() == pytest.approx(_mrkld_formula(logits, target, flags, 0.5, align_corners), rel=1e-5)
    y = logits.double().requires_grad_(True)
    reference.mrkld_loss_terms(y, target, flags, mrkld_weight=0.5, ignore_index=255,
                               align_corners=align_corners).backward()
    assert torch.allclose(grad, y.grad, rtol=1e-4, atol=1e-5 * float(y.grad.abs().max()))


@pytest.mark.parametrize("backend", FUSED_MRKLD)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 2, 3, 3, 10, 10), (1, 19, 3, 5, 17, 33)], ids=["C2", "C19"])
def test_mrkld_fused_equals_reference_dtypes_and_classes(backend, dtype, shape):
    """u8 targets, logits in float32 or bf16 (both sides upcast the same values to float32)."""
    B, C, h, w, H, W = shape
    logits, target = _loss_inputs(B, C, h, w, H, W, seed=C + 10)
    logits, target = logits.to(dtype), target.to(torch.uint8)
    flags = torch.tensor([True, False][:B])
    want, want_grad = _mrkld_run("torch", logits, target, flags, mrkld_weight=0.3, align_corners=False)
    got, got_grad = _mrkld_run(backend, logits, target, flags, mrkld_weight=0.3, align_corners=False)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert float((got_grad - want_grad).abs().max()) <= 1e-4 * float(want_grad.abs().max())


@pytest.mark.parametrize("backend", MRKLD_BACKENDS)
def test_mrkld_empty_and_opcheck(backend):
    logits, target = _loss_inputs(2, 3, 4, 4, 4, 4, seed=6, ignore=1.0)
    loss, grad = _mrkld_run(backend, logits, target, torch.tensor([True, True]))
    assert loss.item() == 0.0 and float(grad.abs().max()) == 0.0
    d = _loss_device(backend)
    logits, target = _loss_inputs(2, 3, 2, 3, 4, 5, seed=7)
    torch.library.opcheck(_st_loss_op(backend), (logits.to(d).requires_grad_(True), target.to(d),
                                                 torch.ones(3, device=d), None, torch.tensor([True, False], device=d),
                                                 2, 0.0, 0.01, 0.0, False, 255, 4, 5, True, True))


@pytest.mark.parametrize("backend", FUSED_MRKLD)
def test_mrkld_compile_fullgraph_and_deterministic(backend):
    d = _loss_device(backend)
    logits, target = _loss_inputs(2, 4, 3, 4, 7, 9, seed=9)
    target, flags = target.to(d), torch.tensor([True, False], device=d)

    def step(v):
        return ops.mrkld_loss(v, target, flags, mrkld_weight=0.2, backend=backend) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2, x3 = (logits.to(d).clone().requires_grad_(True) for _ in range(3))
    compiled(x1).backward()
    step(x2).backward()
    step(x3).backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(x2.grad, x3.grad)
    assert float(x2.grad.abs().max()) > 0.0


def test_mrkld_gradcheck_reference():
    logits, target = _loss_inputs(2, 3, 2, 3, 4, 5, seed=8)
    flags = torch.tensor([True, False])
    torch.autograd.gradcheck(lambda x: reference.mrkld_loss_terms(x, target, flags, mrkld_weight=0.3,
                                                                  ignore_index=255, align_corners=False),
                             (logits.double().requires_grad_(True),))
