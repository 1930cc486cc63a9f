"""Noise power spectrum (NPS): the texture fingerprint of a reconstruction kernel.

NPS(fx, fy) = (dx dy / (Nx Ny)) <|DFT(roi - trend)|^2> over regions of interest (ICRU 87 / AAPM
convention), so its integral over frequency equals the noise variance. Radially averaged it gives the
curve whose peak frequency separates smooth from sharp kernels. Used by the simulator (calibration and
per-kernel reports) and by the evaluation (harmonized vs target kernel).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from TextureStarGANCore.fileio import write_figure_png, write_text_atomic

__all__ = ["NPSResult", "nps_2d", "radial_nps", "measure_nps", "noise_rois", "write_nps_csv", "plot_nps"]


@dataclass
class NPSResult:
    """Radial NPS with its summary figures (frequencies in cycles/mm, NPS in HU^2 mm^2)."""

    freq: np.ndarray
    nps: np.ndarray
    noise_sd: float

    @property
    def peak_freq(self) -> float:
        return float(self.freq[int(np.argmax(self.nps))])

    @property
    def mean_freq(self) -> float:
        return float((self.freq * self.nps).sum() / max(float(self.nps.sum()), 1e-12))

    def summary(self) -> dict:
        return {
            "peak_freq_per_mm": self.peak_freq,
            "mean_freq_per_mm": self.mean_freq,
            "noise_sd_hu": self.noise_sd,
        }


def _detrend(rois: np.ndarray, mode: str) -> np.ndarray:
    rois = np.asarray(rois, dtype=np.float64)
    if mode == "none":
        return rois
    if mode == "mean":
        return rois - rois.mean(axis=(-2, -1), keepdims=True)
    if mode == "plane":
        n, m = rois.shape[-2:]
        yy, xx = np.mgrid[:n, :m]
        A = np.stack([np.ones(n * m), xx.ravel(), yy.ravel()], axis=1)
        flat = rois.reshape(-1, n * m).T
        coef, *_ = np.linalg.lstsq(A, flat, rcond=None)
        return rois - (A @ coef).T.reshape(rois.shape)
    raise ValueError(f"detrend must be 'none', 'mean' or 'plane', got {mode!r}")


def nps_2d(rois: np.ndarray, pixel_mm: float, detrend: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """2D NPS (fftshifted, HU^2 mm^2) of K square ROIs (K, N, N) and the matching frequency axis."""
    rois = np.asarray(rois)
    if rois.ndim == 2:
        rois = rois[None]
    if rois.ndim != 3 or rois.shape[1] != rois.shape[2] or rois.shape[1] < 4:
        raise ValueError(f"NPS needs square ROIs of at least 4 x 4 pixels as (K, N, N), got {rois.shape}")
    n = rois.shape[-1]
    data = _detrend(rois, detrend)
    power = np.abs(np.fft.fft2(data)) ** 2
    nps = power.mean(axis=0) * (pixel_mm * pixel_mm) / (n * n)
    freq = np.fft.fftshift(np.fft.fftfreq(n, d=pixel_mm))
    return np.fft.fftshift(nps), freq


def radial_nps(
    rois: np.ndarray, pixel_mm: float, bins: np.ndarray | int | None = None, detrend: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged NPS: (bin centre frequencies, mean NPS in each ring) up to Nyquist."""
    nps2, freq = nps_2d(rois, pixel_mm, detrend)
    fr = np.sqrt(freq[None, :] ** 2 + freq[:, None] ** 2)
    nyq = 0.5 / pixel_mm
    if bins is None or isinstance(bins, int):
        n_bins = bins or rois.shape[-1] // 2
        edges = np.linspace(0.0, nyq, n_bins + 1)
    else:
        edges = np.asarray(bins, dtype=np.float64)
    idx = np.digitize(fr.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < len(edges) - 1)
    sums = np.bincount(idx[ok], weights=nps2.ravel()[ok], minlength=len(edges) - 1)
    counts = np.bincount(idx[ok], minlength=len(edges) - 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    return centres, sums / np.maximum(counts, 1)


def noise_rois(image: np.ndarray, centers: Sequence[tuple[int, int]], size: int) -> np.ndarray:
    """Square ROIs of ``size`` pixels around (row, col) centres; those leaving the image are skipped."""
    out = []
    h = size // 2
    for r, c in centers:
        r0, c0 = int(r) - h, int(c) - h
        if r0 >= 0 and c0 >= 0 and r0 + size <= image.shape[-2] and c0 + size <= image.shape[-1]:
            out.append(image[..., r0 : r0 + size, c0 : c0 + size])
    if not out:
        raise ValueError(f"no {size} x {size} ROI fits inside the image of shape {image.shape}")
    return np.stack(out).reshape(-1, size, size)


def measure_nps(
    rois: np.ndarray, pixel_mm: float, detrend: str = "mean", bins: int | None = None
) -> NPSResult:
    """NPS and noise SD of noise-only ROIs (or uniform-region ROIs, detrended)."""
    freq, nps = radial_nps(rois, pixel_mm, bins=bins, detrend=detrend)
    sd = float(np.sqrt(_detrend(np.asarray(rois), detrend).var(axis=(-2, -1)).mean()))
    return NPSResult(freq, nps, sd)


def write_nps_csv(path: str | os.PathLike, freq: np.ndarray, columns: Mapping[str, np.ndarray]) -> Path:
    """CSV with a frequency column (cycles/mm) and one column per named curve; written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["freq_per_mm", *columns.keys()])
    for i, f in enumerate(freq):
        w.writerow([f"{f:.5f}", *(f"{float(v[i]):.6g}" for v in columns.values())])
    return write_text_atomic(path, buf.getvalue())


def plot_nps(
    path: str | os.PathLike,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    title: str = "Noise power spectrum",
    normalize: bool = False,
    styles: Mapping[str, str] | None = None,
    ylabel: str | None = None,
) -> Path:
    """PNG of radial NPS curves {label: (freq, nps)}; ``normalize`` divides each by its peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (f, v) in curves.items():
        v = np.asarray(v, dtype=np.float64)
        if normalize:
            v = v / max(float(v.max()), 1e-12)
        ax.plot(f, v, (styles or {}).get(label, "-"), label=label)
    ax.set_xlabel("spatial frequency (cycles/mm)")
    ax.set_ylabel(ylabel or ("NPS / peak" if normalize else "NPS (HU$^2$ mm$^2$)"))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure_png(fig, path)
    return path
