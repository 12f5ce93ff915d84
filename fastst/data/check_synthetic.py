"""Check a generated synthetic data set (``python -m fastst.data check --dataset synthetic``)
without generating anything.

ROOT is what the demo presets' ``data.*.root`` name (``data/synthetic``): one Cityscapes-layout
tree per domain, ROOT/source and ROOT/target (``fastst.data.synthetic.ensure_synthetic``); ROOT
may also be one domain's tree itself. Each tree must hold the manifest ``synthetic.json`` of this
generator version and every image and label it promises; its files are then checked as Cityscapes
files are (``fastst.data.check``: PNG integrity, label ids). A missing or damaged tree is a fault
to report, never a reason to write one: only the training command (or an explicit generation)
writes synthetic data."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .check import CheckReport, check_dataset, dataset_fingerprint
from .synthetic import DOMAINS, GENERATOR_VERSION, MANIFEST_NAME, SPLITS

__all__ = ["synthetic_trees", "synthetic_fingerprint", "check_synthetic"]

GENERATE_HINT = ("the training command generates it, e.g. python -m fastst.train --preset demo "
                 "(with the run's data.synthetic.* overrides)")


def synthetic_trees(root, domain: Optional[str] = None) -> List[Tuple[str, Path]]:
    """[(domain, tree directory)] to check under ``root``: ``domain``'s tree, else ROOT itself
    when it is one domain's tree (it holds a manifest), else ROOT/source and ROOT/target.
    Raises ValueError for an unknown domain."""
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    root = Path(root).expanduser()
    own = _manifest(root / MANIFEST_NAME)
    if isinstance(own, dict) and own.get("domain") in DOMAINS and domain in (None, own["domain"]):
        return [(own["domain"], root)]
    return [(d, root / d) for d in ((domain,) if domain else DOMAINS)]


def _manifest(path: Path):
    """The manifest's dict, None if there is no file, or a str saying why it cannot be read."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return f"{path} cannot be read ({error})"
    return data if isinstance(data, dict) else f"{path} does not hold a JSON object"


def _manifest_errors(domain: str, tree: Path) -> List[str]:
    if not tree.is_dir():
        return [f"no synthetic {domain} data at {tree}: {GENERATE_HINT}"]
    manifest = _manifest(tree / MANIFEST_NAME)
    if manifest is None:
        return [f"{tree} has no {MANIFEST_NAME}: it is not a finished synthetic tree (an "
                f"interrupted generation, or another data set); {GENERATE_HINT}"]
    if isinstance(manifest, str):
        return [f"{manifest}; {GENERATE_HINT}"]
    if manifest.get("generator") != "fastst.data.synthetic" or manifest.get("domain") != domain:
        return [f"{tree / MANIFEST_NAME} is not the manifest of the synthetic {domain} domain"]
    if manifest.get("version") != GENERATOR_VERSION:
        return [f"{tree} was made by generator version {manifest.get('version')!r}, this is "
                f"version {GENERATOR_VERSION}: the training command makes it again"]
    return []


def synthetic_fingerprint(root, split: Optional[str] = None, *, list_file=None,
                          labels: bool = True, domain: Optional[str] = None) -> Dict[str, object]:
    """``dataset_fingerprint`` of the trees ``check_synthetic`` with the same arguments reads,
    each tree's manifest included: {"digest": hex str, "num_images": int}."""
    digest, num_images = hashlib.sha256(f"synthetic|{split}|{labels}".encode()), 0
    for _, tree in synthetic_trees(root, domain):
        manifest = tree / MANIFEST_NAME
        try:
            stat = manifest.stat()
            digest.update(f"{manifest}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{manifest}|missing\n".encode())
        for s in SPLITS if split is None else (split,):
            part = dataset_fingerprint("cityscapes", tree, s, list_file=list_file, labels=labels)
            digest.update(part["digest"].encode())
            num_images += part["num_images"]
    return {"digest": digest.hexdigest(), "num_images": num_images}


def check_synthetic(root, split: Optional[str] = None, *, domain: Optional[str] = None,
                    list_file=None, decode_images: bool = False, workers: Optional[int] = None,
                    labels: bool = True):
    """A ``CheckReport`` (dataset "synthetic") over every tree ``synthetic_trees(root, domain)``
    names and ``split`` ("train" or "val"; default both): manifest faults are ``errors``, the
    files are checked by ``check_dataset("cityscapes", ...)``, and fewer images than the manifest
    promises is an error. Raises ValueError for an unknown split or domain."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; valid splits: {', '.join(SPLITS)}")
    splits = list(SPLITS if split is None else (split,))
    trees = synthetic_trees(root, domain)
    report = CheckReport(dataset="synthetic", root=Path(root).expanduser(), splits=splits)
    for name, tree in trees:
        errors = _manifest_errors(name, tree)
        if errors:
            report.errors.extend(errors)
            continue
        manifest = _manifest(tree / MANIFEST_NAME)
        for s in splits:
            part = check_dataset("cityscapes", tree, s, list_file=list_file,
                                 decode_images=decode_images, workers=workers, labels=labels)
            promised = int(manifest.get(f"num_{s}", 0))
            if list_file is None and part.num_images < promised:
                part.errors.append(f"{tree} split {s}: {part.num_images} of the {promised} "
                                   f"images its {MANIFEST_NAME} promises; {GENERATE_HINT}")
            if promised == 0 and not part.num_images:  # an empty split made on purpose
                part.errors = [e for e in part.errors if not e.startswith("no images")]
            _merge(report, part)
    return report


def _merge(report, part) -> None:
    """Add ``part``'s counts and findings to ``report``."""
    report.num_images += part.num_images
    report.num_labels += part.num_labels
    report.errors.extend(part.errors)
    report.images_without_label.extend(part.images_without_label)
    report.labels_without_image.extend(part.labels_without_image)
    report.unreadable.extend(part.unreadable)
    report.size_mismatches.extend(part.size_mismatches)
    report.unlabelled_splits.extend(part.unlabelled_splits)
    for label_id, found in part.unknown_ids.items():
        entry = report.unknown_ids.setdefault(label_id, type(found)(example=found.example))
        entry.pixels += found.pixels
        entry.files += found.files
