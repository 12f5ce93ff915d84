"""The fused region-loss backends (cpp, triton) against the reference (F.interpolate + autograd):
parts and gradients, shapes with and without the fused upsample, both align_corners, sizes that
are not multiples, downsampling, one pixel, C = 2 and 150, all / none ignored, bf16 and fp16
logits, uint8 and int64 targets, non-contiguous logits; determinism; detached parts; the custom
ops under opcheck and torch.compile. Triton runs in its interpreter without a GPU (tiny shapes).
"""
import pytest
import torch
import torch.nn.functional as F

from fastst.ops import _backend, region_loss
from fastst.ops.ext.region_loss import region_loss_cpp

from test_region_loss import IGNORE, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _fused_backends():
    """(backend, device) pairs: cpp on the CPU, triton where Triton can run."""
    pairs = [pytest.param("cpp", "cpu", id="cpp")]
    if "triton" in _backend.available_backends():
        pairs.append(pytest.param("triton", DEVICE, id="triton"))
    return pairs


def _run(backend, device, logits, target, **kw):
    """(loss, ce, kld, ent) as float64 and d loss / d logits, through the public op."""
    x = logits.to(device).clone().requires_grad_(True)
    parts = region_loss(x, target.to(device), return_parts=True, backend=backend, **kw)
    parts[0].backward()
    return torch.stack([p.detach().double().cpu() for p in parts]), x.grad.double().cpu()


def _compare(backend, device, logits, target, *, rtol=2e-5, grad_rtol=1e-4, **kw):
    got_parts, got_grad = _run(backend, device, logits, target, **kw)
    ref_parts, ref_grad = _run("torch", "cpu", logits, target, **kw)
    scale = float(ref_parts.abs().max()) or 1.0
    assert torch.allclose(got_parts, ref_parts, rtol=rtol, atol=rtol * scale), \
        f"parts {got_parts.tolist()} != reference {ref_parts.tolist()}"
    gscale = float(ref_grad.abs().max()) or 1.0
    err = float((got_grad - ref_grad).abs().max())
    assert err <= grad_rtol * gscale, f"grad max abs error {err:.3e} vs max |grad| {gscale:.3e}"
    return got_parts, got_grad


# (B, C, h, w, H, W): same size, x8 upsample, non-multiples, downsampling, one pixel, C = 2
SHAPES = [(2, 5, 6, 7, 6, 7), (2, 19, 4, 8, 32, 64), (2, 4, 3, 4, 7, 9), (1, 3, 5, 7, 17, 23),
          (2, 4, 9, 11, 4, 5), (1, 3, 1, 1, 1, 1), (1, 3, 1, 1, 3, 4), (2, 2, 3, 3, 10, 10)]


@pytest.mark.parametrize("backend,device", _fused_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("align_corners", [True, False])
def test_matches_reference(backend, device, shape, align_corners):
    B, C, h, w, H, W = shape
    logits, target = make_inputs(B, C, h, w, H, W, seed=sum(shape))
    _compare(backend, device, logits, target, align_corners=align_corners)


@pytest.mark.parametrize("backend,device", _fused_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int64], ids=["u8", "i64"])
def test_low_precision_logits_and_target_dtypes(backend, device, dtype, target_dtype):
    logits, target = make_inputs(2, 6, 3, 5, 11, 13, seed=3, dtype=dtype, target_dtype=target_dtype)
    got_parts, got_grad = _compare(backend, device, logits, target)
    # The gradient comes back in the logits' dtype, like autograd's.
    x = logits.to(device).clone().requires_grad_(True)
    region_loss(x, target.to(device), backend=backend).backward()
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("backend,device", _fused_backends())
@pytest.mark.parametrize("ignore_frac", [0.0, 1.0], ids=["none_ignored", "all_ignored"])
def test_empty_parts(backend, device, ignore_frac):
    logits, target = make_inputs(2, 4, 3, 4, 7, 9, seed=4, ignore_frac=ignore_frac)
    parts, grad = _compare(backend, device, logits, target)
    empty = 3 if ignore_frac == 0.0 else 1  # ent, or ce (and kld)
    assert parts[empty] == 0.0
    if ignore_frac == 1.0:
        assert parts[2] == 0.0
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


@pytest.mark.parametrize("backend,device", _fused_backends())
def test_many_classes(backend, device):
    logits, target = make_inputs(1, 150, 3, 3, 5, 6, seed=5)
    _compare(backend, device, logits, target)


@pytest.mark.parametrize("backend,device", _fused_backends())
def test_ties_and_large_logits(backend, device):
    # equal logits (uniform p) and a huge confident logit: log s is exact, no cancellation
    logits = torch.zeros(1, 4, 2, 2)
    logits[0, 1, 0, 0] = 60.0
    target = torch.tensor([[[1, 0, 255], [2, 255, 3]]])
    _compare(backend, device, logits, target, align_corners=False)


