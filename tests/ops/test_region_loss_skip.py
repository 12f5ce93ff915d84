"""A region-loss term whose lambda is 0 is skipped (issue "lambda_kld, lambda_ent = 0 turns a
term off and skips its work").

The fused ops (cpp; triton, in its interpreter without a GPU) take `need_parts`: without it a
term whose lambda is 0 is not computed and its part comes back NaN. Their `need_parts=True` path
runs every term, the arithmetic from before the skipping existed, so the skipped path must give
the same loss and gradient bit for bit: the weight-0 term only ever added a signed zero. The public op (every backend, torch included) returns the same
loss and gradient with and without `return_parts`, and these match the float64 reference of
tests/ops/test_region_loss.py. Inputs: same size and upsampled, bf16, non-contiguous logits,
all-ignored, all-labelled, and fully ignored rows next to labelled ones (whole ignored tiles are
where the fused kernels skip the softmax). Tiny shapes (the Triton interpreter is slow).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastst.ops import _backend, region_loss
from fastst.ops.ext.region_loss import needed_terms, region_loss_cpp

from test_region_loss import IGNORE, closed_form_grad, expected_parts, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAMBDAS = [(0.1, 3.0), (0.0, 3.0), (0.1, 0.0), (0.0, 0.0)]
LAMBDA_IDS = ["kld_ent", "ent_only", "kld_only", "ce_only"]


def _fused_ops():
    """(op, device) pairs: the cpp op, and the triton op where Triton can run."""
    ops = [pytest.param(region_loss_cpp, "cpu", id="cpp")]
    if "triton" in _backend.available_backends():
        from fastst.ops.triton.region_loss import region_loss_triton
        ops.append(pytest.param(region_loss_triton, DEVICE, id="triton"))
    return ops


def _backends():
    pairs = [pytest.param("cpp", "cpu", id="cpp"), pytest.param("torch", "cpu", id="torch")]
    if "triton" in _backend.available_backends():
        pairs.append(pytest.param("triton", DEVICE, id="triton"))
    return pairs


def _ignored_rows(B, C, h, w, H, W, seed):
    """Targets whose rows 1 and H - 2 are entirely ignored (whole tiles of ignored pixels) and
    whose other rows are 20 % ignored."""
    logits, target = make_inputs(B, C, h, w, H, W, seed=seed, ignore_frac=0.2)
    target[:, 1] = IGNORE
    target[:, H - 2] = IGNORE
    return logits, target


def _case(name):
    """(logits (B, C, h, w), target (B, H, W)) of a named input ("_up": upsampled in the loss)."""
    if name == "bf16_up":
        return make_inputs(2, 4, 3, 4, 6, 7, seed=23, dtype=torch.bfloat16, target_dtype=torch.uint8)
    if name == "non_contiguous":
        logits, target = make_inputs(2, 5, 4, 3, 4, 3, seed=24)
        return logits.transpose(2, 3).contiguous().transpose(2, 3), target
    if name == "all_ignored_up":
        return make_inputs(1, 4, 2, 3, 5, 7, seed=25, ignore_frac=1.0)
    if name == "all_labelled":
        return make_inputs(1, 4, 4, 5, 4, 5, seed=26, ignore_frac=0.0)
    if name == "ignored_rows":
        return _ignored_rows(1, 4, 5, 8, 5, 8, seed=27)
    if name == "ignored_rows_up":
        return _ignored_rows(1, 4, 3, 4, 9, 12, seed=28)
    raise ValueError(f"unknown case {name!r}")


CASES = ["bf16_up", "non_contiguous", "all_ignored_up", "all_labelled", "ignored_rows", "ignored_rows_up"]


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns of x: equal bits means equal values and equal signs of zero."""
    return x.detach().float().cpu().contiguous().view(torch.int32)


def _assert_same_gradient(grad, full_grad, device):
    """Bit-identical on the CPU (C++ built with -ffp-contract=off; the Triton interpreter runs
    numpy, which never fuses). Compiled Triton on a GPU lets LLVM fuse multiply-adds into FMAs,
    and the skipped form p * scale_p + shift equals the full p * (scale_p + scale_pv (u - E)) +
    shift only if both are fused alike, so there a few ulps of the largest entry are allowed."""
    if device == "cpu":
        assert torch.equal(_bits(grad), _bits(full_grad)), \
            f"gradient differs: max |diff| {float((grad - full_grad).abs().max()):.3e}"
    else:
        scale = float(full_grad.abs().max()) or 1.0
        assert float((grad - full_grad).abs().max()) <= 4 * 2.0 ** -23 * scale


