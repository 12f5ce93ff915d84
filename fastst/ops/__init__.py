"""fastst operators (SPEC section 7). Every op takes `backend=` ("cuda", "triton", "cpp",
"torch"); see `available_backends()` and SPEC section 0 for the default choice."""
from ._backend import available_backends
from .ias import ias_pseudo_label
from .region_loss import region_loss

__all__ = ["available_backends", "ias_pseudo_label", "region_loss"]
