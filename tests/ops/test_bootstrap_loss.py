"""bootstrap_loss (docs/ops.md §6): the reference against the closed form (value and the per-pixel
gradient p * sum(c) - c with q stop-gradient), gradcheck of the reference in float64, and the
fused backends (cpp; triton, in its interpreter without a GPU) against the reference for hard
and soft targets, with and without the fused upsample, both align_corners, C = 2 and 19,
reductions, low-precision logits, empty target sets, determinism, opcheck and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import fastst.ops as ops
from fastst.ops import _backend, reference
from fastst.ops.ext.bootstrap_loss import st_loss_cpp
from helpers import gen

CUDA = torch.cuda.is_available()
TRITON = "triton" in _backend.available_backends()
FUSED = ["cpp"] + (["triton"] if TRITON else [])


def _device(backend):
    """Where a backend's inputs live: triton on the GPU when there is one (else interpreted)."""
    return "cuda" if backend == "triton" and CUDA else "cpu"


def _fused_ops():
    """(backend name, custom op) pairs of the fused backends."""
    pairs = [("cpp", st_loss_cpp)]
    if TRITON:
        from fastst.ops.triton.st_loss import st_loss_triton
        pairs.append(("triton", st_loss_triton))
    return pairs


def _inputs(B, C, h, w, H, W, seed, ignore=0.3, dtype=torch.float32):
    g = gen(seed)
    logits = (torch.randn(B, C, h, w, generator=g) * 3).to(dtype)
    target = torch.randint(0, C, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < ignore] = 255
    lambdas = torch.rand(C, generator=g) * 0.6 + 0.3
    teacher = torch.softmax(torch.randn(B, C, H, W, generator=g) * 2, 1)
    soft = reference.tpld_soft_targets(teacher, lambdas, gamma=2.0)
    return logits, target, lambdas, soft


def _closed_form(logits, target, lambdas, beta, soft, align_corners=True):
    """Value and d loss / d logits in float64 from docs/ops.md §6 written out: c = beta y + (1 - beta) q,
    loss = mean over pixels with a target of -sum c log q, d/dv = p * sum(c) - c (q constant)."""
    x = logits.double().requires_grad_(True)
    H, W = target.shape[1:]
    up = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=align_corners) if x.shape[2:] != (H, W) else x
    p = torch.softmax(up.detach(), 1)
    lam = lambdas.double().view(1, -1, 1, 1)
    q = p / lam
    labelled = target != 255
    y = F.one_hot(torch.where(labelled, target, 0), x.shape[1]).permute(0, 3, 1, 2).double()
    if soft is None:
        has = labelled
    else:
        y = torch.where(labelled.unsqueeze(1), y, soft.double())
        has = torch.ones_like(labelled)
    c = (beta * y + (1 - beta) * q) * has.unsqueeze(1)
    n = max(int(has.sum()), 1)
    value = float(-(c * torch.log(q)).sum()) / n
    g_up = (p * c.sum(1, keepdim=True) - c) / n
    (grad,) = torch.autograd.grad(up, x, g_up)
    return value, grad


def _run(backend, logits, target, lambdas, **kw):
    d = _device(backend)
    x = logits.to(d).clone().requires_grad_(True)
    soft = kw.pop("soft_target", None)
    loss = ops.bootstrap_loss(x, target.to(d), lambdas.to(d), soft_target=None if soft is None else soft.to(d),
                              backend=backend, **kw)
    loss.backward()
    return loss.detach().double().cpu(), x.grad.double().cpu()


SHAPES = [(2, 5, 6, 7, 6, 7), (1, 19, 3, 5, 17, 33), (1, 2, 4, 4, 9, 11), (1, 3, 1, 1, 3, 4), (2, 4, 7, 9, 4, 5)]


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_reference_equals_closed_form(shape, soft):
    logits, target, lambdas, soft_t = _inputs(*shape, seed=sum(shape))
    soft_t = soft_t if soft else None
    value, grad = _closed_form(logits, target, lambdas, 0.95, soft_t)
    got, got_grad = _run("torch", logits, target, lambdas, soft_target=soft_t)
    assert float(got) == pytest.approx(value, rel=1e-5)
    assert torch.allclose(got_grad, grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()))


def test_reference_gradcheck_float64():
    """beta = 1 removes the stop-gradient term (finite differences would see q move), so the
    loss is an ordinary function of the logits there."""
    logits, target, lambdas, soft = _inputs(2, 3, 2, 3, 4, 5, seed=1)
    for s in (None, soft.double()):
        torch.autograd.gradcheck(
            lambda x: reference.bootstrap_loss_terms(x, target, lambdas, beta=1.0, soft_target=s, ignore_index=255,
                                                     align_corners=False),
            (logits.double().requires_grad_(True),))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("align_corners", [True, False])
