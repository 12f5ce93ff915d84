"""Non-finite losses in the training loop (``fastst.methods.trainer.Stage``): the skip decision
all ranks share, and when a run of skipped steps stops the stage."""
from __future__ import annotations

import math
from typing import List, Mapping

import torch
from torch import nn

from fastst.faults import NonFiniteLoss, NonFiniteLossError

__all__ = ["DEFAULT_MAX_NONFINITE_STEPS", "agree_finite", "stop_if_hopeless"]

DEFAULT_MAX_NONFINITE_STEPS = 10


def agree_finite(dctx, losses: Mapping[str, torch.Tensor], other_grads: List[torch.Tensor]
                 ) -> None:
    """Distributed runs: average ``other_grads`` (gradients outside the DDP-wrapped model) over
    the ranks, then raise ``NonFiniteLoss`` on every rank when a loss (name -> 0-dim tensor) is
    not finite on any rank."""
    dctx.all_reduce_mean_(other_grads)
    if not losses:
        return
    values = torch.stack([loss.detach().reshape(()).float() for loss in losses.values()])
    flag = (~torch.isfinite(values)).any().to(torch.int32).reshape(1)
    if not bool(dctx.all_reduce_(flag, "max")):
        return
    numbers = values.cpu().tolist()
    bad = {name: value for name, value in zip(losses, numbers) if not math.isfinite(value)}
    raise NonFiniteLoss(bad or {"loss on another rank": math.nan})


def stop_if_hopeless(dctx, stage: str, model: nn.Module, iteration: int, losses: str,
                     streak: int, limit: int, where: str) -> None:
    """Raise NonFiniteLossError when the skipped step at ``iteration`` (0-based) left the
    model's BatchNorm running statistics non-finite on any rank, or when ``streak`` skips in a
    row reach ``limit``. ``losses`` names the bad losses; ``where`` the last good checkpoint."""
    buffers_finite = not dctx.any(not all(
        bool(torch.isfinite(buffer).all()) for buffer in model.buffers()
        if buffer.is_floating_point()))
    if not buffers_finite:
        raise NonFiniteLossError(
            f"stage {stage}, iteration {iteration + 1}: {losses}, and the forward pass "
            "made the model's BatchNorm running statistics non-finite, so every later step "
            f"would fail too; stopped. {where}. Look for a bad input batch or overflow "
            "(runtime.amp=none rules out float16/bfloat16)")
    if streak >= limit:
        raise NonFiniteLossError(
            f"stage {stage}: the loss was non-finite in {streak} consecutive iterations "
            f"({iteration + 2 - streak} to {iteration + 1}; last: {losses}), so training "
            f"stopped (runtime.max_nonfinite_steps = {limit}). {where}, left as it was. "
            "Try runtime.amp=none (rules out float16/bfloat16 overflow) or a lower "
            f"stages.{stage}.lr in a new --out directory, then rerun")
