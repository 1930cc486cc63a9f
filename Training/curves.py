"""Training curves: FID, radiomics alignment and paired metrics over iterations, from periodic evaluations.

    python -m Training.curves RUN_DIR [RUN_DIR ...] --out DIR [--labels A,B]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from Training.evaluation.curves import CurvesError, plot_curves, read_run


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m Training.curves", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="training run folder(s) holding eval/iter_*.json")
    p.add_argument("--out", required=True, help="output folder for the PNGs and curves.csv")
    p.add_argument(
        "--labels", default=None, help="comma-separated names for the runs (default: folder names)"
    )
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [Path(d).resolve().name for d in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        print(f"error: {len(labels)} labels for {len(args.run_dirs)} runs", file=sys.stderr)
        return 2
    try:
        runs = {lab: read_run(d) for lab, d in zip(labels, args.run_dirs, strict=True)}
    except CurvesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in plot_curves(runs, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
