"""Metrics and baselines of the real-pair validation on inputs whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from Training.evaluation.baselines import fit_gaussian_blur, fit_linear_filter
from Training.evaluation.metrics.edge_sharpness import edge_spread, find_edges
from Training.evaluation.metrics.highpass import gap_closed, highpass, highpass_noise_sd, soft_tissue_mask
from Training.evaluation.metrics.paired import nps_distance, rmse_hu


def _phantom(n: int = 160, seed: int = 0, noise: float = 40.0) -> np.ndarray:
    """Air, a soft-tissue body with a bone disk and white noise: a sharp-kernel-like slice."""
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - n / 2, xx - n / 2)
    img = np.where(r < 0.4 * n, 40.0, -1000.0)
    img = np.where(np.hypot(yy - n / 2, xx - 0.6 * n) < 0.08 * n, 900.0, img)
    return img + np.random.default_rng(seed).normal(0.0, noise, img.shape)


def test_rmse_clips_to_the_window_and_uses_the_mask():
    truth = np.zeros((4, 4))
    pred = np.full((4, 4), 10.0)
    pred[0, 0] = 5000.0  # clipped to 600
    mask = np.ones((4, 4), bool)
    expected = np.sqrt((15 * 100 + 600.0**2) / 16)
    assert rmse_hu(pred, truth, mask) == pytest.approx(expected)
    mask[0, 0] = False
    assert rmse_hu(pred, truth, mask) == pytest.approx(10.0)


def test_highpass_noise_of_known_images_and_gap_closed():
    ramp = np.add.outer(np.arange(64.0), np.arange(64.0))
    assert np.abs(highpass(ramp)[8:-8, 8:-8]).max() < 1e-3  # a linear ramp has no high-pass content
    noise = np.random.default_rng(0).normal(0.0, 10.0, (2, 64, 64))
    mask = np.ones_like(noise, bool)
    sd = highpass_noise_sd(noise, mask)
    assert 7.0 < sd < 10.0  # the blur removes only the lowest frequencies of white noise
    assert highpass_noise_sd(3 * noise, mask) == pytest.approx(3 * sd, rel=1e-5)
    assert gap_closed(80.0, 20.0, 20.0) == 1.0
    assert gap_closed(80.0, 80.0, 20.0) == 0.0
    assert gap_closed(80.0, 50.0, 20.0) == pytest.approx(0.5)
    assert gap_closed(80.0, 0.0, 20.0) == pytest.approx(2 / 3)  # overshoot counts against it


def test_soft_tissue_mask_stays_inside_uniform_tissue():
    img = _phantom(noise=0.0)
    m = soft_tissue_mask(img)
    assert m.any()
    assert np.all(img[ndimage.binary_dilation(m, iterations=5)] == 40.0)


def test_nps_distance():
    a = np.array([1.0, 2.0, 3.0])
    assert nps_distance(a, a) == 0.0
    assert nps_distance(2 * a, a) == pytest.approx(1.0)


def test_edge_width_of_a_blurred_step_matches_the_gaussian():
    px = 0.5
    sharp = np.stack([_phantom(noise=0.0)])
    sigma = 2.0
    blurred = ndimage.gaussian_filter(sharp, (0, sigma, sigma))
    edges = find_edges(blurred, px)
    assert len(edges) > 50
    wide = edge_spread(blurred, edges, px)
    # 10-90 % rise of a Gaussian-blurred step: 2 * 1.2816 sigma (plus a little from the sampling grid).
    assert wide.width_10_90_mm == pytest.approx(2 * 1.2816 * sigma * px, rel=0.15)
    sharper = edge_spread(ndimage.gaussian_filter(sharp, (0, 1.0, 1.0)), edges, px)
    assert sharper.width_10_90_mm < wide.width_10_90_mm
    assert sharper.mtf50_per_mm > wide.mtf50_per_mm


def _synthetic_pair(sigma_px: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sharp = np.stack([_phantom(seed=seed + k) for k in range(3)])
    smooth = ndimage.gaussian_filter(sharp, (0, sigma_px, sigma_px), mode="reflect")
    masks = np.ones_like(sharp, bool)
    return sharp, smooth, masks


def test_baselines_recover_a_known_gaussian_transfer():
    px, sigma = 0.7, 1.5
    sharp, smooth, masks = _synthetic_pair(sigma, 0)
    blur = fit_gaussian_blur(sharp, smooth, masks, px)
    assert blur.params["sigma_px"] == pytest.approx(sigma, abs=0.05)
    assert blur.params["sigma_mm"] == pytest.approx(sigma * px, abs=0.04)
    fwd, back = fit_linear_filter(sharp, smooth, (px, px), masks, masks)
    f = np.linspace(0.0, 0.5, 11)
    true = np.exp(-2.0 * (np.pi * sigma * px * f) ** 2)
    np.testing.assert_allclose(fwd.transfer.response(f), true, atol=0.03)
    # Fitted on these slices, it maps other slices of the same "scanner" just as well.
    sharp2, smooth2, _ = _synthetic_pair(sigma, 10)
    assert rmse_hu(fwd.apply(sharp2), smooth2, masks) < 0.1 * rmse_hu(sharp2, smooth2, masks)
    # The sharpening direction is the bounded inverse and gets closer to the sharp slices than doing nothing.
    assert back.params["max_gain"] in back.params["max_gain_choices"]
    assert back.transfer.max_gain <= back.params["max_gain"] + 1e-9
    assert rmse_hu(back.apply(smooth2), sharp2, masks) < rmse_hu(smooth2, sharp2, masks)


def test_verdict_needs_both_rmse_and_a_measurable_nps():
    from Training.evaluation.validate_real import verdict

    def m(kind, rmse, nps):
        return {"kind": kind, "rmse_hu": rmse, "nps_distance": nps}

    methods = {"identity": m("baseline", 50.0, 0.9), "linear filter": m("baseline", 9.0, 0.05),
               "model a": m("model", 8.0, 0.04), "model b": m("model", 8.0, 0.2),
               "model c": m("model", 20.0, 0.01)}
    v = verdict(methods)
    assert v["best_baseline"] == "linear filter"
    assert v["model a"]["beats_best_baseline"] is True
    assert v["model b"] == {"beats_rmse": True, "beats_nps": False, "beats_best_baseline": False,
                            "calibrate_kernels": False}
    assert v["model c"]["beats_best_baseline"] is False
    methods = {k: {**x, "nps_distance": None} for k, x in methods.items()}
    v = verdict(methods)
    assert v["model a"] == {"beats_rmse": True, "beats_nps": None, "beats_best_baseline": False,
                            "calibrate_kernels": False}


def test_verdict_says_calibrate_when_a_model_loses_with_its_transfer_off():
    from Training.evaluation.validate_real import verdict

    def m(kind, rmse, err=None, model_kind="kernel_transfer"):
        return {"kind": kind, "rmse_hu": rmse, "nps_distance": None, "transfer_low_error": err,
                "params": {"model_kind": model_kind}}

    v = verdict({"gaussian blur": m("baseline", 8.0), "off": m("model", 13.0, -0.07),
                 "close": m("model", 13.0, 0.01), "wins": m("model", 7.0, -0.07),
                 "nan": m("model", 13.0, float("nan")), "stargan": m("model", 13.0, -0.07, "stargan_v2")})
    assert v["off"]["calibrate_kernels"] is True
    assert not v["close"]["calibrate_kernels"] and not v["wins"]["calibrate_kernels"]
    assert not v["nan"]["calibrate_kernels"]
    assert not v["stargan"]["calibrate_kernels"]  # only a kernel-transfer model has kernels to calibrate
    # With synthesized noise the RMSE is judged on the model's mean image (its --no-noise row).
    noisy = {"gaussian blur": m("baseline", 8.0), "n": m("model", 13.0, 0.07),
             "n --no-noise": m("model", 7.5), "q": m("model", 13.0, 0.07), "q --no-noise": m("model", 9.0)}
    v = verdict(noisy)
    assert not v["n"]["calibrate_kernels"] and v["q"]["calibrate_kernels"]


def test_effective_transfer_measures_a_known_blur_and_its_low_band_error():
    from Training.evaluation.metrics.transfer import FREQS_PER_MM, effective_gains, low_band_error

    rng = np.random.default_rng(3)
    pixel, sigma_mm = 0.5, 0.8
    src = ndimage.gaussian_filter(rng.normal(0, 100, (6, 128, 128)), (0, 1, 1))
    out = ndimage.gaussian_filter(src, (0, sigma_mm / pixel, sigma_mm / pixel), mode="wrap")
    gains = effective_gains(src, out, (pixel, pixel))
    expected = {f"{f:g}": float(np.exp(-2 * (np.pi * sigma_mm * f) ** 2)) for f in FREQS_PER_MM}
    for k, g in expected.items():
        assert abs(gains[k] - g) < 0.02, (k, gains[k], g)
    assert effective_gains(src, src, (pixel, pixel)) == {k: 1.0 for k in expected}
    assert low_band_error(gains, gains) == 0.0
    less = {k: 0.9 * g for k, g in gains.items()}
    assert low_band_error(less, gains) == pytest.approx(-0.1, abs=1e-3)
    assert np.isnan(low_band_error(gains, {k: 0.0 for k in gains}))
