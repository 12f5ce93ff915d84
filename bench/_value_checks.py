"""Value checks the benchmarks run before timing: an implementation that computes something else
is not faster, it is wrong. Each check compares an implementation's output with the reference's
under the tolerances tests/ops uses for the same op (docs/ops.md §0):

* labels and thresholds (IAS from probabilities, the TPLD vote, CBST labels, class-balanced
  thresholds, image confidences): equal;
* IAS from logits (the softmax of an upsampled map may round differently): the theta sequence
  within 1e-6, labels different only where the top-2 probabilities are within 1e-6 or the
  winning probability is within 1e-6 of its class threshold;
* fused losses: the value within rtol 1e-5 / atol 1e-6, the gradient within 1e-4 of its largest
  magnitude.

A failed check raises AssertionError naming the implementation and where it differs, so
``pytest bench/`` fails instead of printing a speed-up.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# docs/ops.md §0.5, shared with the self-check and python -m fastst.doctor.
from fastst.ops._selftest_cases import GRAD_RTOL, IAS_LOGITS_ATOL, LOSS_ATOL, LOSS_RTOL

__all__ = ["assert_equal", "assert_ias_close", "assert_loss_close"]


def _where(want: torch.Tensor, got: torch.Tensor) -> str:
    want, got = want.cpu(), got.cpu()
    if want.shape != got.shape:
        return f"shapes differ: {tuple(want.shape)} vs {tuple(got.shape)}"
    bad = want.double() != got.double()
    if not bool(bad.any()):
        return "equal"
    first = tuple(int(i) for i in bad.nonzero()[0])
    return (f"{int(bad.sum())} of {bad.numel()} values differ; first at {first}: reference "
            f"{want[first].item()}, got {got[first].item()}")


def assert_equal(impl: str, got: torch.Tensor, want: torch.Tensor, what: str = "output") -> None:
    """``got`` (from ``impl``) equals the reference's ``want`` exactly."""
    assert torch.equal(got.cpu(), want.cpu()), f"{impl}: {what} differs from the reference: " \
                                               f"{_where(want, got)}"


def assert_ias_close(impl: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
                     x: torch.Tensor, *, from_logits: bool, mode: str, size=None,
                     align_corners: bool = True) -> None:
    """``got`` = (labels, theta, theta per group) or (labels,) of ``impl`` against the
    reference op's triple on the same input ``x``: equal from probabilities, the tolerance of
    docs/ops.md §0 from logits (tests/ops/test_ias_backends.py)."""
    if not from_logits:
        for name, g, w in zip(("labels", "theta", "theta per group"), got, want):
            assert_equal(impl, g, w, name)
        return
    labels, want_labels, want_seq = got[0].cpu(), want[0].cpu(), want[2].cpu()
    if len(got) > 2:
        seq = got[2].cpu()
        assert torch.allclose(seq, want_seq, rtol=0, atol=IAS_LOGITS_ATOL), \
            f"{impl}: theta per group differs from the reference by more than {IAS_LOGITS_ATOL}: " \
            f"{_where(want_seq, seq)}"
    up = x if size is None else F.interpolate(x, size=size, mode="bilinear",
                                              align_corners=align_corners)
    p = torch.softmax(up.double(), 1).cpu()
    top2 = p.topk(2, dim=1).values
    m, a = p.max(1)
    group = 2 if mode == "official" else 1
    theta_img = want_seq.double().repeat_interleave(group, 0)[: x.shape[0]]
    near_theta = (m - theta_img.gather(1, a.flatten(1)).view_as(m)).abs() < IAS_LOGITS_ATOL
    allowed = ((top2[:, 0] - top2[:, 1]) < IAS_LOGITS_ATOL) | near_theta
    wrong = (labels != want_labels) & ~allowed
    assert not bool(wrong.any()), \
        f"{impl}: {int(wrong.sum())} labels differ from the reference where no tie allows it " \
        f"({_where(want_labels, labels)})"


def assert_loss_close(impl: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]
                      ) -> None:
    """``got`` = (loss, gradient) of ``impl`` against the reference's: the loss within rtol 1e-5
    and atol 1e-6, the gradient within 1e-4 of the reference gradient's largest magnitude
    (tests/ops/test_bootstrap_loss.py, test_cbst.py)."""
    (value, grad), (want_value, want_grad) = [(v.detach().double().cpu(), g.double().cpu())
                                              for v, g in (got, want)]
    assert torch.allclose(value, want_value, rtol=LOSS_RTOL, atol=LOSS_ATOL), \
        f"{impl}: loss {float(value)!r}, the reference's {float(want_value)!r}"
    scale = float(want_grad.abs().max())
    error = float((grad - want_grad).abs().max())
    assert error <= GRAD_RTOL * scale, \
        f"{impl}: gradient differs from the reference's by {error:.3g} (> {GRAD_RTOL} x {scale:.3g})"