def test_needed_terms_rule():
    assert needed_terms(0.1, 3.0, False) == (True, True)
    assert needed_terms(0.0, 3.0, False) == (False, True)
    assert needed_terms(0.1, 0.0, False) == (True, False)
    assert needed_terms(0.0, 0.0, False) == (False, False)
    assert needed_terms(0.0, 0.0, True) == (True, True)


@pytest.mark.parametrize("op,device", _fused_ops())
@pytest.mark.parametrize("lambdas", LAMBDAS[1:], ids=LAMBDA_IDS[1:])  # with both on nothing is skipped
@pytest.mark.parametrize("case", CASES)
def test_skipped_terms_change_no_bit(op, device, lambdas, case):
    lambda_kld, lambda_ent = lambdas
    logits, target = _case(case)
    x, t = logits.to(device), target.to(device)
    H, W = target.shape[1:]
    full_parts, full_grad = op(x, t, lambda_kld, lambda_ent, IGNORE, H, W, True, True, True)
    parts, grad = op(x, t, lambda_kld, lambda_ent, IGNORE, H, W, True, False, True)
    assert torch.equal(_bits(parts[:2]), _bits(full_parts[:2])), f"loss, ce {parts[:2]} != {full_parts[:2]}"
    _assert_same_gradient(grad, full_grad, device)
    for index, lam in ((2, lambda_kld), (3, lambda_ent)):
        if lam == 0.0:
            assert math.isnan(float(parts[index])), f"part {index} was skipped but reads {float(parts[index])}"
        else:
            assert torch.equal(_bits(parts[index]), _bits(full_parts[index]))
    assert torch.isfinite(full_parts).all() and torch.isfinite(full_grad).all()
    if case.startswith("ignored_rows"):  # the forward without a gradient skips alike
        parts_no_grad, _ = op(x, t, lambda_kld, lambda_ent, IGNORE, H, W, True, False, False)
        assert torch.equal(_bits(parts_no_grad), _bits(parts))


def _public(backend, device, logits, target, lambdas, return_parts):
    """(loss or parts, detached, and d loss / d logits) through the public op."""
    x = logits.to(device).clone().requires_grad_(True)
    out = region_loss(x, target.to(device), lambda_kld=lambdas[0], lambda_ent=lambdas[1],
                      return_parts=return_parts, backend=backend)
    if return_parts:
        out[0].backward()
        return tuple(part.detach() for part in out), x.grad
    out.backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("lambdas", LAMBDAS, ids=LAMBDA_IDS)
@pytest.mark.parametrize("case", ["bf16_up", "non_contiguous"])
def test_public_op_with_and_without_parts(backend, device, lambdas, case):
    logits, target = _case(case)
    loss, grad = _public(backend, device, logits, target, lambdas, False)
    parts, grad_with_parts = _public(backend, device, logits, target, lambdas, True)
    assert torch.equal(_bits(loss), _bits(parts[0]))
    _assert_same_gradient(grad, grad_with_parts, device)
    assert grad.dtype == logits.dtype
    # return_parts gives every part, computed, whatever the lambdas
    assert all(torch.isfinite(p).all() for p in parts)
    expected = expected_parts(logits.float(), target, lambda_kld=lambdas[0], lambda_ent=lambdas[1])
    rtol = 2e-5 if logits.dtype == torch.float32 else 1e-4  # bf16 logits are upcast exactly
    for got, want, name in zip(parts, expected, ("loss", "ce", "kld", "ent")):
        assert abs(float(got) - want) <= rtol * max(abs(want), 1e-3), f"{name}: {float(got)} != {want}"
    want_grad = closed_form_grad(logits.float(), target, lambda_kld=lambdas[0], lambda_ent=lambdas[1],
                                 align_corners=True)
    scale = float(want_grad.abs().max()) or 1.0
    err = float((grad.double().cpu() - want_grad).abs().max())
    grad_rtol = 1e-4 if logits.dtype == torch.float32 else 1e-2  # the gradient is returned in bf16
    assert err <= grad_rtol * scale, f"grad max abs error {err:.3e} vs max |grad| {scale:.3e}"


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("case", ["all_ignored_up", "all_labelled", "ignored_rows_up"])
def test_both_lambdas_zero_is_mean_cross_entropy(backend, device, case):
    logits, target = _case(case)
    loss, grad = _public(backend, device, logits, target, (0.0, 0.0), False)
    H, W = target.shape[1:]
    y = logits.clone().requires_grad_(True)
    up = F.interpolate(y, size=(H, W), mode="bilinear", align_corners=True)
    n_labelled = max(int((target != IGNORE).sum()), 1)
    expected = F.cross_entropy(up, target, ignore_index=IGNORE, reduction="sum") / n_labelled
    expected.backward()
    if case == "all_ignored_up":  # no labelled pixel: exactly 0, with a gradient of +0 everywhere
        assert float(loss) == 0.0
        assert torch.equal(_bits(grad), torch.zeros_like(_bits(grad)))
    expected = float(expected.detach())
    assert abs(float(loss) - expected) <= 2e-5 * max(expected, 1e-3)
    assert float((grad.cpu() - y.grad).abs().max()) <= 1e-4 * (float(y.grad.abs().max()) or 1.0)


