"""The fused statistics pass (fastst::pixel_stats, C++ and its CUDA twin) against the reference."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastst.ops as ops
from fastst.ops import _backend, reference
from fastst.ops.ext.stats import pixel_stats
from fastst.ops.triton._exact_fma import fma_float32
from helpers import gen, mismatch, probs

pytestmark = pytest.mark.skipif(_backend.extension() is None, reason="fastst._C is not built")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _backend.extension().has_cuda else [])


def _stats(x, from_logits=False, size=None, align_corners=True):
    H, W = size if size is not None else x.shape[-2:]
    return pixel_stats(x, from_logits, H, W, align_corners)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 19, 17, 23), (1, 2, 1, 1), (3, 150, 5, 7), (1, 19, 97, 125)])
def test_probabilities_exact(device, dtype, shape):
    x = probs(*shape, seed=sum(shape)).to(dtype).to(device)
    m, a, counts, flags = _stats(x)
    want_m, want_a = reference.pixel_stats(x, from_logits=False, size=None, align_corners=True)
    assert torch.equal(m, want_m), mismatch(want_m, m)
    assert torch.equal(a.long(), want_a), mismatch(want_a, a)
    want_counts = torch.stack([torch.bincount(want_a[b].flatten(), minlength=shape[1]) for b in range(shape[0])])
    assert torch.equal(counts, want_counts)
    assert flags.item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_ties_take_lowest_index_and_flat_maps(device):
    x = torch.softmax(torch.randint(0, 2, (2, 6, 9, 41), generator=gen(1)).float(), 1).to(device)
    m, a, _, _ = _stats(x)
    assert torch.equal(a.long(), x.max(1).indices)  # torch documents: first maximal index
    flat = torch.full((1, 7, 3, 4), 1 / 7, device=device)
    m, a, counts, _ = _stats(flat)
    assert (a == 0).all() and counts[0, 0].item() == 12 and counts[0, 1:].sum().item() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    base = probs(2, 11, 13, 19, seed=2).to(device).permute(0, 3, 2, 1)  # (2, 19, 13, 11)
    assert not base.is_contiguous()
    m, a, _, _ = _stats(base)
    want_m, want_a = reference.pixel_stats(base, from_logits=False, size=None, align_corners=True)
    assert torch.equal(m, want_m) and torch.equal(a.long(), want_a)
    sliced = probs(2, 19, 20, 30, seed=3).to(device)[:, :, ::2, 1::3]
    m, a, _, _ = _stats(sliced)
    want_m, want_a = reference.pixel_stats(sliced, from_logits=False, size=None, align_corners=True)
    assert torch.equal(m, want_m) and torch.equal(a.long(), want_a)


def _assert_logit_stats_close(x, m, a, size, align_corners):
    """docs/ops.md §0: with from_logits the softmax may round differently; m agrees to 1e-6 and the
    argmax may differ only where the top-2 probabilities are within 1e-6."""
    xf = x.float()
    if size is not None:
        xf = F.interpolate(xf, size=size, mode="bilinear", align_corners=align_corners)
    p = torch.softmax(xf.double(), 1).float()
    top2 = p.topk(2, dim=1).values
    want_m, want_a = p.max(1)
    assert torch.allclose(m.cpu(), want_m.cpu(), rtol=0, atol=1e-6), mismatch(want_m, m)
    differs = a.long().cpu() != want_a.cpu()
    close = (top2[:, 0] - top2[:, 1]).cpu() < 1e-6
    assert not bool((differs & ~close).any()), mismatch(want_a, a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("in_size,size", [((5, 7), (17, 23)), ((8, 16), (64, 128)), ((1, 1), (3, 4)),
                                          ((6, 6), None), ((9, 9), (4, 5))])
def test_logits_softmax_and_upsample(device, dtype, align_corners, in_size, size):
    x = (torch.randn(2, 19, *in_size, generator=gen(4)) * 4).to(dtype).to(device)
    m, a, counts, flags = _stats(x, from_logits=True, size=size, align_corners=align_corners)
    H, W = size if size is not None else in_size
    assert m.shape == (2, H, W) and a.dtype == torch.uint8 and flags.item() == 0
    _assert_logit_stats_close(x, m, a, size, align_corners)
    assert counts.sum().item() == 2 * H * W


@pytest.mark.parametrize("device", DEVICES)
def test_flags_nan_and_range(device):
    x = probs(1, 4, 3, 3).to(device)
    x[0, 2, 1, 1] = float("nan")
    assert _stats(x)[3].item() == 3  # non-finite, and outside [0, 1]
    x[0, 2, 1, 1] = float("inf")
    assert _stats(x)[3].item() == 3
    y = probs(1, 4, 3, 3).to(device) * 1.5
    assert _stats(y)[3].item() == 2
    assert _stats(y, from_logits=True)[3].item() == 0
    z = torch.randn(1, 4, 3, 3, device=device)
    z[0, 0, 0, 0] = float("-inf")
    assert _stats(z, from_logits=True)[3].item() & 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("column", [0, 7, 8, 15, 16, 255, 256, 299])  # vector lanes, blocks, tiles, tail
@pytest.mark.parametrize("channel", [0, 5, 18])
def test_flags_at_every_lane_of_the_vector_kernel(device, column, channel):
    """The probability screen (one unsigned compare of the bits per value) runs 32 pixels at a
    time in sweeps of a few channels, with a scalar tail; a bad value anywhere sets the exact
    flags, and -0.0 (which fails the screen) is a valid probability that reads as +0.0."""
    base = probs(1, 19, 2, 300, seed=column + channel).to(device)
    for value, want in ((float("nan"), 3), (float("inf"), 3), (-1e-7, 2), (1.0000001, 2), (1.0, 0), (0.0, 0)):
        x = base.clone()
        x[0, channel, 1, column] = value
        assert _stats(x)[3].item() == want, (value, column, channel)
    x = base.clone()
    x[0, :, 1, column] = -0.0  # every channel -0.0: the max is +0.0 at class 0
    m, a, _, flags = _stats(x)
    want_m, want_a = reference.pixel_stats(x, from_logits=False, size=None, align_corners=True)
    assert flags.item() == 0
    assert torch.equal(m, want_m) and torch.equal(a.long(), want_a)
    assert m[0, 1, column].item() == 0.0 and str(m[0, 1, column].item()) == "0.0"
    assert a[0, 1, column].item() == 0


@pytest.mark.parametrize("size", [None, (2, 600)])
@pytest.mark.parametrize("column", [0, 7, 8, 31, 32, 255, 256, 299])  # vector lanes, steps, tiles, tail
@pytest.mark.parametrize("channel", [0, 5, 18])
def test_logit_flags_at_every_lane(column, channel, size):
    """Logits are screened by the largest magnitude bits (sign masked off): NaN and +-Inf at any
    lane, channel or tail raise the non-finite flag, huge finite values of either sign do not."""
    base = torch.randn(1, 19, 2, 300, generator=gen(column + channel))
    for value, want in ((float("nan"), 1), (float("inf"), 1), (float("-inf"), 1), (3e38, 0), (-3e38, 0)):
        x = base.clone()
        x[0, channel, 1, column] = value
        assert _stats(x, from_logits=True, size=size)[3].item() == want, (value, column, channel)


EXP2_SIXTEENTHS = (2.0 ** (np.arange(16) / 16.0)).astype(np.float32)


def _exp_nonpositive_formula(x):
    """kernels/stats.h's exp for float32 x <= 0 written plainly in NumPy (float32 operations,
    each FMA rounded once): k = round(16 x / ln 2) through the 1.5 * 2^23 shift,
    Cody-Waite r, T[k & 15] * (1 + r + r^2 (1/2 + r/6)), 2^(k >> 4) added to the exponent bits,
    0 where x <= -87 or NaN."""
    f = np.float32
    in_range = x > f(-87.0)
    with np.errstate(all="ignore"):  # x <= -87, -inf and NaN compute junk, then masked to 0
        shifted = fma_float32(x, f(23.083120346069336), f(12582912.0))
        k = shifted - f(12582912.0)
        r = fma_float32(k, f(1.1904088825787085e-10), fma_float32(k, f(-0.043321698904037476), x))
        k_bits = shifted.view(np.uint32)
        t = EXP2_SIXTEENTHS[k_bits & 15]
        em1 = fma_float32(r * r, fma_float32(r, f(1.0 / 6.0), f(0.5)), r)
        e = fma_float32(t, em1, t)
        exponent = (k_bits << np.uint32(19)) & np.uint32(0xFF800000)
        return np.where(in_range, (e.view(np.uint32) + exponent).view(np.float32), f(0.0))


def test_exact_fma_rounds_once():
    """fma_float32 (also what Triton's interpreter gets where its fma rounds twice) against exact
    rational arithmetic, on random operands and on operands built so that
    the float64 sum lands exactly halfway between two float32 values (where rounding twice errs)."""
    from fractions import Fraction
    rng = np.random.default_rng(1)
    a = rng.standard_normal(300).astype(np.float32)
    b = rng.standard_normal(300).astype(np.float32)
    c = rng.standard_normal(300).astype(np.float32)
    # a * b + c = (1 + 2^-23) + 2^-24 - 2^-70: float64 rounds it to the midpoint between 1 + 2^-23
    # and 1 + 2^-22, whence ties-to-even would go up; the exact value is below: 1 + 2^-23
    # (and the same negated)
    a = np.append(a, np.float32([2 ** -12 * (1 + 2 ** -23), -2 ** -12 * (1 + 2 ** -23)]))
    b = np.append(b, np.float32([2 ** -12 * (1 - 2 ** -23)] * 2))
    c = np.append(c, np.float32([1 + 2 ** -23, -(1 + 2 ** -23)]))
    got = fma_float32(a, b, c)
    assert got[-2] == np.float32(1 + 2 ** -23) and got[-1] == -np.float32(1 + 2 ** -23)
    assert (a.astype(np.float32) * b + c)[-2] != got[-2]  # what rounding twice gives
    for ai, bi, ci, gi in zip(a, b, c, got):
        exact = Fraction(float(ai)) * Fraction(float(bi)) + Fraction(float(ci))
        below = np.float32(float(exact))
        candidates = [below, np.nextafter(below, np.float32(np.inf)), np.nextafter(below, np.float32(-np.inf))]
        best = min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(v.view(np.uint32)) & 1))
        assert gi.view(np.uint32) == best.view(np.uint32), (ai, bi, ci, gi, best)


def _exp_arguments():
    """2M float32 arguments x <= 0: random bit patterns of every negative float, a dense sweep of
    [-90, 0], the neighbours of -87 (exp is 0 at or below it), -0.0, -inf and NaN."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0x80000000, 0xFF800001, size=1_000_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0.0, -0.0, -np.inf, np.nan, -87.0, np.nextafter(-87.0, 0, dtype=np.float32),
                        np.nextafter(-87.0, -1, dtype=np.float32), -1e-45, -1e-38, -0.34657359, -0.6931472],
                       dtype=np.float32)
    return np.concatenate([special, patterns.view(np.float32), np.linspace(-90, 0, 1_000_000, dtype=np.float32)])


