"""CUDA-only properties of ias_pseudo_label: no host sync (capturable in a CUDA graph) and theta
kept on the device across calls. Skipped without a GPU."""
import pytest
import torch

import fastst.ops as ops
from helpers import probs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in ops.available_backends(),
    reason="no GPU (or fastst._C built without CUDA): CUDA graph capture needs a CUDA device")


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_cuda_graph_capture_and_replay(mode, monkeypatch):
    monkeypatch.setenv("FASTST_CHECK", "0")  # value checks are the only host sync
    logits = (torch.randn(2, 19, 16, 32) * 3).cuda()
    theta = torch.full((19,), 0.9, dtype=torch.float64, device="cuda")
    kw = dict(alpha=0.2, mode=mode, from_logits=True, size=(128, 256), backend="cuda")
    want = ops.ias_pseudo_label(logits, theta, **kw)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.ias_pseudo_label(logits, theta, **kw)  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.ias_pseudo_label(logits, theta, **kw)
    graph.replay()
    torch.cuda.synchronize()
    for w, g in zip(want, captured):
        assert torch.equal(w, g)


def test_theta_stays_on_device_and_chains():
    p = probs(4, 19, 32, 64, seed=40).cuda()
    labels, theta, seq = ops.ias_pseudo_label(p[:2], None, alpha=0.2, mode="official", backend="cuda")
    assert theta.is_cuda and theta.dtype == torch.float64 and labels.is_cuda
    _, theta2, _ = ops.ias_pseudo_label(p[2:], theta, alpha=0.2, mode="official", backend="cuda")
    _, whole, _ = ops.ias_pseudo_label(p, None, alpha=0.2, mode="official", backend="cuda")
    assert torch.equal(theta2, whole)
