"""Noise and sharpness measurements that work the same on real and simulated CT slices.

The realism check (``Training.simulator.realism``) and the kernel fits (``Training.simulator.fit``) apply
exactly these functions to a real series and to its emulation, so anatomy that leaks into a measurement
leaks into both alike.

- ``highpass_noise_sd``: SD of the image minus its Gaussian blur (sigma 2 px) in soft tissue, the figure
  the shared real series' READMEs quote (Philips chest L / B: about 53 / 9 HU).
- ``uniform_nps``: radial NPS from square ROIs that lie wholly in smooth soft tissue or fat, each
  plane-detrended (ICRU 87 style on patient images).
- ``edge_width_mm``: 10-90 % rise distance of the mean skin-air edge spread function, profiles taken
  across the left and right body outline and aligned on their -500 HU crossing (noise averages out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from TextureStarGANCore.masks import BODY_THRESHOLD_HU, body_mask
from Training.simulator.nps import radial_nps

__all__ = [
    "SOFT_TISSUE_HU",
    "soft_tissue_mask",
    "highpass_noise_sd",
    "uniform_nps",
    "smoothed_peak",
    "edge_width_mm",
    "NoiseFigures",
    "measure_slices",
]

SOFT_TISSUE_HU = (0.0, 100.0)  # muscle, organs, blood (not fat), on the 2-px-smoothed image
NOISE_ERODE_PX = 5  # with 0..100 HU this reproduces the shared pair's quoted 53 / 9 HU
HIGHPASS_SIGMA_PX = 2.0


def _smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(np.asarray(img, dtype=np.float32), sigma)


def soft_tissue_mask(
    hu: np.ndarray, erode_px: int = NOISE_ERODE_PX, hu_range: tuple[float, float] = SOFT_TISSUE_HU
) -> np.ndarray:
    """Body pixels whose smoothed value lies in ``hu_range`` (soft tissue), away from edges (eroded)."""
    sm = _smooth(hu, HIGHPASS_SIGMA_PX)
    return _erode((sm > hu_range[0]) & (sm < hu_range[1]) & body_mask(hu), erode_px)


def _erode(mask: np.ndarray, px: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=px) if px else mask


def highpass_noise_sd(hu: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SD (HU) of ``hu`` minus its Gaussian blur (sigma 2 px) inside ``mask`` (default: soft tissue)."""
    hu = np.asarray(hu, dtype=np.float32)
    mask = soft_tissue_mask(hu) if mask is None else mask
    if mask.sum() < 50:
        return float("nan")
    return float((hu - _smooth(hu, HIGHPASS_SIGMA_PX))[mask].std())


def uniform_rois(hu: np.ndarray, mask: np.ndarray, roi: int, stride: int | None = None) -> np.ndarray:
    """Square ROIs lying wholly inside ``mask`` (K, roi, roi); empty (0, roi, roi) when none fits."""
    stride = stride or roi // 2
    out = []
    for r in range(0, hu.shape[0] - roi + 1, stride):
        for c in range(0, hu.shape[1] - roi + 1, stride):
            if mask[r : r + roi, c : c + roi].all():
                out.append(hu[r : r + roi, c : c + roi])
    return np.asarray(out, dtype=np.float64).reshape(-1, roi, roi)


