"""TPLD operators (docs/ops.md §6): the reference against loop transcriptions of docs/ops.md, every backend
against the reference (labels exactly, floats to 1e-5), hand-built cases for the rules that
random data rarely hits (k1/k2 ties, equal scores, no labelled neighbours, the border), the
bootstrapping loss against its closed-form value and gradient, bad input, opcheck and
torch.compile. Triton runs in its interpreter without a GPU, on tiny maps."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastst.ops as ops
from fastst.ops import _backend, reference
from fastst.ops.ext.tpld import image_confidence_cpp, tpld_vote_cpp
from helpers import gen, mismatch, probs

import _tpld_transcriptions as loops

GPU = torch.cuda.is_available()
FAST = [b for b in ops.available_backends() if b in ("cpp", "triton")]


def _device(backend):
    return "cuda" if backend == "triton" and GPU else "cpu"


def _lambdas(C, seed, low=0.35, high=0.95):
    return torch.rand(C, generator=gen(seed)) * (high - low) + low


# ---------------------------------------------------------------------------- voting
VOTE_CASES = [  # (B, C, H, W, window, weight, iterations, sharpness)
    (2, 19, 9, 11, 7, 0.7, 3, 3.0),
    (1, 19, 8, 7, 7, 0.7, 1, 3.0),
    (2, 2, 7, 9, 3, 0.7, 3, 1.5),
    (1, 2, 6, 6, 5, 0.5, 1, 1.0),
    (1, 5, 1, 13, 9, 0.7, 3, 2.0),   # one row: every window is clipped
    (1, 4, 5, 4, 11, 0.8, 3, 2.0),   # window larger than the image
    (2, 3, 6, 5, 1, 0.7, 2, 2.0),    # window 1: no neighbour at all
    (1, 19, 6, 8, 7, 0.7, 0, 3.0),
]


@pytest.mark.parametrize("case", VOTE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_vote_reference_equals_loop_transcription(case):
    B, C, H, W, window, weight, iterations, sharpness = case
    p = probs(B, C, H, W, seed=sum(case[:4]), sharpness=sharpness)
    lam = _lambdas(C, seed=C)
    want = loops.vote_loop(p.numpy(), lam.numpy(), window, weight, iterations)
    got = reference.tpld_vote(p, lam, window=window, weight=weight, iterations=iterations)
    assert torch.equal(got, torch.from_numpy(want)), mismatch(torch.from_numpy(want), got)
    # voting only adds labels to the confident map, and the cases do exercise it
    confident = reference.cbst_pseudo_label(p, lam)
    assert bool(((confident == 255) | (got == confident)).all())


def test_vote_cases_are_not_trivial():
    """The parametrised cases above label pixels by voting and leave some unlabelled."""
    B, C, H, W, window, weight, iterations, sharpness = VOTE_CASES[0]
    p = probs(B, C, H, W, seed=sum(VOTE_CASES[0][:4]), sharpness=sharpness)
    lam = _lambdas(C, seed=C)
    confident = reference.tpld_vote(p, lam, iterations=0)
    one = reference.tpld_vote(p, lam, iterations=1)
    three = reference.tpld_vote(p, lam, iterations=3)
    n0, n1, n3 = [(x != 255).sum().item() for x in (confident, one, three)]
    assert n0 < n1 <= n3 < B * H * W


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", VOTE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_vote_backend_equals_reference(backend, case):
    B, C, H, W, window, weight, iterations, sharpness = case
    p = probs(B, C, H, W, seed=sum(case[:4]), sharpness=sharpness)
    lam = _lambdas(C, seed=C)
    want = reference.tpld_vote(p, lam, window=window, weight=weight, iterations=iterations)
    d = _device(backend)
    got = ops.tpld_vote(p.to(d), lam.to(d), window=window, weight=weight, iterations=iterations, backend=backend)
    assert torch.equal(got.cpu(), want), mismatch(want, got)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vote_low_precision_and_strided_input(backend, dtype):
    p = probs(2, 19, 10, 12, seed=5, dtype=dtype)
    lam = _lambdas(19, seed=6)
    want = reference.tpld_vote(p, lam)
    d = _device(backend)
    for x in (p, p.contiguous(memory_format=torch.channels_last), p.transpose(2, 3).contiguous().transpose(2, 3)):
        got = ops.tpld_vote(x.to(d), lam.to(d), backend=backend)
        assert torch.equal(got.cpu(), want), mismatch(want, got)


def test_vote_cpp_larger_map_equals_reference():
    p = probs(2, 19, 64, 96, seed=7, sharpness=2.5)
    lam = _lambdas(19, seed=8)
    want = reference.tpld_vote(p, lam)
    got = ops.tpld_vote(p, lam, backend="cpp")
    assert torch.equal(got, want), mismatch(want, got)


def _two_class_map(H, W, q_other, C=3):
    """Probabilities whose q (with lambdas 0.5) are: class 0 confident at the left column (q 1.8),
    elsewhere q_other[k] for k < C."""
    p = torch.zeros(1, C, H, W)
    for k in range(C):
        p[0, k] = q_other[k] * 0.5
    p[0, :, :, 0] = 0.0
    p[0, 0, :, 0] = 0.9
    return p, torch.full((C,), 0.5)


@pytest.mark.parametrize("backend", ["torch"] + FAST)
def test_vote_ties_and_border(backend):
    d = _device(backend)
    # Equal q for classes 1 and 2 (k1 = 1, k2 = 2), both pooled from equal neighbours.
    p = torch.zeros(1, 3, 3, 3)
    p[0, 1] = 0.45  # q = 0.9
    p[0, 2] = 0.45
    p[0, 0] = 0.10
    p[0, 1, 0, 0], p[0, 2, 0, 0] = 0.9, 0.1   # confident 1, q 1.8
    p[0, 2, 2, 2], p[0, 1, 2, 2] = 0.9, 0.1   # confident 2, q 1.8
    lam = torch.full((3,), 0.5)
    out = ops.tpld_vote(p.to(d), lam.to(d), window=3, iterations=1, backend=backend).cpu()
    # centre: s_1 == s_2 = 0.7 * 0.9 + 0.3 * 1.8 = 1.17 -> k1 (class 1) wins the tie
    assert out[0, 1, 1] == 1
    # (0, 2) sees neither confident pixel in its clipped 3x3 window: no neighbour, s = 0.63
    assert out[0, 0, 2] == 255 and out[0, 2, 0] == 255
    # (0, 1) sees only the class-1 one, (2, 1) only the class-2 one: ties in q resolved by s
    assert out[0, 0, 1] == 1 and out[0, 2, 1] == 2 and out[0, 1, 0] == 1 and out[0, 1, 2] == 2
    want = torch.from_numpy(loops.vote_loop(p.numpy(), lam.numpy(), 3, 0.7, 1))
    assert torch.equal(out, want), mismatch(want, out)


@pytest.mark.parametrize("backend", ["torch"] + FAST)
def test_vote_reads_the_previous_map_and_counts_new_labels_with_their_own_q(backend):
    """A strip: one confident pixel (q 1.8) at the left; the others have q 0.9 for class 0.
    Window 3: iteration 1 labels pixel 1 (s = 0.63 + 0.3 * 1.8); in iteration 2, pixel 2's window
    holds only pixel 1, newly labelled, counted with its own q 0.9: s = 0.63 + 0.27 < 1, so the
    strip stops. Window 5: iteration 1 labels pixels 1 and 2 (both see the confident pixel); in
    iteration 2 pixel 3 pools pixels 1 and 2 (q 0.9 each): s = 0.9 < 1."""
    d = _device(backend)
    p, lam = _two_class_map(1, 6, [0.9, 0.3, 0.2])
    for iterations, expected in ((1, [0, 0, 255, 255, 255, 255]), (3, [0, 0, 255, 255, 255, 255])):
        out = ops.tpld_vote(p.to(d), lam.to(d), window=3, iterations=iterations, backend=backend).cpu()
        assert out[0, 0].tolist() == expected
    # window 5: pixel 2 sees the confident pixel and (from iteration 2) pixel 1:
    # iteration 1 labels pixels 1 and 2 (pool 1.8); iteration 2 labels 3 (pool (0.9 + 0.9) / 2 < 1? no:
    # 3's window holds 1 and 2 (q 0.9 each): pool 0.9, s = 0.9 < 1) -> stays unlabelled.
    out = ops.tpld_vote(p.to(d), lam.to(d), window=5, iterations=3, backend=backend).cpu()
    assert out[0, 0].tolist() == [0, 0, 0, 255, 255, 255]
    want = torch.from_numpy(loops.vote_loop(p.numpy(), lam.numpy(), 5, 0.7, 3))
    assert torch.equal(out, want)


@pytest.mark.parametrize("backend", ["torch"] + FAST)
def test_vote_no_confident_pixels_changes_nothing(backend):
    d = _device(backend)
    p = probs(1, 6, 7, 7, seed=9)
    lam = torch.ones(6)  # q = p <= 1: only p == 1 would be confident
    out = ops.tpld_vote(p.to(d), lam.to(d), backend=backend).cpu()
    assert bool((out == 255).all())


# ---------------------------------------------------------------------------- confidence
def _with_absent_classes(B, C, H, W, seed):
    """Probabilities whose argmax never takes classes 1 and C - 1 (their logits are pushed down)."""
    logits = torch.randn(B, C, H, W, generator=gen(seed)) * 2.0
    logits[:, 1] -= 20.0
    logits[:, C - 1] -= 20.0
    return torch.softmax(logits, 1)


@pytest.mark.parametrize("C", [2, 5, 19])
def test_image_confidence_reference_equals_loop(C):
    p = _with_absent_classes(3, C, 7, 9, seed=C) if C > 2 else probs(3, C, 7, 9, seed=C)
    lam = _lambdas(C, seed=C + 1)
    want = torch.from_numpy(loops.image_confidence_loop(p.numpy(), lam.numpy()))
    got = reference.image_confidence(p, lam)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-14, atol=0), mismatch(want, got)


def _confidence_op(backend):
    if backend == "triton":
        from fastst.ops.triton.tpld import image_confidence_triton
        return image_confidence_triton
    return image_confidence_cpp


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [2, 19])
def test_image_confidence_backend_equals_reference(backend, dtype, C):
    """Exact: the counts are integers and conf is added up in the reference's class order."""
    d = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    p = _with_absent_classes(4, C, 11, 13, seed=11 + C).to(dtype)
    if C == 2:  # ties: equal probabilities take the lower class
        p[:, :, :3] = 0.5
    lam = _lambdas(C, seed=12)
    want = reference.image_confidence(p, lam)
    got = ops.image_confidence(p.to(d), lam.to(d), backend=backend).cpu()
    assert torch.equal(got, want), mismatch(want, got)
    # the fused pass also yields the confident map
    labels, conf, _ = _confidence_op(backend)(p.to(d), lam.float().to(d))
    assert torch.equal(labels.cpu(), reference.cbst_pseudo_label(p, lam)) and torch.equal(conf.cpu(), got)


