"""ConfusionMatrix: counts against hand-computed matrices, ignore handling, NaN classes, the
16/13-class subsets of SYNTHIA, the table, merging and the distributed all-reduce."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fastst.data.ids import CLASS_NAMES, CLASSES_13, CLASSES_16
from fastst.metrics import ConfusionMatrix


def test_hand_computed_matrix_with_ignored_pixels_and_misses():
    # target 255 and 7 (>= C) are ignored whatever the prediction; a prediction outside [0, 4)
    # (-1, 9) at a labelled pixel is a miss of the true class, as in cityscapesScripts'
    # evalPixelLevelSemanticLabeling (FN = the whole row, predictions of unscored ids included).
    target = torch.tensor([[0, 0, 1, 1, 2], [2, 2, 255, 7, 0]])
    pred = torch.tensor([[0, 1, 1, 1, 0], [2, 9, 0, 0, -1]])
    cm = ConfusionMatrix(4).update(pred, target)
    expected = torch.tensor([[1, 1, 0, 0],
                             [0, 2, 0, 0],
                             [1, 0, 1, 0],
                             [0, 0, 0, 0]])
    assert torch.equal(cm.matrix, expected)
    assert cm.missed.tolist() == [1, 0, 1, 0]      # the -1 on a class-0 pixel, the 9 on class 2
    assert cm.matrix.dtype == cm.missed.dtype == torch.int64
    iou = cm.iou()
    assert iou.dtype == torch.float64
    # class 0: 1 / (TP 1 + FP 1 + FN 1 + miss 1); class 1: 2 / (2 + 3 - 2);
    # class 2: 1 / (TP 1 + FN 1 + miss 1); class 3 absent
    assert iou[:3].tolist() == pytest.approx([1 / 4, 2 / 3, 1 / 3])
    assert math.isnan(iou[3].item())
    assert cm.miou() == pytest.approx((1 / 4 + 2 / 3 + 1 / 3) / 3)
    assert cm.miou([1, 2]) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert math.isnan(cm.miou([3]))


def test_a_class_only_missed_has_zero_iou_and_reset_clears_misses():
    cm = ConfusionMatrix(3).update(torch.tensor([200, 200, 1]), torch.tensor([2, 2, 1]))
    assert cm.matrix.sum() == 1 and cm.missed.tolist() == [0, 0, 2]
    assert cm.iou()[2].item() == 0.0             # labelled but never predicted in range: 0
    assert cm.iou()[1].item() == 1.0 and math.isnan(cm.iou()[0].item())
    cm.reset()
    assert cm.missed.sum() == 0 and math.isnan(cm.iou()[2].item())


def test_class_only_predicted_counts_with_zero_iou():
    cm = ConfusionMatrix(3).update(torch.tensor([2, 2, 0]), torch.tensor([0, 0, 0]))
    assert cm.iou().tolist()[0] == pytest.approx(1 / 3)
    assert cm.iou().tolist()[2] == 0.0          # predicted but never true: 0, not NaN
    assert math.isnan(cm.iou()[1].item())


def test_accumulates_over_updates_and_dtypes_match_numpy():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 19, (3, 17, 23))
    target[rng.random(target.shape) < 0.1] = 255
    pred = rng.integers(0, 19, (3, 17, 23))
    cm = ConfusionMatrix(19)
    cm.update(torch.from_numpy(pred[:2]).to(torch.uint8),
              torch.from_numpy(target[:2]).to(torch.uint8))
    cm.update(torch.from_numpy(pred[2]), torch.from_numpy(target[2]).int())
    valid = target != 255
    expected = np.bincount(target[valid] * 19 + pred[valid], minlength=19 * 19).reshape(19, 19)
    assert np.array_equal(cm.matrix.numpy(), expected)
    assert cm.reset().matrix.sum().item() == 0


def test_miou_16_and_13_are_subsets_of_the_19_class_matrix():
    rng = np.random.default_rng(1)
    target = torch.from_numpy(rng.integers(0, 19, 4000))
    pred = torch.where(torch.from_numpy(rng.random(4000) < 0.6), target,
                       torch.from_numpy(rng.integers(0, 19, 4000)))
    target[target == 16] = 255                  # train absent from the ground truth ...
    pred[pred == 16] = 0                        # ... and from the prediction: NaN
    cm = ConfusionMatrix(19).update(pred, target)
    iou = cm.iou().numpy()
    assert np.isnan(iou[16]) and np.isfinite(np.delete(iou, 16)).all()
    assert cm.miou() == pytest.approx(np.nanmean(iou))
    assert cm.miou(CLASSES_16) == pytest.approx(np.mean(iou[list(CLASSES_16)]))
    assert cm.miou(CLASSES_13) == pytest.approx(np.mean(iou[list(CLASSES_13)]))
    assert cm.miou(CLASSES_13) != pytest.approx(cm.miou(CLASSES_16))
    summary = cm.summary()
    assert summary["miou16"] == cm.miou(CLASSES_16) and summary["miou13"] == cm.miou(CLASSES_13)

    table = cm.table()
    lines = table.splitlines()
    assert len(lines) == 1 + 19 + 3
    assert lines[1].startswith("road") and lines[17].startswith("train") and "n/a" in lines[17]
    assert lines[-3].split() == ["mIoU-19", f"{100 * cm.miou():.2f}"]
    assert lines[-1].split() == ["mIoU-13", f"{100 * cm.miou(CLASSES_13):.2f}"]
    assert [line.split()[0] for line in lines[1:3]] == [CLASS_NAMES[0], CLASS_NAMES[1]]


def test_table_for_other_class_counts_and_names():
    cm = ConfusionMatrix(2).update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    table = cm.table(class_names=["bg", "fg"])
    assert table.splitlines()[1].split() == ["bg", "50.00"]
    assert table.splitlines()[-1].split() == ["mIoU", "50.00"]
    with pytest.raises(ValueError, match="names"):
        cm.table(class_names=["only one"])


def test_bad_input_is_rejected():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="same shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        cm.update(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        cm.miou([0, 3])
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)


def test_merge_and_all_reduce(tmp_path):
    a = ConfusionMatrix(3).update(torch.tensor([0, 1, 5]), torch.tensor([0, 2, 1]))
    b = ConfusionMatrix(3).update(torch.tensor([2, 2, -3]), torch.tensor([2, 2, 1]))
    merged = a.merge(b).matrix.clone()
    assert merged.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 2]]
    assert a.missed.tolist() == [0, 2, 0]
    assert torch.equal(a.all_reduce().matrix, merged)   # no process group: no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        assert torch.equal(a.all_reduce().matrix, merged)   # one process: the sum is itself
        assert a.missed.tolist() == [0, 2, 0]
    finally:
        dist.destroy_process_group()
