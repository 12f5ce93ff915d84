"""Per round and class, what an IAST demo run's self-training rounds did: the pseudo labels'
labelled share and P-mIoU (IAST Table 4), each class's share of labelled pixels, its pseudo-label
IoU, its threshold theta and its target IoU, averaged over the run's seeds. The numbers behind
docs/demo.md:

    python bench/demo_rounds_report.py runs/demo3 [--stages warmup,round1,round2,round3]

Reads RUN/seed<s>/<stage>/result.json (or RUN/<stage>/result.json); nothing is recomputed.
"""
import argparse
import json
import statistics
from pathlib import Path


def stage_results(run, stage):
    """The result.json dicts of ``stage`` over the run's seeds."""
    paths = sorted(Path(run).glob(f"seed*/{stage}/result.json")) or \
        sorted(Path(run).glob(f"{stage}/result.json"))
    return [json.loads(path.read_text()) for path in paths]


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def cell(value, scale=100.0, digits=1):
    return "-" if value is None else f"{scale * value:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a demo run directory (fastst.train --out)")
    parser.add_argument("--stages", default="warmup,round1,round2,round3",
                        help="comma-separated stages, the first one without pseudo labels")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    results = {stage: stage_results(args.run, stage) for stage in stages}
    missing = [stage for stage, found in results.items() if not found]
    if missing:
        raise SystemExit(f"no result.json for {missing} under {args.run}")
    names = list(results[stages[0]][0]["iou"])
    print("| stage | target mIoU | labelled | P-mIoU |\n|---|---|---|---|")
    for stage in stages:
        rs = results[stage]
        quality = [r["pseudo"]["quality"] for r in rs if "pseudo" in r]
        print(f"| {stage} | {cell(mean(r['miou'] for r in rs))} | "
              f"{cell(mean(q['labelled_proportion'] for q in quality))} | "
              f"{cell(mean(q['p_miou'] for q in quality))} |")
    rounds = [stage for stage in stages if "pseudo" in results[stage][0]]
    header = ["class", f"IoU {stages[0]}"] + [f"{s} {what}" for s in rounds
                                               for what in ("share", "P-IoU", "theta", "IoU")]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for k, name in enumerate(names):
        row = [name, cell(mean(r["iou"][name] for r in results[stages[0]]))]
        for stage in rounds:
            rs = results[stage]
            labelled = [r["pseudo"]["labelled_fraction"] for r in rs]
            share = mean(r["pseudo"]["density"][k] / f if f else None
                         for r, f in zip(rs, labelled))
            row += [cell(share), cell(mean(r["pseudo"]["quality"]["p_iou"].get(name) for r in rs)),
                    cell(mean(r["pseudo"]["theta"][k] for r in rs), 1.0, 3),
                    cell(mean(r["iou"][name] for r in rs))]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
