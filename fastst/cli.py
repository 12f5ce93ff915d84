"""How every ``python -m fastst.*`` command ends: one line on stderr and the README's exit status.

``run_cli(main, argv, prog=...)`` runs a command's ``main(argv)`` and turns what it raises into
one ``<prog>: error: <message>`` line on stderr and ``SystemExit`` with an exit status, as
argparse's own errors do (README "Training"). Every command's public ``main`` is
``run_cli(_main, argv, prog=...)``:

    0  done
    1  training gave up on non-finite losses (``NonFiniteLossError``)
    2  bad input: preset, key, value, data, checkpoint, output directory, a missing optional
       module, a full disk (``ConfigError``, ``DataCheckFailed``, ``ValueError``, ``OSError``,
       ``ImportError``, ...)
    3  a ``runtime.stop_after_*`` hook fired (``StopRequested``)
    4  an unexpected error (a bug: the line says so and how to see the traceback)

``--debug`` anywhere on the command line lets the exception through with its traceback (add it to
a parser with ``add_debug_option`` so that ``--help`` lists it). ``check_output_dir`` refuses an
output directory that is a file, cannot be created or cannot be written, before any work.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

__all__ = ["run_cli", "exit_status", "add_debug_option", "check_output_dir", "OutputDirError",
           "DEBUG_FLAG", "EXIT_DONE", "EXIT_NONFINITE", "EXIT_BAD_INPUT", "EXIT_STOPPED",
           "EXIT_INTERNAL"]

DEBUG_FLAG = "--debug"
EXIT_DONE, EXIT_NONFINITE, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_INTERNAL = 0, 1, 2, 3, 4
# What torch's DataLoader puts before the worker's own traceback when it re-raises an error.
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class OutputDirError(OSError):
    """An output directory that is a file, cannot be created or cannot be written."""


def add_debug_option(parser) -> None:
    """Register ``--debug`` (read by ``run_cli``) so that the parser accepts and lists it."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show the full traceback of an error instead of one line")


def run_cli(main: Callable[[Optional[Sequence[str]]], int],
            argv: Optional[Sequence[str]] = None, *, prog: str) -> int:
    """``main(argv)``'s return value (its exit status); what it raises becomes one stderr line
    and ``SystemExit(status)`` (see the module docstring). ``argv`` defaults to
    ``sys.argv[1:]``; with ``--debug`` in it the exception propagates. ``SystemExit`` (argparse
    errors, ``--help``) passes through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except KeyboardInterrupt:
        if DEBUG_FLAG in argv:
            raise
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:  # SystemExit and KeyboardInterrupt are not Exceptions
        if DEBUG_FLAG in argv:
            raise
        status, message = exit_status(error)
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(status) from None


def exit_status(error: BaseException) -> Tuple[int, str]:
    """(exit status, message) of an exception raised by a command (module docstring)."""
    from fastst.faults import DataCheckFailed, NonFiniteLossError, disk_full, disk_full_message
    from fastst.methods.context import StopRequested

    if isinstance(error, StopRequested):
        return EXIT_STOPPED, str(error)
    if isinstance(error, NonFiniteLossError):
        return EXIT_NONFINITE, str(error)
    full = disk_full(error)
    if full is not None:
        return EXIT_BAD_INPUT, disk_full_message(full)
    message = _message(error)
    if isinstance(error, ImportError):
        module = getattr(error, "name", None) or "the missing module"
        hint = (" (or set runtime.tensorboard=false)" if "tensorboard" in message.lower()
                else "")
        return EXIT_BAD_INPUT, f"{message}: install {module} (pip install {module}){hint}"
    if isinstance(error, (ValueError, OSError, DataCheckFailed)):  # ConfigError, checkpoints, ...
        return EXIT_BAD_INPUT, message
    if _is_cuda_unavailable(error):
        hint = "" if "cpu" in message else "; use the CPU (runtime.device=cpu, --device cpu)"
        return EXIT_BAD_INPUT, message + hint
    return EXIT_INTERNAL, (f"unexpected {type(error).__name__}: {message} (a bug; rerun with "
                           f"{DEBUG_FLAG} to see the traceback and report it)")


def _message(error: BaseException) -> str:
    """The error's message; for an error re-raised from a DataLoader worker, the worker's own
    last line (which names the file) instead of the worker's whole traceback."""
    text = str(error).strip() or type(error).__name__
    if _WORKER_TRACEBACK in text:
        last = text.splitlines()[-1].strip()
        head, sep, tail = last.partition(": ")
        return tail if sep and head and " " not in head else last
    return text


def _is_cuda_unavailable(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, (RuntimeError, AssertionError)) and (
        "Torch not compiled with CUDA" in text or "CUDA is not available" in text
        or "no CUDA GPUs are available" in text)


def check_output_dir(path, option: str = "--out") -> Path:
    """Create ``path`` (a directory, parents too) and check that files can be made in it;
    ``OutputDirError`` naming ``option`` when it is a file, sits below a file, cannot be created
    or is read-only. Returns ``Path(path)``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{option} {str(path)!r} is a file, not a directory; choose "
                             "another path")
    blocking = _file_above(path)
    if blocking is not None:
        raise OutputDirError(f"{option} {str(path)!r} cannot be created: {str(blocking)!r} is "
                             "a file; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputDirError(f"{option} {str(path)!r} cannot be created "
                             f"({error.strerror or error}); choose a writable path") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputDirError(f"{option} {str(path)!r} is not writable; choose a writable path")
    return path


def _file_above(path: Path) -> Optional[Path]:
    parents: List[Path] = list(path.absolute().parents)
    return next((parent for parent in reversed(parents)
                 if parent.exists() and not parent.is_dir()), None)
