"""An IAST self-training round (SPEC 1 and 4): a pseudo-label pass, then training on the pseudo
labels with the region losses.

Before its first iteration the round labels the whole target train set, resized to its
``pseudo_size``, with the model it starts from (the previous stage's last checkpoint: a warm-up,
or source-only directly), in eval mode. The stage key ``selector`` picks how pixels are selected
(IAST Fig. 4 and Table 5):

* ``ias`` (default): the instance-adaptive selector, ``fastst.pseudo.ias_pass`` with this round's
  ``alpha`` and the ``pseudo`` settings (beta, gamma, mode official/paper, group, order);
* ``constant``: a fixed threshold, ``argmax p`` where ``max p >= threshold`` (compared in
  float64), else ignored (``constant_pass`` below; no EMA, one model pass);
* ``cbst``: class-balanced thresholds over the whole target set at ``portion`` (Zou et al.),
  ``fastst.cbst_pass.cbst_pass`` on the single 1.0-scale view without flip, with ``subsample``,
  no voting: ``argmax p / lambda`` where ``max p / lambda >= 1``.

Every selector writes the same label PNGs (DIR/<round>/pseudo/labels/<stem>_pseudo_label.png,
at the pseudo-label size) and a manifest (DIR/<round>/pseudo/manifest.json, in the selector's
format), and every pass resumes from its own state if killed.

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

import concurrent.futures
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from fastst.cbst_pass import cbst_pass, read_cbst_manifest
from fastst.data.pseudo_label import PseudoLabelDataset, save_pseudo_labels
from fastst.inference import predict_probs
from fastst.methods.context import RunContext, save_torch_atomic, write_json_atomic
from fastst.methods.datasets import build_role, crop_transform
from fastst.methods.source_only import cross_entropy
from fastst.methods.trainer import Stage
from fastst.ops import region_loss
from fastst.pseudo import (_IMAGES_LOGGED, LABEL_DIR, MANIFEST_NAME, STATE_NAME, _class_names,
                           _labels_present, _load_state, _log_images, ias_pass, read_manifest,
                           require_finished_pass)

__all__ = ["IASTRound", "constant_pseudo_label", "constant_pass", "CONSTANT_MANIFEST_FORMAT"]

PSEUDO_DIR = "pseudo"
CONSTANT_MANIFEST_FORMAT = "fastst-constant-pseudo-v1"
# The class-balanced selector's view: the round's pseudo-label input as it is, as IAS sees it.
CBST_SCALES = (1.0,)
CBST_FLIP = False


def _check_threshold(threshold: object) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")


def constant_pseudo_label(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Constant-threshold pseudo labels (IAST Fig. 4a).

    probs: float (B, C, H, W) class probabilities. threshold: in (0, 1].
    Returns uint8 (B, H, W): ``argmax_c p`` (lowest index on ties) where ``max_c p >= threshold``
    (p widened to float64 for the comparison), else 255."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 4 or not probs.is_floating_point():
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a float (B, C, H, W) tensor, got {shape}")
    if not 2 <= probs.shape[1] <= 255:
        raise ValueError(f"probs must have 2..255 classes (labels are uint8 with 255 = ignore), "
                         f"got {probs.shape[1]}")
    _check_threshold(threshold)
    confidence, labels = probs.max(dim=1)
    ignore = torch.full_like(labels, 255)
    return torch.where(confidence.double() >= threshold, labels, ignore).to(torch.uint8)


def constant_pass(model: nn.Module, dataset, out_dir, ctx: RunContext, *, threshold: float,
                  size: Sequence[int], batch_size: int = 2, colour: bool = False,
                  tag: str = "pseudo") -> Dict[str, Any]:
    """Label every image of ``dataset`` (items {"image": float (3, H, W), "name": str}) with
    ``constant_pseudo_label`` of ``model``'s softmax, its logits bilinearly upsampled
    (align_corners=True) to ``size`` = (H, W), and write out_dir/labels/*.png and
    out_dir/manifest.json; returns the manifest.

    Images are visited in data-set order in batches of ``batch_size``, the model in eval mode
    without gradients. Every ``runtime.pseudo_state_every`` batches the state (images done,
    class histogram) is saved to out_dir/state.pt once its PNGs are on disk, so a killed pass
    resumes; a finished pass with the same settings and all its labels is not redone.

    manifest.json: {"format": "fastst-constant-pseudo-v1", "complete": true, "settings":
    {selector, threshold, size, batch_size, num_images, num_classes}, "theta": [C] (the
    threshold for every class), "density": [C], "labelled_fraction", "class_names", "seconds",
    "images": [{"name"}, ...] in data-set order}."""
    out_dir = Path(out_dir)
    label_dir = out_dir / LABEL_DIR
    _check_threshold(threshold)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    num_classes = int(model.model_config["num_classes"])
    num_images = len(dataset)
    if num_images == 0:
        raise ValueError("dataset is empty: the constant-threshold pass needs at least one "
                         "target image (check the target data set's root and split)")
    settings = {"selector": "constant", "threshold": float(threshold),
                "size": [int(s) for s in size], "batch_size": batch_size,
                "num_images": num_images, "num_classes": num_classes}
    manifest = read_manifest(out_dir, CONSTANT_MANIFEST_FORMAT)
    if manifest is not None and manifest.get("complete") and manifest["settings"] == settings \
            and _labels_present(label_dir, [image["name"] for image in manifest["images"]]):
        return manifest
    # Whichever pass wrote a manifest here, its labels are about to be overwritten.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    started = time.perf_counter()
    state = _load_state(out_dir / STATE_NAME, settings, label_dir)
    done = state["done"] if state else 0
    names: List[str] = list(state["names"]) if state else []
    histogram = (state["histogram"].to(ctx.device) if state else
                 torch.zeros(256, dtype=torch.int64, device=ctx.device))
    seconds_before = state["seconds"] if state else 0.0
    runtime = ctx.runtime
    loader = DataLoader(Subset(dataset, range(done, num_images)), batch_size=batch_size,
                        shuffle=False, num_workers=runtime["workers"], pin_memory=ctx.pin_memory)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=runtime["write_threads"],
                                                 thread_name_prefix="constant-png")
    writes: List[concurrent.futures.Future] = []

    def settle() -> None:
        for future in writes:
            future.result()  # re-raises a failed write before the state claims its image
        writes.clear()

    from tqdm import tqdm

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=num_images, initial=done, desc=f"{tag} labels",
                                   unit="img", disable=not runtime["progress"],
                                   dynamic_ncols=True) as bar:
            for batch_index, batch in enumerate(loader):
                images = ctx.images_to_device(batch["image"])
                probs = predict_probs(model, images, out_size=settings["size"],
                                      autocast_dtype=ctx.amp_dtype)
                labels = constant_pseudo_label(probs, threshold)
                # index_add_, not bincount: CUDA's bincount reads the maximum back to the host.
                flat = labels.reshape(-1).long()
                histogram.index_add_(0, flat, torch.ones_like(flat))
                batch_names = list(batch["name"])
                writes.append(pool.submit(save_pseudo_labels, label_dir, batch_names, labels,
                                          colour))
                if ctx.writer is not None and done < _IMAGES_LOGGED:
                    _log_images(ctx.writer, tag, images, labels)
                names.extend(batch_names)
                done += labels.shape[0]
                bar.update(labels.shape[0])
                if (batch_index + 1) % runtime["pseudo_state_every"] == 0:
                    settle()
                    save_torch_atomic({"settings": settings, "done": done,
                                       "histogram": histogram.cpu(), "names": list(names),
                                       "seconds": seconds_before + time.perf_counter() - started},
                                      out_dir / STATE_NAME)
                ctx.count("pseudo_batches")
            settle()
    finally:
        pool.shutdown(wait=True)
        model.train(was_training)

    counts = histogram.cpu()
    total_pixels = max(1, num_images * settings["size"][0] * settings["size"][1])
    density = [int(counts[c]) / total_pixels for c in range(num_classes)]
    manifest = {"format": CONSTANT_MANIFEST_FORMAT, "complete": True, "settings": settings,
                "theta": [float(threshold)] * num_classes, "density": density,
                "labelled_fraction": sum(density), "class_names": _class_names(num_classes),
                "seconds": seconds_before + time.perf_counter() - started,
                "images": [{"name": name} for name in names]}
    write_json_atomic(manifest, out_dir / MANIFEST_NAME)
    (out_dir / STATE_NAME).unlink(missing_ok=True)
    if ctx.writer is not None:
        for c, name in enumerate(manifest["class_names"]):
            ctx.writer.add_scalar(f"{tag}/density/{name}", density[c], 0)
        ctx.writer.add_scalar(f"{tag}/labelled_fraction", manifest["labelled_fraction"], 0)
    return manifest


class IASTRound(Stage):
    method = "iast"

    @property
    def pseudo_dir(self):
        return self.dir / PSEUDO_DIR

    @property
    def selector(self) -> str:
        return self.settings["selector"]

    def read_pseudo_manifest(self) -> Optional[Dict[str, Any]]:
        """The manifest of this round's selector in its pseudo directory, or None."""
        if self.selector == "cbst":
            return read_cbst_manifest(self.pseudo_dir)
        if self.selector == "constant":
            return read_manifest(self.pseudo_dir, CONSTANT_MANIFEST_FORMAT)
        return read_manifest(self.pseudo_dir)

    def before_training(self, model: nn.Module, resumed: bool) -> None:
        if resumed:
            self.manifest = require_finished_pass(self.read_pseudo_manifest(), self.pseudo_dir,
                                                  self.checkpoint_path)
            return
        settings, pseudo = self.settings, self.ctx.config["pseudo"]
        images = build_role(self.ctx.config, "target", resize=settings["pseudo_size"])
        if self.selector == "constant":
            self.manifest = constant_pass(model, images, self.pseudo_dir, self.ctx,
                                          threshold=settings["threshold"],
                                          size=settings["pseudo_size"],
                                          batch_size=pseudo["batch_size"],
                                          colour=pseudo["colour"], tag=self.name)
        elif self.selector == "cbst":
            self.manifest = cbst_pass(model, images, self.pseudo_dir, self.ctx,
                                      portion=settings["portion"], scales=CBST_SCALES,
                                      flip=CBST_FLIP, subsample=settings["subsample"], vote=None,
                                      batch_size=pseudo["batch_size"], colour=pseudo["colour"],
                                      tag=self.name)
        else:
            self.manifest = ias_pass(model, images, self.pseudo_dir, self.ctx,
                                     alpha=settings["alpha"], size=settings["pseudo_size"],
                                     beta=pseudo["beta"], gamma=pseudo["gamma"],
                                     mode=pseudo["mode"], group=pseudo["group"],
                                     batch_size=pseudo["batch_size"],
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
        self.manifest = self.read_pseudo_manifest()

    def thresholds(self) -> List[float]:
        """The per-class thresholds of the pass (see the module docstring), C floats."""
        manifest = self.manifest
        return list(manifest["lambdas"] if self.selector == "cbst" else manifest["theta"])

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
