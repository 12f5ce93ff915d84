"""Multi-process runs (fastst.distributed) on the CPU with gloo.

One ``torchrun --nproc_per_node 2`` launch (this file run as a script, ``_worker``) does, in two
processes: the IAS pass in both modes (official with a stop and a resume), the class-balanced
pass with voting, an evaluation, a 2-iteration source-only + warm-up + IAST round pipeline (once
straight, once killed in the warm-up and resumed), the CBST/TPLD stages, a pipeline whose batch
the processes cannot share, and the ``fastst.pseudo`` command line. The tests compare what it
wrote with the same calls in this (one) process: labels, thresholds and manifests equal, the
gathered confusion matrix and mIoU equal, the resumed weights equal the straight run's, the
parameters (model and discriminators) equal on both ranks, rank 0 alone writing the files. Fast
unit tests cover the pieces without a process group: the batch shards of BatchStream, how a
pass's batches are dealt, the exact merged class-balanced thresholds and the collectives'
one-process behaviour.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastst import distributed
from fastst.checkpoint import load_checkpoint
from fastst.config import ConfigError, load_config
from fastst.data import build_dataset
from fastst.data.pseudo_label import pseudo_label_path
from fastst.evaluate import evaluate
from fastst.methods.context import RunContext, StopRequested
from fastst.methods.streams import BatchStream
from fastst.models import deeplabv2, load_model
from fastst.ops import ClassBalancedThresholds
from fastst.methods.labelling import cbst_pass, ias_pass, kept_values, thresholds_over_ranks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_fixtures, tiny_overrides  # noqa: E402
from test_pseudo import one_thread  # noqa: E402,F401

WORLD_SIZE = 2
PSEUDO_SIZE = (16, 32)
CBST_SIZE = [16, 32]
VOTE = {"window": 3, "weight": 0.5, "iterations": 2}
CBST_OPTIONS = dict(portion=0.3, scales=(0.9, 1.0), flip=True, subsample=2, batch_size=2,
                    vote=VOTE, mine_portion=0.2)
PIPELINE = ("source_only", "warmup", "round1")
TPLD_STAGES = ("source_only", "phase1_1", "phase2_1")
# Keys of a manifest that may differ between runs: wall-clock time.
TIMING_KEYS = ("seconds",)


# --- what both the worker processes and this process run --------------------------------------

def _context(run_dir, **runtime):
    config = load_config("demo", ["runtime.progress=false", "runtime.workers=0",
                                  "runtime.write_threads=2", "runtime.pseudo_state_every=1"]
                         + [f"runtime.{key}={value}" for key, value in runtime.items()])
    return RunContext(config=config, run_dir=Path(run_dir), seed=0, device=torch.device("cpu"))


def _ias(model, root, out, mode, **runtime):
    dataset = build_dataset("cityscapes", root / "cityscapes", "train", labels=False)
    group = 2 if mode == "official" else 1
    return ias_pass(model, dataset, out, _context(out, **runtime), alpha=0.5, size=PSEUDO_SIZE,
                    mode=mode, group=group, batch_size=2)


def _cbst(model, root, out, **runtime):
    dataset = build_dataset("cityscapes", root / "cityscapes", "train", labels=False,
                            resize=CBST_SIZE)
    return cbst_pass(model, dataset, out, _context(out, **runtime), **CBST_OPTIONS)


def _evaluate(model, root):
    dataset = build_dataset("cityscapes", root / "cityscapes", "train")
    return evaluate(model, dataset, batch_size=2, num_classes=19, progress=False).matrix


def _pipeline_config(root, extra=None, **runtime):
    overrides = tiny_overrides(root, stages=PIPELINE, **{
        "pipeline": f"[{', '.join(PIPELINE)}]", "eval.batch_size": 1,
        "runtime.device": "cpu", "runtime.checkpoint_every": 1,
        **{f"runtime.{key}": value for key, value in runtime.items()}, **(extra or {})})
    return load_config("iast_gta5", overrides)


def _tpld_config(root):
    overrides = tiny_overrides(root, stages=TPLD_STAGES, **{
        "pipeline": f"[{', '.join(TPLD_STAGES)}]", "eval.batch_size": 1,
        "runtime.device": "cpu", "stages.phase1_1.source_portion": 0.5,
        "stages.phase2_1.easy_portion": 0.34})
    return load_config("tpld_gta5", overrides)


def _pseudo_cli(root, checkpoint, out):
    from fastst import pseudo

    return pseudo.main(["--checkpoint", str(checkpoint), "--preset", "iast_gta5", "--out",
                        str(out), "--stage", "round2", f"data.target.root={root / 'cityscapes'}",
                        "stages.round2.pseudo_size=[16, 32]", "runtime.workers=0",
                        "runtime.progress=false", "runtime.threads=1", "runtime.device=cpu"])


def _worker(spec_path):
    """One rank of the torchrun launch: every scenario, outputs under spec["out"]."""
    from fastst import train

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    root, out = Path(spec["root"]), Path(spec["out"])
    dctx = distributed.init_from_env("cpu")
    assert dctx.world_size == WORLD_SIZE and dctx.backend == "gloo"
    model = load_model(spec["checkpoint"]).eval()
    try:
        _ias(model, root, out / "ias_official", "official", stop_after_pseudo_batches=1)
    except StopRequested:
        pass
    _ias(model, root, out / "ias_official", "official")
    _ias(model, root, out / "ias_paper", "paper")
    _cbst(model, root, out / "cbst")
    # The histogram store, stopped after the first step of its second round (2 steps a round,
    # a snapshot every step), then resumed.
    try:
        _cbst(model, root, out / "cbst_histogram", cbst_thresholds="histogram", pseudo_state_every=1,
              stop_after_pseudo_batches=3)
    except StopRequested:
        pass
    _cbst(model, root, out / "cbst_histogram", cbst_thresholds="histogram")
    matrix = _evaluate(model, root)
    if dctx.is_main:
        (out / "confusion.json").write_text(json.dumps(matrix.tolist()))
    try:
        train.run_pipeline(_pipeline_config(root, {"stages.warmup.batch_size": 3}), out / "odd")
    except ConfigError as error:
        (out / f"odd_batch_error{dctx.rank}.txt").write_text(str(error))
    trained = _record_trained_modules()
    train.run_pipeline(_pipeline_config(root), out / "run")
    # Killed in the warm-up (after source-only's 2 iterations and 1 of its own), then resumed.
    try:
        train.run_pipeline(_pipeline_config(root, stop_after_iterations=3), out / "resumed")
    except StopRequested:
        pass
    if dctx.is_main:
        stopped = load_checkpoint(out / "resumed" / "warmup" / "last.pt")
        (out / "stopped.json").write_text(json.dumps(
            {"iteration": stopped["iteration"], "complete": stopped["complete"]}))
    train.run_pipeline(_pipeline_config(root), out / "resumed")
    # The CBST/TPLD stages, from the IAST run's source-only checkpoint.
    train.run_pipeline(_tpld_config(root), out / "tpld", stages=list(TPLD_STAGES[1:]),
                       init=str(out / "run" / "source_only" / "last.pt"))
    # The multi-level warm-up trains the model through its wrapper (model + aux classifier).
    train.run_pipeline(_pipeline_config(root, {"stages.warmup.variant": "multilevel"}), out / "multilevel",
                       stages=["warmup"], init=str(out / "run" / "source_only" / "last.pt"))
    # Parameters are never broadcast after training: equal on both ranks only if DDP (model)
    # and finite_guard (discriminator) averaged the gradients.
    agree = {}
    for stage, model in trained:
        modules = {"model": model, "discriminator": getattr(stage, "discriminator", None)}
        variant = getattr(stage, "variant", "output")
        for what, module in modules.items():
            if module is not None:
                flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
                gathered = dctx.all_gather(flat)
                key = f"{stage.name}/{what}" + ("" if variant == "output" else f" ({variant})")
                agree[key] = agree.get(key, True) and all(torch.equal(gathered[0], g)
                                                          for g in gathered)
    if dctx.is_main:
        (out / "parameters_agree.json").write_text(json.dumps(agree))
    # Last: the command line leaves the process group when it is done.
    assert _pseudo_cli(root, spec["checkpoint"], out / "cli") == 0
    (out / f"rank{dctx.rank}.done").write_text("ok")
    distributed.shutdown()


def _record_trained_modules():
    """[(stage, model), ...] of every stage the pipeline trains from now on in this process."""
    from fastst.methods.trainer import Stage

    trained = []
    wrap = Stage.parallel_model

    def recording(stage, model):
        trained.append((stage, model))
        return wrap(stage, model)

    Stage.parallel_model = recording
    return trained


# --- the launch and its comparisons ------------------------------------------------------------

@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Fixtures, a model checkpoint, the 2-process launch; returns (root, out, model)."""
    root = tmp_path_factory.mktemp("data")
    make_fixtures(root)
    torch.manual_seed(0)
    model = deeplabv2(num_classes=19, backbone="resnet18_w16")
    with torch.no_grad():  # sharper, more varied logits than a fresh head, so thresholds move
        for conv in model.classifier.convs:
            conv.weight.mul_(30)
    model.eval()
    checkpoint = root / "model.pt"
    torch.save({"format": "fastst-checkpoint-v1", "model": model.state_dict(),
                "model_config": model.model_config}, checkpoint)
    out = tmp_path_factory.mktemp("distributed")
    spec = root / "spec.json"
    spec.write_text(json.dumps({"root": str(root), "out": str(out), "checkpoint": str(checkpoint)}))
    paths = [str(Path(__file__).resolve().parents[1])] + \
        [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(paths))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD_SIZE}", str(Path(__file__).resolve()), str(spec)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-8000:]
    for rank in range(WORLD_SIZE):
        assert (out / f"rank{rank}.done").is_file(), f"rank {rank} did not finish"
    return root, out, load_model(checkpoint).eval()




