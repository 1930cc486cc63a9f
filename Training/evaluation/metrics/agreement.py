"""Agreement between a method's measurements and the reference's: Lin's CCC and Bland-Altman.

Both compare paired values (the same slice or region measured on two images). Pairs where either value is
NaN or infinite are left out and counted, because a feature pyradiomics could not compute on one image
says nothing about agreement.

Lin's concordance correlation coefficient (Lin 1989) uses population (1/n) moments:
``CCC = 2 s_xy / (s_x^2 + s_y^2 + (mean_x - mean_y)^2)``. It is 1 only when y = x, and penalises both scatter
and bias. When both vectors are the same constant the denominator is zero and the CCC is undefined (NaN):
agreement cannot be judged without variation (e.g. shape features of identical ROIs); a constant vector
against a varying one, or against another constant, gives 0 (no covariance).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

BA_Z = 1.96  # 95 % limits of agreement


def finite_pairs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(x, y) restricted to pairs where both are finite, and how many pairs were left out."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired vectors differ in length: {x.size} vs {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok], int(x.size - ok.sum())


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's CCC of paired values (non-finite pairs left out); NaN with < 2 pairs or no variation at all."""
    x, y, _ = finite_pairs(x, y)
    if x.size < 2:
        return float("nan")
    mx, my = x.mean(), y.mean()
    sxy = np.mean((x - mx) * (y - my))
    denom = x.var() + y.var() + (mx - my) ** 2
    # Relative test: constant vectors leave only rounding error in the variances.
    scale = max(abs(mx), abs(my), 1.0) ** 2
    if denom <= 1e-24 * scale:
        return float("nan")
    return float(2.0 * sxy / denom)


@dataclass
class CccColumns:
    """Per-column CCC of two (rows, columns) tables: values and, per column, pairs used and left out."""

    values: np.ndarray
    n_used: np.ndarray
    n_excluded: np.ndarray


def ccc_columns(a: np.ndarray, b: np.ndarray) -> CccColumns:
    """CCC of every column of ``a`` against the same column of ``b`` (rows are matched observations)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two tables of one shape, got {a.shape} and {b.shape}")
    values = np.array([ccc(a[:, j], b[:, j]) for j in range(a.shape[1])])
    ok = np.isfinite(a) & np.isfinite(b)
    used = ok.sum(axis=0)
    return CccColumns(values, used, a.shape[0] - used)


@dataclass
class BlandAltman:
    """Mean difference (method - reference) and its 95 % limits of agreement over paired values."""

    n: int
    n_excluded: int
    mean_diff: float | None
    sd_diff: float | None
    lower: float | None
    upper: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def bland_altman(method: np.ndarray, reference: np.ndarray) -> BlandAltman:
    """Bland-Altman agreement: limits mean +- 1.96 SD of the differences (SD with n - 1)."""
    m, r, excluded = finite_pairs(method, reference)
    if m.size == 0:
        return BlandAltman(0, excluded, None, None, None, None)
    d = m - r
    mean = float(d.mean())
    if d.size < 2:
        return BlandAltman(1, excluded, mean, None, None, None)
    sd = float(d.std(ddof=1))
    return BlandAltman(int(d.size), excluded, mean, sd, mean - BA_Z * sd, mean + BA_Z * sd)
