"""Benchmark harness: pytest-benchmark timings, collected into one speed-up table per group.

FASTST_BENCH_QUICK=1 selects small shapes (CI); otherwise the shapes of the issues (512x1024).
Each benchmark calls `run(benchmark, group, impl, fn)`; the table printed at the end gives every
implementation's median time and its speed-up over each other one of the same group.

The quick mode checks that every benchmark runs and that every implementation's values agree with
the reference (bench/_value_checks.py); its timings are a few rounds of small inputs, which a
neighbour's burst of work on a shared machine moves by 100x, so two quick runs need not agree on
which implementation is faster. Its table says so (QUICK_LABEL) and every ratio in it is marked
"not a measurement"; only a full run (FASTST_BENCH_QUICK=0) measures.
"""
import os
from collections import defaultdict

import pytest
import torch

QUICK = os.environ.get("FASTST_BENCH_QUICK") == "1"
_RESULTS = defaultdict(dict)  # group -> impl -> median seconds
_NOTES = defaultdict(list)  # title -> lines printed after the speed-up tables
QUICK_LABEL = ("quick mode (FASTST_BENCH_QUICK=1): small inputs, a few rounds each - these times "
               "and ratios are not a measurement; FASTST_BENCH_QUICK=0 measures")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# Full runs time each implementation for about this long (at least 5 rounds, at most 200): the
# median of 5 rounds of a 5 ms op spans 25 ms, where one burst of a neighbour's work on the shared
# CPU moves it; the ops of a group are timed one after the other, so each gets a comparable span.
_SECONDS_PER_BENCH = 0.5


def _rounds_for(timed):
    """Rounds for a full run: one untimed call (it also warms up), then enough rounds to fill
    _SECONDS_PER_BENCH, clamped to [5, 200]."""
    import time
    start = time.perf_counter()
    timed()
    once = time.perf_counter() - start
    return max(5, min(200, int(_SECONDS_PER_BENCH / max(once, 1e-9))))


@pytest.fixture
def run():
    def _run(benchmark, group, impl, fn, device="cpu", rounds=None):
        def timed():
            out = fn()
            _sync(device)
            return out

        benchmark.group = group
        benchmark.extra_info["impl"] = impl
        if rounds is None and not QUICK:
            rounds = _rounds_for(timed)
        result = benchmark.pedantic(timed, rounds=rounds or 3, warmup_rounds=1)
        _RESULTS[group][impl] = benchmark.stats.stats.median
        return result

    return _run


@pytest.fixture
def note():
    """note(title, line): a line for the summary, under `title` (e.g. a memory table)."""
    def _note(title, line):
        _NOTES[title].append(line)

    return _note


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    for title, lines in sorted(_NOTES.items()):
        tr.section(title)
        for line in lines:
            tr.write_line(line)
    if not _RESULTS:
        return
    for line in speedup_lines(_RESULTS, QUICK):
        if line.startswith("=="):
            tr.section(line.strip("= "))
        else:
            tr.write_line(line)


def speedup_lines(results, quick):
    """The speed-up table: a "== title ==" line, the device line, then per group every
    implementation's median and its ratios; in quick mode labelled "not a measurement"."""
    lines = ["== fastst speed-ups (median time; ratio = other impl's time / this impl's time)"
             + (" - quick mode, not a measurement ==" if quick else " ==")]
    device = "cuda " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines.append(f"device: {device}, threads: {torch.get_num_threads()}, quick: {quick}")
    if quick:
        lines.append(QUICK_LABEL)
    for group, impls in sorted(results.items()):
        lines.append(f"\n[{group}]" + (" (not a measurement)" if quick else ""))
        for impl, t in sorted(impls.items(), key=lambda kv: kv[1]):
            ratios = ", ".join(f"{t2 / t:.1f}x vs {other}" for other, t2 in impls.items() if other != impl)
            if ratios and quick:
                ratios = "(not a measurement: " + ratios + ")"
            lines.append(f"  {impl:<24} {t * 1e3:10.3f} ms   {ratios}")
    return lines
