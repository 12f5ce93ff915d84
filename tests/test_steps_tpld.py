"""One step of each TPLD stage (fastst.methods.tpld), run through the stage's own ``step`` on a
tiny fixed model and batch, against the loss and gradients written out here in plain torch
(float64, except for the discriminator's part) from the papers' and the released code's
formulas; the teacher after the optimizer has stepped; and the direction one step moves the
model.

* phase 1: the base method's loss (CRST-MRKLD, CBST's CE or CRST-LRENT) with its target term
  through the bootstrapping loss ``-sum_k (beta y_k + (1 - beta) stopgrad(q_k)) log q_k``,
  ``q = p / lambda`` (TPLD Eq. 2); MRKLD as yzou2/CRST crst_seg.py:824-864 (``ce / valid_num +
  mr_weight_kld * kld / valid_reg_num``, ``kld = sum -log p / C`` over the target crops' valid
  pixels), LRENT's soft labels and selection as crst_seg.py:679-695;
* phase 2: easy crops through the bootstrapping loss against the full calibrated targets (TPLD
  Eq. 3-4: one-hot where ``q >= 1``, ``q ** gamma`` elsewhere) from the pass's probabilities on
  the crop (the teacher, the model the round started from, at the pass's 0.9 scale + flip,
  crst_seg.py:419, :457-464), normalised by the pixel count; hard crops adversarially (TPLD
  Eq. 5-6): D on the weighted self-information maps ``-p log2(p + 1e-30) / log2 C`` (ADVENT)
  with BCE with logits, easy 1 and hard 0 for D (on detached maps, the two terms averaged), the
  segmenter ``lambda_adv * BCE(D(I_hard), 1)`` through I.

The optimizers are replaced by plain SGD so that each update is predictable; the settings under
test (beta, gamma, lambda_adv, mrkld_weight, lrent_alpha) are given non-default values, so a
setting that does not reach its use changes the numbers."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastst.config import load_config
from fastst.methods.context import RunContext
from fastst.methods.datasets import build_role
from fastst.methods.tpld import TPLDPhase1, TPLDPhase2
from fastst.models import deeplabv2
from test_train import fixture_root, restore_threads, tiny_overrides  # noqa: F401

C = 19
STAGES = ("source_only", "phase1_1", "phase2_1")
PSEUDO_SIZE = (16, 32)  # tiny_overrides' pseudo_size
PASS_SCALE = 0.9        # the class-balanced rounds' pseudo_scales default, with flips
IGNORE = 255
BETA = 0.8              # not the default 0.95
GAMMA = 3.0             # not the default 2.0
MODEL_PARAMS = ("classifier.convs.0.weight", "classifier.convs.3.bias",
                "backbone.layer4.1.conv2.weight", "backbone.layer1.0.conv1.weight")
D_PARAMS = ("conv1.weight", "conv3.weight", "classifier.weight")


def make_config(root, stage, **settings):
    extra = {f"stages.{stage}.{key}": value for key, value in settings.items()}
    return load_config("tpld_gta5", tiny_overrides(root, stages=STAGES, **{
        "runtime.amp": "none", "runtime.device": "cpu", "runtime.tensorboard": "false",
        **extra}))


@pytest.fixture(autouse=True)
def one_thread(restore_threads):
    """One thread, as tiny_overrides' runtime.threads (restore_threads gives the next test its
    own): these convolutions gain nothing from two, and lose a lot on a busy machine."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def init_model():
    """The checkpoint a round starts from (and labels with): a seeded tiny DeepLab-v2 whose head
    is sharper than at init (more classes with lambda < 1)."""
    torch.manual_seed(0)
    net = deeplabv2(num_classes=C, backbone="resnet18_w16")
    with torch.no_grad():
        for conv in net.classifier.convs:
            conv.weight.mul_(10)
    return net.eval()


def prepared_stage(stage_class, config, name, init, run_dir):
    """The stage as ``Stage.run`` leaves it before its first ``step``: labelled by ``init``
    (its pass), the student a copy of ``init`` with BN affine frozen and BN layers in eval mode
    (bn_eval), ``setup`` done. Returns (stage, student)."""
    stage = stage_class(RunContext(config=config, run_dir=run_dir, seed=0,
                                   device=torch.device("cpu")), name)
    stage.init_model = lambda: copy.deepcopy(init)
    stage.manifest = stage.label_pass(init, stage.pseudo_dir)
    student = copy.deepcopy(init)
    student.freeze_bn_affine(stage.settings["freeze_bn_affine"])
    student.train()
    assert stage.settings["bn_eval"]
    for module in student.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    stage.setup(student)
    return stage, student


