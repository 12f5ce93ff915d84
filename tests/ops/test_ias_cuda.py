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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="no second GPU: needs cuda:1")
@pytest.mark.parametrize("mode", ["official", "paper"])
def test_second_device_runs_there_and_leaves_the_current_device(mode):
    """On cuda:1 with cuda:0 current: the result equals cpp's, the current device is still 0
    afterwards (the launch ran under the input's device and switched back)."""
    p = probs(2, 19, 16, 32, seed=41)
    want = ops.ias_pseudo_label(p, None, alpha=0.2, mode=mode, backend="cpp")
    torch.cuda.set_device(0)
    got = ops.ias_pseudo_label(p.to("cuda:1"), None, alpha=0.2, mode=mode, backend="cuda")
    assert torch.cuda.current_device() == 0
    assert all(g.device == torch.device("cuda:1") for g in got)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
