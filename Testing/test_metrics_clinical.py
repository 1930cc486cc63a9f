"""Clinical quantities: Lin's CCC and Bland-Altman against hand computations, lung density on synthetic
lungs with known histograms, radiomic reproducibility over matched ROIs, reports and plots, and the real
Philips chest pair (L sharp vs B smooth)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED
from scipy import ndimage

from TextureStarGANCore.fileio import json_safe
from Training.evaluation.metrics import radiomic_reproducibility as rr
from Training.evaluation.metrics.agreement import bland_altman, ccc, ccc_columns
from Training.evaluation.metrics.clinical import NO_LUNGS_NOTE, ClinicalComparison, clinical_comparison
from Training.evaluation.metrics.clinical_report import (
    clinical_markdown,
    clinical_summary,
    clinical_tables,
    save_clinical_figures,
)
from Training.evaluation.metrics.lung_density import DensityHistogram, is_parenchyma, lung_quantities
from Training.evaluation.metrics.structure import lung_mask

CHEST_PAIR = SHARED / "data" / "real_ct" / "philips_brilliance16_chest_l_b_pair"

# ---- agreement ---------------------------------------------------------------------------------------


def test_ccc_matches_hand_computation():
    x = np.array([1.0, 2, 3, 4, 5])
    y = np.array([2.0, 2, 4, 5, 6])
    # means 3, 3.8; s_xy = 11/5, s_x^2 = 2, s_y^2 = 12.8/5, (3 - 3.8)^2 = 0.64 -> 4.4 / 5.2 = 11/13
    assert ccc(x, y) == pytest.approx(11 / 13)
    assert ccc(x, x) == pytest.approx(1.0)
    assert ccc(x, -x) == pytest.approx(2 * -2 / (2 + 2 + 36))  # mirrored and far apart
    assert ccc(x - 3, 3 - x) == pytest.approx(-1.0)  # mirrored about the common mean
    assert ccc(x, x + 1.0) == pytest.approx(2 * 2 / (2 + 2 + 1))  # a pure bias lowers the CCC
    assert ccc(x, 2 * x) == pytest.approx(2 * 4 / (2 + 8 + 9))  # correlation 1 is not concordance 1


def test_ccc_edge_cases():
    const = np.full(5, 3.0)
    assert np.isnan(ccc(const, const))  # no variation at all: undefined
    assert ccc(const, np.arange(5.0)) == 0.0  # no covariance
    assert ccc(const, const + 1) == 0.0  # both constant, different: no agreement
    assert np.isnan(ccc([1.0], [1.0]))  # one pair
    x = np.array([1.0, 2, np.nan, 3, 4, 5])
    y = np.array([2.0, 2, 7, 4, 5, np.inf])
    assert ccc(x, y) == pytest.approx(ccc([1, 2, 3, 4], [2, 2, 4, 5]))
    cols = ccc_columns(
        np.stack([x, np.arange(6.0), const.tolist() + [3.0]], 1),
        np.stack([y, np.arange(6.0), np.full(6, 3.0)], 1),
    )
    assert cols.n_excluded.tolist() == [2, 0, 0] and cols.n_used.tolist() == [4, 6, 6]
    assert cols.values[1] == pytest.approx(1.0) and np.isnan(cols.values[2])
    with pytest.raises(ValueError, match="length"):
        ccc([1.0, 2.0], [1.0])


def test_bland_altman_limits_on_known_differences():
    ref = np.array([10.0, 20, 30, 40, np.nan])
    d = np.array([1.0, 2, 3, 4, 0])
    ba = bland_altman(ref + d, ref)
    sd = np.std([1, 2, 3, 4], ddof=1)
    assert (ba.n, ba.n_excluded) == (4, 1)
    assert ba.mean_diff == pytest.approx(2.5) and ba.sd_diff == pytest.approx(sd)
    assert (ba.lower, ba.upper) == pytest.approx((2.5 - 1.96 * sd, 2.5 + 1.96 * sd))
    assert bland_altman([1.0], [0.0]).lower is None and bland_altman([], []).mean_diff is None


# ---- lung density ------------------------------------------------------------------------------------


def synthetic_chest(n: int = 160, values: dict[float, float] | None = None, seed: int = 0):
    """A soft-tissue body with two elliptic lungs whose voxels follow ``values`` {HU: share} exactly."""
    yy, xx = np.mgrid[:n, :n]
    img = np.full((n, n), -1000.0, np.float32)
    img[((yy - n / 2) / (0.42 * n)) ** 2 + ((xx - n / 2) / (0.46 * n)) ** 2 < 1] = 40.0
    for cx in (0.3 * n, 0.7 * n):
        img[((yy - n / 2) / (0.3 * n)) ** 2 + ((xx - cx) / (0.14 * n)) ** 2 < 1] = -850.0
    lungs = lung_mask(img, 1.0)
    values = values or {-980.0: 0.2, -920.0: 0.3, -850.0: 0.5}
    k = int(lungs.sum())
    counts = [int(round(share * k)) for share in values.values()]
    counts[-1] = k - sum(counts[:-1])
    fill = np.repeat(list(values), counts)
    np.random.default_rng(seed).shuffle(fill)
    img[lungs] = fill
    return img, lungs


def test_lungs_are_not_an_air_cavity():
    img, lungs = synthetic_chest()
    assert is_parenchyma(img, lungs, 1.0)
    assert not is_parenchyma(np.where(lungs, -1000.0, img), lungs, 1.0)
    assert not is_parenchyma(img, np.zeros_like(lungs), 1.0)


def test_lung_quantities_on_a_known_histogram():
    img, lungs = synthetic_chest()
    assert np.array_equal(lung_mask(img, 1.0), lungs) and lungs.sum() > 3000
    q = lung_quantities(img, lungs)
    n = lungs.sum()
    n980 = int(round(0.2 * n))
    n920 = int(round(0.3 * n))
    assert q.lung_voxels == n
    assert q.laa950 == pytest.approx(100 * n980 / n)
    assert q.laa910 == pytest.approx(100 * (n980 + n920) / n)
    assert abs(q.pd15 - (-980)) <= 0.5  # 15 % of the voxels lie at -980 HU
    assert q.mld == pytest.approx((-980 * n980 - 920 * n920 - 850 * (n - n980 - n920)) / n)
    # Continuous values: PD15 within half a HU of numpy's percentile; the threshold is strict (< -950).
    v = np.random.default_rng(1).normal(-870, 60, 20000)
    q = lung_quantities(v, np.ones_like(v, bool))
    assert abs(q.pd15 - np.percentile(v, 15)) < 0.5
    assert q.laa950 == pytest.approx(100 * np.mean(v < -950))
    assert lung_quantities(np.array([-950.0, -949.0]), np.ones(2, bool)).laa950 == 0.0
    assert lung_quantities(img, np.zeros_like(lungs)) is None


def test_series_numbers_pool_voxels_and_bland_altman_per_slice():
    a, _ = synthetic_chest(values={-980.0: 0.5, -850.0: 0.5})
    b, _ = synthetic_chest(n=100, values={-980.0: 0.1, -850.0: 0.9})
    comp = ClinicalComparison(1.0, target="smooth", radiomics=False)
    # "sharp": 20 HU lower in the lungs of the first slice, 40 HU in the second.
    for img, shift in ((a, 20.0), (b, 40.0)):
        lungs = lung_mask(img, 1.0)
        comp.add_slice({"sharp": np.where(lungs, img - shift, img), "same": img}, img)
    res = comp.results()
    lungs = res["lungs"]
    ha = DensityHistogram().add(a, lung_mask(a, 1.0))
    hb = DensityHistogram().add(b, lung_mask(b, 1.0))
    pooled = ha.merge(hb).quantities()
    assert lungs["series"]["smooth"]["laa950"] == pytest.approx(pooled.laa950)
    assert lungs["slices_with_lungs"] == 2
    ba = lungs["bland_altman"]["sharp"]["pd15"]
    assert ba["n"] == 2 and ba["mean_diff"] == pytest.approx(-30.0, abs=1.0)
    assert lungs["bland_altman"]["same"]["laa950"]["mean_diff"] == 0.0
    assert lungs["per_slice"]["sharp"]["mld"][1] == pytest.approx(lungs["per_slice"]["smooth"]["mld"][1] - 40)
    assert "radiomics" not in res and res["notes"] == []


def test_no_lungs_gives_a_note_and_keeps_radiomics(tmp_path):
    n = 96
    yy, xx = np.mgrid[:n, :n]
    rng = np.random.default_rng(0)
    head = np.where((yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (0.45 * n) ** 2, 30.0, -1000.0).astype(np.float32)
    head += np.where(head > 0, 8 * np.sin(xx / 5.0) * np.cos(yy / 7.0), 0).astype(np.float32)
    stack = np.stack([head + np.where(head > 0, rng.normal(0, 10, head.shape), 0) for _ in range(2)])
    noisy = stack + np.where(stack > -500, rng.normal(0, 30, stack.shape), 0)
    res = clinical_comparison({"noisy": noisy, "same": stack}, stack, 1.0, max_rois_per_region=3)
    assert res["lungs"] is None and NO_LUNGS_NOTE in res["notes"]
    assert res["radiomics"]["rois"]["lung"] == 0 and res["radiomics"]["rois"]["soft_tissue"] == 6
    same = res["radiomics"]["regions"]["soft_tissue"]["same"]
    assert same["share_reproducible"] == 1.0 and same["median_by_class"]["shape2D"] is None
    assert same["n_defined"] == 93  # shape2D: one ROI shape everywhere, undefined
    noisy_r = res["radiomics"]["regions"]["soft_tissue"]["noisy"]
    assert noisy_r["share_reproducible"] < same["share_reproducible"]
    md = clinical_markdown(res)
    assert NO_LUNGS_NOTE in md and "Lung density" not in md and "soft_tissue" in md
    assert save_clinical_figures(tmp_path, res) == ["clinical_ccc_soft_tissue.png"]
    json.dumps(json_safe(res))


def test_an_air_filled_head_phantom_has_no_lungs():
    n = 96
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - n / 2, xx - n / 2)
    rng = np.random.default_rng(2)
    # A hollow skull: bone ring around air, with a soft-tissue insert; the classical mask calls the air lung.
    img = np.where((r >= 34) & (r < 40), 800.0, -1000.0)
    img += np.where(np.hypot(yy - 40, xx - 55) < 6, 1040.0, 0.0)
    stack = np.stack([img + rng.normal(0, 5, img.shape) for _ in range(2)]).astype(np.float32)
    assert lung_mask(stack[0], 1.0).sum() > 2000
    res = clinical_comparison({"same": stack}, stack, 1.0, roi_size_mm=16)
    assert res["lungs"] is None and res["air_only_slices"] == 2
    assert NO_LUNGS_NOTE in res["notes"] and any("mostly air" in n for n in res["notes"])
    assert res["radiomics"]["rois"]["lung"] == 0 and res["radiomics"]["rois"]["other"] > 0


def test_matched_rois_lie_inside_their_region():
    img, lungs = synthetic_chest()
    rois = rr.matched_rois(img, 1.0, lungs, size_mm=16, max_per_region=50)
    body = img > -500
    regions = {r.region for r in rois}
    assert regions == {"lung", "soft_tissue"}
    for r in rois:
        win = (slice(r.row, r.row + r.size), slice(r.col, r.col + r.size))
        assert r.size == 16
        if r.region == "lung":
            assert lungs[win].all()
        else:
            assert (img[win] > -500).all() and not lungs[win].any() and body[win].all()
    few = rr.matched_rois(img, 1.0, lungs, size_mm=16, max_per_region=2)
    assert [r.region for r in few] == ["lung", "lung", "soft_tissue", "soft_tissue"]
    assert rr.feature_class("original_glcm_Contrast") == "glcm"
    assert rr.feature_class("original_shape2D_Perimeter") == "shape2D"


# ---- the real chest pair -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chest_pair():
    if not CHEST_PAIR.is_dir():
        pytest.skip(f"real chest pair missing at {CHEST_PAIR} (set CTH_SHARED_DIR)")
    from TextureStarGANCore.volume_io import read_volume

    lo, hi = 30, 33  # three slices through both lungs
    L, B = read_volume(CHEST_PAIR / "L_sharp"), read_volume(CHEST_PAIR / "B_smooth")
    return L.hu[lo:hi], B.hu[lo:hi], float(L.spacing[0])


def test_real_chest_pair_sharp_kernel_inflates_the_emphysema_index(chest_pair, tmp_path):
    L, B, spacing = chest_pair
    blur = np.stack([ndimage.gaussian_filter(s, 1.3) for s in L])
    res = clinical_comparison(
        {"identity": L, "blur 1.3": blur}, B, spacing, target="B", max_rois_per_region=3, cache_dir=tmp_path
    )
    series = res["lungs"]["series"]
    # The first real-data answer: L's noise pushes lung voxels below -950 HU (~15 % vs ~0.2 % on B).
    assert series["identity"]["laa950"] > series["B"]["laa950"] + 8
    assert series["identity"]["pd15"] < series["B"]["pd15"] - 30
    assert abs(series["blur 1.3"]["laa950"] - series["B"]["laa950"]) < 1.0
    assert abs(series["blur 1.3"]["mld"] - series["B"]["mld"]) < 10
    ba = res["lungs"]["bland_altman"]
    assert ba["identity"]["laa950"]["n"] == 3
    assert abs(ba["blur 1.3"]["pd15"]["mean_diff"]) < abs(ba["identity"]["pd15"]["mean_diff"])
    for reg in ("lung", "soft_tissue"):
        per = res["radiomics"]["regions"][reg]
        assert per["blur 1.3"]["share_reproducible"] > per["identity"]["share_reproducible"]
    summary = clinical_summary(res)
    assert summary["identity"]["laa950_series_diff"] > 8
    tables = clinical_tables(res)
    assert [r[0] for r in tables["lung"][1]] == ["identity", "blur 1.3", "B (target)"]
    figs = save_clinical_figures(tmp_path, res)
    assert figs == ["clinical_bland_altman.png", "clinical_ccc_lung.png", "clinical_ccc_soft_tissue.png"]
    assert all((tmp_path / f).stat().st_size > 10000 for f in figs)
    assert list(tmp_path.glob("radiomics_*.npz"))  # features cached by content


def test_real_head_phantom_skips_lungs_and_keeps_ccc(tmp_path):
    pair = SHARED / "data" / "real_ct" / "philips_ingenuity_head_phantom_ub_ya_pair"
    if not pair.is_dir():
        pytest.skip(f"real head phantom pair missing at {pair} (set CTH_SHARED_DIR)")
    from TextureStarGANCore.volume_io import read_volume

    ya, ub = read_volume(pair / "YA_bone"), read_volume(pair / "UB_standard")
    rows = [3, 6, 30]  # the lung mask finds the hollow skull with big inserts (3, 6) or only air (30)
    res = clinical_comparison(
        {"YA (bone)": ya.hu[rows]}, ub.hu[rows], float(ya.spacing[0]), target="UB", max_rois_per_region=3
    )
    # Its skull is hollow: the classical lung mask finds air there, which is not lung parenchyma.
    assert res["lungs"] is None and NO_LUNGS_NOTE in res["notes"] and res["air_only_slices"] == 3
    regions = res["radiomics"]["regions"]
    assert regions and all(r["YA (bone)"]["n_defined"] > 50 for r in regions.values())
    assert NO_LUNGS_NOTE in clinical_markdown(res)