def lambdas_of(stage):
    return torch.tensor(stage.manifest["lambdas"], dtype=torch.float32)


def upsampled(logits, size):
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


@torch.no_grad()
def pass_probs_on_crops(teacher, config, batch):
    """The pass's probabilities (float32, as the pass makes them) of the target items of
    ``batch`` seen through their crops, zero on source items: the teacher on the image at
    PSEUDO_SIZE resized by PASS_SCALE and on its mirror image, logits upsampled to
    PSEUDO_SIZE, the mean of the two softmax maps (crst_seg.py:90, :419, :457-464); crop pixel
    (i, j) takes map pixel (n(top + n(i; Hc, h); H, Hp), n(left + n(j; Wc, w); W, Wp)) with
    n(k; out, in) = floor((k + 1/2) in / out), column mirrored for a flipped crop: where its
    pseudo label comes from (half-pixel nearest upsampling of the label map to the image, then
    the crop's box and resize; docs/recipes.md §4.4).
    (B, C, Hc, Wc)."""
    images = build_role(config, "target", resize=PSEUDO_SIZE)
    count, (crop_h, crop_w) = batch["image"].shape[0], batch["image"].shape[-2:]
    wanted = batch["is_target"].tolist() if "is_target" in batch else [True] * count
    rows = [b for b in range(count) if wanted[b]]
    out = torch.zeros(count, C, crop_h, crop_w)
    if not rows:
        return out
    full = torch.stack([images[int(batch["index"][b])]["image"] for b in rows])
    scaled = upsampled(full, [round(side * PASS_SCALE) for side in PSEUDO_SIZE])
    plain = torch.softmax(upsampled(teacher(scaled).float(), PSEUDO_SIZE), 1)
    mirrored = torch.softmax(upsampled(teacher(scaled.flip(-1)).float(), PSEUDO_SIZE), 1).flip(-1)
    full_probs = (plain + mirrored) / 2
    for row, b in enumerate(rows):
        top, left, height, width = (int(v) for v in batch["box"][b])
        image_h, image_w = (int(v) for v in batch["image_size"][b])
        ys = [(2 * (top + (2 * i + 1) * height // (2 * crop_h)) + 1) * PSEUDO_SIZE[0]
              // (2 * image_h) for i in range(crop_h)]
        xs = [(2 * (left + (2 * j + 1) * width // (2 * crop_w)) + 1) * PSEUDO_SIZE[1]
              // (2 * image_w) for j in range(crop_w)]
        if bool(batch["flipped"][b]):
            xs = xs[::-1]
        out[b] = full_probs[row][:, ys][:, :, xs]
    return out


def bootstrap_terms(log_p, y, lambdas):
    """Per pixel ``-sum_k (BETA y_k + (1 - BETA) stopgrad(q_k)) log q_k`` with
    ``log q = log p - log lambda`` (TPLD Eq. 2 and 4): (B, H, W)."""
    log_q = log_p - torch.log(lambdas.double()).view(1, -1, 1, 1)
    q = log_q.detach().exp()
    return -((BETA * y + (1 - BETA) * q) * log_q).sum(1)


def one_hot(labels):
    """(B, H, W) labels, 255 = none -> (B, C, H, W) float64 one-hot (zero where 255)."""
    valid = labels != IGNORE
    onehot = F.one_hot(torch.where(valid, labels, 0), C).permute(0, 3, 1, 2).double()
    return onehot * valid.unsqueeze(1)


def self_information(logits, size):
    """ADVENT's weighted self-information of the upsampled softmax: -p log2(p + 1e-30) / log2 C."""
    p = torch.softmax(upsampled(logits, size), 1)
    return -p * torch.log2(p + 1e-30) / math.log2(C)


def float64_copy(module):
    return copy.deepcopy(module).double()


def plain_sgd(stage, student, lr, d_lr=None):
    """Replace the stage's optimizers by SGD without momentum or weight decay."""
    optimizers = [torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=lr)]
    if d_lr is not None:
        optimizers.append(torch.optim.SGD(stage.discriminator.parameters(), lr=d_lr))
    stage.optimizers = optimizers


def assert_grads(module, names, expected, lr, before):
    """``module``'s .grad of ``names`` equals ``expected`` (float64) and the SGD step at ``lr``
    moved each parameter by -lr * grad from ``before``."""
    params = dict(module.named_parameters())
    for name, want in zip(names, expected):
        param = params[name]
        assert param.grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(param.grad.double(), want, rtol=1e-4, atol=1e-6,
                                   msg=lambda text: f"{name}: {text}")
        torch.testing.assert_close(param.detach(), before[name] - lr * param.grad,
                                   rtol=1e-6, atol=1e-8, msg=f"{name} after the step")


def assert_teacher_is_the_start(stage, student, init, config, batch):
    """After the optimizer has stepped, the student differs from ``init``, the teacher's outputs
    and the pass's probabilities it gives do not."""
    images = batch["image"]
    with torch.no_grad():
        start = init(images)
        assert (student(images) - start).abs().max() > 1e-4, "the step must move the student"
        assert torch.equal(stage.teacher_model(images), start), \
            "the teacher's outputs moved with the student's step"
    if "index" in batch:  # crops that record their geometry: the pass's map on them
        torch.testing.assert_close(stage.teacher_probs(batch),
                                   pass_probs_on_crops(init, config, batch), rtol=1e-6, atol=1e-7)


# --- phase 1 -------------------------------------------------------------------------------

def phase1_batch(stage):
    """A batch of the stage's mixed stream with source and target crops, fed to ``step``."""
    for batch in stage.mixed.batches(start=0, stop=8):
        if batch["is_target"].any() and not batch["is_target"].all():
            stage.batches = iter([batch])
            return batch
    raise AssertionError("no mixed batch holds both domains")


def expected_phase1(model, batch, lambdas, loss, *, mrkld_weight=0.0, alpha=None, probs=None):
    """TPLD phase 1's loss on ``batch`` in float64, from ``model``'s logits (a graph to it).

    ce / mrkld: (sum over source pixels of -log p_y + sum over labelled target pixels of the
    bootstrapping term) / n_valid + w * sum over target pixels of -sum_c log p_c / C /
    n_valid_tgt (crst_seg.py:833-861, with the target CE replaced as in TPLD Eq. 2).
    lrent: CRST-LRENT's soft labels y = normalise((p / lambda) ** (1 / alpha)) of the pass's
    probabilities ``probs`` where reg_score < sel_score (crst_seg.py:679-695), the voted label
    elsewhere on target crops, source labels on source crops; the bootstrapping term on every
    target pixel with a target, CE on source pixels, over their count
    (crst_seg.py:876-903: ``ce / valid_num``, no KLD)."""
    labels = batch["label"].long()
    is_target = batch["is_target"].view(-1, 1, 1)
    log_p = torch.log_softmax(upsampled(model(batch["image"].double()), labels.shape[-2:]), 1)
    valid = labels != IGNORE
    source, target = valid & ~is_target, valid & is_target
    ce = -(log_p * one_hot(labels)).sum(1)
    if loss != "lrent":
        boot = bootstrap_terms(log_p, one_hot(labels), lambdas)
        total = ce[source].sum() + boot[target].sum()
        kld = (-log_p.sum(1) / C)[target].sum() / target.sum().clamp(min=1)
        return total / valid.sum() + mrkld_weight * kld
    p = probs.double()
    lam = lambdas.double().view(1, -1, 1, 1)
    soft = torch.pow(p / lam, 1.0 / alpha)
    soft = soft / soft.sum(1, keepdim=True)
    reg_score = (-soft * torch.log(p + 1e-32) + alpha * soft * torch.log(soft + 1e-32)).sum(1)
    sel_score = (-soft * torch.log(lam + 1e-32)).sum(1)
    margin = (reg_score - sel_score)[is_target.expand_as(labels)].abs()
    assert margin.min() > 1e-5, "a pixel on LRENT's selection boundary: choose another fixture"
    selected = (reg_score < sel_score) & is_target
    voted = target & ~selected
    assert selected.any() and voted.any(), "the fixture must select soft and voted pixels"
    y = torch.where(selected.unsqueeze(1), soft, one_hot(labels))
    boot = bootstrap_terms(log_p, y, lambdas)
    total = ce[source].sum() + boot[selected | voted].sum()
    return total / (source.sum() + selected.sum() + voted.sum())


@pytest.mark.parametrize("loss", ["mrkld", "ce", "lrent"])
def test_phase1_step_equals_the_bootstrapped_base_loss(fixture_root, init_model, tmp_path, loss):
    """One tpld_phase1 step for each base loss: its loss and the gradients of a head conv, a
    head bias and two backbone convs equal TPLD Eq. 2 on the base method's loss (beta 0.8,
    mrkld_weight 0.3, lrent_alpha 0.1), and the SGD update follows them; with LRENT the
    teacher still gives the pass's probabilities after the step."""
    config = make_config(fixture_root, "phase1_1", loss=loss, beta=BETA, mrkld_weight=0.3,
                         lrent_alpha=0.1, source_portion=0.5, batch_size=4)
    stage, student = prepared_stage(TPLDPhase1, config, "phase1_1", init_model, tmp_path)
    lr = 0.01
    plain_sgd(stage, student, lr)
    batch = phase1_batch(stage)
    lambdas = lambdas_of(stage)
    assert (lambdas < 1).sum() >= 2
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    reference = float64_copy(student)

    parts = stage.step(student, 0)

    probs = pass_probs_on_crops(init_model, config, batch) if loss == "lrent" else None
    expected = expected_phase1(reference, batch, lambdas, loss,
                               mrkld_weight=0.3 if loss == "mrkld" else 0.0, alpha=0.1,
                               probs=probs)
    torch.testing.assert_close(parts["loss"].double(), expected.detach(), rtol=1e-5, atol=0)
    params = dict(reference.named_parameters())
    grads = torch.autograd.grad(expected, [params[name] for name in MODEL_PARAMS])
    assert_grads(student, MODEL_PARAMS, grads, lr, before)
    assert (batch["label"][batch["is_target"]] != IGNORE).any()
    if loss == "lrent":
        assert_teacher_is_the_start(stage, student, init_model, config, batch)


def test_phase1_step_moves_predictions_toward_the_pseudo_labels(fixture_root, init_model,
                                                                tmp_path):
    """After one phase-1 step the model gives the labelled target pixels' pseudo labels a
    higher log-probability (mean over the pixels) and its bootstrapping loss on the batch is
    lower."""
    config = make_config(fixture_root, "phase1_1", beta=BETA, source_portion=0.5, batch_size=4)
    stage, student = prepared_stage(TPLDPhase1, config, "phase1_1", init_model, tmp_path)
    plain_sgd(stage, student, 1e-4)
    batch = phase1_batch(stage)
    lambdas = lambdas_of(stage)
    labels = batch["label"].long()
    target = (labels != IGNORE) & batch["is_target"].view(-1, 1, 1)

    def measure():
        with torch.no_grad():
            log_p = torch.log_softmax(upsampled(student(batch["image"]).double(),
                                                labels.shape[-2:]), 1)
        own = (log_p * one_hot(labels)).sum(1)[target].mean()
        return own, bootstrap_terms(log_p, one_hot(labels), lambdas)[target].mean()

    own_before, boot_before = measure()
    stage.step(student, 0)
    own_after, boot_after = measure()
    assert own_after > own_before + 1e-4
    assert boot_after < boot_before - 1e-4


# --- phase 2 -------------------------------------------------------------------------------

PHASE2 = {"beta": BETA, "gamma": GAMMA, "easy_portion": 0.5, "d_ndf": 8}


def phase2_stage(root, init, run_dir, lr, d_lr, **settings):
    """A tpld_phase2 stage after setup with one fixed easy and one fixed hard batch, plain SGD,
    and a discriminator more sensitive to its input than at init (every parameter x 3), so that
    the adversarial part of the segmenter's gradients is not lost beside the easy loss's."""
    config = make_config(root, "phase2_1", **{**PHASE2, **settings})
    stage, student = prepared_stage(TPLDPhase2, config, "phase2_1", init, run_dir)
    easy = next(stage.easy.batches(start=0))
    hard = next(stage.hard.batches(start=0))
    # The easy crops come from the easy_portion of the target images of highest conf_t, the
    # hard ones from the others (docs/ops.md §6, split_easy_hard).
    division = stage.division
    confidence = {image["name"]: image["confidence"] for image in stage.manifest["images"]}
    assert len(division["easy"]) == int(PHASE2["easy_portion"] * len(confidence))
    assert min(confidence[name] for name in division["easy"]) >= \
        max(confidence[name] for name in division["hard"])
    assert set(easy["name"]) <= set(division["easy"]) and set(hard["name"]) <= set(division["hard"])
    if config["stages"]["phase2_1"]["soft_targets"] == "pass":
        assert set(easy["index"].tolist()) <= set(division["easy_indices"])
    stage.easy_batches, stage.hard_batches = iter([easy]), iter([hard])
    with torch.no_grad():
        for param in stage.discriminator.parameters():
            param.mul_(3)
    plain_sgd(stage, student, lr, d_lr)
    return config, stage, student, easy, hard


def easy_targets(init, config, easy, lambdas):
    """TPLD Eq. 3 on the teacher's probabilities of the easy crops: one-hot of argmax q where
    max q >= 1 (docs/ops.md §6's rule, the round's labels), q ** GAMMA elsewhere; q = p / lambda in
    float32. p: soft_targets "crop", the teacher (the starting model) on the crop itself, its
    logits upsampled bilinearly to the crop; "pass", the pass's probabilities mapped onto the
    crop. (B, C, H, W) float64, and the confident mask."""
    if config["stages"]["phase2_1"]["soft_targets"] == "crop":
        with torch.no_grad():
            p = torch.softmax(upsampled(init(easy["image"]), easy["image"].shape[-2:]), 1)
    else:
        p = pass_probs_on_crops(init, config, easy)
    q = p / lambdas.view(1, -1, 1, 1)
    top, label = q.max(1)
    confident = top >= 1
    y = torch.where(confident.unsqueeze(1), one_hot(label), q.double() ** GAMMA)
    return y, confident, q


def expected_phase2(model, model32, discriminator, easy, hard, y, lambdas, lambda_adv):
    """(easy loss, adv, D's loss): the easy crops' bootstrapping term averaged over every pixel
    (Eq. 4) in float64 with a graph to ``model`` (float64); adv = BCE(D(I_hard), 1) (Eq. 6)
    with a graph through I to ``model32`` and D's loss (BCE(D(I_easy), 1) + BCE(D(I_hard), 0))
    / 2 on detached maps (Eq. 5) with a graph to ``discriminator``, in float32 like the step:
    D's LeakyReLUs have units within float32 rounding of 0 on these maps (one at 2e-8), so a
    float64 D would take the other side of some kinks and get other gradients."""
    size = easy["image"].shape[-2:]
    log_p = torch.log_softmax(upsampled(model(easy["image"].double()), size), 1)
    easy_loss = bootstrap_terms(log_p, y, lambdas).mean()
    hard_info = self_information(model32(hard["image"]), size)
    hard_out = discriminator(hard_info)
    adv = F.binary_cross_entropy_with_logits(hard_out, torch.ones_like(hard_out))
    with torch.no_grad():
        easy_info = self_information(model32(easy["image"]), size)
    easy_out = discriminator(easy_info)
    hard_out_d = discriminator(hard_info.detach())
    d_loss = (F.binary_cross_entropy_with_logits(easy_out, torch.ones_like(easy_out))
              + F.binary_cross_entropy_with_logits(hard_out_d, torch.zeros_like(hard_out_d))) / 2
    return easy_loss, adv, d_loss


@pytest.mark.parametrize("soft_targets", ["crop", "pass"])
def test_phase2_step_equals_bootstrapping_plus_intra_domain_adversarial(fixture_root, init_model,
                                                                       tmp_path, soft_targets):
    """One tpld_phase2 step (beta 0.8, gamma 3, lambda_adv 10): the easy loss, the adversarial
    loss, D's loss, the segmenter's gradients (head and backbone convs) and D's gradients equal
    TPLD Eq. 3-6 written out, the SGD updates follow them, and after the step the teacher still
    gives the outputs of the model the round started from."""
    lr, d_lr, lambda_adv = 0.05, 0.05, 10.0
    config, stage, student, easy, hard = phase2_stage(fixture_root, init_model, tmp_path, lr,
                                                      d_lr, lambda_adv=lambda_adv,
                                                      soft_targets=soft_targets)
    lambdas = lambdas_of(stage)
    y, confident, q = easy_targets(init_model, config, easy, lambdas)
    soft_q = q[~confident.unsqueeze(1).expand_as(q)]
    assert confident.any() and (~confident).any() and ((soft_q > 0.2) & (soft_q < 1)).any()
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    d_before = {name: p.detach().clone() for name, p in stage.discriminator.named_parameters()}
    reference, reference32 = float64_copy(student), copy.deepcopy(student)
    d_reference = copy.deepcopy(stage.discriminator)

    parts = stage.step(student, 0)

    easy_loss, adv, d_loss = expected_phase2(reference, reference32, d_reference, easy, hard, y,
                                             lambdas, lambda_adv)
    for name, value in (("easy_loss", easy_loss), ("adv", adv), ("discriminator", d_loss)):
        torch.testing.assert_close(parts[name].double(), value.detach().double(), rtol=1e-5,
                                   atol=0, msg=lambda text: f"{name}: {text}")
    params, params32 = dict(reference.named_parameters()), dict(reference32.named_parameters())
    easy_grads = torch.autograd.grad(easy_loss, [params[name] for name in MODEL_PARAMS])
    adv_grads = torch.autograd.grad(lambda_adv * adv, [params32[name] for name in MODEL_PARAMS],
                                    retain_graph=True)
    grads = [e + a.double() for e, a in zip(easy_grads, adv_grads)]
    # The adversarial part must weigh in the compared gradients, or a wrong sign, label or
    # weight of it would hide inside the tolerance.
    assert all(a.norm() > 0.05 * g.norm() for a, g in zip(adv_grads, grads))
    assert_grads(student, MODEL_PARAMS, grads, lr, before)
    d_params = dict(d_reference.named_parameters())
    d_grads = torch.autograd.grad(d_loss, [d_params[name] for name in D_PARAMS])
    assert_grads(stage.discriminator, D_PARAMS, [g.double() for g in d_grads], d_lr, d_before)
    assert_teacher_is_the_start(stage, student, init_model, config, easy)


@pytest.mark.parametrize("soft_targets", ["crop", "pass"])
def test_phase2_bootstrapping_step_moves_easy_predictions_toward_their_targets(
        fixture_root, init_model, tmp_path, soft_targets):
    """With lambda_adv = 0, one phase-2 step raises the model's probability of the confident
    easy pixels' classes and lowers the cross-entropy of its predictions to the normalised
    calibrated targets on the other easy pixels."""
    config, stage, student, easy, hard = phase2_stage(fixture_root, init_model, tmp_path, 1e-4,
                                                      0.05, lambda_adv=0.0,
                                                      soft_targets=soft_targets)
    lambdas = lambdas_of(stage)
    y, confident, _ = easy_targets(init_model, config, easy, lambdas)

    def measure():
        with torch.no_grad():
            log_p = torch.log_softmax(upsampled(student(easy["image"]).double(),
                                                easy["image"].shape[-2:]), 1)
        cross = -(y / y.sum(1, keepdim=True) * log_p).sum(1)
        return cross[confident].mean(), cross[~confident].mean()

    confident_before, soft_before = measure()
    stage.step(student, 0)
    confident_after, soft_after = measure()
    assert confident_after < confident_before - 1e-4
    assert soft_after < soft_before - 1e-4


def test_phase2_segmenter_step_lowers_the_adversarial_loss_with_d_fixed(fixture_root,
                                                                        init_model, tmp_path):
    """One phase-2 step with the adversarial term dominant (lambda_adv 200; the easy crops'
    loss alone would lower the adversarial loss too, but 6 times less): the discriminator
    as it was before the step finds the hard crops' maps more like easy ones (lower
    BCE(D(I_hard), 1)), and the discriminator's own step lowers its loss on the same maps."""
    config, stage, student, easy, hard = phase2_stage(fixture_root, init_model, tmp_path, 1e-5,
                                                      0.05, lambda_adv=200.0)
    size = easy["image"].shape[-2:]
    fixed = copy.deepcopy(stage.discriminator).requires_grad_(False)

    def adv_loss(discriminator):
        with torch.no_grad():
            out = discriminator(self_information(student(hard["image"]), size))
        return F.binary_cross_entropy_with_logits(out, torch.ones_like(out))

    def d_loss(discriminator, easy_info, hard_info):
        with torch.no_grad():
            easy_out, hard_out = discriminator(easy_info), discriminator(hard_info)
        return (F.binary_cross_entropy_with_logits(easy_out, torch.ones_like(easy_out))
                + F.binary_cross_entropy_with_logits(hard_out, torch.zeros_like(hard_out))) / 2

    with torch.no_grad():
        easy_info = self_information(student(easy["image"]), size)
        hard_info = self_information(student(hard["image"]), size)
    adv_before = adv_loss(fixed)
    stage.step(student, 0)
    assert adv_loss(fixed) < adv_before - 1e-4
    assert d_loss(stage.discriminator, easy_info, hard_info) < \
        d_loss(fixed, easy_info, hard_info) - 1e-4
