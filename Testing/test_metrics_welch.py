"""Welch decisions and the |Z|/|R| bookkeeping of the radiomics alignment (paper Table II)."""

from __future__ import annotations

import numpy as np
import pytest

from Training.evaluation.metrics.radiomics_alignment import (
    differing_features,
    direction_alignment,
    mean_percent,
)
from Training.evaluation.metrics.welch import significantly_different, welch_pvalues


def test_welch_decisions_on_known_distributions():
    rng = np.random.default_rng(0)
    # Unequal sizes (30 vs 400) and, in column 2, unequal variances: Welch's setting.
    a = np.column_stack([rng.normal(0, 1, 30), rng.normal(0, 1, 30), rng.normal(0, 0.2, 30)])
    b = np.column_stack([rng.normal(0, 1, 400), rng.normal(1.5, 1, 400), rng.normal(0.6, 3.0, 400)])
    p = welch_pvalues(a, b)
    assert p[0] > 0.01 and p[1] < 1e-6
    assert significantly_different(a, b).tolist() == [False, True, p[2] < 0.01]
    from scipy import stats

    for j in range(3):
        assert p[j] == pytest.approx(stats.ttest_ind(a[:, j], b[:, j], equal_var=False).pvalue)
    # Student's pooled test would be fooled by the variance ratio; Welch's p differs from it.
    assert p[2] != pytest.approx(stats.ttest_ind(a[:, 2], b[:, 2], equal_var=True).pvalue)


def test_welch_constant_nan_and_tiny_columns():
    a = np.array([[1.0, 5.0, np.nan, 1.0], [1.0, 5.0, 2.0, 2.0], [1.0, 5.0, 3.0, np.nan]])
    b = np.array([[1.0, 6.0, 1.0, 3.0], [1.0, 6.0, 1.5, np.nan], [1.0, 6.0, 2.0, np.nan]])
    p = welch_pvalues(a, b)
    assert p[0] == 1.0  # identical constants: not different
    assert p[1] == 0.0  # different constants: different
    assert np.isfinite(p[2])  # NaN entries are ignored, two values remain
    assert np.isnan(p[3])  # one value left in b: undecidable
    assert significantly_different(a, b).tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="feature count"):
        welch_pvalues(a, b[:, :2])


def test_alignment_bookkeeping_on_hand_made_table():
    rng = np.random.default_rng(1)
    n = 60
    names = ["f_same", "f_aligned", "f_still", "f_overshoot"]
    src = np.column_stack(
        [rng.normal(0, 1, n), rng.normal(0, 1, n), rng.normal(0, 1, n), rng.normal(0, 1, n)]
    )
    tgt = np.column_stack(
        [rng.normal(0, 1, n), rng.normal(3, 1, n), rng.normal(3, 1, n), rng.normal(3, 1, n)]
    )
    # Harmonized: f_aligned moved onto the target, f_still unchanged, f_overshoot moved too far.
    harm = np.column_stack(
        [rng.normal(0, 1, n), rng.normal(3, 1, n), rng.normal(0, 1, n), rng.normal(6, 1, n)]
    )
    assert differing_features(names, src, tgt) == ["f_aligned", "f_still", "f_overshoot"]
    d = direction_alignment(names, src, tgt, harm, source="a", target="b")
    assert d.differing == ["f_aligned", "f_still", "f_overshoot"]
    assert d.aligned == ["f_aligned"]
    assert d.still_different == ["f_still", "f_overshoot"]
    assert d.percent == pytest.approx(100.0 / 3)
    back = direction_alignment(
        names, tgt, src, np.column_stack([src[:, 0], src[:, 1], src[:, 2], src[:, 3]]), source="b", target="a"
    )
    assert back.percent == pytest.approx(100.0)
    assert mean_percent([d, back]) == pytest.approx((100.0 / 3 + 100.0) / 2)
    info = d.to_dict()
    assert info["n_R"] == 3 and info["n_Z"] == 1


def test_empty_R_is_not_available_not_zero():
    rng = np.random.default_rng(2)
    names = ["x", "y"]
    a, b = rng.normal(0, 1, (40, 2)), rng.normal(0, 1, (40, 2))
    d = direction_alignment(names, a, b, rng.normal(5, 1, (40, 2)), source="a", target="b")
    assert d.differing == [] and d.percent is None
    assert mean_percent([d, d]) is None
    other = direction_alignment(
        ["x", "y"], a, b + np.array([4.0, 0.0]), b + np.array([4.0, 0.0]), source="a", target="c"
    )
    assert mean_percent([d, other]) == pytest.approx(100.0)  # n/a directions do not count as 0 %
    with pytest.raises(ValueError, match="does not match"):
        direction_alignment(["x"], a, b, a, source="a", target="b")
