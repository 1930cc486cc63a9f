"""The evaluation's view of a prepared dataset: the test split per domain, through ``Training.data.dataset``.

Slices are addressed by ``array:row`` (stable keys for the feature cache). Simulated datasets pair
slices across kernels by (patient, slice_index), which gives the paired ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from TextureStarGANCore.preprocessing import PreprocessSpec, unit_to_hu
from Training.data.dataset import CTSliceDataset


@dataclass
class TestSet:
    dataset: CTSliceDataset
    domains: list[str]  # in domain-id order, only those present in the split
    slices: dict[str, list[int]]  # per domain: dataset indices, possibly subsampled

    @property
    def root(self) -> Path:
        return self.dataset.root

    @property
    def spec(self) -> PreprocessSpec:
        return self.dataset.spec

    @property
    def simulated(self) -> bool:
        return self.dataset.simulated

    @property
    def info(self) -> dict:
        return dict(self.dataset.info)

    def slice_id(self, index: int) -> str:
        r = self.dataset.rows[index]
        return f"{r.array}:{r.row}"

    def canvases(self, indices: list[int]) -> np.ndarray:
        """(N, S, S) float32 canvases in [-1, 1]."""
        s = self.spec.canvas_size
        out = np.empty((len(indices), s, s), dtype=np.float32)
        for i, idx in enumerate(indices):
            out[i] = self.dataset.canvas(idx)
        return out

    def to_hu(self, canvases: np.ndarray) -> np.ndarray:
        return unit_to_hu(np.asarray(canvases, np.float32), self.spec)

    def partner(self, index: int, domain: str) -> int | None:
        """Index of the same phantom slice reconstructed with ``domain`` (simulated data only)."""
        if not self.simulated:
            return None
        r = self.dataset.rows[index]
        for j in self.dataset.pairs_index().get((r.patient, r.slice_index), []):
            if self.dataset.rows[j].domain == domain:
                return j
        return None


def _subsample(indices: list[int], n: int | None) -> list[int]:
    if n is None or len(indices) <= n:
        return indices
    pick = np.unique(np.linspace(0, len(indices) - 1, n).round().astype(int))
    return [indices[i] for i in pick]


def load_test_set(
    root: str | Path, max_slices_per_domain: int | None = None, split: str = "test", origin: str | None = None
) -> TestSet:
    """Read a prepared dataset's ``split``; ``max_slices_per_domain`` picks evenly spaced slices (in
    patient / slice order) per domain; ``origin`` ("real" / "simulated") keeps one kind of series only.
    Raises ``Training.data.dataset.DatasetError`` (a ValueError)."""
    ds = CTSliceDataset(root, split, origin=origin)
    per: dict[str, list[int]] = {}
    order = sorted(range(len(ds.rows)), key=lambda i: (ds.rows[i].patient, ds.rows[i].slice_index, i))
    for i in order:
        per.setdefault(ds.rows[i].domain, []).append(i)
    names = [d.name for d in ds.domains if d.name in per] + sorted(
        d for d in per if d not in {x.name for x in ds.domains}
    )
    return TestSet(ds, names, {d: _subsample(per[d], max_slices_per_domain) for d in names})
