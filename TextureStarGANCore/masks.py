"""The body outline: one definition for inference, figures, evaluation and data analysis.

Runs on Python 3.9 (bundled into the Slicer extension).
"""

from __future__ import annotations

import numpy as np

__all__ = ["BODY_THRESHOLD_HU", "body_mask"]

# Soft tissue (about -100..100 HU) against air (-1000 HU): -500 HU separates them on every kernel, and
# fat (-100) stays inside. Also the level for "voxels that show tissue" (crop centres, busiest slice).
BODY_THRESHOLD_HU = -500.0


def body_mask(hu: np.ndarray, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """The largest connected region above ``threshold`` HU in one 2D slice, its holes (lungs, airways) filled.

    The largest region is the patient: the table and clothing are smaller and drop out.
    """
    from scipy import ndimage  # imported on use: the engine loads without it until a mask is needed

    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise ValueError(f"body_mask expects one 2D slice, got shape {hu.shape}")
    fg = hu > threshold
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.zeros_like(fg)
    sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
