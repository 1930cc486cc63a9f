"""Run a model file's generator directly on prepared canvases.

The dataset already holds canvases in [-1, 1] (the model's own preprocessing), so the evaluation skips the
HU -> canvas -> HU round trip of ``Harmonizer.harmonize`` and feeds the generator with the stored target
style of each domain, the same deterministic style ``Harmonizer.target_style`` uses. This is a thin adapter
over ``TextureStarGANCore.model_file`` (load_model_file + instantiate); the generator runs through the
engine's ``run_generator_tiled`` with the card's ``tile_size``, so evaluation and inference agree.
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
from TextureStarGANCore.model_file import ModelFile, instantiate, load_model_file
from TextureStarGANCore.preprocessing import PreprocessSpec


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CanvasHarmonizer:
    """A model file's EMA generator + stored domain styles, applied to (N, S, S) canvases."""

    def __init__(
        self, model_path: str | Path | None, device: str | torch.device = "cpu", batch_size: int = 4
    ) -> None:
        self.model_file: ModelFile = load_model_file(model_path)
        self.path = Path(self.model_file.path)
        self.device = torch.device(device)
        self.generator = instantiate(self.model_file, self.device)["generator"]
        self.styles = self.model_file.domain_styles.to(self.device, torch.float32)
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
    def spec(self) -> PreprocessSpec:
        return self.model_file.preprocessing

    @property
    def trained(self) -> bool:
        return self.model_file.trained

    def domain(self, key: str | int) -> Domain:
        return resolve_domain(self.model_file.domains, key)

    def check_compatible(self, spec: PreprocessSpec, domain_names: list[str]) -> None:
        """The dataset must be prepared exactly as the model expects and share its domain names."""
        # tile_size is how the model runs, not how canvases are made: datasets never carry it.
        if spec.canvas_only() != self.spec.canvas_only():
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
    ) -> np.ndarray:
        """Harmonize canvases (N, S, S) in [-1, 1] to ``target``; float32 canvases in [-1, 1].

        ``tile``: "model" runs as inference does (the card's tile size); None the whole canvas at once; an
        int overlapping tiles of that size (diagnostics compare the two).
        """
        tile = self.spec.tile_size if tile == "model" else tile
        canvases = np.asarray(canvases)
        if canvases.ndim != 3:
            raise ValueError(f"expected canvases (N, S, S), got shape {canvases.shape}")
        style = self.styles[self.domain(target).id].unsqueeze(0)
        n = len(canvases)
        out = np.empty(canvases.shape, dtype=np.float32)
        for start in range(0, n, self.batch_size):
            if cancel is not None and cancel.is_set():
                raise InterruptedError(f"harmonization cancelled after {start} of {n} slices")
            x = torch.from_numpy(np.ascontiguousarray(canvases[start : start + self.batch_size], np.float32))
            x = x.to(self.device)[:, None]
            y = run_generator_tiled(self.generator, x, style, tile)
            out[start : start + len(x)] = y[:, 0].clamp(-1.0, 1.0).float().cpu().numpy()
            if progress is not None:
                progress(min(start + self.batch_size, n), n)
        return out
