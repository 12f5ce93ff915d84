"""Adversarial warm-up (SPEC 4, second stage): output-space LS-GAN as in AdaptSegNet / IAST.

Each iteration takes a labelled source batch and an unlabelled target batch (``batch_size``
each) and makes two updates:

1. segmenter, discriminator frozen: ``ce(source) + lambda_adv * MSE(D(p_t), 0)``, i.e. the
   target prediction is pushed to look like a source one (source label 0, target label 1);
2. discriminator, on detached maps: ``(MSE(D(p_s), 0) + MSE(D(p_t), 1)) / 2``.

``p`` is the softmax of the logits bilinearly upsampled (align_corners=True) to the crop size;
D is ``FCDiscriminator(C, ndf, first_kernel)``. D's Adam uses ``d_lr`` and follows the same
cosine schedule as the segmenter.
"""
from typing import Any, Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fastst.methods.source_only import cross_entropy
from fastst.methods.trainer import Stage
from fastst.models import FCDiscriminator

__all__ = ["Warmup", "SOURCE_LABEL", "TARGET_LABEL", "discriminator_loss", "adversarial_loss",
           "class_probabilities"]

SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0


def class_probabilities(logits: torch.Tensor, size) -> torch.Tensor:
    """softmax over classes of ``logits`` (B, C, h, w) upsampled to ``size``, in float32."""
    upsampled = F.interpolate(logits.float(), size=tuple(size), mode="bilinear",
                              align_corners=True)
    return torch.softmax(upsampled, dim=1)


def _mse_to(outputs: torch.Tensor, label: float) -> torch.Tensor:
    return F.mse_loss(outputs, torch.full_like(outputs, label))


def discriminator_loss(discriminator: nn.Module, source_probs: torch.Tensor,
                       target_probs: torch.Tensor) -> torch.Tensor:
    """LS-GAN loss of D: ``(MSE(D(source), 0) + MSE(D(target), 1)) / 2`` on detached maps."""
    return (_mse_to(discriminator(source_probs.detach()), SOURCE_LABEL)
            + _mse_to(discriminator(target_probs.detach()), TARGET_LABEL)) / 2


def adversarial_loss(discriminator: nn.Module, target_probs: torch.Tensor) -> torch.Tensor:
    """The segmenter's LS-GAN loss: ``MSE(D(target), 0)``, target maps made to pass as source."""
    return _mse_to(discriminator(target_probs), SOURCE_LABEL)


class Warmup(Stage):
    method = "warmup"

    def setup(self, model: nn.Module) -> None:
        batch_size = self.settings["batch_size"]
        self.source = self.stream("source", batch_size)
        self.target = self.stream("target", batch_size)
        self.set_iterations(len(self.source.dataset))
        self.source_batches = self.target_batches = None
        torch.manual_seed(self.seed_of("discriminator") % 2**63)
        num_classes = model.model_config["num_classes"]
        self.discriminator = FCDiscriminator(num_classes, ndf=self.settings["d_ndf"],
                                             first_kernel=self.settings["d_first_kernel"])
        self.discriminator.to(self.ctx.device, memory_format=self.ctx.memory_format).train()
        optim = self.ctx.config["optim"]
        d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.settings["d_lr"],
                                       betas=tuple(optim["betas"]))
        self.optimizers = [self.model_optimizer(model), d_optimizer]

    def step(self, model: nn.Module, iteration: int) -> Dict[str, torch.Tensor]:
        if self.source_batches is None:
            self.source_batches = self.source.batches(start=iteration)
            self.target_batches = self.target.batches(start=iteration)
        source, target = next(self.source_batches), next(self.target_batches)
        ctx = self.ctx
        source_images = ctx.images_to_device(source["image"])
        source_labels = source["label"].to(ctx.device, non_blocking=True)
        target_images = ctx.images_to_device(target["image"])
        optimizer, d_optimizer = self.optimizers
        discriminator = self.discriminator

        optimizer.zero_grad(set_to_none=True)
        discriminator.requires_grad_(False)
        with ctx.autocast():
            source_logits = model(source_images)
        ce = cross_entropy(source_logits, source_labels)
        ce.backward()
        with ctx.autocast():
            target_logits = model(target_images)
            target_probs = class_probabilities(target_logits, target_images.shape[-2:])
            adv = adversarial_loss(discriminator, target_probs)
        (self.settings["lambda_adv"] * adv).backward()

        # D's loss reads detached maps of this iteration's forward passes, which the segmenter's
        # update does not change: computed before that update, it is the same, and one check
        # can then skip both updates when a loss is not finite.
        discriminator.requires_grad_(True)
        d_optimizer.zero_grad(set_to_none=True)
        source_probs = class_probabilities(source_logits.detach(), source_images.shape[-2:])
        with ctx.autocast():
            d_loss = discriminator_loss(discriminator, source_probs, target_probs)
        d_loss.backward()
        self.finite_guard(source_ce=ce, adv=adv, discriminator=d_loss)
        optimizer.step()
        d_optimizer.step()
        if self.log_images_now:
            self.visual = {"image": source_images, "logits": source_logits,
                           "label": source_labels}
        return {"source_ce": ce.detach(), "adv": adv.detach(), "discriminator": d_loss.detach()}

    def extra_state(self) -> Dict[str, Any]:
        return {"discriminator": self.discriminator.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
