"""Atomic file writes: the temporary-file + os.replace pattern every writer of fastst uses, so a
crash or a kill never leaves a half-written checkpoint, label, manifest or config under the final
name (readers see the old file or the new one)."""
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, IO

import torch


@contextlib.contextmanager
def atomic_write(path: "os.PathLike[str] | str", mode: str = "wb", *, durable: bool = True) -> Iterator[IO]:
    """Open a temporary file beside `path` (parents created) for writing; when the block ends
    without an exception, make it readable like any saved file (0644), fsync it if `durable`, and
    rename it over `path`; otherwise remove it. Yields the open file object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates files private (0600)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)  # a failed write() names no file; reports need it
        raise


def read_json(path: "os.PathLike[str] | str") -> Any:
    """The JSON value stored at `path`, or None when the file is missing or unreadable (a
    partial or corrupt file counts as missing: the writers above never leave one under the
    final name, so it can only come from elsewhere)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def write_json_atomic(data: Any, path: "os.PathLike[str] | str", *, indent: int = 1,
                      sort_keys: bool = False) -> Path:
    """`data` as JSON (with a final newline) at `path`, atomically and durably."""
    with atomic_write(path, "w") as handle:
        json.dump(data, handle, indent=indent, sort_keys=sort_keys)
        handle.write("\n")
    return Path(path)


def save_torch_atomic(data: Any, path: "os.PathLike[str] | str") -> Path:
    """``torch.save(data)`` at ``path``, atomically and durably (``atomic_write``)."""
    with atomic_write(path) as handle:
        torch.save(data, handle)
    return Path(path)
