"""Triton kernels of fastst (the "triton" backend, docs/ops.md §0).

Importing a submodule needs `pip install triton` (>= 3.2). On a machine without a CUDA device the
kernels run in Triton's interpreter, which must be chosen before triton is first imported:
set the environment variable TRITON_INTERPRET=1.
"""
