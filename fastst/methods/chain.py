"""Which checkpoint each stage trains from and which one makes its pseudo labels (``chain``).

``chain: last`` (the default): every stage starts from the last checkpoint of the stage before
it, and a self-training round labels with that same model. Nothing is selected on the
evaluation split.

``chain: released`` reproduces the released IAST scripts
(code/config/*/run_task/run_self_traing_3rounds.sh), which select on Cityscapes val:

* a warm-up starts from the source-only checkpoint with the best val mIoU (``best_iter.pth``);
* round 1 trains from the warm-up's last periodic checkpoint (``last_iter.pth``) and labels with
  its best one (``--pseudo_resume_from best_iter.pth``);
* round k+1 trains from round k's last periodic checkpoint of its second epoch (``epoch_2.pth``:
  iteration 6000 on GTA5) and labels with the last one of its first epoch (``epoch_1.pth``:
  iteration 2800).

The released trainers evaluate and save every ``ITER_VAL`` iterations (a stage's
``select_every``: 500 for source-only, 400 otherwise), keeping the best by val mIoU (later
ties win, ``>=``) and the last save per epoch. Under ``released`` a stage keeps exactly the
snapshots later stages ask for: DIR/<stage>/best.pt and DIR/<stage>/iter_<i>.pt.
Class-balanced rounds (CBST/CRST/TPLD) chain their last checkpoints under both settings: the
released CRST code (crst_seg.py) trains all rounds in one process on one model.

A reference is ``{"stage": name, "checkpoint": "last" | "best" | iteration}``; the first stage
of a pipeline starts from ``{"stage": None, "checkpoint": "init"}`` (``model.pretrained`` or
``--init``).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional

from fastst.config_checks import ConfigError
from fastst.methods.schedule import stage_lengths

__all__ = ["chain_plan", "snapshots_needed", "snapshot_name", "is_snapshot_name", "BEST"]

BEST = "best"
# The methods whose stages make pseudo labels (their Stage classes have ``label_pass``; the
# registry imports this module through the trainer, so the list is written out and a test checks
# it against the registry).
LABELLING_METHODS = ("iast", "cbst", "tpld_phase1", "tpld_phase2")


def _ref(stage: Optional[str], checkpoint) -> Dict[str, Any]:
    return {"stage": stage, "checkpoint": checkpoint}


def _periodic(config: Mapping[str, Any], name: str, upto: int, what: str) -> int:
    """The last multiple of stage ``name``'s select_every that is <= ``upto``."""
    every = config["stages"][name]["select_every"]
    iteration = upto // every * every
    if iteration < 1:
        raise ConfigError(f"chain=released: {what} of stage {name} is its last snapshot at or "
                          f"before iteration {upto}, and stages.{name}.select_every = {every} "
                          f"makes none; set stages.{name}.select_every <= {upto}")
    return iteration


def chain_plan(config: Mapping[str, Any], sizes: Mapping[str, int]) -> Dict[str, Dict[str, Any]]:
    """{stage: {"starts_from": ref, "labels_with": ref or None}} for every pipeline stage
    (``labels_with`` None for stages that make no pseudo labels). ``sizes`` are the set sizes
    (``fastst.recipe.set_sizes``); ConfigError when a requested snapshot cannot exist."""
    pipeline = list(config["pipeline"])
    released = config["chain"] == "released"
    plan = {}
    for index, name in enumerate(pipeline):
        method = config["stages"][name]["method"]
        if index == 0:
            start = _ref(None, "init")
        else:
            previous = pipeline[index - 1]
            start = _ref(previous, "last")
        label = start if method in LABELLING_METHODS else None
        if released and index > 0:
            previous = pipeline[index - 1]
            before = config["stages"][previous]["method"]
            lengths = stage_lengths(config, previous, sizes)
            if method == "warmup" and before == "source_only":
                start = _ref(previous, BEST)
            elif method == "iast" and before in ("source_only", "warmup"):
                start = _ref(previous, _periodic(config, previous, lengths["total"],
                                                 "the last periodic checkpoint"))
                label = _ref(previous, BEST)
            elif method == "iast" and before == "iast":
                start = _ref(previous, _periodic(config, previous, lengths["total"],
                                                 "the last periodic checkpoint"))
                label = _ref(previous, _periodic(config, previous, lengths["per_epoch"],
                                                 "the last checkpoint of the first epoch"))
        plan[name] = {"starts_from": start, "labels_with": label}
    return plan


def snapshots_needed(config: Mapping[str, Any], sizes: Mapping[str, int]) -> Dict[str, set]:
    """{stage: {"best" and/or iterations}}: the snapshots each stage must keep for the stages
    after it (empty sets under ``chain: last``)."""
    needed: Dict[str, set] = {name: set() for name in config["pipeline"]}
    for entry in chain_plan(config, sizes).values():
        for ref in (entry["starts_from"], entry["labels_with"]):
            if ref is not None and ref["stage"] is not None and ref["checkpoint"] != "last":
                needed[ref["stage"]].add(ref["checkpoint"])
    return needed


def snapshot_name(checkpoint) -> str:
    """The file name of a snapshot in its stage's directory: best.pt or iter_<i>.pt."""
    return "best.pt" if checkpoint == BEST else f"iter_{int(checkpoint)}.pt"


def is_snapshot_name(name: str) -> bool:
    """Whether a file name in a stage directory is a snapshot (``snapshot_name``'s form)."""
    return name == "best.pt" or re.fullmatch(r"iter_[0-9]+\.pt", name) is not None
