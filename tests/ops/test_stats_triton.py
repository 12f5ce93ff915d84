"""The Triton statistics pass (fastst::pixel_stats_triton) against the reference and the C++ op.

Without a CUDA device the kernel runs in Triton's interpreter (numpy, one program at a time), so
shapes here are tiny. TRITON_INTERPRET must be set before triton is first imported, hence at the
top of this module; it stays set for the rest of the session (Triton reads it when a kernel is
decorated, and fastst's backend choice reads it to allow "triton" on CPU tensors).
"""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("triton not installed (pip install triton)", allow_module_level=True)

from fastst.ops import _backend, reference  # noqa: E402
from fastst.ops.triton.stats import INTERPRETED, pixel_stats_triton  # noqa: E402
from helpers import gen, mismatch, probs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not INTERPRETED:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton kernels cannot run",
                allow_module_level=True)

EXT = _backend.extension()


def _stats(x, from_logits=False, size=None, align_corners=True):
    H, W = size if size is not None else x.shape[-2:]
    return pixel_stats_triton(x, from_logits, H, W, align_corners)


def _cpp_stats(x, from_logits=False, size=None, align_corners=True):
    """fastst::pixel_stats (C++/CUDA) on the same input, on CPU results; None when not built."""
    if EXT is None:
        return None
    from fastst.ops.ext.stats import pixel_stats
    if x.is_cuda and not EXT.has_cuda:
        x = x.cpu()
    H, W = size if size is not None else x.shape[-2:]
    return tuple(t.cpu() for t in pixel_stats(x, from_logits, H, W, align_corners))


def _counts_of(a, C):
    a = a.long().cpu()
    return torch.stack([torch.bincount(a[b].flatten(), minlength=C) for b in range(a.shape[0])])


def _assert_same_as_cpp(x, got, from_logits=False, size=None, align_corners=True):
    want = _cpp_stats(x, from_logits, size, align_corners)
    if want is None:
        return
    for name, g, w in zip(("m", "a", "counts", "flags"), got, want):
        assert torch.equal(g.cpu(), w), (f"{name} differs from fastst::pixel_stats (did the arithmetic "
                                         f"of csrc/fastst/kernels/stats.h change?): " + mismatch(w, g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 2, 1, 1), (1, 150, 3, 4)])
def test_probabilities_exact(dtype, shape):
    x = probs(*shape, seed=sum(shape)).to(dtype).to(DEVICE)
    m, a, counts, flags = got = _stats(x)
    dtypes = (m.dtype, a.dtype, counts.dtype, flags.dtype)
    assert dtypes == (torch.float32, torch.uint8, torch.int64, torch.int32)
    assert m.shape == a.shape == (shape[0],) + shape[2:] and counts.shape == shape[:2] and flags.shape == (1,)
    want_m, want_a = reference.pixel_stats(x, from_logits=False, size=None, align_corners=True)
    assert torch.equal(m, want_m), mismatch(want_m, m)
    assert torch.equal(a.long(), want_a), mismatch(want_a, a)
    assert torch.equal(counts.cpu(), _counts_of(want_a, shape[1]))
    assert flags.item() == 0
    _assert_same_as_cpp(x, got)


@pytest.mark.parametrize("layout", ["permuted", "sliced", "channels_last"])
def test_non_contiguous_input(layout):
    if layout == "permuted":
        x = probs(2, 7, 5, 6, seed=2).to(DEVICE).permute(0, 3, 2, 1)  # (2, 6, 5, 7)
    elif layout == "sliced":
        x = probs(2, 6, 10, 12, seed=3).to(DEVICE)[:, :, ::2, 1::3]  # (2, 6, 5, 4)
    else:
        x = probs(2, 6, 5, 7, seed=4).to(DEVICE).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    got = _stats(x)
    want_m, want_a = reference.pixel_stats(x, from_logits=False, size=None, align_corners=True)
    assert torch.equal(got[0], want_m), mismatch(want_m, got[0])
    assert torch.equal(got[1].long(), want_a), mismatch(want_a, got[1])
    assert torch.equal(got[2].cpu(), _counts_of(want_a, x.shape[1]))
    _assert_same_as_cpp(x, got)


def test_several_programs_and_images():
    """More pixels than one block (1024) and several images: the counts' atomics add up."""
    x = probs(3, 3, 37, 41, seed=5).to(DEVICE)
    got = _stats(x)
    want_m, want_a = reference.pixel_stats(x, from_logits=False, size=None, align_corners=True)
    assert torch.equal(got[0], want_m) and torch.equal(got[1].long(), want_a)
    assert torch.equal(got[2].cpu(), _counts_of(want_a, 3))
    assert got[2].sum().item() == 3 * 37 * 41


