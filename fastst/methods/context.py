"""What every stage of a run shares: device and precision choices, the TensorBoard writer, the
stop hooks used to emulate a kill, and small helpers (atomic files, label colours, RNG state).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from fastst.atomic import write_json_atomic
from fastst.data.ids import IGNORE_INDEX, palette_for
from fastst.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["RunContext", "StopRequested", "resolve_device", "write_json_atomic",
           "colorize", "denormalize", "rng_state", "set_rng_state"]


class StopRequested(RuntimeError):
    """Raised when a ``runtime.stop_after_*`` hook fires: the run stops as if killed (nothing is
    saved beyond the regular checkpoints), so that a rerun exercises resumption."""


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device=cuda but CUDA is not available; use runtime.device=cpu")
    return device


@dataclass
class RunContext:
    """One seed's run: its configuration, output directory, device and logging.

    ``counters`` count training iterations and pseudo-label batches done by this process (across
    stages), for the ``runtime.stop_after_iterations`` / ``stop_after_pseudo_batches`` hooks.
    """
    config: Dict[str, Any]
    run_dir: Path
    seed: int
    device: torch.device
    writer: Any = None
    counters: Dict[str, int] = field(default_factory=lambda: {"iterations": 0,
                                                              "pseudo_batches": 0})

    @property
    def runtime(self) -> Mapping[str, Any]:
        return self.config["runtime"]

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        """bf16/fp16 autocast on CUDA as configured; CPU runs in float32 (exact resumption)."""
        amp = self.runtime["amp"]
        return getattr(torch, amp) if self.on_cuda and amp != "none" else None

    @property
    def pseudo_amp_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype of pseudo-label passes and of the teachers whose targets are
        calibrated by their thresholds: None (float32, as the released code labels) unless
        ``runtime.amp_pseudo`` is true, then ``amp_dtype``."""
        return self.amp_dtype if self.runtime["amp_pseudo"] else None

    @property
    def channels_last(self) -> bool:
        return self.on_cuda and self.runtime["channels_last"]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def pin_memory(self) -> bool:
        return self.on_cuda

    def autocast(self, pseudo: bool = False):
        """Autocast at ``amp_dtype`` (training), or at ``pseudo_amp_dtype`` with ``pseudo=True``
        (pseudo-label passes, teachers); a no-op context when that dtype is None."""
        dtype = self.pseudo_amp_dtype if pseudo else self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def count(self, what: str) -> None:
        """Count one training iteration ("iterations") or pseudo-label batch ("pseudo_batches")
        and raise StopRequested when its ``runtime.stop_after_*`` limit is reached."""
        self.counters[what] += 1
        limit = self.runtime[f"stop_after_{what}"]
        if limit is not None and self.counters[what] >= limit:
            raise StopRequested(f"stopped after {limit} {what.replace('_', ' ')} "
                                f"(runtime.stop_after_{what}); rerun the same command to resume")


def colorize(labels: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """Integer labels (B, H, W) (train ids, 255 = ignore) -> uint8 (B, 3, H, W) RGB in the
    Cityscapes colours of the class set with ``num_classes`` classes (``ids.palette_for``; the
    19 classes' for None), ignore (and ids beyond the palette) black. Same device as the input."""
    palette = palette_for(num_classes)
    table = torch.zeros(256, 3, dtype=torch.uint8, device=labels.device)
    table[:len(palette)] = torch.tensor(palette, dtype=torch.uint8, device=labels.device)
    table[IGNORE_INDEX] = 0
    return table[labels.long().clamp(0, 255)].permute(0, 3, 1, 2).contiguous()


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised float (B, 3, H, W) -> uint8 RGB (B, 3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return ((images.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def rng_state() -> Dict[str, Any]:
    """The torch, CUDA, NumPy and Python generator states, as tensors and plain containers
    (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached_gaussian": cached},
             "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), int(numpy["pos"]),
                         int(numpy["has_gauss"]), float(numpy["cached_gaussian"])))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
