"""Harmonize a CT volume with a trained model file: ``Harmonizer``.

Pipeline per batch of slices: HU -> model canvas (``preprocessing.to_canvas``, one body centre per volume)
-> generator G(x, s_target) -> back into the input grid (``preprocessing.from_canvas``). All of it runs on
the model's device. When the model card's ``preprocessing.tile_size`` is set (models trained on crops), the
generator runs on overlapping tiles of that size blended without seams (``run_generator_tiled``), so its
instance norm sees the statistics of the crops it was trained on.

Target style: by default the model file's stored style of the target domain (a deterministic mean of
mapping-network styles, see ``checkpoint``). With ``reference`` (a volume reconstructed with the target
kernel) the style encoder gives the style instead: the mean of E(x, y_target) over up to
``REFERENCE_SLICES`` evenly spaced slices, each a centre crop of ``img_size`` pixels of its canvas.

``source`` is informational: StarGAN v2's generator takes only the target style (the source domain is
implicit in the image), so the source only gets validated against the model's domains and recorded in
``last_run``. Same input, model and device give identical output (fixed slice order, no randomness,
deterministic algorithms requested while running).

Kernel-transfer models (``kernel_transfer.py``, model kind "kernel_transfer") run at the input's own pixel
size: no canvas, no tiling, no target style. Their generator needs the source kernel, chosen in this order:
the ``source`` argument, the DICOM ``tags`` (``detect_source``; for a kernel none of the domains has, the
nearest domain of its vendor's kernel family, ``detect_family``), else the ``SourceEstimator``'s mean domain
probabilities over up to ``SOURCE_ESTIMATE_SLICES`` evenly spaced slices (the most likely domain is used);
``last_run["source_from"]`` records which. A pixel size outside the card's ``supported_pixel_mm`` is
harmonized with a ``PixelSizeWarning``. They run in float32 on every device: the network is small, and
autocast would round the per-domain log MTFs of the linear transfer to 16 bits.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .domains import Domain, UnknownDomainError, detect_domain, harmonization_record, resolve_domain
from .kernel_families import family_domain
from .model_file import KIND_KERNEL_TRANSFER, ModelFile, instantiate, load_model_file
from .preprocessing import PreprocessSpec, body_center, from_canvas, to_canvas
from .volume_io import CTVolume, cast_clipped, validate_ct_spacing, validate_ct_values

__all__ = ["Harmonizer", "HarmonizationCancelled", "PixelSizeWarning", "detect_family", "detect_source",
           "pixel_size_note",
           "resolve_device", "REFERENCE_SLICES", "SOURCE_ESTIMATE_SLICES", "run_generator_tiled",
           "tile_starts", "tile_window"]

ProgressFn = Callable[[int, int], Any]
GeneratorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
REFERENCE_SLICES = 32  # enough slices for a stable mean style, few enough to stay fast
SOURCE_ESTIMATE_SLICES = 16  # slices the source estimator averages over (kernel-transfer models)


class HarmonizationCancelled(RuntimeError):
    """Raised when the ``cancel`` event was set; nothing was returned or written."""


class PixelSizeWarning(UserWarning):
    """The input's pixel size lies outside the range a kernel-transfer model was trained for."""


