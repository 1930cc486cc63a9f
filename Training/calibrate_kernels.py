"""Calibrate a kernel-transfer model to a new scanner from one paired acquisition (two kernels, same data).

    python -m Training.calibrate_kernels --pair SHARP_DIR SMOOTH_DIR [--pair ...] --out NEW.safetensors
        [--model M] [--fit-slices A:B] [--sharp-domain D] [--smooth-domain D] [--like-sharp D]
        [--like-smooth D] [--iters 400] [--noise-steps 150] [--seed 0] [--overwrite]

Only the two kernels' curves and embeddings change (``Training/trainer/kernel_calibration.py``); every
other direction of the model gives the same output as before. A kernel the model does not know becomes a
new domain named from the DICOM tags. The fit uses --fit-slices (default the first half, so that
``python -m Training.validate_real --model NEW.safetensors`` scores slices the calibration never saw).
About 3 minutes on 2 CPU cores. The input model is never changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from TextureStarGANCore.domains import UnknownDomainError
from TextureStarGANCore.model_file import ModelFileError

from .command import run_command
from .evaluation.real_pairs import PairingError
from .trainer.kernel_calibration import CalibrationError, calibrate_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m Training.calibrate_kernels",
                                description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", nargs=2, action="append", required=True, metavar=("SHARP_DIR", "SMOOTH_DIR"),
                   help="DICOM folders of two reconstructions of one acquisition (repeatable)")
    p.add_argument("--out", required=True, help="the calibrated model file to write (.safetensors)")
    p.add_argument("--model", default=None, help="model to calibrate (default: the bundled model)")
    p.add_argument("--fit-slices", default=None, help="slices A:B to fit on (default the first half)")
    p.add_argument("--sharp-domain", default=None, help="model domain of the first series of each pair "
                                                        "(default: from its DICOM tags)")
    p.add_argument("--smooth-domain", default=None, help="model domain of the second series")
    p.add_argument("--like-sharp", default=None, help="a new kernel's curves start from this domain "
                                                      "(default: the source estimator's choice)")
    p.add_argument("--like-smooth", default=None, help="the same for the second series")
    p.add_argument("--iters", type=int, default=400, help="optimisation steps (default 400)")
    p.add_argument("--noise-steps", type=int, default=150,
                   help="steps of the noise-curve fit (models with noise synthesis; default 150)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code, summary = run_command(
        lambda progress: calibrate_model(
            args.model, [tuple(p) for p in args.pair], args.out, fit_slices=args.fit_slices,
            sharp_domain=args.sharp_domain, smooth_domain=args.smooth_domain, like_sharp=args.like_sharp,
            like_smooth=args.like_smooth, iters=args.iters, noise_steps=args.noise_steps, seed=args.seed,
            overwrite=args.overwrite, progress=progress),
        desc="calibrate", unit="it",
        errors=(CalibrationError, PairingError, ModelFileError, UnknownDomainError, OSError),
        interrupted="interrupted; nothing was written",
    )
    if summary is not None:
        print(json.dumps(summary, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
