"""ias_pseudo_label: each backend against the reference op and the released NumPy loop."""
import numpy as np
import pytest
import torch

import fastst.ops as ops
from conftest import QUICK
from fastst.ops import reference

H, W = (128, 256) if QUICK else (512, 1024)
B = 2
IMPLS = [b for b in ops.available_backends() if b in ("cpp",)] + ["torch", "released_numpy"]


def _released_numpy(probs, alpha=0.2, beta=0.9, gamma=8.0):
    """The released IAST pseudo-label loop for one pair of images (SPEC 1.2), with its per-pixel
    threshold lookup, on NumPy arrays."""
    C = probs.shape[1]
    cls_thresh = np.ones(C) * 0.9
    logits_pred = probs.max(axis=1)
    label_pred = probs.argmax(axis=1)
    conf = {c: [cls_thresh[c]] for c in range(C)}
    for cls in range(C):
        conf[cls].extend(logits_pred[label_pred == cls].astype(np.float16))
    tmp = np.ones(C, dtype=np.float32)
    for c in range(C):
        tmp[c] = np.percentile(np.array(conf[c]), 100 * (1 - alpha * cls_thresh[c] ** gamma))
    cls_thresh = beta * cls_thresh + (1 - beta) * tmp
    cls_thresh[cls_thresh >= 1] = 0.999
    labels = label_pred.copy()
    labels[logits_pred < cls_thresh[labels]] = 255
    return labels.astype(np.uint8)


@pytest.mark.parametrize("mode", ["official", "paper"])
@pytest.mark.parametrize("impl", IMPLS)
def test_ias_from_probabilities(benchmark, run, impl, mode):
    if impl == "released_numpy" and mode == "paper":
        pytest.skip("the released code has only the official mode")
    g = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(B, 19, H, W, generator=g) * 3, 1)
    group = f"ias_pseudo_label {mode} probs B={B} C=19 {H}x{W}"
    if impl == "released_numpy":
        x_np = x.numpy()
        labels = run(benchmark, group, impl, lambda: _released_numpy(x_np))
        assert labels.shape == (B, H, W)
        return
    fn = (lambda: reference.ias_pseudo_label(x, None, alpha=0.2, mode=mode)) if impl == "torch" else \
        (lambda: ops.ias_pseudo_label(x, None, alpha=0.2, mode=mode, backend=impl))
    labels, _, _ = run(benchmark, group, impl, fn)
    assert labels.shape == (B, H, W)
