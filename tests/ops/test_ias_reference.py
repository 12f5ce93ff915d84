"""reference.ias_pseudo_label against loop transcriptions of docs/ops.md §1.1 and of the released code."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _ias_transcriptions import paper_loop, released_official
from fastst.ops import reference
from helpers import gen, mismatch, probs


def _cases():
    """(name, probabilities (B, C, H, W) float32) covering the edge cases of docs/ops.md §1."""
    flat = torch.full((2, 5, 6, 7), 1.0 / 5)  # every pixel ties: class 0 wins, 1..4 never win
    quantised = torch.softmax(torch.randint(0, 3, (3, 4, 9, 11), generator=gen(1)).float(), 1)
    one_hot = F.one_hot(torch.randint(0, 3, (2, 1, 1), generator=gen(2)), 6).permute(0, 3, 1, 2).float()
    never = probs(3, 7, 10, 12, seed=3)
    never[:, 5] = 0.0  # class 5 never wins
    return [
        ("peaked", probs(4, 19, 17, 23, seed=4, sharpness=6.0)),
        ("flat", flat),
        ("ties", quantised),
        ("one_pixel", probs(5, 19, 1, 1, seed=5)),
        ("one_hot_one_pixel", one_hot),
        ("never_wins", never),
        ("c2", probs(4, 2, 13, 9, seed=6)),
        ("c150", probs(3, 150, 16, 16, seed=7, sharpness=4.0)),
        ("sequence16", probs(16, 19, 12, 20, seed=8)),
        ("odd_batch", probs(5, 19, 8, 8, seed=9)),
        # not normalised, but in [0, 1]: float16 subnormals and zeros in the official histograms
        ("tiny_values", probs(3, 5, 9, 9, seed=17) * 3e-5),
        ("all_zero", torch.zeros(2, 4, 3, 5)),
    ]


CASES = _cases()


@pytest.mark.parametrize("name,p", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_official_matches_released_numpy(name, p, alpha):
    want_labels, want_theta, want_groups = released_official(p.numpy(), alpha)
    labels, theta, groups = reference.ias_pseudo_label(p, None, alpha=alpha, mode="official")
    assert labels.dtype == torch.uint8 and theta.dtype == torch.float64
    assert groups.shape == (-(-p.shape[0] // 2), p.shape[1])
    assert torch.equal(labels, torch.from_numpy(want_labels)), mismatch(torch.from_numpy(want_labels), labels)
    assert torch.equal(groups, torch.from_numpy(want_groups)), mismatch(torch.from_numpy(want_groups), groups)
    assert torch.equal(theta, torch.from_numpy(want_theta))


@pytest.mark.parametrize("group", [1, 3])
def test_official_other_group_sizes(group):
    p = probs(7, 19, 9, 10, seed=10)
    want_labels, want_theta, want_groups = released_official(p.numpy(), 0.3, group=group)
    labels, theta, groups = reference.ias_pseudo_label(p, None, alpha=0.3, mode="official", group=group)
    assert torch.equal(labels, torch.from_numpy(want_labels))
    assert torch.equal(groups, torch.from_numpy(want_groups)), mismatch(torch.from_numpy(want_groups), groups)


def test_official_clips_at_0999():
    # One-hot maps with beta = 0 make theta = psi = 1 for class 0, which is clipped to 0.999.
    p = torch.full((4, 3, 5, 5), 0.0)
    p[:, 0] = 1.0
    want_labels, want_theta, _ = released_official(p.numpy(), 0.01, beta=0.0)
    labels, theta, _ = reference.ias_pseudo_label(p, None, alpha=0.01, beta=0.0, mode="official")
    assert theta[0].item() == 0.999
    assert torch.equal(theta, torch.from_numpy(want_theta))
    assert torch.equal(labels, torch.from_numpy(want_labels))


@pytest.mark.parametrize("name,p", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("alpha,gamma", [(0.2, 8.0), (0.6, 1.0), (1.0, 0.0)])
def test_paper_matches_loop(name, p, alpha, gamma):
    want_labels, want_theta, want_images = paper_loop(p.numpy(), alpha, gamma=gamma)
    labels, theta, images = reference.ias_pseudo_label(p, None, alpha=alpha, gamma=gamma, mode="paper")
    assert images.shape == (p.shape[0], p.shape[1])
    assert torch.equal(labels, torch.from_numpy(want_labels)), mismatch(torch.from_numpy(want_labels), labels)
    assert torch.equal(images, torch.from_numpy(want_images)), mismatch(torch.from_numpy(want_images), images)


def test_paper_empty_class_keeps_theta_bit_exact():
    p = probs(2, 6, 8, 8, seed=11)
    p[:, 4] = 0.0
    theta0 = torch.tensor([0.91, 0.92, 0.93, 0.94, 0.123456789, 0.96], dtype=torch.float64)
    _, theta, images = reference.ias_pseudo_label(p, theta0, alpha=0.2, mode="paper")
    assert theta[4].item() == 0.123456789 and images[0, 4].item() == 0.123456789
    assert not torch.equal(theta[:4], theta0[:4])


def test_theta_carried_across_calls_equals_one_call():
    p = probs(8, 19, 10, 10, seed=12)
    for mode in ("paper", "official"):
        whole = reference.ias_pseudo_label(p, None, alpha=0.25, mode=mode)
        first = reference.ias_pseudo_label(p[:4], None, alpha=0.25, mode=mode)
        second = reference.ias_pseudo_label(p[4:], first[1], alpha=0.25, mode=mode)
        assert torch.equal(whole[0], torch.cat([first[0], second[0]]))
        assert torch.equal(whole[1], second[1])
        assert torch.equal(whole[2], torch.cat([first[2], second[2]]))


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_bf16_and_non_contiguous_inputs(mode):
    p = probs(4, 19, 11, 13, seed=13).to(torch.bfloat16)
    loop = released_official if mode == "official" else paper_loop
    want_labels, _, want_seq = loop(p.float().numpy(), 0.2)
    got = reference.ias_pseudo_label(p, None, alpha=0.2, mode=mode)
    assert torch.equal(got[0], torch.from_numpy(want_labels))
    assert torch.equal(got[2], torch.from_numpy(want_seq))
    base = probs(4, 13, 11, 19, seed=14).permute(0, 3, 2, 1)  # (4, 19, 11, 13), not contiguous
    assert not base.is_contiguous()
    want_labels, _, want_seq = loop(base.contiguous().numpy(), 0.2)
    got = reference.ias_pseudo_label(base, None, alpha=0.2, mode=mode)
    assert torch.equal(got[0], torch.from_numpy(want_labels))
    assert torch.equal(got[2], torch.from_numpy(want_seq))


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("align_corners", [True, False])
def test_from_logits_with_size_is_softmax_of_interpolate(mode, align_corners):
    logits = torch.randn(4, 19, 7, 9, generator=gen(15)) * 3
    size = (29, 35)
    p = torch.softmax(F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners), 1)
    loop = released_official if mode == "official" else paper_loop
    want_labels, _, want_seq = loop(p.numpy(), 0.2)
    got = reference.ias_pseudo_label(logits, None, alpha=0.2, mode=mode, from_logits=True, size=size,
                                     align_corners=align_corners)
    assert got[0].shape == (4, *size)
    assert torch.equal(got[0], torch.from_numpy(want_labels))
    assert torch.equal(got[2], torch.from_numpy(want_seq))


def test_theta_pow_is_correctly_rounded():
    from fractions import Fraction
    theta = torch.rand(2000, dtype=torch.float64, generator=gen(16))
    got = reference.theta_pow(theta, 8.0)
    for t, g in zip(theta.tolist(), got.tolist()):
        exact = Fraction(t) ** 8
        # the nearest double: no neighbour of g is closer to the exact power
        err = abs(Fraction(g) - exact)
        assert err <= abs(Fraction(np.nextafter(g, 2.0)) - exact)
        assert err <= abs(Fraction(np.nextafter(g, -2.0)) - exact)
    assert torch.equal(reference.theta_pow(theta, 0.0), torch.ones_like(theta))
    assert torch.equal(reference.theta_pow(theta, 1.0), theta)
    assert torch.allclose(reference.theta_pow(theta, 2.5), theta ** 2.5, rtol=0, atol=0)
