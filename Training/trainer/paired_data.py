"""Paired training data for the kernel-transfer model: groups of pixel-aligned reconstructions of one object.

A ``PairedGroup`` holds one object (a simulated variant, or a real acquisition reconstructed with several
kernels) as {domain name: (slices, rows, cols) int16 HU}, all on one grid. ``PairSampler`` draws aligned
crops (source domain, target domain) centred on body pixels, at the group's own pixel size.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from TextureStarGANCore.masks import body_mask
from TextureStarGANCore.volume_io import read_volume

__all__ = ["PairedGroup", "PairSampler", "load_simulated_groups", "real_pair_group"]


@dataclass
class PairedGroup:
    name: str
    origin: str  # "simulated" or "real"
    spacing_xy: tuple[float, float]
    series: dict[str, np.ndarray]  # domain name -> (slices, rows, cols) int16 HU
    centres: list[np.ndarray] = field(default_factory=list)  # body pixel (row, col) per slice

    def __post_init__(self) -> None:
        shapes = {a.shape for a in self.series.values()}
        if len(shapes) != 1:
            raise ValueError(f"{self.name}: series of one group must share one grid, got {shapes}")
        if not self.centres:
            ref = next(iter(self.series.values()))
            # Every 4th body pixel is plenty of crop centres and keeps memory small.
            self.centres = [np.argwhere(body_mask(s.astype(np.float32)))[::4].astype(np.int32) for s in ref]

    @property
    def slices(self) -> int:
        return len(self.centres)


def _int16(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def load_simulated_groups(
    root: str | Path, domains: Sequence[str], progress: Callable[[int, int], None] | None = None
) -> list[PairedGroup]:
    """Every variant of a ``Training.simulate --anatomy`` tree (``simulation.json``), restricted to
    ``domains`` (catalogue names)."""
    root = Path(root)
    record = json.loads((root / "simulation.json").read_text())
    patients = record.get("patients") or record.get("variants") or []
    groups = []
    for i, p in enumerate(patients):
        series = {}
        spacing = None
        for s in p["series"]:
            if s["domain"] not in domains:
                continue
            vol = read_volume(root / s["folder"])
            series[s["domain"]] = _int16(vol.hu)
            spacing = (float(vol.spacing[0]), float(vol.spacing[1]))
        if len(series) >= 2 and spacing is not None:
            groups.append(PairedGroup(p["patient"], "simulated", spacing, series))
        if progress:
            progress(i + 1, len(patients))
    return groups


def real_pair_group(name: str, volumes: dict[str, object], rows: Sequence[int]) -> PairedGroup:
    """A real acquisition reconstructed with several kernels: {domain name: CTVolume}, slices ``rows``."""
    idx = list(rows)
    first = next(iter(volumes.values()))
    spacing = (float(first.spacing[0]), float(first.spacing[1]))  # type: ignore[attr-defined]
    series = {d: _int16(v.hu[idx]) for d, v in volumes.items()}  # type: ignore[attr-defined]
    return PairedGroup(name, "real", spacing, series)


class PairSampler:
    """Aligned (source, target) crops: a group (real ones with probability ``real_fraction``), a slice, two
    of its domains (the same one with probability ``identity_fraction``) and a body-centred crop."""

    def __init__(self, groups: Sequence[PairedGroup], domain_index: dict[str, int], crop: int,
                 real_fraction: float, identity_fraction: float, seed: int) -> None:
        self.sim = [g for g in groups if g.origin != "real"]
        self.real = [g for g in groups if g.origin == "real"]
        if not self.sim and not self.real:
            raise ValueError("no paired training data")
        self.index = domain_index
        self.crop = crop
        self.real_fraction = real_fraction if self.real and self.sim else (1.0 if self.real else 0.0)
        self.identity_fraction = identity_fraction
        self.rng = np.random.default_rng(seed)

    def _one(self) -> tuple[np.ndarray, np.ndarray, int, int, tuple[float, float], bool]:
        rng = self.rng
        pool = self.real if rng.random() < self.real_fraction else self.sim
        g = pool[int(rng.integers(len(pool)))]
        k = int(rng.integers(g.slices))
        names = list(g.series)
        src = names[int(rng.integers(len(names)))]
        others = [n for n in names if n != src]
        tgt = src if (rng.random() < self.identity_fraction or not others) else others[
            int(rng.integers(len(others)))]
        shape = g.series[src].shape[1:]
        c = self.crop
        cen = g.centres[k]
        r, q = cen[int(rng.integers(len(cen)))] if len(cen) else (shape[0] // 2, shape[1] // 2)
        r0 = int(np.clip(r - c // 2, 0, shape[0] - c))
        q0 = int(np.clip(q - c // 2, 0, shape[1] - c))
        window = (k, slice(r0, r0 + c), slice(q0, q0 + c))
        return (g.series[src][window].astype(np.float32), g.series[tgt][window].astype(np.float32),
                self.index[src], self.index[tgt], g.spacing_xy, g.origin == "real")

    def batch(self, n: int) -> dict[str, object]:
        items = [self._one() for _ in range(n)]
        return {
            "source_hu": np.stack([it[0] for it in items])[:, None],
            "target_hu": np.stack([it[1] for it in items])[:, None],
            "source": np.array([it[2] for it in items]),
            "target": np.array([it[3] for it in items]),
            "spacing_xy": [it[4] for it in items],
            "real": np.array([it[5] for it in items]),
        }