def test_ties_take_lowest_index_and_flat_maps():
    x = torch.softmax(torch.randint(0, 2, (2, 6, 5, 5), generator=gen(1)).float(), 1).to(DEVICE)
    _, a, _, _ = _stats(x)
    assert torch.equal(a.long(), x.max(1).indices)  # torch documents: first maximal index
    flat = torch.full((1, 7, 3, 4), 1 / 7, device=DEVICE)
    m, a, counts, _ = _stats(flat)
    assert (a == 0).all() and counts[0, 0].item() == 12 and counts[0, 1:].sum().item() == 0
    # Equal logits: every class ties, the softmax is uniform, class 0 wins.
    m, a, counts, _ = _stats(torch.zeros(1, 4, 2, 3, device=DEVICE), from_logits=True, size=(3, 5))
    assert (a == 0).all() and torch.equal(m, torch.full_like(m, 0.25))


def test_zero_maximum_is_positive_zero():
    x = torch.full((1, 3, 2, 2), -0.0, device=DEVICE)
    m, _, _, _ = _stats(x)
    assert torch.equal(m.view(torch.int32), torch.zeros_like(m).view(torch.int32))


def _assert_logit_stats_close(x, m, a, size, align_corners):
    """docs/ops.md §0: with from_logits the softmax may round differently; m agrees to 1e-6 with the
    float64 softmax and the argmax may differ only where the top-2 probabilities are within 1e-6."""
    xf = x.float().cpu()
    if size is not None:
        xf = F.interpolate(xf, size=size, mode="bilinear", align_corners=align_corners)
    p = torch.softmax(xf.double(), 1)
    top2 = p.topk(2, dim=1).values
    want_m, want_a = p.max(1)
    assert torch.allclose(m.cpu().double(), want_m, rtol=0, atol=1e-6), mismatch(want_m, m)
    differs = a.long().cpu() != want_a
    close = (top2[:, 0] - top2[:, 1]) < 1e-6
    assert not bool((differs & ~close).any()), mismatch(want_a, a)


