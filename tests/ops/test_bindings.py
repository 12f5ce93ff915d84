"""fastst._C's launchers: the Python-visible signatures, the shared argument decoder's errors and
the registration split by op family (csrc/fastst/bindings/, docs/design.md §1.3)."""
import re
from pathlib import Path

import pytest

from fastst.ops import _backend

pytestmark = pytest.mark.skipif(_backend.extension() is None, reason="fastst._C is not built")

BINDINGS = Path(__file__).resolve().parents[2] / "csrc" / "fastst" / "bindings"

# Each launcher's arguments as the Python side passes them: i int, f float, b bool, 4 / 2 a
# fixed-size list of ints (sizes or strides). fastst/ops/ calls them positionally.
SIGNATURES = {
    "stats_cpu": "ii424bbiiii",
    "exp_nonpositive_cpu": "iii",
    "ias_select_cpu": "iiiiiiiiiifffbi",
    "region_loss_cpu": "ii424ibiffbbbii",
    "st_loss_cpu": "ii424ibiiiiifffbbii",
    "cbst_collect_cpu": "iiiiiiii",
    "cbst_thresholds_cpu": "iiiifi",
    "tpld_pixels_cpu": "ii44iiiiiiii",
    "tpld_vote_cpu": "iiiiiiiiifi",
}
CUDA_SIGNATURES = {
    "stats_cuda": "ii424bbiiiiii",
    "ias_official_cuda": "iiiiiiiiiiiifffii",
    "ias_paper_cuda": "iiiiiiiiiiiiiifffii",
    "ias_paper_temp_bytes": "ii",
}


def _kinds(doc: str) -> str:
    """The argument kinds of a pybind11 signature line `name(arg0: T, arg1: T, ...) -> R`."""
    params = re.split(r",\s*(?=arg\d+:)", doc.split("\n")[0].split("(", 1)[1].rsplit(") ->", 1)[0])
    kinds = ""
    for p in params:
        if "FixedSize(4)" in p or "[4]" in p:
            kinds += "4"
        elif "FixedSize(2)" in p or "[2]" in p:
            kinds += "2"
        elif re.search(r"\bbool\b", p):
            kinds += "b"
        elif "Float" in p or re.search(r"\bfloat\b", p):
            kinds += "f"
        else:
            kinds += "i"
    return kinds


def _launchers():
    c = _backend.extension()
    return {**SIGNATURES, **(CUDA_SIGNATURES if c.has_cuda else {})}


def test_launcher_signatures_unchanged():
    c = _backend.extension()
    names = {n for n in dir(c) if not n.startswith("_") and callable(getattr(c, n))}
    assert names == set(_launchers())
    for name, kinds in _launchers().items():
        assert _kinds(getattr(c, name).__doc__) == kinds, name


# Positional arguments with dtype code 7 and null pointers: the decoder must refuse before any
# pointer is read.
BAD_DTYPE_CALLS = {
    "stats_cpu": lambda: (0, 7, [1, 2, 3, 4], [3, 4], [24, 12, 4, 1], True, True, 0, 0, 0, 0),
    "region_loss_cpu": lambda: (0, 7, [1, 2, 3, 4], [3, 4], [24, 12, 4, 1], 0, True, 255, 0.0, 0.0, True, True,
                                True, 0, 0),
    "st_loss_cpu": lambda: (0, 7, [1, 2, 3, 4], [3, 4], [24, 12, 4, 1], 0, True, 255, 0, 0, 0, 0, 0.5, 0.1, 1.0,
                            False, True, 0, 0),
    "tpld_pixels_cpu": lambda: (0, 7, [1, 2, 3, 4], [24, 12, 4, 1], 0, 0, 0, 0, 0, 0, 0, 0),
    "stats_cuda": lambda: (0, 7, [1, 2, 3, 4], [3, 4], [24, 12, 4, 1], True, True, 0, 0, 0, 0, 0, 0),
}


@pytest.mark.parametrize("name", sorted(BAD_DTYPE_CALLS))
def test_unknown_dtype_code_names_the_launcher(name):
    c = _backend.extension()
    if not hasattr(c, name):
        assert name.endswith("_cuda") and not c.has_cuda
        return
    with pytest.raises(ValueError, match=rf"^fastst\._C\.{name}: unknown dtype code 7 \(expected 0 float32, "
                                         r"1 float16 or 2 bfloat16\)$"):
        getattr(c, name)(*BAD_DTYPE_CALLS[name]())


def test_unknown_loss_mode_names_the_launcher():
    args = list(BAD_DTYPE_CALLS["st_loss_cpu"]())
    args[1], args[8] = 0, 4  # a valid dtype, loss mode 4
    with pytest.raises(ValueError, match=r"^fastst\._C\.st_loss_cpu: unknown loss mode 4 \(expected 0 hard, "
                                         r"1 soft, 2 MRKLD or 3 teacher\)$"):
        _backend.extension().st_loss_cpu(*args)


def test_registration_split_by_family():
    """Each launcher is registered in exactly one bindings/<family>.cpp, named by its stem's
    family; strides and sizes are decoded only in decode.h."""
    sources = {p.stem: p.read_text() for p in BINDINGS.glob("*.cpp")}
    families = sorted(set(sources) - {"module"})
    assert families == ["cbst", "ias", "region_loss", "st_loss", "stats", "tpld"]
    for family in families:
        assert f"register_{family}(mod);" in sources["module"]
    for name in [*SIGNATURES, *CUDA_SIGNATURES, "exp_nonpositive_cpu"]:
        homes = [f for f in families if f'"{name}"' in sources[f]]
        assert len(homes) == 1, (name, homes)
        assert name.startswith(homes[0]) or name == "exp_nonpositive_cpu", (name, homes)
    for family in families:
        assert "stride_" not in sources[family], f"{family}.cpp decodes strides by hand: use decode.h"
