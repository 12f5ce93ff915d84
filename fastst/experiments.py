"""The sweeps of the IAST paper's Tables 2, 3, 4, 5, 8 and 9 and of the TPLD paper's Table 2, as
runs of ``fastst.train`` pipelines: ``python -m fastst.experiments TABLE``.

    python -m fastst.experiments table5                      # on the synthetic demo (CPU)
    python -m fastst.experiments table9 --preset iast_gta5 data.source.root=/data/GTA5 ...
    python -m fastst.experiments table8 --preset iast_semi_cityscapes
    python -m fastst.experiments tpld_table2 --preset tpld_gta5 ...

TABLE is one of:
  table2  the pseudo-label selector: IAS at (alpha, beta) = (0.2, 0), (0.2, 0.5), (0.2, 0.9),
          (0.2, 0.99), (0.3, 0.9), (0.5, 0.9) with gamma 0, a constant threshold (the rounds'
          `threshold`), class-balanced thresholds at portion 0.2
  table3  lambda_ent (lambda_i) in 0.5..5 at lambda_kld 0.1, lambda_kld 0.05/0.15 at lambda_ent 3
  table4  gamma in 0, 1, 4, 8, 16 (alpha 0.2, beta 0.9)
  table5  the ablation: source, warm-up, + constant-threshold ST, + IAS, + R_c, + R_i
  table8  semi-supervised: 1/8, 1/4, 1/2 of the target labelled (baseline and IAST), and full
  table9  IAST over other warm-ups: AdaptSegNet (multi-level), AdvEnt, none (from source-only)
  tpld_table2  CBST, CRST-LRENT and CRST-MRKLD, each alone and with TPLD

Tables 2, 4 and tpld_table2 report the first round's labelled proportion and P-mIoU (the pseudo
labels against the target's own labels) beside the final mIoU; tables 2, 3, 4, 5 and tpld_table2
also report TPLD's rare-class mIoU of the final model (R-mIoU, ``fastst.metrics.rare_class_miou``).
Table 2 runs IAS with gamma 0: its beta = 0 row labels exactly alpha = 20 % of each image, which
only gamma = 0 gives (the quantile is taken at alpha * theta ** gamma), and its (0.2, 0.9) row is
Table 4's gamma = 0 row (36 %, 50.5 mIoU). Table 4 runs beta 0.9 where the paper's caption says
1.0: with beta = 1 the thresholds never leave 0.9 and gamma changes nothing, and the paper's
proportions are those of beta 0.9. The TPLD rows: "X" is the base preset's phase-1 rounds with loss
X and TPLD's two changes turned off (``vote_iterations`` 0: the confident labels; ``beta`` 1: the
base method's gradients) and no phase 2; "X + TPLD" is the whole preset with loss X in phase 1.

Each variant is a pipeline of the base preset (``--preset``: ``demo`` for the IAST tables,
``demo_semi`` for table 8 and ``demo_tpld`` for tpld_table2 by default, i.e. the synthetic
domains on a CPU; ``iast_gta5`` / ``iast_synthia`` / ``iast_semi_cityscapes`` / ``tpld_gta5`` /
``tpld_synthia`` give the released settings) with the variant's overrides, run in
DIR/<table>/<variant>/ (DIR: ``--out``, default runs/experiments). Stages that variants share
(source-only, warm-up) are trained once: every variant reuses them from the earlier variants'
directories (``runtime.reuse_from``). Reruns resume and skip finished variants. The table is
printed and written to DIR/<table>/results.md and results.json.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from fastst.atomic import atomic_write, write_json_atomic
from fastst.cli import add_debug_option, run_cli
from fastst.config import ConfigError, load_config
from fastst.metrics import rare_class_miou

__all__ = ["Variant", "TABLES", "table_variants", "run_table", "main"]


@dataclass
class Variant:
    """One row of a table: its name, its overrides of the base preset, and the columns read
    from the finished run (``columns(results by stage name) -> {column: value}``)."""
    name: str
    overrides: List[str] = field(default_factory=list)
    columns: Optional[Callable[[Mapping[str, Mapping[str, Any]]], Dict[str, Any]]] = None


def _rounds(config: Mapping[str, Any]) -> List[str]:
    return [s for s in config["pipeline"] if config["stages"][s]["method"] == "iast"]


def _pipeline(stages: Sequence[str]) -> str:
    return "pipeline=[" + ", ".join(stages) + "]"


def _each_round(config, **settings) -> List[str]:
    return [f"stages.{name}.{key}={value}" for name in _rounds(config)
            for key, value in settings.items()]


def _final(results: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """The last stage's mIoU and rare-class mIoU."""
    last = list(results.values())[-1]
    return {"mIoU": last["target_miou"], "R-mIoU": rare_class_miou(last.get("iou") or {})}


def _labels_of(stage: str):
    """Columns: ``stage``'s labelled proportion and P-mIoU (None without target labels), then
    the final mIoU and R-mIoU."""
    def columns(results):
        quality = (results[stage].get("pseudo") or {}).get("quality") or {}
        return {"proportion": quality.get("labelled_proportion"), "P-mIoU": quality.get("p_miou"),
                **_final(results)}
    return columns


