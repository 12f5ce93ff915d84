"""Independent loop transcriptions of docs/ops.md §1.1 (paper) and §1.2 (the released IAST NumPy code),
used only by the tests. Written from docs/ops.md and the released code, not from reference.py."""
import numpy as np


def _ias_thresh(conf_dict, num_classes, alpha, w, gamma):
    """The released `ias_thresh`: np.percentile over [theta_c] + float16 values, per class."""
    cls_thresh = np.ones(num_classes, dtype=np.float32)
    for idx_cls in np.arange(0, num_classes):
        if conf_dict[idx_cls] is not None:
            arr = np.array(conf_dict[idx_cls])
            cls_thresh[idx_cls] = np.percentile(arr, 100 * (1 - alpha * w[idx_cls] ** gamma))
    return cls_thresh


def released_official(probs, alpha, beta=0.9, gamma=8.0, group=2):
    """probs: (B, C, H, W) float32 NumPy probabilities. Returns labels (B, H, W) uint8,
    theta (C,) float64 and theta after every group, (G, C)."""
    B, C = probs.shape[:2]
    cls_thresh = np.ones(C) * 0.9
    labels, per_group = [], []
    for g0 in range(0, B, group):
        p = probs[g0:g0 + group]
        logits_pred = p.max(axis=1)
        label_pred = p.argmax(axis=1)
        conf = {c: [cls_thresh[c]] for c in range(C)}
        for cls in range(C):
            conf[cls].extend(logits_pred[label_pred == cls].astype(np.float16))
        tmp_cls_thresh = _ias_thresh(conf, C, alpha=alpha, w=cls_thresh, gamma=gamma)
        cls_thresh = beta * cls_thresh + (1 - beta) * tmp_cls_thresh
        cls_thresh[cls_thresh >= 1] = 0.999
        per_group.append(cls_thresh.copy())
        for i in range(p.shape[0]):
            label = label_pred[i].copy()
            label[logits_pred[i] < cls_thresh[label]] = 255
            labels.append(label.astype(np.uint8))
    return np.stack(labels), cls_thresh, np.stack(per_group)


def paper_loop(probs, alpha, beta=0.9, gamma=8.0):
    """docs/ops.md §1.1 pixel by pixel list: one image an instance, psi = r-th largest value."""
    B, C = probs.shape[:2]
    theta = np.full(C, 0.9)
    labels, per_image = [], []
    for b in range(B):
        m = probs[b].max(axis=0)
        a = probs[b].argmax(axis=0)
        for c in range(C):
            values = sorted((float(v) for v in m[a == c]), reverse=True)
            n = len(values)
            if n == 0:
                continue
            k = alpha * theta[c] ** gamma
            r = min(max(int(np.floor(k * float(n))), 0), n - 1)
            theta[c] = beta * theta[c] + (1 - beta) * values[r]
        per_image.append(theta.copy())
        labels.append(np.where(m.astype(np.float64) > theta[a], a, 255).astype(np.uint8))
    return np.stack(labels), theta, np.stack(per_image)
