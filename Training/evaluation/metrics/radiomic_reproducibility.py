"""Radiomic reproducibility between a method's images and the target kernel's, over matched ROIs.

As in kernel-reproducibility studies (Choe et al., Radiology 2019: CCC >= 0.85 counts as reproducible), each
of the 102 pyradiomics features (``radiomics_features``) is measured on the same regions in both images and
compared with Lin's CCC across regions. Regions are square, lesion-sized ROIs (``ROI_MM``) on a grid,
placed on the *target* image and cut at the same pixels from every method's image:
- ``lung``: the whole square inside the lung mask (``structure.lung_mask``, the structure metric's);
- ``soft_tissue``: the whole square inside the body, away from the lungs, mean HU in ``SOFT_TISSUE_MEAN_HU``;
- ``other``: the rest of the squares inside the body, away from the lungs (bone, mixed tissue, air
  cavities such as a head phantom's hollow skull), so that a series without lungs or soft tissue still
  has matched regions.
CCC is computed per region class, because pooling lung and soft-tissue ROIs would make every first-order
feature look concordant (their ~900 HU gap dwarfs any kernel effect).
Every ROI is its own mask, so shape2D features are identical in every image and constant across ROIs:
their CCC is undefined (NaN) and they are reported as such, not counted as reproducible.

Features are extracted in parallel (``radiomics_features.extract_patch_features``) and, with a cache
folder, cached by patch content, so an unchanged input or target is never measured twice.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from TextureStarGANCore.masks import body_mask
from Training.evaluation.metrics import radiomics_features as rf
from Training.evaluation.metrics.agreement import ccc_columns

ROI_MM = 24.0  # side of a square ROI: a lesion-sized region
MAX_ROIS_PER_REGION = 4  # per slice and region class; bounds the extraction time
SOFT_TISSUE_MEAN_HU = (-200.0, 300.0)  # fat, muscle, organs; not bone
CCC_REPRODUCIBLE = 0.85
REGIONS = ("lung", "soft_tissue", "other")
FEATURE_CLASSES = ("firstorder", "glcm", "gldm", "glrlm", "glszm", "ngtdm", "shape2D")


@dataclass(frozen=True)
class Roi:
    region: str
    row: int  # top-left corner
    col: int
    size: int

    def crop(self, hu: np.ndarray) -> np.ndarray:
        return np.asarray(hu)[self.row : self.row + self.size, self.col : self.col + self.size]


def roi_size_px(spacing_mm: float, size_mm: float = ROI_MM) -> int:
    return max(8, int(round(size_mm / spacing_mm)))


def _spread(candidates: list[Roi], k: int) -> list[Roi]:
    """Up to k candidates evenly spread over the grid order (deterministic)."""
    if len(candidates) <= k:
        return candidates
    return [candidates[i] for i in np.linspace(0, len(candidates) - 1, k).round().astype(int)]


def matched_rois(
    target_hu: np.ndarray,
    spacing_mm: float,
    lungs: np.ndarray | None = None,
    *,
    size_mm: float = ROI_MM,
    max_per_region: int = MAX_ROIS_PER_REGION,
) -> list[Roi]:
    """Non-overlapping grid ROIs of one target slice per region class (``lungs``: its lung mask)."""
    from Training.evaluation.metrics.structure import lung_mask

    t = np.asarray(target_hu, dtype=np.float32)
    lungs = lung_mask(t, spacing_mm) if lungs is None else np.asarray(lungs, bool)
    size = roi_size_px(spacing_mm, size_mm)
    body = body_mask(t)
    near_lung = ndimage.binary_dilation(lungs, iterations=max(1, size // 4)) if lungs.any() else lungs
    found: dict[str, list[Roi]] = {r: [] for r in REGIONS}
    # Grid centred on the image so the ROIs do not depend on which border is cut.
    r0 = (t.shape[0] % size) // 2
    c0 = (t.shape[1] % size) // 2
    for r in range(r0, t.shape[0] - size + 1, size):
        for c in range(c0, t.shape[1] - size + 1, size):
            win = (slice(r, r + size), slice(c, c + size))
            if lungs[win].all():
                found["lung"].append(Roi("lung", r, c, size))
            elif body[win].all() and not near_lung[win].any():
                mean = float(t[win].mean())
                soft = SOFT_TISSUE_MEAN_HU[0] <= mean <= SOFT_TISSUE_MEAN_HU[1]
                reg = "soft_tissue" if soft else "other"
                found[reg].append(Roi(reg, r, c, size))
    return [roi for reg in REGIONS for roi in _spread(found[reg], max_per_region)]


def feature_class(name: str) -> str:
    """'original_glcm_Contrast' -> 'glcm'."""
    parts = name.split("_")
    return parts[1] if len(parts) > 2 else parts[0]


def _patch_id(patch: np.ndarray, spacing_mm: float) -> str:
    h = hashlib.sha256(np.ascontiguousarray(patch, dtype=np.float32).tobytes())
    h.update(f"{patch.shape}|{spacing_mm:.6f}|whole-patch-roi".encode())
    return "patch:" + h.hexdigest()[:32]


def patch_features(
    patches: Sequence[np.ndarray],
    spacing_mm: float,
    *,
    workers: int = 1,
    pool: Any = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> np.ndarray:
    """(N, 102) features of HU patches: identical patches measured once, cached by content if asked."""
    ids = [_patch_id(p, spacing_mm) for p in patches]
    unique: dict[str, int] = {}
    for i, pid in enumerate(ids):
        unique.setdefault(pid, i)
    uids = list(unique)
    cache = rf.FeatureCache(cache_dir, Path(cache_dir) / "matched_rois") if cache_dir is not None else None
    if cache is not None:
        table, missing = cache.get(uids)
    else:
        table, missing = np.full((len(uids), len(rf.feature_names())), np.nan), list(range(len(uids)))
    if missing:
        table[missing] = rf.extract_patch_features(
            [patches[unique[uids[i]]] for i in missing],
            spacing_mm,
            workers=workers,
            pool=pool,
            progress=progress,
            cancel=cancel,
        )
        if cache is not None:
            cache.put([uids[i] for i in missing], table[missing])
    row = {pid: k for k, pid in enumerate(uids)}
    return table[[row[pid] for pid in ids]]


def reproducibility(
    method_features: np.ndarray, target_features: np.ndarray, names: Sequence[str]
) -> dict[str, Any]:
    """CCC of every feature (rows = matched ROIs), the share with CCC >= 0.85 among the features whose
    CCC is defined, and the median CCC per feature class."""
    res = ccc_columns(method_features, target_features)
    values = res.values
    defined = np.isfinite(values)
    by_class: dict[str, float | None] = {}
    for cls in FEATURE_CLASSES:
        sel = np.array([feature_class(n) == cls for n in names]) & defined
        by_class[cls] = float(np.median(values[sel])) if sel.any() else None
    n_def = int(defined.sum())
    return {
        "n_rois": int(method_features.shape[0]),
        "n_features": len(names),
        "n_defined": n_def,
        "n_reproducible": int((values[defined] >= CCC_REPRODUCIBLE).sum()),
        "share_reproducible": float((values[defined] >= CCC_REPRODUCIBLE).mean()) if n_def else None,
        "median_ccc": float(np.median(values[defined])) if n_def else None,
        "median_by_class": by_class,
        "rois_excluded_max": int(res.n_excluded.max()) if res.n_excluded.size else 0,
        "ccc": {n: (float(v) if np.isfinite(v) else None) for n, v in zip(names, values, strict=True)},
    }


def reproducibility_by_region(
    features: Mapping[str, np.ndarray], target: str, regions: Sequence[str], names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """{region: {method: reproducibility vs ``target``}} from per-ROI tables aligned with ``regions``."""
    regions_arr = np.asarray(regions)
    out: dict[str, dict[str, Any]] = {}
    for reg in REGIONS:
        sel = regions_arr == reg
        if not sel.any():
            continue
        out[reg] = {
            m: reproducibility(f[sel], features[target][sel], names)
            for m, f in features.items()
            if m != target
        }
    return out
