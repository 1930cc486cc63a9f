"""Linear kernel-transfer filters for the model file, fitted by the exporter on the training data.

On simulated data every phantom slice is reconstructed with every kernel, so each (patient, slice) gives
pixel-paired slices of all domains. For every pair of domains the sharper one (more high-pass noise) is
mapped to the smoother one by the least-squares radial response, and back by its regularised inverse
(``Training.evaluation.baselines.fit_linear_filter``, the same fit the real-pair validation uses). The
entries go into the card's optional ``transfer_filters`` (``ctharmonize harmonize --method filter``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from TextureStarGANCore.masks import body_mask
from TextureStarGANCore.preprocessing import unit_to_hu
from Training.data.dataset import CTSliceDataset, DatasetError, paired_slices
from Training.evaluation.baselines import fit_linear_filter
from Training.evaluation.metrics.highpass import highpass

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


def fit_domain_filters(dataset_root: str | Path, max_positions: int = MAX_POSITIONS) -> list[dict[str, Any]]:
    """Card entries for every ordered pair of the dataset's domains, fitted on its training split."""
    st = paired_training_stacks(dataset_root, max_positions)
    px, hu, masks, fitted_on = st.pixel_mm, st.hu, st.masks, st.description
    entries = []
    for a, b in combinations(sorted(hu), 2):
        sharp, smooth = st.sharp_smooth(a, b)
        down, up = fit_linear_filter(hu[sharp], hu[smooth], (px, px), masks[smooth], masks[sharp])
        for (src, tgt), base in (((sharp, smooth), down), ((smooth, sharp), up)):
            assert base.transfer is not None
            entries.append({"source": src, "target": tgt, "filter": base.transfer.to_dict(),
                            "fitted_on": fitted_on, "fit_rmse_hu": round(base.fit_rmse_hu, 3)})
    return entries
