"""The checks of every op's backends against the torch reference (docs/ops.md §0.7): seeded
inputs at a `Shape`, one call of a public op per `Case`, the comparison, and `run_case`, which
runs, compares and times one (case, backend, device). `python -m fastst.doctor` runs them all;
the self-check (fastst/ops/_selftest.py) runs one op's at the small shape.

The reference is the case's call on the "torch" backend (fastst/ops/reference.py); agreement is
docs/ops.md §0.5's: label maps, thresholds and confidences equal; IAS from logits within §0.5's
rule; losses to relative 1e-5 (`region_loss` parts 2e-5); gradients to 1e-4 x the largest
gradient element.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference
from ._backend import _devices_of, available_backends
from .bootstrap_loss import LOSS_BACKENDS, MRKLD_BACKENDS, bootstrap_loss, mrkld_loss
from .cbst import IMPLEMENTED as THRESHOLD_BACKENDS
from .cbst import LABEL_BACKENDS, ClassBalancedThresholds, cbst_pseudo_label
from .ias import IMPLEMENTED as IAS_BACKENDS
from .ias import ias_pseudo_label
from .region_loss import IMPLEMENTED as REGION_BACKENDS
from .region_loss import region_loss
from .tpld import (CONFIDENCE_BACKENDS, TORCH_ONLY, VOTE_BACKENDS, image_confidence, self_information,
                   split_easy_hard, tpld_soft_targets, tpld_vote)

# docs/ops.md §0.5 (the tolerances of tests/ops/test_*backends.py and the loss tests).
LOSS_RTOL = 1e-5
LOSS_ATOL = 1e-6
PARTS_RTOL = 2e-5
GRAD_RTOL = 1e-4
IAS_LOGITS_ATOL = 1e-6
# torch-only ops run on another device than the reference (tests/ops/test_tpld.py).
ELEMENTWISE_RTOL = 1e-6


@dataclass(frozen=True)
class Shape:
    """B images, C classes, logits (h, w) upsampled to (H, W); probabilities and labels are
    (B, C, H, W) and (B, H, W)."""
    name: str
    B: int
    C: int
    h: int
    w: int
    H: int
    W: int


TINY = Shape("tiny", 2, 5, 3, 4, 7, 9)            # the Triton interpreter on the CPU
SMALL = Shape("small", 2, 19, 9, 13, 33, 47)      # non-multiple sizes, several Triton blocks
LARGE = Shape("large", 8, 19, 128, 256, 1024, 2048)  # Cityscapes-sized, logits at 1/8


Outputs = Tuple[torch.Tensor, ...]
Inputs = Dict[str, object]


@dataclass(frozen=True)
class Case:
    """One checked call. `op` is the name the op passes to choose_backend; `sync_free` are the
    backends documented not to synchronise the host (docs/ops.md §0.4)."""
    op: str
    variant: str
    backends: Tuple[str, ...]
    uses_logits: bool
    make: Callable[[Shape, torch.Generator, torch.device], Inputs]
    run: Callable[[Inputs, str], Outputs]
    compare: Callable[[Inputs, Outputs, Outputs], Optional[str]]
    sync_free: Tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.op} ({self.variant})" if self.variant else self.op

    def shape_text(self, s: Shape) -> str:
        if self.uses_logits:
            return f"{s.B}x{s.C}x{s.h}x{s.w}->{s.H}x{s.W}"
        return f"{s.B}x{s.C}x{s.H}x{s.W}"


# ---------------------------------------------------------------------------------- inputs
def _probs(s: Shape, g: torch.Generator, device) -> torch.Tensor:
    return torch.softmax(torch.randn(s.B, s.C, s.H, s.W, generator=g, device=device) * 3, dim=1)


def _logits(s: Shape, g: torch.Generator, device) -> torch.Tensor:
    return torch.randn(s.B, s.C, s.h, s.w, generator=g, device=device) * 3


def _lambdas(s: Shape, g: torch.Generator, device) -> torch.Tensor:
    return 0.3 + 0.6 * torch.rand(s.C, generator=g, device=device)


def _labels(s: Shape, g: torch.Generator, device) -> torch.Tensor:
    labels = torch.randint(0, s.C, (s.B, s.H, s.W), generator=g, device=device, dtype=torch.uint8)
    ignored = torch.rand(s.B, s.H, s.W, generator=g, device=device) < 0.3
    return labels.masked_fill(ignored, 255)


def _probs_input(s, g, device):
    return {"probs": _probs(s, g, device), "lambdas": _lambdas(s, g, device)}


def _loss_input(s, g, device):
    return {"logits": _logits(s, g, device), "target": _labels(s, g, device),
            "lambdas": _lambdas(s, g, device), "size": (s.H, s.W)}


def _soft_input(s, g, device):
    inputs = _loss_input(s, g, device)
    inputs["soft"] = reference.tpld_soft_targets(_probs(s, g, device), inputs["lambdas"])
    return inputs


def _teacher_input(s, g, device):
    inputs = _loss_input(s, g, device)
    inputs["teacher"] = _logits(s, g, device)
    return inputs


def _mrkld_input(s, g, device):
    inputs = _loss_input(s, g, device)
    inputs["is_target"] = torch.arange(s.B, device=device) % 2 == 0
    return inputs


def to_device(inputs: Inputs, device) -> Inputs:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


# ---------------------------------------------------------------------------------- calls
def _ias(mode: str, from_logits: bool):
    def run(x: Inputs, backend: str) -> Outputs:
        if from_logits:
            return tuple(ias_pseudo_label(x["logits"], None, alpha=0.2, mode=mode, from_logits=True,
                                          size=x["size"], backend=backend))
        return tuple(ias_pseudo_label(x["probs"], None, alpha=0.2, mode=mode, backend=backend))
    return run


def _with_grad(loss_of):
    """Forward and backward of a loss: (loss or parts ..., d loss / d logits)."""
    def run(x: Inputs, backend: str) -> Outputs:
        logits = x["logits"].detach().clone().requires_grad_(True)
        out = loss_of(logits, x, backend)
        parts = out if isinstance(out, tuple) else (out,)
        parts[0].backward()
        return tuple(p.detach() for p in parts) + (logits.grad,)
    return run


def _region(logits, x, backend):
    return region_loss(logits, x["target"], return_parts=True, backend=backend)


def _bootstrap_hard(logits, x, backend):
    return bootstrap_loss(logits, x["target"], x["lambdas"], backend=backend)


def _bootstrap_soft(logits, x, backend):
    return bootstrap_loss(logits, x["target"], x["lambdas"], soft_target=x["soft"], backend=backend)


def _bootstrap_teacher(logits, x, backend):
    return bootstrap_loss(logits, None, x["lambdas"], teacher_logits=x["teacher"], size=x["size"],
                          backend=backend)


def _mrkld(logits, x, backend):
    return mrkld_loss(logits, x["target"], x["is_target"], backend=backend)


def _cbst_labels(x, backend):
    return (cbst_pseudo_label(x["probs"], x["lambdas"], backend=backend),)


def _vote(x, backend):
    return (tpld_vote(x["probs"], x["lambdas"], backend=backend),)


def _confidence(x, backend):
    return (image_confidence(x["probs"], x["lambdas"], backend=backend),)


def _thresholds(x, backend):
    accumulator = ClassBalancedThresholds(x["probs"].shape[1], subsample=2, backend=backend)
    accumulator.update(x["probs"])
    return accumulator.thresholds(0.5), accumulator.class_counts()


def _split(x, backend):
    return (split_easy_hard(x["probs"].flatten(1).amax(1).double(), 0.5, backend=backend),)


def _soft_targets(x, backend):
    return (tpld_soft_targets(x["probs"], x["lambdas"], backend=backend),)


def _self_information(x, backend):
    return (self_information(x["probs"], backend=backend),)


# ---------------------------------------------------------------------------------- comparisons
def _differ(name: str, want: torch.Tensor, got: torch.Tensor) -> str:
    if tuple(want.shape) != tuple(got.shape) or want.dtype != got.dtype:
        return f"{name}: {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} {want.dtype}"
    bad = want != got
    where = tuple(int(i) for i in bad.nonzero()[0])
    return (f"{name}: {int(bad.sum())} of {bad.numel()} differ, first at {where}: "
            f"want {want[where].item():.9g}, got {got[where].item():.9g}")


def _exact(*names: str):
    def compare(x: Inputs, want: Outputs, got: Outputs) -> Optional[str]:
        for name, w, g in zip(names, want, got):
            g = g.to(w.device)
            if w.dtype != g.dtype or not torch.equal(w, g):
                return _differ(name, w, g)
        return None
    return compare


def _close(*names: str, rtol: float):
    """Elementwise |got - want| <= rtol |want| (+ rtol x the largest |want| for scalars)."""
    def compare(x: Inputs, want: Outputs, got: Outputs) -> Optional[str]:
        for name, w, g in zip(names, want, got):
            w, g = w.double(), g.to(w.device).double()
            if w.shape != g.shape or not bool(((w - g).abs() <= rtol * w.abs()).all()):
                return _worst(name, w, g, f"rtol {rtol:g}")
        return None
    return compare


def _worst(name: str, w: torch.Tensor, g: torch.Tensor, bound: str) -> str:
    if w.shape != g.shape:
        return f"{name}: shape {tuple(g.shape)}, want {tuple(w.shape)}"
    err = (w - g).abs()
    where = tuple(int(i) for i in (err == err.max()).nonzero()[0]) if err.dim() else ()
    return (f"{name}: want {w[where].item():.9g}, got {g[where].item():.9g}"
            f"{f' at {where}' if where else ''} ({bound})")


def _losses(*names: str, rtol: float, relative_to_largest: bool):
    """Loss values within rtol (`region_loss` parts: atol rtol x the largest part, as in
    tests/ops/test_region_loss_backends.py; other losses atol 1e-6), then the gradient within
    GRAD_RTOL x its largest element (docs/ops.md §0.5)."""
    def compare(x: Inputs, want: Outputs, got: Outputs) -> Optional[str]:
        w = torch.stack([t.double() for t in want[:-1]])
        g = torch.stack([t.to(want[0].device).double() for t in got[:-1]])
        atol = rtol * (float(w.abs().max()) or 1.0) if relative_to_largest else LOSS_ATOL
        for i, name in enumerate(names):
            if not abs(float(g[i]) - float(w[i])) <= atol + rtol * abs(float(w[i])):
                return f"{name}: want {float(w[i]):.9g}, got {float(g[i]):.9g} (rtol {rtol:g})"
        want_grad, got_grad = want[-1].double(), got[-1].to(want[-1].device).double()
        if got_grad.shape != want_grad.shape:
            return f"grad: shape {tuple(got_grad.shape)}, want {tuple(want_grad.shape)}"
        scale = float(want_grad.abs().max()) or 1.0
        err = float((got_grad - want_grad).abs().max())
        if not err <= GRAD_RTOL * scale:
            return f"grad: max abs error {err:.3e} > {GRAD_RTOL:g} x max |grad| {scale:.3e}"
        return None
    return compare


def _ias_from_logits(mode: str):
    """docs/ops.md §0.5: thresholds within 1e-6 (official: also the float16 rounding step
    (1 - beta) 2^-11); a label may differ only where the top-2 probabilities are closer than
    1e-6 or m is that close to its class's threshold."""
    beta = 0.9
    tol = IAS_LOGITS_ATOL if mode == "paper" else max(IAS_LOGITS_ATOL, (1 - beta) * 2.0 ** -11)

    def compare(x: Inputs, want: Outputs, got: Outputs) -> Optional[str]:
        want_labels, _, want_seq = want
        labels, theta, seq = (t.to(want_seq.device) for t in got)
        if seq.shape != want_seq.shape or not bool(((seq - want_seq).abs() <= tol).all()):
            return _worst("theta_per_instance", want_seq, seq, f"atol {tol:.2g}")
        if not torch.equal(theta, seq[-1]):
            return "theta_out is not the last instance's theta"
        if labels.shape != want_labels.shape or labels.dtype != want_labels.dtype:
            return _differ("labels", want_labels, labels)
        differ = labels != want_labels
        if not bool(differ.any()):
            return None
        logits = x["logits"].to(want_seq.device)
        up = F.interpolate(logits, size=x["size"], mode="bilinear", align_corners=True)
        p = torch.softmax(up.double(), 1)
        top2 = p.topk(2, dim=1).values
        m, a = p.max(1)
        group = 2 if mode == "official" else 1
        theta_img = want_seq.repeat_interleave(group, 0)[: logits.shape[0]]
        near_theta = (m - theta_img.gather(1, a.flatten(1)).view_as(m)).abs() < tol
        allowed = ((top2[:, 0] - top2[:, 1]) < IAS_LOGITS_ATOL) | near_theta
        if bool((differ & ~allowed).any()):
            return _differ("labels", want_labels, labels) + " (not at a near-tie)"
        return None
    return compare


