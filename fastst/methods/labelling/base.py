"""The resumable label pass that every pseudo-label selector shares (docs/formats.md §3.1).

``LabelPass(model, dataset, out_dir, ctx, settings, colour=, tag=).run()`` writes
out_dir/labels/<image stem>_pseudo_label.png for every image of ``dataset`` (items
{"image": float32 (3, H, W) normalised, "name": str}) and out_dir/manifest.json, and returns the
manifest. A subclass gives ``MANIFEST_FORMAT`` and ``label(state) -> manifest``; this class does
the rest:

- a finished pass with the same ``settings`` and whole label files is not redone;
- the pass state (out_dir/state.pt, saved with ``save_state``) is loaded, checked against the
  settings and the labels it vouches for (``verify_labels``), and handed to ``label``;
- ``visit`` runs a step function over the one-process batches of a list of images, each rank on
  its share (``DistributedContext.pass_steps``), with progress, the stop hook and a snapshot
  every ``runtime.pseudo_state_every`` steps;
- ``write_labels`` hands label maps to a pool of PNG-writing threads (the model runs on while
  they write); ``wait_for_writes`` re-raises a failed write before a state vouches for it;
- the model runs in eval mode without gradients and gets its mode back; the manifest is
  written atomically by rank 0 once every rank's PNGs are on disk, and the state removed.

Rank 0 reads every file and tells the others, so that every rank takes the same decision.
"""
from __future__ import annotations

import concurrent.futures
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from fastst import distributed
from fastst.atomic import read_json, save_torch_atomic, write_json_atomic
from fastst.data.ids import class_set_for
from fastst.data.pseudo_label import pseudo_label_path, save_pseudo_labels
from fastst.methods.context import RunContext, colorize, denormalize
from fastst.progress import DEFAULT_EVERY, progress_bar

__all__ = ["LabelPass", "MANIFEST_NAME", "STATE_NAME", "LABEL_DIR", "IMAGES_LOGGED",
           "read_manifest", "verify_labels", "labels_present", "require_finished_pass",
           "load_pass_state", "class_names", "log_pass_images"]

MANIFEST_NAME = "manifest.json"
STATE_NAME = "state.pt"
LABEL_DIR = "labels"
IMAGES_LOGGED = 4
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The last 8 bytes of every PNG: the IEND chunk type and its (constant) CRC.
_PNG_END = b"IEND\xaeB`\x82"


