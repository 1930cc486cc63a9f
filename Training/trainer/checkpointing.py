"""Resumable training checkpoints: atomic writes, keep the last K, full state, safe loading.

A checkpoint holds everything needed to continue as if never stopped: networks, EMA copies, optimizers
(and the texture aggregation with its optimizer), the iteration, every rank's RNG states (python, numpy,
torch, CUDA) and data-sampler position. Only tensors and plain Python containers are stored, so
`torch.load(..., weights_only=True)` reads it without executing code.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from TextureStarGANCore.fileio import write_bytes_atomic

CKPT_DIR = "checkpoints"
_PATTERN = re.compile(r"^ckpt_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match this run."""


def checkpoint_path(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"ckpt_{iteration:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of complete checkpoints, oldest first (temporary files are ignored)."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _PATTERN.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(run_dir: Path, iteration: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write atomically (temporary file in the same folder, fsync, rename), then prune to the last K."""
    path = checkpoint_path(run_dir, iteration)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue(), fsync=True)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, pickle with code, not a torch file
        raise CheckpointError(
            f"cannot read checkpoint {path}: {exc}. Delete it to resume from the previous one."
        ) from None
    required = {"iteration", "nets", "ema", "optimizers", "rng", "data", "config"}
    missing = sorted(required - set(state) if isinstance(state, dict) else required)
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {missing}; it was not written by this trainer")
    return state


# RNG state <-> plain containers (numpy's state holds an ndarray, which weights_only loading refuses) -----
def capture_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    rng: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
