"""Tests of region_loss (docs/ops.md §2): the public op and its pure-PyTorch reference.

The expected values come from an independent float64 formulation: a hand-written bilinear
upsampling (explicit source-index formula, not F.interpolate) and per-pixel loops with
torch.softmax. Gradients are checked against the closed-form per-pixel formulas of docs/ops.md §2.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastst.ops import region_loss
from fastst.ops.reference import region_loss_terms

IGNORE = 255


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape:
        return f"shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}"
    if a.numel() == 0:
        return "empty tensors"
    diff = (a - e).abs()
    idx = int(torch.argmax(diff.reshape(-1)))
    loc = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape)) if a.dim() else ()
    rel = diff.reshape(-1)[idx] / max(float(e.abs().max()), 1e-300)
    return (f"max abs diff {float(diff.reshape(-1)[idx]):.3e} at {loc}: actual "
            f"{float(a.reshape(-1)[idx]):.9g} vs expected {float(e.reshape(-1)[idx]):.9g} "
            f"(relative to max|expected| {float(rel):.3e}; max|expected| {float(e.abs().max()):.3e})")


def assert_close(actual, expected, *, rtol, atol=0.0, what=""):
    a = torch.as_tensor(actual).detach().double().cpu()
    e = torch.as_tensor(expected).detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values in actual"
    ok = ((a - e).abs() <= atol + rtol * e.abs()).all()
    assert ok, f"{what}: {_report(a, e)} (rtol={rtol}, atol={atol})"


def _load_impl():
    """The private float64-capable path (used for gradcheck only)."""
    return region_loss_terms


def make_inputs(B, C, h, w, H, W, *, ignore_frac=0.3, seed=0, dtype=torch.float32,
                target_dtype=torch.int64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, C, h, w, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, C, (B, H, W), generator=g)
    ign = torch.rand(B, H, W, generator=g) < ignore_frac
    target[ign] = IGNORE
    return logits, target.to(target_dtype)


def bilinear_manual(x: torch.Tensor, H: int, W: int, align_corners: bool) -> torch.Tensor:
    """Bilinear resampling written from the source-index formula (float64, explicit loops over
    output rows/columns), independent of F.interpolate."""
    x = x.double()
    B, C, h, w = x.shape

    def src_index(i, n_in, n_out):
        if align_corners:
            s = 0.0 if n_out == 1 else i * (n_in - 1) / (n_out - 1)
        else:
            s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(s)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, s - i0

    out = torch.empty(B, C, H, W, dtype=torch.float64)
    for i in range(H):
        y0, y1, ly = src_index(i, h, H)
        for j in range(W):
            x0, x1, lx = src_index(j, w, W)
            out[:, :, i, j] = ((1 - ly) * ((1 - lx) * x[:, :, y0, x0] + lx * x[:, :, y0, x1])
                               + ly * ((1 - lx) * x[:, :, y1, x0] + lx * x[:, :, y1, x1]))
    return out


def expected_parts(logits, target, *, lambda_kld=0.1, lambda_ent=3.0, align_corners=True,
                   ignore_index=IGNORE):
    """(loss, ce, kld, ent) in float64 from per-pixel loops."""
    B, C, h, w = logits.shape
    H, W = target.shape[1:]
    z = logits.double()
    if (h, w) != (H, W):
        z = bilinear_manual(z, H, W, align_corners)
    t = target.long()
    ce_sum = kld_sum = ent_sum = 0.0
    n_v = n_i = 0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                p = torch.softmax(z[b, :, i, j], dim=0)
                y = int(t[b, i, j])
                if y == ignore_index:
                    n_i += 1
                    ent_sum += float(-(p * torch.log(p)).sum())
                else:
                    n_v += 1
                    ce_sum += -math.log(float(p[y]))
                    kld_sum += float(-(torch.log(p) / C).sum())
    ce = ce_sum / n_v if n_v else 0.0
    kld = kld_sum / (C * n_v) if n_v else 0.0
    ent = ent_sum / (C * n_i) if n_i else 0.0
    return ce + lambda_kld * kld + lambda_ent * ent, ce, kld, ent


def closed_form_grad_full(z_full, target, *, lambda_kld, lambda_ent, ignore_index=IGNORE):
    """d loss / d z at full resolution from docs/ops.md §2's per-pixel formulas (float64)."""
    z = z_full.double()
    C = z.shape[1]
    p = torch.softmax(z, dim=1)
    logp = torch.log_softmax(z, dim=1)
    t = target.long()
    valid = (t != ignore_index).unsqueeze(1)
    n_v = int(valid.sum())
    n_i = int((~valid).sum())
    onehot = F.one_hot(torch.where(t == ignore_index, 0, t), C).permute(0, 3, 1, 2).double()
    g = torch.zeros_like(z)
    if n_v:
        g_ce = (p - onehot) / n_v
        g_kld = (C * p - 1) / (C * C * n_v)
        g = g + torch.where(valid, g_ce + lambda_kld * g_kld, torch.zeros_like(z))
    if n_i:
        Hent = -(p * logp).sum(dim=1, keepdim=True)
        g_ent = -p * (logp + Hent) / (C * n_i)
        g = g + torch.where(~valid, lambda_ent * g_ent, torch.zeros_like(z))
    return g