@pytest.mark.parametrize("backend", FAST)
def test_image_confidence_counts_across_blocks(backend):
    """Maps of several kernel blocks with a partial last one (Triton: per-block histograms and one
    atomic per block and class): each image's conf equals the reference's, and equals that of the
    image alone, so no count leaks between blocks, images or masked lanes."""
    d = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    p = _with_absent_classes(2, 5, 23, 29, seed=31)  # 667 pixels: 3 blocks of 256, the last partial
    lam = _lambdas(5, seed=32)
    want = reference.image_confidence(p, lam)
    _, conf, _ = _confidence_op(backend)(p.to(d), lam.float().to(d))
    assert torch.equal(conf.cpu(), want), mismatch(want, conf.cpu())
    alone = torch.cat([_confidence_op(backend)(p[i:i + 1].to(d), lam.float().to(d))[1].cpu() for i in range(2)])
    assert torch.equal(alone, want)


@pytest.mark.parametrize("backend", FAST)
def test_image_confidence_flags_bad_probabilities(backend):
    d = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    p = _with_absent_classes(1, 5, 4, 4, seed=3)
    p[0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.image_confidence(p.to(d), _lambdas(5, seed=1).to(d), backend=backend)


def test_image_confidence_hand_computed():
    # 2 x 2 image, 3 classes: argmax classes 0, 0, 2, 2; class 1 absent.
    p = torch.tensor([[0.8, 0.1, 0.1], [0.5, 0.2, 0.3], [0.1, 0.2, 0.7], [0.2, 0.2, 0.6]]).T.reshape(1, 3, 2, 2)
    lam = torch.tensor([0.6, 0.5, 0.65])
    # class 0: q = 0.8/0.6 >= 1, 0.5/0.6 < 1 -> 1/2 / 0.6; class 2: 0.7/0.65 >= 1, 0.6/0.65 < 1 -> 1/2 / 0.65
    expected = (0.5 / float(np.float32(0.6)) + 0.5 / float(np.float32(0.65))) / 2
    for backend in ["torch"] + [b for b in FAST if b == "cpp"]:
        assert ops.image_confidence(p, lam, backend=backend).item() == pytest.approx(expected, rel=1e-15)


def test_split_easy_hard_ties_and_portions():
    conf = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9, 0.5], dtype=torch.float64)
    # descending, ties by ascending index: 1, 4, 0, 2, 5, 3
    assert ops.split_easy_hard(conf, 0.5).tolist() == [True, True, False, False, True, False]
    assert ops.split_easy_hard(conf, 0.3).tolist() == [False, True, False, False, False, False]  # floor(1.8)
    assert not ops.split_easy_hard(conf, 0.0).any() and ops.split_easy_hard(conf, 1.0).all()
    big = torch.rand(1000, generator=gen(13)).double()
    easy = ops.split_easy_hard(big, 0.3)
    assert int(easy.sum()) == 300 and big[easy].min() >= big[~easy].max()