def uniform_nps(rois: np.ndarray, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Radial NPS (HU^2 mm^2) of plane-detrended ROIs: (frequencies /mm, values)."""
    return radial_nps(rois, pixel_mm, bins=rois.shape[-1] // 2, detrend="plane")


def smoothed_peak(freq: np.ndarray, nps: np.ndarray) -> float:
    """Frequency of the maximum of the 3-bin moving average (one noisy ring does not decide the peak),
    refined between bins by the vertex of the parabola through the maximum and its neighbours (ROI NPS
    bins are 1 / (ROI x pixel) wide: 0.04 /mm for 32 px ROIs at 0.84 mm)."""
    sm = np.convolve(nps, np.ones(3) / 3.0, mode="same")
    i = int(np.argmax(sm))
    if 0 < i < len(sm) - 1:
        den = sm[i - 1] - 2.0 * sm[i] + sm[i + 1]
        if den < 0:
            shift = float(np.clip(0.5 * (sm[i - 1] - sm[i + 1]) / den, -0.5, 0.5))
            return float(freq[i] + shift * (freq[i + 1] - freq[i]))
    return float(freq[i])


def _edge_profiles(hu: np.ndarray, half: int = 10) -> list[np.ndarray]:
    body = body_mask(hu)
    rows = np.nonzero(body.any(axis=1))[0]
    if rows.size < 10:
        return []
    # Rows near the body's vertical middle: there the left / right outline runs roughly along the columns.
    mid, span = 0.5 * (rows[0] + rows[-1]), 0.15 * (rows[-1] - rows[0])
    out = []
    for r in rows[(rows > mid - span) & (rows < mid + span)]:
        cols = np.nonzero(body[r])[0]
        for edge, line in ((cols[0], hu[r]), (hu.shape[1] - 1 - cols[-1], hu[r, ::-1])):
            if half <= edge < hu.shape[1] - half:
                out.append(np.asarray(line[edge - half : edge + half], dtype=np.float64))
    return out


def edge_width_mm(hu: np.ndarray, pixel_mm: float, half: int = 10) -> float:
    """10-90 % distance (mm) of the mean skin-air edge profile; NaN when the body outline is not in view."""
    profiles = _edge_profiles(hu, half)
    if len(profiles) < 5:
        return float("nan")
    x = np.arange(2 * half, dtype=np.float64)
    aligned = []
    for p in profiles:
        above = np.nonzero(p > BODY_THRESHOLD_HU)[0]
        if above.size == 0 or above[0] == 0:
            continue
        i = int(above[0])
        x0 = i - 1 + (BODY_THRESHOLD_HU - p[i - 1]) / max(p[i] - p[i - 1], 1e-6)  # sub-pixel crossing
        aligned.append(np.interp(x + x0 - half, x, p))
    if len(aligned) < 5:
        return float("nan")
    esf = np.median(aligned, axis=0)
    lo, hi = float(np.median(esf[:4])), float(np.median(esf[-4:]))
    if hi - lo < 300.0:
        return float("nan")
    level = (esf - lo) / (hi - lo)
    # First crossings of 10 % and 90 % around the centre, linearly interpolated.
    def crossing(t: float) -> float:
        j = int(np.nonzero(level >= t)[0][0])
        return j - 1 + (t - level[j - 1]) / max(level[j] - level[j - 1], 1e-9) if j > 0 else 0.0

    return float((crossing(0.9) - crossing(0.1)) * pixel_mm)


@dataclass
class NoiseFigures:
    """Per-series noise and sharpness figures (means over the measured slices)."""

    highpass_sd_hu: float
    nps_freq: np.ndarray
    nps: np.ndarray
    nps_peak_per_mm: float
    edge_width_mm: float
    rois: int

    def summary(self) -> dict:
        return {
            "highpass_sd_hu": round(self.highpass_sd_hu, 2),
            "nps_peak_per_mm": round(self.nps_peak_per_mm, 3),
            "edge_width_mm": round(self.edge_width_mm, 3),
            "nps_rois": self.rois,
        }


def measure_slices(
    slices: np.ndarray, pixel_mm: float, reference: np.ndarray | None = None, roi: int = 32
) -> NoiseFigures:
    """Noise and sharpness figures of (N, R, C) HU slices. The regions (soft tissue for the high-pass
    noise, smooth tissue for the NPS ROIs) come from ``reference`` (default: the slices themselves), so a
    simulation or the other kernel of a pair is measured in exactly the same pixels."""
    reference = slices if reference is None else reference
    sds, widths = [], []
    roi_masks = [soft_tissue_mask(ref, 0) for ref in reference]
    for s, ref in zip(slices, reference, strict=True):
        sd = highpass_noise_sd(s, soft_tissue_mask(ref))
        if np.isfinite(sd):
            sds.append(sd)
        widths.append(edge_width_mm(s, pixel_mm))
    # The largest ROI (finest frequency sampling) of which at least 20 fit in soft tissue.
    for size in (roi, 3 * roi // 4, roi // 2):
        rois = np.concatenate([uniform_rois(s, m, size) for s, m in zip(slices, roi_masks, strict=True)])
        if len(rois) >= 20:
            break
    if len(rois) == 0:
        raise ValueError(f"no {size} x {size} px soft-tissue region found to measure the NPS")
    freq, nps = uniform_nps(rois, pixel_mm)
    w = np.asarray(widths)
    return NoiseFigures(
        float(np.sqrt(np.mean(np.square(sds)))) if sds else float("nan"),
        freq,
        nps,
        smoothed_peak(freq, nps),
        float(np.nanmedian(w)) if np.isfinite(w).any() else float("nan"),
        len(rois),
    )
