"""Welch's unequal-variance t-test decisions used by the radiomics alignment (paper III-B2).

The paper calls a feature "different between two domains" when Welch's test gives p < 0.01. scipy's
``ttest_ind(equal_var=False)`` returns NaN when both samples have zero variance; that case is decided
explicitly here (different exactly when the constant values differ) so that no feature silently drops out.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

ALPHA = 0.01


def welch_pvalues(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-column Welch p-values between samples ``a`` (n_a, F) and ``b`` (n_b, F).

    Non-finite entries are ignored per column. A column with fewer than two finite values in either sample
    gets NaN (undecidable); two constant samples get p = 0 if their values differ and p = 1 otherwise.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature count differs: {a.shape[1]} vs {b.shape[1]}")
    out = np.full(a.shape[1], np.nan)
    # Columns without missing values in one vectorized call (one scipy call per column is slow).
    full = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
    if len(a) >= 2 and len(b) >= 2:
        const = full & (np.ptp(a, axis=0) == 0) & (np.ptp(b, axis=0) == 0)
        out[const] = np.where(a[0, const] != b[0, const], 0.0, 1.0)
        vec = full & ~const
        if vec.any():
            out[vec] = stats.ttest_ind(a[:, vec], b[:, vec], axis=0, equal_var=False).pvalue
    for j in np.flatnonzero(~full):
        x = a[:, j][np.isfinite(a[:, j])]
        y = b[:, j][np.isfinite(b[:, j])]
        if x.size < 2 or y.size < 2:
            continue
        if np.ptp(x) == 0 and np.ptp(y) == 0:
            out[j] = 0.0 if x[0] != y[0] else 1.0
            continue
        out[j] = float(stats.ttest_ind(x, y, equal_var=False).pvalue)
    return out


def significantly_different(a: np.ndarray, b: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Boolean mask of features whose distributions differ (Welch p < alpha). NaN p-values count as not
    different (not enough data to claim a difference)."""
    p = welch_pvalues(a, b)
    return np.where(np.isfinite(p), p < alpha, False)
