"""The engine's linear kernel-transfer filter: fitting recovers a known response, cycles/mm transfer across
pixel sizes, the bounded inverse, and the JSON form."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from TextureStarGANCore.transfer_filter import TransferFilter, fit_transfer_filter, radial_frequency


def _filtered(images: np.ndarray, f: TransferFilter, px: float) -> np.ndarray:
    """Periodic (unpadded) filtering: the exact linear model the least-squares fit assumes."""
    h = f.response(radial_frequency(images.shape[-2:], (px, px)))
    return np.stack([np.fft.irfft2(np.fft.rfft2(s) * h, s=s.shape) for s in images])


def test_fit_recovers_a_known_radial_response():
    rng = np.random.default_rng(0)
    px = 0.7
    src = rng.normal(0.0, 100.0, (3, 128, 128))
    true = TransferFilter(np.array([0.0, 0.2, 0.5, 1.2]), np.array([1.0, 0.8, 0.2, 0.05]))
    fitted = fit_transfer_filter(src, _filtered(src, true, px), (px, px))
    f = np.linspace(0.0, 0.7, 15)
    np.testing.assert_allclose(fitted.response(f), true.response(f), atol=0.01)


def test_response_is_in_cycles_per_mm_so_it_transfers_to_other_pixel_sizes():
    sigma_mm = 1.2
    freqs = np.linspace(0.0, 2.0, 200)
    gauss = TransferFilter(freqs, np.exp(-2.0 * (np.pi * sigma_mm * freqs) ** 2))
    rng = np.random.default_rng(1)
    for px in (0.4, 0.9):
        img = ndimage.gaussian_filter(rng.normal(0.0, 50.0, (96, 96)), 1.0)
        out = gauss.apply(img, (px, px))
        expected = ndimage.gaussian_filter(img, sigma_mm / px, mode="reflect")
        inner = (slice(20, -20), slice(20, -20))
        assert np.sqrt(np.mean((out[inner] - expected[inner]) ** 2)) < 0.02 * img.std()


def test_apply_keeps_shape_and_a_constant_image():
    f = TransferFilter(np.array([0.0, 1.0]), np.array([1.0, 0.3]))
    vol = np.full((2, 40, 50), -300.0, np.float32)
    out = f.apply(vol, (0.5, 0.8))
    assert out.shape == vol.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, -300.0, atol=1e-3)
    assert f.apply(vol[0], (0.5, 0.8)).shape == (40, 50)


def test_inverse_is_exact_where_the_filter_passes_signal_and_bounded_elsewhere():
    h = np.array([1.0, 0.5, 0.2, 0.05, 0.0, -0.1])
    f = TransferFilter(np.linspace(0.0, 1.0, 6), h)
    inv = f.inverse(8.0)
    np.testing.assert_allclose(inv.gain[:3], 1.0 / h[:3])
    assert inv.max_gain <= 8.0 + 1e-12
    assert inv.gain[3] == pytest.approx(0.05 * 64.0)  # below 1/max_gain the gain rolls off to 0
    assert inv.gain[4] == 0.0 and inv.gain[5] == 0.0
    with pytest.raises(ValueError):
        f.inverse(1.0)


def test_json_round_trip_and_refusals():
    f = TransferFilter(np.array([0.0, 0.25, 0.5]), np.array([1.0, 0.6, 0.1]), "test")
    g = TransferFilter.from_dict(f.to_dict())
    np.testing.assert_allclose(g.gain, f.gain)
    np.testing.assert_allclose(g.freq_per_mm, f.freq_per_mm)
    assert g.description == "test"
    with pytest.raises(ValueError):
        TransferFilter.from_dict({"type": "something else"})
    with pytest.raises(ValueError):
        TransferFilter(np.array([0.1, 0.2]), np.array([1.0, 1.0]))  # must start at 0
    with pytest.raises(ValueError):
        fit_transfer_filter(np.zeros((1, 8, 8)), np.zeros((1, 8, 9)), (1.0, 1.0))
