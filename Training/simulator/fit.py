"""Fit kernel windows to real series: the simulated FBP noise power spectrum NPS_flat(f) W(f)^2 against
the NPS measured on real slices (``measure.measure_slices``), jointly for the kernels of one real paired
acquisition (one dose, so their noise ratio is fitted too).

The simulator's NPS for a window W is the ramp-only ("flat") full-path NPS times W^2 (FBP is linear and
the window multiplies the ramp), so a fit needs one calibration per pixel size, not one per trial.
Frequencies below ``f_min`` are left out: there the NPS of patient images holds anatomy, not noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from Training.simulator import kernels as K
from Training.simulator.measure import NoiseFigures

__all__ = ["flat_nps", "fit_windows"]

_FLAT = K.KernelSpec("ramp", "-", "-", "ramp", 1.0, 1.0, ("gaussian", 1e3), None)


def flat_nps(pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Radial NPS of the ramp filter alone (full path, arbitrary dose) at ``pixel_mm``."""
    cal = K.calibrate(replace(_FLAT, fov_mm=192 * pixel_mm), pixel_mm, size=192, realizations=8)
    return cal.freq, cal.nps_full


def fit_windows(
    measured: Sequence[NoiseFigures], pixel_mm: float, f_min: float = 0.15
) -> tuple[list[tuple], float]:
    """("shaped", a, beta, n) windows, one per measured series of one acquisition, and the common NPS
    scale; least squares on log NPS at ``f_min`` .. Nyquist."""
    from scipy.optimize import least_squares

    ff, fn = flat_nps(pixel_mm)
    spec = replace(_FLAT, window=("shaped", 1.0, 0.0, 2.0))
    data = []
    for m in measured:
        keep = (m.nps_freq >= f_min) & (m.nps > 0)
        data.append((m.nps_freq[keep], np.log(m.nps[keep]), np.interp(m.nps_freq[keep], ff, fn)))

    def residual(p: np.ndarray) -> np.ndarray:
        out = []
        for i, (f, log_nps, flat) in enumerate(data):
            a, beta, n = p[1 + 3 * i : 4 + 3 * i]
            w = K.window_response(replace(spec, window=("shaped", a, beta, n)), f)
            out.append(p[0] + np.log(np.maximum(flat * w * w, 1e-30)) - log_nps)
        return np.concatenate(out)

    start = np.array([0.0] + [0.5, 0.5, 4.0] * len(data))
    lo = np.array([-50.0] + [0.1, 0.0, 1.5] * len(data))
    hi = np.array([50.0] + [3.0, 4.0, 10.0] * len(data))
    start[0] = float(np.median(np.concatenate([d[1] - np.log(d[2]) for d in data])))
    res = least_squares(residual, start, bounds=(lo, hi))
    windows = [
        ("shaped", *(round(float(v), 3) for v in res.x[1 + 3 * i : 4 + 3 * i])) for i in range(len(data))
    ]
    return windows, float(np.exp(res.x[0]))
