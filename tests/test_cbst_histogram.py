"""The bounded-memory histogram store of ClassBalancedThresholds (docs/ops.md §5; fastst.ops.radix_select)
against a NumPy sort and the values store, its refinement protocol, merging over processes, and the
class-balanced pass run with it (same labels, resumable inside pass 1)."""
import math

import numpy as np
import pytest
import torch

from fastst.methods.labelling import VALUES_STORE_LIMIT, threshold_store
from fastst.methods.labelling import class_balanced as cbst_pass_module
from fastst.config import ConfigError, load_config
from fastst.methods.context import StopRequested
from fastst.ops import ClassBalancedThresholds, radix_select
from test_cbst_pass import context, read_labels, run
from test_cbst_pass import dataset, model  # noqa: F401  (fixtures)
from test_pseudo import one_thread  # noqa: F401

BACKENDS = ["cpp", "torch"]


def numpy_thresholds(batches, num_classes, subsample, portion):
    """docs/ops.md §5 written out: per image and class the values at positions 0, s, 2s, ... in row-major
    order, per class sorted descending, lambda = sorted[floor(len * portion) - 1] or 1."""
    kept = [[] for _ in range(num_classes)]
    for probs in batches:
        p = probs.float().numpy()
        m, a = p.max(1), p.argmax(1)
        for b in range(p.shape[0]):
            mb, ab = m[b].reshape(-1), a[b].reshape(-1)
            for c in range(num_classes):
                kept[c].extend(mb[ab == c][::subsample].tolist())
    out = []
    for values in kept:
        n = int(math.floor(len(values) * portion))
        out.append(sorted(values, reverse=True)[n - 1] if n > 0 else 1.0)
    return torch.tensor(out, dtype=torch.float32)


def crafted(batch, num_classes, height, width, seed):
    """Probabilities whose maxima include ties, 0.0, -0.0, 1.0 and values one ulp apart across a
    16-bit bin edge; every class but the last two is present (empty classes get lambda 1)."""
    g = torch.Generator().manual_seed(seed)
    present = max(1, num_classes - 2)
    cls = torch.randint(0, present, (batch, height, width), generator=g)
    edge = torch.tensor([0x3F400000 - 1, 0x3F400000, 0x3F400000 + 1], dtype=torch.int32).view(torch.float32)
    pool = torch.cat([torch.tensor([0.0, 1.0, 0.5, 0.5, 0.25]), edge, torch.rand(24, generator=g)])
    value = pool[torch.randint(0, pool.numel(), (batch, height, width), generator=g)]
    probs = torch.rand(batch, num_classes, height, width, generator=g) * value.unsqueeze(1) * 0.99
    probs.scatter_(1, cls.unsqueeze(1), value.unsqueeze(1))
    probs[0, :, 0, 0] = -0.0  # every channel -0.0: max +0.0 at class 0
    return probs


def feed(store, batches, num_classes, subsample, portion, backend, refine_order=None):
    acc = ClassBalancedThresholds(num_classes, subsample, backend=backend, store=store)
    for probs in batches:
        acc.update(probs)
    if store == "histogram":
        acc.begin_refinement(portion)
        for probs in (batches if refine_order is None else refine_order):
            acc.update(probs)
    return acc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("subsample", [1, 2, 4])
@pytest.mark.parametrize("portion", [0.0, 0.2, 0.5, 1.0])
def test_histogram_store_equals_numpy_sort_and_the_values_store(backend, subsample, portion):
    C = 6
    batches = [crafted(2, C, 9, 13, seed) for seed in range(3)]
    want = numpy_thresholds(batches, C, subsample, portion)
    values = feed("values", batches, C, subsample, portion, backend)
    histogram = feed("histogram", batches, C, subsample, portion, backend,
                     refine_order=[torch.cat(batches[1:]), batches[0]])  # other batching and order
    assert torch.equal(values.thresholds(portion), want)
    assert torch.equal(histogram.thresholds(portion), want)
    assert histogram.thresholds(portion)[-2:].tolist() == [1.0, 1.0]  # the empty classes
    assert torch.equal(histogram.class_counts(), values.class_counts())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_classes", [2, 150])
def test_many_and_two_classes_bf16_and_non_contiguous(backend, num_classes):
    g = torch.Generator().manual_seed(num_classes)
    base = torch.softmax(torch.randn(2, num_classes, 11, 17, generator=g) * 4, 1)
    batches = [base.to(torch.bfloat16), base.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :, ::2]]
    want = numpy_thresholds(batches, num_classes, 2, 0.3)
    assert torch.equal(feed("histogram", batches, num_classes, 2, 0.3, backend).thresholds(0.3), want)


def test_two_accumulators_reduced_equal_one_fed_everything():
    """What torchrun does with dctx.all_reduce_: each process feeds its images, the histograms
    are summed before each round is read."""
    C, portion = 5, 0.4
    batches = [crafted(2, C, 8, 8, seed) for seed in range(4)]
    whole = feed("histogram", batches, C, 1, portion, "cpp").thresholds(portion)
    halves = [ClassBalancedThresholds(C, 1, store="histogram") for _ in range(2)]
    for i, probs in enumerate(batches):
        halves[i % 2].update(probs)

    highs = [h.state_dict()["high"] for h in halves]
    for index, h in enumerate(halves):
        h.begin_refinement(portion, lambda t, i=index: t + highs[1 - i])
    for i, probs in enumerate(batches):
        halves[i % 2].update(probs)
    parts = [h.state_dict()["refining"] for h in halves]
    lows = [(part["low"], part["kept"], part["at_or_above"]) for part in parts]  # reduce's call order
    for index, h in enumerate(halves):
        order = iter(lows[1 - index])
        assert torch.equal(h.thresholds(portion, lambda t, o=order: t + next(o)), whole)