def closed_form_grad(logits, target, *, lambda_kld, lambda_ent, align_corners):
    """Closed-form gradient w.r.t. the low-resolution logits: the full-resolution formula
    back-projected through the adjoint of F.interpolate (float64)."""
    H, W = target.shape[1:]
    x = logits.detach().double().requires_grad_(True)
    if tuple(x.shape[2:]) == (H, W):
        return closed_form_grad_full(x.detach(), target, lambda_kld=lambda_kld, lambda_ent=lambda_ent)
    z = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=align_corners)
    g_full = closed_form_grad_full(z.detach(), target, lambda_kld=lambda_kld, lambda_ent=lambda_ent)
    (gx,) = torch.autograd.grad((z * g_full).sum(), x)
    return gx


# ----------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------

# (B, C, h, w, H, W)
SHAPES = [
    (2, 5, 6, 7, 6, 7),        # no upsample
    (2, 4, 3, 4, 7, 9),        # upsample
    (1, 3, 5, 7, 17, 23),      # size not a multiple of the input
    (2, 2, 4, 4, 6, 5),        # C = 2, anisotropic
    (1, 150, 3, 4, 5, 6),      # C = 150
    (1, 3, 1, 1, 1, 1),        # one pixel
    (2, 3, 1, 1, 3, 4),        # one-pixel input upsampled
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.uint8], ids=["int64", "uint8"])
def test_values_fp32(shape, align_corners, target_dtype):
    B, C, h, w, H, W = shape
    logits, target = make_inputs(B, C, h, w, H, W, seed=sum(shape), target_dtype=target_dtype,
                                 ignore_frac=0.0 if H * W == 1 else 0.3)
    lk, le = 0.25, 1.5
    out = region_loss(logits, target, lambda_kld=lk, lambda_ent=le, align_corners=align_corners,
                      return_parts=True)
    exp = expected_parts(logits, target, lambda_kld=lk, lambda_ent=le, align_corners=align_corners)
    for name, a, e in zip(("loss", "ce", "kld", "ent"), out, exp):
        assert a.dtype == torch.float32 and a.dim() == 0, f"{name}: {a.dtype} {tuple(a.shape)}"
        assert_close(a, e, rtol=1e-5, atol=1e-7, what=name)
    single = region_loss(logits, target, lambda_kld=lk, lambda_ent=le, align_corners=align_corners)
    assert torch.equal(single, out[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(2, 4, 3, 4, 7, 9), (2, 6, 5, 5, 5, 5)], ids=["up", "same"])