def test_fused_backend_equals_reference(backend, shape, soft, align_corners):
    logits, target, lambdas, soft_t = _inputs(*shape, seed=sum(shape) + 1)
    kw = dict(soft_target=soft_t if soft else None, align_corners=align_corners, beta=0.9)
    want, want_grad = _run("torch", logits, target, lambdas, **dict(kw))
    got, got_grad = _run(backend, logits, target, lambdas, **dict(kw))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (float(got), float(want))
    scale = float(want_grad.abs().max())
    assert float((got_grad - want_grad).abs().max()) <= 1e-4 * scale


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_low_precision_sum_reduction_u8_target(backend, dtype):
    logits, target, lambdas, _ = _inputs(2, 6, 3, 5, 11, 13, seed=3, dtype=dtype)
    kw = dict(reduction="sum", beta=0.95)
    want, want_grad = _run("torch", logits, target.to(torch.uint8), lambdas, **dict(kw))
    got, got_grad = _run(backend, logits, target.to(torch.uint8), lambdas, **dict(kw))
    assert torch.allclose(got, want, rtol=1e-5)
    assert float((got_grad - want_grad).abs().max()) <= 1e-3 * float(want_grad.abs().max())


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_no_labelled_pixel_gives_zero(backend):
    logits, target, lambdas, soft = _inputs(1, 4, 3, 3, 6, 6, seed=4, ignore=1.0)
    loss, grad = _run(backend, logits, target, lambdas)
    assert float(loss) == 0.0 and float(grad.abs().max()) == 0.0
    # with soft targets every pixel has one
    loss, grad = _run(backend, logits, target, lambdas, soft_target=soft)
    assert float(loss) != 0.0 and float(grad.abs().max()) > 0.0


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_beta_one_is_cross_entropy_plus_log_lambda(backend):
    """beta = 1, hard targets: -log q_y = CE + log lambda_y."""
    logits, target, lambdas, _ = _inputs(2, 5, 4, 6, 13, 21, seed=5)
    loss, grad = _run(backend, logits, target, lambdas, beta=1.0)
    y = logits.clone().requires_grad_(True)
    up = F.interpolate(y, size=(13, 21), mode="bilinear", align_corners=True)
    valid = target != 255
    ce = F.cross_entropy(up, target, ignore_index=255)
    expected = ce + torch.log(lambdas)[target[valid]].mean()
    ce.backward()
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert torch.allclose(grad, y.grad.double(), rtol=1e-4, atol=1e-4 * float(y.grad.abs().max()))


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_bad_input(backend):
    logits, target, lambdas, soft = _inputs(1, 4, 3, 3, 6, 6, seed=6)
    with pytest.raises(ValueError, match="soft_target must have shape"):
        ops.bootstrap_loss(logits, target, lambdas, soft_target=soft[:, :3], backend=backend)
    with pytest.raises(ValueError, match="beta must be"):
        ops.bootstrap_loss(logits, target, lambdas, beta=1.5, backend=backend)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.bootstrap_loss(logits, target, lambdas, reduction="none", backend=backend)
    with pytest.raises(ValueError, match="lambdas must have shape"):
        ops.bootstrap_loss(logits, target, lambdas[:2], backend=backend)
    bad = target.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match="target contains label 7"):
        ops.bootstrap_loss(logits, bad, lambdas, backend=backend)


@pytest.mark.parametrize("backend,op", _fused_ops(), ids=[b for b, _ in _fused_ops()])
def test_deterministic_and_opcheck_and_compile(backend, op):
    logits, target, lambdas, soft = _inputs(2, 4, 3, 4, 7, 9, seed=7)
    first = _run(backend, logits, target, lambdas, soft_target=soft)
    again = _run(backend, logits, target, lambdas, soft_target=soft)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    # opcheck runs the op a dozen times: smaller inputs, still resized (2x3 -> 4x5)
    d = _device(backend)
    logits, target, lambdas, soft = (t.to(d) for t in _inputs(1, 3, 2, 3, 4, 5, seed=7))
    x = logits.clone().requires_grad_(True)
    torch.library.opcheck(op, (x, target, lambdas, None, None, 0, 0.95, 0.0, 0.0, False, 255, 4, 5, True, True))
    torch.library.opcheck(op, (x, target, lambdas, soft, None, 1, 0.95, 0.0, 0.0, True, 255, 4, 5, False, True))

    def step(v):
        return ops.bootstrap_loss(v, target, lambdas, soft_target=soft, backend=backend) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    compiled(x1).backward()
    step(x2).backward()
    assert torch.equal(x1.grad, x2.grad)


def test_default_backend_on_cuda_is_triton():
    """docs/ops.md §0: CUDA tensors go to the fused triton loss when Triton can run (no nvcc loss kernel
    exists), not to the torch reference; on CPU tensors the default stays cpp."""
    from fastst.ops.bootstrap_loss import LOSS_BACKENDS
    want = "triton" if TRITON else "torch"
    assert _backend.choose_backend("bootstrap_loss", torch.device("cuda"), LOSS_BACKENDS) == want
    want_cpu = "cpp" if "cpp" in _backend.available_backends() else "torch"
    assert _backend.choose_backend("bootstrap_loss", torch.device("cpu"), LOSS_BACKENDS) == want_cpu
