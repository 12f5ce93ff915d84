"""The learning-rate schedule of the released IAST recipe (SPEC section 4).

Per iteration i (counted from 0 within a stage, never restarted):
``lr_i = eta_min + (lr - eta_min) * (1 + cos(pi * i / T)) / 2`` with ``eta_min = eta_min_ratio *
lr`` (0.001 in the recipe) and ``T = t_max * iterations_per_epoch``. Self-training rounds have
t_max = 3 and stop after 2 epochs, i.e. at i = 2T/3, where lr_i = eta_min + (lr - eta_min) / 4.
Each optimizer parameter group follows the schedule from its own initial lr (the head's is 10x
the backbone's), and so does the discriminator's optimizer.
"""
import math
from typing import Dict, List

import torch

__all__ = ["cosine_lr", "CosineSchedule"]


def cosine_lr(iteration: int, base_lr: float, period: float, eta_min_ratio: float = 0.001) -> float:
    """The learning rate at ``iteration`` of a cosine decay from ``base_lr`` to
    ``eta_min_ratio * base_lr`` over ``period`` iterations (held at the minimum after it)."""
    if period <= 0:
        raise ValueError(f"period must be positive, got {period}")
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    eta_min = eta_min_ratio * base_lr
    progress = min(iteration / period, 1.0)
    return eta_min + (base_lr - eta_min) * (1.0 + math.cos(math.pi * progress)) / 2.0


class CosineSchedule:
    """Sets the lr of every parameter group of ``optimizers`` for an iteration.

    The initial lr of each group is read once, at construction (``initial_lr``, kept in the
    group so that a restored optimizer state carries it). ``step(i)`` sets the lrs of iteration
    i and returns the first group's."""

    def __init__(self, optimizers: List[torch.optim.Optimizer], period: float,
                 eta_min_ratio: float = 0.001) -> None:
        if not period > 0:
            raise ValueError(f"the schedule period T must be positive, got {period}")
        self.optimizers = list(optimizers)
        self.period = float(period)
        self.eta_min_ratio = float(eta_min_ratio)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        self.iteration = 0

    def step(self, iteration: int) -> float:
        self.iteration = int(iteration)
        first = None
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(self.iteration, group["initial_lr"], self.period,
                                        self.eta_min_ratio)
                first = group["lr"] if first is None else first
        return first

    def state_dict(self) -> Dict[str, float]:
        return {"iteration": self.iteration, "period": self.period,
                "eta_min_ratio": self.eta_min_ratio}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        if abs(float(state["period"]) - self.period) > 1e-9 * self.period:
            raise ValueError(f"checkpoint schedule has period T = {state['period']}, this run "
                             f"{self.period}; the recipe changed since the checkpoint was written")
        self.iteration = int(state["iteration"])
