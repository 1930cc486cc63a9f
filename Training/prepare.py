"""Prepare a training dataset from a DICOM tree: domains by scanner + kernel, patient split, canvases.

    python -m Training.prepare --dicom-root DIR --out DATASET [--workers N] [--seed K]

The work is done by ``Training.data.prepare``; this module parses arguments and shows progress.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from TextureStarGANCore.preprocessing import PreprocessSpec
from TextureStarGANCore.volume_io import InputError
from Training.command import run_command
from Training.data.prepare import prepare


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m Training.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dicom-root",
        required=True,
        type=Path,
        nargs="+",
        help="DICOM tree(s) (patient / study / series); several mix e.g. simulated and real series",
    )
    ap.add_argument(
        "--out", required=True, type=Path, help="dataset folder (new, or an earlier run to resume)"
    )
    ap.add_argument(
        "--min-patients", type=int, default=1, help="drop domains with fewer patients (default 1)"
    )
    ap.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    ap.add_argument(
        "--test-fraction", type=float, default=0.2, help="patients in the test split (default 0.2)"
    )
    ap.add_argument("--canvas-size", type=int, default=512, help="canvas size in pixels (default 512)")
    ap.add_argument("--pixel-spacing", type=float, default=1.0, help="canvas pixel spacing in mm (default 1)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    code, ds = run_command(
        lambda progress: prepare(
            args.dicom_root,
            args.out,
            min_patients=args.min_patients,
            workers=args.workers,
            seed=args.seed,
            test_fraction=args.test_fraction,
            spec=PreprocessSpec(canvas_size=args.canvas_size, pixel_spacing_mm=args.pixel_spacing),
            progress=progress,
        ),
        desc="prepare",
        unit="series",
        stage_units={"scan": "folder"},
        errors=(InputError, ValueError),
        interrupted="interrupted; finished series are kept; run the same command again to resume",
    )
    if ds is None:
        return code
    n_train, n_test = len(ds["split"]["train_patients"]), len(ds["split"]["test_patients"])
    print(
        f"wrote {ds['slices']} slices from {ds['series']} series ({n_train} train / {n_test} test patients) "
        f"to {args.out}; {len(ds['skipped'])} series skipped"
    )
    print(Path(args.out, "domain_report.md").read_text())
    return code


if __name__ == "__main__":
    raise SystemExit(main())
