"""Several processes, one run: the process group that ``torchrun`` sets up, this rank's device,
and the few collectives the pipeline needs.

    torchrun --standalone --nproc_per_node 8 -m fastst.train --preset iast_gta5 --out runs/x

``torchrun`` starts one process per GPU with RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous
address) in the environment. ``init_from_env(device)`` joins the group: NCCL with device
``cuda:LOCAL_RANK`` on GPUs, gloo on the CPU. A plain ``python -m fastst.train`` has no such
environment and gets a context of world size 1 with no process group: every collective below is
then a no-op that returns its input, so single-process runs do exactly what they did before.

``current()`` is the context of the running process (the one ``init_from_env`` made, or one read
off a group someone else initialised, or world size 1); the pseudo-label passes, the evaluation
and the training loop ask it for their rank instead of threading it through every call.

Collectives move tensors to the group's communication device (the rank's GPU for NCCL, the CPU
for gloo) and hand results back on the device of the input.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "init_from_env", "current", "shutdown", "SINGLE"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int64,
           torch.int32, torch.bool)
_MAX_DIMS = 8
# NCCL's default timeout (10 min) is shorter than one rank writing a large checkpoint or
# evaluating while the others wait at a barrier on a slow disk.
_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a multi-process run.

    rank: 0 .. world_size - 1. world_size: processes in the group (1: no group). local_rank:
    the rank on this machine (the GPU index). backend: "nccl", "gloo" or None (no group).
    device: the device this rank computes on (``cuda:LOCAL_RANK`` under NCCL)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, results, manifests and logs."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be for a collective: the rank's GPU for NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    # --- collectives (no-ops with world_size 1) ----------------------------------------------

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if not self.is_distributed:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (pickled; for small objects: flags, states,
        manifests)."""
        if not self.is_distributed:
            return obj
        holder = [obj if self.rank == src else None]
        dist.broadcast_object_list(holder, src=src, device=self._object_device())
        return holder[0]

    def broadcast_(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Overwrite each of ``tensors`` with rank ``src``'s, in place (e.g. a model's
        parameters and buffers); same shapes and order on every rank."""
        if not self.is_distributed:
            return
        for tensor in tensors:
            work = self._to_comm(tensor)
            dist.broadcast(work, src=src)
            if work is not tensor:
                tensor.copy_(work)

    def all_gather_object(self, obj: Any) -> List[Any]:
        """[rank 0's obj, rank 1's obj, ...] on every rank (pickled; small objects only)."""
        if not self.is_distributed:
            return [obj]
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` over the ranks in place ("sum", "max" or "min"); returns it."""
        if not self.is_distributed:
            return tensor
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op not in ops:
            raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
        work = self._to_comm(tensor)
        dist.all_reduce(work, op=ops[op])
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def all_reduce_mean_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average each of ``tensors`` over the ranks in place (e.g. gradients), in one
        collective per dtype. Every rank must pass tensors of the same shapes in the same order."""
        if not self.is_distributed or not tensors:
            return
        by_dtype: dict = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1).to(self.comm_device) for t in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            offset = 0
            for tensor in group:
                count = tensor.numel()
                tensor.copy_(flat[offset:offset + count].view_as(tensor))
                offset += count

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank."""
        if not self.is_distributed:
            return bool(flag)
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def all_gather(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on every rank), in rank order, on the
        device of the input. With world_size 1: ``[tensor]`` itself."""
        if not self.is_distributed:
            return [tensor]
        work = self._to_comm(tensor).contiguous()
        gathered = [torch.empty_like(work) for _ in range(self.world_size)]
        dist.all_gather(gathered, work)
        return [g.to(tensor.device) for g in gathered]

    def all_gather_batches(self, tensor: Optional[torch.Tensor],
                           device: Optional[torch.device] = None) -> List[torch.Tensor]:
        """Every rank's batch ``tensor`` (n_r, ...), in rank order, where the batch sizes n_r
        may differ and a rank may have none (``tensor=None`` or n_r = 0); the trailing shape
        and dtype must agree where present. Results are on ``device`` (default: the input's,
        else the rank's device); a rank without a batch contributes an empty (0, ...) tensor.
        Costs one tiny and one payload all_gather (padded to the largest batch)."""
        if device is None:
            device = tensor.device if tensor is not None else self.device
        if not self.is_distributed:
            return [tensor.to(device)] if tensor is not None else []
        header = torch.zeros(3 + _MAX_DIMS, dtype=torch.int64)
        if tensor is not None and tensor.shape[0] > 0:
            if tensor.dim() > _MAX_DIMS or tensor.dtype not in _DTYPES:
                raise ValueError(f"all_gather_batches takes tensors of at most {_MAX_DIMS} "
                                 f"dimensions and dtypes {_DTYPES}, got {tuple(tensor.shape)} "
                                 f"{tensor.dtype}")
            header[0], header[1], header[2] = tensor.shape[0], tensor.dim(), \
                _DTYPES.index(tensor.dtype)
            header[3:3 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        headers = [h.cpu() for h in self.all_gather(header.to(self.comm_device))]
        present = [h for h in headers if h[0] > 0]
        if not present:
            return [torch.empty(0, device=device) for _ in headers]
        first = present[0]
        ndim, dtype = int(first[1]), _DTYPES[int(first[2])]
        trailing = tuple(int(s) for s in first[4:3 + ndim])
        for rank, h in enumerate(headers):
            if h[0] > 0 and (int(h[1]) != ndim or _DTYPES[int(h[2])] != dtype
                             or tuple(int(s) for s in h[4:3 + ndim]) != trailing):
                raise ValueError(f"all_gather_batches: rank {rank} has a batch of shape "
                                 f"{tuple(int(s) for s in h[3:3 + int(h[1])])}, another "
                                 f"{(int(first[0]),) + trailing}; batches must agree but for "
                                 "their first dimension")
        largest = max(int(h[0]) for h in headers)
        padded = torch.zeros((largest,) + trailing, dtype=dtype, device=self.comm_device)
        if tensor is not None and tensor.shape[0] > 0:
            padded[:tensor.shape[0]].copy_(tensor)
        gathered = self.all_gather(padded)
        return [g[:int(h[0])].to(device) for g, h in zip(gathered, headers)]

    # --- dealing a pass's batches to the ranks --------------------------------------------

    def pass_steps(self, count: int, batch_size: int) -> List[List[Tuple[int, int]]]:
        """How a pass over ``count`` items in one-process batches of ``batch_size`` (the last one
        possibly short) is dealt to the ranks: step s holds the one-process batches
        s*N .. s*N + N - 1 and rank r takes batch s*N + r. Returns, per step, the
        (start, stop) positions of each rank's batch in rank order (start == stop: none).

        Each rank thus runs the model on exactly the batches a one-process pass runs it on
        (so its outputs are bit for bit those of one process, whatever the kernels do with the
        batch size), and the ranks' batches of a step, concatenated in rank order, are the
        step's items in pass order."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        span = self.world_size * batch_size
        return [[(min(first + r * batch_size, count), min(first + (r + 1) * batch_size, count))
                 for r in range(self.world_size)] for first in range(0, count, span)]

    def _to_comm(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.device == self.comm_device else tensor.to(self.comm_device)

    def _object_device(self) -> Optional[torch.device]:
        return self.comm_device if self.backend == "nccl" else None


SINGLE = DistributedContext()
# The context of the group init_from_env created (None: it created none).
_active: Optional[DistributedContext] = None


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RuntimeError(f"environment variable {name} = {value!r} is not an integer; start "
                           "multi-process runs with torchrun (e.g. torchrun --standalone "
                           "--nproc_per_node 2 -m fastst.train ...)") from None


def init_from_env(device: "torch.device | str" = "cpu") -> DistributedContext:
    """Join the process group that torchrun's environment describes and return this rank's
    context; with no such environment (WORLD_SIZE unset or 1) return a world-size-1 context on
    ``device``.

    device: the run's device ("cpu", "cuda", ...): CUDA selects NCCL and ``cuda:LOCAL_RANK``,
    anything else gloo on the CPU. Safe to call twice (the second call returns the first's
    context); when the caller initialised torch.distributed itself, its group is used."""
    global _active
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        return _active if _active is not None else _context_of_group(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size <= 1:
        return DistributedContext(device=device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise RuntimeError(f"LOCAL_RANK {local_rank} but this machine has {count} CUDA "
                               f"device(s); start at most {count} processes per node "
                               "(torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                            world_size=world_size, timeout=_TIMEOUT)
    _active = DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank,
                                 backend=backend, device=device)
    return _active


def _context_of_group(device: torch.device) -> DistributedContext:
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
        local_rank = device.index
    return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                              local_rank=local_rank, backend=str(backend), device=device)


def current() -> DistributedContext:
    """The context of this process: the one ``init_from_env`` made, one describing a group the
    caller initialised, or world size 1 (no group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    if _active is not None:
        return _active
    return _context_of_group(torch.device("cpu"))


def shutdown() -> None:
    """Leave the process group if ``init_from_env`` created it (at the end of a command)."""
    global _active
    if _active is not None and dist.is_initialized():
        dist.destroy_process_group()
    _active = None
