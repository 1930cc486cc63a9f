"""Compare every shared real CT series with its emulation on the same anatomy at matched noise.

    python -m Training.simulator_realism --out DIR [--real-root PATH] [--slices N] [--fit]

Writes DIR/realism.csv / .md / .json (noise SD, NPS peak and shape, edge width, pair noise ratios) and
NPS overlay PNGs. ``--fit`` prints the windows refitted on the pairs' first halves (for the catalogue).
The library is ``Training.simulator.realism``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from Training.command import run_command
from Training.simulator.realism import fit_pairs, realism


def default_real_root() -> Path:
    import os

    shared = Path(os.environ.get("CTH_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
    return shared / "data" / "real_ct"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m Training.simulator_realism", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--out", required=True, type=Path, help="output folder (created)")
    ap.add_argument("--real-root", type=Path, default=None, help="the shared real_ct folder")
    ap.add_argument("--slices", type=int, default=8, help="slices measured per series (default 8)")
    ap.add_argument("--fit", action="store_true", help="print windows refitted on the pairs' first halves")
    args = ap.parse_args(argv)
    root = args.real_root or default_real_root()
    if args.fit:
        code, fitted = run_command(lambda progress: fit_pairs(root), desc="fit", unit="pair")
        if fitted is not None:
            print(json.dumps(fitted, indent=1))
        return code
    code, rows = run_command(
        lambda progress: realism(root, args.out, slices=args.slices, progress=progress),
        desc="realism",
        unit="acquisition",
    )
    if rows is not None:
        print((args.out / "realism.md").read_text())
    return code


if __name__ == "__main__":
    raise SystemExit(main())
