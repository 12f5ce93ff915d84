"""Independent loop transcriptions of docs/ops.md §5 (CBST thresholds and labels) and docs/ops.md §6 (TPLD vote,
image confidence, soft targets), used only by the tests. Written from docs/ops.md with NumPy and
Python floats (float64, no FMA), one pixel at a time; tiny maps only."""
import math

import numpy as np


def q_map(probs, lambdas):
    """q = float32(p) / float32(lambda), (B, C, H, W) float32."""
    return probs.astype(np.float32) / lambdas.astype(np.float32)[None, :, None, None]


def _first_argmax(values, skip=None):
    best, arg = None, None
    for k, v in enumerate(values):
        if k == skip:
            continue
        if best is None or v > best:
            best, arg = v, k
    return arg


def confident_map(q):
    B, C, H, W = q.shape
    labels = np.full((B, H, W), 255, dtype=np.int64)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                k = _first_argmax(q[b, :, y, x])
                if q[b, k, y, x] >= 1.0:
                    labels[b, y, x] = k
    return labels


def vote_loop(probs, lambdas, window=7, weight=0.7, iterations=3):
    q = q_map(probs, lambdas)
    B, C, H, W = q.shape
    labels = confident_map(q)
    r = window // 2
    for _ in range(iterations):
        new = labels.copy()
        for b in range(B):
            for y in range(H):
                for x in range(W):
                    if labels[b, y, x] != 255:
                        continue
                    k1 = _first_argmax(q[b, :, y, x])
                    k2 = _first_argmax(q[b, :, y, x], skip=k1)
                    scores = []
                    for k in (k1, k2):
                        total, count = 0.0, 0
                        for yy in range(y - r, y + r + 1):
                            for xx in range(x - r, x + r + 1):
                                if 0 <= yy < H and 0 <= xx < W and labels[b, yy, xx] == k:
                                    total += float(q[b, k, yy, xx])
                                    count += 1
                        pool = total / count if count else 0.0
                        scores.append(weight * float(q[b, k, y, x]) + (1.0 - weight) * pool)
                    if scores[0] >= scores[1]:
                        if scores[0] > 1.0:
                            new[b, y, x] = k1
                    elif scores[1] > 1.0:
                        new[b, y, x] = k2
        labels = new
    return labels.astype(np.uint8)


def image_confidence_loop(probs, lambdas):
    q = q_map(probs, lambdas)
    B, C, H, W = q.shape
    out = []
    for b in range(B):
        n, n_sure = [0] * C, [0] * C
        for y in range(H):
            for x in range(W):
                k = _first_argmax(probs[b, :, y, x])
                n[k] += 1
                n_sure[k] += int(q[b, k, y, x] >= 1.0)
        total, present = 0.0, 0
        for k in range(C):
            if n[k]:
                total += n_sure[k] / n[k] / float(np.float32(lambdas[k]))
                present += 1
        out.append(total / present if present else 0.0)
    return np.array(out)


def soft_targets_loop(probs, lambdas, gamma):
    q = q_map(probs, lambdas)
    labels = confident_map(q)
    out = np.power(q, np.float32(gamma)).astype(np.float32)
    B, C, H, W = q.shape
    for b in range(B):
        for y in range(H):
            for x in range(W):
                if labels[b, y, x] != 255:
                    out[b, :, y, x] = 0.0
                    out[b, labels[b, y, x], y, x] = 1.0
    return out


def cbst_thresholds_loop(batches, num_classes, portion, subsample):
    """The released CRST code's `kc_parameters` with its per-image `ds_rate` subsample, on a list
    of (B, C, H, W) probability batches: Python lists, `sort(reverse=True)`."""
    conf = {k: [] for k in range(num_classes)}
    for probs in batches:
        for p in probs:
            m, a = p.max(axis=0), p.argmax(axis=0)
            for k in range(num_classes):
                values = m[a == k].astype(np.float32)  # row-major order
                conf[k].extend(values[0:values.size:subsample])
    lambdas = np.ones(num_classes, dtype=np.float32)
    for k in range(num_classes):
        conf[k].sort(reverse=True)
        n_k = int(math.floor(len(conf[k]) * portion))
        if n_k != 0:
            lambdas[k] = conf[k][n_k - 1]
    return lambdas
