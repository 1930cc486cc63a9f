"""Linear kernel-transfer filter: a radial frequency response that maps one reconstruction kernel to another.

Two filtered-back-projection reconstructions of the same raw data differ by the ratio of their kernels'
transfer functions, so sharp -> smooth is close to a linear, shift-invariant filter and smooth -> sharp is
its inverse where the smooth kernel still passes signal. The response is a function of the radial spatial
frequency in cycles/mm (not cycles/pixel), so a filter fitted on 0.84 mm pixels applies to 0.45 mm pixels:
frequencies above the highest fitted one keep the last fitted gain.

- :func:`fit_transfer_filter`: least-squares fit of a piecewise-linear radial response from paired slices
  (same anatomy, same grid), i.e. minimise sum |FFT(target) - H(|f|) FFT(source)|^2 over all slices;
- :meth:`TransferFilter.inverse`: the regularised inverse with a bounded gain (the sharpening direction);
- :meth:`TransferFilter.apply`: filter a (slices, rows, cols) HU volume at any pixel spacing;
- :meth:`TransferFilter.to_dict` / :meth:`TransferFilter.from_dict`: plain JSON for reports and model cards.

Runs on Python 3.9 (bundled into the Slicer extension).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TransferFilter", "fit_transfer_filter", "radial_frequency"]

# Reflected border around each slice before the FFT, so the filter does not wrap one edge into the other.
PAD_MM = 16.0
DEFAULT_KNOTS = 64


def radial_frequency(shape: Sequence[int], spacing_xy: Sequence[float]) -> np.ndarray:
    """|f| in cycles/mm of every ``numpy.fft.rfft2`` coefficient of a (rows, cols) image."""
    rows, cols = int(shape[0]), int(shape[1])
    sx, sy = float(spacing_xy[0]), float(spacing_xy[1])
    fy = np.fft.fftfreq(rows, d=sy)[:, None]
    fx = np.fft.rfftfreq(cols, d=sx)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def _hat_weights(freq: np.ndarray, knots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation between knots: (index of the left knot, weight of the right knot)."""
    f = np.clip(freq, knots[0], knots[-1])
    left = np.clip(np.searchsorted(knots, f, side="right") - 1, 0, len(knots) - 2)
    w = (f - knots[left]) / (knots[left + 1] - knots[left])
    return left, w


