"""`python -m fastst.data check --dataset NAME --root DIR [--split S]`: validate a data set's
layout and files (see fastst.data.check); exit status 1 if anything is wrong, 0 if clean."""
from __future__ import annotations

import argparse
import sys

from .check import LAYOUTS, check_dataset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastst.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a data set's layout and files")
    check.add_argument("--dataset", required=True, choices=sorted(LAYOUTS))
    check.add_argument("--root", required=True, help="the data set's directory")
    check.add_argument("--split", default=None,
                       help="split to check (default: all for gta5/synthia, train and val for cityscapes)")
    check.add_argument("--list-file", default=None, help="check only the images named in this list")
    check.add_argument("--decode-images", action="store_true",
                       help="decode every image in full (default: check PNG chunk integrity only)")
    check.add_argument("--workers", type=int, default=None, help="reader threads (default: up to 8)")
    check.add_argument("--max-listed", type=int, default=20, help="paths listed per kind of fault")
    args = parser.parse_args(argv)
    try:
        report = check_dataset(args.dataset, args.root, args.split, list_file=args.list_file,
                               decode_images=args.decode_images, workers=args.workers)
    except ValueError as exc:
        parser.error(str(exc))
    print(report.summary(args.max_listed))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
