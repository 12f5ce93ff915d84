"""fastst: fast self-training domain adaptation for semantic segmentation (IAST, TPLD).

Subpackages: `fastst.ops` (operators with cuda/triton/cpp/torch backends).
"""
__version__ = "0.1.0"
