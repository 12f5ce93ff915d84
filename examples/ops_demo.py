"""A small end-to-end example of the fastst operators, on random "model outputs".

Until the demo pipeline (python -m fastst.train --preset demo) exists, `make demo` runs this:
it makes IAS pseudo labels for a sequence of batches of 1/8-resolution logits with every
available backend, checks they agree with the reference, and prints timings and label density.
"""
import time

import torch

import fastst.ops as ops


def main() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(2, 19, 32, 64) * 3 for _ in range(4)]  # (B, C, h, w) logits
    print(f"backends available here: {ops.available_backends()}")
    results = {}
    for backend in ops.available_backends():
        if backend in ("cuda", "triton"):
            continue  # this example runs on the CPU
        ops.ias_pseudo_label(batches[0], None, alpha=0.2, from_logits=True, backend=backend)  # warm-up
        theta = None  # 0.9 per class at the start of a round
        start = time.perf_counter()
        labels = []
        for logits in batches:
            lab, theta, _ = ops.ias_pseudo_label(logits, theta, alpha=0.2, mode="official",
                                                 from_logits=True, size=(256, 512), backend=backend)
            labels.append(lab)
        seconds = time.perf_counter() - start
        results[backend] = (torch.cat(labels), theta)
        density = (results[backend][0] != 255).float().mean().item()
        print(f"{backend:>6}: {seconds * 1e3:8.1f} ms for {len(batches)} batches, "
              f"labelled {density:.1%} of pixels, theta[:4] = {theta[:4].tolist()}")
    labels_ref, theta_ref = results["torch"]
    for backend, (lab, theta) in results.items():
        agree = (lab == labels_ref).float().mean().item()
        print(f"{backend:>6} vs torch: labels agree on {agree:.6%} of pixels, "
              f"max |theta diff| = {(theta - theta_ref).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
