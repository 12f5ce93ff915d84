"""Learning rates of a stage: the base rate of every parameter group and the schedule (README
"Training", the released IAST ``build_optimizer`` and ``CosineAnnealingLR_with_Restart``).

A stage's ``lr`` is the recipe's LR. The backbone's base rate is ``backbone_lr_mult * lr``, the
head's ``head_lr_mult * lr`` (IAST: 0.1 and 1; CBST/CRST/TPLD: 1 and 10), a discriminator's its
stage's ``d_lr``. Per iteration i (counted from 0 within a stage, never restarted) every group
follows ``lr_i = eta_min + (base - eta_min) * (1 + cos(pi * i / T)) / 2`` from its own base rate
towards one floor ``eta_min = eta_min_ratio * lr`` shared by all groups and the discriminator
(the released code passes ``eta_min = TRAIN.LR * 0.001`` to every scheduler), with
``T = t_max * iterations_per_epoch``. Self-training rounds have t_max = 3 and stop after 2
epochs, i.e. at i = 2T/3. ``lr_schedule: constant`` keeps every base rate.
"""
import math
from typing import Any, Dict, List, Mapping, Optional

import torch

__all__ = ["cosine_lr", "base_lrs", "eta_min", "CosineSchedule", "stage_iterations",
           "epoch_items", "stage_lengths"]


def cosine_lr(iteration: float, base_lr: float, period: float, floor: float) -> float:
    """The learning rate at ``iteration`` of a cosine decay from ``base_lr`` to ``floor`` over
    ``period`` iterations (held at the floor after it)."""
    if period <= 0:
        raise ValueError(f"period must be positive, got {period}")
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    progress = min(iteration / period, 1.0)
    return floor + (base_lr - floor) * (1.0 + math.cos(math.pi * progress)) / 2.0


def base_lrs(settings: Mapping[str, Any]) -> Dict[str, float]:
    """{"backbone", "head"[, "discriminator"]}: the base rates of a stage's parameter groups
    (the discriminator's where the stage trains one, i.e. has ``d_lr``)."""
    rates = {"backbone": settings["backbone_lr_mult"] * settings["lr"],
             "head": settings["head_lr_mult"] * settings["lr"]}
    if "d_lr" in settings:
        rates["discriminator"] = settings["d_lr"]
    return rates


def eta_min(settings: Mapping[str, Any], optim: Mapping[str, Any]) -> Optional[float]:
    """The cosine floor of every group of a stage, or None for ``lr_schedule: constant``."""
    if settings.get("lr_schedule", "cosine") == "constant":
        return None
    return optim["eta_min_ratio"] * settings["lr"]


class CosineSchedule:
    """Sets the lr of every parameter group of ``optimizers`` for an iteration.

    The base lr of each group is read once, at construction (``initial_lr``, kept in the group
    so that a restored optimizer state carries it). ``floor`` is the shared eta_min (None: the
    rates stay at their base). ``step(i)`` sets the lrs of iteration i and returns the first
    group's."""

    def __init__(self, optimizers: List[torch.optim.Optimizer], period: float,
                 floor: Optional[float]) -> None:
        if not period > 0:
            raise ValueError(f"the schedule period T must be positive, got {period}")
        self.optimizers = list(optimizers)
        self.period = float(period)
        self.floor = None if floor is None else float(floor)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        self.iteration = 0

    def lr(self, iteration: float, base_lr: float) -> float:
        """The rate at ``iteration`` of a group whose base rate is ``base_lr``."""
        if self.floor is None:
            return base_lr
        return cosine_lr(iteration, base_lr, self.period, self.floor)

    def step(self, iteration: int) -> float:
        self.iteration = int(iteration)
        first = None
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.lr(self.iteration, group["initial_lr"])
                first = group["lr"] if first is None else first
        return first

    def state_dict(self) -> Dict[str, Any]:
        return {"iteration": self.iteration, "period": self.period, "floor": self.floor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if abs(float(state["period"]) - self.period) > 1e-9 * self.period:
            raise ValueError(f"checkpoint schedule has period T = {state['period']}, this run "
                             f"{self.period}; the recipe changed since the checkpoint was written")
        self.iteration = int(state["iteration"])


def stage_iterations(settings: Mapping[str, Any], source_size: int) -> Dict[str, float]:
    """{"per_epoch", "total", "period"} of a stage: per_epoch = floor(source_size / batch_size)
    (or ``iterations_per_epoch``), total = epochs * per_epoch (or ``iterations``),
    period T = t_max * per_epoch."""
    per_epoch = settings["iterations_per_epoch"] or source_size // settings["batch_size"]
    if per_epoch < 1:
        raise ValueError(f"the source set has {source_size} images, fewer than one batch of "
                         f"{settings['batch_size']}")
    total = settings["iterations"] or settings["epochs"] * per_epoch
    return {"per_epoch": per_epoch, "total": int(total), "period": settings["t_max"] * per_epoch}


def epoch_items(method: str, settings: Mapping[str, Any], sizes: Mapping[str, int]) -> int:
    """The items an epoch of a stage visits, whose floor-division by ``batch_size`` is its
    iterations per epoch: the source set (source-only, warm-up, IAST rounds: epochs are counted
    on the source set), the mixed list of every target image and floor(source_portion *
    |source|) source images (CBST/CRST, TPLD phase 1), or half the target set (TPLD phase 2:
    each step reads an easy and a hard crop)."""
    if method in ("cbst", "tpld_phase1"):
        return sizes["target"] + math.floor(sizes["source"] * settings["source_portion"])
    if method == "tpld_phase2":
        return sizes["target"] // 2
    return sizes["source"]


def stage_lengths(config: Mapping[str, Any], name: str,
                  sizes: Mapping[str, int]) -> Dict[str, float]:
    """{"per_epoch", "total", "period"} of stage ``name`` of ``config`` (``stage_iterations``
    of its ``epoch_items``); ``sizes``: {"source", "target", "val"} set sizes."""
    settings = config["stages"][name]
    return stage_iterations(settings, epoch_items(settings["method"], settings, sizes))
