"""What a newcomer meets first (issue 24 item 5), each with its exit status and a phrase of its
output: ``--print-config``; the README's way of shrinking a run; the unknown-key message (close
keys, not every key); ``fastst.data check --dataset synthetic``; a help string for every option of
every command, with examples; progress as log lines without a terminal (stage start and end,
every ``runtime.progress_every`` iterations); training without the tensorboard package."""
import argparse
import re
import sys
from pathlib import Path

import pytest
import yaml

from fastst import experiments, pseudo, train
from fastst import evaluate as evaluate_cli
from fastst.config import ConfigError, load_config
from fastst.data import __main__ as data_cli
from fastst.data.synthetic import ensure_synthetic
from fastst.methods.logs import TENSORBOARD_HINT, open_writer
from fastst.progress import LineProgress, progress_bar, use_bars

README = Path(__file__).resolve().parent.parent / "README.md"


def _exit_code(main, argv):
    """The exit status of a command's ``main(argv)``: its return value or its SystemExit."""
    try:
        return main(argv) or 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)


# --- --print-config and the README's small run -------------------------------------------------

def test_print_config_prints_the_resolved_yaml_without_reading_data(tmp_path, capsys):
    missing = tmp_path / "no_data_here"
    code = _exit_code(train.main, ["--preset", "demo", "--print-config",
                                   f"data.source.root={missing}", "stages.round1.iterations=7",
                                   "runtime.progress_every=5"])
    out = capsys.readouterr().out
    assert code == 0
    config = yaml.safe_load(out)
    assert config == load_config("demo", [f"data.source.root={missing}",
                                          "stages.round1.iterations=7",
                                          "runtime.progress_every=5"])
    assert config["stages"]["round1"]["iterations"] == 7
    assert not missing.exists()  # nothing generated, nothing read


def test_print_config_with_a_bad_key_exits_2(capsys):
    assert _exit_code(train.main, ["--preset", "demo", "--print-config", "seeds=two"]) == 2
    assert "seeds must be a number, got 'two'" in capsys.readouterr().err


def _readme_small_run():
    text = README.read_text()
    match = re.search(r"```bash\n(python -m fastst\.train --preset demo --out runs/tiny.*?)```",
                      text, re.S)
    assert match, "README: the small-run example (runs/tiny) is missing"
    return text, match.group(1).replace("\\\n", " ").split()


def test_readme_says_how_to_shrink_a_run_and_its_example_is_valid():
    text, words = _readme_small_run()
    for phrase in ("--print-config", "stages.<stage>.iterations", "data.synthetic.*"):
        assert phrase in text
    overrides = [w for w in words if "=" in w]
    config = load_config("demo", overrides)
    assert {config["stages"][s]["iterations"] for s in config["pipeline"]} == {4}
    assert config["data"]["synthetic"]["num_train"] == 16


# --- unknown keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("override, suggestion", [
    ("stages.round1.alhpa=0.3", "stages.round1.alpha"),
    ("runtime.thread=1", "runtime.threads"),
    ("data.sythetic.num_train=8", "data.synthetic.num_train"),
])
def test_unknown_key_suggests_close_keys_in_a_short_message(override, suggestion, capsys):
    assert _exit_code(train.main, ["--preset", "demo", override]) == 2
    err = capsys.readouterr().err
    assert f"did you mean {suggestion}" in err and "--print-config" in err
    assert "valid keys" not in err and "runtime.checkpoint_every" not in err
    assert len(err.strip().splitlines()[-1]) < 400  # not the 3.6 kB list of every key


def test_unknown_key_names_at_most_three_and_none_when_nothing_is_close():
    with pytest.raises(ConfigError) as info:
        load_config("demo", ["stages.round1.iteration=3"])
    suggested = re.search(r"did you mean (.*)\?\)", str(info.value)).group(1)
    assert len(re.split(r", | or ", suggested)) == 3
    with pytest.raises(ConfigError) as info:
        load_config("demo", ["zzzz=1"])
    assert "did you mean" not in str(info.value) and "--print-config" in str(info.value)


# --- fastst.data check --dataset synthetic -----------------------------------------------------

@pytest.fixture
def synthetic_root(tmp_path):
    for domain in ("source", "target"):
        ensure_synthetic(tmp_path / "syn", domain, num_train=2, num_val=1, height=32, width=64)
    return tmp_path / "syn"


