"""Paired ground truth on simulated data: what the paper could not measure.

The simulator reconstructs the same phantom slice with every kernel, so a slice harmonized from kernel a to
kernel b can be compared with the true kernel-b reconstruction of the same slice (same ``patient`` and
``slice_index`` in the manifest):
- PSNR and SSIM inside the body of the true slice, on HU clipped to the model window (data range = the
  window width), "before" = the source slice itself, "after" = the harmonized slice;
- noise power spectra (``simulator.nps``) of square ROIs in uniform soft tissue, the same ROI positions in
  the source, harmonized and true slices (plane-detrended), and their distance: relative L2 between the
  radial NPS curves, ||NPS - NPS_true|| / ||NPS_true||.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

from TextureStarGANCore.masks import body_mask
from Training.simulator.nps import measure_nps, noise_rois

ROI_MM = 24.0  # ROI side for the NPS
SOFT_TISSUE_HU = (-300.0, 300.0)  # uniform-region test on the smoothed true image
UNIFORM_RANGE_HU = 80.0  # max - min of the smoothed truth across an ROI
MAX_ROIS_PER_SLICE = 8
# Real-pair RMSE window: air to dense soft tissue; bone and metal above it would dominate the error.
RMSE_WINDOW_HU = (-1024.0, 600.0)


def psnr_ssim(
    pred_hu: np.ndarray, truth_hu: np.ndarray, hu_window: tuple[float, float], mask: np.ndarray | None = None
) -> tuple[float, float]:
    """PSNR (dB) and mean SSIM inside ``mask`` (default: body of the truth) on window-clipped HU."""
    lo, hi = hu_window
    p = np.clip(np.asarray(pred_hu, np.float64), lo, hi)
    t = np.clip(np.asarray(truth_hu, np.float64), lo, hi)
    if p.shape != t.shape:
        raise ValueError(f"prediction and truth shapes differ: {p.shape} vs {t.shape}")
    mask = body_mask(t) if mask is None else np.asarray(mask, bool)
    if not mask.any():
        mask = np.ones_like(t, dtype=bool)
    rng = hi - lo
    mse = float(np.mean((p[mask] - t[mask]) ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * np.log10(rng * rng / mse)
    _, smap = structural_similarity(p, t, data_range=rng, full=True)
    return psnr, float(smap[mask].mean())


def lowpass_rmse_hu(
    pred_hu: np.ndarray,
    truth_hu: np.ndarray,
    mask: np.ndarray,
    pixel_mm: float,
    sigma_mm: float = 3.0,
    hu_window: tuple[float, float] = RMSE_WINDOW_HU,
) -> float:
    """``rmse_hu`` of the low-pass images (Gaussian of ``sigma_mm`` in-plane, after clipping): the anatomy and
    mean tissue values, with the kernels' noise and texture removed."""
    from scipy import ndimage

    sig = (0.0, sigma_mm / pixel_mm, sigma_mm / pixel_mm)
    lo, hi = hu_window

    def low(v: np.ndarray) -> np.ndarray:
        v = np.clip(np.asarray(v, np.float64), lo, hi)
        return ndimage.gaussian_filter(v if v.ndim == 3 else v[None], sig)

    truth = low(truth_hu)
    return rmse_hu(low(pred_hu), truth, np.asarray(mask, bool).reshape(truth.shape), hu_window)


def rmse_hu(
    pred_hu: np.ndarray,
    truth_hu: np.ndarray,
    mask: np.ndarray,
    hu_window: tuple[float, float] = RMSE_WINDOW_HU,
) -> float:
    """Root-mean-square HU difference inside ``mask`` after clipping both images to ``hu_window``."""
    lo, hi = hu_window
    p = np.clip(np.asarray(pred_hu, np.float64), lo, hi)
    t = np.clip(np.asarray(truth_hu, np.float64), lo, hi)
    if p.shape != t.shape:
        raise ValueError(f"prediction and truth shapes differ: {p.shape} vs {t.shape}")
    m = np.asarray(mask, bool)
    return float(np.sqrt(np.mean((p[m] - t[m]) ** 2))) if m.any() else float("nan")


def nps_distance(nps: np.ndarray, reference_nps: np.ndarray) -> float:
    """Relative L2 distance between two radial NPS curves on the same frequency bins."""
    ref = np.asarray(reference_nps, np.float64)
    return float(np.linalg.norm(np.asarray(nps, np.float64) - ref) / max(float(np.linalg.norm(ref)), 1e-12))


