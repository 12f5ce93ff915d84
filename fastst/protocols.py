"""How an evaluation shows the images to the model: fastst's own views (`--scales`, `--flip`) and
the released evaluations of IAST and CRST (`PROTOCOLS`), used by ``fastst.evaluate`` and checked
by the configuration (``stages.<s>.eval_protocol``). Below both, so neither imports the other.
"""
import math
from dataclasses import dataclass
from typing import Tuple

from .inference import COMBINE_MODES, scaled_size

__all__ = ["Protocol", "PROTOCOLS", "DEFAULT_PROTOCOL", "protocol_spec"]


@dataclass(frozen=True)
class Protocol:
    """How an evaluation feeds the images to the model and combines the scores.

    scales: the input sizes as factors of the base size (the image's, or `input_size`), rounded,
    or rounded down with `floor` (as `F.interpolate(scale_factor=s)` sizes them); flip: also
    the mirrored inputs; combine, at_input_size: see `fastst.inference.predict_scores`."""

    scales: Tuple[float, ...]
    flip: bool = False
    combine: str = "softmax"
    at_input_size: bool = False
    floor: bool = False

    def __post_init__(self):
        if not self.scales or any(not math.isfinite(s) or s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive numbers, got {self.scales}")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)}, got "
                             f"{self.combine!r}")

    def sizes(self, base_size):
        """The (h, w) model inputs for images of `base_size` (H, W), one a scale."""
        if not self.floor:
            return [scaled_size(base_size, s) for s in self.scales]
        return [tuple(max(1, math.floor(side * s)) for side in base_size) for s in self.scales]


DEFAULT_PROTOCOL = "fastst"
# The released evaluations. IAST's sizes are absolute, for Cityscapes' 1024x2048 frames; here
# they are factors of the image size (exactly the released sizes on Cityscapes): 512x1024,
# 640x1280, 768x1536, 900x1800 and 1024x2048. "fastst" is `Protocol(--scales, --flip)`.
PROTOCOLS = {
    # Validation during IAST training, per stage: one input size, the network's logits upsampled
    # to it, then to the label, argmax (Raykoooo/IAST code/sseg/workflow/trainer.py:274-278, with
    # DATASET.VAL.RESIZE_SIZE of code/config/gtav2cityscapes_v100_1/run_task/source_only.yaml:32,
    # warmup_at.yaml:38 and sl_1.yaml:36, the same in sl_2/sl_3 and the SYNTHIA configs).
    "iast_source_only": Protocol((0.5,), combine="logits", at_input_size=True),
    "iast_warmup": Protocol((0.625,), combine="logits", at_input_size=True),
    "iast_round": Protocol((0.75,), combine="logits", at_input_size=True),
    # IAST's eval.py multi-scale test: the softmax at each input size, summed over five sizes
    # after the resize to the label, no flip (code/sseg/workflow/eval.py:81-93, TEST.RESIZE_SIZE
    # of run_task/sl_1.yaml:48, TEST.USE_FLIP false in code/sseg/models/default.py:109).
    "iast_ms": Protocol((0.5, 0.625, 0.75, 0.87890625, 1.0), at_input_size=True),
    # CRST's test: scales 0.9/1.0/1.2 of the image (sizes rounded down) and their flips, logits
    # upsampled to the label size and averaged (yzou2/CRST crst_seg.py:89-91 and 578-597;
    # --test-flipping in mrkld.sh and cbst.sh).
    "crst": Protocol((0.9, 1.0, 1.2), flip=True, combine="logits", floor=True),
}


def protocol_spec(name, scales, flip, input_size):
    """The Protocol called `name`; "fastst" takes `scales` and `flip`, the others fix both."""
    if name == DEFAULT_PROTOCOL:
        return Protocol(tuple(float(s) for s in scales), bool(flip))
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; valid protocols: "
                         f"{', '.join([DEFAULT_PROTOCOL, *PROTOCOLS])}")
    if tuple(scales) != (1.0,) or flip or input_size is not None:
        raise ValueError(f"protocol {name!r} fixes the input sizes and flips; leave scales, flip "
                         f"and input_size at their defaults or use protocol {DEFAULT_PROTOCOL!r}")
    return PROTOCOLS[name]
