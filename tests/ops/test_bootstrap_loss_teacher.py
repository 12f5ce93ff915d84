"""bootstrap_loss with teacher_logits (docs/ops.md §6, TPLD phase 2's easy crops): the soft targets made
inside the fused pass from the teacher's low-resolution logits, against the reference (which
materialises p = softmax(F.interpolate(teacher)), the confident map and tpld_soft_targets), and
against the materialised path of the op itself; cpp and triton (interpreted without a GPU)."""
import pytest
import torch

import fastst.ops as ops
from fastst.ops import _backend
from helpers import gen

CUDA = torch.cuda.is_available()
FUSED = ["cpp"] + (["triton"] if "triton" in _backend.available_backends() else [])
MARGIN = 1e-3  # no q within this of 1, no confident pixel with its top two q this close


def _device(backend):
    return "cuda" if backend == "triton" and CUDA else "cpu"


def _case(B, C, h, w, H, W, seed, align_corners=True, confident_share=0.5, dtype=torch.float32):
    """(student logits, teacher logits, lambdas) with every teacher q at least MARGIN away from 1
    and from a confident pixel's runner-up, so that the confident decision cannot flip between
    F.interpolate's rounding and the kernels' (the comparison is then a tolerance one). Logits
    hold values of ``dtype`` (as float32)."""
    g = gen(seed)
    logits = (torch.randn(B, C, h, w, generator=g) * 3).to(dtype).float()
    for attempt in range(50):
        teacher = (torch.randn(B, C, h, w, generator=g) * 3).to(dtype).float()
        probs = _teacher_probs(teacher, H, W, align_corners)
        # thresholds putting about `confident_share` of the pixels above 1
        lambdas = (torch.quantile(probs.amax(1).flatten(), 1 - confident_share).expand(C)
                   * (0.9 + 0.2 * torch.rand(C, generator=g))).clamp(max=1.0)
        q = probs / lambdas.view(1, C, 1, 1)
        top2 = q.topk(min(2, C), dim=1).values
        near_one = ((q - 1).abs() < MARGIN).any()
        near_tie = ((top2[:, 0] >= 1) & (top2[:, 0] - top2[:, -1] < MARGIN)).any() if C > 1 else False
        if not near_one and not near_tie:
            return logits, teacher, lambdas
    raise AssertionError("no well-separated case found")  # pragma: no cover


def _teacher_probs(teacher, H, W, align_corners=True):
    """The reference's teacher probabilities: softmax of F.interpolate, float32 (B, C, H, W)."""
    if teacher.shape[2:] != (H, W):
        teacher = torch.nn.functional.interpolate(teacher, size=(H, W), mode="bilinear", align_corners=align_corners)
    return torch.softmax(teacher, 1)


def _run(backend, logits, teacher, lambdas, size, **kw):
    d = _device(backend)
    x = logits.to(d).clone().requires_grad_(True)
    loss = ops.bootstrap_loss(x, None, lambdas.to(d), teacher_logits=teacher.to(d), size=size,
                              backend=backend, **kw)
    loss.backward()
    return loss.detach().double().cpu(), x.grad.double().cpu()


def _close(got, want, grad_tolerance=1e-4):
    (value, grad), (want_value, want_grad) = got, want
    assert torch.allclose(value, want_value, rtol=1e-5, atol=1e-6), (float(value), float(want_value))
    scale = float(want_grad.abs().max())
    assert float((grad - want_grad).abs().max()) <= grad_tolerance * scale