def roi_size(spacing_mm: float, canvas: int) -> int:
    return int(max(8, min(round(ROI_MM / spacing_mm), canvas // 4)))


def uniform_roi_centers(
    truth_hu: np.ndarray, spacing_mm: float, size: int, max_rois: int = MAX_ROIS_PER_SLICE
) -> list[tuple[int, int]]:
    """Centres of non-overlapping ROIs in uniform soft tissue of the true slice (heart, liver, muscle).

    Uniform: the whole ROI is in the body, and the truth smoothed at 2 mm varies by less than
    ``UNIFORM_RANGE_HU`` across it around a soft-tissue value, so anatomy edges stay out of the NPS.
    """
    t = np.asarray(truth_hu, np.float32)
    smooth = ndimage.gaussian_filter(t, sigma=max(1.0, 3.0 / spacing_mm))
    body = body_mask(t)
    # Noise left after smoothing must not disqualify every ROI of a sharp, noisy kernel: allow a spread of
    # a few robust SDs of that residual noise (median absolute deviation of the smoothed image's detail).
    detail = (t - smooth)[body]
    mad = float(np.median(np.abs(detail - np.median(detail)))) if detail.size else 0.0
    residual_sd = 1.4826 * mad / max(1.0, 3.0 / spacing_mm)
    limit = max(UNIFORM_RANGE_HU, 6.0 * residual_sd)
    spread = ndimage.maximum_filter(smooth, size) - ndimage.minimum_filter(smooth, size)
    inside = ndimage.binary_erosion(body, structure=np.ones((size, size), bool), border_value=0)
    ok = inside & (spread < limit) & (smooth > SOFT_TISSUE_HU[0]) & (smooth < SOFT_TISSUE_HU[1])
    h = size // 2
    taken = np.zeros_like(ok)
    centers: list[tuple[int, int]] = []
    # Most uniform first; an ROI may not overlap one already taken.
    for flat in np.argsort(np.where(ok, spread, np.inf), axis=None):
        r, c = np.unravel_index(flat, ok.shape)
        if not ok[r, c] or len(centers) >= max_rois:
            break
        if r < h or c < h or r + size - h > t.shape[0] or c + size - h > t.shape[1]:
            continue
        if taken[r - h : r - h + size, c - h : c - h + size].any():
            continue
        taken[r - h : r - h + size, c - h : c - h + size] = True
        centers.append((int(r), int(c)))
    return centers


@dataclass
class PairedDirection:
    """Accumulates one direction (source -> target) slice by slice."""

    spacing_mm: float
    hu_window: tuple[float, float]
    psnr_before: list[float] = field(default_factory=list)
    psnr_after: list[float] = field(default_factory=list)
    ssim_before: list[float] = field(default_factory=list)
    ssim_after: list[float] = field(default_factory=list)
    rois: dict[str, list[np.ndarray]] = field(
        default_factory=lambda: {"source": [], "harmonized": [], "target": []}
    )

    def add(self, source_hu: np.ndarray, harmonized_hu: np.ndarray, truth_hu: np.ndarray) -> None:
        mask = body_mask(np.asarray(truth_hu))
        p, s = psnr_ssim(source_hu, truth_hu, self.hu_window, mask)
        self.psnr_before.append(p)
        self.ssim_before.append(s)
        p, s = psnr_ssim(harmonized_hu, truth_hu, self.hu_window, mask)
        self.psnr_after.append(p)
        self.ssim_after.append(s)
        size = roi_size(self.spacing_mm, truth_hu.shape[-1])
        centers = uniform_roi_centers(truth_hu, self.spacing_mm, size)
        if centers:
            for key, img in (("source", source_hu), ("harmonized", harmonized_hu), ("target", truth_hu)):
                self.rois[key].append(noise_rois(np.asarray(img, np.float64), centers, size))

    def summary(self) -> dict:
        out: dict = {"slices": len(self.psnr_after)}
        for key in ("psnr_before", "psnr_after", "ssim_before", "ssim_after"):
            vals = [v for v in getattr(self, key) if np.isfinite(v)]
            out[key] = float(np.mean(vals)) if vals else None
        out["nps_rois"] = int(sum(len(r) for r in self.rois["target"]))
        if not out["nps_rois"]:
            out.update(nps_distance_before=None, nps_distance_after=None, nps=None)
            return out
        curves = {
            k: measure_nps(np.concatenate(v), self.spacing_mm, detrend="plane") for k, v in self.rois.items()
        }
        ref = curves["target"].nps
        out["nps_distance_before"] = nps_distance(curves["source"].nps, ref)
        out["nps_distance_after"] = nps_distance(curves["harmonized"].nps, ref)
        out["nps"] = {
            "freq_per_mm": curves["target"].freq.tolist(),
            **{k: {"nps": c.nps.tolist(), **c.summary()} for k, c in curves.items()},
        }
        return out
