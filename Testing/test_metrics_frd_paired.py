"""Frechet Radiomic Distance and the paired ground-truth metrics (PSNR/SSIM/NPS) on known inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from Training.evaluation.metrics.frd import frechet_radiomic_distance
from Training.evaluation.metrics.paired import PairedDirection, psnr_ssim, uniform_roi_centers


def test_frd_smaller_for_closer_sets():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (80, 12))
    near = rng.normal(0.2, 1, (80, 12))
    far = rng.normal(1.5, 1.3, (80, 12))
    ref[:, 4] = near[:, 4] = far[:, 4] = 7.0  # a constant feature is dropped, as frd-score does
    ref[3, 0] = np.nan  # a failed slice is dropped
    d_near, d_far = frechet_radiomic_distance(ref, near), frechet_radiomic_distance(ref, far)
    assert np.isfinite(d_near) and d_near < d_far
    assert frechet_radiomic_distance(ref, ref) < d_near
    assert frechet_radiomic_distance(ref[:1], near) is None


def _slice(rng, noise_sigma_px: float, sd: float, base: np.ndarray) -> np.ndarray:
    noise = (
        ndimage.gaussian_filter(rng.standard_normal(base.shape), noise_sigma_px)
        if noise_sigma_px
        else rng.standard_normal(base.shape)
    )
    return base + sd * noise / noise.std()


def test_psnr_ssim_and_nps_distance_on_known_noise():
    rng = np.random.default_rng(0)
    base = np.full((128, 128), -1000.0)
    yy, xx = np.mgrid[:128, :128]
    base[(yy - 64) ** 2 + (xx - 64) ** 2 < 55**2] = 40.0  # a uniform soft-tissue disc
    assert len(uniform_roi_centers(base, 1.0, 24)) >= 4
    p, s = psnr_ssim(base, base, (-1024.0, 2048.0))
    assert p == float("inf") and s == pytest.approx(1.0)
    acc_good = PairedDirection(1.0, (-1024.0, 2048.0))
    for _ in range(3):
        truth = _slice(rng, 1.5, 20.0, base)  # smooth kernel
        source = _slice(rng, 0.0, 60.0, base)  # sharp kernel: white, strong noise
        good = _slice(rng, 1.5, 20.0, base)  # a harmonization reproducing the target texture
        acc_good.add(source, good, truth)
    out = acc_good.summary()
    assert out["slices"] == 3 and out["nps_rois"] >= 12
    assert out["nps_distance_after"] < 0.3 < out["nps_distance_before"]
    assert out["psnr_after"] > out["psnr_before"] and out["ssim_after"] > out["ssim_before"]
    nps = out["nps"]
    assert nps["source"]["peak_freq_per_mm"] > nps["target"]["peak_freq_per_mm"]
    assert nps["harmonized"]["noise_sd_hu"] == pytest.approx(nps["target"]["noise_sd_hu"], rel=0.2)
