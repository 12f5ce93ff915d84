"""FASTST_CUDA_SYNC_DEBUG=1: every CUDA/Triton launch of fastst.ops is followed by a device
synchronisation whose error names the launch (checked here with a stand-in for
torch.cuda.synchronize; on a GPU the launches themselves run under it)."""
import pytest
import torch

from fastst.ops import _backend

CUDA = torch.device("cuda", 1)


def test_off_by_default_and_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    monkeypatch.delenv(_backend.SYNC_DEBUG_VARIABLE, raising=False)
    _backend.sync_debug(CUDA, "a launch")
    monkeypatch.setenv(_backend.SYNC_DEBUG_VARIABLE, "1")
    _backend.sync_debug(torch.device("cpu"), "a launch")
    assert calls == []
    _backend.sync_debug(CUDA, "a launch")
    assert calls == [CUDA]


def test_a_device_error_names_the_launch(monkeypatch):
    def failing(device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", failing)
    monkeypatch.setenv(_backend.SYNC_DEBUG_VARIABLE, "1")
    with pytest.raises(RuntimeError, match=r"the Triton vote kernel failed on cuda:1 "
                                           r"\(FASTST_CUDA_SYNC_DEBUG=1.*illegal memory access"):
        _backend.sync_debug(CUDA, "the Triton vote kernel")


def test_every_launch_site_is_followed_by_the_check():
    """Each kernel launch in fastst/ops (Triton `kernel[grid](...)`, fastst._C `*_cuda(...)`) has
    a sync_debug call in the same function."""
    import ast
    import inspect

    import fastst.ops.ext.ias as ext_ias
    import fastst.ops.ext.stats as ext_stats
    import fastst.ops.triton.fused_loss as fused_loss
    import fastst.ops.triton.stats as triton_stats
    import fastst.ops.triton.tpld as triton_tpld

    launches = 0
    for module in (ext_ias, ext_stats, fused_loss, triton_stats, triton_tpld):
        tree = ast.parse(inspect.getsource(module))
        for function in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            calls = [n for n in ast.walk(function) if isinstance(n, ast.Call)]
            launched = [c for c in calls if isinstance(c.func, ast.Subscript)
                        or (isinstance(c.func, ast.Attribute) and c.func.attr.endswith("_cuda"))]
            checked = sum(isinstance(c.func, ast.Name) and c.func.id == "sync_debug" for c in calls)
            launches += len(launched)
            assert not launched or checked >= len(launched), (module.__name__, function.name)
    assert launches >= 7