def _without_timing(manifest):
    return {key: value for key, value in manifest.items() if key not in TIMING_KEYS}


def _labels(out, names):
    return np.stack([np.array(Image.open(pseudo_label_path(out / "labels", name)))
                     for name in names])


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_ias_pass_labels_and_thresholds_equal_one_process(launched, tmp_path, mode):
    root, out, model = launched
    single = _ias(model, root, tmp_path / "single", mode)
    spread = json.loads((out / f"ias_{mode}" / "manifest.json").read_text())
    assert _without_timing(spread) == json.loads(json.dumps(_without_timing(single)))
    assert single["theta"] != [0.9] * 19, "the fixture must move the thresholds"
    names = [image["name"] for image in single["images"]]
    np.testing.assert_array_equal(_labels(out / f"ias_{mode}", names),
                                  _labels(tmp_path / "single", names))
    assert 0 < spread["labelled_fraction"] < 1
    assert not (out / f"ias_{mode}" / "state.pt").exists()


def test_cbst_pass_with_voting_equals_one_process(launched, tmp_path):
    root, out, model = launched
    single = _cbst(model, root, tmp_path / "single")
    spread = json.loads((out / "cbst" / "manifest.json").read_text())
    assert _without_timing(spread) == json.loads(json.dumps(_without_timing(single)))
    assert any(value < 1 for value in single["lambdas"])
    assert single["labelled_fraction"] > single["labelled_fraction_confident"] > 0
    names = [image["name"] for image in single["images"]]
    np.testing.assert_array_equal(_labels(out / "cbst", names), _labels(tmp_path / "single", names))


