"""Training stages and their shared loop: source-only, adversarial warm-up, IAST rounds (docs/recipes.md §4),
CBST/CRST rounds (docs/recipes.md §5) and the two TPLD phases (docs/recipes.md §6).

``stage_class(method)`` gives the ``Stage`` subclass of a stage's ``method`` key
(fastst/presets/*.yaml); a new method (CBST, TPLD, ...) is a new module here and a new entry in
``_METHODS``. Stage modules are imported on first use, so that ``fastst.pseudo`` (which the IAST
round uses) can import the shared helpers of this package without a cycle.
"""
import importlib

_METHODS = {"source_only": ("fastst.methods.source_only", "SourceOnly"),
            "warmup": ("fastst.methods.warmup", "Warmup"),
            "iast": ("fastst.methods.iast", "IASTRound"),
            "cbst": ("fastst.methods.cbst", "CBSTRound"),
            "tpld_phase1": ("fastst.methods.tpld", "TPLDPhase1"),
            "tpld_phase2": ("fastst.methods.tpld", "TPLDPhase2")}
METHOD_NAMES = tuple(_METHODS)

__all__ = ["METHOD_NAMES", "stage_class"]


def stage_class(method: str):
    """The Stage subclass implementing ``method``; ValueError listing the methods otherwise."""
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(_METHODS)}")
    module, name = _METHODS[method]
    return getattr(importlib.import_module(module), name)