class LabelPass:
    """One resumable pseudo-label pass into ``out_dir`` (see the module docstring).

    settings: the JSON-able settings stored in the state and the manifest (a finished pass or a
    state with other settings is not reused). colour: also write palette PNGs. tag: the
    TensorBoard prefix and progress label."""

    MANIFEST_FORMAT: str = ""
    # Delete a manifest of other settings before labelling (it would describe overwritten labels).
    REMOVE_STALE_MANIFEST = False
    THREAD_PREFIX = "pseudo-png"

    def __init__(self, model: torch.nn.Module, dataset, out_dir, ctx: RunContext,
                 settings: Dict[str, Any], *, colour: bool = False, tag: str = "pseudo"):
        self.model, self.dataset, self.ctx = model, dataset, ctx
        self.out_dir = Path(out_dir)
        self.label_dir = self.out_dir / LABEL_DIR
        self.settings, self.colour, self.tag = settings, colour, tag
        self.dctx = distributed.current()
        self.seconds_before, self.started = 0.0, time.perf_counter()
        self.writes: List[concurrent.futures.Future] = []
        self.pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

    # --- what a subclass gives -----------------------------------------------------------------

    def label(self, state: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """Label the images (from ``state`` on, None: from the start); returns the manifest."""
        raise NotImplementedError

    def log_manifest(self, manifest: Mapping[str, Any]) -> None:
        """Write the finished pass's summary to ``ctx.writer`` (not None)."""

    # --- the skeleton ----------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        """The finished pass's manifest, after labelling what is not done yet."""
        dctx = self.dctx
        manifest = read_manifest(self.out_dir, self.MANIFEST_FORMAT) if dctx.is_main else None
        finished = manifest is not None and manifest.get("complete") \
            and manifest.get("settings") == self.settings \
            and labels_present(self.label_dir, [image["name"] for image in manifest["images"]])
        if manifest is not None and not finished and self.REMOVE_STALE_MANIFEST:
            (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        manifest = dctx.broadcast_object(manifest if finished else None)
        if manifest is not None:
            return manifest

        self.started = time.perf_counter()
        state = dctx.broadcast_object(
            load_pass_state(self.out_dir / STATE_NAME, self.settings, self.label_dir)
            if dctx.is_main else None)
        self.seconds_before = state["seconds"] if state else 0.0
        was_training = self.model.training
        self.model.eval()
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.ctx.runtime["write_threads"], thread_name_prefix=self.THREAD_PREFIX)
        try:
            manifest = self.label(state)
        finally:
            self.pool.shutdown(wait=True)
            self.model.train(was_training)

        dctx.barrier()  # every rank's PNGs are on disk before the manifest vouches for them
        if dctx.is_main:
            write_json_atomic(manifest, self.out_dir / MANIFEST_NAME)
            (self.out_dir / STATE_NAME).unlink(missing_ok=True)
        dctx.barrier()
        if self.ctx.writer is not None:
            self.log_manifest(manifest)
        return manifest

    def seconds(self) -> float:
        """Seconds spent on the pass so far, over every run of it."""
        return self.seconds_before + time.perf_counter() - self.started

    def restart_clock(self, seconds_before: float) -> None:
        self.seconds_before, self.started = seconds_before, time.perf_counter()

    def save_state(self, state: Mapping[str, Any]) -> None:
        """Rank 0 saves ``state`` (with the settings) atomically to out_dir/state.pt."""
        if self.dctx.is_main:
            save_torch_atomic(dict(state), self.out_dir / STATE_NAME)

    def visit(self, indices: Sequence[int], done: int, desc: str,
              step: Callable[[Optional[Mapping[str, Any]], Sequence, int], None],
              snapshot: Optional[Callable[[int], None]] = None, *, batch_size: int) -> int:
        """Run ``step(batch, spans, done)`` over the one-process batches of ``indices`` (the data
        set indices still to visit, in visiting order; ``done`` images were visited before):
        ``batch`` is this rank's batch of the step (None when it has none), ``spans`` every
        rank's (start, stop) in the step, ``done`` the images visited before the step. Every
        ``runtime.pseudo_state_every`` steps ``snapshot(done)`` runs on every rank. Returns the
        images visited in all."""
        ctx, dctx = self.ctx, self.dctx
        steps = dctx.pass_steps(len(indices), batch_size)
        mine = [indices[i] for spans in steps for i in range(*spans[dctx.rank])]
        loader = DataLoader(Subset(self.dataset, mine), batch_size=batch_size, shuffle=False,
                            num_workers=ctx.runtime["workers"], pin_memory=ctx.pin_memory)
        total = done + len(indices)
        with torch.no_grad(), progress_bar(
                total, initial=done, desc=desc, unit="img", show=dctx.is_main,
                bars=ctx.runtime["progress"],
                every=ctx.runtime.get("progress_every", DEFAULT_EVERY)) as bar:
            batches = iter(loader)
            for step_index, spans in enumerate(steps):
                start, stop = spans[dctx.rank]
                step(next(batches) if stop > start else None, spans, done)
                step_count = spans[-1][1] - spans[0][0]
                done += step_count
                bar.update(step_count)
                if snapshot is not None \
                        and (step_index + 1) % ctx.runtime["pseudo_state_every"] == 0:
                    snapshot(done)
                ctx.count("pseudo_batches")
        return done

    def write_labels(self, names: Sequence[str], labels: torch.Tensor) -> None:
        """Queue the label maps ``labels`` (B, H, W) of images ``names`` for the PNG writers."""
        self.writes.append(self.pool.submit(save_pseudo_labels, self.label_dir, list(names),
                                            labels, self.colour,
                                            self.settings["num_classes"]))

    def wait_for_writes(self) -> None:
        """Wait for the queued PNGs; re-raises a failed write before a state claims its image."""
        for future in self.writes:
            future.result()
        self.writes.clear()

    def log_images(self, images: torch.Tensor, labels: torch.Tensor, done: int) -> None:
        """The first IMAGES_LOGGED images and labels of the pass to TensorBoard."""
        if self.ctx.writer is not None and done < IMAGES_LOGGED:
            log_pass_images(self.ctx.writer, self.tag, images, labels,
                            self.settings["num_classes"])


def read_manifest(out_dir, format: str) -> Optional[Dict[str, Any]]:
    """The manifest of ``format`` in ``out_dir``, or None if it is missing, unreadable or of
    another format."""
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


def labels_present(label_dir: Path, names: Sequence[str]) -> bool:
    return not verify_labels(label_dir, names)


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


def load_pass_state(path: Path, settings: Mapping[str, Any], label_dir: Path) -> Optional[dict]:
    """The pass state at ``path`` if it was made with ``settings`` and its labels are whole;
    None (with a warning saying why) otherwise."""
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