# ---------------------------------------------------------------------------- soft targets etc.
@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5])
def test_soft_targets_equal_loop(gamma):
    p = probs(2, 5, 6, 7, seed=14)
    lam = _lambdas(5, seed=15)
    want = torch.from_numpy(loops.soft_targets_loop(p.numpy(), lam.numpy(), gamma))
    got = ops.tpld_soft_targets(p, lam, gamma=gamma)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6, atol=0), mismatch(want, got)
    confident = reference.cbst_pseudo_label(p, lam) != 255
    assert bool(confident.any()) and bool((~confident).any())


def test_self_information_formula_and_gradient():
    p = probs(2, 4, 3, 5, seed=16, sharpness=1.0).double().requires_grad_(True)
    info = ops.self_information(p)
    want = -p * torch.log(p + 1e-30) / np.log(2) / np.log2(4)
    assert torch.allclose(info, want, rtol=1e-12)
    zero = torch.zeros(1, 3, 1, 1)
    assert torch.equal(ops.self_information(zero), torch.zeros_like(zero))
    torch.autograd.gradcheck(lambda x: ops.self_information(x), (p,))


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,match", [
    (lambda b: ops.tpld_vote(probs(1, 4, 5, 5), torch.ones(4), window=6, backend=b), r"window must be odd"),
    (lambda b: ops.tpld_vote(probs(1, 4, 5, 5), torch.ones(4), window=0, backend=b), r"window must be an int >= 1"),
    (lambda b: ops.tpld_vote(probs(1, 4, 5, 5), torch.ones(4), weight=1.5, backend=b), r"weight must be"),
    (lambda b: ops.tpld_vote(probs(1, 4, 5, 5), torch.ones(4), iterations=-1, backend=b), r"iterations must be"),
    (lambda b: ops.tpld_vote(probs(1, 4, 5, 5), torch.ones(3), backend=b), r"lambdas must have shape \(4,\)"),
    (lambda b: ops.tpld_vote(probs(1, 4, 5, 5), torch.zeros(4), backend=b), r"lambdas must be finite and > 0"),
    (lambda b: ops.tpld_vote(probs(1, 4, 5, 5), torch.ones(4, dtype=torch.int64), backend=b), r"lambdas must be a floating"),
    (lambda b: ops.tpld_vote(probs(1, 4, 5, 5)[0], torch.ones(4), backend=b), r"probs must have shape"),
    (lambda b: ops.tpld_vote(probs(1, 4, 5, 5) * 2, torch.ones(4), backend=b), r"outside \[0, 1\]"),
    (lambda b: ops.image_confidence(probs(0, 4, 5, 5), torch.ones(4), backend=b), r"empty batch"),
    (lambda b: ops.tpld_soft_targets(probs(1, 4, 5, 5), torch.ones(4), gamma=-1.0, backend=b), r"gamma must be"),
])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_bad_input_names_the_argument(call, match, backend):
    if backend == "cpp" and "soft_targets" in str(call.__code__.co_names):
        backend = "torch"
    with pytest.raises((ValueError, TypeError), match=match):
        call(backend)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_nan_probabilities_raise_unless_checks_are_off(backend, monkeypatch):
    p = probs(1, 4, 5, 5)
    p[0, 2, 1, 1] = float("nan")
    for op in (ops.tpld_vote, ops.image_confidence):
        with pytest.raises(ValueError, match="NaN or Inf"):
            op(p, torch.ones(4), backend=backend)
    monkeypatch.setenv("FASTST_CHECK", "0")
    assert ops.tpld_vote(p, torch.ones(4), backend=backend).shape == (1, 5, 5)


