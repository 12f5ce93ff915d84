"""torch.library custom ops around the launchers of fastst._C (C++/OpenMP and CUDA kernels), one
module per op family, named like its kernels (csrc/fastst/{cpu,cuda,kernels}/<stem>.*) and its
Triton twin (fastst/ops/triton/<stem>.py).

Outputs and workspaces are allocated with torch (so the caching allocator serves them); raw
pointers, sizes, dtype codes and, on CUDA, the device index and the current stream are passed
down. Each op has a fake (meta) implementation, so it traces under torch.compile.
"""
import torch


DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