def test_values_low_precision(dtype, shape):
    B, C, h, w, H, W = shape
    logits, target = make_inputs(B, C, h, w, H, W, seed=7, dtype=dtype)
    assert logits.dtype == dtype
    out = region_loss(logits, target, return_parts=True)
    # the formula sees the same (rounded) logits; the reference computes in float32 from there
    exp = expected_parts(logits.double(), target)
    for name, a, e in zip(("loss", "ce", "kld", "ent"), out, exp):
        assert a.dtype == torch.float32 and a.dim() == 0
        assert_close(a, e, rtol=1e-2, what=f"{name} ({dtype})")
        # internally float32: much tighter than 1e-2 in practice (docs/ops.md §0.5)
        assert_close(a, e, rtol=1e-4, atol=1e-7, what=f"{name} ({dtype}, float32 internals)")


def test_default_lambdas():
    logits, target = make_inputs(2, 5, 4, 4, 8, 8, seed=3)
    out = region_loss(logits, target, return_parts=True)
    exp = expected_parts(logits, target, lambda_kld=0.1, lambda_ent=3.0)
    assert_close(out[0], exp[0], rtol=1e-5, what="loss with default lambdas")
    assert_close(out[0], out[1] + 0.1 * out[2] + 3.0 * out[3], rtol=1e-6, what="loss = combination")


@pytest.mark.parametrize("shape", [(2, 5, 6, 7, 6, 7), (2, 4, 3, 4, 7, 9)], ids=["same", "up"])
@pytest.mark.parametrize("align_corners", [True, False])
def test_lambdas_zero_equals_cross_entropy(shape, align_corners):
    B, C, h, w, H, W = shape
    logits, target = make_inputs(B, C, h, w, H, W, seed=11, target_dtype=torch.uint8)
    loss = region_loss(logits, target, lambda_kld=0.0, lambda_ent=0.0, align_corners=align_corners)
    z = logits if (h, w) == (H, W) else F.interpolate(logits, size=(H, W), mode="bilinear",
                                                      align_corners=align_corners)
    ce = F.cross_entropy(z, target.long(), ignore_index=IGNORE)
    assert_close(loss, ce, rtol=1e-5, what="lambda=0 vs F.cross_entropy")


def test_size_argument_and_implicit_upsample():
    logits, target = make_inputs(2, 4, 3, 4, 7, 9, seed=5)
    a = region_loss(logits, target, return_parts=True)
    b = region_loss(logits, target, size=(7, 9), return_parts=True)
    c = region_loss(logits, target, size=torch.Size([7, 9]), return_parts=True)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)
    # align_corners matters when upsampling
    d = region_loss(logits, target, align_corners=False)
    assert not torch.allclose(a[0], d, rtol=1e-4, atol=0)


@pytest.mark.parametrize("align_corners", [True, False])
def test_same_size_is_identity(align_corners):
    # size given and equal to (h, w): upsampling to the same size is the identity
    logits, target = make_inputs(2, 4, 5, 6, 5, 6, seed=2)
    a = region_loss(logits, target, size=(5, 6), align_corners=align_corners)
    z = F.interpolate(logits, size=(5, 6), mode="bilinear", align_corners=align_corners)
    b = region_loss(z, target, align_corners=align_corners)
    assert_close(a, b, rtol=1e-6, what="same-size upsample")


def test_non_contiguous_logits():
    B, C, h, w, H, W = 2, 5, 4, 6, 9, 11
    g = torch.Generator().manual_seed(4)
    base = torch.randn(B, h, 2 * w, C, generator=g) * 3       # channels-last storage
    logits = base.permute(0, 3, 1, 2)[..., ::2]                # (B, C, h, w), strided view
    assert not logits.is_contiguous() and logits.shape == (B, C, h, w)
    _, target = make_inputs(B, C, h, w, H, W, seed=4)
    t_nc = target.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous target too
    out = region_loss(logits, t_nc, return_parts=True)
    ref = region_loss(logits.contiguous(), target, return_parts=True)
    exp = expected_parts(logits, target)
    for name, a, r, e in zip(("loss", "ce", "kld", "ent"), out, ref, exp):
        assert_close(a, r, rtol=1e-6, what=f"{name} strided vs contiguous")
        assert_close(a, e, rtol=1e-5, atol=1e-7, what=f"{name} strided vs formula")
    x = logits.detach().requires_grad_(True)
    region_loss(x, target).backward()
    assert_close(x.grad, closed_form_grad(logits, target, lambda_kld=0.1, lambda_ent=3.0,
                                          align_corners=True),
                 rtol=1e-4, atol=1e-5 * float(x.grad.abs().max()), what="strided grad")


