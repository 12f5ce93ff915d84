"""An IAST self-training round (SPEC 1 and 4): the IAS pseudo-label pass, then training on the
pseudo labels with the region losses.

Before its first iteration the round labels the whole target train set with the model it starts
from (the previous stage's last checkpoint), in eval mode: ``fastst.pseudo.ias_pass`` with this
round's ``alpha`` and ``pseudo_size`` and the ``pseudo`` settings (beta, gamma, mode, group,
order). Labels land in DIR/<round>/pseudo/labels/, the manifest (theta per image, per-class
density) in DIR/<round>/pseudo/manifest.json; the pass resumes from its own state if killed.

Training then reads ``PseudoLabelDataset(target images, labels)`` with the target augmentation
(labels stored at the pseudo-label size, nearest-upsampled to the image before the crop) and
minimises ``region_loss(logits, pseudo label, lambda_kld, lambda_ent)``: CE plus the KLD-to-uniform
term on labelled pixels and the entropy term on ignored ones, the upsample fused in. With
``source_weight > 0`` a source batch adds ``source_weight * CE`` (0 in the released recipe, and
then no source image is read at all; iterations are still counted in source epochs).
"""
from typing import Any, Dict

import torch
from torch import nn

from fastst.data.pseudo_label import PseudoLabelDataset
from fastst.methods.datasets import build_role, crop_transform
from fastst.methods.source_only import cross_entropy
from fastst.methods.trainer import Stage
from fastst.ops import region_loss
from fastst.pseudo import LABEL_DIR, ias_pass, read_manifest, require_finished_pass

__all__ = ["IASTRound"]

PSEUDO_DIR = "pseudo"


class IASTRound(Stage):
    method = "iast"

    @property
    def pseudo_dir(self):
        return self.dir / PSEUDO_DIR

    def before_training(self, model: nn.Module, resumed: bool) -> None:
        if resumed:
            self.manifest = require_finished_pass(read_manifest(self.pseudo_dir), self.pseudo_dir,
                                                  self.checkpoint_path)
            return
        pseudo = self.ctx.config["pseudo"]
        images = build_role(self.ctx.config, "target", resize=self.settings["pseudo_size"])
        self.manifest = ias_pass(model, images, self.pseudo_dir, self.ctx,
                                 alpha=self.settings["alpha"], size=self.settings["pseudo_size"],
                                 beta=pseudo["beta"], gamma=pseudo["gamma"], mode=pseudo["mode"],
                                 group=pseudo["group"], batch_size=pseudo["batch_size"],
                                 order_seed=pseudo["order_seed"], colour=pseudo["colour"],
                                 tag=self.name)

    def setup(self, model: nn.Module) -> None:
        config, batch_size = self.ctx.config, self.settings["batch_size"]
        images = build_role(config, "target")
        labelled = PseudoLabelDataset(images, self.pseudo_dir / LABEL_DIR,
                                      transform=crop_transform(config, "target"),
                                      seed=self.seed_of("target", "augment"))
        self.target = self.stream("target", batch_size, dataset=labelled)
        source_set = build_role(config, "source", transform=crop_transform(config, "source"),
                                seed=self.seed_of("source", "augment"))
        self.set_iterations(len(source_set))
        self.source = (self.stream("source", batch_size, dataset=source_set)
                       if self.settings["source_weight"] > 0 else None)
        self.target_batches = self.source_batches = None
        self.optimizers = [self.model_optimizer(model)]

    def step(self, model: nn.Module, iteration: int) -> Dict[str, torch.Tensor]:
        ctx = self.ctx
        if self.target_batches is None:
            self.target_batches = self.target.batches(start=iteration)
            if self.source is not None:
                self.source_batches = self.source.batches(start=iteration)
        optimizer = self.optimizers[0]
        optimizer.zero_grad(set_to_none=True)
        parts = {}
        if self.source_batches is not None:
            # Source first: BN running statistics then end each iteration on target batches,
            # the domain the model is evaluated on.
            source = next(self.source_batches)
            with ctx.autocast():
                source_logits = model(ctx.images_to_device(source["image"]))
            source_ce = cross_entropy(source_logits,
                                      source["label"].to(ctx.device, non_blocking=True))
            (self.settings["source_weight"] * source_ce).backward()
            parts["source_ce"] = source_ce.detach()
        batch = next(self.target_batches)
        images = ctx.images_to_device(batch["image"])
        labels = batch["label"].to(ctx.device, non_blocking=True)
        with ctx.autocast():
            logits = model(images)
        loss, ce, kld, ent = region_loss(logits, labels, lambda_kld=self.settings["lambda_kld"],
                                         lambda_ent=self.settings["lambda_ent"],
                                         size=tuple(labels.shape[-2:]), return_parts=True)
        loss.backward()
        self.finite_guard(target_loss=loss, **parts)
        optimizer.step()
        parts.update({"target_loss": loss.detach(), "target_ce": ce, "kld": kld, "ent": ent})
        if self.log_images_now:
            self.visual = {"image": images, "logits": logits, "label": labels}
        return parts

    def restore_finished(self, state) -> None:
        self.manifest = read_manifest(self.pseudo_dir)

    def pseudo_summary(self) -> Dict[str, Any]:
        manifest = self.manifest
        return {"labelled_fraction": manifest["labelled_fraction"],
                "density": manifest["density"], "theta": manifest["theta"],
                "seconds": manifest["seconds"]}

    def extra_state(self) -> Dict[str, Any]:
        return {"theta": torch.tensor(self.manifest["theta"], dtype=torch.float64),
                "pseudo_density": torch.tensor(self.manifest["density"], dtype=torch.float64)}
