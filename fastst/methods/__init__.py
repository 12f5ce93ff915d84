"""Training stages and their shared loop: source-only, adversarial warm-up, IAST rounds
(docs/recipes.md §4), CBST/CRST rounds (docs/recipes.md §5) and the two TPLD phases
(docs/recipes.md §6).

``stage_class(method)`` gives the ``Stage`` subclass of a stage's ``method`` key
(fastst/presets/*.yaml); a new method (CBST, TPLD, ...) is a new module here and a new entry in
``_METHODS``. The pseudo-label passes the self-training stages run are in ``labelling/``.
"""
from fastst.methods.cbst import CBSTRound
from fastst.methods.iast import IASTRound
from fastst.methods.source_only import SourceOnly
from fastst.methods.tpld import TPLDPhase1, TPLDPhase2
from fastst.methods.warmup import Warmup

_METHODS = {"source_only": SourceOnly, "warmup": Warmup, "iast": IASTRound, "cbst": CBSTRound,
            "tpld_phase1": TPLDPhase1, "tpld_phase2": TPLDPhase2}
METHOD_NAMES = tuple(_METHODS)

__all__ = ["METHOD_NAMES", "stage_class"]


def stage_class(method: str):
    """The Stage subclass implementing ``method``; ValueError listing the methods otherwise."""
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(_METHODS)}")
    return _METHODS[method]
