"""`python -m fastst.data check` and fastst.data.check.check_dataset: planted faults (image
without label, label without image, ids outside the id space, corrupt files) are reported by
path, warnings do not count as faults, and the exit status says whether the data is clean."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fastst.data.__main__ import main
from fastst.data.check import check_dataset

H, W = 8, 16
REPO = Path(__file__).resolve().parents[1]


def save_png(path, array):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_gta5(root, n=3, seed=0):
    """A clean GTA5 tree: ids 0 (valid, ignored), 7, 26 and 33 only."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        save_png(root / "images" / f"{i:05d}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        save_png(root / "labels" / f"{i:05d}.png", rng.choice(np.array([0, 7, 26, 33], np.uint8), (H, W)))


def plant_gta5_faults(root):
    """Image 00001 loses its label, an orphan label appears, 00002 gets 3 pixels of id 200
    and 1 of id 34, and image 00000 is truncated."""
    (root / "labels" / "00001.png").unlink()
    save_png(root / "labels" / "99999.png", np.full((H, W), 7, np.uint8))
    label = np.asarray(Image.open(root / "labels" / "00002.png")).copy()
    label[0, :3], label[1, 0] = 200, 34
    save_png(root / "labels" / "00002.png", label)
    image = root / "images" / "00000.png"
    image.write_bytes(image.read_bytes()[:70])


def test_clean_gta5_has_no_faults(tmp_path, capsys):
    make_gta5(tmp_path)
    report = check_dataset("gta5", tmp_path)
    assert report.ok and report.num_faults == 0
    assert (report.num_images, report.num_labels) == (3, 3)
    assert main(["check", "--dataset", "gta5", "--root", str(tmp_path)]) == 0
    assert "OK: no faults" in capsys.readouterr().out


def test_planted_gta5_faults_are_reported_by_path(tmp_path):
    make_gta5(tmp_path)
    plant_gta5_faults(tmp_path)
    report = check_dataset("gta5", tmp_path, "train", workers=2)
    assert report.images_without_label == [tmp_path / "images" / "00001.png"]
    assert report.labels_without_image == [tmp_path / "labels" / "99999.png"]
    assert [path for path, _ in report.unreadable] == [tmp_path / "images" / "00000.png"]
    assert sorted(report.unknown_ids) == [34, 200]
    assert (report.unknown_ids[200].pixels, report.unknown_ids[200].files) == (3, 1)
    assert report.unknown_ids[34].pixels == 1
    assert report.unknown_ids[200].example == tmp_path / "labels" / "00002.png"
    assert report.num_faults == 5 and not report.ok
    assert "id 200: 3 pixel(s) in 1 file(s)" in report.summary()


def test_check_command_exit_status_and_output(tmp_path):
    make_gta5(tmp_path)
    plant_gta5_faults(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "fastst.data", "check", "--dataset", "gta5",
                             "--root", str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 1, result.stderr
    for planted in ("images/00001.png", "labels/99999.png", "images/00000.png", "id 200", "FAULTS: 5"):
        assert planted in result.stdout, result.stdout


def test_size_mismatch_is_a_warning_not_a_fault(tmp_path):
    make_gta5(tmp_path, n=2)
    save_png(tmp_path / "labels" / "00001.png", np.full((H + 2, W), 7, np.uint8))
    report = check_dataset("gta5", tmp_path)
    assert report.ok
    assert [(m[0].name, m[2], m[3]) for m in report.size_mismatches] == [("00001.png", (H, W), (H + 2, W))]


def test_cityscapes_checks_the_label_file_the_loader_uses(tmp_path):
    rng = np.random.default_rng(1)
    for split, city in (("train", "aachen"), ("train", "bochum"), ("val", "lindau")):
        base = f"{city}_000000_000019"
        save_png(tmp_path / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png",
                 rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        save_png(tmp_path / "gtFine" / split / city / f"{base}_gtFine_labelIds.png",
                 np.full((H, W), 7, np.uint8))
    # aachen's labelTrainIds (preferred over its labelIds) holds 19, which is no train id.
    train_ids = np.full((H, W), 255, np.uint8)
    train_ids[2, 2] = 19
    save_png(tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png", train_ids)
    report = check_dataset("cityscapes", tmp_path)
    assert report.splits == ["train", "val"] and report.num_images == 3
    assert list(report.unknown_ids) == [19]
    assert report.unknown_ids[19].example.name == "aachen_000000_000019_gtFine_labelTrainIds.png"
    save_png(tmp_path / "leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit.png",
             rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    test = check_dataset("cityscapes", tmp_path, "test")
    assert test.ok and test.unlabelled_splits == ["test"] and test.num_labels == 0


def test_synthia_16bit_ids_and_missing_root(tmp_path):
    rng = np.random.default_rng(2)
    for i, ids in enumerate([np.array([3, 22], np.uint16), np.array([3, 300], np.uint16)]):
        save_png(tmp_path / "RGB" / f"{i:07d}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        save_png(tmp_path / "GT" / "LABELS" / f"{i:07d}.png", rng.choice(ids, (H, W)))
    report = check_dataset("synthia", tmp_path)
    assert list(report.unknown_ids) == [300] and report.unknown_ids[300].example.name == "0000001.png"
    missing = check_dataset("synthia", tmp_path / "absent")
    assert not missing.ok and "does not exist" in missing.errors[0] and "GT/LABELS" in missing.errors[0]
