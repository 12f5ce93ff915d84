"""The training loop that every stage shares: optimizer, cosine schedule, checkpoints, resume,
progress and TensorBoard logging.

A stage subclass says what one iteration does (``step``), which data it reads (``setup``), what
must happen before its first iteration (``before_training``, e.g. the pseudo-label pass) and
which extra state it checkpoints (``extra_state``). ``Stage.run`` does the rest:

* the model comes from the stage's own checkpoint when one exists (resumption), else from
  ``init_model()`` (the previous stage's last checkpoint, ``--init``, or a fresh model);
* Adam (or SGD with momentum, ``optimizer: sgd``) over ``model.param_groups`` with the backbone
  at ``backbone_lr_mult * lr`` and the head at ``head_lr_mult * lr`` (``schedule.base_lrs``),
  betas and weight decay from ``optim``; BN affine parameters frozen when the stage says
  so (running statistics still update, unless ``bn_eval`` puts BN layers in eval mode);
* per iteration i the cosine schedule (``fastst.methods.schedule``) sets every group's lr, with
  T = t_max * iterations_per_epoch and one floor for all groups (``lr_schedule: constant``
  keeps the rates fixed); the stage runs
  ``epochs * iterations_per_epoch`` iterations (rounds: 2 of t_max = 3 epochs, so they stop at
  2T/3), one epoch being
  floor(|source| / batch_size) iterations counted on the source set in every stage;
* every ``runtime.checkpoint_every`` iterations and at the end, DIR/<stage>/last.pt is written
  atomically with the model, optimizers, schedule, RNG states, iteration and the stage's extras;
* losses are summed on the device and read back (one host sync) every ``runtime.log_every``
  iterations for the progress report and TensorBoard; progress (``fastst.progress``) is a tqdm
  bar on a terminal, else a line at the stage's start and end and every
  ``runtime.progress_every`` iterations;
* a NaN or infinite loss skips the optimizer step (``finite_guard``, the one host sync per
  iteration the loop makes): gradients are zeroed, no optimizer state moves (BatchNorm running
  statistics keep what the forward pass gave them, and a non-finite one stops the stage at
  once), a warning names the stage, the iteration and the loss, and after
  ``runtime.max_nonfinite_steps`` (default 10) skips in a row the stage stops with
  ``NonFiniteLossError``, leaving its last checkpoint (none is written during such a run of
  skips) as it was.

Data order is a pure function of (seed, stage, iteration) (``streams.BatchStream``), and model
and optimizer state are restored exactly, so on the CPU a resumed stage ends with the same
weights as an uninterrupted one.

In a run of several processes (``torchrun``, ``fastst.distributed``) each rank reads
``batch_size / world_size`` items of every global batch, ``step`` gets the model inside
DistributedDataParallel (BN layers converted to SyncBatchNorm first with ``runtime.sync_bn``;
by default each rank normalises with its own batch statistics and DDP keeps rank 0's running
statistics), ``finite_guard`` averages the gradients of the other trained modules (the
discriminators) over the ranks and makes the skip decision for all ranks together, logged losses
are means over the ranks, torch's RNG is seeded per rank (saved per rank in checkpoints), and
rank 0 alone writes checkpoints and logs; the ranks meet at a barrier after the stage's last
checkpoint, which the next stage reads.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from fastst import distributed
from fastst.checkpoint import checkpoint_state, load_checkpoint, save_checkpoint
from fastst.faults import NonFiniteLoss, NonFiniteLossError, check_finite
from fastst.methods.context import RunContext, rng_state, set_rng_state
from fastst.methods.datasets import build_role, crop_transform
from fastst.methods.logs import log_scalars, log_train_images, mean_over_ranks
from fastst.progress import DEFAULT_EVERY, log, progress_bar
from fastst.methods.nonfinite import (DEFAULT_MAX_NONFINITE_STEPS, agree_finite,
                                      stop_if_hopeless)
from fastst.methods.chain import BEST, snapshot_name
from fastst.methods.schedule import CosineSchedule, base_lrs, eta_min, stage_iterations
from fastst.methods.streams import BatchStream, derive_seed
from fastst.models import load_model

__all__ = ["Stage", "CHECKPOINT_NAME", "NonFiniteLoss", "NonFiniteLossError"]

CHECKPOINT_NAME = "last.pt"


def compile_module(module: nn.Module, mode: Optional[str]) -> nn.Module:
    """``runtime.compile``: the module a stage's ``step`` calls, compiled by ``torch.compile`` in
    ``mode``, or ``module`` itself (None). Parameters are shared, so checkpoints and optimizers
    keep using the plain model. "reduce-overhead" also records CUDA graphs on a GPU: within a
    stage every crop and batch has one shape."""
    if mode is None:
        return module
    return torch.compile(module, mode=mode)


class Stage:
    """One stage of a pipeline (source-only, warm-up, an IAST round, ...).

    Args:
        ctx: the run (config, output directory, device, writer, stop hooks).
        name: the stage's name in ``config["stages"]`` (also its directory and log prefix).
    Subclasses implement ``setup`` and ``step`` and may override the other hooks.
    """

    method = ""

    def __init__(self, ctx: RunContext, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.settings = ctx.config["stages"][name]
        self.dir = ctx.run_dir / name
        self.checkpoint_path = self.dir / CHECKPOINT_NAME
        self.optimizers: List[torch.optim.Optimizer] = []
        self.log_images_now = False
        self.visual: Optional[Dict[str, torch.Tensor]] = None
        self.seconds = 0.0
        self.total: Optional[int] = None
        self.init_model: Optional[Callable[[], nn.Module]] = None
        self.skipped_steps = 0
        self.dist = distributed.current()
        self._model_param_ids: set = set()
        # chain=released (fastst.methods.chain): the snapshots later stages read ("best" and/or
        # iterations), taken every select_every iterations; select_metric scores the model on
        # the val split for "best"; label_model builds the model a round labels with.
        self.snapshots: set = set()
        self.select_metric: Optional[Callable[[nn.Module], float]] = None
        self.label_model: Optional[Callable[[], nn.Module]] = None
        self.best: Optional[Dict[str, float]] = None

    # --- hooks -----------------------------------------------------------------------------

    def before_training(self, model: nn.Module, resumed: bool) -> None:
        """Runs once the model is initialised, before ``setup``; ``resumed`` when the stage
        continues from its own checkpoint."""

    def setup(self, model: nn.Module) -> None:
        """Build the data streams and ``self.optimizers`` (the first one the model's)."""
        raise NotImplementedError

    def step(self, model: nn.Module, iteration: int) -> Dict[str, torch.Tensor]:
        """One iteration; returns detached 0-dim loss tensors by name (no host sync). Before its
        first ``optimizer.step()`` it calls ``self.finite_guard(name=loss, ...)`` with every
        loss the iteration's updates use. When ``self.log_images_now`` is set, also store
        ``self.visual = {"image", "logits", "label"}`` of a batch."""
        raise NotImplementedError

    def extra_state(self) -> Dict[str, Any]:
        return {}

    def restore_finished(self, state: Mapping[str, Any]) -> None:
        """Called instead of training when the stage's checkpoint is complete."""

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    # --- shared building blocks ------------------------------------------------------------

    def finite_guard(self, **losses: torch.Tensor) -> None:
        """Raise ``NonFiniteLoss`` if any of ``losses`` (name -> 0-dim tensor) is NaN or
        infinite. ``step`` calls it once, after ``backward`` and before its first
        ``optimizer.step()``, so that the loop can skip the whole update: no optimizer state
        moves, the gradients are zeroed. Costs one host synchronisation per iteration (the
        only one the loop makes between logging intervals).

        In a distributed run it first averages over the ranks the gradients of every optimized
        parameter outside the DDP-wrapped model (discriminators; DDP has averaged the model's
        during backward), then skips on every rank when a loss is not finite on any rank."""
        dctx = self.dist
        if not dctx.is_distributed:
            check_finite(losses)
            return
        others = [p.grad for optimizer in self.optimizers for group in optimizer.param_groups
                  for p in group["params"]
                  if id(p) not in self._model_param_ids and p.grad is not None]
        agree_finite(dctx, losses, others)

    def seed_of(self, *parts) -> int:
        return derive_seed(self.ctx.seed, self.name, *parts)

    def stream(self, role: str, batch_size: int, *, transform=None, dataset=None) -> BatchStream:
        """A seeded stream of ``role`` ("source" or "target") crops for this stage."""
        if dataset is None:
            dataset = build_role(self.ctx.config, role,
                                 transform=crop_transform(self.ctx.config, role)
                                 if transform is None else transform,
                                 seed=self.seed_of(role, "augment"))
        return BatchStream(dataset, batch_size, self.seed_of(role, "order"),
                           workers=self.ctx.runtime["workers"], pin_memory=self.ctx.pin_memory,
                           name=f"{role} set of stage {self.name}", rank=self.dist.rank,
                           world_size=self.dist.world_size)

    def model_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam (IAST) or SGD with momentum (CBST/CRST/TPLD, the stage's ``optimizer`` key) over
        ``model.param_groups(backbone, head)`` at the stage's base rates
        (``schedule.base_lrs``), weight decay from ``optim``."""
        optim = self.ctx.config["optim"]
        rates = base_lrs(self.settings)
        groups = model.param_groups(rates["backbone"], rates["head"])
        if self.settings.get("optimizer", "adam") == "sgd":
            return torch.optim.SGD(groups, lr=self.settings["lr"],
                                   momentum=self.settings["momentum"],
                                   weight_decay=optim["weight_decay"])
        return torch.optim.Adam(groups, betas=tuple(optim["betas"]),
                                weight_decay=optim["weight_decay"])

    def pseudo_summary(self) -> Optional[Dict[str, Any]]:
        """What result.json and summary.json report of the stage's pseudo labels (None: none)."""
        return None

    def set_iterations(self, source_size: int) -> None:
        numbers = stage_iterations(self.settings, source_size)
        self.per_epoch, self.total, self.period = (numbers["per_epoch"], numbers["total"],
                                                   numbers["period"])

    def parallel_model(self, model: nn.Module) -> nn.Module:
        """The module ``step`` calls: ``model`` itself in one process; in a distributed run
        ``model`` in DistributedDataParallel (which averages its gradients over the ranks during
        backward and broadcasts rank 0's buffers at each forward). Call after ``setup``, once
        the trainable parameters are final."""
        dctx = self.dist
        if not dctx.is_distributed:
            return model
        self._model_param_ids = {id(p) for p in model.parameters()}
        device = self.ctx.device
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def _use_sync_bn(self, model: nn.Module) -> None:
        """``runtime.sync_bn``: BatchNorm layers normalise with the statistics of the global
        batch (all ranks) instead of each rank's own; in place, same parameters and buffers."""
        if not (self.dist.is_distributed and self.ctx.runtime.get("sync_bn", False)):
            return
        if self.ctx.device.type != "cuda":
            raise ValueError("runtime.sync_bn=true needs CUDA devices (torch's SyncBatchNorm has "
                             "no CPU implementation); set runtime.sync_bn=false")
        nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def _seed_rank(self, *parts) -> None:
        """Seed torch's generators differently on each rank (distributed runs only)."""
        if self.dist.is_distributed:
            torch.manual_seed(self.seed_of("rank", self.dist.rank, *parts) % 2**63)

    def _restore_rng(self, state: Mapping[str, Any], start: int) -> None:
        ranks = state.get("rng_ranks")
        if not self.dist.is_distributed:
            set_rng_state(state["rng"])
        elif ranks is not None and len(ranks) == self.dist.world_size:
            set_rng_state(ranks[self.dist.rank])
        else:  # saved by a run with another number of processes
            self._seed_rank("resume", start)

    # --- the loop --------------------------------------------------------------------------

    def run(self, init_model: Callable[[], nn.Module]) -> nn.Module:
        """Train this stage (or finish it) and return the model in train mode on the device:
        the model and optimizer state from the stage's checkpoint or ``init_model()``
        (``_prepare_model``, ``_restore``), the iterations (``_train``), the last checkpoint."""
        self._started = time.perf_counter()
        state = load_checkpoint(self.checkpoint_path) if self.checkpoint_path.is_file() else None
        if state is not None and state.get("complete"):
            self.seconds = float(state.get("seconds", 0.0))
            self.total = state.get("total_iterations")
            self.restore_finished(state)
            return load_model(state).to(self.ctx.device, memory_format=self.ctx.memory_format)
        self.init_model = init_model
        show, bars = self.dist.is_main, self.ctx.runtime["progress"]
        log(f"stage {self.name} ({self.method}): "
            + (f"resuming from iteration {state.get('iteration')}" if state is not None
               else "started"), show=show, bars=bars)
        model = self._prepare_model(state, init_model)
        self.setup(model)
        train_model = compile_module(self.parallel_model(model), self.ctx.runtime.get("compile"))
        schedule = CosineSchedule(self.optimizers, self.period,
                                  eta_min(self.settings, self.ctx.config["optim"]))
        start = self._restore(state, schedule)
        log(f"stage {self.name}: training iterations {start + 1}..{self.total}",
            show=show and start < self.total, bars=bars)
        self._train(model, train_model, schedule, start)
        # Each rank's last forward left its own BatchNorm running statistics (DDP broadcasts
        # rank 0's only at the start of a forward; the parameters agree, DDP having averaged
        # the gradients): every rank now takes rank 0's, which are checkpointed, before the
        # stage is evaluated on all ranks.
        with torch.no_grad():
            self.dist.broadcast_(list(model.buffers()))
        self._save(model, schedule, self.total, complete=True)
        log(f"stage {self.name}: done, {self.total} iterations in {self.seconds:.1f} s",
            show=show, bars=bars)
        # The next stage (and the evaluation's result.json) reads the checkpoint rank 0 wrote.
        self.dist.barrier()
        return model

    def _prepare_model(self, state: Optional[Mapping[str, Any]],
                       init_model: Callable[[], nn.Module]) -> nn.Module:
        """The model from ``state`` (the stage's unfinished checkpoint) or ``init_model()``, on
        the device, after ``before_training``, in train mode with the stage's BN settings."""
        ctx = self.ctx
        model = load_model(state) if state is not None else init_model()
        model.to(ctx.device, memory_format=ctx.memory_format)
        self._seconds_before = float(state["seconds"]) if state is not None else 0.0
        self.before_training(model, resumed=state is not None)
        model.freeze_bn_affine(self.settings["freeze_bn_affine"])
        model.train()
        if self.settings.get("bn_eval"):
            # CBST/CRST: BN running statistics frozen too (the released code trains in eval mode).
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        self._use_sync_bn(model)
        return model

    def _restore(self, state: Optional[Mapping[str, Any]], schedule: CosineSchedule) -> int:
        """Load the optimizers, schedule, extras and RNG of ``state`` (or seed the ranks when
        there is none); returns the iteration to start from."""
        start = 0
        if state is not None:
            for optimizer, saved in zip(self.optimizers, state["optimizers"]):
                optimizer.load_state_dict(saved)
            schedule.load_state_dict(state["scheduler"])
            self.load_extra_state(state)
            start = int(state["iteration"])
            self.best = state.get("best")
            self._restore_rng(state, start)
            self.skipped_steps = int(state.get("skipped_steps", 0))
        else:
            self._seed_rank()
        self._last_saved = start if state is not None else None
        return start

    def _save(self, model: nn.Module, schedule: CosineSchedule, iteration: int,
              complete: bool) -> None:
        """Write DIR/<stage>/last.pt after ``iteration`` iterations (rank 0; every rank gives
        its RNG state)."""
        dctx = self.dist
        self.seconds = self._seconds_before + time.perf_counter() - self._started
        rng = rng_state()
        per_rank = {"rng_ranks": dctx.all_gather_object(rng)} if dctx.is_distributed else {}
        if dctx.is_main:
            save_checkpoint(self.checkpoint_path, checkpoint_state(
                model, stage=self.name, method=self.method, iteration=iteration,
                complete=complete, optimizers=[o.state_dict() for o in self.optimizers],
                scheduler=schedule.state_dict(), rng=rng, seconds=self.seconds,
                total_iterations=self.total, skipped_steps=self.skipped_steps,
                best=self.best, **per_rank, **self.extra_state()))
        self._last_saved = iteration

    def _train(self, model: nn.Module, train_model: nn.Module, schedule: CosineSchedule,
               start: int) -> None:
        """Iterations ``start`` .. ``self.total``: schedule, ``step`` (skipping non-finite
        ones), logging, snapshots and periodic checkpoints."""
        ctx, dctx, runtime = self.ctx, self.dist, self.ctx.runtime
        max_nonfinite = int(runtime.get("max_nonfinite_steps", DEFAULT_MAX_NONFINITE_STEPS))
        streak = 0
        # Per loss: its sum and how many steps reported it (a stage may report some parts only
        # on logging steps, e.g. the region loss's unweighted parts).
        sums: Dict[str, torch.Tensor] = {}
        counts: Dict[str, int] = {}
        with progress_bar(self.total, initial=start, desc=self.name, unit="it",
                          show=dctx.is_main, bars=runtime["progress"],
                          every=runtime.get("progress_every", DEFAULT_EVERY)) as bar:
            for iteration in range(start, self.total):
                lr = schedule.step(iteration)
                self.log_images_now = ctx.writer is not None and \
                    (iteration + 1) % runtime["image_every"] == 0
                try:
                    parts = self.step(train_model, iteration)
                except NonFiniteLoss as skipped:
                    streak += 1
                    self._skip_step(model, iteration, skipped, streak, max_nonfinite,
                                    self._last_saved)
                else:
                    streak = 0
                    for key, value in parts.items():
                        sums[key] = sums[key] + value if key in sums else value
                        counts[key] = counts.get(key, 0) + 1
                done = iteration + 1
                if counts and (done % runtime["log_every"] == 0 or done == self.total):
                    means = mean_over_ranks(dctx, sums, counts)
                    log_scalars(ctx.writer, self.name, means, lr, done)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in means.items()}, refresh=False)
                    sums, counts = {}, {}
                if self.log_images_now and self.visual is not None:
                    visual, self.visual = self.visual, None
                    log_train_images(ctx.writer, self.name, visual, done)
                bar.update(1)
                if self.snapshots and done % self.settings["select_every"] == 0:
                    self._snapshot(model, done)
                # No periodic save inside a run of skipped steps: a rerun after giving up then
                # redoes those iterations from the last productive checkpoint.
                if done % runtime["checkpoint_every"] == 0 and done < self.total and not streak:
                    self._save(model, schedule, done, complete=False)
                ctx.count("iterations")

    def _snapshot(self, model: nn.Module, done: int) -> None:
        """chain=released: keep the model after ``done`` iterations as DIR/<stage>/iter_<done>.pt
        where a later stage asks for it, and as best.pt when its val mIoU is at least the best
        so far (the released trainers' ``>=``: later ties win)."""
        keep = [done] if done in self.snapshots else []
        if BEST in self.snapshots:
            miou = float(self.select_metric(model))
            if self.best is None or miou >= self.best["miou"]:
                self.best = {"iteration": done, "miou": miou}
                keep.append(BEST)
        if not keep or not self.dist.is_main:
            return
        state = checkpoint_state(model, stage=self.name, method=self.method, iteration=done,
                                 snapshot=True)
        for which in keep:
            save_checkpoint(self.dir / snapshot_name(which), state)

    def _skip_step(self, model: nn.Module, iteration: int, skipped: NonFiniteLoss, streak: int,
                   limit: int, last_saved: Optional[int]) -> None:
        """Undo what a step with a non-finite loss left (gradients), warn, and raise
        NonFiniteLossError when the streak reaches ``limit`` or the model's own statistics
        (BatchNorm running mean/var, updated by the forward pass) are no longer finite."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        where = (f"{self.checkpoint_path} (iteration {last_saved}) is the last good checkpoint"
                 if last_saved is not None else
                 f"no checkpoint of {self.name} was written; it will start over")
        losses = ", ".join(f"{name} = {value}" for name, value in skipped.losses.items())
        stop_if_hopeless(self.dist, self.name, model, iteration, losses, streak, limit, where)
        warnings.warn(f"stage {self.name}, iteration {iteration + 1}: {losses}; optimizer step "
                      f"skipped ({streak} in a row, stopping at {limit})", RuntimeWarning,
                      stacklevel=4)
        if self.ctx.writer is not None:
            self.ctx.writer.add_scalar(f"{self.name}/skipped_steps", self.skipped_steps,
                                       iteration + 1)
