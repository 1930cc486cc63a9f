"""The paper's evaluation of one or two model files on a prepared dataset's test split.

    python -m Training.evaluate --dataset DATASET --model M.safetensors [--compare B.safetensors] --out DIR

FID (Table I), radiomics alignment (Table II), structure preservation, FRD and, on simulated data, paired
metrics against the true target. The work is ``Training.evaluation.evaluate``; this module parses
arguments and shows progress.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from Training.command import fail, run_command
from Training.evaluation.evaluate import ALL_METRICS, EvaluationError, default_cache_dir, evaluate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m Training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="prepared dataset folder (manifest.csv); its test split")
    p.add_argument("--model", default=None, help="model file (.safetensors); default: the bundled model")
    p.add_argument("--compare", default=None, help="second model shown side by side (e.g. the baseline)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--metrics",
        default=None,
        help=f"comma list of {','.join(ALL_METRICS)} (default: all the data allows)",
    )
    p.add_argument("--max-slices", type=int, default=None, help="at most N evenly spaced slices per domain")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes for radiomics extraction (default: all cores)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help="FID Inception weights file (default $TORCH_HOME/hub/checkpoints/"
        "pt_inception-2015-12-05-6726825d.pth); 'random-for-testing' = random network, "
        "values NOT COMPARABLE",
    )
    p.add_argument(
        "--fid-dims",
        type=int,
        default=2048,
        choices=(64, 192, 768, 2048),
        help="Inception feature block (2048 = standard FID; smaller only for quick tests)",
    )
    p.add_argument("--cache-dir", default=None, help=f"radiomics cache (default {default_cache_dir()})")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=4, help="slices per generator batch")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_slices is not None and args.max_slices < 2:
        return fail("--max-slices must be at least 2 (statistics need two slices per domain)")
    if args.workers < 1:
        return fail("--workers must be at least 1")
    models = [args.model] + ([args.compare] if args.compare else [])
    code, results = run_command(
        lambda progress: evaluate(
            args.dataset,
            models,
            args.out,
            metrics=args.metrics,
            max_slices_per_domain=args.max_slices,
            workers=args.workers,
            inception_weights=args.inception_weights,
            fid_dims=args.fid_dims,
            cache_dir=args.cache_dir,
            device=args.device,
            batch_size=args.batch_size,
            progress=progress,
        ),
        desc="evaluate",
        unit="slice",
        errors=(EvaluationError,),
        interrupted="cancelled; nothing written",
    )
    if results is None:
        return code
    print(f"wrote {Path(args.out) / 'report.md'}")
    for note in results["notes"]:
        print(f"note: {note}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