@dataclass(frozen=True)
class TransferFilter:
    """A radial frequency response: ``gain`` at ``freq_per_mm`` (ascending, from 0), linear in between."""

    freq_per_mm: np.ndarray
    gain: np.ndarray
    description: str = ""

    def __post_init__(self) -> None:
        f = np.asarray(self.freq_per_mm, dtype=np.float64)
        g = np.asarray(self.gain, dtype=np.float64)
        if f.ndim != 1 or f.shape != g.shape or len(f) < 2:
            raise ValueError("a transfer filter needs at least two knots with one gain each")
        if f[0] != 0.0 or np.any(np.diff(f) <= 0):
            raise ValueError("filter knots must start at 0 cycles/mm and increase")
        if not np.all(np.isfinite(g)):
            raise ValueError("filter gains must be finite")
        object.__setattr__(self, "freq_per_mm", f)
        object.__setattr__(self, "gain", g)

    def response(self, freq_per_mm: np.ndarray) -> np.ndarray:
        """The gain at the given radial frequencies (the last gain beyond the last knot)."""
        return np.interp(np.asarray(freq_per_mm, dtype=np.float64), self.freq_per_mm, self.gain)

    @property
    def max_gain(self) -> float:
        return float(np.max(np.abs(self.gain)))

    def inverse(self, max_gain: float) -> TransferFilter:
        """Regularised inverse with gain bounded by ``max_gain``: 1/h where h >= 1/max_gain, h * max_gain^2
        below (falling to 0 where the forward filter passes no signal), 0 where h <= 0."""
        if not max_gain > 1.0:
            raise ValueError(f"max_gain must be above 1, got {max_gain}")
        h = self.gain
        floor = 1.0 / (max_gain * max_gain)
        inv = np.where(h > 0, h / np.maximum(h * h, floor), 0.0)
        return TransferFilter(self.freq_per_mm, inv,
                              f"inverse of ({self.description}), max gain {max_gain:g}")

    def apply(self, volume: np.ndarray, spacing_xy: Sequence[float]) -> np.ndarray:
        """Filter every slice of a (slices, rows, cols) or (rows, cols) HU array; float32 of the same shape.

        ``spacing_xy`` is (x, y) mm (x between columns). Each slice is padded by reflection (``PAD_MM``)
        so the FFT's periodic boundary does not blend opposite edges.
        """
        arr = np.asarray(volume, dtype=np.float32)
        single = arr.ndim == 2
        if single:
            arr = arr[None]
        if arr.ndim != 3:
            raise ValueError(f"expected (slices, rows, cols) or (rows, cols), got shape {arr.shape}")
        sx, sy = float(spacing_xy[0]), float(spacing_xy[1])
        if not (sx > 0 and sy > 0):
            raise ValueError(f"pixel spacing must be positive, got {spacing_xy}")
        rows, cols = arr.shape[1:]
        pr = min(int(np.ceil(PAD_MM / sy)), rows - 1)
        pc = min(int(np.ceil(PAD_MM / sx)), cols - 1)
        shape = (rows + 2 * pr, cols + 2 * pc)
        h = self.response(radial_frequency(shape, (sx, sy)))
        out = np.empty_like(arr)
        for i, sl in enumerate(arr):
            padded = np.pad(sl.astype(np.float64), ((pr, pr), (pc, pc)), mode="reflect")
            filtered = np.fft.irfft2(np.fft.rfft2(padded) * h, s=shape)
            out[i] = filtered[pr:pr + rows, pc:pc + cols]
        return out[0] if single else out

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "radial_transfer_filter",
            "freq_per_mm": [round(float(v), 6) for v in self.freq_per_mm],
            "gain": [round(float(v), 6) for v in self.gain],
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: Any) -> TransferFilter:
        if not isinstance(d, dict) or d.get("type") != "radial_transfer_filter":
            raise ValueError("not a radial transfer filter description (type 'radial_transfer_filter')")
        try:
            return cls(np.asarray(d["freq_per_mm"], float), np.asarray(d["gain"], float),
                       str(d.get("description", "")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid transfer filter description: {exc}") from exc


def fit_transfer_filter(
    sources: np.ndarray,
    targets: np.ndarray,
    spacing_xy: Sequence[float],
    knots: np.ndarray | None = None,
    ridge: float = 1e-9,
    description: str = "",
) -> TransferFilter:
    """Least-squares radial response H mapping ``sources`` to ``targets`` (paired slices, same grid).

    H is piecewise linear in |f| between ``knots`` (default: ``DEFAULT_KNOTS`` from 0 to the corner
    frequency of the grid); the fit solves the normal equations of sum |T(f) - H(|f|) S(f)|^2 over every
    frequency of every slice. ``ridge`` (relative to the mean diagonal) keeps knots without data finite.
    """
    src = np.asarray(sources, dtype=np.float64)
    tgt = np.asarray(targets, dtype=np.float64)
    if src.ndim == 2:
        src, tgt = src[None], tgt[None]
    if src.shape != tgt.shape or src.ndim != 3:
        raise ValueError(f"source and target slices must have the same (slices, rows, cols) shape, got "
                         f"{src.shape} and {tgt.shape}")
    if src.shape[0] == 0:
        raise ValueError("no slices to fit the transfer filter on")
    freq = radial_frequency(src.shape[1:], spacing_xy)
    if knots is None:
        knots = np.linspace(0.0, float(freq.max()) * (1 + 1e-9), DEFAULT_KNOTS)
    knots = np.asarray(knots, dtype=np.float64)
    left, w = _hat_weights(freq.ravel(), knots)
    n = len(knots)
    # rfft2 stores half the spectrum: columns 1..(cols-1)//2 stand for two coefficients each.
    mult = np.full(freq.shape, 2.0)
    mult[:, 0] = 1.0
    if src.shape[2] % 2 == 0:
        mult[:, -1] = 1.0
    mult = mult.ravel()
    diag, off, rhs = np.zeros(n), np.zeros(n - 1), np.zeros(n)
    for i in range(src.shape[0]):  # index loop: zip(strict=) is not available on Python 3.9
        fs, ft = np.fft.rfft2(src[i]).ravel(), np.fft.rfft2(tgt[i]).ravel()
        pss = mult * np.abs(fs) ** 2
        pst = mult * np.real(np.conj(fs) * ft)
        diag += np.bincount(left, pss * (1 - w) ** 2, n) + np.bincount(left + 1, pss * w * w, n)
        off += np.bincount(left, pss * (1 - w) * w, n - 1)[: n - 1]
        rhs += np.bincount(left, pst * (1 - w), n) + np.bincount(left + 1, pst * w, n)
    a = np.diag(diag) + np.diag(off, 1) + np.diag(off, -1)
    a += np.eye(n) * ridge * max(float(diag.mean()), 1e-30)
    gain = np.linalg.solve(a, rhs)
    return TransferFilter(knots, gain, description)
