"""torch.library.opcheck on every fastst custom op: the ops registered under the "fastst"
namespace are listed from the dispatcher, and each must have a case here (a new op without one
fails test_every_custom_op_has_a_case). Triton ops run in its interpreter without a GPU."""
import importlib
import pkgutil

import pytest
import torch

import fastst.ops
import fastst.ops.triton
from fastst.ops import _backend
from helpers import gen, probs

pytestmark = pytest.mark.skipif(_backend.extension() is None, reason="fastst._C is not built")
TRITON = "triton" in _backend.available_backends()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _registered() -> list[str]:
    """Names of the fastst:: custom ops, after importing every module of fastst.ops."""
    prefixes = ["fastst.ops.", "fastst.ops.ext."] + (["fastst.ops.triton."] if TRITON else [])
    for info in pkgutil.walk_packages(fastst.ops.__path__, "fastst.ops."):
        if any(info.name.rsplit(".", 1)[0] + "." == p for p in prefixes):
            importlib.import_module(info.name)
    return sorted(n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("fastst::"))


def _lambdas(C: int, device: str = "cpu") -> torch.Tensor:
    return (torch.rand(C, generator=gen(41)) * 0.6 + 0.3).to(device)


def _stats_args(device):
    return probs(2, 5, 3, 4).to(device), False, 3, 4, True


def _ias_select_args(device):
    m, a, counts, _ = torch.ops.fastst.pixel_stats(torch.randn(2, 6, 4, 5, generator=gen(30)), True, 9, 11, True)
    return m, a, counts, torch.full((6,), 0.9, dtype=torch.float64), 0.2, 0.9, 8.0, True, 2


def _fused_loss_args(device):  # region loss: (logits, target, lambda_kld, lambda_ent, ignore, H, W, ...)
    g = gen(13)
    x = (torch.randn(1, 3, 2, 3, generator=g) * 3).to(device).requires_grad_(True)
    t = torch.randint(0, 3, (1, 4, 5), generator=g)
    t[0, 0, :2] = 255
    return x, t.to(device), 0.1, 3.0, 255, 4, 5, True, True, True


def _st_loss_args(device):  # mode 1 (bootstrapping) with a soft target, as ops.bootstrap_loss calls it
    x, t = _fused_loss_args(device)[:2]
    soft = torch.softmax(torch.randn(1, 3, 4, 5, generator=gen(14)), 1).to(device)
    return x, t, _lambdas(3, device), soft, None, 1, 0.95, 0.0, 0.0, True, 255, 4, 5, True, True


def _label_args(device):
    return probs(2, 5, 6, 7, seed=17).to(device), _lambdas(5, device)


def _vote_args(device):
    return (*_label_args(device), 5, 0.7, 2)


def _cbst_collect_args(device):
    m, a, _, _ = torch.ops.fastst.pixel_stats(probs(1, 3, 6, 7, seed=5), False, 6, 7, True)
    a8 = a.to(torch.uint8)
    total = int((-(-torch.bincount(a.flatten().long(), minlength=3) // 4)).sum())
    return m, a8, 3, 4, total


def _cbst_thresholds_args(device):
    values, classes = torch.ops.fastst.cbst_collect_cpp(*_cbst_collect_args(device))
    return values, classes, 3, 0.2


# op name -> (builder of its arguments, device it runs on)
CASES = {
    "pixel_stats": (_stats_args, "cpu"),
    "ias_select": (_ias_select_args, "cpu"),
    "region_loss_cpp": (_fused_loss_args, "cpu"),
    "st_loss_cpp": (_st_loss_args, "cpu"),
    "cbst_label_cpp": (_label_args, "cpu"),
    "image_confidence_cpp": (_label_args, "cpu"),
    "tpld_vote_cpp": (_vote_args, "cpu"),
    "cbst_collect_cpp": (_cbst_collect_args, "cpu"),
    "cbst_thresholds_cpp": (_cbst_thresholds_args, "cpu"),
    "pixel_stats_triton": (_stats_args, DEVICE),
    "region_loss_triton": (_fused_loss_args, DEVICE),
    "st_loss_triton": (_st_loss_args, DEVICE),
    "cbst_label_triton": (_label_args, DEVICE),
    "image_confidence_triton": (_label_args, DEVICE),
    "tpld_vote_triton": (_vote_args, DEVICE),
}


def test_every_custom_op_has_a_case():
    registered = _registered()
    missing = sorted(set(registered) - set(CASES))
    assert not missing, f"custom ops without an opcheck case in {__file__}: {missing}"
    want = {n for n in CASES if TRITON or not n.endswith("_triton")}
    assert want <= set(registered), f"cases for ops that are not registered: {sorted(want - set(registered))}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    if name.endswith("_triton") and not TRITON:
        pytest.skip("Triton cannot run here")
    _registered()
    build, device = CASES[name]
    torch.library.opcheck(getattr(torch.ops.fastst, name).default, build(device))
