"""The class-balanced pseudo-label pass of CBST / CRST and TPLD (docs/recipes.md §5, §6),
resumable.

``ClassBalancedPass(model, dataset, out_dir, ctx, portion=...).run()`` (or ``cbst_pass(...)``)
writes out_dir/labels/<image stem>_pseudo_label.png for every image of ``dataset`` and
out_dir/manifest.json. The CBST/CRST rounds and both TPLD phases (fastst.methods.cbst, .tpld)
run it before training.

Two passes over the images, in data-set index order, in batches of ``batch_size``; the model in
eval mode without gradients, in float32 (autocast as ``ctx.pseudo_amp_dtype``: only with
``runtime.amp_pseudo=true``). Each batch's probabilities are
``fastst.inference.predict_probs`` over ``scales`` (and their flips) divided by the number of
views: the mean softmax, float32 (B, C, H, W) at the image size.

1. Thresholds: every batch goes into ``fastst.ops.ClassBalancedThresholds(C, subsample)``;
   then ``lambdas = thresholds(portion)`` (float32 (C,)) and the argmax pixel counts per class.
   ``runtime.cbst_thresholds`` picks its store (``threshold_store``): "values" keeps every
   subsampled value in memory (one round over the images); "histogram" keeps 2 x C x 65,536
   counters and takes two rounds (the second refines each class's bin); "auto" (default)
   takes the histogram store when the values would exceed 1 GiB. Same thresholds either way.
2. Labels: the probabilities again; the confident map ``cbst_pseudo_label(probs, lambdas)``,
   densified by ``tpld_vote(probs, lambdas, **vote)`` when ``vote`` is given (TPLD), and each
   image's confidence ``image_confidence(probs, lambdas)``. Label maps are written as PNGs by a
   pool of threads while the model runs on the next batch; per-class histograms of the
   confident and the final maps stay on the device.

Resumption: right after pass 1 the thresholds and class counts are saved atomically to
out_dir/state.pt, so a kill in pass 2 never redoes pass 1. With the histogram store pass 1 is
resumable too: its counters (about 20 MB) are saved every ``runtime.pseudo_state_every`` batches
and between its two rounds. With the values store a kill *during* pass 1 restarts pass 1: its
values (5 bytes each, about 7.8 GB for the 2,975 Cityscapes images at 1024x2048 with subsample 4)
are too many to snapshot. In pass 2 the state
(images done, histograms, confidences) is saved every ``runtime.pseudo_state_every`` batches once
the PNGs written so far are on disk; a rerun continues from there and gives the same labels and
manifest as an uninterrupted pass. Batches of both passes count towards
``runtime.stop_after_pseudo_batches``. The finished pass writes out_dir/manifest.json
(atomically) and removes the state; a finished pass with the same settings and all its label
files is not redone.

Several processes (``torchrun``; ``fastst.distributed``): in both passes the one-process batches
are dealt to the ranks in steps of N (``DistributedContext.pass_steps``), so each rank computes
the probabilities of exactly the batches one process would. Pass 1: each rank feeds its own
accumulator, and the thresholds of all ranks' images together come from the exact two-level
radix select of ``fastst.ops.radix_select`` (per-class histograms of the high 16 bits, summed
over the ranks, locate each threshold's bin; histograms of the low 16 bits inside that bin,
summed again, locate the value): 2 x C x 65,536 counters travel instead of the kept values (GBs
at full size). The histogram store does the same over its two rounds.
Labels, votes and confidences are per image, so pass 2 needs no exchange but the names,
confidences and label histograms, gathered for rank 0's state and manifest. Every rank writes the
PNGs of its own images. The manifest and labels equal those of one process.

manifest.json: {"format": "fastst-cbst-pseudo-v1", "complete": true, "settings": {portion,
scales, flip, subsample, vote (or null), batch_size, num_images, num_classes, mine_portion,
size}, "lambdas": [C], "class_counts": [C] (argmax pixels), "class_fraction": [C],
"mine_classes": [ids with class_fraction < mine_portion, rarest first, ties by id],
"density_confident": [C] and "density": [C] (fraction of all pixels labelled with each class,
before / after voting), "labelled_fraction_confident", "labelled_fraction", "class_names",
"seconds", "images": [{"name", "confidence"}, ...] in data-set index order}.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from fastst.inference import predict_probs
from fastst.methods.context import RunContext
from fastst.methods.labelling.base import LabelPass, class_names, read_manifest
from fastst.methods.labelling.checks import class_balanced_settings
from fastst.ops import (ClassBalancedThresholds, cbst_pseudo_label, image_confidence, radix_select,
                        tpld_vote)

__all__ = ["ClassBalancedPass", "cbst_pass", "read_cbst_manifest", "mine_classes",
           "threshold_store", "CBST_MANIFEST_FORMAT", "VALUES_STORE_LIMIT", "pass_probabilities",
           "thresholds_over_ranks", "kept_values"]

CBST_MANIFEST_FORMAT = "fastst-cbst-pseudo-v1"

_HISTOGRAM_BINS = 256  # uint8 label values: class ids and 255


def read_cbst_manifest(out_dir) -> Optional[Dict[str, Any]]:
    """The manifest of a finished class-balanced pass in ``out_dir``, or None if it is missing,
    unreadable or of another format (e.g. an IAS pass's)."""
    return read_manifest(out_dir, CBST_MANIFEST_FORMAT)


def mine_classes(class_counts: Sequence[int], mine_portion: float) -> List[int]:
    """Rare-class mining of the released CRST code: the ids of the classes whose share of the
    argmax pixels is below ``mine_portion``, the rarest first, ties by ascending id."""
    total = sum(int(count) for count in class_counts)
    fractions = [int(count) / max(1, total) for count in class_counts]
    rare = [c for c, fraction in enumerate(fractions) if fraction < mine_portion]
    return sorted(rare, key=lambda c: (fractions[c], c))


class ClassBalancedPass(LabelPass):
    """The class-balanced pass (module docstring): ``ClassBalancedPass(model, dataset, out_dir,
    ctx, portion=, ...).run()`` -> manifest.

    dataset: items {"image": float32 (3, H, W) normalised, "name": str}, all of one size (the
        pseudo-label size); labels are made and stored at that size.
    portion: the share of each class's (subsampled) pixels kept, in [0, 1].
    scales, flip: the views whose softmax is averaged. subsample: ClassBalancedThresholds'.
    vote: None (confident labels) or {"window", "weight", "iterations"} for ``tpld_vote``.
    mine_portion: classes below this share of the argmax pixels are listed in "mine_classes".
    colour: also write palette PNGs for viewing. tag: TensorBoard prefix.
    threshold: None, or one threshold in (0, 1] for every class instead of the class-balanced
        ones (IAST's constant-threshold self-training: labels argmax p where p / threshold >= 1);
        pass 1 is skipped, and class_counts / mine_classes are then empty.

    A kill in pass 2 resumes after pass 1 from out_dir/state.pt; a kill in pass 1 resumes
    there with the histogram store (``runtime.cbst_thresholds``) and redoes pass 1 with the
    values store."""

    MANIFEST_FORMAT = CBST_MANIFEST_FORMAT
    REMOVE_STALE_MANIFEST = True
    THREAD_PREFIX = "cbst-png"

    def __init__(self, model: torch.nn.Module, dataset, out_dir, ctx: RunContext, *,
                 portion: float, scales: Sequence[float] = (0.9,), flip: bool = True,
                 subsample: int = 4, vote: Optional[Mapping[str, Any]] = None,
                 batch_size: int = 2, colour: bool = False, mine_portion: float = 1e-3,
                 threshold: Optional[float] = None, tag: str = "pseudo"):
        settings = class_balanced_settings(
            model, dataset, portion=portion, scales=scales, flip=flip, subsample=subsample,
            vote=vote, batch_size=batch_size, mine_portion=mine_portion, threshold=threshold)
        super().__init__(model, dataset, out_dir, ctx, settings, colour=colour, tag=tag)

    def label(self, state: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        settings = self.settings
        if state is None and settings["threshold"] is not None:
            lambdas = torch.full((settings["num_classes"],), settings["threshold"],
                                 dtype=torch.float32)
            class_counts = torch.zeros(0, dtype=torch.int64)
        elif state is None or "thresholds" in state:
            lambdas, class_counts = self.thresholds(state)
        if state is None or "thresholds" in state:
            state = {"settings": settings, "lambdas": lambdas.cpu(),
                     "class_counts": class_counts.cpu(), "done": 0, "names": [],
                     "confidences": torch.zeros(0, dtype=torch.float64),
                     "histogram_confident": torch.zeros(_HISTOGRAM_BINS, dtype=torch.int64),
                     "histogram": torch.zeros(_HISTOGRAM_BINS, dtype=torch.int64),
                     "seconds": self.seconds()}
            self.save_state(state)
            self.restart_clock(state["seconds"])
        return self.manifest(self.labels(state))

    def probabilities(self, batch: Mapping[str, Any]):
        """(mean softmax over the views of a batch, float32 (B, C, H, W), and the batch's images
        (B, 3, H, W)), both on the device."""
        settings = self.settings
        images = self.ctx.images_to_device(batch["image"])
        if list(images.shape[-2:]) != settings["size"]:
            raise ValueError(f"every image of the data set must be {settings['size'][0]}x"
                             f"{settings['size'][1]} (the pseudo-label size), got "
                             f"{images.shape[-2]}x{images.shape[-1]}; build it with a fixed "
                             "resize")
        probs = pass_probabilities(self.model, images, self.ctx, scales=settings["scales"],
                                   flip=settings["flip"])
        if probs.shape[1] != settings["num_classes"]:
            raise ValueError(f"the model returns {probs.shape[1]} classes but its model_config "
                             f"says num_classes = {settings['num_classes']}")
        return probs, images

    def thresholds(self, state: Optional[Dict[str, Any]]):
        """Pass 1: lambdas float32 (C,) at the portion and argmax pixel counts int64 (C,).

        The values store takes one round over the images. The histogram store takes two (the
        radix select's rounds) and snapshots its counters into out_dir/state.pt every
        ``runtime.pseudo_state_every`` batches and at the end of round 1, so a rerun resumes
        from ``state`` (a pass-1 state: {"thresholds": {"round", "done", "accumulator"}, ...})."""
        ctx, dctx, settings = self.ctx, self.dctx, self.settings
        store = threshold_store(ctx.runtime.get("cbst_thresholds", "auto"), settings)
        accumulator = ClassBalancedThresholds(settings["num_classes"],
                                              subsample=settings["subsample"], store=store)
        if store == "values":
            self.threshold_round(accumulator, 0, f"{self.tag} thresholds")
            if not dctx.is_distributed:
                return accumulator.thresholds(settings["portion"]), accumulator.class_counts()
            counts = dctx.all_reduce_(accumulator.class_counts().to(ctx.device))
            values, classes = kept_values(accumulator, ctx.device)
            return (thresholds_over_ranks(values, classes, settings["num_classes"],
                                          settings["portion"], dctx), counts)

        reduce = dctx.all_reduce_ if dctx.is_distributed else None
        first_round, done = 0, 0
        if state is not None and "thresholds" in state:
            first_round, done = state["thresholds"]["round"], state["thresholds"]["done"]
            # Rank 0 carries the counters of the batches done before; the ranks' sum is the total.
            accumulator.load_state_dict(state["thresholds"]["accumulator"],
                                        own_counters=dctx.is_main, device=ctx.device)

        def snapshot(round_index: int, images_done: int) -> None:
            self.save_state({"settings": settings, "names": [], "seconds": self.seconds(),
                             "thresholds": {"round": round_index, "done": images_done,
                                            "accumulator": accumulator.state_dict(reduce)}})

        for round_index in range(first_round, 2):
            self.threshold_round(accumulator, done, f"{self.tag} thresholds {round_index + 1}/2",
                                 lambda images_done: snapshot(round_index, images_done))
            done = 0
            if round_index == 0:
                accumulator.begin_refinement(settings["portion"], reduce)
                snapshot(1, 0)
        lambdas = accumulator.thresholds(settings["portion"], reduce)
        counts = accumulator.class_counts().to(ctx.device)
        return lambdas, dctx.all_reduce_(counts)

    def threshold_round(self, accumulator: ClassBalancedThresholds, done: int, desc: str,
                        snapshot=None) -> None:
        """Feed the probabilities of images ``done`` .. N - 1 to ``accumulator`` (each rank its
        one-process batches); ``snapshot(images_done)``, when given, runs on every rank every
        ``runtime.pseudo_state_every`` steps."""
        def step(batch, spans, done: int) -> None:
            if batch is not None:
                accumulator.update(self.probabilities(batch)[0])

        self.visit(range(done, self.settings["num_images"]), done, desc, step, snapshot,
                   batch_size=self.settings["batch_size"])

    def labels(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """Pass 2 from ``state["done"]`` on: writes the labels; returns the final state."""
        ctx, dctx, settings = self.ctx, self.dctx, self.settings
        device, vote = ctx.device, settings["vote"]
        lambdas = state["lambdas"].to(device)
        names: List[str] = list(state["names"])
        confidences = {"done": state["confidences"], "pending": []}
        histogram_confident = state["histogram_confident"].to(device)
        histogram = state["histogram"].to(device)
        if not dctx.is_main:
            # Rank 0 carries the counts of the images done before; the ranks' sum is the total.
            histogram_confident.zero_()
            histogram.zero_()

        def step(batch: Optional[Mapping[str, Any]], spans, done: int) -> None:
            batch_names: List[str] = []
            confidence = None
            if batch is not None:
                probs, images = self.probabilities(batch)
                confident = cbst_pseudo_label(probs, lambdas)
                labels = confident if vote is None else tpld_vote(probs, lambdas, **vote)
                confidence = image_confidence(probs, lambdas)
                # index_add_, not bincount: CUDA's bincount reads the maximum back to the host.
                for counts, maps in ((histogram_confident, confident), (histogram, labels)):
                    flat = maps.reshape(-1).long()
                    counts.index_add_(0, flat, torch.ones_like(flat))
                batch_names = list(batch["name"])
                self.write_labels(batch_names, labels)
                self.log_images(images, labels, done)
            if dctx.is_distributed:  # the step's names and confidences, in pass order
                parts = dctx.all_gather_object(
                    (batch_names, [] if confidence is None else confidence.cpu().tolist()))
                batch_names = [name for part in parts for name in part[0]]
                confidence = torch.tensor([c for part in parts for c in part[1]],
                                          dtype=torch.float64)
            confidences["pending"].append(confidence)
            names.extend(batch_names)

        def snapshot(done: int) -> Dict[str, Any]:
            self.wait_for_writes()
            if confidences["pending"]:
                confidences["done"] = torch.cat([confidences["done"]]
                                                + [c.cpu() for c in confidences["pending"]])
                confidences["pending"] = []
            # A collective: once it returns, every rank has waited for its own PNGs above.
            totals = [dctx.all_reduce_(h.clone()) for h in (histogram_confident, histogram)]
            return {**state, "done": done, "names": list(names),
                    "confidences": confidences["done"], "histogram_confident": totals[0].cpu(),
                    "histogram": totals[1].cpu(), "seconds": self.seconds()}

        done = self.visit(range(state["done"], settings["num_images"]), state["done"],
                          f"{self.tag} labels", step,
                          lambda done: self.save_state(snapshot(done)),
                          batch_size=settings["batch_size"])
        return snapshot(done)

    def manifest(self, state: Mapping[str, Any]) -> Dict[str, Any]:
        settings = self.settings
        num_classes = settings["num_classes"]
        class_counts = [int(count) for count in state["class_counts"].tolist()]
        total = max(1, sum(class_counts))
        density_confident = _density(state["histogram_confident"], num_classes)
        density = _density(state["histogram"], num_classes)
        return {"format": CBST_MANIFEST_FORMAT, "complete": True, "settings": dict(settings),
                "lambdas": state["lambdas"].tolist(), "class_counts": class_counts,
                "class_fraction": [count / total for count in class_counts],
                "mine_classes": mine_classes(class_counts, settings["mine_portion"]),
                "density_confident": density_confident, "density": density,
                "labelled_fraction_confident": sum(density_confident),
                "labelled_fraction": sum(density), "class_names": class_names(num_classes),
                "seconds": state["seconds"],
                "images": [{"name": name, "confidence": confidence}
                           for name, confidence in zip(state["names"],
                                                       state["confidences"].tolist())]}

    def log_manifest(self, manifest: Mapping[str, Any]) -> None:
        writer, tag = self.ctx.writer, self.tag
        for c, name in enumerate(manifest["class_names"]):
            writer.add_scalar(f"{tag}/lambda/{name}", manifest["lambdas"][c], 0)
            writer.add_scalar(f"{tag}/density/{name}", manifest["density"][c], 0)
            writer.add_scalar(f"{tag}/density_confident/{name}", manifest["density_confident"][c],
                              0)
        writer.add_scalar(f"{tag}/labelled_fraction", manifest["labelled_fraction"], 0)
        writer.add_scalar(f"{tag}/labelled_fraction_confident",
                          manifest["labelled_fraction_confident"], 0)
        writer.add_histogram(f"{tag}/image_confidence",
                             torch.tensor([image["confidence"] for image in manifest["images"]],
                                          dtype=torch.float64), 0)


def cbst_pass(model: torch.nn.Module, dataset, out_dir, ctx: RunContext,
              **options) -> Dict[str, Any]:
    """``ClassBalancedPass(model, dataset, out_dir, ctx, **options).run()``: label every image of
    ``dataset`` with class-balanced thresholds and write the labels and the manifest under
    ``out_dir``; returns the manifest (see ``ClassBalancedPass``)."""
    return ClassBalancedPass(model, dataset, out_dir, ctx, **options).run()


def pass_probabilities(model, images: torch.Tensor, ctx: RunContext, *,
                       scales: Sequence[float], flip: bool) -> torch.Tensor:
    """The pass's probabilities of ``images`` (B, 3, H, W) normalised, on the device: the mean
    softmax of ``model`` over ``scales`` and their flips, float32 (B, C, H, W), the model under
    ``ctx.pseudo_amp_dtype`` (float32 by default). What the thresholds, labels and confidences
    of a pass come from, and what the class-balanced rounds' teachers give (fastst.methods.cbst)."""
    probs = predict_probs(model, images, scales=scales, flip=flip,
                          autocast_dtype=ctx.pseudo_amp_dtype)
    return probs.div_(len(scales) * (2 if flip else 1))


# "auto" keeps the values in memory up to this size, above it the histogram store (2 passes).
VALUES_STORE_LIMIT = 1 << 30


def threshold_store(choice: str, settings: Mapping[str, Any]) -> str:
    """The ClassBalancedThresholds store for ``runtime.cbst_thresholds`` = ``choice``
    ("values", "histogram" or "auto": histogram when the kept values, 5 bytes per subsampled
    pixel of every image, would exceed VALUES_STORE_LIMIT)."""
    if choice != "auto":
        return choice
    height, width = settings["size"]
    kept_bytes = 5 * settings["num_images"] * height * width / settings["subsample"]
    return "histogram" if kept_bytes > VALUES_STORE_LIMIT else "values"


def kept_values(accumulator: ClassBalancedThresholds, device: torch.device):
    """(values float32 (n,), classes uint8 (n,)): what ``accumulator`` has kept, on ``device``."""
    values, classes = accumulator.kept()
    return values.to(device), classes.to(device)


def thresholds_over_ranks(values: torch.Tensor, classes: torch.Tensor, num_classes: int,
                          portion: float, dctx) -> torch.Tensor:
    """The class-balanced thresholds (docs/ops.md §5) of the kept values of every rank together:
    lambda_k = (class k's values sorted descending)[floor(len_k * portion) - 1], 1 where that
    count is 0, exactly what one ``ClassBalancedThresholds`` fed every batch gives.

    values: float32 (n,) >= +0 (max probabilities), classes: (n,) integer ids, this rank's.
    dctx: the ``DistributedContext`` (world size 1: this rank's values alone). The two-round
    radix select of fastst.ops.radix_select; each round all-reduces C x 65,536 int64
    counters instead of the values. Returns float32 (C,) on the values' device."""
    return radix_select.thresholds_from_values(values, classes, num_classes, portion,
                                               dctx.all_reduce_ if dctx.is_distributed else None)


def _density(histogram: torch.Tensor, num_classes: int) -> List[float]:
    total = max(1, int(histogram.sum()))
    return [int(histogram[c]) / total for c in range(num_classes)]
