"""Can a learned residual beat the linear kernel-transfer filter on a real pair? A feasibility check for a
"linear filter + learned residual" generator.

    python -m Training.diagnostics.residual_check --pair SHARP_DIR SMOOTH_DIR --out DIR
        [--train-pair SHARP_DIR SMOOTH_DIR ...] [--slices A:B] [--fit-slices A:B] [--steps 1500]

The linear filter sharp -> smooth is fitted as ``Training.validate_real`` fits it. A small CNN then learns a
residual added to the filtered image (its last layer starts at zero, so training starts exactly at the
filter): on the pair's fit slices, or with ``--train-pair`` only on those other pairs (for example
simulated ones, to see whether they transfer); the filter is then fitted on them too. The RMSE inside the
body on the evaluated slices is reported for identity, the filter and filter + residual; DIR gets
``residual_check.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from TextureStarGANCore.fileio import write_json_atomic
from TextureStarGANCore.masks import body_mask
from TextureStarGANCore.transfer_filter import TransferFilter, fit_transfer_filter
from Training.command import run_command
from Training.evaluation.metrics.paired import rmse_hu
from Training.evaluation.real_pairs import PairingError, SeriesPair, load_pair, split_slices

PATCH = 64  # training patches centred on body pixels
HU_SCALE = 500.0  # network input scale: soft tissue and lung both within a few units


class ResidualNet(nn.Module):
    """output = filtered + residual(input, filtered); the residual is zero at initialisation."""

    def __init__(self, width: int = 32, depth: int = 6) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(2, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        last = nn.Conv2d(width, 1, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(*layers, last)

    def forward(self, x: torch.Tensor, filtered: torch.Tensor) -> torch.Tensor:
        return filtered + HU_SCALE * self.body(torch.cat([x, filtered], 1) / HU_SCALE)


def _patches(rng: np.random.Generator, stacks: list[tuple[np.ndarray, ...]], centres: list[list[np.ndarray]],
             n: int) -> tuple[torch.Tensor, ...]:
    """``n`` aligned patches (source, filtered, target) centred on body pixels of random slices."""
    out: list[list[np.ndarray]] = [[], [], []]
    for _ in range(n):
        v = int(rng.integers(len(stacks)))
        k = int(rng.integers(len(centres[v])))
        r, c = centres[v][k][rng.integers(len(centres[v][k]))]
        rows, cols = stacks[v][0].shape[1:]
        r0 = int(np.clip(r - PATCH // 2, 0, rows - PATCH))
        c0 = int(np.clip(c - PATCH // 2, 0, cols - PATCH))
        for j in range(3):
            out[j].append(stacks[v][j][k, r0:r0 + PATCH, c0:c0 + PATCH])
    # Clipped like the RMSE (air and metal would dominate a squared loss otherwise).
    return tuple(torch.from_numpy(np.clip(np.stack(o), -1024.0, 3000.0))[:, None] for o in out)


def train_residual(
    stacks: list[tuple[np.ndarray, np.ndarray, np.ndarray]], *, steps: int, width: int = 32, depth: int = 6,
    batch: int = 16, lr: float = 1e-3, seed: int = 0, progress: Callable[[int, int], None] | None = None,
) -> tuple[ResidualNet, list[float]]:
    """Train on (source, filtered, target) HU stacks; the net and its loss (RMSE HU) every 50 steps."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = ResidualNet(width, depth)
    opt = torch.optim.Adam(net.parameters(), lr)
    centres = [[np.argwhere(body_mask(t)) for t in target] for _, _, target in stacks]
    for v, per_slice in enumerate(centres):
        centres[v] = [c for c in per_slice if len(c)] or [np.array([[PATCH // 2, PATCH // 2]])]
    losses = []
    for step in range(steps):
        x, xf, y = _patches(rng, stacks, centres, batch)
        loss = ((net(x, xf) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            losses.append(float(loss.detach()) ** 0.5)
        if progress is not None:
            progress(step + 1, steps)
    return net, losses


@torch.inference_mode()
def apply_residual(net: ResidualNet, source: np.ndarray, filtered: np.ndarray, batch: int = 4) -> np.ndarray:
    out = np.empty_like(filtered, dtype=np.float32)
    for k in range(0, len(source), batch):
        x = torch.from_numpy(np.ascontiguousarray(source[k:k + batch], np.float32))[:, None]
        xf = torch.from_numpy(np.ascontiguousarray(filtered[k:k + batch], np.float32))[:, None]
        out[k:k + batch] = net(x, xf)[:, 0].numpy()
    return out


def _hu(pair: SeriesPair, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    idx = list(rows)
    return pair.sharp.hu[idx].astype(np.float32), pair.smooth.hu[idx].astype(np.float32)


def check(
    pair: SeriesPair, out: Path, *, train_pairs: Sequence[SeriesPair] = (), slices: str | None = None,
    fit_slices: str | None = None, steps: int = 1500, width: int = 32, depth: int = 6, seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Fit, train, score; writes ``out/residual_check.json`` and returns its content."""
    fit, ev = split_slices(pair.slices, slices, fit_slices)
    t0 = time.perf_counter()
    if train_pairs:
        sources = [_hu(p, range(p.slices)) + (p.spacing_xy,) for p in train_pairs]
        trained_on = [p.name for p in train_pairs]
    else:
        sources = [_hu(pair, fit) + (pair.spacing_xy,)]
        trained_on = [f"{pair.name} slices {fit.start}:{fit.stop}"]
    # One response in cycles/mm for every training pair: fitted on the first (its pixel size applies).
    filt: TransferFilter = fit_transfer_filter(sources[0][0], sources[0][1], sources[0][2])
    stacks = [(s, filt.apply(s, sp).astype(np.float32), t) for s, t, sp in sources]
    net, losses = train_residual(stacks, steps=steps, width=width, depth=depth, seed=seed, progress=progress)
    sharp, smooth = _hu(pair, ev)
    filtered = filt.apply(sharp, pair.spacing_xy).astype(np.float32)
    masks = np.stack([body_mask(t) for t in smooth])
    rows = {
        "identity": rmse_hu(sharp, smooth, masks),
        "linear filter": rmse_hu(filtered, smooth, masks),
        "linear filter + residual": rmse_hu(apply_residual(net, sharp, filtered), smooth, masks),
    }
    result = {
        "pair": pair.name, "kernels": list(pair.kernels), "direction": "sharp -> smooth",
        "evaluated_slices": [ev.start, ev.stop], "trained_on": trained_on, "steps": steps,
        "network": {"width": width, "depth": depth, "parameters": sum(p.numel() for p in net.parameters())},
        "rmse_hu": rows, "train_loss_rmse_hu_every_50_steps": losses,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(out / "residual_check.json", result, indent=2)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m Training.diagnostics.residual_check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", nargs=2, required=True, metavar=("SHARP_DIR", "SMOOTH_DIR"),
                    help="the real pair to score (and to train on, without --train-pair)")
    ap.add_argument("--train-pair", nargs=2, action="append", default=[], metavar=("SHARP_DIR", "SMOOTH_DIR"),
                    help="train only on these pairs (repeatable), e.g. simulated ones")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--slices", default=None, help="evaluated slices A:B (default: the second half)")
    ap.add_argument("--fit-slices", default=None, help="training slices A:B (default: the first half)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def task(progress: Callable[..., None]) -> dict:
        pair = load_pair(*args.pair)
        train = [load_pair(*p) for p in args.train_pair]
        return check(pair, args.out, train_pairs=train, slices=args.slices, fit_slices=args.fit_slices,
                     steps=args.steps, width=args.width, depth=args.depth, seed=args.seed, progress=progress)

    code, result = run_command(task, desc="train", unit="step", errors=(PairingError, ValueError, OSError))
    if result is not None:
        for name, value in result["rmse_hu"].items():
            print(f"{name:26s} RMSE {value:6.2f} HU")
    return code


if __name__ == "__main__":
    sys.exit(main())