def pixel_size_note(model_file: ModelFile, spacing_xy: Sequence[float]) -> str | None:
    """A warning text when the in-plane pixel size (x, y) mm lies outside the model's
    ``supported_pixel_mm``; None when inside, and always for StarGAN v2 models (their canvas resamples)."""
    supported = model_file.supported_pixel_mm
    if supported is None:
        return None
    lo, hi = supported
    sx, sy = float(spacing_xy[0]), float(spacing_xy[1])
    tol = 1e-6
    if all(lo - tol <= v <= hi + tol for v in (sx, sy)):
        return None
    size = f"{sx:.3g} mm" if abs(sx - sy) < tol else f"{sx:.3g} x {sy:.3g} mm"
    return (f"the input's pixel size ({size}) is outside the range this model supports ({lo:g} to {hi:g} "
            "mm); it is harmonized all the same, but the result may be less reliable (resample the input "
            "to a pixel size in that range for the best result)")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; a named device must exist (clear error otherwise)."""
    if isinstance(device, torch.device):
        dev = device
    else:
        text = str(device).strip().lower()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(text)
        except RuntimeError as exc:
            raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but no CUDA GPU is available to PyTorch; "
                             "use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    return dev


def _tags(volume: CTVolume | Mapping[str, Any]) -> dict[str, Any]:
    return volume.tags if isinstance(volume, CTVolume) else dict(volume)


def detect_source(volume: CTVolume | dict[str, Any], domains: Sequence[Domain]) -> Domain | None:
    """The model domain an input belongs to, from its DICOM tags (Manufacturer, ManufacturerModelName,
    ConvolutionKernel); None when the tags are missing or match no single domain.

    A series this tool harmonized keeps the scanner's ConvolutionKernel but its DerivationDescription
    records the target: its effective kernel is that target domain."""
    tags = _tags(volume)
    record = harmonization_record(tags.get("DerivationDescription"))
    if record is not None:
        try:
            return resolve_domain(domains, record["target"])
        except UnknownDomainError:
            return None  # harmonized to a domain of another model
    return detect_domain(domains, tags.get("Manufacturer"), tags.get("ManufacturerModelName"),
                         tags.get("ConvolutionKernel"))


def detect_family(volume: CTVolume | dict[str, Any], domains: Sequence[Domain]) -> Domain | None:
    """For a kernel none of ``domains`` is trained on: the domain of the same vendor nearest to it on the
    vendor's sharpness scale (``kernel_families``), or None (another vendor, an unknown name, no tags)."""
    tags = _tags(volume)
    if harmonization_record(tags.get("DerivationDescription")) is not None:
        return None  # a harmonized series: its kernel tag is not what it looks like
    return family_domain(domains, tags.get("Manufacturer"), tags.get("ConvolutionKernel"))


