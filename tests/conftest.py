"""Test session setup: without a GPU, Triton kernels run in its interpreter, which must be
switched on before triton is first imported. The CUDA self-check of the default backend
(docs/ops.md §0.7) is off: it would run extra kernels at whichever test first uses an op, and
tests that fake a CUDA machine would run it too; tests/ops/test_selftest.py turns it on."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTST_SELFTEST", "0")
