"""Checkpoint files: atomic writes, clear errors for missing/corrupt/foreign files, the
weights_only fallback, and rebuilding the model with load_model."""
import os
import warnings

import pytest
import torch

from fastst.checkpoint import CHECKPOINT_FORMAT, checkpoint_state, load_checkpoint, save_checkpoint
from fastst.models import deeplabv2, load_model
from helpers import mismatch


class NotATensor:
    """A plain Python object, which torch.load(weights_only=True) refuses to rebuild."""

    def __init__(self, value):
        self.value = value


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = deeplabv2(num_classes=4, backbone="resnet18")
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(1, 2)
    return net.eval()


def _state(model, **extra):
    return checkpoint_state(model, **extra)


def test_save_is_atomic_and_creates_parents(tmp_path, model):
    path = tmp_path / "run" / "stage" / "iter_000400.pt"
    returned = save_checkpoint(path, _state(model, iteration=400, lr=[1e-4, 1e-3]))
    assert returned == path and path.is_file()
    assert os.listdir(path.parent) == ["iter_000400.pt"]
    state = load_checkpoint(path)
    assert state["format"] == CHECKPOINT_FORMAT
    assert state["iteration"] == 400 and state["lr"] == [1e-4, 1e-3]
    assert state["model_config"] == {"num_classes": 4, "backbone": "resnet18"}
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value), key

    save_checkpoint(path, _state(model, iteration=800))
    assert load_checkpoint(path)["iteration"] == 800
    assert os.listdir(path.parent) == ["iter_000400.pt"]


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, model):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(model, iteration=1))
    with pytest.raises(Exception):
        save_checkpoint(path, _state(model, iteration=2, callback=lambda: None))
    assert os.listdir(tmp_path) == ["last.pt"]
    assert load_checkpoint(path)["iteration"] == 1


def test_save_rejects_bad_states(tmp_path, model):
    with pytest.raises(ValueError, match="model_config"):
        save_checkpoint(tmp_path / "a.pt", {"model": model.state_dict()})
    with pytest.raises(ValueError, match="format"):
        save_checkpoint(tmp_path / "a.pt", {**_state(model), "format": "other-v2"})
    with pytest.raises(ValueError, match="model_config"):
        save_checkpoint(tmp_path / "a.pt", {**_state(model), "model_config": {"num_classes": 4}})
    with pytest.raises(TypeError, match="dict"):
        save_checkpoint(tmp_path / "a.pt", [1, 2])
    with pytest.raises(ValueError, match="reserved"):
        checkpoint_state(model, model={})
    assert os.listdir(tmp_path) == []


def test_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "ckpt.pt"
    with pytest.raises(FileNotFoundError, match="ckpt.pt"):
        load_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match="directory"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_gives_clear_error(tmp_path, model, damage):
    path = save_checkpoint(tmp_path / "ckpt.pt", _state(model))
    data = path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2],
               "garbage": bytes(range(256)) * 8,
               "empty": b""}[damage]
    path.write_bytes(damaged)
    with pytest.raises(RuntimeError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "corrupt" in message
    assert "Delete it" in message and "earlier checkpoint" in message


def test_foreign_files_are_rejected(tmp_path, model):
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(ValueError, match=r"plain\.pt is not a fastst checkpoint.*pretrained"):
        load_checkpoint(plain)
    other = tmp_path / "other.pt"
    torch.save({"format": "someone-else", "model": {}}, other)
    with pytest.raises(ValueError, match="'someone-else'"):
        load_checkpoint(other)
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ValueError, match="list"):
        load_checkpoint(listing)


def test_weights_only_fallback_warns(tmp_path, model):
    path = save_checkpoint(tmp_path / "ckpt.pt", _state(model, extra=NotATensor(5)))
    with pytest.warns(UserWarning, match="weights_only=False"):
        state = load_checkpoint(path)
    assert isinstance(state["extra"], NotATensor) and state["extra"].value == 5
    with pytest.raises(RuntimeError, match="ckpt.pt"):
        load_checkpoint(path, weights_only=True)
    theta = torch.full((4,), 0.9, dtype=torch.float64)
    safe = save_checkpoint(tmp_path / "safe.pt", _state(model, theta=theta, note="round 1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(safe)["theta"].dtype == torch.float64


def test_load_model_round_trip_identical_outputs(tmp_path, model):
    x = torch.randn(2, 3, 35, 51, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    path = save_checkpoint(tmp_path / "ckpt.pt", _state(model))
    for source in (path, str(path), load_checkpoint(path)):
        rebuilt = load_model(source).eval()
        assert rebuilt.model_config == model.model_config
        with torch.no_grad():
            actual = rebuilt(x)
        assert torch.equal(actual, expected), mismatch(expected, actual)


def test_load_model_is_strict(model):
    state = _state(model)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("classifier.")}
    with pytest.raises(ValueError, match=r"8 missing keys: classifier\.convs\.0\.weight"):
        load_model(state)
    with pytest.raises(ValueError, match="model_config"):
        load_model({**_state(model), "model_config": {"num_classes": "4", "backbone": "resnet18"}})
    with pytest.raises(ValueError, match="valid backbones"):
        load_model({**_state(model), "model_config": {"num_classes": 4, "backbone": "vgg16"}})
    with pytest.raises(ValueError, match="not a fastst checkpoint"):
        load_model(model.state_dict())


def test_checkpoint_state_unwraps_compiled_model(model):
    compiled = torch.compile(model)
    state = checkpoint_state(compiled)
    assert set(state["model"]) == set(model.state_dict())
    assert state["model_config"] == model.model_config
