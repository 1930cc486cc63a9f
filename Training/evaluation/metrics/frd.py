"""Frechet Radiomic Distance (Konz, Osuala et al., Medical Image Analysis 2026) between two image sets.

Computed with frd-score's own v1 steps (rows with NaN dropped, float32, z-score against the joint
distribution, columns that turn NaN/Inf dropped, Frechet distance of the Gaussian fits, reported as
log(d^2)) applied to the paper's 102 features that the radiomics alignment already extracts. frd-score's
full v1 feature set (~464 features from original, LoG and wavelet images, binWidth 5) would cost several
times the extraction time per slice on top, so the values here are "FRD-102": comparable within this
project (before vs after, model vs model), not with published FRDv1 numbers. No network weights needed.
"""

from __future__ import annotations

import numpy as np

LABEL = "FRD-102 (frd-score v1 normalization and distance on the paper's 102 features; log d^2)"


def frechet_radiomic_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float | None:
    """log(d^2) between two (n, F) feature tables; None when either has fewer than 2 usable rows."""
    from frd_score.frd import calculate_frechet_distance, z_score_normalize

    tables = []
    for t in (feats_a, feats_b):
        t = np.asarray(t, dtype=np.float64)
        t = t[~np.isnan(t).any(axis=1)].astype(np.float32)
        if len(t) < 2:
            return None
        tables.append(t)
    joint = np.concatenate(tables, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # v1 mode: constant features become NaN/Inf here and are dropped just below, as frd-score does.
        normed = [
            z_score_normalize(t, 0.0, 1.0, replace_nan=False, handle_std_zero=False, base_distribution=joint)
            for t in tables
        ]
    keep = np.ones(normed[0].shape[1], dtype=bool)
    for t in normed:
        keep &= np.isfinite(t).all(axis=0)
    if not keep.any():
        return None
    normed = [t[:, keep].astype(np.float64) for t in normed]
    mu = [t.mean(axis=0) for t in normed]
    cov = [np.cov(t, rowvar=False) for t in normed]
    d2 = float(calculate_frechet_distance(mu[0], cov[0], mu[1], cov[1]))
    return float(np.log(d2)) if d2 > 0 else float("-inf")
