"""`python -m fastst.data check --dataset NAME --root DIR [--split S]`: validate a data set's
layout and files (see fastst.data.check; `--dataset synthetic` checks the generated demo trees,
fastst.data.check_synthetic, and generates nothing); exit status 1 if anything is wrong, 0 if
clean, 2 for bad arguments. `python -m fastst.data synth --root DIR [...]` generates the
synthetic demo domains (fastst.data.synth)."""
from __future__ import annotations

import argparse
import sys

from fastst.cli import add_debug_option, run_cli

from .check import CHECKABLE, check_dataset
from .check_synthetic import check_synthetic
from .synth import add_synth_command, run_synth_command

CHECK_EXAMPLES = """examples:
  python -m fastst.data check --dataset gta5 --root data/GTA5
  python -m fastst.data check --dataset cityscapes --root data/cityscapes --split val
  python -m fastst.data check --dataset synthetic --root data/synthetic

exit status: 0 no faults, 1 faults (listed), 2 bad arguments"""


def main(argv=None) -> int:
    """Run the command; errors end in one line and the exit status (``fastst.cli.run_cli``)."""
    return run_cli(_main, argv, prog="python -m fastst.data")


def _main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastst.data", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Data set tools. check: pair every image with its label, read every label "
                    "and report\nids outside the data set's id space and files that cannot be "
                    "read.", epilog=CHECK_EXAMPLES)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check", help="validate a data set's layout and files",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CHECK_EXAMPLES,
        description="Validate a data set's layout and files: pair every image with its label, "
                    "read every\nlabel, report ids outside the id space and unreadable or "
                    "truncated files.")
    check.add_argument("--dataset", required=True, choices=sorted(CHECKABLE),
                       help="which layout DIR has: %(choices)s (synthetic: the generated demo "
                            "data, DIR/source and DIR/target)")
    check.add_argument("--root", required=True, metavar="DIR", help="the data set's directory")
    check.add_argument("--domain", default=None, choices=("source", "target"),
                       help="--dataset synthetic only: check one domain (default: both)")
    check.add_argument("--split", default=None,
                       help="split to check (default: all for gta5/synthia, train and val for "
                            "cityscapes/synthetic)")
    check.add_argument("--list-file", default=None, help="check only the images named in this list")
    check.add_argument("--decode-images", action="store_true",
                       help="decode every image in full (default: check PNG chunk integrity only)")
    check.add_argument("--workers", type=int, default=None, help="reader threads (default: up to 8)")
    check.add_argument("--max-listed", type=int, default=20,
                       help="paths listed per kind of fault (default: 20)")
    add_debug_option(check)
    add_synth_command(commands)
    add_debug_option(commands.choices["synth"])
    args = parser.parse_args(argv)
    if args.command == "synth":
        return run_synth_command(args)
    if args.domain is not None and args.dataset != "synthetic":
        parser.error("--domain applies to --dataset synthetic only")
    try:
        options = dict(list_file=args.list_file, decode_images=args.decode_images,
                       workers=args.workers)
        if args.dataset == "synthetic":
            report = check_synthetic(args.root, args.split, domain=args.domain, **options)
        else:
            report = check_dataset(args.dataset, args.root, args.split, **options)
    except ValueError as exc:
        parser.error(str(exc))
    print(report.summary(args.max_listed))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
