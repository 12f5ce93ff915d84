"""The IAS pseudo-label pass of the IAST rounds (docs/ops.md §1, docs/recipes.md §4).

The pass visits the images in the order ``torch.randperm(N, generator=
torch.Generator().manual_seed(order_seed))`` (0 in the recipe, the same every round), in batches of
``batch_size`` (a multiple of the IAS instance ``group``). The model runs in eval mode without
gradients, in float32 as the released code labels (channels_last on CUDA; bf16 autocast only
with ``runtime.amp_pseudo=true``), so the labels and thresholds of a checkpoint are those of the
op on its float32 logits; its logits, at 1/8 of the image, go straight
to ``fastst.ops.ias_pseudo_label(from_logits=True, size=pseudo size)``, which upsamples, takes the
softmax and updates the class thresholds theta; theta stays on the device from batch to batch,
starting at 0.9 for every class. Label maps are written as PNGs by a pool of threads while the
model runs on the next batch.

Resumption: every ``state_every`` batches, once the PNGs written so far are on disk, the pass
state (images done, theta, per-image thetas, class histogram) is saved atomically to
DIR/state.pt; a rerun continues from there and gives the same labels and thresholds as an
uninterrupted pass. The finished pass writes DIR/manifest.json (atomically) and removes the state.
The labels a state or manifest vouches for are verified before they are trusted
(``verify_labels``: present, and a whole PNG from signature to IEND chunk, since the PNGs are
not fsynced and a power cut can leave one empty); if one is not, the pass starts over.

Several processes (``torchrun``; ``fastst.distributed``): the one-process batches are dealt to
the ranks in steps of N (``DistributedContext.pass_steps``), each rank runs the model on its
batch, the ranks' 1/8-resolution logits of the step are all-gathered, and every rank runs
``ias_pseudo_label`` on the whole step with the same theta: the EMA sees the instances in the
one-process order, so labels, thresholds and the manifest equal those of one process (the op is
exact whatever the batch boundaries, as long as they do not split an instance). Each rank writes
the PNGs of its own images; rank 0 writes the state and the manifest. Why the logits: they are
the smallest exact input of the op (C * 4 bytes per 64 label pixels in float32, about 1.2 bytes
per pixel for C = 19, half that in bf16, against 5 bytes for per-pixel max/argmax or 4-8 for
packed keys), and the statistics pass every rank then repeats over the step is a small fraction
of a model forward.

manifest.json: {"format": "fastst-pseudo-v1", "complete": true, "settings": {mode, alpha, beta,
gamma, group, size, batch_size, order_seed, num_images, num_classes}, "theta": [C] (after the
last image), "density": [C] (fraction of all pixels labelled with each class),
"labelled_fraction", "class_names", "seconds", "images": [{"name", "theta": [C]}, ...] in
visiting order, theta being the thresholds that labelled the image}.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from fastst.methods.context import RunContext
from fastst.methods.labelling.base import LabelPass, class_names, read_manifest
from fastst.ops import ias_pseudo_label

__all__ = ["IASPass", "ias_pass", "MANIFEST_FORMAT", "read_ias_manifest"]

MANIFEST_FORMAT = "fastst-pseudo-v1"


def read_ias_manifest(out_dir) -> Optional[Dict[str, Any]]:
    """The manifest of an IAS pass in ``out_dir``, or None if it is missing, unreadable or of
    another format."""
    return read_manifest(out_dir, MANIFEST_FORMAT)


class IASPass(LabelPass):
    """The IAS pass (module docstring); ``IASPass(model, dataset, out_dir, ctx, alpha=,
    size=, ...).run()`` -> manifest. size: (H, W) of the pseudo labels."""

    MANIFEST_FORMAT = MANIFEST_FORMAT

    def __init__(self, model: torch.nn.Module, dataset, out_dir, ctx: RunContext, *,
                 alpha: float, size: Sequence[int], beta: float = 0.9, gamma: float = 8.0,
                 mode: str = "official", group: int = 2, batch_size: int = 2,
                 order_seed: int = 0, colour: bool = False, tag: str = "pseudo"):
        num_classes = int(model.model_config["num_classes"]) if hasattr(model, "model_config") \
            else None
        settings = {"mode": mode, "alpha": float(alpha), "beta": float(beta),
                    "gamma": float(gamma), "group": int(group), "size": [int(s) for s in size],
                    "batch_size": int(batch_size), "order_seed": int(order_seed),
                    "num_images": len(dataset), "num_classes": num_classes}
        if batch_size % group:
            raise ValueError(f"batch_size {batch_size} must be a multiple of group {group}, so "
                             "that no IAS instance straddles two batches")
        super().__init__(model, dataset, out_dir, ctx, settings, colour=colour, tag=tag)

    def label(self, state: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        settings, ctx, dctx = self.settings, self.ctx, self.dctx
        device, num_classes, group = ctx.device, settings["num_classes"], settings["group"]
        size = tuple(settings["size"])
        num_images = settings["num_images"]
        order = torch.randperm(num_images,
                               generator=torch.Generator().manual_seed(settings["order_seed"]))
        done = state["done"] if state else 0
        self.theta = (state["theta"].to(device) if state else
                      torch.full((num_classes,), 0.9, dtype=torch.float64, device=device))
        histogram = (state["histogram"].to(device) if state else
                     torch.zeros(256, dtype=torch.int64, device=device))
        names: List[str] = list(state["names"]) if state else []
        self.thetas_done = state["image_thetas"] if state else \
            torch.zeros(0, num_classes, dtype=torch.float64)
        self.thetas_pending: List[torch.Tensor] = []

        def step(batch: Optional[Mapping[str, Any]], spans, done: int) -> None:
            start, stop = spans[dctx.rank]
            images = logits = None
            batch_names: List[str] = []
            if batch is not None:
                images = ctx.images_to_device(batch["image"])
                with ctx.autocast(pseudo=True):
                    logits = self.model(images)
                batch_names = list(batch["name"])
            step_names = batch_names
            if dctx.is_distributed:  # the whole step's logits and names on every rank
                logits = torch.cat(dctx.all_gather_batches(logits, device))
                step_names = [n for part in dctx.all_gather_object(batch_names) for n in part]
            labels, self.theta, per_instance = ias_pseudo_label(
                logits, self.theta, alpha=settings["alpha"], beta=settings["beta"],
                gamma=settings["gamma"], mode=settings["mode"], from_logits=True, size=size,
                group=group)
            self.thetas_pending.append(per_instance.repeat_interleave(group, 0)[:labels.shape[0]])
            # index_add_, not bincount: CUDA's bincount reads the maximum back to the host.
            flat = labels.reshape(-1).long()
            histogram.index_add_(0, flat, torch.ones_like(flat))
            own = labels[start - spans[0][0]:stop - spans[0][0]]
            if batch_names:
                self.write_labels(batch_names, own)
            if images is not None:
                self.log_images(images, own, done)
            names.extend(step_names)

        def snapshot(done: int) -> None:
            self.wait_for_writes()
            self._merge_thetas()
            dctx.barrier()  # every rank's PNGs so far are on disk before the state vouches
            self.save_state({"settings": settings, "done": done, "theta": self.theta.cpu(),
                             "histogram": histogram.cpu(), "names": list(names),
                             "image_thetas": self.thetas_done, "seconds": self.seconds()})
            if ctx.writer is not None:
                for c, name in enumerate(class_names(num_classes)):
                    ctx.writer.add_scalar(f"{self.tag}/theta_during_pass/{name}",
                                          float(self.theta[c]), done)

        self.visit(order[done:].tolist(), done, f"{self.tag} labels", step, snapshot,
                   batch_size=settings["batch_size"])
        self.wait_for_writes()
        self._merge_thetas()
        counts = histogram.cpu()
        total_pixels = max(1, num_images * size[0] * size[1])
        density = [int(counts[c]) / total_pixels for c in range(num_classes)]
        return {"format": MANIFEST_FORMAT, "complete": True, "settings": settings,
                "theta": self.theta.cpu().tolist(), "density": density,
                "labelled_fraction": sum(density), "class_names": class_names(num_classes),
                "seconds": self.seconds(),
                "images": [{"name": name, "theta": row}
                           for name, row in zip(names, self.thetas_done.tolist())]}

    def _merge_thetas(self) -> None:
        if self.thetas_pending:
            self.thetas_done = torch.cat([self.thetas_done]
                                         + [t.cpu() for t in self.thetas_pending])
            self.thetas_pending = []

    def log_manifest(self, manifest: Mapping[str, Any]) -> None:
        writer = self.ctx.writer
        for c, name in enumerate(manifest["class_names"]):
            writer.add_scalar(f"{self.tag}/theta/{name}", manifest["theta"][c], 0)
            writer.add_scalar(f"{self.tag}/density/{name}", manifest["density"][c], 0)
        writer.add_scalar(f"{self.tag}/labelled_fraction", manifest["labelled_fraction"], 0)


def ias_pass(model: torch.nn.Module, dataset, out_dir, ctx: RunContext,
             **options) -> Dict[str, Any]:
    """``IASPass(model, dataset, out_dir, ctx, **options).run()``: label every image of
    ``dataset`` (items {"image": float (3,H,W), "name": str}) and write labels and manifest under
    ``out_dir``; returns the manifest. A finished pass with the same settings is not redone."""
    return IASPass(model, dataset, out_dir, ctx, **options).run()
