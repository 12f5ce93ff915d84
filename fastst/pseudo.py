"""The IAS pseudo-label pass: label a target set with a model, resumably (docs/ops.md §1, docs/recipes.md §4).

    python -m fastst.pseudo --checkpoint PATH --preset NAME --out DIR [--stage round1] [key=value ...]

writes DIR/labels/<image stem>_pseudo_label.png for every target train image and
DIR/manifest.json. Inside ``python -m fastst.train`` every IAST round runs the same pass.

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
packed keys), and the
statistics pass every rank then repeats over the step is a small fraction of a model forward.

manifest.json: {"format": "fastst-pseudo-v1", "complete": true, "settings": {mode, alpha, beta,
gamma, group, size, batch_size, order_seed, num_images, num_classes}, "theta": [C] (after the
last image), "density": [C] (fraction of all pixels labelled with each class),
"labelled_fraction", "class_names", "seconds", "images": [{"name", "theta": [C]}, ...] in
visiting order, theta being the thresholds that labelled the image}.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from fastst import distributed
from fastst.atomic import read_json
from fastst.data.ids import class_set_for
from fastst.data.pseudo_label import pseudo_label_path, save_pseudo_labels
from fastst.methods.context import (RunContext, colorize, denormalize, save_torch_atomic,
                                    write_json_atomic)
from fastst.ops import ias_pseudo_label

__all__ = ["ias_pass", "MANIFEST_FORMAT", "read_manifest", "verify_labels", "require_finished_pass",
           "main", "class_names", "labels_present", "load_pass_state", "log_pass_images"]

MANIFEST_FORMAT = "fastst-pseudo-v1"
MANIFEST_NAME = "manifest.json"
STATE_NAME = "state.pt"
LABEL_DIR = "labels"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The last 8 bytes of every PNG: the IEND chunk type and its (constant) CRC.
_PNG_END = b"IEND\xaeB`\x82"
IMAGES_LOGGED = 4


def read_manifest(out_dir, format: str = MANIFEST_FORMAT) -> Optional[Dict[str, Any]]:
    """The manifest of ``format`` (an IAS pass's by default) in ``out_dir``, or None if it is
    missing, unreadable or of another format."""
    manifest = read_json(Path(out_dir) / MANIFEST_NAME)
    if not isinstance(manifest, dict) or manifest.get("format") != format:
        return None
    return manifest


def class_names(num_classes: int) -> List[str]:
    """The names of the class set with ``num_classes`` classes (ids.class_set_for), else
    "class <c>"."""
    class_set = class_set_for(num_classes)
    return list(class_set.names) if class_set is not None else \
        [f"class {c}" for c in range(num_classes)]


def ias_pass(model: torch.nn.Module, dataset, out_dir, ctx: RunContext, *, alpha: float,
             size: Sequence[int], beta: float = 0.9, gamma: float = 8.0, mode: str = "official",
             group: int = 2, batch_size: int = 2, order_seed: int = 0, colour: bool = False,
             tag: str = "pseudo") -> Dict[str, Any]:
    """Label every image of ``dataset`` (items {"image": float (3,H,W), "name": str}) with
    ``model`` and write labels and manifest under ``out_dir``; returns the manifest.

    size: (H, W) of the pseudo labels (the logits are upsampled to it inside the op).
    ctx: device, precision, workers, progress, TensorBoard writer and stop hooks
    (``runtime.pseudo_state_every``, ``write_threads``, ``stop_after_pseudo_batches``).
    A finished pass with the same settings is not redone; its manifest is returned."""
    out_dir = Path(out_dir)
    label_dir = out_dir / LABEL_DIR
    num_classes = int(model.model_config["num_classes"]) if hasattr(model, "model_config") \
        else None
    settings = {"mode": mode, "alpha": float(alpha), "beta": float(beta), "gamma": float(gamma),
                "group": int(group), "size": [int(s) for s in size], "batch_size": int(batch_size),
                "order_seed": int(order_seed), "num_images": len(dataset),
                "num_classes": num_classes}
    if batch_size % group:
        raise ValueError(f"batch_size {batch_size} must be a multiple of group {group}, so that "
                         "no IAS instance straddles two batches")
    dctx = distributed.current()
    # Rank 0 reads the files and tells the others, so that every rank takes the same decision.
    manifest = read_manifest(out_dir) if dctx.is_main else None
    if manifest is not None and not (
            manifest.get("complete") and manifest["settings"] == settings
            and labels_present(label_dir, [image["name"] for image in manifest["images"]])):
        manifest = None
    manifest = dctx.broadcast_object(manifest)
    if manifest is not None:
        return manifest

    started = time.perf_counter()
    state = dctx.broadcast_object(load_pass_state(out_dir / STATE_NAME, settings, label_dir)
                                  if dctx.is_main else None)
    device = ctx.device
    num_images = len(dataset)
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(int(order_seed)))
    done = state["done"] if state else 0
    theta = (state["theta"].to(device) if state else
             torch.full((num_classes,), 0.9, dtype=torch.float64, device=device))
    histogram = (state["histogram"].to(device) if state else
                 torch.zeros(256, dtype=torch.int64, device=device))
    names: List[str] = list(state["names"]) if state else []
    thetas_done = state["image_thetas"] if state else torch.zeros(0, num_classes,
                                                                  dtype=torch.float64)
    thetas_pending: List[torch.Tensor] = []
    seconds_before = state["seconds"] if state else 0.0
    runtime = ctx.runtime

    remaining = order[done:].tolist()
    steps = dctx.pass_steps(len(remaining), batch_size)
    mine = [remaining[i] for spans in steps for i in range(*spans[dctx.rank])]
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False,
                        num_workers=runtime["workers"], pin_memory=ctx.pin_memory)
    was_training = model.training
    model.eval()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=runtime["write_threads"],
                                                 thread_name_prefix="pseudo-png")
    writes: List[concurrent.futures.Future] = []

    def save_state() -> None:
        nonlocal thetas_done, thetas_pending
        for future in writes:
            future.result()  # re-raises a failed write before the state claims its image
        writes.clear()
        if thetas_pending:
            thetas_done = torch.cat([thetas_done] + [t.cpu() for t in thetas_pending])
            thetas_pending = []
        dctx.barrier()  # every rank's PNGs so far are on disk before the state vouches for them
        if dctx.is_main:
            save_torch_atomic({"settings": settings, "done": done, "theta": theta.cpu(),
                               "histogram": histogram.cpu(), "names": list(names),
                               "image_thetas": thetas_done,
                               "seconds": seconds_before + time.perf_counter() - started},
                              out_dir / STATE_NAME)
        if ctx.writer is not None:
            for c, name in enumerate(class_names(num_classes)):
                ctx.writer.add_scalar(f"{tag}/theta_during_pass/{name}", float(theta[c]), done)

    from tqdm import tqdm

    try:
        with torch.no_grad(), tqdm(total=num_images, initial=done, desc=f"{tag} labels",
                                   unit="img", disable=not (runtime["progress"] and dctx.is_main),
                                   dynamic_ncols=True) as bar:
            batches = iter(loader)
            for step_index, spans in enumerate(steps):
                start, stop = spans[dctx.rank]
                images = logits = None
                batch_names: List[str] = []
                if stop > start:
                    batch = next(batches)
                    images = ctx.images_to_device(batch["image"])
                    with ctx.autocast(pseudo=True):
                        logits = model(images)
                    batch_names = list(batch["name"])
                step_names = batch_names
                if dctx.is_distributed:  # the whole step's logits and names on every rank
                    logits = torch.cat(dctx.all_gather_batches(logits, device))
                    step_names = [n for part in dctx.all_gather_object(batch_names) for n in part]
                labels, theta, per_instance = ias_pseudo_label(
                    logits, theta, alpha=alpha, beta=beta, gamma=gamma, mode=mode,
                    from_logits=True, size=tuple(size), group=group)
                thetas_pending.append(per_instance.repeat_interleave(group, 0)[:labels.shape[0]])
                # index_add_, not bincount: CUDA's bincount reads the maximum back to the host.
                flat = labels.reshape(-1).long()
                histogram.index_add_(0, flat, torch.ones_like(flat))
                own = labels[start - spans[0][0]:stop - spans[0][0]]
                if batch_names:
                    writes.append(pool.submit(save_pseudo_labels, label_dir, batch_names, own,
                                              colour, num_classes))
                if ctx.writer is not None and done < IMAGES_LOGGED and images is not None:
                    log_pass_images(ctx.writer, tag, images, own, num_classes)
                names.extend(step_names)
                done += labels.shape[0]
                bar.update(labels.shape[0])
                if (step_index + 1) % runtime["pseudo_state_every"] == 0:
                    save_state()
                ctx.count("pseudo_batches")
            for future in writes:
                future.result()
    finally:
        pool.shutdown(wait=True)
        model.train(was_training)

    if thetas_pending:
        thetas_done = torch.cat([thetas_done] + [t.cpu() for t in thetas_pending])
    counts = histogram.cpu()
    total_pixels = max(1, num_images * int(size[0]) * int(size[1]))
    density = [int(counts[c]) / total_pixels for c in range(num_classes)]
    manifest = {"format": MANIFEST_FORMAT, "complete": True, "settings": settings,
                "theta": theta.cpu().tolist(), "density": density,
                "labelled_fraction": sum(density), "class_names": class_names(num_classes),
                "seconds": seconds_before + time.perf_counter() - started,
                "images": [{"name": name, "theta": row}
                           for name, row in zip(names, thetas_done.tolist())]}
    dctx.barrier()  # every rank's PNGs are on disk before the manifest vouches for them
    if dctx.is_main:
        write_json_atomic(manifest, out_dir / MANIFEST_NAME)
        (out_dir / STATE_NAME).unlink(missing_ok=True)
    dctx.barrier()
    if ctx.writer is not None:
        for c, name in enumerate(manifest["class_names"]):
            ctx.writer.add_scalar(f"{tag}/theta/{name}", manifest["theta"][c], 0)
            ctx.writer.add_scalar(f"{tag}/density/{name}", density[c], 0)
        ctx.writer.add_scalar(f"{tag}/labelled_fraction", manifest["labelled_fraction"], 0)
    return manifest


def verify_labels(label_dir, names: Sequence[str]) -> List[Path]:
    """The pseudo-label files of ``names`` in ``label_dir`` that are missing or not a whole PNG
    (signature first, IEND chunk last; a truncated or zero-filled file fails), in ``names``
    order. Reads 16 bytes a file."""
    bad = []
    for name in names:
        path = pseudo_label_path(label_dir, name)
        try:
            with open(path, "rb") as handle:
                head = handle.read(len(_PNG_SIGNATURE))
                handle.seek(0, 2)
                size = handle.tell()
                handle.seek(max(0, size - len(_PNG_END)))
                tail = handle.read()
        except OSError:
            bad.append(path)
            continue
        if head != _PNG_SIGNATURE or tail != _PNG_END or size < 2 * len(_PNG_SIGNATURE):
            bad.append(path)
    return bad


def require_finished_pass(manifest: Optional[Mapping[str, Any]], out_dir,
                          checkpoint) -> Dict[str, Any]:
    """``manifest`` of the pass in ``out_dir`` that a resumed round (its ``checkpoint``) trains
    on, after checking that it is complete and that every label file is whole; otherwise a
    FileNotFoundError saying to delete the checkpoint so the round redoes its pass."""
    redo = f"delete {checkpoint} to redo the round from its pseudo-label pass"
    if manifest is None or not manifest.get("complete"):
        raise FileNotFoundError(f"{checkpoint} continues a round whose pseudo labels are gone "
                                f"({Path(out_dir) / MANIFEST_NAME} is missing); {redo}")
    bad = verify_labels(Path(out_dir) / LABEL_DIR, [image["name"] for image in manifest["images"]])
    if bad:
        raise FileNotFoundError(f"{checkpoint} continues a round whose pseudo label {bad[0]} is "
                                f"missing or damaged ({len(bad)} such files); {redo}")
    return dict(manifest)


def labels_present(label_dir: Path, names: Sequence[str]) -> bool:
    return not verify_labels(label_dir, names)


def load_pass_state(path: Path, settings: Mapping[str, Any], label_dir: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged state only costs the labels done so far
        warnings.warn(f"pseudo-label pass state {path} is unreadable ({error}); starting the "
                      "pass over", stacklevel=3)
        return None
    if state.get("settings") != settings:
        warnings.warn(f"pseudo-label pass state {path} was made with other settings "
                      f"({state.get('settings')}); starting the pass over", stacklevel=3)
        return None
    bad = verify_labels(label_dir, state["names"])
    if bad:
        warnings.warn(f"{len(bad)} pseudo label(s) recorded in {path} are missing or damaged, "
                      f"e.g. {bad[0]}; starting the pass over", stacklevel=3)
        return None
    return state


def log_pass_images(writer, tag: str, images: torch.Tensor, labels: torch.Tensor,
                    num_classes: Optional[int] = None) -> None:
    count = min(IMAGES_LOGGED, images.shape[0])
    inputs = torch.nn.functional.interpolate(denormalize(images[:count]).float(),
                                             size=labels.shape[-2:], mode="bilinear",
                                             align_corners=False).round().to(torch.uint8)
    writer.add_images(f"{tag}/input", inputs.cpu(), 0)
    writer.add_images(f"{tag}/pseudo_label", colorize(labels[:count], num_classes).cpu(), 0)


# --- command line ------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastst.pseudo",
        description="Pseudo labels for the target train set of a preset, from a checkpoint, as a "
                    "self-training stage of it makes them (IAS, constant or class-balanced "
                    "selectors of IAST rounds; CBST/CRST rounds; TPLD phases with voting).")
    parser.add_argument("--checkpoint", required=True, help="fastst checkpoint (.pt) to label with")
    parser.add_argument("--preset", required=True, help="preset naming the target data set and "
                        "the pseudo-label settings (see python -m fastst.train --help)")
    parser.add_argument("--out", required=True, help="output directory (labels/, manifest.json)")
    parser.add_argument("--stage", default=None, help="the self-training stage whose settings to "
                        "use (default: the first one of the pipeline)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="configuration overrides, as for python -m fastst.train")
    return parser


# The stage methods whose rounds make pseudo labels (each Stage class has ``label_pass``).
LABELLING_METHODS = ("iast", "cbst", "tpld_phase1", "tpld_phase2")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fastst.checkpoint import load_model
    from fastst.config import ConfigError, load_config
    from fastst.methods import stage_class
    from fastst.methods.context import StopRequested, resolve_device

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.preset, args.overrides)
    except ConfigError as error:
        parser.error(str(error))
    rounds = [name for name in config["pipeline"]
              if config["stages"][name]["method"] in LABELLING_METHODS]
    stage = args.stage or (rounds[0] if rounds else None)
    if stage not in rounds:
        parser.error(f"--stage must name a self-training stage of preset {args.preset!r}: "
                     f"{', '.join(rounds) or 'it has none'}; got {stage!r}")
    try:
        device = resolve_device(config["runtime"]["device"])
        model = load_model(args.checkpoint, map_location="cpu")
    except (FileNotFoundError, RuntimeError, ValueError, TypeError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if config["runtime"]["threads"]:
        torch.set_num_threads(config["runtime"]["threads"])
    dctx = distributed.init_from_env(device)  # under torchrun: the ranks share the pass
    if dctx.is_distributed:
        device = dctx.device
    model.to(device, memory_format=torch.channels_last if device.type == "cuda"
             and config["runtime"]["channels_last"] else torch.contiguous_format)
    ctx = RunContext(config=config, run_dir=Path(args.out), seed=config["seed"], device=device)
    round_stage = stage_class(config["stages"][stage]["method"])(ctx, stage)
    try:
        round_stage.manifest = round_stage.label_pass(model, args.out)
        summary = round_stage.pseudo_summary()
    except StopRequested as stop:
        print(stop, file=sys.stderr)
        return 3
    finally:
        distributed.shutdown()
    if not dctx.is_main:
        return 0
    manifest = round_stage.manifest
    # IAS: the EMA thresholds theta; class-balanced selectors and rounds: their lambdas.
    thresholds = summary.get("theta") or summary["lambdas"]
    print(f"{manifest['settings']['num_images']} pseudo labels in {Path(args.out) / LABEL_DIR}; "
          f"{100 * manifest['labelled_fraction']:.1f}% of the pixels labelled")
    width = max(len(name) for name in manifest["class_names"]) + 2
    print(f"{'class':<{width}}{'threshold':>10}{'density %':>11}")
    for name, threshold, density in zip(manifest["class_names"], thresholds,
                                        manifest["density"]):
        print(f"{name:<{width}}{threshold:10.4f}{100 * density:11.2f}")
    return 0 if all(math.isfinite(t) for t in thresholds) else 1


if __name__ == "__main__":
    sys.exit(main())