def test_exp_of_the_pass_equals_its_formula_bit_for_bit():
    """The vector exp of the statistics pass (permuted table, bit tricks for 2^k and the zero mask)
    equals the plain float32 formula on 2M arguments, and is within 1.1 ulp of exp."""
    x = _exp_arguments()
    out = np.empty_like(x)
    _backend.extension().exp_nonpositive_cpu(x.ctypes.data, x.size, out.ctypes.data)
    want = _exp_nonpositive_formula(x)
    differ = out.view(np.uint32) != want.view(np.uint32)
    assert not differ.any(), f"{int(differ.sum())} differ, first at x = {x[differ][0]!r}"
    assert out[0] == 1.0 and out[1] == 1.0 and out[2] == 0.0 and out[3] == 0.0 and out[4] == 0.0
    normal = (x > -87.0) & (x <= 0.0)
    exact = np.exp(x[normal].astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert (np.abs(out[normal].astype(np.float64) - exact) / ulp).max() <= 1.1


@pytest.mark.parametrize("env", ["FASTST_NO_AVX512", "FASTST_PORTABLE_CPU"])
def test_exp_on_every_cpu_path_equals_the_default(tmp_path, env):
    """The AVX2 kernel (FASTST_NO_AVX512=1) and the scalar formula (FASTST_PORTABLE_CPU=1) give the
    default kernel's bits (AVX-512 where the CPU has it) on the same 2M arguments."""
    x = _exp_arguments()
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np; from fastst.ops import _backend; x = np.load(sys.argv[1]); "
              "out = np.empty_like(x); _backend.extension().exp_nonpositive_cpu(x.ctypes.data, x.size, "
              "out.ctypes.data); np.save(sys.argv[2], out)")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.npy"), str(tmp_path / "out.npy")], check=True,
                   env=dict(os.environ, **{env: "1"}))
    want = np.empty_like(x)
    _backend.extension().exp_nonpositive_cpu(x.ctypes.data, x.size, want.ctypes.data)
    assert np.array_equal(np.load(tmp_path / "out.npy").view(np.uint32), want.view(np.uint32))