def _rounds_columns(results: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """The first round's mIoU and P-mIoU beside the final mIoU (None before any round)."""
    rounds = [r for r in results.values() if r.get("method") == "iast"]
    first = rounds[0] if rounds else {}
    return {"round 1": first.get("target_miou"), "P-mIoU round 1": first.get("p_miou"),
            **_final(results)}


def _miou_of(stage: str):
    return lambda results: {"mIoU": results[stage]["target_miou"]}


def _table2(config) -> List[Variant]:
    columns = _labels_of(_rounds(config)[0])
    rows = [(0.2, 0.0), (0.2, 0.5), (0.2, 0.9), (0.2, 0.99), (0.3, 0.9), (0.5, 0.9)]
    return [Variant(f"alpha={alpha} beta={beta}", [f"pseudo.beta={beta}", "pseudo.gamma=0.0"]
                    + _each_round(config, selector="ias", alpha=alpha), columns)
            for alpha, beta in rows] + [
        Variant("constant", _each_round(config, selector="constant"), columns),
        # The class-balanced selector takes 20 % of the target set's pixels (IAST section 5.2).
        Variant("class-balanced", _each_round(config, selector="cbst", portion=0.2), columns)]


def _table3(config) -> List[Variant]:
    rows = [(lambda_ent, 0.1) for lambda_ent in (0.5, 1.0, 2.0, 3.0, 4.0, 5.0)]
    rows += [(3.0, 0.05), (3.0, 0.15)]
    return [Variant(f"lambda_i={i} lambda_c={c}",
                    _each_round(config, lambda_ent=i, lambda_kld=c), _final) for i, c in rows]


def _table4(config) -> List[Variant]:
    return [Variant(f"gamma={gamma}", [f"pseudo.gamma={gamma}", "pseudo.beta=0.9"]
                    + _each_round(config, alpha=0.2), _labels_of(_rounds(config)[0]))
            for gamma in (0.0, 1.0, 4.0, 8.0, 16.0)]


def _table5(config) -> List[Variant]:
    rounds = _rounds(config)
    full = {name: config["stages"][name] for name in rounds}
    head = [s for s in config["pipeline"] if s not in rounds]
    off = _each_round(config, lambda_kld=0.0, lambda_ent=0.0)
    return [
        Variant("source", [_pipeline(head[:1])], _rounds_columns),
        Variant("warm-up", [_pipeline(head)], _rounds_columns),
        Variant("+ constant ST", off + _each_round(config, selector="constant"), _rounds_columns),
        Variant("+ IAS", off + _each_round(config, selector="ias"), _rounds_columns),
        Variant("+ R_c", _each_round(config, selector="ias", lambda_ent=0.0)
                + [f"stages.{n}.lambda_kld={full[n]['lambda_kld']}" for n in rounds],
                _rounds_columns),
        Variant("+ R_i", _each_round(config, selector="ias"), _rounds_columns),
    ]


def _table8(config) -> List[Variant]:
    rounds = _rounds(config)
    variants = []
    for label, fraction in (("1/8", 0.125), ("1/4", 0.25), ("1/2", 0.5)):
        subset = [f"data.source.subset.fraction={fraction}",
                  f"data.target.subset.fraction={fraction}"]
        variants.append(Variant(label, subset, lambda results: {
            "baseline": results["source_only"]["target_miou"],
            "IAST": list(results.values())[-1]["target_miou"]}))
    variants.append(Variant("full", ["data.source.subset=null", "data.target.subset=null",
                                     _pipeline([s for s in config["pipeline"]
                                                if s not in rounds])],
                            lambda results: {"baseline": results["source_only"]["target_miou"],
                                             "IAST": None}))
    return variants


def _table9(config) -> List[Variant]:
    rounds = _rounds(config)
    warmups = [s for s in config["pipeline"] if config["stages"][s]["method"] == "warmup"]
    if not warmups:
        raise ConfigError("table9 needs a base preset with a warm-up stage (e.g. demo, iast_gta5)")
    warmup = warmups[0]

    def columns(base_stage):
        return lambda results: {"base": results[base_stage]["target_miou"],
                                "+IAST": list(results.values())[-1]["target_miou"]}

    no_warmup = [s for s in config["pipeline"] if s != warmup]
    return [
        Variant("output-space AT", [f"stages.{warmup}.variant=output"], columns(warmup)),
        # Each method with its released adversarial weights (AdaptSegNet: 0.001 / 0.0002 and a
        # 4x4 first discriminator layer; AdvEnt: 0.001).
        Variant("AdaptSegNet", [f"stages.{warmup}.variant=multilevel",
                                f"stages.{warmup}.lambda_adv=0.001",
                                f"stages.{warmup}.lambda_adv_aux=0.0002",
                                f"stages.{warmup}.d_first_kernel=4"], columns(warmup)),
        Variant("AdvEnt", [f"stages.{warmup}.variant=advent", f"stages.{warmup}.lambda_adv=0.001"],
                columns(warmup)),
        Variant("source (no warm-up)", [_pipeline(no_warmup)], columns(no_warmup[0])),
    ] if rounds else []


def _tpld_table2(config) -> List[Variant]:
    method = {name: config["stages"][name]["method"] for name in config["pipeline"]}
    phase1 = [name for name in config["pipeline"] if method[name] == "tpld_phase1"]
    if not phase1:
        raise ConfigError("tpld_table2 needs a base preset with tpld_phase1 stages (e.g. "
                          "demo_tpld, tpld_gta5, tpld_synthia)")

    def each(**settings):
        return [f"stages.{name}.{key}={value}" for name in phase1
                for key, value in settings.items()]

    base = _pipeline([name for name in config["pipeline"] if method[name] != "tpld_phase2"])
    columns = _labels_of(phase1[0])
    variants = []
    for label, loss in (("CBST", "ce"), ("CRST-LRENT", "lrent"), ("CRST-MRKLD", "mrkld")):
        variants.append(Variant(label, [base] + each(loss=loss, vote_iterations=0, beta=1.0),
                                columns))
        variants.append(Variant(f"{label} + TPLD", each(loss=loss), columns))
    return variants


TABLES: Dict[str, Callable[[Mapping[str, Any]], List[Variant]]] = {
    "table2": _table2, "table3": _table3, "table4": _table4, "table5": _table5,
    "table8": _table8, "table9": _table9, "tpld_table2": _tpld_table2}
DEFAULT_PRESETS = {"table8": "demo_semi", "tpld_table2": "demo_tpld"}


def table_variants(table: str, preset: Optional[str] = None,
                   overrides: Sequence[str] = ()) -> List[Variant]:
    """The variants of ``table`` over ``preset`` (its default when None) with ``overrides``."""
    if table not in TABLES:
        raise ConfigError(f"unknown table {table!r}; valid tables: {', '.join(TABLES)}")
    base = load_config(preset or DEFAULT_PRESETS.get(table, "demo"), list(overrides))
    return TABLES[table](base)


def run_table(table: str, out_dir, *, preset: Optional[str] = None,
              overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Run every variant of ``table`` (resuming finished ones) and write results.md/.json in
    ``out_dir/<table>``; returns {"table", "preset", "rows": [{"variant", columns...}]}."""
    from fastst.train import run_pipeline

    preset = preset or DEFAULT_PRESETS.get(table, "demo")
    variants = table_variants(table, preset, overrides)
    table_dir = Path(out_dir) / table
    rows = []
    given = load_config(preset, list(overrides))["runtime"]["reuse_from"]
    earlier: List[str] = [] if given is None else [given] if isinstance(given, str) else list(given)
    for index, variant in enumerate(variants):
        run_dir = table_dir / f"{index}_{_slug(variant.name)}"
        config = load_config(preset, list(overrides) + variant.overrides)
        if earlier:  # set, not overridden: a preset's or user's reuse_from may be one string
            config["runtime"]["reuse_from"] = list(earlier)
        summary = run_pipeline(config, run_dir)
        results = {stage["name"]: stage for stage in summary["stages"]}
        rows.append({"variant": variant.name, **variant.columns(results)})
        earlier.append(str(run_dir))
    report = {"table": table, "preset": preset, "overrides": list(overrides), "rows": rows}
    write_json_atomic(report, table_dir / "results.json")
    with atomic_write(table_dir / "results.md", "w") as handle:
        handle.write(format_rows(report) + "\n")
    return report


def format_rows(report: Mapping[str, Any]) -> str:
    """A markdown table of ``report["rows"]``; fractions shown in percent."""
    rows = report["rows"]
    columns = [key for key in rows[0] if key != "variant"] if rows else []
    lines = [f"{report['table']} on preset {report['preset']}", "",
             "| variant | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for row in rows:
        cells = ["-" if row[c] is None else f"{100 * row[c]:.2f}" for c in columns]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name).strip("_")


EXAMPLES = """examples:
  python -m fastst.experiments table5
  python -m fastst.experiments table5 --out runs/t5 stages.round1.iterations=20

exit status: 0 done, 2 bad input (table, preset, key, value, data), 1 non-finite
losses, 3 a runtime.stop_after_* hook fired"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; errors end in one line and the exit status (``fastst.cli.run_cli``:
    2 bad input, 1 non-finite losses, 3 a stop hook, as python -m fastst.train)."""
    return run_cli(_main, argv, prog="python -m fastst.experiments")


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastst.experiments",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=EXAMPLES)
    parser.add_argument("table", help="which table to run: " + ", ".join(TABLES))
    parser.add_argument("--preset", default=None, help="base preset (default: demo; demo_semi "
                        "for table8, demo_tpld for tpld_table2)")
    parser.add_argument("--out", default="runs/experiments", metavar="DIR",
                        help="output directory, one run directory per variant below it "
                             "(default: runs/experiments); rerun to resume")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides applied to every variant")
    add_debug_option(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may follow --out / --preset
    try:
        report = run_table(args.table, args.out, preset=args.preset, overrides=args.overrides)
    except ConfigError as error:
        parser.error(str(error))
    print(format_rows(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
