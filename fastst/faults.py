"""What a run does when something goes wrong outside the math: a non-finite loss, a full disk,
bad data files, and the debris a hard kill leaves behind.

* ``check_finite(losses)`` raises ``NonFiniteLoss`` when a loss is NaN or infinite; the training
  loop (``fastst.methods.trainer.Stage.run``) catches it, skips that optimizer step and gives up
  with ``NonFiniteLossError`` after ``runtime.max_nonfinite_steps`` skips in a row.
* ``disk_full(error)`` finds an ENOSPC/EDQUOT ``OSError`` in an exception chain and
  ``disk_full_message`` says what to do; ``naming_file(path)`` puts the path being written into
  such errors. ``python -m fastst.train`` reports them and exits with status 2.
* ``check_run_data(config, run_dir)`` runs ``fastst.data.check_dataset`` on the source, target and
  val data of a configuration before the first stage trains, and remembers data that passed in
  ``run_dir/data_check.json`` (keyed by a cheap fingerprint of the file list, sizes and mtimes),
  so that a rerun does not read every file again. Faults raise ``DataCheckFailed`` with the
  report, which names the bad files.
* ``remove_stale_temp_files(directory)`` deletes the temporary files of ``fastst.atomic``'s writes
  that a killed process left behind (never a file under its final name, which is always whole).
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch

from fastst.atomic import read_json, write_json_atomic
from fastst.data.io import list_path

__all__ = ["NonFiniteLoss", "NonFiniteLossError", "check_finite", "DISK_FULL_ERRNOS",
           "disk_full", "disk_full_message", "naming_file", "DataCheckFailed", "DATA_CHECK_NAME",
           "check_run_data", "remove_stale_temp_files"]

DATA_CHECK_NAME = "data_check.json"
_DATA_CHECK_FORMAT = "fastst-data-check-v1"
DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None))
                             if e is not None)
# atomic_write's temporary files: tempfile.mkstemp(prefix=".<name>.", suffix=".tmp"), whose
# random part is 8 characters of [a-z0-9_].
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


# --- non-finite losses -------------------------------------------------------------------------

class NonFiniteLoss(FloatingPointError):
    """A step's loss is NaN or infinite; ``losses`` maps the offending names to their values.
    Raised before any optimizer step of the iteration, so skipping the step loses nothing."""

    def __init__(self, losses: Mapping[str, float]) -> None:
        self.losses = dict(losses)
        super().__init__("non-finite loss: " + ", ".join(f"{k} = {v}" for k, v in
                                                          self.losses.items()))


class NonFiniteLossError(RuntimeError):
    """Training gave up on non-finite losses; the stage's last checkpoint was left as it was."""


def check_finite(losses: Mapping[str, torch.Tensor]) -> None:
    """Raise ``NonFiniteLoss`` naming every non-finite entry of ``losses`` (name -> 0-dim or
    one-element tensor, any float dtype, all on one device). One host synchronisation when all
    are finite (a single reduction read back), a few more only when one is not."""
    if not losses:
        return
    values = torch.stack([loss.detach().reshape(()).float() for loss in losses.values()])
    if bool(torch.isfinite(values).all()):
        return
    numbers = values.cpu().tolist()
    raise NonFiniteLoss({name: value for name, value in zip(losses, numbers)
                         if not math.isfinite(value)})


# --- full disks --------------------------------------------------------------------------------

def disk_full(error: BaseException) -> Optional[OSError]:
    """The OSError with errno ENOSPC or EDQUOT in ``error``'s chain (itself, its ``__cause__``
    or ``__context__``, recursively), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def disk_full_message(error: OSError, fallback: "os.PathLike[str] | str | None" = None) -> str:
    """"disk full while writing <path>; free space and rerun the same command to resume", the
    path being the error's filename, else ``fallback`` (e.g. the run directory)."""
    where = error.filename if error.filename is not None else fallback
    target = f"writing {where}" if where is not None else "writing"
    reason = "disk quota exceeded" if error.errno == getattr(errno, "EDQUOT", None) else "disk full"
    return f"{reason} while {target}; free space and rerun the same command to resume"


@contextlib.contextmanager
def naming_file(path: "os.PathLike[str] | str") -> Iterator[None]:
    """Give an OSError raised inside the block ``path`` as its filename when it names none
    (a failed ``write`` on an open file does not), so that reports can say which file failed."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            error.filename = str(path)
        raise


# --- data checked before training --------------------------------------------------------------

class DataCheckFailed(RuntimeError):
    """The data of a run has faults (missing, unreadable or truncated files, bad ids, ...); the
    message holds ``fastst.data.check_dataset``'s report, which lists the files."""


