"""Export a training checkpoint to the model file the engine and the Slicer module load.

    python -m Training.export RUN_DIR --out MODEL.safetensors [--checkpoint FILE] [--filters-from DATASET]
        [--no-filters]

Linear kernel-transfer filters (``ctharmonize harmonize --method filter``) are fitted on the paired slices
of the training data (the run's dataset unless --filters-from names one); on unpaired (real) data the
model file is written without them, and the exporter says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from Training.data.dataset import DatasetError
from Training.trainer.checkpointing import CheckpointError, latest_checkpoint, load_checkpoint
from Training.trainer.export import DEFAULT_NUM_LATENTS, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m Training.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="training run folder (holds checkpoints/)")
    ap.add_argument("--out", type=Path, required=True, help="model file to write (.safetensors)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a specific checkpoint (default: latest)")
    ap.add_argument("--num-latents", type=int, default=DEFAULT_NUM_LATENTS,
                    help="latents averaged per domain for the target style (default %(default)s)")
    ap.add_argument("--style-seed", type=int, default=0, help="seed of those latents (default %(default)s)")
    ap.add_argument("--filters-from", type=Path, default=None,
                    help="simulated dataset to fit the transfer filters on (default: the run's data)")
    ap.add_argument("--no-filters", action="store_true", help="write the model file without transfer filters")
    args = ap.parse_args(argv)
    ckpt = args.checkpoint or latest_checkpoint(args.run_dir)
    if ckpt is None:
        print(f"error: no checkpoint in {args.run_dir / 'checkpoints'}; train first or pass --checkpoint",
              file=sys.stderr)
        return 2
    if args.num_latents < 1:
        print("error: --num-latents must be >= 1", file=sys.stderr)
        return 2
    filters = None if args.no_filters else _fit_filters(ckpt, args.filters_from)
    try:
        path = export_checkpoint(ckpt, args.out, run_dir=args.run_dir, num_latents=args.num_latents,
                                 style_seed=args.style_seed, transfer_filters=filters)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if filters:
        print(f"transfer filters: {len(filters)} ({filters[0]['fitted_on']})")
    size_mb = path.stat().st_size / 1e6
    print(f"exported {ckpt.name} -> {path} ({size_mb:.1f} MB)")
    return 0


def _fit_filters(checkpoint: Path, dataset: Path | None) -> list | None:
    """Fitted transfer filters, or None with a note saying why there are none (never fails the export)."""
    from Training.trainer.transfer_filters import fit_domain_filters

    if dataset is None:
        try:
            data = load_checkpoint(checkpoint).get("run_info", {}).get("data")
        except CheckpointError:
            data = None
        dataset = Path(data) if data else None
    if dataset is None or not dataset.is_dir():
        print(f"note: no transfer filters: the training data {dataset} is not available (--filters-from)",
              file=sys.stderr)
        return None
    try:
        return fit_domain_filters(dataset)
    except DatasetError as exc:
        print(f"note: no transfer filters: {exc}", file=sys.stderr)
        return None


if __name__ == "__main__":
    sys.exit(main())