# ----------------------------------------------------------------------------------------------
# empty parts
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 4, 5, 5, 5, 5), (2, 4, 3, 4, 7, 9), (1, 3, 1, 1, 3, 4)],
                         ids=["same", "up", "1px-up"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_all_ignored(shape, dtype):
    B, C, h, w, H, W = shape
    logits, _ = make_inputs(B, C, h, w, H, W, seed=8, dtype=dtype)
    target = torch.full((B, H, W), IGNORE, dtype=torch.uint8)
    x = logits.clone().requires_grad_(True)
    loss, ce, kld, ent = region_loss(x, target, return_parts=True)
    assert ce.item() == 0.0 and kld.item() == 0.0, (ce.item(), kld.item())
    assert ent.item() > 0
    exp = expected_parts(logits.double(), target)
    assert_close(ent, exp[3], rtol=1e-5, atol=1e-7, what="ent (all ignored)")
    assert_close(loss, 3.0 * exp[3], rtol=1e-5, atol=1e-7, what="loss (all ignored)")
    loss.backward()
    assert x.grad.dtype == dtype
    assert torch.isfinite(x.grad.float()).all()
    g = closed_form_grad(logits, target, lambda_kld=0.1, lambda_ent=3.0, align_corners=True)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert_close(x.grad, g, rtol=tol, atol=tol * float(g.abs().max()), what="grad (all ignored)")


@pytest.mark.parametrize("shape", [(2, 4, 5, 5, 5, 5), (2, 4, 3, 4, 7, 9), (1, 3, 1, 1, 1, 1)],
                         ids=["same", "up", "1px"])
def test_none_ignored(shape):
    B, C, h, w, H, W = shape
    logits, target = make_inputs(B, C, h, w, H, W, seed=9, ignore_frac=0.0)
    assert (target != IGNORE).all()
    x = logits.clone().requires_grad_(True)
    loss, ce, kld, ent = region_loss(x, target, return_parts=True)
    assert ent.item() == 0.0
    exp = expected_parts(logits, target)
    for name, a, e in zip(("loss", "ce", "kld"), (loss, ce, kld), exp):
        assert_close(a, e, rtol=1e-5, atol=1e-7, what=f"{name} (none ignored)")
    loss.backward()
    g = closed_form_grad(logits, target, lambda_kld=0.1, lambda_ent=3.0, align_corners=True)
    assert_close(x.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), what="grad (none ignored)")


def test_ignore_index_other_than_255():
    logits, target = make_inputs(2, 6, 4, 4, 4, 4, seed=12, ignore_frac=0.0)
    target[:, 0, :] = 3  # class 3 becomes "ignored"
    out = region_loss(logits, target, ignore_index=3, return_parts=True)
    exp = expected_parts(logits, target, ignore_index=3)
    for name, a, e in zip(("loss", "ce", "kld", "ent"), out, exp):
        assert_close(a, e, rtol=1e-5, atol=1e-7, what=f"{name} (ignore_index=3)")
    assert out[3].item() > 0


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(2, 5, 6, 7, 6, 7), (2, 4, 3, 4, 7, 9), (1, 3, 5, 7, 17, 23),
                                   (1, 150, 3, 4, 5, 6), (2, 2, 4, 4, 4, 4)],
                         ids=["same", "up", "up-odd", "C150", "C2"])