@pytest.mark.parametrize("op,device", _fused_ops())
def test_ignored_rows_are_not_softmaxed_without_entropy(op, device):
    """The logits of a row segment with no labelled pixel are never read when the entropy is off:
    NaN there leaves the loss and the gradient bit-identical to finite values there, while the
    full computation (need_parts) does read them."""
    logits, target = _ignored_rows(2, 4, 6, 8, 6, 8, seed=29)
    poisoned = logits.clone()
    poisoned[:, :, 1] = float("nan")
    poisoned[:, :, 4] = float("nan")
    x, t, xp = logits.to(device), target.to(device), poisoned.to(device)
    parts, grad = op(x, t, 0.1, 0.0, IGNORE, 6, 8, True, False, True)
    parts_p, grad_p = op(xp, t, 0.1, 0.0, IGNORE, 6, 8, True, False, True)
    assert torch.equal(_bits(parts), _bits(parts_p)) and torch.equal(_bits(grad), _bits(grad_p))
    assert torch.equal(_bits(grad[:, :, 1]), torch.zeros_like(_bits(grad[:, :, 1])))
    full_parts, _ = op(xp, t, 0.1, 0.0, IGNORE, 6, 8, True, True, True)
    assert math.isnan(float(full_parts[3])) and math.isnan(float(full_parts[0]))


def test_extension_rejects_skipping_a_weighted_term():
    logits, target = make_inputs(1, 3, 2, 2, 2, 2, seed=30)
    parts = torch.empty(4)
    target = target.contiguous()
    for need_kld, need_ent in ((False, True), (True, False)):
        with pytest.raises(ValueError, match="non-zero lambda must be computed"):
            _backend.extension().region_loss_cpu(
                logits.data_ptr(), 0, tuple(logits.shape), (2, 2), tuple(logits.stride()), target.data_ptr(),
                False, IGNORE, 0.1, 3.0, need_kld, need_ent, True, parts.data_ptr(), 0)


@pytest.mark.parametrize("op,device", _fused_ops())
def test_opcheck_skipping(op, device):
    # Only the checks that do not compare values: the skipped parts are NaN, which
    # assert_close (the aot_dispatch check) does not take as equal.
    logits, target = make_inputs(2, 3, 3, 4, 5, 7, seed=31)
    x = logits.to(device).clone().requires_grad_(True)
    torch.library.opcheck(op, (x, target.to(device), 0.0, 0.0, IGNORE, 5, 7, True, False, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend,device", [p for p in _backends() if p.id != "torch"])
def test_torch_compile_with_zero_lambdas(backend, device):
    logits, target = make_inputs(2, 4, 3, 4, 6, 8, seed=32)
    target = target.to(device)

    def step(x):
        return region_loss(x, target, lambda_kld=0.0, lambda_ent=0.0, backend=backend) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = logits.to(device).clone().requires_grad_(True)
    x2 = logits.to(device).clone().requires_grad_(True)
    loss1 = compiled(x1)
    loss1.backward()
    loss2 = step(x2)
    loss2.backward()
    assert torch.equal(loss1, loss2) and torch.equal(x1.grad, x2.grad)
