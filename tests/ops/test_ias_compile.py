"""The IAS custom ops under torch.library.opcheck and torch.compile(fullgraph=True).

torch.compile uses the "aot_eager" backend: it traces through the fake kernels exactly as
inductor does, without compiling C++ for the surrounding graph (minutes on 2 cores)."""
import warnings

import pytest
import torch

import fastst.ops as ops
from fastst.ops import _backend
from fastst.ops.ext.ias import ias_select
from fastst.ops.ext.stats import pixel_stats
from helpers import gen

pytestmark = pytest.mark.skipif(_backend.extension() is None, reason="fastst._C is not built")


@pytest.mark.parametrize("official,group", [(True, 2), (True, 3), (False, 1)])
def test_ias_select_opcheck(official, group):
    x = torch.randn(5, 6, 4, 5, generator=gen(30))
    m, a, counts, _ = pixel_stats(x, True, 9, 11, True)
    theta = torch.full((6,), 0.9, dtype=torch.float64)
    torch.library.opcheck(ias_select, (m, a, counts, theta, 0.2, 0.9, 8.0, official, group))


@pytest.mark.parametrize("backend", [None, "cpp"])  # the torch reference is not a compile target
@pytest.mark.parametrize("mode", ["official", "paper"])
def test_ias_pseudo_label_compiles_fullgraph(backend, mode):
    def step(logits, theta):
        labels, theta, _ = ops.ias_pseudo_label(logits, theta, alpha=0.2, mode=mode, from_logits=True,
                                                size=(16, 20), backend=backend)
        return labels, theta

    logits = torch.randn(4, 5, 4, 5, generator=gen(31))
    theta = torch.full((5,), 0.9, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. dynamo warnings about our wrappers
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        got = compiled(logits, theta)
    for g, w in zip(got, step(logits, theta)):
        assert torch.equal(g, w)
