"""No hidden host synchronisation (docs/ops.md §0.4): every public op of fastst.ops on every CUDA
backend (cuda, triton) runs, after one warm-up call, under
torch.cuda.set_sync_debug_mode("error") with the value checks off (FASTST_CHECK=0), gradients
included, and raises nothing. A sync there would also break CUDA graph capture. Ops documented
to synchronise, and ops without a CUDA backend, are listed with the reason. On the CPU: the list
covers every public op and every case is a valid call (run on the cpp backend)."""
import importlib
from types import SimpleNamespace

import pytest
import torch

import fastst.ops as ops
from fastst.ops._backend import available_backends

# The modules (fastst.ops.region_loss and .bootstrap_loss are also the ops' names).
ias, region_loss, bootstrap_loss, cbst, tpld = (
    importlib.import_module(f"fastst.ops.{m}") for m in ("ias", "region_loss", "bootstrap_loss", "cbst", "tpld"))

B, C, h, w, H, W = 2, 4, 8, 8, 16, 16
CUDA_BACKENDS = ("cuda", "triton")

# Each public op's backends (the modules' own lists, docs/ops.md §0.2).
IMPLEMENTED = {
    "ias_pseudo_label": ias.IMPLEMENTED,
    "region_loss": region_loss.IMPLEMENTED,
    "mrkld_loss": bootstrap_loss.MRKLD_BACKENDS,
    "bootstrap_loss": bootstrap_loss.LOSS_BACKENDS,
    "cbst_pseudo_label": cbst.LABEL_BACKENDS,
    "ClassBalancedThresholds": cbst.IMPLEMENTED,
    "tpld_vote": tpld.VOTE_BACKENDS,
    "image_confidence": tpld.CONFIDENCE_BACKENDS,
    "split_easy_hard": tpld.TORCH_ONLY,
    "tpld_soft_targets": tpld.TORCH_ONLY,
    "self_information": tpld.TORCH_ONLY,
}
# (op, backend) pairs that synchronise by design, docs/ops.md §0.4.
SYNCING = {
    ("ias_pseudo_label", "triton"): "its selection is the reference's, which reads segment offsets "
                                    "back per instance (docs/ops.md §0.4)",
}
NOT_OPS = {"available_backends": "not an op"}


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, C, h, w, generator=g)
    target = torch.randint(0, C, (B, H, W), generator=g).to(torch.uint8)
    target[:, :2] = 255
    confident = target.clone()
    confident[:, 2:4] = 255
    return SimpleNamespace(
        logits=logits.to(device),
        probs=logits.softmax(1).to(device),
        probs_full=torch.randn(B, C, H, W, generator=g).softmax(1).to(device),
        theta=torch.full((C,), 0.5, dtype=torch.float64).to(device),
        target=target.to(device),
        confident=confident.to(device),
        soft=torch.rand(B, C, H, W, generator=g).to(device),
        teacher=torch.randn(B, C, h, w, generator=g).to(device),
        lambdas=(torch.rand(C, generator=g) * 0.5 + 0.3).to(device),
        is_target=torch.tensor([False, True]).to(device),
    )


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


# name -> (op, call(inputs, backend)); a call returning a tensor that requires grad is also
# differentiated.
CASES = {
    "ias_paper": ("ias_pseudo_label", lambda t, b: ops.ias_pseudo_label(t.probs, t.theta, alpha=0.2, backend=b)),
    "ias_official": ("ias_pseudo_label", lambda t, b: ops.ias_pseudo_label(
        t.probs, t.theta, alpha=0.2, mode="official", backend=b)),
    "ias_logits_upsampled": ("ias_pseudo_label", lambda t, b: ops.ias_pseudo_label(
        t.logits, t.theta, alpha=0.2, from_logits=True, size=(H, W), backend=b)),
    "region_loss": ("region_loss", lambda t, b: ops.region_loss(_leaf(t.logits), t.target, size=(H, W), backend=b)),
    "mrkld_loss": ("mrkld_loss", lambda t, b: ops.mrkld_loss(
        _leaf(t.logits), t.target, t.is_target, size=(H, W), backend=b)),
    "bootstrap_hard": ("bootstrap_loss", lambda t, b: ops.bootstrap_loss(
        _leaf(t.logits), t.target, t.lambdas, size=(H, W), backend=b)),
    "bootstrap_soft": ("bootstrap_loss", lambda t, b: ops.bootstrap_loss(
        _leaf(t.logits), t.confident, t.lambdas, soft_target=t.soft, size=(H, W), backend=b)),
    "bootstrap_teacher": ("bootstrap_loss", lambda t, b: ops.bootstrap_loss(
        _leaf(t.logits), None, t.lambdas, teacher_logits=t.teacher, size=(H, W), backend=b)),
    "cbst_pseudo_label": ("cbst_pseudo_label", lambda t, b: ops.cbst_pseudo_label(t.probs_full, t.lambdas, backend=b)),
    "tpld_vote": ("tpld_vote", lambda t, b: ops.tpld_vote(t.probs_full, t.lambdas, window=3, backend=b)),
    "image_confidence": ("image_confidence", lambda t, b: ops.image_confidence(t.probs_full, t.lambdas, backend=b)),
}


def _run(name, inputs, backend):
    out = CASES[name][1](inputs, backend)
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.backward()
    return out


def _gpu_params():
    return [pytest.param(name, backend, id=f"{name}-{backend}")
            for name, (op, _) in CASES.items() for backend in CUDA_BACKENDS
            if backend in IMPLEMENTED[op] and (op, backend) not in SYNCING]


def test_every_public_op_is_covered_or_excluded_with_a_reason():
    public = set(ops.__all__) - set(NOT_OPS)
    assert public == set(IMPLEMENTED), "a new public op: add its backends and a case here"
    covered = {op for op, _ in CASES.values()}
    for op, backends in IMPLEMENTED.items():
        on_cuda = [b for b in CUDA_BACKENDS if b in backends and (op, b) not in SYNCING]
        assert (op in covered) == bool(on_cuda), op
    # ClassBalancedThresholds (cpp, torch; syncs on CUDA tensors, docs/ops.md §0.4) and the
    # torch-only ops have no CUDA backend; these are the only CUDA backends left out:
    assert set(SYNCING) == {("ias_pseudo_label", "triton")}
    assert {p.values[1] for p in _gpu_params()} == set(CUDA_BACKENDS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cases_are_valid_calls_on_the_cpu(name):
    """The same calls on the CPU kernels: the arguments are right and the outputs well-formed."""
    out = _run(name, _inputs("cpu"), "cpp")
    first = out[0] if isinstance(out, tuple) else out
    assert isinstance(first, torch.Tensor) and torch.isfinite(first.float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: torch.cuda.set_sync_debug_mode needs a CUDA device")
@pytest.mark.parametrize("name,backend", _gpu_params())
def test_no_host_sync_on_the_gpu(name, backend, monkeypatch):
    if backend not in available_backends():
        pytest.skip(f"no GPU backend {backend!r} here (available: {available_backends()})")
    monkeypatch.setenv("FASTST_CHECK", "0")  # the value checks read one flag back (§0.3)
    monkeypatch.setenv("FASTST_SELFTEST", "0")  # the first-use self-check is not measured here
    monkeypatch.delenv("FASTST_CUDA_SYNC_DEBUG", raising=False)
    inputs = _inputs("cuda")
    _run(name, inputs, backend)  # warm-up: compiles Triton kernels, fills per-device caches
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _run(name, inputs, backend)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    first = out[0] if isinstance(out, tuple) else out
    assert first.is_cuda and torch.isfinite(first.float()).all()