SHAPES = [(2, 5, 6, 7, 6, 7), (1, 19, 3, 5, 17, 33), (1, 2, 4, 4, 9, 11), (2, 4, 7, 9, 4, 5)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("align_corners", [True, False])
def test_fused_teacher_targets_equal_reference(backend, shape, align_corners):
    logits, teacher, lambdas = _case(*shape, seed=sum(shape), align_corners=align_corners)
    size = shape[4:]
    kw = dict(align_corners=align_corners, beta=0.9, gamma=2.0)
    _close(_run(backend, logits, teacher, lambdas, size, **kw), _run("torch", logits, teacher, lambdas, size, **kw))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 2.5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gamma_and_reduction(backend, gamma, reduction):
    logits, teacher, lambdas = _case(2, 6, 3, 4, 7, 9, seed=int(gamma * 10) + len(reduction))
    kw = dict(gamma=gamma, reduction=reduction)
    _close(_run(backend, logits, teacher, lambdas, (7, 9), **kw),
           _run("torch", logits, teacher, lambdas, (7, 9), **kw))


@pytest.mark.parametrize("backend", FUSED)
def test_in_pass_targets_equal_the_materialised_path(backend):
    """What phase 2 did before: teacher probabilities at full size, the confident map and the soft
    targets as tensors, then bootstrap_loss(soft_target=...)."""
    logits, teacher, lambdas = _case(2, 5, 4, 6, 13, 21, seed=11)
    probs = _teacher_probs(teacher, 13, 21)
    d = _device(backend)
    x = logits.to(d).clone().requires_grad_(True)
    loss = ops.bootstrap_loss(x, ops.cbst_pseudo_label(probs, lambdas).to(d), lambdas.to(d),
                              soft_target=ops.tpld_soft_targets(probs, lambdas).to(d), backend=backend)
    loss.backward()
    _close(_run(backend, logits, teacher, lambdas, (13, 21)), (loss.detach().double().cpu(), x.grad.double().cpu()))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_and_non_contiguous(backend, dtype):
    logits, teacher, lambdas = _case(2, 6, 5, 6, 11, 13, seed=5, dtype=dtype)
    low_logits = logits.to(dtype)
    low_teacher = teacher.to(dtype).transpose(2, 3).contiguous().transpose(2, 3)  # other strides
    assert not low_teacher.is_contiguous()
    # the same inputs through the reference; gradients come back in the logits' dtype (one
    # bf16 ulp is 2 ** -8 of an element)
    want = _run("torch", low_logits, low_teacher, lambdas, (11, 13))
    _close(_run(backend, low_logits, low_teacher, lambdas, (11, 13)), want, grad_tolerance=1e-2)


@pytest.mark.parametrize("backend", FUSED)
def test_c150(backend):
    logits, teacher, lambdas = _case(1, 150, 2, 3, 5, 7, seed=150)
    _close(_run(backend, logits, teacher, lambdas, (5, 7)), _run("torch", logits, teacher, lambdas, (5, 7)))


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_ties_all_confident_and_none_confident(backend):
    """Constant teacher logits: p = 1/4 exactly, so q ties across every class. lambda = 1/4
    makes every pixel confident with the lowest class (onehot of class 0); lambda = 1/2 makes
    none confident (y = (1/2) ** 2 for every class)."""
    C = 4
    logits = torch.randn(2, C, 3, 4, generator=gen(9)) * 2
    teacher = torch.zeros(2, C, 3, 4)
    for lam, y in ((0.25, torch.tensor([1.0, 0.0, 0.0, 0.0])), (0.5, torch.full((C,), 0.25))):
        lambdas = torch.full((C,), lam)
        got = _run(backend, logits, teacher, lambdas, (5, 6), beta=0.9)
        # the hard-coded targets through the materialised op
        soft = y.view(1, C, 1, 1).expand(2, C, 5, 6).contiguous()
        want = _run_soft(logits, soft, lambdas)
        _close(got, want)


def _run_soft(logits, soft, lambdas):
    x = logits.clone().requires_grad_(True)
    no_labels = torch.full(soft[:, 0].shape, 255, dtype=torch.uint8)
    loss = ops.bootstrap_loss(x, no_labels, lambdas, soft_target=soft, beta=0.9, backend="torch")
    loss.backward()
    return loss.detach().double(), x.grad.double()


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_no_gradient_reaches_the_teacher(backend):
    logits, teacher, lambdas = _case(1, 3, 3, 3, 5, 5, seed=2)
    d = _device(backend)
    t = teacher.to(d).requires_grad_(True)
    x = logits.to(d).requires_grad_(True)
    ops.bootstrap_loss(x, None, lambdas.to(d), teacher_logits=t, size=(5, 5), backend=backend).backward()
    assert t.grad is None and x.grad is not None


BAD_ARGUMENTS = {  # name -> (the arguments that replace the good ones, given the good teacher; message)
    "target": (lambda t: dict(target=torch.zeros(1, 5, 5, dtype=torch.uint8)), "target=None"),
    "soft_target": (lambda t: dict(soft_target=torch.zeros(1, 3, 5, 5)), "soft_target=None"),
    "no_size": (lambda t: dict(size=None), "size=\\(H, W\\)"),
    "shape": (lambda t: dict(teacher_logits=torch.zeros(1, 3, 2, 3)), "teacher_logits must have the logits' shape"),
    "gamma_negative": (lambda t: dict(gamma=-1.0), "gamma"),
    "gamma_nan": (lambda t: dict(gamma=float("nan")), "gamma"),
    # another device without a GPU: the meta device
    "device": (lambda t: dict(teacher_logits=t.to("meta")), "teacher_logits is on meta but logits are on cpu"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_teacher_arguments_raise_naming_them(case):
    logits, teacher, lambdas = _case(1, 3, 3, 3, 5, 5, seed=4)
    replace, pattern = BAD_ARGUMENTS[case]
    args = dict(target=None, teacher_logits=teacher, size=(5, 5), gamma=2.0)
    args.update(replace(teacher))
    target = args.pop("target")
    with pytest.raises(ValueError, match=pattern):
        ops.bootstrap_loss(logits, target, lambdas, **args)