def _tiny_and_tied_probabilities():
    """(2, 5, 40, 41) values in [0, 1], not normalised: per pixel scaled by 10^-u, u in [0, 9),
    so m takes float16 normal, subnormal and zero patterns (the official histograms' slots),
    with some exact zeros and ties."""
    x = probs(2, 5, 40, 41, seed=9) * 10.0 ** -(torch.rand(2, 1, 40, 41, generator=gen(10)) * 9)
    x[0, :, 3] = 0.0
    x[1, 1:3, 5] = 0.25
    return x


@pytest.mark.parametrize("env", ["FASTST_PORTABLE_CPU", "FASTST_NO_AVX512"])
def test_other_cpu_paths_match_the_default_kernels(tmp_path, env):
    """FASTST_PORTABLE_CPU=1 (read once per process) takes the loops used where AVX2/FMA/F16C are
    missing, FASTST_NO_AVX512=1 the AVX2 kernels (the exp sum has an AVX-512 one): the same
    statistics (maps, counts, flags) from probabilities and from logits (as they are, upsampled
    about 2x and 8x: the permuted-window horizontal lerp, the exp sum), and the same IAS labels
    and thresholds in both modes (the official histogram slots come from F16C conversions
    otherwise)."""
    x = probs(2, 19, 3, 45, seed=3)
    x[0, 4, 1, 20] = float("nan")
    x[1, :, 2, 33] = -0.0
    y = _tiny_and_tied_probabilities()
    z = torch.randn(2, 19, 5, 41, generator=gen(11)) * 3
    z[1, 7, 2, 40] = float("inf")
    torch.save((x, y, z), tmp_path / "in.pt")
    script = ("import sys, torch; import fastst.ops as ops; from fastst.ops.ext.stats import pixel_stats; "
              "x, y, z = torch.load(sys.argv[1]); "
              "ias = [ops.ias_pseudo_label(y, None, alpha=0.3, mode=mode, backend='cpp') "
              "for mode in ('official', 'paper')]; "
              "logit_stats = [pixel_stats(z, True, 5, 41, True), pixel_stats(z, True, 9, 83, False), "
              "pixel_stats(z, True, 40, 328, True)]; "
              "torch.save((pixel_stats(x, False, 3, 45, True), ias, logit_stats), sys.argv[2])")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], check=True,
                   env=dict(os.environ, **{env: "1"}))
    portable_stats, portable_ias, portable_logit_stats = torch.load(tmp_path / "out.pt")
    for got, want in zip(portable_stats, _stats(x)):
        assert torch.equal(got, want)
    assert portable_stats[3].item() == 3
    for portable, size, align_corners in zip(portable_logit_stats, ((5, 41), (9, 83), (40, 328)),
                                             (True, False, True)):
        vector = _stats(z, from_logits=True, size=size, align_corners=align_corners)
        for got, want in zip(portable, vector):
            assert torch.equal(got, want)
        assert portable[3].item() == 1
    for mode, got in zip(("official", "paper"), portable_ias):
        want = reference.ias_pseudo_label(y, None, alpha=0.3, mode=mode)
        vector = ops.ias_pseudo_label(y, None, alpha=0.3, mode=mode, backend="cpp")
        for w, g, v in zip(want, got, vector):
            assert torch.equal(w, g), mismatch(w, g)
            assert torch.equal(w, v), mismatch(w, v)


