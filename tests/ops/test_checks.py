"""Argument validators live in fastst/ops/_checks.py only: no other module of fastst.ops defines a
check_*/raise_on_* helper, and the moved helpers keep their errors."""
import ast
from pathlib import Path

import pytest
import torch

from fastst.ops import _checks

OPS = Path(_checks.__file__).resolve().parent


def test_validators_are_defined_only_in_checks():
    stray = []
    for path in OPS.rglob("*.py"):
        if path.name == "_checks.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_").startswith(("check", "raise_on")):
                stray.append(f"{path.relative_to(OPS)}:{node.lineno} {node.name}")
    assert not stray, f"move these validators into fastst/ops/_checks.py: {stray}"


def test_moved_validators_keep_their_errors():
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        _checks.check_int("window", 0, 1)
    with pytest.raises(ValueError, match=r"lambdas must have shape \(3,\)"):
        _checks.check_lambdas(torch.ones(2), 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="theta contains NaN"):
        _checks.check_theta(torch.tensor([0.5, float("nan")], dtype=torch.float64), 2, torch.device("cpu"))
    assert torch.equal(_checks.check_theta(None, 2, torch.device("cpu")), torch.full((2,), 0.9, dtype=torch.float64))
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        _checks.check_triton_device("fastst::x", torch.device("cpu"), interpreted=False)
    _checks.check_triton_device("fastst::x", torch.device("cpu"), interpreted=True)
