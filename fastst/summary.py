"""summary.json and the table ``python -m fastst.train`` prints at the end of a run.

``summarize`` folds the per-seed results of every stage (``fastst.pipeline.run_seed``) into the
summary (the mean over seeds, with the sample standard deviation when there are several);
``format_table`` renders it as the stages x target mIoU table."""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Mapping, Optional

__all__ = ["SUMMARY_NAME", "summarize", "format_table", "nan_if_none"]

SUMMARY_NAME = "summary.json"


def nan_if_none(value: Optional[float]) -> float:
    return math.nan if value is None else float(value)


def summarize(config: Mapping[str, Any], per_seed: Mapping[int, List[Dict[str, Any]]]
              ) -> Dict[str, Any]:
    """summary.json: per stage the target mIoU (a fraction; the mean over seeds, with the
    sample standard deviation and the per-seed values when there are several) and seconds."""
    seeds = list(per_seed)
    stages = []
    for name in config["pipeline"]:
        rows = [next((r for r in per_seed[s] if r["name"] == name), None) for s in seeds]
        if any(row is None for row in rows):
            continue
        values = [nan_if_none(row["target_miou"]) for row in rows]
        entry = {"name": name, "method": rows[0]["method"],
                 "target_miou": statistics.fmean(values),
                 "seconds": statistics.fmean(row["seconds"] for row in rows),
                 "iterations": rows[0].get("iterations")}
        for key in ("labelled_proportion", "p_miou"):
            found = [_pseudo_quality_value(row, key) for row in rows]
            if all(value is not None for value in found):
                entry[key] = statistics.fmean(found)
        if len(seeds) > 1:
            entry["target_miou_std"] = statistics.stdev(values)
            entry["target_miou_per_seed"] = values
        else:
            for key in ("miou16", "miou13", "iou", "train_seconds", "eval_seconds", "pseudo",
                        "checkpoint"):
                if key in rows[0]:
                    entry[key] = rows[0][key]
        stages.append(entry)
    return {"preset": config["name"], "seeds": seeds, "stages": stages,
            "total_seconds": sum(s["seconds"] for s in stages)}


def _pseudo_quality_value(row: Mapping[str, Any], key: str) -> Optional[float]:
    quality = (row.get("pseudo") or {}).get("quality") or {}
    value = quality.get(key)
    return None if value is None else float(value)


def format_table(summary: Mapping[str, Any]) -> str:
    """The stages x target mIoU table printed at the end of a run (mIoU in percent), with the
    pseudo labels' labelled proportion and P-mIoU where the target has labels."""
    several = len(summary["seeds"]) > 1
    header = "target mIoU (mean ± std over seeds " + ", ".join(map(str, summary["seeds"])) + ")" \
        if several else "target mIoU"
    quality = any("labelled_proportion" in stage for stage in summary["stages"])
    width = max([len("stage")] + [len(s["name"]) for s in summary["stages"]]) + 2
    column = max(12, len(header))
    extra = f"{'labelled %':>12}{'P-mIoU':>9}" if quality else ""
    lines = [f"{'stage':<{width}}{header:>{column}}{extra}   time"]
    for stage in summary["stages"]:
        value = f"{100 * stage['target_miou']:.2f}"
        if several:
            value += f" ± {100 * stage['target_miou_std']:.2f}"
        extra = ""
        if quality:
            proportion = f"{100 * stage['labelled_proportion']:.1f}" \
                if "labelled_proportion" in stage else ""
            p_miou = f"{100 * stage['p_miou']:.2f}" if "p_miou" in stage else \
                ("-" if proportion else "")
            extra = f"{proportion:>12}{p_miou:>9}"
        lines.append(f"{stage['name']:<{width}}{value:>{column}}{extra}   "
                     f"{_duration(stage['seconds'])}")
    blank = f"{'':>21}" if quality else ""
    lines.append(f"{'total':<{width}}{'':>{column}}{blank}   "
                 f"{_duration(summary['total_seconds'])}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
