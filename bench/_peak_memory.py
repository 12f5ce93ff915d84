"""Peak extra host memory of one region-loss forward + backward, measured in a fresh process.

Usage: python bench/_peak_memory.py IMPL B h w H W   (IMPL: cpp, eager, compile)
Prints the growth of the process's peak resident set (VmHWM) across the call, in bytes:
the inputs are allocated and the implementation warmed up on a tiny input first, so the number
is what the call itself adds at its peak (the tensors it creates and keeps for backward).
"""
import resource
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _region_loss_impls import make_inputs, region_loss_impl  # noqa: E402


def peak_rss_bytes() -> int:
    """VmHWM of this process's memory map. Not ru_maxrss: that survives fork + exec, so a child of
    a large pytest process would start with its parent's peak and show no growth."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    impl, (B, h, w, H, W) = sys.argv[1], map(int, sys.argv[2:7])
    fn = region_loss_impl(impl)
    tiny_x, tiny_t = make_inputs(1, 2, 4, 2, 4)
    fn(tiny_x.requires_grad_(), tiny_t).backward()
    x, t = make_inputs(B, h, w, H, W)
    x.requires_grad_()
    before = peak_rss_bytes()
    fn(x, t).backward()
    print(max(0, peak_rss_bytes() - before))


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