def _check(argv, capsys):
    code = _exit_code(data_cli.main, ["check", "--dataset", "synthetic", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_data_check_synthetic_passes_a_generated_tree(synthetic_root, capsys):
    code, out = _check(["--root", str(synthetic_root)], capsys)
    assert code == 0 and "6 images, 6 labels" in out and "OK: no faults" in out
    code, out = _check(["--root", str(synthetic_root), "--domain", "target", "--split", "val"],
                       capsys)
    assert code == 0 and "1 images, 1 labels" in out
    code, out = _check(["--root", str(synthetic_root / "source")], capsys)  # one domain's tree
    assert code == 0 and "3 images" in out


def test_data_check_synthetic_reports_faults_and_never_generates(synthetic_root, tmp_path,
                                                                 capsys):
    typo = tmp_path / "TYPO"
    code, out = _check(["--root", str(typo)], capsys)
    assert code == 1 and "no synthetic source data" in out and "fastst.train" in out
    assert not typo.exists()
    image = next((synthetic_root / "source" / "leftImg8bit" / "train").rglob("*.png"))
    image.write_bytes(image.read_bytes()[:200])
    (synthetic_root / "target" / "synthetic.json").unlink()
    code, out = _check(["--root", str(synthetic_root)], capsys)
    assert code == 1 and "unreadable files: 1" in out and image.name in out
    assert "has no synthetic.json" in out
    code, out = _check(["--root", str(synthetic_root), "--split", "test"], capsys)
    assert code == 2 and "unknown synthetic split 'test'" in out
    assert _exit_code(data_cli.main, ["check", "--dataset", "gta5", "--root", str(tmp_path),
                                      "--domain", "source"]) == 2
    assert "--domain applies to --dataset synthetic only" in capsys.readouterr().err


# --- --help ------------------------------------------------------------------------------------

COMMANDS = [("train", train.main, []), ("evaluate", evaluate_cli.main, []),
            ("pseudo", pseudo.main, []), ("experiments", experiments.main, []),
            ("data check", data_cli.main, ["check"])]


@pytest.mark.parametrize("name, main, prefix", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_option_of_every_command_has_help_and_examples(name, main, prefix, monkeypatch,
                                                             capsys):
    parsers = []
    original = argparse.ArgumentParser.__init__

    def recording_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        parsers.append(self)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", recording_init)
    assert _exit_code(main, [*prefix, "--help"]) == 0
    shown = capsys.readouterr().out
    assert "example" in shown and "python -m fastst." in shown
    assert parsers
    for parser in parsers:
        assert parser.description, f"{parser.prog}: no description"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{parser.prog} {action.option_strings or action.dest}: no help"


# --- progress without a terminal ---------------------------------------------------------------

def test_line_progress_prints_every_n_and_at_the_end(capsys):
    with LineProgress(5, desc="round1", unit="it", every=2) as bar:
        for _ in range(5):
            bar.update(1)
            bar.set_postfix({"loss": "0.5"}, refresh=False)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "round1: 2/5 it (40%)", "round1: 4/5 it (80%)", "round1: 5/5 it in 0:00"]
    assert "\r" not in "".join(lines) and lines[-1].endswith("loss=0.5")
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        LineProgress(5, desc="x", every=0)


def test_bars_only_on_a_terminal(monkeypatch):
    assert not use_bars(True)  # pytest captures stdout: not a terminal
    assert isinstance(progress_bar(3, desc="x", bars=True), LineProgress)
    assert isinstance(progress_bar(3, desc="x", bars=False), LineProgress)
    for stream in ("stdout", "stderr"):
        monkeypatch.setattr(getattr(sys, stream), "isatty", lambda: True, raising=False)
    assert use_bars(True) and not use_bars(False)
    assert not isinstance(progress_bar(3, desc="x", bars=True), LineProgress)
    assert not isinstance(progress_bar(3, desc="x", bars=False, show=False), LineProgress)


def test_open_writer_without_tensorboard_is_a_one_line_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    assert open_writer(tmp_path / "tb") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and TENSORBOARD_HINT in err and "pip install" in err


def test_a_small_run_logs_lines_and_trains_without_tensorboard(tmp_path, monkeypatch, capsys):
    """runtime.progress=true, output captured (no terminal), tensorboard not importable: the run
    exits 0 with stage start/end lines, a line every 2 iterations, and the one-line note."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    data, out = tmp_path / "syn", tmp_path / "run"
    argv = ["--preset", "demo", "--out", str(out), "pipeline=[source_only, round1]",
            *(f"data.{role}.root={data}" for role in ("source", "target", "val")),
            "data.synthetic.num_train=8", "data.synthetic.num_val=2",
            "stages.source_only.iterations=4", "stages.round1.iterations=4",
            "runtime.progress=true", "runtime.progress_every=2", "runtime.workers=0",
            "runtime.tensorboard=true", "runtime.checkpoint_every=1000"]
    assert _exit_code(train.main, argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    for line in ("stage source_only (source_only): started", "stage round1 (iast): started",
                 "stage round1: training iterations 1..4"):
        assert line in lines
    assert any(re.fullmatch(r"stage source_only: done, 4 iterations in [\d.]+ s", l) for l in lines)
    assert sum(l.startswith("round1: 2/4 it (50%)") for l in lines) == 1
    assert any(l.startswith("round1 labels: 8/8 img in") for l in lines)
    assert "\r" not in captured.out + captured.err
    assert TENSORBOARD_HINT in captured.err and not (out / "tensorboard").exists()
    assert "summary:" in captured.out and "tensorboard --logdir" not in captured.out
    assert (out / "round1" / "last.pt").is_file()
