"""An IAST self-training round (docs/ops.md §1 and docs/recipes.md §4): a pseudo-label pass, then training on the pseudo
labels with the region losses.

Before its first iteration the round labels the whole target train set, resized to its
``pseudo_size``, with the model it starts from (the previous stage's last checkpoint: a warm-up,
or source-only directly), in eval mode; under ``chain: released`` with the snapshot that
``fastst.methods.chain`` names instead (``label_model``). The stage key ``selector`` picks how
pixels are selected (IAST Fig. 4 and Table 5):

* ``ias`` (default): the instance-adaptive selector, ``fastst.methods.labelling.ias_pass`` with
  this round's ``alpha`` and the ``pseudo`` settings (beta, gamma, mode official/paper, group,
  order);
* ``constant``: a fixed threshold, ``argmax p`` where ``p / threshold >= 1`` (float32 IEEE
  division, i.e. ``max p >= threshold`` as float32), else ignored: ``cbst_pass`` with every
  class's threshold set to ``threshold`` (no EMA, no threshold pass, one model pass);
* ``cbst``: class-balanced thresholds over the whole target set at ``portion`` (Zou et al.),
  ``fastst.methods.labelling.cbst_pass`` on the single 1.0-scale view without flip, with
  ``subsample``, no voting: ``argmax p / lambda`` where ``max p / lambda >= 1``.

Every selector writes the same label PNGs (DIR/<round>/pseudo/labels/<stem>_pseudo_label.png,
at the pseudo-label size) and a manifest (DIR/<round>/pseudo/manifest.json, in the selector's
format: IAS's, or the class-balanced pass's for cbst and constant), and every pass resumes
from its own state if killed.

Training then reads ``PseudoLabelDataset(target images, labels)`` with the target augmentation
(labels nearest-upsampled to the image before the crop) and minimises ``region_loss(logits,
pseudo label, lambda_kld, lambda_ent)``: CE plus the KLD-to-uniform term R_c on labelled pixels
and the entropy term R_i on ignored ones (0 turns a term off), the upsample fused in. With
``source_weight > 0`` a source batch adds ``source_weight * CE`` (0 in the released recipe, and
then no source image is read at all; iterations are still counted in source epochs).

The result's ``pseudo`` summary has, for every selector, ``selector``, ``labelled_fraction``,
``density`` (per class), ``theta`` (the per-class thresholds that labelled the last image: IAS's
final EMA, the constant threshold, or CBST's lambdas) and ``seconds``, plus ``threshold``
(constant) or ``portion`` (cbst).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from fastst.config_checks import (COMMON_STAGE_DEFAULTS, check_choice, check_int, check_real,
                                  check_size)
from fastst.data.pseudo_label import PseudoLabelDataset
from fastst.methods.datasets import build_role, crop_transform
from fastst.methods.labelling import (LABEL_DIR, cbst_pass, ias_pass, read_cbst_manifest,
                                      read_ias_manifest, require_finished_pass)
from fastst.methods.source_only import cross_entropy
from fastst.methods.trainer import Stage
from fastst.ops import region_loss

__all__ = ["IASTRound"]

PSEUDO_DIR = "pseudo"
# The class-balanced and constant selectors' view: the round's pseudo-label input as it is, as
# IAS sees it (not the 0.9-scale + flip views of the CBST rounds).
CBST_SCALES = (1.0,)
CBST_FLIP = False


SELECTORS = ("ias", "constant", "cbst")


class IASTRound(Stage):
    method = "iast"
    # selector: "ias" (instance-adaptive, pseudo.mode), "constant" (max p >= threshold) or
    # "cbst" (class-balanced thresholds at portion, with subsample).
    DEFAULTS = {**COMMON_STAGE_DEFAULTS, "alpha": 0.2, "pseudo_size": [640, 1280],
                "lambda_kld": 0.1, "lambda_ent": 3.0, "source_weight": 0.0, "selector": "ias",
                "threshold": 0.9, "portion": 0.2, "subsample": 4}

    @classmethod
    def validate(cls, config, prefix: str) -> None:
        """ConfigError naming the first IAST key of stage ``prefix`` that is invalid."""
        check_real(config, f"{prefix}.alpha", 0, 1, low_open=True)
        check_size(config, f"{prefix}.pseudo_size")
        check_real(config, f"{prefix}.lambda_kld", 0)
        check_real(config, f"{prefix}.lambda_ent", 0)
        check_real(config, f"{prefix}.source_weight", 0)
        check_choice(config, f"{prefix}.selector", SELECTORS)
        check_real(config, f"{prefix}.threshold", 0, 1, low_open=True)
        check_real(config, f"{prefix}.portion", 0, 1)
        check_int(config, f"{prefix}.subsample", 1)

    @property
    def pseudo_dir(self):
        return self.dir / PSEUDO_DIR

    @property
    def selector(self) -> str:
        return self.settings["selector"]

    def read_pseudo_manifest(self) -> Optional[Dict[str, Any]]:
        """The manifest of this round's selector in its pseudo directory, or None."""
        if self.selector in ("cbst", "constant"):
            return read_cbst_manifest(self.pseudo_dir)
        return read_ias_manifest(self.pseudo_dir)

    def before_training(self, model: nn.Module, resumed: bool) -> None:
        if resumed:
            self.manifest = require_finished_pass(self.read_pseudo_manifest(), self.pseudo_dir,
                                                  self.checkpoint_path)
            return
        # chain=released labels with another checkpoint than the one the round trains from.
        labeller = model if self.label_model is None else \
            self.label_model().to(self.ctx.device, memory_format=self.ctx.memory_format)
        self.manifest = self.label_pass(labeller, self.pseudo_dir)

    def label_pass(self, model: nn.Module, out_dir) -> Dict[str, Any]:
        """Label the target train set with ``model`` by this round's selector into ``out_dir``
        (labels/ and manifest.json); the round's own pass, and ``python -m fastst.pseudo``'s."""
        settings, pseudo = self.settings, self.ctx.config["pseudo"]
        images = build_role(self.ctx.config, "target", resize=settings["pseudo_size"])
        if self.selector in ("cbst", "constant"):
            # constant: every class's threshold is `threshold` (pass 1 skipped).
            threshold = settings["threshold"] if self.selector == "constant" else None
            return cbst_pass(model, images, out_dir, self.ctx, portion=settings["portion"],
                             scales=CBST_SCALES, flip=CBST_FLIP, subsample=settings["subsample"],
                             vote=None, batch_size=pseudo["batch_size"], colour=pseudo["colour"],
                             threshold=threshold, tag=self.name)
        return ias_pass(model, images, out_dir, self.ctx, alpha=settings["alpha"],
                        size=settings["pseudo_size"], beta=pseudo["beta"], gamma=pseudo["gamma"],
                        mode=pseudo["mode"], group=pseudo["group"],
                        batch_size=pseudo["batch_size"], order_seed=pseudo["order_seed"],
                        colour=pseudo["colour"], tag=self.name)

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
        # The unweighted parts only on logging steps: a term with lambda 0 then costs nothing
        # on the other steps (region_loss skips it unless the parts are asked for).
        logging_step = (iteration + 1) % ctx.runtime["log_every"] == 0
        out = region_loss(logits, labels, lambda_kld=self.settings["lambda_kld"],
                          lambda_ent=self.settings["lambda_ent"], size=tuple(labels.shape[-2:]),
                          return_parts=logging_step)
        loss = out[0] if logging_step else out
        loss.backward()
        self.finite_guard(target_loss=loss, **parts)
        optimizer.step()
        parts["target_loss"] = loss.detach()
        if logging_step:
            parts.update({"target_ce": out[1], "kld": out[2], "ent": out[3]})
        if self.log_images_now:
            self.visual = {"image": images, "logits": logits, "label": labels}
        return parts

    def restore_finished(self, state) -> None:
        self.manifest = self.read_pseudo_manifest()

    def thresholds(self) -> List[float]:
        """The per-class thresholds of the pass (see the module docstring), C floats."""
        manifest = self.manifest
        return list(manifest["theta"] if self.selector == "ias" else manifest["lambdas"])

    def pseudo_summary(self) -> Optional[Dict[str, Any]]:
        manifest = self.manifest
        if manifest is None:
            return None
        summary = {"selector": self.selector, "labelled_fraction": manifest["labelled_fraction"],
                   "density": manifest["density"], "theta": self.thresholds(),
                   "seconds": manifest["seconds"]}
        if self.selector == "constant":
            summary["threshold"] = manifest["settings"]["threshold"]
        elif self.selector == "cbst":
            summary["portion"] = manifest["settings"]["portion"]
        return summary

    def extra_state(self) -> Dict[str, Any]:
        return {"theta": torch.tensor(self.thresholds(), dtype=torch.float64),
                "pseudo_density": torch.tensor(self.manifest["density"], dtype=torch.float64)}
