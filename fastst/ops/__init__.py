"""fastst operators (docs/ops.md §7). Every op takes `backend=` ("cuda", "triton", "cpp",
"torch"); see `available_backends()` and docs/ops.md §0 for the default choice."""
from ._backend import available_backends
from .bootstrap_loss import bootstrap_loss, mrkld_loss
from .cbst import ClassBalancedThresholds, cbst_pseudo_label
from .ias import ias_pseudo_label
from .region_loss import region_loss
from .tpld import (image_confidence, self_information, split_easy_hard, tpld_soft_targets,
                   tpld_vote)
from . import _backend, _selftest

_backend.set_default_choice(_selftest.default_choice)  # CUDA self-check (docs/ops.md §0.7)

__all__ = ["available_backends", "ias_pseudo_label", "region_loss", "ClassBalancedThresholds",
           "cbst_pseudo_label", "mrkld_loss", "tpld_vote", "image_confidence", "split_easy_hard",
           "tpld_soft_targets", "bootstrap_loss", "self_information"]
