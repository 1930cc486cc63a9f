"""Run a model file's generator directly on prepared canvases.

The dataset already holds canvases in [-1, 1] (the model's own preprocessing), so the evaluation skips the
HU -> canvas -> HU round trip of ``Harmonizer.harmonize`` and feeds the generator with the stored target
style of each domain, the same deterministic style ``Harmonizer.target_style`` uses. This is a thin adapter
over ``TextureStarGANCore.model_file`` (load_model_file + instantiate); the generator runs through the
engine's ``run_generator_tiled`` with the card's ``tile_size``, so evaluation and inference agree.

A kernel-transfer model (no canvas of its own) runs on the dataset's canvases in HU at the dataset's pixel
spacing, from the given source domain (estimated per slice by its ``SourceEstimator`` when none is given)
to the target, as ``Harmonizer`` runs it on a volume.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from TextureStarGANCore.domains import Domain, resolve_domain
from TextureStarGANCore.inference import run_generator_tiled
from TextureStarGANCore.model_file import KIND_KERNEL_TRANSFER, ModelFile, instantiate, load_model_file
from TextureStarGANCore.preprocessing import PreprocessSpec, hu_to_unit, unit_to_hu


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CanvasHarmonizer:
    """A model file's EMA generator + stored domain styles (StarGAN v2), or its kernel-transfer generator,
    applied to (N, S, S) canvases."""

    def __init__(
        self, model_path: str | Path | None, device: str | torch.device = "cpu", batch_size: int = 4
    ) -> None:
        self.model_file: ModelFile = load_model_file(model_path)
        self.path = Path(self.model_file.path)
        self.device = torch.device(device)
        nets = instantiate(self.model_file, self.device)
        self.generator = nets["generator"]
        self.estimator = nets.get("source_estimator")  # kernel transfer only
        styles = self.model_file.domain_styles
        self.styles = styles.to(self.device, torch.float32) if styles is not None else None
        self.batch_size = batch_size
        self.sha256 = file_sha256(self.path)

    @property
    def domains(self) -> list[str]:
        """Domain names, as ``Harmonizer.domains``."""
        return [d.name for d in self.model_file.domains]

    @property
    def domain_info(self) -> list[Domain]:
        return list(self.model_file.domains)

    @property
    def kind(self) -> str:
        return self.model_file.kind

    @property
    def spec(self) -> PreprocessSpec | None:
        """The model's canvas; None for a kernel-transfer model (it runs at the dataset's pixel size)."""
        return self.model_file.preprocessing

    @property
    def trained(self) -> bool:
        return self.model_file.trained

    def domain(self, key: str | int) -> Domain:
        return resolve_domain(self.model_file.domains, key)

    def check_compatible(self, spec: PreprocessSpec, domain_names: list[str]) -> None:
        """The dataset must be prepared exactly as the model expects and share its domain names."""
        # tile_size is how the model runs, not how canvases are made: datasets never carry it. A
        # kernel-transfer model has no canvas: it runs at whatever pixel size the dataset has.
        if self.spec is not None and spec.canvas_only() != self.spec.canvas_only():
            raise ValueError(
                f"the dataset's preprocessing {spec.to_dict()} differs from the model's "
                f"{self.spec.to_dict()} ({self.path}); prepare the dataset with the model's preprocessing "
                "or use a matching model"
            )
        names = {d.name for d in self.model_file.domains}
        missing = [n for n in domain_names if n not in names]
        if missing:
            raise ValueError(
                f"dataset domains {missing} are unknown to the model {self.path} (it knows {sorted(names)})"
            )

    @torch.inference_mode()
    def __call__(
        self,
        canvases: np.ndarray,
        target: str | int,
        progress: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
        *,
        tile: int | None | str = "model",
        source: str | int | None = None,
        spec: PreprocessSpec | None = None,
    ) -> np.ndarray:
        """Harmonize canvases (N, S, S) in [-1, 1] to ``target``; float32 canvases in [-1, 1].

        ``tile``: "model" runs as inference does (the card's tile size); None the whole canvas at once; an
        int overlapping tiles of that size (diagnostics compare the two). StarGAN v2 only.
        ``source`` (the canvases' domain) and ``spec`` (the dataset's preprocessing: HU window and pixel
        spacing of the canvases) are what a kernel-transfer model needs; a StarGAN v2 model ignores them.
        """
        canvases = np.asarray(canvases)
        if canvases.ndim != 3:
            raise ValueError(f"expected canvases (N, S, S), got shape {canvases.shape}")
        if self.kind == KIND_KERNEL_TRANSFER:
            return self._kernel_transfer(canvases, target, source, spec, progress, cancel)
        tile = self.spec.tile_size if tile == "model" else tile
        style = self.styles[self.domain(target).id].unsqueeze(0)

        def stargan(x: torch.Tensor) -> torch.Tensor:
            return run_generator_tiled(self.generator, x[:, None], style, tile)[:, 0]

        return self._batched(canvases, stargan, progress, cancel)

    def _batched(
        self,
        canvases: np.ndarray,
        run: Callable[[torch.Tensor], torch.Tensor],
        progress: Callable[[int, int], None] | None,
        cancel: threading.Event | None,
    ) -> np.ndarray:
        """``run`` on batches of canvases (B, S, S) on the model's device; its (B, S, S) canvases, clamped."""
        n = len(canvases)
        out = np.empty(canvases.shape, dtype=np.float32)
        for start in range(0, n, self.batch_size):
            if cancel is not None and cancel.is_set():
                raise InterruptedError(f"harmonization cancelled after {start} of {n} slices")
            x = torch.from_numpy(np.ascontiguousarray(canvases[start : start + self.batch_size], np.float32))
            y = run(x.to(self.device))
            out[start : start + len(x)] = y.float().clamp(-1.0, 1.0).cpu().numpy()
            if progress is not None:
                progress(min(start + self.batch_size, n), n)
        return out

    def _kernel_transfer(
        self,
        canvases: np.ndarray,
        target: str | int,
        source: str | int | None,
        spec: PreprocessSpec | None,
        progress: Callable[[int, int], None] | None,
        cancel: threading.Event | None,
    ) -> np.ndarray:
        if spec is None:
            raise ValueError(
                f"{self.path.name} is a kernel-transfer model: pass the dataset's preprocessing (spec=) so "
                "its canvases can be turned into HU at their pixel spacing"
            )
        pixel = (spec.pixel_spacing_mm, spec.pixel_spacing_mm)
        tgt = self.domain(target).id
        src = self.domain(source).id if source is not None else None

        def kernel_transfer(x: torch.Tensor) -> torch.Tensor:
            hu = unit_to_hu(x, spec)[:, None]
            b = hu.shape[0]
            # Without a known source: the estimator's most likely domain, slice by slice.
            s = (self.estimator(hu, pixel).argmax(1) if src is None
                 else torch.full((b,), src, dtype=torch.long))
            y = self.generator(hu, [pixel] * b, s, torch.full((b,), tgt, dtype=torch.long))
            return hu_to_unit(y[:, 0].float(), spec)

        return self._batched(canvases, kernel_transfer, progress, cancel)
