"""The pipeline around the ops: one IAST self-training iteration and the IAS pseudo-label pass,
fastst's fused ops against the same pipeline built from eager torch ops as the released code.

- ``iteration``: forward of DeepLab-v2 on a batch of crops, the region loss (CE + KLD on
  labelled pixels + entropy on ignored ones, lambda 0.1 / 3.0), backward, Adam step (backbone lr,
  head 10x, BN affine frozen as after source-only). ``fused`` = ``fastst.ops.region_loss`` on the
  1/8-resolution logits (upsample fused, forward and backward); ``eager`` = the released
  formulation (``F.interpolate`` of the logits to the crop, log_softmax, softmax, masked sums;
  bench/_region_loss_impls.py). Reported as images/s (batch / median time). On CUDA also
  ``fused_graphs``: the fused loss with the network under ``torch.compile(mode="reduce-overhead")``
  (CUDA graphs; ``runtime.compile``).
- ``pseudo``: one batch of the IAS pass (docs/ops.md §1.2, official mode, group 2): model forward in eval
  mode without gradients, then the labels. ``fused`` = ``ias_pseudo_label(logits,
  from_logits=True, size=pseudo size)``; ``released`` = what the released code does: softmax of
  the logits upsampled to the pseudo size in torch, then its NumPy per-class percentile loop
  and per-pixel threshold lookup (bench/test_ias.py). Images/s as above; PNG writing (the same
  for both) is left out.

Shapes: on CUDA the released recipe (ResNet-101, crops 512x1024, batch 8; pseudo labels
1280x640 (H x W = 640 x 1280), batch 2), bf16 autocast and channels_last as the pipeline runs;
on the CPU ResNet-18 at a quarter width ("resnet18_w16", the demo's net) with crops 128x256 and
pseudo size 256x512 (FASTST_BENCH_QUICK=1: 64x128 and 128x256), float32 — there the loss and
the labelling weigh far more against the small net than they do against ResNet-101.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK
from _region_loss_impls import LAMBDA_ENT, LAMBDA_KLD, released_region_loss
from fastst.models import deeplabv2
from fastst.ops import ias_pseudo_label, region_loss
from test_ias import _released_numpy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
C = 19
if DEVICE == "cuda":
    BACKBONE, CROP, BATCH, PSEUDO, PSEUDO_BATCH = "resnet101", (512, 1024), 8, (640, 1280), 2
elif QUICK:
    BACKBONE, CROP, BATCH, PSEUDO, PSEUDO_BATCH = "resnet18_w16", (64, 128), 2, (128, 256), 2
else:
    BACKBONE, CROP, BATCH, PSEUDO, PSEUDO_BATCH = "resnet18_w16", (128, 256), 2, (256, 512), 2
AMP = torch.bfloat16 if DEVICE == "cuda" else None
MEMORY_FORMAT = torch.channels_last if DEVICE == "cuda" else torch.contiguous_format


def _autocast():
    if AMP is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=DEVICE, dtype=AMP)


def _model():
    torch.manual_seed(0)
    model = deeplabv2(num_classes=C, backbone=BACKBONE)
    return model.to(DEVICE, memory_format=MEMORY_FORMAT)


def _images(batch, size, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *size, generator=generator)
    return images.to(DEVICE, memory_format=MEMORY_FORMAT)


def _pseudo_labels(batch, size):
    """uint8 (B, H, W) labels with 30 % ignored pixels, as IAS labels leave them."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, C, (batch, *size), generator=generator, dtype=torch.uint8)
    labels[torch.rand(batch, *size, generator=generator) < 0.3] = 255
    return labels.to(DEVICE)


def _fused_loss(logits, labels):
    return region_loss(logits, labels, lambda_kld=LAMBDA_KLD, lambda_ent=LAMBDA_ENT,
                       size=tuple(labels.shape[-2:]))


def _eager_loss(logits, labels):
    return released_region_loss(logits.float(), labels)


# fused_graphs: runtime.compile=reduce-overhead (torch.compile with CUDA graphs), GPU only.
ITERATION_IMPLS = ["fused", "eager"] + (["fused_graphs"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("impl", ITERATION_IMPLS)
def test_self_training_iteration(benchmark, run, note, impl):
    model = _model().train()
    model.freeze_bn_affine(True)
    optimizer = torch.optim.Adam(model.param_groups(2.5e-6, 2.5e-5), betas=(0.9, 0.999),
                                 weight_decay=5e-4)
    images, labels = _images(BATCH, CROP, 0), _pseudo_labels(BATCH, CROP)
    loss_fn = _eager_loss if impl == "eager" else _fused_loss
    forward = torch.compile(model, mode="reduce-overhead") if impl == "fused_graphs" else model

    def iteration():
        optimizer.zero_grad(set_to_none=True)
        with _autocast():
            logits = forward(images)
        loss = loss_fn(logits, labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    group = f"IAST iteration {BACKBONE} B={BATCH} crop {CROP[0]}x{CROP[1]} {DEVICE}"
    if impl == "fused_graphs":  # compilation and graph recording happen in the first calls
        for _ in range(3):
            iteration()
    loss = run(benchmark, group, impl, iteration, device=DEVICE)
    assert torch.isfinite(loss)
    seconds = benchmark.stats.stats.median
    note("pipeline throughput (images/s = batch / median time)",
         f"{group}: {impl:<8} {seconds * 1e3:9.1f} ms  {BATCH / seconds:8.2f} images/s")


def _released_labels(logits):
    probs = torch.softmax(F.interpolate(logits.float(), size=PSEUDO, mode="bilinear",
                                        align_corners=True), dim=1)
    return torch.from_numpy(_released_numpy(probs.cpu().numpy(), alpha=0.2))


@pytest.mark.parametrize("impl", ["fused", "released"])
def test_pseudo_label_pass(benchmark, run, note, impl):
    model = _model().eval()
    images = _images(PSEUDO_BATCH, PSEUDO, 2)

    @torch.no_grad()
    def labels_of_a_batch():
        with _autocast():
            logits = model(images)
        if impl == "fused":
            return ias_pseudo_label(logits, None, alpha=0.2, mode="official", from_logits=True,
                                    size=PSEUDO, group=2)[0]
        return _released_labels(logits)

    group = (f"IAS pass batch {BACKBONE} B={PSEUDO_BATCH} pseudo {PSEUDO[0]}x{PSEUDO[1]} "
             f"{DEVICE}")
    labels = run(benchmark, group, impl, labels_of_a_batch, device=DEVICE)
    assert tuple(labels.shape) == (PSEUDO_BATCH, *PSEUDO) and labels.dtype == torch.uint8
    seconds = benchmark.stats.stats.median
    note("pipeline throughput (images/s = batch / median time)",
         f"{group}: {impl:<8} {seconds * 1e3:9.1f} ms  {PSEUDO_BATCH / seconds:8.2f} images/s")


def test_fused_and_released_pass_agree():
    """The two pseudo-label paths the benchmark times give the same labels (a meaningful race),
    up to pixels whose top-2 probabilities or threshold margin are within 1e-6 (docs/ops.md §0)."""
    model = _model().eval()
    images = _images(PSEUDO_BATCH, PSEUDO, 2)
    with torch.no_grad(), _autocast():
        logits = model(images)
    fused = ias_pseudo_label(logits, None, alpha=0.2, mode="official", from_logits=True,
                             size=PSEUDO, group=2)[0].cpu()
    released = _released_labels(logits)
    assert (fused != released).float().mean() < 1e-3