@pytest.mark.parametrize("align_corners", [True, False])
def test_grad_closed_form(dtype, shape, align_corners):
    B, C, h, w, H, W = shape
    logits, target = make_inputs(B, C, h, w, H, W, seed=13 + C, dtype=dtype)
    lk, le = 0.3, 2.0
    x = logits.clone().requires_grad_(True)
    region_loss(x, target, lambda_kld=lk, lambda_ent=le, align_corners=align_corners).backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    g = closed_form_grad(logits, target, lambda_kld=lk, lambda_ent=le, align_corners=align_corners)
    gmax = float(g.abs().max())
    if dtype == torch.float32:
        assert_close(x.grad, g, rtol=1e-4, atol=1e-5 * gmax, what="grad fp32")
    else:
        assert_close(x.grad, g, rtol=1e-2, atol=1e-2 * gmax, what=f"grad {dtype}")


@pytest.mark.parametrize("upsample", [False, True], ids=["same", "up"])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.4, 1.0], ids=["none", "some", "all"])
def test_gradcheck_float64(upsample, align_corners, ignore_frac):
    impl = _load_impl()
    B, C, h, w = 2, 3, 4, 5
    H, W = (7, 9) if upsample else (h, w)
    logits, target = make_inputs(B, C, h, w, H, W, seed=21, dtype=torch.float64, scale=1.0,
                                 ignore_frac=ignore_frac)
    x = logits.clone().requires_grad_(True)

    def fn(inp):
        return impl(inp, target, lambda_kld=0.3, lambda_ent=2.0, ignore_index=IGNORE,
                    align_corners=align_corners)

    out = fn(x)
    assert all(o.dtype == torch.float64 for o in out)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_impl_float64_matches_formula():
    impl = _load_impl()
    logits, target = make_inputs(2, 4, 3, 4, 7, 9, seed=22, dtype=torch.float64)
    out = impl(logits, target, lambda_kld=0.1, lambda_ent=3.0, ignore_index=IGNORE, align_corners=False)
    exp = expected_parts(logits, target, align_corners=False)
    for name, a, e in zip(("loss", "ce", "kld", "ent"), out, exp):
        # F.interpolate computes source coordinates in float32 even for float64 input
        assert_close(a, e, rtol=1e-6, atol=1e-12, what=f"{name} float64")


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

def _ok():
    return make_inputs(2, 4, 3, 3, 3, 3, seed=1)


