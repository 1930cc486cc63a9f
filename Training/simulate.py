"""Simulate paired CT series: one object (phantom or real anatomy) reconstructed with every kernel.

    python -m Training.simulate --out DIR --patients N --slices S [--size PX] [--seed K] [--full-fbp]
    python -m Training.simulate --out DIR --anatomy CT_TREE --domains PHILIPS_B,PHILIPS_L,... [--variants V]
    python -m Training.simulate --list-domains [--json]

The simulator itself lives in ``Training.simulator``; this module parses arguments and shows progress.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from TextureStarGANCore.volume_io import InputError
from Training.command import fail, run_command
from Training.simulator import kernels as K
from Training.simulator.simulate import DEFAULT_SLICE_SPACING_MM, format_mtf, simulate


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m Training.simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="new output folder (must not exist or be empty)")
    ap.add_argument("--patients", type=int, help="number of simulated phantom patients")
    ap.add_argument("--slices", type=int, help="slices per series (anatomy: at most this many per source)")
    ap.add_argument("--list-domains", action="store_true", help="list the kernel catalogue and exit")
    ap.add_argument("--json", action="store_true", help="with --list-domains: JSON output")
    ap.add_argument("--anatomy", type=Path, help="folder tree of real CT series used as the object")
    ap.add_argument("--domains", help="comma-separated catalogue kernels to simulate (see --list-domains)")
    ap.add_argument("--variants", type=int, default=1, help="anatomy: augmented variants per source series")
    ap.add_argument(
        "--dose-range", default="0.25,2.0", help="anatomy: relative dose range (default 0.25,2.0)"
    )
    ap.add_argument(
        "--pixel-range", default="0.4,1.0", help="anatomy: pixel spacing range mm (default 0.4,1.0)"
    )
    ap.add_argument("--max-rotation", type=float, default=5.0, help="anatomy: max rotation in degrees")
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


def _range(text: str, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{name} must be two numbers 'LOW,HIGH', got {text!r}") from None
    return lo, hi


def _list_domains(as_json: bool) -> int:
    import json

    from Training.simulator.catalogue import CATALOGUE, describe

    rows = [describe(e) for e in CATALOGUE]
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{len(rows)} emulated kernels (MTF / NPS: the simulator's model at the listed pixel size)")
    print(
        f"{'name':26s} {'manufacturer':19s} {'model':22s} {'kernel':9s} {'px mm':>6s} {'MTF50':>6s} "
        f"{'MTF10':>6s} {'NPSpk':>6s}  source"
    )
    for r in rows:
        m50, m10 = (v if isinstance(v, float) else ">Nyq" for v in (r["mtf50_per_mm"], r["mtf10_per_mm"]))
        print(
            f"{r['name']:26s} {r['manufacturer']:19s} {r['scanner_model']:22s} {r['convolution_kernel']:9s} "
            f"{r['pixel_mm']:6.3f} {m50!s:>6s} {m10!s:>6s} {r['nps_peak_per_mm']:6.3f}  {r['source']}"
        )
    return 0


def _anatomy(args) -> int:
    from Training.simulator.catalogue import select
    from Training.simulator.simulate_anatomy import simulate_anatomy

    try:
        specs = select(args.domains or "PHILIPS_B,PHILIPS_L")
        dose, pixel = _range(args.dose_range, "--dose-range"), _range(args.pixel_range, "--pixel-range")
    except ValueError as exc:
        return fail(str(exc))
    code, record = run_command(
        lambda progress: simulate_anatomy(
            args.out,
            args.anatomy,
            specs,
            variants=args.variants,
            size=args.size,
            seed=args.seed,
            dose_range=dose,
            pixel_range=pixel,
            max_rotation_deg=args.max_rotation,
            max_slices=args.slices,
            progress=progress,
        ),
        desc="simulate",
        unit="variant",
        errors=(ValueError, InputError),
    )
    if record is not None:
        n = sum(p["slices"] for p in record["patients"])
        print(
            f"wrote {len(record['patients'])} patients x {len(specs)} kernels ({n} paired slices) to "
            f"{args.out} in {record['settings']['seconds']:.0f} s"
        )
        for skip in record["skipped_sources"]:
            print(f"  skipped {skip['source']}: {skip['reason']}")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_domains:
        return _list_domains(args.json)
    if args.out is None:
        return fail("--out is required (or --list-domains)")
    if args.anatomy is not None:
        if args.full_fbp:
            return fail("--full-fbp is for the phantom path; --anatomy uses the calibrated fast path only")
        return _anatomy(args)
    if args.patients is None or args.slices is None:
        return fail("the phantom path needs --patients and --slices (or give --anatomy PATH)")
    try:
        if args.domains:
            from Training.simulator.catalogue import select

            specs = select(args.domains)
        else:
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
