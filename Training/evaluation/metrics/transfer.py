"""Effective transfer of a conversion: the share of each spatial frequency of the input that reaches the
output, measured on paired slices, and how far it is from the real target's.

On a scanner it has not seen, a kernel-transfer model is decided by its transfer at 0.1-0.3 cycles/mm more
than by its residual network (the head-held-out model passed 5-9 % too little there and lost to the blur by
5 HU; calibrating its two kernels fixed most of it). Measured on a real pair, this says whether the model's
kernels fit the scanner, i.e. whether to calibrate them (``Training.calibrate_kernels``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from TextureStarGANCore.transfer_filter import fit_transfer_filter

FREQS_PER_MM = (0.1, 0.2, 0.3, 0.4, 0.5)
LOW_BAND_PER_MM = (0.1, 0.2, 0.3)  # where the anatomy's power is: the band that decides the RMSE
MAX_SLICES = 12  # evenly spread: plenty for the low frequencies, a second or two per method
MIN_TARGET_GAIN = 0.05  # a ratio to a near-zero gain says nothing
CALIBRATE_ABOVE = 0.03  # a low-band error above this is what an uncalibrated unseen scanner shows


def effective_gains(source: np.ndarray, output: np.ndarray, spacing_xy: Sequence[float]) -> dict[str, float]:
    """The least-squares radial response from ``source`` to ``output`` (slices, rows, cols) at
    ``FREQS_PER_MM``, keyed by the frequency as text ('0.1', ...). Noise in the output that does not follow
    the input (synthesized noise) does not bias it."""
    src, out = np.asarray(source), np.asarray(output)
    pick = np.unique(np.linspace(0, len(src) - 1, min(len(src), MAX_SLICES)).round().astype(int))
    f = fit_transfer_filter(src[pick], out[pick], spacing_xy)
    return {f"{v:g}": round(float(f.response(np.array(v))), 4) for v in FREQS_PER_MM}


def low_band_error(gains: dict[str, float], target: dict[str, float]) -> float:
    """The largest relative error of ``gains`` against the real target's over ``LOW_BAND_PER_MM``
    (signed: negative when the method passes too little)."""
    errs = [gains[f"{v:g}"] / target[f"{v:g}"] - 1.0 for v in LOW_BAND_PER_MM
            if abs(target[f"{v:g}"]) > MIN_TARGET_GAIN]
    return round(float(max(errs, key=abs)), 4) if errs else float("nan")
