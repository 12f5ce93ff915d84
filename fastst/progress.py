"""Progress of the long loops (training iterations, pseudo-label passes, evaluation): a tqdm bar
on a terminal, plain log lines everywhere else.

Bars are drawn only where ``runtime.progress`` is true and both stdout and stderr are terminals
(tqdm redraws its line with ``\\r``, which a log file keeps as one endless line). Otherwise -
``runtime.progress=false``, output redirected to a file or a pipe, a batch job - each loop prints
a line to stdout every ``runtime.progress_every`` iterations (or images) and one when it ends,
and each stage one line when it starts and one when it ends (``log``)::

    stage round1 (iast): started at iteration 0 of 468
    round1: 100/468 it (21%), 3.2 it/s, 1:55 left, region=0.812, seg_source=0.401
    ...
    round1: 468/468 it in 2:26
    stage round1: done, 468 iterations in 161.2 s

Only the main rank of a distributed run reports (``show``).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Mapping, Optional

__all__ = ["DEFAULT_EVERY", "use_bars", "log", "progress_bar", "LineProgress"]

# runtime.progress_every's default: a line per 100 iterations is every 30 s to a few minutes.
DEFAULT_EVERY = 100


def use_bars(bars: bool) -> bool:
    """True where a tqdm bar is drawn: ``bars`` (runtime.progress) and a terminal on both
    stdout and stderr."""
    return bool(bars) and _is_terminal(sys.stdout) and _is_terminal(sys.stderr)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def log(message: str, *, show: bool = True, bars: bool = False) -> None:
    """Print ``message`` as one line to stdout, unless ``show`` is false or bars are drawn
    (``use_bars(bars)``: the bar says it)."""
    if show and not use_bars(bars):
        print(message, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class LineProgress:
    """The tqdm calls the loops make (``update``, ``set_postfix``, ``close``, ``with``), as
    lines: ``desc: done/total unit (pct), rate, time left[, postfix]`` whenever ``done`` passes a
    multiple of ``every``, and ``desc: total/total unit in m:ss`` at the end."""

    def __init__(self, total: int, *, desc: str, unit: str = "it", initial: int = 0,
                 every: int = DEFAULT_EVERY, stream=None):
        if int(every) < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.total, self.desc, self.unit, self.every = int(total), desc, unit, int(every)
        self.n = self._start = int(initial)
        self.stream = stream
        self.postfix = ""
        self._started = time.perf_counter()
        self._closed = False

    def _write(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def set_postfix(self, values: Optional[Mapping[str, Any]] = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        items = {**(values or {}), **kwargs}
        self.postfix = ", ".join(f"{key}={value}" for key, value in items.items())

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + int(n)
        if self.n // self.every > before // self.every and self.n < self.total:
            elapsed = time.perf_counter() - self._started
            rate = (self.n - self._start) / elapsed if elapsed > 0 else 0.0
            left = f", {_clock((self.total - self.n) / rate)} left" if rate > 0 else ""
            share = f" ({self.n / self.total:.0%})" if self.total else ""
            extra = f", {self.postfix}" if self.postfix else ""
            self._write(f"{self.desc}: {self.n}/{self.total} {self.unit}{share}, "
                        f"{rate:.3g} {self.unit}/s{left}{extra}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.n > self._start:
            extra = f", {self.postfix}" if self.postfix else ""
            self._write(f"{self.desc}: {self.n}/{self.total} {self.unit} in "
                        f"{_clock(time.perf_counter() - self._started)}{extra}")

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def progress_bar(total: int, *, desc: str, unit: str = "it", initial: int = 0,
                 show: bool = True, bars: bool = True, every: int = DEFAULT_EVERY):
    """A context manager with tqdm's ``update``/``set_postfix``/``close``: a tqdm bar where
    ``use_bars(bars)``, else a ``LineProgress`` printing every ``every`` units; a disabled
    (silent) tqdm where ``show`` is false (the other ranks of a distributed run)."""
    from tqdm import tqdm

    if not show:
        return tqdm(total=total, initial=initial, disable=True)
    if use_bars(bars):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return LineProgress(total, desc=desc, unit=unit, initial=initial, every=every)
