"""Validation on real paired reconstructions (one acquisition, two kernels): model vs classical baselines.

    python -m Training.validate_real --pair SHARP_DIR SMOOTH_DIR [--pair ...] --out DIR [--model M]
        [--compare M2] [--slices A:B] [--fit-slices A:B] [--target-smooth K --target-sharp K]
        [--no-clinical] [--workers W]

Baselines (identity, best Gaussian blur, linear kernel-transfer filter) are fitted on --fit-slices (default
the first half), every method is scored on --slices (default the second half), including the clinical
quantities (%LAA-950, PD15, Bland-Altman per slice, radiomic CCC; --no-clinical skips them). The work is
``Training.evaluation.validate_real``; this module parses arguments and shows progress.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from Training.command import run_command
from Training.evaluation.validate_real import ValidationError, validate_real


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m Training.validate_real", description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", nargs=2, action="append", required=True, metavar=("SHARP_DIR", "SMOOTH_DIR"),
                   help="DICOM folders of the sharp and the smooth reconstruction of one acquisition "
                        "(repeatable)")
    p.add_argument("--out", required=True, help="output folder (results.json, table.csv, report.md, PNGs)")
    p.add_argument("--model", default=None, help="model file (.safetensors); default: the bundled model")
    p.add_argument("--compare", default=None, help="second model scored side by side")
    p.add_argument("--slices", default=None, help="evaluated slices A:B (0-based, B exclusive; default "
                                                  "the second half)")
    p.add_argument("--fit-slices", default=None, help="slices the baselines are fitted on (default the "
                                                      "first half); must not overlap --slices")
    p.add_argument("--target-smooth", default=None,
                   help="model domain for the smooth series when the model does not recognise its kernel")
    p.add_argument("--target-sharp", default=None,
                   help="model domain for the sharp series when the model does not recognise its kernel")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--no-clinical", action="store_true",
                   help="skip the clinical quantities (lung density, Bland-Altman, radiomic CCC; the "
                        "radiomics take time)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes for the radiomic features of the clinical part (default 1)")
    return p


def _print_clinical(head: str, cs: dict) -> None:
    for note in cs["notes"]:
        print(f"{head}: clinical: {note}")
    for name, row in cs["methods"].items():
        parts = []
        if row.get("laa950") is not None:
            parts.append(f"%LAA-950 {row['laa950']:.2f}, PD15 {row['pd15']:.1f} HU")
        shares = {k[len("ccc_share_"):]: v for k, v in row.items()
                  if k.startswith("ccc_share_") and v is not None}
        if shares:
            parts.append("CCC >= 0.85: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in shares.items()))
        if parts:
            print(f"{head}: clinical, {name}: {'; '.join(parts)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code, summary = run_command(
        lambda progress: validate_real(
            [tuple(p) for p in args.pair], args.out, model=args.model, compare=args.compare,
            slices=args.slices, fit_slices=args.fit_slices, target_smooth=args.target_smooth,
            target_sharp=args.target_sharp, device=args.device, overwrite=args.overwrite,
            clinical=not args.no_clinical, workers=args.workers, progress=progress,
        ),
        desc="validate", unit="step", errors=(ValidationError,),
        interrupted="interrupted; nothing was written",
    )
    if summary is None:
        return code
    for pair in summary["pairs"]:
        for res in pair["directions"].values():
            v = res["verdict"]
            for name, r in v.items():
                if name != "best_baseline":
                    err = res["methods"][name].get("transfer_low_error")
                    hint = (f"; its transfer is {err:+.1%} off the real one at 0.1-0.3 cycles/mm: calibrate "
                            "its kernels (python -m Training.calibrate_kernels)"
                            if r.get("calibrate_kernels") else "")
                    print(f"{pair['pair']} {res['source_kernel']} -> {res['target_kernel']}: {name} "
                          f"beats the best baseline ({v['best_baseline']}) on RMSE and NPS: "
                          f"{'yes' if r['beats_best_baseline'] else 'no'}{hint}")
            if "clinical_summary" in res:
                _print_clinical(f"{pair['pair']} {res['source_kernel']} -> {res['target_kernel']}",
                                res["clinical_summary"])
        print(f"{pair['pair']}: {pair['seconds']['total']:.1f} s")
    print(f"wrote {Path(args.out) / 'report.md'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
