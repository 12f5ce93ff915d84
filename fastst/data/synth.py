"""When the synthetic domains are written: only by training (``python -m fastst.train``,
``fastst.experiments``) and by the explicit ``python -m fastst.data synth``; commands that only
read data (``fastst.evaluate``, ``fastst.pseudo``) require an existing tree made with the
parameters they ask for and never generate or regenerate one (README "Data").

    python -m fastst.data synth --root DIR [--domain source|target|both] [--seed S]
        [--num-train N] [--num-val N] [--height H] [--width W]

writes DIR/<domain>/ (``fastst.data.synthetic.ensure_synthetic``; nothing is rewritten when an
identical tree is there).
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .synthetic import (DEFAULT_HEIGHT, DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, DEFAULT_WIDTH,
                        DOMAINS, GENERATOR_VERSION, MANIFEST_NAME, _tree_complete,
                        ensure_synthetic)

__all__ = ["SyntheticDataMissing", "require_synthetic", "synth_command", "synthetic_trees",
           "ensure_for_config", "require_for_config", "add_synth_command", "run_synth_command"]

# The generation parameters, with ensure_synthetic's defaults.
_DEFAULTS = {"seed": 0, "num_train": DEFAULT_NUM_TRAIN, "num_val": DEFAULT_NUM_VAL,
             "height": DEFAULT_HEIGHT, "width": DEFAULT_WIDTH}
# The domain a role of a run reads (fastst.methods.datasets: val is the target's val split).
_ROLE_DOMAINS = {"source": "source", "target": "target", "val": "target"}


class SyntheticDataMissing(FileNotFoundError):
    """No synthetic tree, an incomplete one, or one made with other parameters, where a command
    that does not generate data needs one."""


def synth_command(root, domain: str, options: Mapping[str, Any]) -> str:
    """The ``python -m fastst.data synth`` command line that writes ``domain`` under ``root``
    with the generation ``options`` (only those that differ from the defaults are spelled)."""
    words = ["python", "-m", "fastst.data", "synth", "--root", str(root), "--domain", domain]
    for key, default in _DEFAULTS.items():
        value = options.get(key, default)
        if value != default:
            words += [f"--{key.replace('_', '-')}", str(value)]
    return " ".join(shlex.quote(word) for word in words)


def require_synthetic(root, domain: str, **options) -> Path:
    """root/<domain> when it holds a complete synthetic tree made with ``options`` (the keyword
    arguments of ``ensure_synthetic``, defaults where left out); else ``SyntheticDataMissing``
    naming the directory, what differs and the command that makes it. Writes nothing."""
    wanted = {key: int(options.get(key, default)) for key, default in _DEFAULTS.items()}
    unknown = sorted(set(options) - set(_DEFAULTS) - {"progress"})
    if unknown:
        raise TypeError(f"unknown synthetic generation arguments {unknown}")
    domain_root = Path(root) / domain
    make = synth_command(root, domain, wanted)
    manifest = _read_manifest(domain_root / MANIFEST_NAME)
    if manifest is None:
        raise SyntheticDataMissing(
            f"no synthetic {domain} data set at {str(domain_root)!r} (no {MANIFEST_NAME}); "
            f"check the path, or generate it with `{make}` (python -m fastst.train generates "
            "the data of its preset)")
    differences = [f"{key}={manifest.get(key)!r} there, {value} asked for"
                   for key, value in wanted.items() if manifest.get(key) != value]
    if manifest.get("version") != GENERATOR_VERSION:
        differences.append(f"generator version {manifest.get('version')!r} there, "
                           f"{GENERATOR_VERSION} now")
    if differences:
        raise SyntheticDataMissing(
            f"the synthetic {domain} data set at {str(domain_root)!r} was made with other "
            f"parameters ({'; '.join(differences)}); give the settings of the run that made it "
            f"(the same key=value overrides, or --run DIR), or regenerate it with `{make}`")
    if not _tree_complete(domain_root, domain, manifest):
        raise SyntheticDataMissing(
            f"the synthetic {domain} data set at {str(domain_root)!r} is incomplete (files "
            f"missing); regenerate it with `{make}`")
    return domain_root


def synthetic_trees(data: Mapping[str, Any], roles: Iterable[str] = ("source", "target", "val")
                    ) -> List[Tuple[str, Path, str, Dict[str, Any]]]:
    """[(role, root, domain, generation options)] of the roles of a configuration's ``data``
    section that read synthetic data, each distinct (root, domain) once."""
    trees, seen = [], set()
    options = dict(data.get("synthetic") or {})
    for role in roles:
        spec = data[role]
        if spec["dataset"] != "synthetic":
            continue
        domain = spec.get("domain") or _ROLE_DOMAINS[role]
        key = (str(Path(spec["root"]).expanduser()), domain)
        if key not in seen:
            seen.add(key)
            trees.append((role, Path(spec["root"]).expanduser(), domain, options))
    return trees


def ensure_for_config(data: Mapping[str, Any], *, progress: bool = False) -> None:
    """Generate the synthetic trees of a training configuration's ``data`` section (once; an
    identical tree is left as it is)."""
    for _, root, domain, options in synthetic_trees(data):
        ensure_synthetic(root, domain, progress=progress, **options)


def require_for_config(data: Mapping[str, Any], roles: Iterable[str]) -> None:
    """``require_synthetic`` for each of ``roles`` of a configuration's ``data`` section that
    reads synthetic data; the error names the role's keys."""
    for role, root, domain, options in synthetic_trees(data, roles):
        try:
            require_synthetic(root, domain, **options)
        except SyntheticDataMissing as error:
            raise SyntheticDataMissing(f"data.{role}: {error}") from None


def _read_manifest(path: Path) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def add_synth_command(commands) -> None:
    """The ``synth`` subcommand of ``python -m fastst.data`` (``commands``: argparse
    subparsers)."""
    synth = commands.add_parser("synth", help="generate the synthetic demo domains",
                                description="Write the synthetic source and/or target domain "
                                            "as Cityscapes-layout trees under ROOT/<domain>/.")
    synth.add_argument("--root", required=True, help="directory of the domains (the presets' "
                       "data.*.root, e.g. data/synthetic)")
    synth.add_argument("--domain", default="both", choices=(*DOMAINS, "both"),
                       help="which domain to write (default: both)")
    for key, default in _DEFAULTS.items():
        synth.add_argument(f"--{key.replace('_', '-')}", type=int, default=default,
                           help=f"data.synthetic.{key} (default: {default})")


def run_synth_command(args) -> int:
    """Run ``python -m fastst.data synth`` with the parsed ``args``; returns 0."""
    domains = DOMAINS if args.domain == "both" else (args.domain,)
    options = {key: getattr(args, key) for key in _DEFAULTS}
    for domain in domains:
        path = ensure_synthetic(args.root, domain, progress=True, **options)
        print(f"synthetic {domain}: {path} ({options['num_train']} train, "
              f"{options['num_val']} val images of {options['height']}x{options['width']})")
    return 0
