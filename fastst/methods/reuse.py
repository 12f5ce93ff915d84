"""Reusing finished stages of an earlier run (``runtime.reuse_from: DIR``).

A pipeline that begins like another one (``demo_tpld`` starts with ``demo``'s source-only stage)
need not train those stages again: a stage is copied from DIR when DIR's run made it with the
same recipe, i.e. when

* DIR/config.yaml has the same stages up to and including it, in the same order and with the
  same settings, and the same global keys (model, data, optim, eval, num_classes, and
  ``pseudo`` when one of those stages is an IAST round); the keys of later stages, ``pipeline``
  beyond it, ``name``, ``seed``, ``seeds`` and ``runtime`` may differ;
* the seed was run there (DIR itself for a one-seed run, DIR/seed<s> otherwise): a one-seed run
  of seed 1 reuses DIR/seed1 of a ``seeds: 3`` run;
* its checkpoint is complete and its result.json readable.

The checkpoint, its ``chain: released`` snapshots and result.json are copied (atomically) into
this run, result.json gains
``"reused_from"``. On the CPU, where runs are deterministic, this is what training the stage
again would give.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

from fastst.atomic import atomic_write, read_json, write_json_atomic
from fastst.checkpoint import load_checkpoint
from fastst.config import read_config_file
from fastst.methods.chain import is_snapshot_name

__all__ = ["same_recipe_through", "reuse_stage"]

# "seed" and "seeds" are matched by _seed_dir (the seed must have been run there), not compared.
_FREE_KEYS = ("name", "seed", "seeds", "runtime", "pipeline", "stages")


def same_recipe_through(saved: Mapping[str, Any], config: Mapping[str, Any], stage: str) -> bool:
    """Whether ``saved`` and ``config`` define the pipeline identically up to ``stage``."""
    pipeline, saved_pipeline = list(config["pipeline"]), list(saved.get("pipeline", []))
    if stage not in pipeline or stage not in saved_pipeline:
        return False
    prefix = pipeline[:pipeline.index(stage) + 1]
    if saved_pipeline[:len(prefix)] != prefix:
        return False
    if any(saved.get("stages", {}).get(name) != config["stages"][name] for name in prefix):
        return False
    free = set(_FREE_KEYS)
    if not any(config["stages"][name]["method"] == "iast" for name in prefix):
        free.add("pseudo")  # the IAS pass settings matter only to IAST rounds
    keys = (set(saved) | set(config)) - free
    return all(saved.get(key) == config.get(key) for key in keys)


def _seed_dir(root: Path, saved: Mapping[str, Any], seed: int) -> Optional[Path]:
    first, count = int(saved.get("seed", 0)), int(saved.get("seeds", 1))
    if not first <= seed < first + count:
        return None
    return root if count == 1 else root / f"seed{seed}"


def reuse_stage(config: Mapping[str, Any], run_dir: Path, seed: int, stage: str,
                checkpoint_name: str, result_name: str) -> bool:
    """Copy ``stage`` from ``runtime.reuse_from`` (a directory or a list of them, tried in
    order) into ``run_dir`` when it is reusable (see the module docstring); True if copied."""
    sources = config["runtime"].get("reuse_from")
    if sources is None:
        return False
    for source in [sources] if isinstance(sources, str) else sources:
        if _reuse_from(Path(source), config, run_dir, seed, stage, checkpoint_name, result_name):
            return True
    return False


def _reuse_from(root: Path, config: Mapping[str, Any], run_dir: Path, seed: int, stage: str,
                checkpoint_name: str, result_name: str) -> bool:
    saved = read_config_file(root / "config.yaml")
    if saved is None or not same_recipe_through(saved, config, stage):
        return False
    seed_dir = _seed_dir(root, saved, seed)
    if seed_dir is None:
        return False
    checkpoint, result_path = seed_dir / stage / checkpoint_name, seed_dir / stage / result_name
    if not checkpoint.is_file() or not result_path.is_file():
        return False
    result = read_json(result_path)
    if not isinstance(result, dict):
        return False
    try:
        if not load_checkpoint(checkpoint).get("complete"):
            return False
    except (OSError, ValueError, RuntimeError):
        return False
    target_dir = run_dir / stage
    target_dir.mkdir(parents=True, exist_ok=True)
    # chain=released snapshots (best.pt, iter_<i>.pt) first: the checkpoint marks the copy done.
    snapshots = sorted(p for p in (seed_dir / stage).iterdir() if is_snapshot_name(p.name))
    for path in [*snapshots, checkpoint]:
        with open(path, "rb") as src, atomic_write(target_dir / path.name) as dst:
            shutil.copyfileobj(src, dst)
    result["checkpoint"] = str(target_dir / checkpoint_name)
    result["reused_from"] = str(seed_dir / stage)
    write_json_atomic(result, target_dir / result_name)
    return True
