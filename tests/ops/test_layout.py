"""One stem per op family through every layer: each custom-op module fastst/ops/ext/<stem>.py has
its C++ kernel csrc/fastst/cpu/<stem>.cpp, a "# <stem>:" section in fastst/ops/reference.py, tests
tests/ops/test_<stem>*.py and a benchmark (bench/test_<stem>.py, or the family's file below)."""
from pathlib import Path

import fastst.ops.ext

ROOT = Path(__file__).resolve().parents[2]
NOT_OPS = {"__init__", "fused_loss"}  # shared scaffolding of ext/, not an op family
BENCH = {"cbst": "tpld", "bootstrap_loss": "tpld"}  # benchmarked with the TPLD ops in bench/test_tpld.py


def _stems() -> list[str]:
    return sorted(p.stem for p in Path(fastst.ops.ext.__file__).parent.glob("*.py") if p.stem not in NOT_OPS)


def test_every_stem_has_every_layer():
    reference = (ROOT / "fastst" / "ops" / "reference.py").read_text()
    missing = []
    for stem in _stems():
        if not (ROOT / "csrc" / "fastst" / "cpu" / f"{stem}.cpp").exists():
            missing.append(f"csrc/fastst/cpu/{stem}.cpp")
        if f"\n# {stem}:" not in reference:
            missing.append(f"a '# {stem}:' section in fastst/ops/reference.py")
        if not list((ROOT / "tests" / "ops").glob(f"test_{stem}*.py")):
            missing.append(f"tests/ops/test_{stem}*.py")
        if not (ROOT / "bench" / f"test_{BENCH.get(stem, stem)}.py").exists():
            missing.append(f"bench/test_{BENCH.get(stem, stem)}.py")
    assert _stems() and not missing, f"missing layers: {missing}"
