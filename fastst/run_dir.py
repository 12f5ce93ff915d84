"""A training run's directory read back: ``--run DIR`` of ``python -m fastst.pseudo`` and
``python -m fastst.evaluate`` (docs/formats.md §3.7).

``open_run(DIR, overrides)`` reads DIR/config.yaml (the resolved configuration the run saved:
its preset and overrides) and applies ``overrides`` (``key=value``, e.g. ``runtime.*``) on top,
so a command on the run's model and data does not repeat the run's settings. With ``seeds > 1``
each seed's stages are in DIR/seed<s>/, whose configuration is the parent's: pass that folder.
A stage counts as finished when it has ``result.json`` and ``last.pt``, as ``fastst.train``
decides on a rerun.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fastst.config import ConfigError, apply_overrides, read_config_file
from fastst.config_validate import validate_config

__all__ = ["Run", "RunDirError", "open_run", "CONFIG_NAME"]

CONFIG_NAME = "config.yaml"
_CHECKPOINT_NAME = "last.pt"  # fastst.methods.trainer.CHECKPOINT_NAME
_RESULT_NAME = "result.json"  # fastst.pipeline.RESULT_NAME


class RunDirError(ValueError):
    """A --run directory that is not a fastst run, or lacks the stage asked for."""


@dataclass
class Run:
    """config: the run's configuration (overrides applied); stage_root: the folder holding the
    stage folders (DIR, or DIR/seed<s>)."""
    config: Dict[str, Any]
    stage_root: Path

    def finished(self) -> List[str]:
        """The stages of the pipeline with a result.json and a last.pt, in pipeline order."""
        return [name for name in self.config["pipeline"]
                if (self.stage_root / name / _RESULT_NAME).is_file()
                and (self.stage_root / name / _CHECKPOINT_NAME).is_file()]

    def checkpoint(self, stage: Optional[str] = None) -> Path:
        """The last checkpoint of ``stage`` (default: the last finished stage of the
        pipeline); RunDirError naming the run's stages when there is none."""
        pipeline = list(self.config["pipeline"])
        if stage is None:
            finished = self.finished()
            if not finished:
                raise RunDirError(f"no stage of the run in {str(self.stage_root)!r} has finished "
                                  f"(none of {', '.join(pipeline)} has {_RESULT_NAME} and "
                                  f"{_CHECKPOINT_NAME}); let python -m fastst.train finish one")
            stage = finished[-1]
        if stage not in pipeline:
            raise RunDirError(f"--stage {stage!r} is not a stage of the run in "
                              f"{str(self.stage_root)!r}; its stages: {', '.join(pipeline)}")
        path = self.stage_root / stage / _CHECKPOINT_NAME
        if not path.is_file():
            raise RunDirError(f"stage {stage} of the run in {str(self.stage_root)!r} has no "
                              f"checkpoint ({path} does not exist); finished stages: "
                              f"{', '.join(self.finished()) or 'none'}")
        return path


def open_run(path, overrides: Sequence[str] = ()) -> Run:
    """The run in ``path`` (a ``python -m fastst.train --out`` directory, or one of its
    seed<s>/ folders) with ``overrides`` applied; RunDirError when it is not one."""
    path = Path(path)
    if not path.is_dir():
        problem = "is a file" if path.exists() else "does not exist"
        raise RunDirError(f"--run {str(path)!r} {problem}; pass the --out directory of a "
                          "python -m fastst.train run")
    config_path = path / CONFIG_NAME
    stage_root = path
    if not config_path.is_file() and path.name.startswith("seed") \
            and (path.parent / CONFIG_NAME).is_file():
        config_path = path.parent / CONFIG_NAME
    if not config_path.is_file():
        raise RunDirError(f"--run {str(path)!r} is not a fastst run directory (no "
                          f"{CONFIG_NAME}); pass the --out directory of a python -m fastst.train "
                          "run")
    try:
        config = read_config_file(config_path)
        apply_overrides(config, overrides)
        validate_config(config)
    except ConfigError as error:
        raise RunDirError(f"--run {str(path)!r}: {error}") from None
    except (OSError, ValueError) as error:  # an unreadable or non-YAML file
        raise RunDirError(f"--run {str(path)!r}: cannot read {config_path}: {error}") from None
    if config["seeds"] > 1 and stage_root == config_path.parent:
        seeds = [f"seed{config['seed'] + k}" for k in range(config["seeds"])]
        raise RunDirError(f"--run {str(path)!r} holds {config['seeds']} seeds, one folder each "
                          f"({', '.join(seeds)}); pass one of them, e.g. --run "
                          f"{path / seeds[0]}")
    return Run(config=config, stage_root=stage_root)
