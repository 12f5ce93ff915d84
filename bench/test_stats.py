"""The fused statistics pass (max, argmax, counts; softmax + upsample from logits): the C++
kernel against the reference's torch ops."""
import pytest
import torch

from conftest import QUICK
from fastst.ops import _backend, reference
from fastst.ops.ext.stats import pixel_stats

pytestmark = pytest.mark.skipif(_backend.extension() is None, reason="fastst._C is not built")

H, W = (128, 256) if QUICK else (512, 1024)
B = 2


def _inputs(from_logits):
    g = torch.Generator().manual_seed(0)
    if from_logits:
        return torch.randn(B, 19, H // 8, W // 8, generator=g) * 3
    return torch.softmax(torch.randn(B, 19, H, W, generator=g) * 3, 1)


@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits_x8"])
@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_pixel_stats(benchmark, run, impl, from_logits):
    x = _inputs(from_logits)
    group = f"pixel_stats {'logits 1/8 ->' if from_logits else 'probs'} B={B} C=19 {H}x{W}"
    if impl == "cpp":
        m, a, _, _ = run(benchmark, group, impl, lambda: pixel_stats(x, from_logits, H, W, True))
    else:
        m, a = run(benchmark, group, impl, lambda: reference.pixel_stats(
            x, from_logits=from_logits, size=(H, W), align_corners=True))
    assert m.shape == (B, H, W) and a.shape == (B, H, W)
