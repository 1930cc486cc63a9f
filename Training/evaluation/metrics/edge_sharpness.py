"""Edge sharpness from high-contrast edges: an edge-spread function (ESF) and its MTF-like curve.

Edges are found once, on the real target (air/tissue and bone/tissue boundaries: Canny edges whose step
between the two sides is at least ``MIN_STEP_HU``), so every image is measured on the same edges. At each
edge point a profile is sampled along the edge normal (bilinear, ``STEP_PX`` apart, +-``HALF_MM``); the
profiles are mapped to 0..1 with the reference's plateaus (the same affine map for every image) and
averaged, and the mean is re-normalised by its own end plateaus. From the ESF: the 10-90 % rise distance
(mm, smaller = sharper) and, from its derivative (the line-spread function), the frequency where the
MTF-like curve falls to 50 % (cycles/mm). Edge position jitter of up to half a pixel widens every image's
ESF alike, so compare images with each other, not with scanner MTF specifications.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MIN_STEP_HU = 400.0
HALF_MM = 4.0
STEP_PX = 0.25
PLATEAU_MM = 1.0
MAX_EDGES_PER_SLICE = 400


@dataclass
class EdgeSet:
    """Edge points of a reference stack: slice index, row, col, unit normal (dr, dc) pointing to the bright
    side, and the reference's plateau values (low, high)."""

    slice_index: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    normals: np.ndarray
    low: np.ndarray
    high: np.ndarray
    offsets_px: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def _profiles(img: np.ndarray, rows: np.ndarray, cols: np.ndarray, normals: np.ndarray,
              offsets: np.ndarray) -> np.ndarray:
    r = rows[:, None] + normals[:, :1] * offsets[None, :]
    c = cols[:, None] + normals[:, 1:] * offsets[None, :]
    return ndimage.map_coordinates(img, [r.ravel(), c.ravel()], order=1, mode="nearest").reshape(r.shape)


def find_edges(
    reference_hu: np.ndarray, pixel_mm: float, max_per_slice: int = MAX_EDGES_PER_SLICE
) -> EdgeSet:
    """High-contrast edge points of a (slices, rows, cols) reference stack in HU."""
    from skimage.feature import canny

    ref = np.asarray(reference_hu, dtype=np.float32)
    if ref.ndim == 2:
        ref = ref[None]
    half = HALF_MM / pixel_mm
    offsets = np.arange(-half, half + 1e-6, STEP_PX)
    plateau = offsets.size and (np.abs(offsets) >= half - PLATEAU_MM / pixel_mm)
    keep = {k: [] for k in ("s", "r", "c", "n", "lo", "hi")}
    for k, sl in enumerate(ref):
        clipped = np.clip(sl, -1024.0, 1500.0)
        smooth = ndimage.gaussian_filter(clipped, 2.0)
        edges = canny(clipped, sigma=2.0, low_threshold=MIN_STEP_HU / 20, high_threshold=MIN_STEP_HU / 8)
        gr, gc = ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)
        r, c = np.nonzero(edges)
        margin = int(np.ceil(half)) + 2
        ok = (r >= margin) & (c >= margin) & (r < sl.shape[0] - margin) & (c < sl.shape[1] - margin)
        r, c = r[ok], c[ok]
        mag = np.hypot(gr[r, c], gc[r, c])
        good = mag > 0
        r, c, mag = r[good], c[good], mag[good]
        normals = np.stack([gr[r, c] / mag, gc[r, c] / mag], axis=1)
        prof = _profiles(smooth, r.astype(float), c.astype(float), normals, offsets)
        lo = prof[:, offsets < 0][:, plateau[offsets < 0]].mean(axis=1)
        hi = prof[:, offsets > 0][:, plateau[offsets > 0]].mean(axis=1)
        # High contrast, and the smooth profile rises monotonically (one edge, not a thin structure).
        ok = (hi - lo >= MIN_STEP_HU) & (np.diff(prof, axis=1).min(axis=1) > -0.02 * (hi - lo))
        idx = np.nonzero(ok)[0]
        if idx.size > max_per_slice:
            idx = idx[np.linspace(0, idx.size - 1, max_per_slice).round().astype(int)]
        keep["s"].append(np.full(idx.size, k))
        keep["r"].append(r[idx].astype(float))
        keep["c"].append(c[idx].astype(float))
        keep["n"].append(normals[idx])
        keep["lo"].append(lo[idx])
        keep["hi"].append(hi[idx])
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in keep.items()}
    normals = cat["n"].reshape(-1, 2)
    return EdgeSet(cat["s"].astype(int), cat["r"], cat["c"], normals, cat["lo"], cat["hi"], offsets)


@dataclass
class EdgeSpread:
    distance_mm: np.ndarray
    esf: np.ndarray
    width_10_90_mm: float
    mtf_freq_per_mm: np.ndarray
    mtf: np.ndarray
    mtf50_per_mm: float

    def summary(self) -> dict:
        return {"edge_width_10_90_mm": self.width_10_90_mm, "mtf50_per_mm": self.mtf50_per_mm}


def _crossing(x: np.ndarray, y: np.ndarray, level: float) -> float:
    above = np.nonzero(y >= level)[0]
    if above.size == 0 or above[0] == 0:
        return float(x[0]) if above.size else float("nan")
    i = above[0]
    return float(x[i - 1] + (level - y[i - 1]) * (x[i] - x[i - 1]) / max(y[i] - y[i - 1], 1e-12))


def edge_spread(image_hu: np.ndarray, edges: EdgeSet, pixel_mm: float) -> EdgeSpread:
    """The mean ESF of ``image_hu`` (same stack as the reference of ``edges``) and its summary figures."""
    img = np.asarray(image_hu, dtype=np.float32)
    if img.ndim == 2:
        img = img[None]
    if len(edges) == 0:
        raise ValueError("no high-contrast edges to measure sharpness on")
    prof = np.empty((len(edges), edges.offsets_px.size))
    for k in np.unique(edges.slice_index):
        sel = edges.slice_index == k
        prof[sel] = _profiles(img[k], edges.rows[sel], edges.cols[sel], edges.normals[sel], edges.offsets_px)
    norm = (prof - edges.low[:, None]) / (edges.high - edges.low)[:, None]
    esf = norm.mean(axis=0)
    d = edges.offsets_px * pixel_mm
    plateau = np.abs(d) >= HALF_MM - PLATEAU_MM
    lo, hi = esf[plateau & (d < 0)].mean(), esf[plateau & (d > 0)].mean()
    esf = (esf - lo) / max(hi - lo, 1e-12)
    rising = np.maximum.accumulate(esf)  # overshoot/ringing of sharp kernels must not stop the search
    width = _crossing(d, rising, 0.9) - _crossing(d, rising, 0.1)
    lsf = np.gradient(esf, d) * np.hanning(d.size)
    mtf = np.abs(np.fft.rfft(lsf))
    mtf = mtf / max(float(mtf[0]), 1e-12)
    freq = np.fft.rfftfreq(d.size, d=float(d[1] - d[0]))
    below = np.nonzero(mtf < 0.5)[0]
    mtf50 = float("nan")
    if below.size and below[0] > 0:
        i = below[0]
        mtf50 = float(freq[i - 1] + (0.5 - mtf[i - 1]) * (freq[i] - freq[i - 1]) / (mtf[i] - mtf[i - 1]))
    nyq = 0.5 / pixel_mm
    keep = freq <= nyq * 1.0001
    return EdgeSpread(d, esf, float(width), freq[keep], mtf[keep], mtf50)
