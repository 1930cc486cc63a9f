"""Classical kernel-conversion baselines that a learned converter has to beat, fitted on paired slices.

- identity: the input itself;
- Gaussian blur (smoothing direction only): one sigma, fitted by minimising the RMSE to the target;
- linear kernel-transfer filter (``TextureStarGANCore.transfer_filter``): the radial response fitted by
  least squares on sharp -> smooth pairs; the sharpening direction applies its regularised inverse, whose
  gain bound is chosen from ``MAX_GAIN_CHOICES`` by the same RMSE on the fitting slices.

The RMSE is measured inside ``masks`` (the target's body) with HU clipped to the paired metrics' window,
exactly as the evaluation measures it, so a baseline is tuned for the figure it is judged on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import minimize_scalar

from TextureStarGANCore.masks import body_mask
from TextureStarGANCore.preprocessing import unit_to_hu
from TextureStarGANCore.transfer_filter import TransferFilter, fit_transfer_filter
from Training.data.dataset import CTSliceDataset, DatasetError, paired_slices
from Training.evaluation.metrics.highpass import highpass
from Training.evaluation.metrics.paired import rmse_hu

SIGMA_RANGE_PX = (0.05, 5.0)
MAX_GAIN_CHOICES = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
# Frequencies at which the report quotes the fitted response.
REPORT_FREQS_PER_MM = (0.1, 0.2, 0.3, 0.4, 0.5)


@dataclass
class Baseline:
    """A fitted baseline: ``apply`` maps an input stack (slices, rows, cols) to the target kernel."""

    name: str
    params: dict[str, Any]
    apply: Callable[[np.ndarray], np.ndarray]
    fit_rmse_hu: float = float("nan")
    transfer: TransferFilter | None = field(default=None, repr=False)


def identity() -> Baseline:
    return Baseline("identity", {}, lambda x: np.asarray(x, np.float32).copy())


def gaussian_blur(sigma_px: float) -> Callable[[np.ndarray], np.ndarray]:
    """In-plane Gaussian blur of a (slices, rows, cols) stack."""
    return lambda x: ndimage.gaussian_filter(np.asarray(x, np.float32), (0.0, sigma_px, sigma_px))


def fit_gaussian_blur(source: np.ndarray, target: np.ndarray, masks: np.ndarray, pixel_mm: float) -> Baseline:
    """The single in-plane Gaussian sigma (pixels) with the lowest RMSE to ``target`` on these slices."""
    res = minimize_scalar(lambda s: rmse_hu(gaussian_blur(s)(source), target, masks),
                          bounds=SIGMA_RANGE_PX, method="bounded", options={"xatol": 0.01})
    sigma = float(res.x)
    return Baseline("gaussian blur", {"sigma_px": round(sigma, 3), "sigma_mm": round(sigma * pixel_mm, 3)},
                    gaussian_blur(sigma), float(res.fun))


def response_summary(f: TransferFilter) -> dict[str, Any]:
    """The fitted response at a few frequencies, and where it first falls to half (cycles/mm)."""
    out: dict[str, Any] = {f"gain_at_{v:g}_per_mm": round(float(f.response(np.array(v))), 4)
                           for v in REPORT_FREQS_PER_MM}
    below = np.nonzero(f.gain < 0.5)[0]
    out["half_gain_freq_per_mm"] = round(float(f.freq_per_mm[below[0]]), 4) if below.size else None
    out["knots"] = int(len(f.freq_per_mm))
    out["max_knot_freq_per_mm"] = round(float(f.freq_per_mm[-1]), 4)
    out["filter"] = f.to_dict()  # every fitted parameter: the gain at each knot
    return out


def fit_linear_filter(
    sharp: np.ndarray, smooth: np.ndarray, spacing_xy: tuple[float, float], masks_smooth: np.ndarray,
    masks_sharp: np.ndarray,
) -> tuple[Baseline, Baseline]:
    """The linear kernel-transfer filter in both directions: (sharp -> smooth, smooth -> sharp).

    The response is fitted by least squares on the sharp -> smooth slices; the inverse's gain bound is the
    one of ``MAX_GAIN_CHOICES`` with the lowest RMSE to the sharp slices.
    """
    forward = fit_transfer_filter(sharp, smooth, spacing_xy, description="least-squares sharp -> smooth")
    fwd = Baseline("linear filter", {"response": "least-squares radial response, sharp -> smooth",
                                     **response_summary(forward)},
                   lambda x: forward.apply(x, spacing_xy), transfer=forward)
    fwd.fit_rmse_hu = rmse_hu(fwd.apply(sharp), smooth, masks_smooth)
    best: tuple[float, float, TransferFilter] | None = None
    for g in MAX_GAIN_CHOICES:
        inv = forward.inverse(g)
        err = rmse_hu(inv.apply(smooth, spacing_xy), sharp, masks_sharp)
        if best is None or err < best[0]:
            best = (err, g, inv)
    assert best is not None
    err, g, inv = best
    back = Baseline("linear filter", {"response": "regularised inverse of the sharp -> smooth fit",
                                      "max_gain": g, "max_gain_choices": list(MAX_GAIN_CHOICES),
                                      **response_summary(inv)},
                    lambda x: inv.apply(x, spacing_xy), err, transfer=inv)
    return fwd, back


MAX_POSITIONS = 32  # paired slice positions per fit: plenty for 64 knots, seconds on a CPU


@dataclass
class PairedStacks:
    """Pixel-paired training slices of every domain (HU), their body masks and high-pass noise."""

    hu: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    noise: dict[str, float]
    pixel_mm: float
    description: str

    def sharp_smooth(self, a: str, b: str) -> tuple[str, str]:
        """The two domains ordered (sharper, smoother) by high-pass noise."""
        return (a, b) if self.noise[a] >= self.noise[b] else (b, a)


def paired_training_stacks(dataset_root: str | Path, max_positions: int = MAX_POSITIONS) -> PairedStacks:
    """Up to ``max_positions`` evenly spread slice positions of the train split that every domain has.

    Raises ``DatasetError`` when the data are not pixel-paired (real data) or hold no paired positions.
    """
    ds = CTSliceDataset(dataset_root, split="train")
    if not ds.simulated:
        raise DatasetError(f"{dataset_root} is not simulated: its series are not pixel-paired, so no "
                           "transfer filter can be fitted from it")
    names = [d.name for d in ds.domains]
    positions = sorted(k for k, idx in ds.pairs_index().items() if len(idx) == len(names))
    if not positions:
        raise DatasetError(f"{dataset_root}: no slice position has all domains {names} in the train split")
    picks = [positions[i] for i in np.unique(np.linspace(0, len(positions) - 1, max_positions).astype(int))]
    stacks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for patient, index in picks:
        for name, canvas in paired_slices(ds, patient, index).items():
            stacks[name].append(unit_to_hu(canvas.astype(np.float32), ds.spec.hu_window))
    hu = {n: np.stack(v) for n, v in stacks.items()}
    masks = {n: np.stack([body_mask(s) for s in v]) for n, v in hu.items()}
    noise = {n: float(np.std(highpass(v)[masks[n]])) for n, v in hu.items()}
    px = float(ds.spec.pixel_spacing_mm)
    fitted_on = (f"{len(picks)} paired slice positions of the train split of {Path(dataset_root).name}, "
                 f"{px:g} mm pixels")
    return PairedStacks(hu, masks, noise, px, fitted_on)


def fit_domain_baselines(dataset_root: Any) -> tuple[dict[tuple[str, str], list[Baseline]], str]:
    """Baselines per direction (source, target) of a simulated dataset, fitted on paired slices of its
    training patients: the linear transfer filter both ways, the best Gaussian blur where it smooths.
    Returns them and a description of the fitting data; ``DatasetError`` on unpaired (real) data."""
    from itertools import combinations

    st = paired_training_stacks(dataset_root)
    px = (st.pixel_mm, st.pixel_mm)
    out: dict[tuple[str, str], list[Baseline]] = {}
    for a, b in combinations(sorted(st.hu), 2):
        sharp, smooth = st.sharp_smooth(a, b)
        down, up = fit_linear_filter(st.hu[sharp], st.hu[smooth], px, st.masks[smooth], st.masks[sharp])
        blur = fit_gaussian_blur(st.hu[sharp], st.hu[smooth], st.masks[smooth], st.pixel_mm)
        out[(sharp, smooth)] = [down, blur]
        out[(smooth, sharp)] = [up]
    return out, st.description
