"""The mixed-batch losses of the class-balanced rounds (fastst.methods.st_losses) against plain
torch formulas of docs/ops.md §5-§6 and the released CRST code, gradients included."""
import pytest
import torch
import torch.nn.functional as F

from fastst.methods.st_losses import (cbst_loss, lrent_loss, lrent_soft_labels,
                                      tpld_phase1_loss, tpld_phase1_lrent_loss)

C, H, W = 5, 12, 16


def _batch(seed=0, B=3, ignore_fraction=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, 4, 6, generator=g, dtype=torch.float64).float().requires_grad_()
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[torch.rand(B, H, W, generator=g) < ignore_fraction] = 255
    is_target = torch.tensor([True, False, True][:B])
    lambdas = torch.rand(C, generator=g) * 0.5 + 0.4
    return logits, labels, is_target, lambdas


def _log_p(logits):
    up = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=True)
    return torch.log_softmax(up, dim=1)


def _phase1_reference(logits, labels, is_target, lambdas, beta, weight):
    log_p = _log_p(logits)
    valid = labels != 255
    onehot = F.one_hot(labels.clamp(max=C - 1), C).permute(0, 3, 1, 2).float()
    log_q = log_p - torch.log(lambdas).view(1, -1, 1, 1)
    q = log_q.exp().detach()
    boot = -((beta * onehot + (1 - beta) * q) * log_q).sum(1)
    ce = -(onehot * log_p).sum(1)
    tgt = is_target.view(-1, 1, 1).expand_as(valid)
    per_pixel = torch.where(tgt, boot, ce)
    n_valid = valid.sum()
    main = (per_pixel * valid).sum() / n_valid
    tgt_valid = valid & tgt
    kld = (-(log_p.mean(1)) * tgt_valid).sum() / tgt_valid.sum()
    return main + weight * kld


def test_phase1_loss_matches_the_formula_and_its_gradient():
    logits, labels, is_target, lambdas = _batch()
    loss = tpld_phase1_loss(logits, labels, is_target, lambdas, beta=0.95, mrkld_weight=0.01)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = _phase1_reference(logits, labels, is_target, lambdas, 0.95, 0.01)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_phase1_with_beta_one_and_unit_thresholds_is_the_mrkld_loss():
    logits, labels, is_target, _ = _batch(seed=1)
    ones = torch.ones(C)
    phase1 = tpld_phase1_loss(logits, labels, is_target, ones, beta=1.0, mrkld_weight=0.01)
    torch.testing.assert_close(phase1, cbst_loss(logits, labels, is_target, mrkld_weight=0.01),
                               rtol=1e-5, atol=1e-6)


def test_cbst_loss_without_weight_is_the_mean_ce():
    logits, labels, is_target, _ = _batch(seed=2)
    expected = F.nll_loss(_log_p(logits), labels, ignore_index=255)
    torch.testing.assert_close(cbst_loss(logits, labels, is_target, mrkld_weight=0.0), expected,
                               rtol=1e-5, atol=1e-6)


def test_all_ignored_gives_zero_and_no_nan():
    logits, labels, is_target, lambdas = _batch(seed=3)
    labels = torch.full_like(labels, 255)
    loss = tpld_phase1_loss(logits, labels, is_target, lambdas, beta=0.95, mrkld_weight=0.01)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_lrent_soft_labels_follow_the_released_formula():
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(2, C, H, W, generator=g) * 3, dim=1)
    lambdas = torch.rand(C, generator=g) * 0.5 + 0.4
    alpha = 0.25
    soft, selected = lrent_soft_labels(probs, lambdas, alpha)
    # The released label_selection, in float64 numpy-style arithmetic.
    p = probs.double()
    lam = lambdas.double().view(1, -1, 1, 1)
    powered = (p / lam) ** (1 / alpha)
    y = powered / powered.sum(1, keepdim=True)
    reg = (-y * torch.log(p + 1e-32)).sum(1) + alpha * (y * torch.log(y + 1e-32)).sum(1)
    sel = (-y * torch.log(lam + 1e-32)).sum(1)
    expected_selected = reg < sel
    margin = (reg - sel).abs() > 1e-4  # pixels far from the decision boundary
    assert torch.equal(selected[margin], expected_selected[margin])
    assert selected.any() and (~selected).any()
    torch.testing.assert_close(soft.double(), y * selected.unsqueeze(1), rtol=1e-4, atol=1e-6)


def test_lrent_soft_labels_stay_finite_for_small_alpha():
    probs = torch.softmax(torch.randn(1, C, 4, 4) * 10, dim=1)
    soft, _ = lrent_soft_labels(probs, torch.full((C,), 1e-3), 0.01)
    assert torch.isfinite(soft).all()