def test_split_easy_hard_bad_input():
    with pytest.raises(ValueError, match="conf must be a 1-D floating tensor"):
        ops.split_easy_hard(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="easy_portion must be"):
        ops.split_easy_hard(torch.zeros(3), 1.5)
    with pytest.raises(ValueError, match="conf contains NaN"):
        ops.split_easy_hard(torch.tensor([0.1, float("nan")]))


# ---------------------------------------------------------------------------- custom ops
def test_opcheck_and_compile():
    p = probs(2, 5, 6, 7, seed=17)
    lam = _lambdas(5, seed=18).float()
    torch.library.opcheck(tpld_vote_cpp, (p, lam, 5, 0.7, 2))
    torch.library.opcheck(image_confidence_cpp, (p.to(torch.bfloat16), lam))

    def step(x, lam):
        return ops.tpld_vote(x, lam, backend="cpp"), ops.image_confidence(x, lam, backend="cpp")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(p, lam), step(p, lam)):
        assert torch.equal(got, want)


def test_triton_confidence_and_label_ops_opcheck():
    from fastst.ops.triton.tpld import cbst_label_triton, image_confidence_triton
    d = "cuda" if torch.cuda.is_available() else "cpu"
    p = probs(2, 5, 6, 7, seed=19).to(d)
    lam = _lambdas(5, seed=20).float().to(d)
    torch.library.opcheck(image_confidence_triton, (p, lam))
    torch.library.opcheck(cbst_label_triton, (p, lam))


@pytest.mark.skipif("triton" not in FAST, reason="triton is not installed")
def test_triton_vote_weights_are_made_once_per_device_and_weight(monkeypatch):
    """The Triton vote's [weight, 1 - weight] tensor is cached: a tensor made from Python numbers
    on every call would be a blocking host-to-device copy (and breaks CUDA graph capture)."""
    from fastst.ops.triton.tpld import vote_weights

    d = _device("triton")
    first = vote_weights(0.7, d)
    assert first.dtype == torch.float64 and first.tolist() == [0.7, 1.0 - 0.7]
    assert vote_weights(0.7, d) is first
    assert vote_weights(0.6, d) is not first
    p = probs(1, 5, 6, 7, seed=3)
    lam = _lambdas(5, seed=5)
    want = reference.tpld_vote(p, lam, weight=0.7)

    def no_tensor_from_numbers(*args, **kwargs):
        raise AssertionError("the vote made a tensor from Python numbers")

    monkeypatch.setattr(torch, "tensor", no_tensor_from_numbers)
    got = ops.tpld_vote(p.to(d), lam.to(d), weight=0.7, backend="triton")
    assert torch.equal(got.cpu(), want)
