"""Preset files: the YAML files in fastst/presets/, their bases and their schedules.

A preset file may name a ``base`` (a preset file name or a list of them, merged in order; files
whose name starts with ``_`` are bases, not presets) and a ``schedule`` writing per-round values
as rules (docs/recipes.md). ``load_preset`` returns the raw dict that ``fastst.config`` resolves
over the defaults."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import yaml

from fastst.config_checks import ConfigError

__all__ = ["PRESET_DIR", "available_presets", "load_preset"]

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def available_presets() -> List[str]:
    """Names of the presets shipped in fastst/presets/ (file stems), sorted. Files whose name
    starts with ``_`` are bases that presets build on, not presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def load_preset(name: str) -> Dict[str, Any]:
    """The raw dict of preset ``name``: its file laid over its bases, its schedule written into
    its stages (see ``_read_preset_file`` and ``_apply_schedule``); ConfigError listing the
    presets if there is none."""
    presets = available_presets()
    if not isinstance(name, str) or name not in presets:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(presets)}")
    data = _read_preset_file(name, ())
    return _apply_schedule(data, f"preset {name!r}")


def _read_preset_file(name: str, chain: Tuple[str, ...]) -> Dict[str, Any]:
    """fastst/presets/<name>.yaml deep-merged over its ``base`` (a preset file name or a list of
    them, merged in order; bases may have bases). Mappings merge key by key; any other value
    (lists included, e.g. ``pipeline``) replaces the base's."""
    path = PRESET_DIR / f"{name}.yaml"
    if name in chain:
        raise ConfigError(f"preset file {path}: its bases loop ({' -> '.join((*chain, name))})")
    with open(path) as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ConfigError(f"preset file {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path} must hold a mapping, got {type(data).__name__}")
    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    files = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"preset file {path}: base must be a preset file name or a list of "
                          f"them (e.g. base: _r101), got {bases!r}")
    merged: Dict[str, Any] = {}
    for base in bases:
        if base not in files:
            raise ConfigError(f"preset file {path}: unknown base {base!r}; preset files: "
                              f"{', '.join(files)}")
        merged = _deep_merge(merged, _read_preset_file(base, (*chain, name)))
    return _deep_merge(merged, data)


def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(merged.get(key), dict) and isinstance(value, Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


_SCHEDULE_RULE = "{stages: [names], start: number, step: number, max: number (optional)}"


def _apply_schedule(data: Dict[str, Any], source: str) -> Dict[str, Any]:
    """Write a preset's ``schedule`` into its stages and drop it. ``schedule`` maps a stage key
    to a rule: the first of ``stages`` gets ``start``, each next one the previous value plus
    ``step``, at most ``max``, summed in Python floats (float64) in order, as the released
    round loops do (docs/recipes.md §5-§6), so e.g. the fifth TPLD portion is
    0.39999999999999997, not 0.4. A stage that also sets the key is an error."""
    schedule = data.pop("schedule", None)
    if schedule is None:
        return data
    if not isinstance(schedule, Mapping):
        raise ConfigError(f"{source}: schedule must map stage keys to rules {_SCHEDULE_RULE}")
    stages = data.get("stages")
    for key, rule in schedule.items():
        numbers = ("start", "step", "max")
        if (not isinstance(rule, Mapping) or not {"stages", "start", "step"} <= set(rule)
                or not set(rule) <= {"stages", *numbers}
                or any(isinstance(rule.get(n), bool)
                       or not isinstance(rule.get(n, 0), (int, float)) for n in numbers)):
            raise ConfigError(f"{source}: schedule.{key} must be {_SCHEDULE_RULE}, got {rule!r}")
        names = rule["stages"]
        if (not isinstance(stages, Mapping) or not isinstance(names, list)
                or any(not isinstance(stages.get(n), dict) for n in names)):
            raise ConfigError(f"{source}: schedule.{key}.stages must list stages defined under "
                              f"'stages', got {names!r}")
        value = rule["start"]
        for name in names:
            if key in stages[name]:
                raise ConfigError(f"{source}: stages.{name}.{key} is set both in the stage and "
                                  f"by schedule.{key}; keep one")
            stages[name][key] = value
            value = value + rule["step"]
            if rule.get("max") is not None:
                value = min(value, rule["max"])
    return data