def tile_starts(n: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels every ``stride`` pixels covering 0..n; the last tile is
    moved back to end exactly at n (so tiles never leave the canvas and the border is covered)."""
    if not 0 < tile <= n or stride < 1:
        raise ValueError(f"need 0 < tile ({tile}) <= size ({n}) and stride ({stride}) >= 1")
    starts = list(range(0, n - tile + 1, stride))
    if starts[-1] + tile < n:
        starts.append(n - tile)
    return starts


def tile_window(tile: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(tile, tile) separable raised-cosine (periodic Hann) blending weights, positive everywhere.

    With stride tile/2 neighbouring windows sum to a constant (sin^2 + cos^2 = 1), so the blend is a smooth
    cross-fade; sampling at pixel centres keeps every weight > 0, so canvas borders covered by a single
    tile still normalise (to that tile's output).
    """
    i = torch.arange(tile, dtype=torch.float64)
    w = torch.sin(math.pi * (i + 0.5) / tile) ** 2
    return torch.outer(w, w).to(device=device, dtype=torch.float32)


def run_generator_tiled(
    generator: GeneratorFn,
    canvases: torch.Tensor,
    style: torch.Tensor,
    tile: int | None,
    stride: int | None = None,
    batch: int | None = None,
) -> torch.Tensor:
    """G(canvases, style) for (N, 1, S, S) canvases, on the whole canvas or on overlapping tiles.

    ``tile`` None (or >= S) runs the whole canvas in one call. Otherwise tiles of ``tile`` pixels every
    ``stride`` (default tile/2) cover the canvas; each output tile is weighted by ``tile_window`` and the
    sum is divided by the summed weights, so overlapping tiles cross-fade without seams and a generator that
    returns its input gives the canvas back. ``style`` is (1, D) or (N, D). Tiles go through the generator
    ``batch`` at a time (default: as many tiles as make up N whole canvases, i.e. the same pixel count as
    the whole-canvas call), in a fixed order: deterministic. The one place for tiling (Harmonizer,
    evaluation's ``CanvasHarmonizer``, ``Training.diagnostics.model_check``). Returns float32 (N, 1, S, S).
    """
    if canvases.ndim != 4 or canvases.shape[1] != 1 or canvases.shape[2] != canvases.shape[3]:
        raise ValueError(f"canvases must be (N, 1, S, S), got {tuple(canvases.shape)}")
    n, size = canvases.shape[0], canvases.shape[-1]
    if style.ndim != 2 or style.shape[0] not in (1, n):
        raise ValueError(f"style must be (1, D) or ({n}, D), got {tuple(style.shape)}")
    style = style.expand(n, -1)
    if tile is None or tile >= size:
        return generator(canvases, style).float()
    stride = stride or max(1, tile // 2)
    starts = tile_starts(size, tile, stride)
    boxes = [(r, c) for r in starts for c in starts]
    per = len(boxes)
    batch = batch or max(1, n * (size * size) // (tile * tile))
    # Tile k of canvas i is item i * per + k: canvases stay together, order fixed.
    tiles = torch.stack([canvases[:, :, r:r + tile, c:c + tile] for r, c in boxes], dim=1)
    tiles = tiles.reshape(n * per, 1, tile, tile)
    styles = style.repeat_interleave(per, dim=0)
    outs = []
    for a in range(0, n * per, batch):
        chunk = tiles[a:a + batch]
        if chunk.is_cuda:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        outs.append(generator(chunk, styles[a:a + batch]).float())
    out_tiles = torch.cat(outs).reshape(n, per, tile, tile)
    window = tile_window(tile, canvases.device)
    acc = torch.zeros(n, size, size, dtype=torch.float32, device=canvases.device)
    wsum = torch.zeros(size, size, dtype=torch.float32, device=canvases.device)
    for k, (r, c) in enumerate(boxes):
        acc[:, r:r + tile, c:c + tile] += out_tiles[:, k] * window
        wsum[r:r + tile, c:c + tile] += window
    return (acc / wsum).unsqueeze(1)


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Request deterministic kernels while harmonizing on CUDA; restore the caller's settings afterwards.

    Only on CUDA, where cuDNN/cuBLAS may pick non-deterministic algorithms: the CPU kernels used here are
    deterministic already, and ``use_deterministic_algorithms`` imports the torch compiler stack (seconds).
    """
    if device.type != "cuda":
        yield
        return
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[2], prev[3]


def _check_spacing(spacing: Sequence[float], what: str = "spacing") -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{what} must be three positive numbers (x, y, z) in mm, got {spacing!r}")
    validate_ct_spacing(values, f"the {what}")
    return values  # type: ignore[return-value]


def _check_batch_size(batch_size: Any) -> None:
    # bool is an int in Python: batch_size=True would silently mean 1.
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


class Harmonizer:
    """A loaded model ready to harmonize volumes. Build with ``Harmonizer.from_checkpoint``."""

    def __init__(self, model_file: ModelFile, device: str | torch.device = "auto",
                 batch_size: int | None = None) -> None:
        self._file = model_file
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            # cuBLAS needs this before its first use to be deterministic; harmless if already set.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        nets = instantiate(model_file, self.device)
        self._generator = nets["generator"]
        self._style_encoder = nets.get("style_encoder")  # StarGAN v2
        self._estimator = nets.get("source_estimator")  # kernel transfer
        if self.device.type == "cuda" and self._style_encoder is not None:
            self._generator = self._generator.to(memory_format=torch.channels_last)
        styles = model_file.domain_styles
        self._styles = styles.to(self.device, torch.float32) if styles is not None else None
        _check_batch_size(batch_size)
        self.batch_size = batch_size or self._default_batch_size()
        self.last_run: dict[str, Any] = {}

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | None = None, device: str | torch.device = "auto",
                        batch_size: int | None = None) -> Harmonizer:
        """Load a model file (None = the bundled default model) onto ``device`` ('auto', 'cpu', 'cuda').

        Raises ``checkpoint.ModelFileError`` for a missing or invalid file. Untrained files load (tests
        use them); check ``.trained`` before harmonizing real data.
        """
        return cls(load_model_file(path), device=device, batch_size=batch_size)

    # ---------------------------------------------------------------------------------------------
    @property
    def domains(self) -> list[str]:
        """Domain names in id order."""
        return [d.name for d in self._file.domains]

    @property
    def domain_info(self) -> list[Domain]:
        return list(self._file.domains)

    @property
    def model_card(self) -> dict[str, Any]:
        return copy.deepcopy(self._file.card)

    @property
    def kind(self) -> str:
        """The model kind: "stargan_v2" or "kernel_transfer" (``ModelFile.kind``)."""
        return self._file.kind

    @property
    def synthesizes_noise(self) -> bool:
        """Whether ``harmonize(noise=True)`` adds synthesized noise (kernel-transfer models that have it)."""
        return self._file.kind == KIND_KERNEL_TRANSFER and bool(self._generator.config.noise_synthesis)

    @property
    def supported_pixel_mm(self) -> tuple[float, float] | None:
        """(min, max) pixel size in mm of a kernel-transfer model; None for StarGAN v2."""
        return self._file.supported_pixel_mm

    @property
    def preprocessing(self) -> PreprocessSpec | None:
        """The canvas of a StarGAN v2 model; None for a kernel-transfer model (native pixel size)."""
        return self._file.preprocessing

    @property
    def trained(self) -> bool:
        return self._file.trained

    @property
    def path(self) -> Path:
        return self._file.path

    def resolve(self, key: str | int) -> Domain:
        """A domain by name, kernel or id; ``UnknownDomainError`` lists the model's domains."""
        return resolve_domain(self._file.domains, key)

    def detect_source(self, volume: CTVolume | dict[str, Any]) -> Domain | None:
        return detect_source(volume, self._file.domains)

    def detect_family(self, volume: CTVolume | dict[str, Any]) -> Domain | None:
        return detect_family(volume, self._file.domains)

    def _default_batch_size(self) -> int:
        if self._file.preprocessing is None:
            # Kernel transfer at native size: small network, an FFT per slice. 512^2 slices in float32.
            return 16 if self.device.type == "cuda" else 2
        size = self._file.preprocessing.canvas_size
        if self.device.type == "cuda":
            # Start big; an out-of-memory error halves it. 512^2 canvases: 32 slices per batch
            # (paper-size generator in bf16: a few GB).
            return int(min(128, max(1, 32 * (512 / size) ** 2)))
        # CPU: one 512^2 slice per batch. Measured on a quiet 2-core Xeon (bench_generator.py, paper-size
        # generator, 1 thread): 0.58 slices/s at batch 1 vs 0.38 at batch 4 -- larger batches overflow the
        # caches. Smaller canvases batch up to the same pixel count.
        return int(min(16, max(1, (512 / size) ** 2)))

    # ---------------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _require_stargan(self, what: str) -> None:
        if self._styles is None:
            raise ValueError(f"{what} needs a StarGAN v2 model; {self._file.path.name} is a {self.kind} "
                             "model, whose target is a domain (no style)")

    def target_style(self, target: str | int) -> torch.Tensor:
        """The stored (deterministic) style of the target domain, shape (1, style_dim)."""
        self._require_stargan("a target style")
        return self._styles[self.resolve(target).id].unsqueeze(0)

    def reference_style(self, reference: Any, target: str | int,
                        spacing: Sequence[float] | None = None) -> torch.Tensor:
        """Style of ``reference`` (a volume in the target kernel) from the style encoder, (1, style_dim).

        ``reference``: a CTVolume, an (array, spacing) pair, or an (N, R, C) HU array with ``spacing``.
        """
        if isinstance(reference, CTVolume):
            ref, ref_spacing = reference.hu, reference.spacing
        elif isinstance(reference, tuple) and len(reference) == 2:
            ref, ref_spacing = reference
        else:
            ref, ref_spacing = reference, spacing
        if ref_spacing is None:
            raise ValueError("reference spacing unknown: pass a CTVolume, an (array, spacing) pair, or "
                             "reference_spacing")
        self._require_stargan("a reference style")
        ref = np.asarray(ref)
        validate_ct_values(ref, "the reference volume")
        sx, sy, _ = _check_spacing(ref_spacing, "reference spacing")
        domain = self.resolve(target)
        spec, img = self._file.preprocessing, self._file.config.img_size
        count = min(REFERENCE_SLICES, ref.shape[0])
        picks = np.unique(np.linspace(0, ref.shape[0] - 1, count).round().astype(int))
        center = body_center(ref, (sx, sy))
        total = torch.zeros(1, self._file.config.style_dim, dtype=torch.float64, device=self.device)
        step = 8
        with torch.inference_mode(), _deterministic(self.device):
            for start in range(0, len(picks), step):
                idx = picks[start:start + step]
                x = torch.from_numpy(np.ascontiguousarray(ref[idx], dtype=np.float32)).to(self.device)
                canvas, _ = to_canvas(x, (sx, sy), spec, center)
                canvas = _fit_square(canvas, img, fill=-1.0).unsqueeze(1)
                y = torch.full((canvas.shape[0],), domain.id, dtype=torch.long, device=self.device)
                with self._autocast():
                    s = self._style_encoder(canvas, y)
                total += s.double().sum(0, keepdim=True)
        return (total / len(picks)).float()

    # ---------------------------------------------------------------------------------------------
    def harmonize(
        self,
        volume: np.ndarray,
        spacing: Sequence[float],
        target: str | int,
        source: str | int | None = None,
        reference: Any = None,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        *,
        batch_size: int | None = None,
        reference_spacing: Sequence[float] | None = None,
        fine_detail: str = "scaled",
        tags: Mapping[str, Any] | None = None,
        noise: bool = True,
        noise_seed: int = 0,
    ) -> np.ndarray:
        """Harmonize ``volume`` (slices, rows, cols) in HU to the ``target`` kernel; same shape and dtype.

        ``volume`` must hold real numbers (not complex, bool, str or object) and ``spacing`` (x, y, z) mm
        a plausible CT in-plane spacing (0.05-5 mm), else ``ValueError`` (``volume_io.InputError``) names
        the problem. Slices are taken to be axial (for a volume file see ``volume_io.axial_permutation``).
        ``progress(done, total)`` is called after every batch of slices;
        setting ``cancel`` stops before the next batch with ``HarmonizationCancelled``.
        ``fine_detail`` ("scaled", "keep", "drop"): what happens to detail finer than the model's canvas
        pixels (see ``preprocessing.from_canvas``; StarGAN v2 only).

        Kernel-transfer models (``kind == "kernel_transfer"``) take the source kernel from ``source``, else
        from the DICOM ``tags`` (Manufacturer, ManufacturerModelName, ConvolutionKernel, ...), else estimate
        it from the image; ``last_run`` records the source and how it was chosen. They refuse ``reference``
        (``ValueError``) and warn (``PixelSizeWarning``) about pixel sizes outside ``supported_pixel_mm``.
        """
        arr = np.asarray(volume)
        validate_ct_values(arr, "the input volume")
        sx, sy, _ = _check_spacing(spacing)
        tgt = self.resolve(target)
        src = self.resolve(source) if source is not None else None
        _check_batch_size(batch_size)
        if fine_detail not in ("scaled", "keep", "drop"):
            raise ValueError(f"fine_detail must be 'scaled', 'keep' or 'drop', got {fine_detail!r}")
        if reference is not None and self._file.kind == KIND_KERNEL_TRANSFER:
            raise ValueError(
                f"{self._file.path.name} is a kernel-transfer model: it maps one kernel domain to another "
                "and takes no reference volume; harmonize to the target domain without a reference"
            )
        if cancel is not None and cancel.is_set():
            raise HarmonizationCancelled("harmonization cancelled before it started")
        t0 = time.perf_counter()
        if self._file.kind == KIND_KERNEL_TRANSFER:
            seed = int(noise_seed) * 1000003 if noise else None
            return self._harmonize_native(arr, (sx, sy), tgt, src, tags, progress, cancel,
                                          batch_size or self.batch_size, t0, seed)
        if reference is not None:
            style = self.reference_style(reference, tgt.id, reference_spacing or spacing)
            mode = "reference"
        else:
            style = self.target_style(tgt.id)
            mode = "domain"
        out_f = self._run(arr, (sx, sy), style, progress, cancel, batch_size or self.batch_size, fine_detail)
        out = cast_clipped(out_f, arr.dtype)
        self.last_run = {
            "target": tgt.name, "source": src.name if src else None, "style": mode,
            "device": str(self.device), "slices": int(arr.shape[0]),
            "seconds": round(time.perf_counter() - t0, 3), "model": str(self._file.path),
            "fine_detail": fine_detail,
        }
        return out

    def _run(self, arr: np.ndarray, spacing_xy: tuple[float, float], style: torch.Tensor,
             progress: ProgressFn | None, cancel: threading.Event | None, batch_size: int,
             fine_detail: str = "scaled") -> np.ndarray:
        spec = self._file.preprocessing
        center = body_center(arr, spacing_xy)
        return self._run_batches(
            arr, lambda s, _start: self._batch(s, spacing_xy, spec, center, style, fine_detail), progress,
            cancel, batch_size)

    def _run_batches(self, arr: np.ndarray, batch_fn: Callable[[np.ndarray, int], np.ndarray],
                     progress: ProgressFn | None, cancel: threading.Event | None,
                     batch_size: int) -> np.ndarray:
        """``batch_fn(slices, index of the first)`` over consecutive slices in a fixed order: progress after
        each batch, cancel before the next, and a CUDA out-of-memory error halves the batch and retries it."""
        n = arr.shape[0]
        out = np.empty(arr.shape, dtype=np.float32)
        done, bs = 0, batch_size
        with torch.inference_mode(), _deterministic(self.device):
            while done < n:
                if cancel is not None and cancel.is_set():
                    raise HarmonizationCancelled(f"harmonization cancelled after {done} of {n} slices")
                end = min(n, done + bs)
                try:
                    out[done:end] = batch_fn(arr[done:end], done)
                except torch.cuda.OutOfMemoryError:
                    if bs == 1:
                        raise RuntimeError("CUDA out of memory even with one slice per batch; free GPU "
                                           "memory or use --device cpu") from None
                    bs = max(1, bs // 2)
                    torch.cuda.empty_cache()
                    continue
                done = end
                if progress is not None:
                    progress(done, n)
        self.last_batch_size = bs
        return out

    def _batch(self, slices: np.ndarray, spacing_xy: tuple[float, float], spec: PreprocessSpec,
               center: tuple[float, float], style: torch.Tensor, fine_detail: str = "scaled") -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        canvas, placement = to_canvas(x, spacing_xy, spec, center)
        g_in = canvas.unsqueeze(1)
        if self.device.type == "cuda":
            g_in = g_in.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            g_out = run_generator_tiled(self._generator, g_in, style, spec.tile_size)
        result = from_canvas(g_out[:, 0], placement, x, fine_detail=fine_detail)
        return result.cpu().numpy()


    # ---------------------------------------------------------------------------------------------
    # Kernel-transfer models: native pixel size
    # ---------------------------------------------------------------------------------------------
    def estimate_source(self, volume: np.ndarray,
                        spacing: Sequence[float]) -> tuple[Domain, dict[str, float]]:
        """The most likely source domain of ``volume`` (slices, rows, cols) in HU and the mean domain
        probabilities (name -> p) over up to ``SOURCE_ESTIMATE_SLICES`` evenly spaced slices
        (kernel-transfer models only: their ``SourceEstimator`` reads the slices' noise/detail spectrum)."""
        if self._estimator is None:
            raise ValueError(f"{self._file.path.name} is a {self.kind} model: it has no source estimator")
        arr = np.asarray(volume)
        validate_ct_values(arr, "the input volume")
        sx, sy, _ = _check_spacing(spacing)
        return self._estimate(arr, (sx, sy))

    def _estimate(self, arr: np.ndarray, spacing_xy: tuple[float, float]) -> tuple[Domain, dict[str, float]]:
        count = min(SOURCE_ESTIMATE_SLICES, arr.shape[0])
        picks = np.unique(np.linspace(0, arr.shape[0] - 1, count).round().astype(int))
        total = torch.zeros(len(self._file.domains), dtype=torch.float64)
        with torch.inference_mode(), _deterministic(self.device):
            for start in range(0, len(picks), 8):
                idx = picks[start:start + 8]
                x = torch.from_numpy(np.ascontiguousarray(arr[idx], dtype=np.float32)).to(self.device)
                total += self._estimator(x[:, None], spacing_xy).double().sum(0).cpu()
        probs = (total / len(picks)).numpy()
        domain = self._file.domains[int(np.argmax(probs))]
        return domain, {d.name: round(float(probs[i]), 4) for i, d in enumerate(self._file.domains)}

    def _choose_source(self, arr: np.ndarray, spacing_xy: tuple[float, float], source: Domain | None,
                       tags: Mapping[str, Any] | None) -> tuple[Domain, str, dict[str, float] | None]:
        """(source domain, how it was chosen, estimated probabilities or None): the caller's, the tags', or
        the estimator's."""
        if source is not None:
            return source, "user", None
        if tags:
            found = detect_source(tags, self._file.domains)
            if found is not None:
                return found, "tags", None
            found = detect_family(tags, self._file.domains)
            if found is not None:
                return found, f"kernel family of {tags.get('ConvolutionKernel')} (tags)", None
        domain, probs = self._estimate(arr, spacing_xy)
        return domain, f"estimated from the image (p={probs[domain.name]:.2f})", probs

    def _harmonize_native(self, arr: np.ndarray, spacing_xy: tuple[float, float], tgt: Domain,
                          src: Domain | None, tags: Mapping[str, Any] | None, progress: ProgressFn | None,
                          cancel: threading.Event | None, batch_size: int, t0: float,
                          seed: int | None) -> np.ndarray:
        """Kernel transfer of every slice at its own pixel size (no canvas); ``seed``: noise synthesis (models
        that have it) with slice k drawing from ``seed + k``, None: none."""
        notes = []
        note = pixel_size_note(self._file, spacing_xy)
        if note is not None:
            warnings.warn(note, PixelSizeWarning, stacklevel=3)
            notes.append(note)
        source, how, probs = self._choose_source(arr, spacing_xy, src, tags)
        if cancel is not None and cancel.is_set():
            raise HarmonizationCancelled("harmonization cancelled before it started")
        synth = seed is not None and self._generator.config.noise_synthesis

        def batch(s: np.ndarray, start: int) -> np.ndarray:
            seeds = [seed + start + k for k in range(len(s))] if synth else None  # type: ignore[operator]
            return self._native_batch(s, spacing_xy, source.id, tgt.id, seeds)

        out_f = self._run_batches(arr, batch, progress, cancel, batch_size)
        out = cast_clipped(out_f, arr.dtype)
        self.last_run = {
            "target": tgt.name, "source": source.name, "source_from": how, "kind": self.kind,
            "device": str(self.device), "slices": int(arr.shape[0]),
            "seconds": round(time.perf_counter() - t0, 3), "model": str(self._file.path),
            "pixel_mm": [spacing_xy[0], spacing_xy[1]], "notes": notes,
            "noise": (f"synthesized (seed {seed})" if synth else
                      "off" if self._generator.config.noise_synthesis else "not in this model"),
        }
        if probs is not None:
            self.last_run["source_probabilities"] = probs
        return out

    def _native_batch(self, slices: np.ndarray, spacing_xy: tuple[float, float], source: int,
                      target: int, seeds: list[int] | None) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        n = x.shape[0]
        src = torch.full((n,), source, dtype=torch.long, device=self.device)
        tgt = torch.full((n,), target, dtype=torch.long, device=self.device)
        y = self._generator(x[:, None], [spacing_xy] * n, src, tgt, seeds)  # float32: see module docstring
        return y[:, 0].float().cpu().numpy()


def _fit_square(canvas: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """Centre-crop or pad (N, S, S) canvases to (N, size, size) for the style encoder."""
    s = canvas.shape[-1]
    if s == size:
        return canvas
    if s > size:
        a = (s - size) // 2
        return canvas[:, a:a + size, a:a + size]
    a = (size - s) // 2
    out = torch.full((canvas.shape[0], size, size), fill, dtype=canvas.dtype, device=canvas.device)
    out[:, a:a + s, a:a + s] = canvas
    return out