def test_official_slots_ignore_flush_denormal():
    """torch.set_flush_denormal(True) sets FTZ/DAZ on this thread, which runs part of the
    OpenMP loops: the float16 rounding of m (subnormal results included) must not change."""
    y = _tiny_and_tied_probabilities()
    want = reference.ias_pseudo_label(y, None, alpha=0.3, mode="official")
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        got = ops.ias_pseudo_label(y, None, alpha=0.3, mode="official", backend="cpp")
    finally:
        torch.set_flush_denormal(False)
    for w, g in zip(want, got):
        assert torch.equal(w, g), mismatch(w, g)


@pytest.mark.parametrize("shape", [(2, 19, 70, 125), (1, 150, 91, 91)])
def test_ties_across_channel_sweeps_and_flat_tiles(shape):
    """Contiguous float32 probabilities go through flat tiles of 8,192 pixels (a last short
    one with a scalar tail) and sweeps of a few channels; ties between channels of different
    sweeps still take the lowest index."""
    x = torch.softmax(torch.randint(0, 2, shape, generator=gen(6)).float(), 1)
    m, a, counts, flags = _stats(x)
    want_m, want_a = x.max(1)
    assert torch.equal(a.long(), want_a) and torch.equal(m, want_m) and flags.item() == 0
    want_counts = torch.stack([torch.bincount(want_a[b].flatten(), minlength=shape[1]) for b in range(shape[0])])
    assert torch.equal(counts, want_counts)


def _stats_ops():
    """(op, device) pairs: the C++/CUDA op, and the Triton op where Triton can run."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ops = [pytest.param(pixel_stats, "cpu", id="cpp")]
    if "triton" in _backend.available_backends():
        from fastst.ops.triton.stats import pixel_stats_triton
        ops.append(pytest.param(pixel_stats_triton, device, id="triton"))
    return ops


@pytest.mark.parametrize("op,device", _stats_ops())
def test_opcheck(op, device):
    x = probs(2, 5, 3, 4).to(device)
    torch.library.opcheck(op, (x, False, 3, 4, True))
    torch.library.opcheck(op, (x.to(torch.bfloat16), True, 5, 7, False))


@pytest.mark.parametrize("op,device", _stats_ops())
def test_torch_compile_fullgraph(op, device):
    def f(x):
        m, a, counts, _ = op(x, True, 12, 14, True)
        return m * 2, a, counts.sum(1)

    x = torch.randn(2, 5, 6, 7, generator=gen(5)).to(device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x), f(x)):
        assert torch.equal(got, want)
