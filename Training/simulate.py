"""Simulate paired CT series: one phantom per patient reconstructed with every kernel, written as DICOM.

    python -m Training.simulate --out DIR --patients N --slices S [--size PX] [--seed K] [--full-fbp]

The simulator itself lives in ``Training.simulator``; this module parses arguments and shows progress.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from Training.command import fail, run_command
from Training.simulator import kernels as K
from Training.simulator.simulate import DEFAULT_SLICE_SPACING_MM, format_mtf, simulate


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m Training.simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="new output folder (must not exist or be empty)")
    ap.add_argument("--patients", required=True, type=int, help="number of simulated patients")
    ap.add_argument("--slices", required=True, type=int, help="slices per series")
    ap.add_argument("--size", type=int, default=512, help="matrix size in pixels (default 512)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--full-fbp", action="store_true", help="full projection / Poisson / FBP for every slice")
    ap.add_argument("--angles", type=int, default=None, help="views for the full path (default: --size)")
    ap.add_argument("--slice-spacing", type=float, default=DEFAULT_SLICE_SPACING_MM, help="mm between slices")
    ap.add_argument("--first-patient", type=int, default=0, help="index of the first patient (default 0)")
    ap.add_argument(
        "--kernels",
        default=None,
        help="comma-separated subset of kernels, e.g. BONE (default: all: "
        + ", ".join(k.name for k in K.DEFAULT_KERNELS)
        + ")",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        specs = (
            K.DEFAULT_KERNELS
            if not args.kernels
            else tuple(K.kernel_by_name(n.strip()) for n in args.kernels.split(",") if n.strip())
        )
    except ValueError as exc:
        return fail(str(exc))
    code, record = run_command(
        lambda progress: simulate(
            args.out,
            args.patients,
            args.slices,
            size=args.size,
            seed=args.seed,
            full_fbp=args.full_fbp,
            n_angles=args.angles,
            slice_spacing_mm=args.slice_spacing,
            kernels=specs,
            patient_offset=args.first_patient,
            progress=progress,
        ),
        desc="simulate",
        unit="series",
    )
    if record is None:
        return code
    n_series = sum(len(p["series"]) for p in record["patients"])
    print(
        f"wrote {n_series} series ({args.patients} patients x {len(specs)} kernels x {args.slices} slices) "
        f"to {args.out} in {record['settings']['seconds']:.0f} s"
    )
    for row in record["calibration"]:
        print(
            f"  {row['domain']:9s} NPS peak {row['nps_peak_full_per_mm']:.2f}/mm (fast "
            f"{row['nps_peak_fast_per_mm']:.2f}), noise SD {row['noise_sd_water250_full_hu']:.1f} HU, "
            f"MTF50 {format_mtf(row['mtf50_per_mm'])}"
        )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
