"""Linear kernel-transfer filters for the model file, fitted by the exporter on the training data.

On simulated data every phantom slice is reconstructed with every kernel, so each (patient, slice) gives
pixel-paired slices of all domains. For every pair of domains the sharper one (more high-pass noise) is
mapped to the smoother one by the least-squares radial response, and back by its regularised inverse
(``Training.evaluation.baselines.fit_linear_filter``, the same fit the real-pair validation uses). The
entries go into the card's optional ``transfer_filters`` (``ctharmonize harmonize --method filter``).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

from Training.evaluation.baselines import MAX_POSITIONS, fit_linear_filter, paired_training_stacks


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