def test_cbst_histogram_store_resumed_equals_one_process(launched, tmp_path):
    """Two ranks, the histogram store, a stop inside pass 1 and a resume: the labels and the
    manifest of one process with the values store."""
    root, out, model = launched
    single = _cbst(model, root, tmp_path / "single", cbst_thresholds="values")
    spread = json.loads((out / "cbst_histogram" / "manifest.json").read_text())
    assert _without_timing(spread) == json.loads(json.dumps(_without_timing(single)))
    names = [image["name"] for image in single["images"]]
    np.testing.assert_array_equal(_labels(out / "cbst_histogram", names),
                                  _labels(tmp_path / "single", names))


def test_gathered_evaluation_equals_one_process(launched):
    root, out, model = launched
    matrix = _evaluate(model, root)
    assert json.loads((out / "confusion.json").read_text()) == matrix.tolist()
    assert int(matrix.sum()) > 0


def test_two_process_pipeline_runs_and_rank_0_writes(launched):
    root, out, _ = launched
    run = out / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert [stage["name"] for stage in summary["stages"]] == list(PIPELINE)
    config = _pipeline_config(root)
    val = build_dataset("cityscapes", root / "cityscapes", "val")
    for name in PIPELINE:
        state = load_checkpoint(run / name / "last.pt")
        assert state["complete"] and state["iteration"] == 2
        # Per-rank RNG states, seeded differently on each rank.
        assert len(state["rng_ranks"]) == WORLD_SIZE
        assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])
        # The mIoU gathered over both ranks is the one-process evaluation of the checkpoint.
        result = json.loads((run / name / "result.json").read_text())
        model = load_model(state).eval()
        confusion = evaluate(model, val, batch_size=1, num_classes=config["num_classes"],
                          progress=False,
                          protocol=config["stages"][name]["eval_protocol"] or "fastst")
        assert result["miou"] == confusion.miou()
    manifest = json.loads((run / "round1" / "pseudo" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["images"]) == 6
    assert len(list((run / "round1" / "pseudo" / "labels").glob("*_pseudo_label.png"))) == 6
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    agree = json.loads((out / "parameters_agree.json").read_text())
    assert agree == {"source_only/model": True, "warmup/model": True,
                     "warmup/discriminator": True, "warmup/model (multilevel)": True,
                     "warmup/discriminator (multilevel)": True, "round1/model": True,
                     "phase1_1/model": True, "phase2_1/model": True,
                     "phase2_1/discriminator": True}
    assert not list(out.rglob("*.tmp"))


def test_a_batch_the_processes_cannot_share_is_refused_before_training(launched):
    _, out, _ = launched
    for rank in range(WORLD_SIZE):
        message = (out / f"odd_batch_error{rank}.txt").read_text()
        assert "stages.warmup.batch_size = 3 is not divisible by the 2 processes" in message
    assert not (out / "odd" / "source_only").exists()


def test_two_process_run_killed_and_resumed_equals_an_uninterrupted_one(launched):
    _, out, _ = launched
    assert json.loads((out / "stopped.json").read_text()) == {"iteration": 1, "complete": False}
    for name in PIPELINE:
        straight = load_checkpoint(out / "run" / name / "last.pt")
        resumed = load_checkpoint(out / "resumed" / name / "last.pt")
        assert resumed["complete"]
        for key, value in straight["model"].items():
            assert torch.equal(value, resumed["model"][key]), (name, key)
        for saved, again in zip(straight["optimizers"][0]["state"].values(),
                                resumed["optimizers"][0]["state"].values()):
            assert torch.equal(saved["exp_avg"], again["exp_avg"]), name


def test_two_process_cbst_and_tpld_stages_run(launched):
    _, out, _ = launched
    run = out / "tpld"
    for name in TPLD_STAGES[1:]:
        state = load_checkpoint(run / name / "last.pt")
        assert state["complete"] and state["iteration"] == 2 and len(state["rng_ranks"]) == 2
        assert json.loads((run / name / "result.json").read_text())["name"] == name
    phase1 = json.loads((run / "phase1_1" / "pseudo" / "manifest.json").read_text())
    assert phase1["complete"] and len(phase1["images"]) == 6
    split = json.loads((run / "phase2_1" / "split.json").read_text())
    assert split["num_easy"] == 2 and split["num_hard"] == 4


def test_pseudo_cli_under_torchrun_equals_one_process(launched, tmp_path):
    root, out, _ = launched
    assert _pseudo_cli(root, root / "model.pt", tmp_path / "cli") == 0
    single = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    spread = json.loads((out / "cli" / "manifest.json").read_text())
    assert _without_timing(spread) == _without_timing(single)
    names = [image["name"] for image in single["images"]]
    np.testing.assert_array_equal(_labels(out / "cli", names), _labels(tmp_path / "cli", names))


# --- the pieces, in one process ------------------------------------------------------------------

class Numbers(torch.utils.data.Dataset):
    """Item i is {"index": i}; records the epochs it was set to."""

    def __init__(self, count):
        self.count = count
        self.epochs = []

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return {"index": index}

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def _indices(stream, start, stop):
    return [batch["index"].tolist() for batch in stream.batches(start=start, stop=stop)]


def test_batch_stream_ranks_share_each_global_batch_and_resume_exactly():
    data = Numbers(23)  # 5 batches of 4 a epoch, 3 items dropped
    whole = _indices(BatchStream(data, 4, seed=7), 0, 12)
    shards = [_indices(BatchStream(data, 4, seed=7, rank=r, world_size=2), 0, 12)
              for r in range(2)]
    assert all(len(batch) == 2 for shard in shards for batch in shard)
    assert [a + b for a, b in zip(*shards)] == whole
    assert len({i for batch in whole[:5] for i in batch}) == 20  # one epoch, no repeats
    resumed = _indices(BatchStream(data, 4, seed=7, rank=1, world_size=2), 7, 12)
    assert resumed == shards[1][7:]
    four = [_indices(BatchStream(data, 4, seed=7, rank=r, world_size=4), 3, 6) for r in range(4)]
    assert [sum(parts, []) for parts in zip(*four)] == whole[3:6]


def test_batch_stream_rejects_a_batch_the_ranks_cannot_share():
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        BatchStream(Numbers(10), 4, seed=0, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank must be"):
        BatchStream(Numbers(10), 4, seed=0, rank=2, world_size=2)


@pytest.mark.parametrize("count,batch,world", [(6, 2, 2), (7, 2, 3), (1, 4, 2), (12, 3, 4)])
def test_pass_steps_deal_the_one_process_batches_in_order(count, batch, world):
    steps = [distributed.DistributedContext(rank=r, world_size=world).pass_steps(count, batch)
             for r in range(world)]
    assert all(s == steps[0] for s in steps)  # every rank computes the same plan
    spans = [span for step in steps[0] for span in step if span[1] > span[0]]
    one_process = [(i, min(i + batch, count)) for i in range(0, count, batch)]
    assert spans == one_process
    for step in steps[0]:
        assert step[0][1] > step[0][0]  # rank 0 always has a batch: no empty step


@pytest.mark.parametrize("subsample", [1, 3])
def test_merged_thresholds_equal_the_accumulator(subsample):
    accumulator = ClassBalancedThresholds(7, subsample=subsample)
    generator = torch.Generator().manual_seed(subsample)
    for sharpness in (1.0, 3.0, 6.0):
        logits = torch.randn(2, 7, 20, 30, generator=generator) * sharpness
        logits[:, 6] -= 20  # class 6 nearly absent: few or no values
        accumulator.update(torch.softmax(logits, 1))
    values, classes = kept_values(accumulator, torch.device("cpu"))
    assert values.numel() > 0
    for portion in (0.0, 0.001, 0.2, 0.5, 0.97, 1.0):
        merged = thresholds_over_ranks(values, classes, 7, portion, distributed.SINGLE)
        assert torch.equal(merged, accumulator.thresholds(portion)), portion
        assert merged.dtype == torch.float32


def test_one_process_context_collectives_are_identities(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = distributed.init_from_env("cpu")
    assert not single.is_distributed and single.is_main and single.backend is None
    assert distributed.current() is distributed.SINGLE
    tensor = torch.arange(4.0)
    assert single.all_gather(tensor)[0] is tensor
    assert single.all_reduce_(tensor) is tensor and tensor.tolist() == [0, 1, 2, 3]
    assert single.broadcast_object({"a": 1}) == {"a": 1}
    assert single.all_gather_object("x") == ["x"]
    assert single.any(True) and not single.any(False)
    assert single.all_gather_batches(None) == []
    single.barrier()


if __name__ == "__main__":
    _worker(sys.argv[1])
