"""The Python loss-mode codes (fastst/ops/loss_modes.py) mirror csrc/fastst/kernels/loss_modes.h,
and every module that passes a mode takes them from there."""
import re
from pathlib import Path

import fastst.ops.loss_modes as modes

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "csrc" / "fastst" / "kernels" / "loss_modes.h"


def _header_codes() -> dict[str, int]:
    body = re.search(r"enum\s+StLossMode\s*:\s*int\s*\{(.*?)\}", HEADER.read_text(), re.S).group(1)
    return {name: int(value) for name, value in re.findall(r"k(\w+)\s*=\s*(\d+)", body)}


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).upper()


def test_python_mirror_equals_header():
    header = {_snake(name): code for name, code in _header_codes().items()}
    python = {name: value for name, value in vars(modes).items() if name.isupper()}
    assert header == python, f"{HEADER} and fastst/ops/loss_modes.py disagree: {header} vs {python}"
    assert sorted(header.values()) == list(range(len(header))), "codes must be 0..n-1, each once"


def test_no_other_module_defines_the_codes():
    pattern = re.compile(r"^\s*(BOOTSTRAP_\w+|MRKLD|REGION)\b[\w\s,]*=\s*\d", re.M)
    for path in (ROOT / "fastst").rglob("*.py"):
        if path.name != "loss_modes.py":
            assert not pattern.search(path.read_text()), f"{path} defines a loss-mode code; import fastst.ops.loss_modes"