_ROLE_LABELS = {"source": True, "target": False, "val": True}  # the target's labels are never read
_ROLE_DOMAINS = {"source": "source", "target": "target", "val": "target"}  # synthetic data


def check_run_data(config: Mapping[str, Any], run_dir, *, workers: Optional[int] = None
                   ) -> List[Dict[str, Any]]:
    """Check the files of the ``data.source``, ``data.target`` and ``data.val`` sets of
    ``config`` (GTA5, SYNTHIA, Cityscapes, or the generated synthetic trees) with
    ``fastst.data.check_dataset``, each distinct (data set, root, split, list file) once; the
    target's label files are not read (the pipeline never uses them).

    A set that passed is recorded in ``run_dir/data_check.json`` with the fingerprint of its
    files (``fastst.data.check.dataset_fingerprint``: names, sizes and mtimes), and is not read
    again while the fingerprint stays the same. Returns the record of every checked set
    (``{"key", "dataset", "root", "split", "list_file", "labels", "fingerprint", "num_images",
    "cached"}``). Raises ``DataCheckFailed`` with the report of the first set with faults.
    """
    from fastst.data.check import check_dataset, dataset_fingerprint
    from fastst.data.check_synthetic import check_synthetic, synthetic_fingerprint
    from fastst.data.io import NO_DATA_HINT

    run_dir = Path(run_dir)
    marker = run_dir / DATA_CHECK_NAME
    known = _read_marker(marker)
    records, changed = [], False
    for role, labels in _ROLE_LABELS.items():
        spec = config["data"][role]
        # A synthetic tree is checked like a data set once training has generated it (a file
        # damaged later is found here, not by a DataLoader worker mid-training).
        domain = (spec.get("domain") or _ROLE_DOMAINS[role]) if spec["dataset"] == "synthetic" \
            else None
        root = str(Path(spec["root"]).expanduser().resolve())
        list_file = None if spec["list_file"] is None else str(list_path(spec["list_file"]).resolve())
        key = "|".join([spec["dataset"], root, spec["split"], str(list_file), str(labels)]
                       + ([domain] if domain else []))
        if any(record["key"] == key for record in records):
            continue
        try:
            fingerprint = (partial(synthetic_fingerprint, domain=domain) if domain else partial(
                dataset_fingerprint, spec["dataset"]))(root, spec["split"], list_file=list_file,
                                                       labels=labels)
        except ValueError as error:  # an unknown split
            raise DataCheckFailed(f"data.{role}: {error}") from error
        record = {"key": key, "dataset": spec["dataset"], "root": root, "split": spec["split"],
                  "list_file": list_file, "labels": labels, "fingerprint": fingerprint["digest"],
                  "num_images": fingerprint["num_images"], "cached": True}
        previous = known.get(key)
        if previous is None or previous.get("fingerprint") != record["fingerprint"]:
            started = time.perf_counter()
            report = (partial(check_synthetic, domain=domain) if domain else partial(
                check_dataset, spec["dataset"]))(root, spec["split"], list_file=list_file,
                                                 labels=labels, workers=workers)
            if not report.ok:
                hint = f" ({NO_DATA_HINT})" if report.errors else ""
                raise DataCheckFailed(
                    f"the {role} data (data.{role}: {spec['dataset']} at {root}, split "
                    f"{spec['split']}) has {report.num_faults} fault(s); stopped before training. "
                    f"Fix or remove the files listed below and rerun{hint}; "
                    f"runtime.check_data=false skips this check:\n{report.summary()}")
            record.update(cached=False, seconds=time.perf_counter() - started)
            known[key] = {k: v for k, v in record.items() if k != "cached"}
            changed = True
        records.append(record)
    if changed:
        write_json_atomic({"format": _DATA_CHECK_FORMAT, "checked": known}, marker)
    return records


def _read_marker(path: Path) -> Dict[str, Dict[str, Any]]:
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != _DATA_CHECK_FORMAT \
            or not isinstance(data.get("checked"), dict):
        return {}
    return data["checked"]


# --- what a hard kill leaves -------------------------------------------------------------------

def remove_stale_temp_files(directory) -> List[Path]:
    """Delete the temporary files (``.<name>.<8 characters>.tmp``) that ``fastst.atomic``
    writers leave when their process is killed mid-write, anywhere under ``directory``; returns
    the deleted paths. Call it only while no other process writes into ``directory``."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for folder, _, files in os.walk(directory):
        for name in files:
            if _TEMP_FILE.match(name):
                path = Path(folder) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