def test_protocol_errors_say_what_to_do():
    C = 4
    probs = crafted(1, C, 5, 5, 0)
    acc = ClassBalancedThresholds(C, store="histogram")
    assert acc.needs_refinement and not ClassBalancedThresholds(C).needs_refinement
    acc.update(probs)
    with pytest.raises(RuntimeError, match="begin_refinement"):
        acc.thresholds(0.5)
    with pytest.raises(RuntimeError, match="store='values'"):
        acc.kept()
    acc.begin_refinement(0.5)
    with pytest.raises(RuntimeError, match="already begun"):
        acc.begin_refinement(0.5)
    acc.update(probs)
    with pytest.raises(ValueError, match="portion=0.5"):
        acc.thresholds(0.2)
    acc.update(probs)  # one image twice: not what the first pass saw
    with pytest.raises(ValueError, match="other probabilities"):
        acc.thresholds(0.5)
    changed = ClassBalancedThresholds(C, store="histogram")
    changed.update(probs)
    changed.begin_refinement(0.5)
    changed.update(crafted(1, C, 5, 5, 1))  # same pixel count, other values
    with pytest.raises(ValueError, match="deterministic"):
        changed.thresholds(0.5)
    with pytest.raises(ValueError, match="store must be one of"):
        ClassBalancedThresholds(C, store="disk")
    with pytest.raises(RuntimeError, match="no second pass"):
        ClassBalancedThresholds(C).begin_refinement(0.5)


def test_state_dict_round_trip_in_each_round():
    C, portion = 5, 0.3
    batches = [crafted(2, C, 6, 7, seed) for seed in range(4)]
    want = feed("histogram", batches, C, 2, portion, "cpp").thresholds(portion)
    acc = ClassBalancedThresholds(C, 2, store="histogram")
    for probs in batches[:2]:
        acc.update(probs)
    acc2 = ClassBalancedThresholds(C, 2, store="histogram")
    acc2.load_state_dict(acc.state_dict())
    for probs in batches[2:]:
        acc2.update(probs)
    acc2.begin_refinement(portion)
    acc2.update(batches[0])
    acc3 = ClassBalancedThresholds(C, 2, store="histogram")
    acc3.load_state_dict(acc2.state_dict())
    for probs in batches[1:]:
        acc3.update(probs)
    assert torch.equal(acc3.thresholds(portion), want)
    assert torch.equal(acc3.class_counts(), feed("values", batches, C, 2, portion, "cpp").class_counts())
    with pytest.raises(ValueError, match="subsample"):
        ClassBalancedThresholds(C, 3, store="histogram").load_state_dict(acc.state_dict())


def test_auto_store_switches_at_a_gibibyte_of_values():
    settings = {"size": [1024, 2048], "subsample": 4, "num_images": 2975}
    assert threshold_store("auto", settings) == "histogram"  # ~7.8 GB of values
    assert threshold_store("auto", {**settings, "num_images": 10}) == "values"
    per_image = 5 * 1024 * 2048 / 4
    limit_images = int(VALUES_STORE_LIMIT // per_image)
    assert threshold_store("auto", {**settings, "num_images": limit_images}) == "values"
    assert threshold_store("auto", {**settings, "num_images": limit_images + 1}) == "histogram"
    assert threshold_store("values", settings) == "values"


def test_config_rejects_an_unknown_store():
    with pytest.raises(ConfigError, match="runtime.cbst_thresholds"):
        load_config("demo", ["runtime.cbst_thresholds=disk"])


def _without_seconds(manifest):
    return {k: v for k, v in manifest.items() if k != "seconds"}


def test_pass_with_the_histogram_store_equals_the_values_store(model, dataset, tmp_path):  # noqa: F811
    values = run(model, dataset, tmp_path / "values", context(tmp_path, cbst_thresholds="values"))
    histogram = run(model, dataset, tmp_path / "histogram", context(tmp_path, cbst_thresholds="histogram"))
    assert _without_seconds(histogram) == _without_seconds(values)
    names = [image["name"] for image in values["images"]]
    np.testing.assert_array_equal(read_labels(tmp_path / "histogram", names),
                                  read_labels(tmp_path / "values", names))


@pytest.mark.parametrize("stop_after", [3, 5])  # inside round 1 / inside round 2 (4 batches each)
def test_a_stop_inside_pass_one_resumes_there(model, dataset, tmp_path, monkeypatch, stop_after):  # noqa: F811
    straight = run(model, dataset, tmp_path / "straight", context(tmp_path, cbst_thresholds="histogram"))
    killed = context(tmp_path, cbst_thresholds="histogram", pseudo_state_every=2,
                     stop_after_pseudo_batches=stop_after)
    with pytest.raises(StopRequested):
        run(model, dataset, tmp_path / "resumed", killed)
    state = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    saved_round = 0 if stop_after == 3 else 1
    assert state["thresholds"]["round"] == saved_round
    assert state["thresholds"]["done"] == (4 if stop_after == 3 else 0)

    fed = []
    original = cbst_pass_module.ClassBalancedThresholds.update
    monkeypatch.setattr(cbst_pass_module.ClassBalancedThresholds, "update",
                        lambda self, probs: (fed.append(probs.shape[0]), original(self, probs))[1])
    resumed = run(model, dataset, tmp_path / "resumed", context(tmp_path, cbst_thresholds="histogram"))
    # Only what the snapshot did not hold is fed again: 8 images a round.
    assert sum(fed) == ((8 - 4) + 8 if stop_after == 3 else 8)
    assert _without_seconds(resumed) == _without_seconds(straight)
    names = [image["name"] for image in straight["images"]]
    np.testing.assert_array_equal(read_labels(tmp_path / "resumed", names),
                                  read_labels(tmp_path / "straight", names))
