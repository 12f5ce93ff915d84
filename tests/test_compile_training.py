"""runtime.compile: a stage's training step through torch.compile (inductor on the CPU here; on a
GPU "reduce-overhead" adds CUDA graphs, which this machine cannot run) trains the same model as
eager execution, and checkpoints keep the plain model's parameter names."""
import pytest
import torch

from fastst import train
from fastst.checkpoint import load_checkpoint
from fastst.config import ConfigError, load_config
from test_train import fixture_root, tiny_overrides  # noqa: F401  (fixture)

STAGES = ("source_only",)


def _run(root, out, iterations=2, **runtime):
    extra = {"pipeline": "[source_only]", **{f"runtime.{key}": value for key, value in runtime.items()}}
    config = load_config("iast_gta5", tiny_overrides(root, iterations=iterations, stages=STAGES,
                                                     **extra))
    train.run_pipeline(config, out)
    return load_checkpoint(out / "source_only" / "last.pt")


def test_compiled_step_trains_the_same_weights_as_eager(fixture_root, tmp_path):  # noqa: F811
    # The gradients: Adam's first moments after one step (0.1 x the gradient) agree with eager's
    # to float32 reordering, and are not all zero. (After a second step they need not: Adam moves
    # a weight whose first gradient is ~0 by +-lr on the sign of float noise, and the second
    # gradient of a tiny ResNet on 32x64 crops amplifies that by several percent in layer4.)
    eager = _run(fixture_root, tmp_path / "eager", iterations=1)
    compiled = _run(fixture_root, tmp_path / "compiled", iterations=1, compile="default")
    assert compiled["complete"] and compiled["iteration"] == 1
    assert list(compiled["model"]) == list(eager["model"])  # no "_orig_mod." prefixes
    eager_state = eager["optimizers"][0]["state"]
    compiled_state = compiled["optimizers"][0]["state"]
    assert eager_state.keys() == compiled_state.keys() and eager_state
    moments = [(compiled_state[k]["exp_avg"], eager_state[k]["exp_avg"]) for k in eager_state]
    assert any(float(want.abs().max()) > 0 for _, want in moments)
    for got, want in moments:
        assert float((got - want).abs().max()) <= 1e-3 * float(want.abs().max()) + 1e-12
    # The weights: Adam normalises each update to about lr, so gradients that differ in the last
    # bits can move a weight whose gradient is ~0 by a fraction of lr; well below one step.
    for name, value in eager["model"].items():
        got = compiled["model"][name]
        if value.is_floating_point():
            assert float((got - value).abs().max()) <= 1e-4, name
        else:
            assert torch.equal(got, value), name


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ConfigError, match="runtime.compile"):
        load_config("demo", ["runtime.compile=fast"])
