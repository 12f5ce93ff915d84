"""Logging of the training loop (``fastst.methods.trainer.Stage``): the mean losses over the
ranks, and in TensorBoard the losses and learning rate at every logging step and a few training
images with their prediction and label.

TensorBoard is optional (``pip install fastst[tensorboard]``): ``open_writer`` gives None, and
the run goes on without event files after a one-line note, where the package is missing."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from fastst.methods.context import colorize, denormalize

__all__ = ["TENSORBOARD_HINT", "open_writer", "mean_over_ranks", "log_scalars",
           "log_train_images"]

IMAGES_LOGGED = 4
TENSORBOARD_HINT = ("TensorBoard logs are off: the tensorboard package is not installed "
                    "(pip install tensorboard, or pip install -e .[tensorboard]; "
                    "runtime.tensorboard=false silences this note)")


def open_writer(directory: Path) -> Optional[object]:
    """A ``torch.utils.tensorboard.SummaryWriter`` writing to ``directory``, or None after
    printing ``TENSORBOARD_HINT`` (one line, stderr) where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        print(f"note: {TENSORBOARD_HINT}", file=sys.stderr, flush=True)
        return None
    return SummaryWriter(str(directory))


def mean_over_ranks(dctx, sums: Mapping[str, torch.Tensor], counts: Mapping[str, int]
                    ) -> Dict[str, float]:
    """{name: sum / count}, averaged over the ranks in a distributed run (one collective);
    every rank has the same names, in the same order, and the same counts."""
    if not dctx.is_distributed:
        return {key: float(value) / counts[key] for key, value in sums.items()}
    values = torch.stack([value.detach().reshape(()).float() for value in sums.values()])
    dctx.all_reduce_(values)
    return {key: value / (counts[key] * dctx.world_size)
            for key, value in zip(sums, values.cpu().tolist())}


def log_scalars(writer, stage: str, means: Mapping[str, float], lr: float, step: int) -> None:
    """``<stage>/loss/<name>`` for every mean loss and ``<stage>/lr`` at ``step``; nothing when
    ``writer`` (a SummaryWriter) is None."""
    if writer is None:
        return
    for key, value in means.items():
        writer.add_scalar(f"{stage}/loss/{key}", value, step)
    writer.add_scalar(f"{stage}/lr", lr, step)


def log_train_images(writer, stage: str, visual: Mapping[str, torch.Tensor], step: int) -> None:
    """The first ``IMAGES_LOGGED`` items of a training batch: ``visual`` = {"image": (B, 3, H, W)
    normalised float, "logits": (B, C, h, w) float, "label": (B, H, W) int64}; the prediction is
    the argmax of the logits resized bilinearly (align_corners=True) to the label's size."""
    count = min(IMAGES_LOGGED, visual["image"].shape[0])
    label = visual["label"][:count]
    logits = F.interpolate(visual["logits"][:count].detach().float(), size=label.shape[-2:],
                           mode="bilinear", align_corners=True)
    writer.add_images(f"{stage}/train_input", denormalize(visual["image"][:count]).cpu(), step)
    num_classes = logits.shape[1]
    writer.add_images(f"{stage}/train_prediction",
                      colorize(logits.argmax(1), num_classes).cpu(), step)
    writer.add_images(f"{stage}/train_label", colorize(label, num_classes).cpu(), step)