# ---------------------------------------------------------------------------------- the cases
_IAS_OUT = ("labels", "theta_out", "theta_per_instance")


def _logits_input(s, g, device):
    return {"logits": _logits(s, g, device), "size": (s.H, s.W)}


def _probs_only(s, g, device):
    return {"probs": _probs(s, g, device)}


# Every case, in the order of docs/ops.md; `sync_free` from docs/ops.md §0.4.
CASES: Tuple[Case, ...] = tuple([
    Case("ias_pseudo_label", f"{mode}, probabilities", IAS_BACKENDS, False, _probs_only,
         _ias(mode, False), _exact(*_IAS_OUT), ("cuda",))
    for mode in ("paper", "official")
] + [
    Case("ias_pseudo_label", f"{mode}, logits", IAS_BACKENDS, True, _logits_input,
         _ias(mode, True), _ias_from_logits(mode), ("cuda",))
    for mode in ("paper", "official")
] + [
    Case("region_loss", "", REGION_BACKENDS, True, _loss_input, _with_grad(_region),
         _losses("loss", "ce", "kld", "ent", rtol=PARTS_RTOL, relative_to_largest=True),
         ("triton",)),
    Case("bootstrap_loss", "hard", LOSS_BACKENDS, True, _loss_input, _with_grad(_bootstrap_hard),
         _losses("loss", rtol=LOSS_RTOL, relative_to_largest=False), ("triton",)),
    Case("bootstrap_loss", "soft", LOSS_BACKENDS, True, _soft_input, _with_grad(_bootstrap_soft),
         _losses("loss", rtol=LOSS_RTOL, relative_to_largest=False), ("triton",)),
    Case("bootstrap_loss", "teacher", LOSS_BACKENDS, True, _teacher_input,
         _with_grad(_bootstrap_teacher), _losses("loss", rtol=LOSS_RTOL, relative_to_largest=False),
         ("triton",)),
    Case("mrkld_loss", "", MRKLD_BACKENDS, True, _mrkld_input, _with_grad(_mrkld),
         _losses("loss", rtol=LOSS_RTOL, relative_to_largest=False), ("triton",)),
    Case("cbst_pseudo_label", "", LABEL_BACKENDS, False, _probs_input, _cbst_labels,
         _exact("labels"), ("triton",)),
    Case("ClassBalancedThresholds", "", THRESHOLD_BACKENDS, False, _probs_only, _thresholds,
         _exact("thresholds", "class_counts")),
    Case("tpld_vote", "", VOTE_BACKENDS, False, _probs_input, _vote, _exact("labels"), ("triton",)),
    Case("image_confidence", "", CONFIDENCE_BACKENDS, False, _probs_input, _confidence,
         _exact("conf"), ("triton",)),
    Case("split_easy_hard", "", TORCH_ONLY, False, _probs_only, _split, _exact("easy")),
    Case("tpld_soft_targets", "", TORCH_ONLY, False, _probs_input, _soft_targets,
         _close("soft_targets", rtol=ELEMENTWISE_RTOL)),
    Case("self_information", "", TORCH_ONLY, False, _probs_only, _self_information,
         _close("information", rtol=ELEMENTWISE_RTOL)),
])