@pytest.mark.parametrize("case, exc, match", [
    ("logits_rank", ValueError, r"logits.*\(B, C, h, w\)"),
    ("target_rank", ValueError, r"target.*\(B, H, W\)"),
    ("logits_dtype", TypeError, r"logits.*float32"),
    ("logits_int", TypeError, r"logits.*dtype"),
    ("target_dtype", TypeError, r"target.*uint8 or int64"),
    ("target_float", TypeError, r"target.*dtype"),
    ("logits_not_tensor", TypeError, r"logits.*torch.Tensor"),
    ("batch_mismatch", ValueError, r"target.*batch"),
    ("empty_batch", ValueError, r"logits.*empty batch"),
    ("C1", ValueError, r"logits.*C = 1"),
    ("C255", ValueError, r"logits.*C = 255"),
    ("label200", ValueError, r"target contains label 200 but logits have C=19 classes; "
                             r"valid labels are 0\.\.18 and 255 \(ignore\)"),
    ("label_equal_C", ValueError, r"target contains label 4 but logits have C=4 classes"),
    ("label_negative", ValueError, r"target contains label -1"),
    ("neg_lambda_kld", ValueError, r"lambda_kld.*>= 0.*-0.5"),
    ("neg_lambda_ent", ValueError, r"lambda_ent.*>= 0"),
    ("nan_lambda", ValueError, r"lambda_ent.*finite"),
    ("inf_lambda", ValueError, r"lambda_kld.*finite"),
    ("str_lambda", TypeError, r"lambda_kld"),
    ("ignore_index_range", ValueError, r"ignore_index.*\[0, 255\]"),
    ("ignore_index_type", TypeError, r"ignore_index"),
    ("size_mismatch", ValueError, r"size.*\(3, 3\).*\(4, 4\)"),
    ("size_len", ValueError, r"size.*pair"),
    ("size_type", TypeError, r"size"),
    ("align_corners_type", TypeError, r"align_corners"),
    ("empty_image", ValueError, r"target.*at least one pixel"),
])
def test_bad_input(case, exc, match, monkeypatch):
    monkeypatch.delenv("FASTST_CHECK", raising=False)
    logits, target = _ok()
    kw = {}
    if case == "logits_rank":
        logits = logits[0]
    elif case == "target_rank":
        target = target[:, None]
    elif case == "logits_dtype":
        logits = logits.double()
    elif case == "logits_int":
        logits = logits.long()
    elif case == "target_dtype":
        target = target.int()
    elif case == "target_float":
        target = target.float()
    elif case == "logits_not_tensor":
        logits = logits.tolist()
    elif case == "batch_mismatch":
        target = target[:1]
    elif case == "empty_batch":
        logits, target = logits[:0], target[:0]
    elif case == "C1":
        logits, target = logits[:, :1], torch.zeros_like(target)
    elif case == "C255":
        logits = torch.zeros(2, 255, 3, 3)
    elif case == "label200":
        logits = torch.zeros(2, 19, 3, 3)
        target = target.to(torch.uint8)
        target[1, 2, 1] = 200
    elif case == "label_equal_C":
        target[1, 0, 2] = 4
    elif case == "label_negative":
        target[0, 0, 0] = -1
    elif case == "neg_lambda_kld":
        kw["lambda_kld"] = -0.5
    elif case == "neg_lambda_ent":
        kw["lambda_ent"] = -1e-9
    elif case == "nan_lambda":
        kw["lambda_ent"] = float("nan")
    elif case == "inf_lambda":
        kw["lambda_kld"] = float("inf")
    elif case == "str_lambda":
        kw["lambda_kld"] = "0.1"
    elif case == "ignore_index_range":
        kw["ignore_index"] = 256
    elif case == "ignore_index_type":
        kw["ignore_index"] = 2.5
    elif case == "size_mismatch":
        kw["size"] = (4, 4)
    elif case == "size_len":
        kw["size"] = (3, 3, 3)
    elif case == "size_type":
        kw["size"] = 3
    elif case == "align_corners_type":
        kw["align_corners"] = "yes"
    elif case == "empty_image":
        target = target[:, :0]
    with pytest.raises(exc, match=match):
        region_loss(logits, target, **kw)


def test_fastst_check_env(monkeypatch):
    from fastst.ops._checks import check_loss_args as _check_region_loss_args

    logits = torch.zeros(2, 19, 3, 3)
    bad = torch.zeros(2, 3, 3, dtype=torch.uint8)
    bad[0, 1, 1] = 200
    good = bad.clone()
    good[0, 1, 1] = IGNORE

    monkeypatch.setenv("FASTST_CHECK", "1")
    with pytest.raises(ValueError, match="target contains label 200"):
        region_loss(logits, bad)
    with pytest.raises(ValueError, match="target contains label 200"):
        _check_region_loss_args(logits, bad, 0.1, 3.0, 255, None, True)

    monkeypatch.setenv("FASTST_CHECK", "0")
    # the value check is skipped (shape/dtype checks still run) ...
    _check_region_loss_args(logits, bad, 0.1, 3.0, 255, None, True)
    with pytest.raises(TypeError, match="target"):
        _check_region_loss_args(logits, bad.int(), 0.1, 3.0, 255, None, True)
    # ... and a valid target still works
    loss = region_loss(logits, good)
    exp = expected_parts(logits, good)[0]
    assert_close(loss, exp, rtol=1e-5, what="loss with FASTST_CHECK=0")