def test_lrent_loss_matches_the_released_expanded_loss():
    logits, labels, is_target, lambdas = _batch(seed=5)
    g = torch.Generator().manual_seed(6)
    teacher = torch.softmax(torch.randn(3, C, H, W, generator=g) * 2, dim=1)
    soft, selected = lrent_soft_labels(teacher, lambdas, 0.25)
    loss = lrent_loss(logits, labels, is_target, soft, selected)
    (grad,) = torch.autograd.grad(loss, logits)
    # Released reg_loss_calc_expand: one-hot source labels, soft target labels (zero where not
    # selected), ce = sum -y log p, divided by the pixels with a non-zero label vector.
    onehot = F.one_hot(labels.clamp(max=C - 1), C).permute(0, 3, 1, 2).float()
    onehot = onehot * (labels != 255).unsqueeze(1)
    tgt = is_target.view(-1, 1, 1, 1)
    y = torch.where(tgt, soft * selected.unsqueeze(1), onehot)
    expected = (-y * _log_p(logits)).sum() / (y.sum(1) != 0).sum()
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_phase1_accepts_bf16_logits(dtype):
    logits, labels, is_target, lambdas = _batch(seed=7)
    low = logits.detach().to(dtype).requires_grad_()
    loss = tpld_phase1_loss(low, labels, is_target, lambdas, beta=0.95, mrkld_weight=0.01)
    expected = _phase1_reference(low.detach().float(), labels, is_target, lambdas, 0.95, 0.01)
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    loss.backward()
    assert low.grad.dtype == dtype


def _phase1_lrent_reference(logits, labels, is_target, lambdas, soft, selected, beta):
    """Per pixel: bootstrapping with y = the LRENT soft label on selected target pixels and
    y = one-hot on the other labelled target pixels; CE on source pixels; mean over them all."""
    log_p = _log_p(logits)
    log_q = log_p - torch.log(lambdas).view(1, -1, 1, 1)
    q = log_q.exp().detach()
    onehot = F.one_hot(labels.clamp(max=C - 1), C).permute(0, 3, 1, 2).float()
    tgt = is_target.view(-1, 1, 1)
    valid = labels != 255
    chosen = selected & tgt
    voted = valid & tgt & ~chosen
    source = valid & ~tgt
    y = torch.where(chosen.unsqueeze(1), soft, onehot)
    boot = -((beta * y + (1 - beta) * q) * log_q).sum(1)
    ce = -(onehot * log_p).sum(1)
    total = (boot * (chosen | voted)).sum() + (ce * source).sum()
    return total / (chosen | voted | source).sum()


def _lrent_batch(seed):
    logits, labels, is_target, lambdas = _batch(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    teacher = torch.softmax(torch.randn(3, C, H, W, generator=g) * 2, dim=1)
    soft, selected = lrent_soft_labels(teacher, lambdas, 0.25)
    return logits, labels, is_target, lambdas, soft, selected


def test_phase1_lrent_loss_matches_the_formula_and_its_gradient():
    logits, labels, is_target, lambdas, soft, selected = _lrent_batch(8)
    tgt = is_target.view(-1, 1, 1)
    # Both kinds of target pixels occur: LRENT-selected ones and voted ones it did not select.
    assert (selected & tgt).any() and ((labels != 255) & tgt & ~selected).any()
    loss = tpld_phase1_lrent_loss(logits, labels, is_target, lambdas, soft, selected, beta=0.95)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = _phase1_lrent_reference(logits, labels, is_target, lambdas, soft, selected, 0.95)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_phase1_lrent_with_beta_one_and_no_voted_pixels_trains_as_lrent():
    logits, labels, is_target, lambdas, soft, selected = _lrent_batch(9)
    # Without voting every labelled target pixel is confident, hence selected by LRENT.
    labels = torch.where(is_target.view(-1, 1, 1) & ~selected, 255, labels)
    phase1 = tpld_phase1_lrent_loss(logits, labels, is_target, lambdas, soft, selected, beta=1.0)
    lrent = lrent_loss(logits, labels, is_target, soft, selected)
    (grad,) = torch.autograd.grad(phase1, logits)
    (lrent_grad,) = torch.autograd.grad(lrent, logits)
    torch.testing.assert_close(grad, lrent_grad, rtol=1e-4, atol=1e-7)
    # The values differ by sum y log lambda / n (log q = log p - log lambda).
    chosen = (selected & is_target.view(-1, 1, 1)).unsqueeze(1)
    count = ((labels != 255) & ~is_target.view(-1, 1, 1)).sum() + chosen.sum()
    offset = (soft * chosen * torch.log(lambdas).view(1, -1, 1, 1)).sum() / count
    torch.testing.assert_close(phase1, lrent + offset, rtol=1e-5, atol=1e-6)
