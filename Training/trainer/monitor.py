"""What the trainer shows while it runs: TensorBoard scalars and image grids, a JSON-lines log, PNG samples.

Only rank 0 writes. TensorBoard is optional at run time (the `train` extra); without it the JSON-lines log
and PNG grids are still written and a one-line notice says how to get TensorBoard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from TextureStarGANCore.fileio import atomic_output


def image_grid(rows: list[list[Tensor]], pad: int = 2) -> np.ndarray:
    """Tile (H, W) images in [-1, 1] into one uint8 grid (rows x columns) with white padding."""
    h, w = rows[0][0].shape[-2:]
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    grid = np.full((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            a = img.detach().float().cpu().reshape(h, w).clamp(-1, 1).numpy()
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            grid[y0 : y0 + h, x0 : x0 + w] = np.round((a + 1.0) * 127.5).astype(np.uint8)
    return grid


class Monitor:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "scalars.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("TensorBoard not installed (pip install 'ct-harmonization[train]'); "
                      "scalars go to scalars.jsonl only", file=sys.stderr)
            else:
                self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, iteration)
        self._jsonl.write(json.dumps({"iteration": iteration, **values}) + "\n")
        self._jsonl.flush()

    def images(self, iteration: int, tag: str, grid: np.ndarray) -> Path | None:
        """Write the grid to TensorBoard and as RUN_DIR/samples/<tag>_<iteration>.png (atomic)."""
        if not self.enabled:
            return None
        if self.writer is not None:
            self.writer.add_image(tag, grid[None], iteration, dataformats="CHW")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.image as mpimg

        out = self.run_dir / "samples" / f"{tag}_{iteration:08d}.png"
        with atomic_output(out) as tmp:
            mpimg.imsave(tmp, grid, cmap="gray", vmin=0, vmax=255, format="png")
        return out

    def text(self, tag: str, value: Any) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, str(value))

    def close(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        self._jsonl.close()
