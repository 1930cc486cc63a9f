"""Export a training checkpoint to the model file the engine and the Slicer module load.

    python -m Training.export RUN_DIR --out MODEL.safetensors [--checkpoint FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from Training.trainer.checkpointing import CheckpointError, latest_checkpoint
from Training.trainer.export import DEFAULT_NUM_LATENTS, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m Training.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="training run folder (holds checkpoints/)")
    ap.add_argument("--out", type=Path, required=True, help="model file to write (.safetensors)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a specific checkpoint (default: latest)")
    ap.add_argument("--num-latents", type=int, default=DEFAULT_NUM_LATENTS,
                    help="latents averaged per domain for the target style (default %(default)s)")
    ap.add_argument("--style-seed", type=int, default=0, help="seed of those latents (default %(default)s)")
    args = ap.parse_args(argv)
    ckpt = args.checkpoint or latest_checkpoint(args.run_dir)
    if ckpt is None:
        print(f"error: no checkpoint in {args.run_dir / 'checkpoints'}; train first or pass --checkpoint",
              file=sys.stderr)
        return 2
    if args.num_latents < 1:
        print("error: --num-latents must be >= 1", file=sys.stderr)
        return 2
    try:
        path = export_checkpoint(ckpt, args.out, run_dir=args.run_dir, num_latents=args.num_latents,
                                 style_seed=args.style_seed)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size_mb = path.stat().st_size / 1e6
    print(f"exported {ckpt.name} -> {path} ({size_mb:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
