"""Radiomic feature alignment, the paper's Table II (section III-B2).

For a kernel pair (a, b): R = features whose distributions differ between the real images of a and b
(Welch p < 0.01). For the direction a -> b, the images of a harmonized to b are re-tested against the real
images of b on the features of R; Z = those no longer different. The score of a direction is |Z| / |R| in
percent; a pair's score is the mean over its two directions. With |R| = 0 there is nothing to align and the
score is reported as n/a (None), never as 0 % or 100 %.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .welch import ALPHA, significantly_different


@dataclass
class DirectionAlignment:
    source: str
    target: str
    n_features: int
    differing: list[str]  # R
    aligned: list[str]  # Z, a subset of R
    still_different: list[str]  # R \ Z

    @property
    def percent(self) -> float | None:
        return None if not self.differing else 100.0 * len(self.aligned) / len(self.differing)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(n_R=len(self.differing), n_Z=len(self.aligned), percent=self.percent)
        return d


def differing_features(
    names: list[str], real_a: np.ndarray, real_b: np.ndarray, alpha: float = ALPHA
) -> list[str]:
    """R: the features that differ between two real domains (Welch p < alpha)."""
    _check(names, real_a, real_b)
    mask = significantly_different(real_a, real_b, alpha)
    return [n for n, m in zip(names, mask, strict=True) if m]


def direction_alignment(
    names: list[str],
    real_source: np.ndarray,
    real_target: np.ndarray,
    harmonized: np.ndarray,
    *,
    source: str,
    target: str,
    alpha: float = ALPHA,
) -> DirectionAlignment:
    """|Z| / |R| bookkeeping for one direction source -> target."""
    _check(names, real_target, harmonized)
    R = differing_features(names, real_source, real_target, alpha)
    idx = [names.index(n) for n in R]
    still = (
        significantly_different(harmonized[:, idx], real_target[:, idx], alpha) if idx else np.zeros(0, bool)
    )
    Z = [n for n, s in zip(R, still, strict=True) if not s]
    return DirectionAlignment(source, target, len(names), R, Z, [n for n in R if n not in Z])


def mean_percent(directions: list[DirectionAlignment]) -> float | None:
    """Average of the directions' |Z|/|R| %, over the directions where |R| > 0 (None if there are none)."""
    vals = [d.percent for d in directions if d.percent is not None]
    return float(np.mean(vals)) if vals else None


def _check(names: list[str], *tables: np.ndarray) -> None:
    for t in tables:
        if t.ndim != 2 or t.shape[1] != len(names):
            raise ValueError(f"feature table of shape {t.shape} does not match {len(names)} feature names")
