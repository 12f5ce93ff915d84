"""Source-only training (docs/recipes.md §4, first stage): cross-entropy on labelled source crops.

The loss is ``fastst.ops.region_loss`` with lambda_kld = lambda_ent = 0, i.e. the mean
cross-entropy over pixels whose label is not 255, computed from the 1/8-resolution logits with
the bilinear upsample to the crop size fused into the loss (no full-size logits are made).
"""
from typing import Dict

import torch
from torch import nn

from fastst.config_checks import COMMON_STAGE_DEFAULTS
from fastst.methods.trainer import Stage
from fastst.ops import region_loss

__all__ = ["SourceOnly", "cross_entropy"]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE with ignore 255 of low-resolution ``logits`` (B, C, h, w) against ``labels``
    (B, H, W), the logits upsampled to (H, W) inside the fused op."""
    return region_loss(logits, labels, lambda_kld=0.0, lambda_ent=0.0,
                       size=tuple(labels.shape[-2:]))


class SourceOnly(Stage):
    method = "source_only"
    # The stage keys (fastst.config.COMMON_STAGE_DEFAULTS; BN affine parameters train).
    DEFAULTS = {**COMMON_STAGE_DEFAULTS, "freeze_bn_affine": False}

    @classmethod
    def validate(cls, config, prefix: str) -> None:
        """Nothing beyond the keys every stage has (checked by fastst.config)."""

    def setup(self, model: nn.Module) -> None:
        self.source = self.stream("source", self.settings["batch_size"])
        self.set_iterations(len(self.source.dataset))
        self.batches = None
        self.optimizers = [self.model_optimizer(model)]

    def step(self, model: nn.Module, iteration: int) -> Dict[str, torch.Tensor]:
        if self.batches is None:
            self.batches = self.source.batches(start=iteration)
        batch = next(self.batches)
        images = self.ctx.images_to_device(batch["image"])
        labels = batch["label"].to(self.ctx.device, non_blocking=True)
        optimizer = self.optimizers[0]
        optimizer.zero_grad(set_to_none=True)
        with self.ctx.autocast():
            logits = model(images)
        loss = cross_entropy(logits, labels)
        loss.backward()
        self.finite_guard(source_ce=loss)
        optimizer.step()
        if self.log_images_now:
            self.visual = {"image": images, "logits": logits, "label": labels}
        return {"source_ce": loss.detach()}
