"""Which factors separate the domains of a prepared dataset: radiomics per series, effect sizes, embedding.

    python -m Training.analyze_domains --dataset DATASET --out DIR [--workers N]

The analysis is ``Training.data.analyze_domains``; this module parses arguments and shows progress.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from Training.command import run_command
from Training.data.analyze_domains import AnalysisCancelled, AnalysisError, analyze_domains


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m Training.analyze_domains", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--dataset", required=True, type=Path, help="prepared dataset (Training.prepare)")
    ap.add_argument("--out", required=True, type=Path, help="output folder for the report")
    ap.add_argument(
        "--slices-per-series", type=int, default=4, help="evenly spaced slices per series (default 4)"
    )
    ap.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    ap.add_argument("--split", default=None, help="only this split (default: all series)")
    ap.add_argument("--seed", type=int, default=0, help="k-means / PCA seed")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    code, summary = run_command(
        lambda progress: analyze_domains(
            args.dataset,
            args.out,
            slices_per_series=args.slices_per_series,
            workers=args.workers,
            split=args.split,
            seed=args.seed,
            progress=progress,
        ),
        desc="radiomics",
        unit="series",
        errors=(AnalysisError, ValueError, OSError),
        cancelled=(AnalysisCancelled,),
        interrupted="interrupted; no report was written",
    )
    if summary is None:
        return code
    print((Path(args.out) / "summary.md").read_text())
    print(f"({summary['seconds']:.0f} s)")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
