"""Soft-tissue high-pass noise: how much fine texture a kernel leaves in uniform tissue.

High-pass = image minus its Gaussian blur (sigma ``HP_SIGMA_PX`` pixels); its SD inside soft tissue (the
same pixels in every image: chosen on the real target) is a one-number summary of kernel noise, the figure
the real-CT data READMEs quote. ``gap_closed`` says how much of the difference to the real target a
conversion removed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from TextureStarGANCore.masks import body_mask

HP_SIGMA_PX = 2.0
SOFT_TISSUE_HU = (-150.0, 150.0)  # fat to muscle/organs, on the smoothed reference
EDGE_MARGIN_PX = 6  # 3 sigma: the blur of a tissue boundary stays out of the mask


def highpass(hu: np.ndarray, sigma_px: float = HP_SIGMA_PX) -> np.ndarray:
    """``hu`` minus its Gaussian blur, slice by slice (no blur across slices)."""
    a = np.asarray(hu, dtype=np.float32)
    sig = (0.0, sigma_px, sigma_px) if a.ndim == 3 else sigma_px
    return a - ndimage.gaussian_filter(a, sig)


def soft_tissue_mask(reference_hu: np.ndarray) -> np.ndarray:
    """Soft tissue of one reference slice, away from any boundary: inside the body, and the smoothed
    reference stays within ``SOFT_TISSUE_HU`` everywhere within ``EDGE_MARGIN_PX`` (so thin partial-volume
    bands between air and bone, whose values pass through the soft-tissue range, stay out)."""
    ref = np.asarray(reference_hu, dtype=np.float32)
    smooth = ndimage.gaussian_filter(ref, 2.0 * HP_SIGMA_PX)
    size = 2 * EDGE_MARGIN_PX + 1
    soft = (ndimage.minimum_filter(smooth, size) > SOFT_TISSUE_HU[0]) & (
        ndimage.maximum_filter(smooth, size) < SOFT_TISSUE_HU[1])
    inner_body = ndimage.binary_erosion(body_mask(ref), iterations=EDGE_MARGIN_PX)
    return soft & inner_body


def highpass_noise_sd(hu: np.ndarray, mask: np.ndarray) -> float:
    """SD (HU) of the high-pass image inside ``mask`` (same shape as ``hu``, 2D or 3D)."""
    m = np.asarray(mask, bool)
    return float(highpass(hu)[m].std()) if m.any() else float("nan")


def gap_closed(before: float, after: float, target: float) -> float:
    """Share of the gap |before - target| that ``after`` closed: 1 = reaches the target, 0 = no change,
    negative = further away (overshoot beyond the target by more than the gap counts as negative too)."""
    gap = abs(before - target)
    if not np.isfinite(gap) or gap < 1e-9:
        return float("nan")
    return float(1.0 - abs(after - target) / gap)
