"""`python -m fastst.doctor` (README "First run on a GPU"): the report, the table, --json, the
exit statuses (0 all ok, 1 a mismatch or an error, 2 bad arguments) and the shapes it checks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastst import doctor
from fastst.ops import _backend, tpld
from fastst.ops._selftest_cases import CASES, LARGE, SMALL, TINY, Row, backends_on

REPO = Path(__file__).resolve().parents[1]
HEADER = "| op | backend | device | shape | result | ms |"
CPU = torch.device("cpu")


def _table_rows(out: str):
    """The cells of the table that ends the report."""
    lines = out.rstrip().splitlines()
    start = lines.index(HEADER)
    assert lines[start + 1] == "|---|---|---|---|---|---|"
    rows = [line for line in lines[start + 2:]]
    assert all(line.startswith("| ") and line.endswith(" |") for line in rows), "the report ends with the table"
    return [[cell.strip() for cell in line[2:-2].split(" | ")] for line in rows]


def test_the_default_run_is_ok_here_and_ends_with_the_table():
    """The command as a user runs it (no Triton interpreter): every op, every backend, exit 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTST_BACKEND")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-m", "fastst.doctor"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _table_rows(done.stdout)
    want = {(case.label, backend) for case in CASES for backend in backends_on(case, CPU) if backend != "triton"}
    assert {(r[0], r[1]) for r in rows} == want
    assert all(r[2] == "cpu" and r[4].startswith("ok") and float(r[5]) > 0 for r in rows)
    for text in ("- torch: " + torch.__version__, "- available backends:", "- device cpu:"):
        assert text in done.stdout


def test_json_has_the_rows_of_the_table(tmp_path, capsys):
    path = tmp_path / "doctor.json"
    assert doctor.main(["--ops", "cbst_pseudo_label, tpld_vote", "--json", str(path)]) == 0
    rows = _table_rows(capsys.readouterr().out)
    report = json.loads(path.read_text())
    assert report["ok"] is True and report["environment"]["torch"] == torch.__version__
    assert [[r["op"], r["backend"], r["device"], r["shape"]] for r in report["rows"]] == [r[:4] for r in rows]
    backends = [b for b in _backend.available_backends() if b in tpld.VOTE_BACKENDS]
    assert [r["backend"] for r in report["rows"] if r["op"] == "tpld_vote"] == backends
    assert {r["op"] for r in report["rows"]} == {"cbst_pseudo_label", "tpld_vote"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in report["rows"])


def test_a_mismatching_kernel_exits_1(monkeypatch, capsys):
    original = tpld.tpld_vote_cpp

    def wrong(*args):
        labels, flags = original(*args)
        return torch.zeros_like(labels), flags

    monkeypatch.setattr(tpld, "tpld_vote_cpp", wrong)
    assert doctor.main(["--ops", "tpld_vote"]) == 1
    rows = {r[1]: r for r in _table_rows(capsys.readouterr().out)}
    assert rows["cpp"][4].startswith("MISMATCH: labels: ") and " differ" in rows["cpp"][4]
    assert rows["torch"][4].startswith("ok")


def test_a_failing_kernel_exits_1(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(tpld, "image_confidence_cpp", broken)
    assert doctor.main(["--ops", "image_confidence"]) == 1
    rows = {r[1]: r for r in _table_rows(capsys.readouterr().out)}
    assert rows["cpp"][4] == "ERROR: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert rows["cpp"][5] == ""


@pytest.mark.parametrize("argv", [["--ops", "ias_pseudo_labels"], ["--ops", ","], ["--repeat", "3"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        doctor.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    if argv[0] == "--ops":
        assert "unknown op" in err and "ias_pseudo_label" in err


def test_table_escapes_pipes():
    row = Row("tpld_vote", "cpp", "cpu", "2x19x33x47", "ERROR", "ValueError: a | b", None)
    assert doctor.table([row]).splitlines()[-1] == \
        "| tpld_vote | cpp | cpu | 2x19x33x47 | ERROR: ValueError: a \\| b |  |"


def test_shapes():
    """Small everywhere, tiny for the Triton interpreter, large on CUDA by default and on the
    CPU only with --large; once per device model."""
    assert doctor.shapes("cpp", CPU, False) == [SMALL]
    assert doctor.shapes("triton", CPU, True) == [TINY]
    assert doctor.shapes("torch", CPU, True) == [SMALL, LARGE]
    assert (LARGE.B, LARGE.C, LARGE.H, LARGE.W) == (8, 19, 1024, 2048)
    assert not doctor.wants_large(CPU, None, set())
    assert doctor.wants_large(CPU, True, set()) and not doctor.wants_large(CPU, False, set())
    assert not doctor.wants_large(CPU, True, {doctor.describe(CPU)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: the CUDA rows and sync-debug mode need one")
def test_on_a_gpu_every_backend_is_ok_under_sync_debug(capsys):
    assert doctor.main(["--no-large"]) == 0, capsys.readouterr().out[-5000:]
    rows = _table_rows(capsys.readouterr().out)
    cuda_rows = [r for r in rows if r[2].startswith("cuda")]
    assert {r[1] for r in cuda_rows} >= {"triton", "torch"}


def test_sync_debug_mode_sets_and_restores_torchs_mode_and_the_environment(monkeypatch):
    """On CUDA (faked here: torch's setter is recorded): "error" turns off the value checks and
    FASTST_CUDA_SYNC_DEBUG (their synchronisations are documented), "warn" counts torch's
    host-sync warnings; both restore everything after."""
    import warnings

    from fastst.ops._selftest_cases import sync_debug_mode

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.delenv("FASTST_CHECK", raising=False)
    monkeypatch.setenv("FASTST_CUDA_SYNC_DEBUG", "1")
    cuda = torch.device("cuda", 0)
    with sync_debug_mode(cuda, "error") as seen:
        assert os.environ["FASTST_CHECK"] == "0" and "FASTST_CUDA_SYNC_DEBUG" not in os.environ
    assert modes == ["error", 0] and seen == []
    assert "FASTST_CHECK" not in os.environ and os.environ["FASTST_CUDA_SYNC_DEBUG"] == "1"
    with sync_debug_mode(cuda, "warn") as seen:
        assert os.environ["FASTST_CUDA_SYNC_DEBUG"] == "1"
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")
    assert modes[2:] == ["warn", 0] and len(seen) == 1
    with sync_debug_mode(CPU, "error"):
        assert "FASTST_CHECK" not in os.environ
    assert len(modes) == 4