def test_exp_arguments_swept_match_cpp_bit_for_bit():
    """C = 2 logits (0, t): m = 1 / (1 + exp(t)) for 8,192 arguments t from -100 to 0 (the clamp
    at -87 and its neighbours, -0.0, tiny ones, integers and halves of ln 2): Triton's m equals
    the C++ pass's bit for bit (whose exp, written with a permuted table and bit tricks for the
    CPU's vector units, is checked against its formula in test_stats.py); this also checks
    that the Triton table EXP2_SIXTEENTHS holds the C++ table's values."""
    sweep = -torch.rand(8192 - 32, generator=gen(12), dtype=torch.float64) * 100
    special = torch.tensor([0.0, -0.0, -1e-30, -1e-7, -87.0, -86.99999, -87.00001, -88.0, -103.0, -0.5,
                            -0.34657359, -0.6931472, -1.0, -2.0, -10.0, -20.0, -40.0, -60.0, -80.0, -86.5,
                            -2 ** -20, -3.5, -17.328679, -17.5, -50.5, -64.0, -70.0, -75.0, -84.0, -85.0,
                            -86.0, -86.9], dtype=torch.float64)
    t = torch.cat([special, sweep]).float().reshape(1, 1, 64, 128)
    x = torch.cat([torch.zeros_like(t), t], 1).to(DEVICE)
    got = _stats(x, from_logits=True)
    want_m = (1 / (1 + t.double().exp())).float().reshape(1, 64, 128)
    assert torch.allclose(got[0].cpu(), want_m, rtol=0, atol=1e-6), mismatch(want_m, got[0])
    _assert_same_as_cpp(x, got, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("in_size,size", [((3, 4), (7, 9)), ((5, 7), (11, 13)), ((5, 7), None),
                                          ((1, 1), (3, 4)), ((9, 9), (4, 5))])
def test_logits_softmax_and_upsample(dtype, align_corners, in_size, size):
    x = (torch.randn(2, 19, *in_size, generator=gen(4)) * 4).to(dtype).to(DEVICE)
    m, a, counts, flags = got = _stats(x, from_logits=True, size=size, align_corners=align_corners)
    H, W = size if size is not None else in_size
    assert m.shape == (2, H, W) and a.dtype == torch.uint8 and flags.item() == 0
    _assert_logit_stats_close(x, m, a, size, align_corners)
    assert torch.equal(counts.cpu(), _counts_of(a, 19))
    # Same taps, same exp (table, cubic, explicit FMAs), same summation order: the C++ twin's bits.
    _assert_same_as_cpp(x, got, True, size, align_corners)


@pytest.mark.parametrize("scale", [0.01, 30.0, 300.0])
def test_logits_extreme_ranges(scale):
    """Nearly flat and very peaked logits (exp arguments below -87 flush to 0), C = 150."""
    x = (torch.randn(1, 150, 3, 4, generator=gen(9)) * scale).to(DEVICE)
    got = _stats(x, from_logits=True, size=(5, 6), align_corners=False)
    _assert_logit_stats_close(x, got[0], got[1], (5, 6), False)
    _assert_same_as_cpp(x, got, True, (5, 6), False)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("in_size,size", [((3, 4), (7, 9)), ((5, 7), (11, 13)), ((9, 9), (4, 5))])
def test_resize_taps_match_cpp_bit_for_bit(align_corners, in_size, size):
    """Upsampled probabilities involve no exp: the interpolated max must equal the C++ op's bits
    (same float32 taps, no FMA) and F.interpolate's values to rounding."""
    x = probs(2, 5, *in_size, seed=6).to(DEVICE)
    got = _stats(x, size=size, align_corners=align_corners)
    want_m, want_a = F.interpolate(x.cpu(), size=size, mode="bilinear", align_corners=align_corners).max(1)
    assert torch.allclose(got[0].cpu(), want_m, rtol=0, atol=1e-6), mismatch(want_m, got[0])
    _assert_same_as_cpp(x, got, size=size, align_corners=align_corners)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaN/Inf
def test_flags_nan_inf_and_range():
    x = probs(1, 4, 3, 3).to(DEVICE)
    x[0, 2, 1, 1] = float("nan")
    assert _stats(x)[3].item() == 3  # NaN is non-finite and not in [0, 1]
    y = probs(1, 4, 3, 3).to(DEVICE) * 1.5
    assert _stats(y)[3].item() == 2
    assert _stats(y, from_logits=True)[3].item() == 0
    neg = probs(1, 4, 3, 3).to(DEVICE)
    neg[0, 0, 2, 2] = -0.25
    assert _stats(neg)[3].item() == 2
    z = torch.randn(1, 4, 3, 3, generator=gen(7)).to(DEVICE)
    z[0, 0, 0, 0] = float("-inf")
    assert _stats(z, from_logits=True)[3].item() == 1
    z = torch.randn(1, 4, 3, 3, generator=gen(8)).to(torch.bfloat16).to(DEVICE)
    z[0, 3, 2, 1] = float("inf")
    assert _stats(z, from_logits=True, size=(5, 6))[3].item() == 1


def test_interpreter_fma_made_exact_where_it_rounds_twice(monkeypatch):
    """Older interpreters compute tl.fma on float32 as x * y + z (two roundings); _exact_fma.install
    detects that on its probe and replaces it, and leaves an exact one alone."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    from fastst.ops.triton import _exact_fma
    builder = interpreter.InterpreterBuilder

    def rounds_twice(self, x, y, z):
        return interpreter.TensorHandle(x.data * y.data + z.data, z.dtype.scalar)

    monkeypatch.setattr(builder, "create_fma", rounds_twice)
    operands = [interpreter.TensorHandle(np.array([v], np.float32), tl.float32) for v in _exact_fma._PROBE]
    assert builder.create_fma(None, *operands).data[0] != _exact_fma._PROBE[2]
    assert _exact_fma.install()
    assert builder.create_fma(None, *operands).data[0] == _exact_fma._PROBE[2]
    assert not _exact_fma.install()  # now exact: nothing to do


def test_exp_table_is_made_once_per_device(monkeypatch):
    """The kernel's exp table (stats.h::kExp2Sixteenths) is a device tensor made on the first
    call per device and cached: a copy from the host on every call would be a blocking transfer
    (and break CUDA graph capture); issue 23 item 2."""
    from fastst.ops.triton import stats

    monkeypatch.setattr(stats, "_EXP_TABLES", {})
    x = torch.randn(1, 4, 5, 6, generator=gen(7)).to(DEVICE)
    want = _stats(x, from_logits=True)
    table = stats._EXP_TABLES[x.device]
    assert torch.equal(table.cpu(), torch.from_numpy(stats.EXP2_SIXTEENTHS))

    def no_host_copy(*args, **kwargs):
        raise AssertionError("the statistics pass made its exp table again")

    monkeypatch.setattr(torch, "from_numpy", no_host_copy)
    got = _stats(x, from_logits=True)
    assert stats._EXP_TABLES[x.device] is table
    assert all(torch.equal(g, w) for g, w in zip(got, want))