def op_names() -> Tuple[str, ...]:
    """The ops the cases cover, in order: the names their calls pass to choose_backend."""
    return tuple(dict.fromkeys(case.op for case in CASES))


# ---------------------------------------------------------------------------------- running
@dataclass
class Row:
    """One checked (case, backend, device, shape): status "ok", "MISMATCH" or "ERROR"."""
    op: str
    backend: str
    device: str
    shape: str
    status: str
    reason: str = ""
    ms: Optional[float] = None


def backends_on(case: Case, device: torch.device) -> list:
    """The case's backends usable here that run on tensors of `device`, in preference order."""
    return [b for b in available_backends() if b in case.backends and device.type in _devices_of(b)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_outputs(case: Case, shape: Shape, device: torch.device, seed: int = 0):
    """(inputs, outputs) of the case's "torch" call on `device` (seeded inputs made there)."""
    g = torch.Generator(device=device).manual_seed(seed)
    inputs = case.make(shape, g, device)
    with torch.inference_mode(False), torch.enable_grad():
        return inputs, case.run(inputs, "torch")


@contextlib.contextmanager
def sync_debug_mode(device: torch.device, mode: Optional[str]):
    """torch.cuda.set_sync_debug_mode(mode) on CUDA, restored after; yields the list of the
    host-sync warnings seen. Under "error" the value checks (FASTST_CHECK, whose one read-back is
    the documented synchronisation, docs/ops.md §0.3) and FASTST_CUDA_SYNC_DEBUG are off."""
    seen: list = []
    if device.type != "cuda" or mode is None:
        yield seen
        return
    overrides = {"FASTST_CHECK": "0", "FASTST_CUDA_SYNC_DEBUG": None} if mode == "error" else {}
    saved = {name: os.environ.get(name) for name in overrides}
    previous_mode = torch.cuda.get_sync_debug_mode()
    try:
        _set_environment(overrides)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(mode)
            try:
                yield seen
            finally:
                torch.cuda.set_sync_debug_mode(previous_mode)
        seen.extend(w for w in caught if "synchroniz" in str(w.message))
    finally:
        _set_environment(saved)


def _set_environment(values: Dict[str, Optional[str]]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def short_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def run_case(case: Case, backend: str, device: torch.device, inputs: Inputs, want: Outputs, *,
          shape: Shape, repeat: int = 0, sync_debug: bool = False) -> Row:
    """Run `case` on `backend` with `inputs` moved to `device`, compare with `want` (the
    reference's outputs, on the inputs' device) and, with `repeat` > 0, time it: the median
    of `repeat` synchronised calls, in ms. With `sync_debug` on CUDA a second call (after the
    first, which compiles and fills per-device caches, as before CUDA graph capture) runs under
    torch.cuda.set_sync_debug_mode: "error" for backends documented sync-free, else "warn"."""
    row = Row(case.label, backend, str(device), case.shape_text(shape), "ok")
    x = to_device(inputs, device)
    mode = "error" if backend in case.sync_free else "warn"
    try:
        with torch.inference_mode(False), torch.enable_grad():
            got = case.run(x, backend)
            _synchronize(device)
            reason = case.compare(inputs, want, got)
            del got
            if reason is not None:
                row.status, row.reason = "MISMATCH", reason
                return row
            if sync_debug and device.type == "cuda":
                with sync_debug_mode(device, mode) as syncs:
                    case.run(x, backend)
                _synchronize(device)
                if syncs:
                    row.reason = f"{len(syncs)} host sync(s) (sync debug mode 'warn')"
            if repeat > 0:
                row.ms = _median_ms(lambda: case.run(x, backend), device, repeat)
    except Exception as error:  # noqa: BLE001 - every failure is a row of the report
        hint = " (a host sync in a backend documented sync-free)" if "synchroniz" in str(error) else ""
        row.status, row.reason = "ERROR", short_error(error) + hint
    return row


def _median_ms(call, device: torch.device, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