@pytest.mark.parametrize("backend,device", _fused_backends())
def test_non_contiguous_logits(backend, device):
    logits, target = make_inputs(2, 5, 6, 4, 12, 8, seed=6)
    channels_last = logits.contiguous(memory_format=torch.channels_last)
    transposed = logits.transpose(2, 3).contiguous().transpose(2, 3)
    for x in (channels_last, transposed, logits[:, :, :, :]):
        _compare(backend, device, x, target)


@pytest.mark.parametrize("backend,device", _fused_backends())
def test_ignore_index_inside_class_range(backend, device):
    logits, target = make_inputs(2, 6, 4, 4, 8, 8, seed=7, ignore_frac=0.0)
    _compare(backend, device, logits, target, ignore_index=3)


@pytest.mark.parametrize("backend,device", _fused_backends())
@pytest.mark.parametrize("align_corners", [True, False])
def test_zero_lambdas_is_cross_entropy_with_upsample(backend, device, align_corners):
    logits, target = make_inputs(2, 5, 4, 6, 13, 21, seed=8)
    x = logits.to(device).clone().requires_grad_(True)
    loss = region_loss(x, target.to(device), lambda_kld=0.0, lambda_ent=0.0,
                       align_corners=align_corners, backend=backend)
    loss.backward()
    y = logits.clone().requires_grad_(True)
    up = F.interpolate(y, size=(13, 21), mode="bilinear", align_corners=align_corners)
    expected = F.cross_entropy(up, target, ignore_index=IGNORE)
    expected.backward()
    assert torch.allclose(loss.cpu(), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x.grad.cpu(), y.grad, rtol=1e-4, atol=1e-4 * float(y.grad.abs().max()))


@pytest.mark.parametrize("backend,device", _fused_backends())
def test_deterministic_gradients(backend, device):
    logits, target = make_inputs(2, 7, 5, 6, 21, 25, seed=9)
    first = _run(backend, device, logits, target, deterministic=True)
    for _ in range(2):
        again = _run(backend, device, logits, target, deterministic=True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_backends_agree_with_each_other():
    if "triton" not in _backend.available_backends():
        pytest.skip("no GPU and no Triton interpreter")
    logits, target = make_inputs(2, 6, 4, 5, 15, 17, seed=10)
    cpp = _run("cpp", "cpu", logits, target)
    tri = _run("triton", DEVICE, logits, target)
    assert torch.allclose(cpp[0], tri[0], rtol=1e-5)
    assert torch.allclose(cpp[1], tri[1], rtol=1e-4, atol=1e-6 * float(cpp[1].abs().max()))


@pytest.mark.parametrize("backend,device", _fused_backends())
def test_parts_are_detached_and_loss_carries_the_gradient(backend, device):
    logits, target = make_inputs(1, 4, 3, 3, 6, 6, seed=11)
    x = logits.to(device).clone().requires_grad_(True)
    loss, ce, kld, ent = region_loss(x, target.to(device), return_parts=True, backend=backend)
    assert loss.requires_grad and not (ce.requires_grad or kld.requires_grad or ent.requires_grad)
    assert torch.allclose(loss.detach(), ce + 0.1 * kld + 3.0 * ent, rtol=1e-6)


def test_no_gradient_work_without_grad():
    logits, target = make_inputs(1, 4, 3, 3, 6, 6, seed=12)
    parts, grad = region_loss_cpp(logits, target, 0.1, 3.0, IGNORE, 6, 6, True, False, False)
    assert grad.numel() == 0
    parts_g, grad_g = region_loss_cpp(logits, target, 0.1, 3.0, IGNORE, 6, 6, True, False, True)
    assert torch.equal(parts, parts_g) and grad_g.shape == logits.shape
    with torch.no_grad():
        loss = region_loss(logits.requires_grad_(True), target)
    assert torch.equal(loss, parts[0])


def _fused_ops():
    ops = [pytest.param(region_loss_cpp, "cpu", id="cpp")]
    if "triton" in _backend.available_backends():
        from fastst.ops.triton.region_loss import region_loss_triton
        ops.append(pytest.param(region_loss_triton, DEVICE, id="triton"))
    return ops


@pytest.mark.parametrize("op,device", _fused_ops())
def test_opcheck(op, device):
    logits, target = make_inputs(2, 3, 3, 4, 5, 7, seed=13)
    x = logits.to(device).clone().requires_grad_(True)
    t = target.to(device)
    torch.library.opcheck(op, (x, t, 0.1, 3.0, IGNORE, 5, 7, True, True, True))
    torch.library.opcheck(op, (x.detach().to(torch.bfloat16), t.to(torch.uint8), 0.1, 3.0, IGNORE, 5, 7,
                               False, False, False))


@pytest.mark.parametrize("backend,device", _fused_backends())
def test_torch_compile_fullgraph_forward_and_backward(backend, device):
    logits, target = make_inputs(2, 4, 3, 4, 6, 8, seed=14)
    target = target.to(device)

    def step(x):
        return region_loss(x, target, size=(6, 8), backend=backend) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = logits.to(device).clone().requires_grad_(True)
    x2 = logits.to(device).clone().requires_grad_(True)
    compiled(x1).backward()
    step(x2).backward()
    assert torch.equal(x1.grad, x2.grad)
