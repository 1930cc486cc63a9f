"""The linear-filter method: harmonize with the model file's fitted kernel-transfer filter, no network.

For users without a GPU or who want a transparent, linear mapping. The filters are stored in the model
card per (source, target) domain pair (fitted by ``Training.export`` on paired training slices); a pair
without one is refused with a plain message, except in a kernel-transfer model file: its generator's own
linear part (the learned MTF ratio, ``kernel_transfer.linear_transfer_filter``) is the filter then.
:class:`FilterHarmonizer` has the call signature of ``Harmonizer.harmonize`` so the command line and the
Slicer module can run either method.

Runs on Python 3.9 (bundled into the Slicer extension).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .domains import Domain, resolve_domain
from .kernel_transfer import linear_transfer_filter
from .model_file import KIND_KERNEL_TRANSFER, ModelFile, instantiate
from .transfer_filter import TransferFilter
from .volume_io import validate_ct_values

__all__ = ["FilterHarmonizer", "NoFilterError", "model_linear_filter"]


class NoFilterError(ValueError):
    """The model file has no fitted transfer filter for the requested (source, target) pair."""


def model_linear_filter(model_file: ModelFile, source: Domain, target: Domain) -> TransferFilter:
    """The linear part of a kernel-transfer model's generator from ``source`` to ``target``."""
    generator = instantiate(model_file, "cpu")["generator"]
    return linear_transfer_filter(generator, source.id, target.id,
                                  f"linear part of {model_file.path.name}: {source.name} -> {target.name}")


class FilterHarmonizer:
    """Applies the fitted transfer filter of one (source, target) pair slice by slice."""

    device = "cpu (linear transfer filter)"

    def __init__(self, model_file: ModelFile, source: Domain, target: Domain) -> None:
        # None: the card's fitted filter (or the identity); else where the filter came from, for the user.
        self.filter_origin: str | None = None
        if source.name == target.name:
            self.filter = TransferFilter(np.array([0.0, 1.0]), np.array([1.0, 1.0]), "identity")
        else:
            found = model_file.transfer_filter(source, target)
            if found is None and model_file.kind == KIND_KERNEL_TRANSFER:
                found = model_linear_filter(model_file, source, target)
                self.filter_origin = (f"the model's own linear transfer {source.name} -> {target.name} (its "
                                      "card has no fitted filter for this pair)")
            if found is None:
                pairs = ", ".join(f"{a} -> {b}" for a, b in model_file.transfer_filter_pairs) or "none"
                raise NoFilterError(
                    f"model file {model_file.path.name} has no fitted transfer filter for {source.name} -> "
                    f"{target.name} (its filters: {pairs}); filters are fitted by Training.export on paired "
                    "training data."  # each front end adds how to choose the network model instead
                )
            self.filter = found
        self._domains = model_file.domains
        self.source, self.target = source, target
        self.last_run: dict[str, Any] = {}

    def harmonize(
        self,
        volume: np.ndarray,
        spacing: Sequence[float],
        target: Any,
        source: Any = None,
        progress: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
        **_: Any,
    ) -> np.ndarray:
        """Filter ``volume`` (slices, rows, cols) in HU; same shape and dtype. ``target``/``source`` must be
        the pair this object was built for (checked, as ``Harmonizer.harmonize`` resolves them)."""
        from .inference import HarmonizationCancelled

        if resolve_domain(self._domains, target).name != self.target.name or (
                source is not None and resolve_domain(self._domains, source).name != self.source.name):
            raise ValueError(f"this filter maps {self.source.name} -> {self.target.name} only")
        arr = np.asarray(volume)
        validate_ct_values(arr, "the input volume")
        t0 = time.perf_counter()
        out = np.empty(arr.shape, dtype=np.float32)
        for i in range(arr.shape[0]):
            if cancel is not None and cancel.is_set():
                raise HarmonizationCancelled("harmonization cancelled")
            out[i] = self.filter.apply(arr[i], spacing[:2])
            if progress is not None:
                progress(i + 1, arr.shape[0])
        if np.issubdtype(arr.dtype, np.integer):
            info = np.iinfo(arr.dtype)
            result = np.clip(np.rint(out), info.min, info.max).astype(arr.dtype)
        else:
            result = out.astype(arr.dtype, copy=False)
        self.last_run = {"method": "filter", "source": self.source.name, "target": self.target.name,
                         "slices": int(arr.shape[0]), "seconds": round(time.perf_counter() - t0, 3),
                         "filter": self.filter_origin or self.filter.description}
        return result
