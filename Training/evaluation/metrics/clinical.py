"""Clinical quantities of harmonized images against the real (or true simulated) target kernel.

Input is generic: HU slices of several methods (input, model, baselines...) and of the target, all of the
same anatomy, pixel-aligned. For each method it measures what a radiologist or radiomics study computes:
- lung density (``lung_density``): %LAA-950, %LAA-910, PD15, MLD per slice and per series, and
  Bland-Altman agreement per slice of %LAA-950 and PD15 with the target;
- radiomic reproducibility (``radiomic_reproducibility``): per-feature CCC with the target over matched
  ROIs, share with CCC >= 0.85, median CCC per feature class.

One lung mask per slice, segmented on the *target* (``structure.lung_mask``), serves every method: the
comparison then measures the kernel's effect on density, not segmentation differences. A mask that holds
mostly air (``lung_density.is_parenchyma``: the hollow skull of a head phantom) is not lung. A series
without lungs (a head) gets a note instead of lung numbers; the radiomics still run on its other regions.

``ClinicalComparison`` accumulates slice by slice (bounded memory inside a streaming evaluation);
``clinical_comparison`` is the one-call form for whole series. ``results`` is JSON-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from Training.evaluation.metrics import radiomic_reproducibility as rr
from Training.evaluation.metrics.agreement import bland_altman
from Training.evaluation.metrics.lung_density import QUANTITIES, DensityHistogram, is_parenchyma

BLAND_ALTMAN_QUANTITIES = ("laa950", "pd15")
NO_LUNGS_NOTE = "no lungs found in the target series: lung quantities skipped (radiomic CCC kept)"
LUNG_MASK_NOTE = "lung mask: structure.lung_mask on the target slice, the same mask for every method"


class ClinicalComparison:
    """Accumulates matched slices of several methods and the target; ``results`` computes everything."""

    def __init__(
        self,
        spacing_mm: float,
        target: str = "target",
        *,
        roi_size_mm: float = rr.ROI_MM,
        max_rois_per_region: int = rr.MAX_ROIS_PER_REGION,
        radiomics: bool = True,
    ) -> None:
        self.spacing_mm = float(spacing_mm)
        self.target = target
        self.roi_size_mm = roi_size_mm
        self.max_rois_per_region = max_rois_per_region
        self.radiomics = radiomics
        self.methods: list[str] = []
        self.n_slices = 0
        self.air_only_slices = 0
        self.series: dict[str, DensityHistogram] = {}
        self.per_slice: dict[str, dict[str, list[float | None]]] = {}
        self.roi_regions: list[str] = []
        self.patches: dict[str, list[np.ndarray]] = {}

    def _names(self, methods: Mapping[str, np.ndarray]) -> list[str]:
        names = list(methods)
        if self.target in names:
            raise ValueError(f"a method may not be called like the target ({self.target!r})")
        if not self.methods:
            self.methods = names
            for n in [*names, self.target]:
                self.series[n] = DensityHistogram()
                self.per_slice[n] = {q: [] for q in QUANTITIES}
                self.patches[n] = []
        elif names != self.methods:
            raise ValueError(f"methods changed between slices: {names} vs {self.methods}")
        return names

    def add_slice(self, methods: Mapping[str, np.ndarray], target_hu: np.ndarray) -> None:
        """One slice (2D HU) of every method and of the target, pixel-aligned."""
        from Training.evaluation.metrics.structure import lung_mask

        names = self._names(methods)
        images = {n: np.asarray(methods[n], dtype=np.float32) for n in names}
        images[self.target] = np.asarray(target_hu, dtype=np.float32)
        shapes = {im.shape for im in images.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"expected 2D slices of one shape, got {sorted(shapes)}")
        lungs = lung_mask(images[self.target], self.spacing_mm)
        if lungs.any() and not is_parenchyma(images[self.target], lungs, self.spacing_mm):
            lungs = np.zeros_like(lungs)
            self.air_only_slices += 1
        for n, im in images.items():
            q = DensityHistogram().add(im, lungs)
            self.series[n].merge(q)
            values = q.quantities()
            for key in QUANTITIES:
                self.per_slice[n][key].append(None if values is None else getattr(values, key))
        if self.radiomics:
            rois = rr.matched_rois(
                images[self.target],
                self.spacing_mm,
                lungs,
                size_mm=self.roi_size_mm,
                max_per_region=self.max_rois_per_region,
            )
            self.roi_regions += [r.region for r in rois]
            for n, im in images.items():
                self.patches[n] += [r.crop(im).copy() for r in rois]
        self.n_slices += 1

    def add_series(self, methods: Mapping[str, np.ndarray], target_hu: np.ndarray) -> None:
        """Whole (slices, rows, cols) stacks, slice by slice."""
        target_hu = np.asarray(target_hu)
        counts = {n: len(v) for n, v in methods.items()}
        if target_hu.ndim != 3 or any(c != target_hu.shape[0] for c in counts.values()):
            raise ValueError(f"stacks differ: target {target_hu.shape}, methods' slice counts {counts}")
        for i in range(target_hu.shape[0]):
            self.add_slice({n: v[i] for n, v in methods.items()}, target_hu[i])

    def _lungs(self) -> dict[str, Any] | None:
        tgt = self.series[self.target].quantities()
        if tgt is None:
            return None
        names = [*self.methods, self.target]
        return {
            "mask": LUNG_MASK_NOTE,
            "slices_with_lungs": sum(v is not None for v in self.per_slice[self.target]["laa950"]),
            "series": {n: (q.to_dict() if (q := self.series[n].quantities()) else None) for n in names},
            "per_slice": {n: {q: list(v) for q, v in per.items()} for n, per in self.per_slice.items()},
            "bland_altman": {
                m: {
                    key: bland_altman(
                        np.array(self.per_slice[m][key], dtype=np.float64),
                        np.array(self.per_slice[self.target][key], dtype=np.float64),
                    ).to_dict()
                    for key in BLAND_ALTMAN_QUANTITIES
                }
                for m in self.methods
            },
        }

    def results(
        self,
        *,
        workers: int = 1,
        pool: Any = None,
        cache_dir: str | Path | None = None,
        progress: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Everything, JSON-safe: lung quantities (or a note), radiomic reproducibility per region."""
        from Training.evaluation.metrics import radiomics_features as rf

        if not self.n_slices:
            raise ValueError("no slices added")
        out: dict[str, Any] = {
            "target": self.target,
            "methods": self.methods,
            "spacing_mm": self.spacing_mm,
            "slices": self.n_slices,
            "air_only_slices": self.air_only_slices,
            "notes": [],
        }
        out["lungs"] = self._lungs()
        if out["lungs"] is None:
            out["notes"].append(NO_LUNGS_NOTE)
        if self.air_only_slices:
            out["notes"].append(
                f"{self.air_only_slices} slice(s) where the lung mask held mostly air (a hollow phantom or "
                "gas, not lung parenchyma): no lungs there"
            )
        if self.radiomics:
            names = list(rf.feature_names())
            order = [*self.methods, self.target]
            allp = [p for n in order for p in self.patches[n]]
            n_roi = len(self.roi_regions)
            rad: dict[str, Any] = {
                "roi_mm": self.roi_size_mm,
                "roi_px": rr.roi_size_px(self.spacing_mm, self.roi_size_mm),
                "rois": {reg: self.roi_regions.count(reg) for reg in rr.REGIONS},
                "threshold": rr.CCC_REPRODUCIBLE,
                "regions": {},
            }
            if n_roi >= 2:
                table = rr.patch_features(
                    allp,
                    self.spacing_mm,
                    workers=workers,
                    pool=pool,
                    cache_dir=cache_dir,
                    progress=progress,
                    cancel=cancel,
                )
                feats = {n: table[i * n_roi : (i + 1) * n_roi] for i, n in enumerate(order)}
                rad["regions"] = rr.reproducibility_by_region(feats, self.target, self.roi_regions, names)
            else:
                out["notes"].append(f"radiomic CCC skipped: {n_roi} matched ROI(s), at least 2 needed")
            out["radiomics"] = rad
        return out


def clinical_comparison(
    methods: Mapping[str, np.ndarray],
    target_hu: np.ndarray,
    spacing_mm: float,
    *,
    target: str = "target",
    workers: int = 1,
    pool: Any = None,
    cache_dir: str | Path | None = None,
    roi_size_mm: float = rr.ROI_MM,
    max_rois_per_region: int = rr.MAX_ROIS_PER_REGION,
    radiomics: bool = True,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Clinical agreement of each method's (slices, rows, cols) HU stack with ``target_hu``'s.

    ``methods``: {name: stack}, e.g. {"input": L, "identity": L, "gaussian blur": ..., "model": ...};
    ``spacing_mm``: in-plane pixel spacing. Returns the JSON-safe dict that ``clinical_report`` renders.
    """
    comp = ClinicalComparison(
        spacing_mm,
        target,
        roi_size_mm=roi_size_mm,
        max_rois_per_region=max_rois_per_region,
        radiomics=radiomics,
    )
    comp.add_series(methods, target_hu)
    return comp.results(workers=workers, pool=pool, cache_dir=cache_dir, progress=progress, cancel=cancel)
