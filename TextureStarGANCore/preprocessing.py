"""Preprocessing as in the paper (III-A) and its exact inverse.

Forward (``to_canvas``): HU -> clip to the model's HU window -> [-1, 1]; in-plane resample to the model's
pixel spacing; crop/pad to a square canvas centred on the body, filled with the background HU outside the
input's field of view. Slices stay slices (no resampling along z): the generator is 2D.

Inverse (``from_canvas``): the generator's change (output canvas minus input canvas, in HU) is resampled
back into the input's voxel grid and added to the original HU. Working on the change rather than
resampling the output itself makes the round trip exact: a generator that returns its input gives the
input back bit for bit (well within the 1 HU contract), whatever the spacing. Detail finer than the canvas
pixel spacing (e.g. 0.5 mm input, 1 mm canvas), which the model never sees, is by default scaled by the
change the generator made to the finest texture it does see (``from_canvas(fine_detail=...)``).
Voxels outside the canvas and voxels whose input lies outside the HU window (padding such as -2000,
metal) keep their original values.

Resampling is bilinear, written as two matrix products per slice (separable; runs on the model's device).
When the sampling step is larger than one source pixel (downsampling), a Gaussian pre-filter with
sigma = (step - 1) / 2 source pixels, folded into the same matrices, limits aliasing of the noise texture
(the rule scikit-image's ``resize`` uses). Training data preparation calls these same functions, so the
model sees exactly what it was trained on.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, replace
from typing import Any, Union

import numpy as np
import torch

from .masks import BODY_THRESHOLD_HU

ArrayLike = Union[np.ndarray, torch.Tensor]  # a run-time alias: no `X | Y` on Python 3.9

__all__ = [
    "PreprocessSpec",
    "CanvasPlacement",
    "hu_to_unit",
    "unit_to_hu",
    "body_center",
    "to_canvas",
    "from_canvas",
    "make_placement",
]

# A voxel counts as body when above this HU (fat is about -100, lung about -850, air -1000).


@dataclass(frozen=True)
class PreprocessSpec:
    """How slices are put on the model's canvas; stored in every model card."""

    canvas_size: int = 512
    pixel_spacing_mm: float = 1.0
    hu_window: tuple[float, float] = (-1024.0, 2048.0)
    background_hu: float = -1024.0
    # Inference only: run the generator on overlapping tiles of this size (a model trained on crops must see
    # crop-sized instance-norm statistics); None = the whole canvas. Not part of the canvas geometry.
    tile_size: int | None = None

    def __post_init__(self) -> None:
        # Normalise JSON lists to tuples so equality and hashing work after a round trip.
        object.__setattr__(self, "hu_window", tuple(float(v) for v in self.hu_window))
        self.validate()

    def validate(self) -> None:
        size = self.canvas_size
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not 16 <= size <= 4096:
            raise ValueError(f"preprocessing.canvas_size must be an integer in 16..4096, got {size!r}")
        spacing = self.pixel_spacing_mm
        if not isinstance(spacing, (int, float)) or not math.isfinite(spacing) or spacing <= 0:
            raise ValueError(f"preprocessing.pixel_spacing_mm must be a positive number, got {spacing!r}")
        if len(self.hu_window) != 2 or not all(math.isfinite(v) for v in self.hu_window):
            raise ValueError(f"preprocessing.hu_window must be two finite numbers, got {self.hu_window!r}")
        lo, hi = self.hu_window
        if not lo < hi:
            raise ValueError(
                f"preprocessing.hu_window must be (low, high) with low < high, got {self.hu_window}"
            )
        bg = self.background_hu
        if not isinstance(bg, (int, float)) or not math.isfinite(bg):
            raise ValueError(f"preprocessing.background_hu must be a finite number, got {bg!r}")
        tile = self.tile_size
        if tile is not None and (
            not isinstance(tile, (int, np.integer)) or isinstance(tile, bool) or not 16 <= tile <= size
        ):
            raise ValueError(
                f"preprocessing.tile_size must be null (whole canvas) or an integer in 16..canvas_size "
                f"({size}), got {tile!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hu_window"] = list(self.hu_window)
        if self.tile_size is None:
            # Omitted when unset: whole-canvas dicts stay exactly as before (older readers, dataset JSON).
            del d["tile_size"]
        return d

    def canvas_only(self) -> PreprocessSpec:
        """This spec without the inference-only ``tile_size`` (to compare canvas geometry with a dataset)."""
        return replace(self, tile_size=None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        """Build from a model card / dataset JSON; ``ValueError`` naming the bad or missing field."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocessing must be a JSON object, got {type(d).__name__}")
        required = {"canvas_size", "pixel_spacing_mm", "hu_window", "background_hu"}
        optional = {"tile_size"}  # absent in older files: whole canvas
        missing = sorted(required - d.keys())
        if missing:
            raise ValueError(f"preprocessing is missing field(s): {', '.join(missing)}")
        unknown = sorted(d.keys() - required - optional)
        if unknown:
            raise ValueError(f"preprocessing has unknown field(s): {', '.join(unknown)}")
        window = d["hu_window"]
        if not isinstance(window, (list, tuple)) or len(window) != 2:
            raise ValueError(f"preprocessing.hu_window must be a list of two numbers, got {window!r}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in window):
            raise ValueError(f"preprocessing.hu_window must be a list of two numbers, got {window!r}")
        spacing = d["pixel_spacing_mm"]
        if isinstance(spacing, bool) or not isinstance(spacing, (int, float)):
            raise ValueError(f"preprocessing.pixel_spacing_mm must be a number, got {spacing!r}")
        bg = d["background_hu"]
        if isinstance(bg, bool) or not isinstance(bg, (int, float)):
            raise ValueError(f"preprocessing.background_hu must be a number, got {bg!r}")
        return cls(
            canvas_size=d["canvas_size"],
            pixel_spacing_mm=float(spacing),
            hu_window=(float(window[0]), float(window[1])),
            background_hu=float(bg),
            tile_size=d.get("tile_size"),
        )


@dataclass(frozen=True)
class CanvasPlacement:
    """Where a canvas lies in the input grid: canvas pixel (i, j) samples input (row0 + i*step_r, col0 +
    j*step_c), in input pixel units. One placement serves every slice of a volume (one body centre)."""

    input_shape: tuple[int, int]  # (rows, cols) of the input slices
    spacing_xy: tuple[float, float]  # input (column spacing x, row spacing y) in mm
    spec: PreprocessSpec
    row0: float
    col0: float
    step_r: float  # canvas pixel spacing / input row spacing
    step_c: float  # canvas pixel spacing / input column spacing


def _window(spec_or_window: PreprocessSpec | tuple[float, float]) -> tuple[float, float]:
    if isinstance(spec_or_window, PreprocessSpec):
        return spec_or_window.hu_window
    lo, hi = spec_or_window
    return float(lo), float(hi)


def hu_to_unit(hu: ArrayLike, window: PreprocessSpec | tuple[float, float]) -> ArrayLike:
    """Clip HU to the window and map it linearly to [-1, 1] (numpy or torch, same type back)."""
    lo, hi = _window(window)
    if isinstance(hu, torch.Tensor):
        return (hu.clamp(lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0
    arr = np.clip(np.asarray(hu, dtype=np.float32), lo, hi)
    return ((arr - lo) * (2.0 / (hi - lo)) - 1.0).astype(np.float32)


def unit_to_hu(unit: ArrayLike, window: PreprocessSpec | tuple[float, float]) -> ArrayLike:
    """Inverse of ``hu_to_unit``: clip to [-1, 1] and map back to the HU window."""
    lo, hi = _window(window)
    if isinstance(unit, torch.Tensor):
        return (unit.clamp(-1.0, 1.0) + 1.0) * ((hi - lo) / 2.0) + lo
    arr = np.clip(np.asarray(unit, dtype=np.float32), -1.0, 1.0)
    return ((arr + 1.0) * ((hi - lo) / 2.0) + lo).astype(np.float32)


def body_center(volume_hu: ArrayLike, spacing_xy: tuple[float, float] | None = None) -> tuple[float, float]:
    """(row, col) centre of the body's bounding box in input pixel units, over the whole volume.

    The body is the largest connected region that is above -500 HU in at least a fifth of the slices
    (so thin structures such as the table or a blanket edge rarely win). One centre per volume keeps
    the canvas from jumping between slices. Falls back to the image centre when nothing is found.
    ``spacing_xy`` is accepted for API symmetry; the centre is in pixels and does not depend on it.
    """
    from scipy import ndimage

    del spacing_xy
    vol = volume_hu.detach().cpu().numpy() if isinstance(volume_hu, torch.Tensor) else np.asarray(volume_hu)
    if vol.ndim == 2:
        vol = vol[None]
    if vol.ndim != 3 or vol.shape[0] == 0:
        raise ValueError(f"body_center expects (slices, rows, cols), got shape {vol.shape}")
    rows, cols = vol.shape[1:]
    # Sub-sample slices: the body outline changes slowly along z and big volumes stay cheap.
    step = max(1, vol.shape[0] // 64)
    frac = np.zeros((rows, cols), dtype=np.float32)
    picked = range(0, vol.shape[0], step)
    for k in picked:
        frac += vol[k] > BODY_THRESHOLD_HU
    frac /= len(picked)
    mask = frac >= 0.2
    labels, n = ndimage.label(mask)
    if n == 0:
        return (rows - 1) / 2.0, (cols - 1) / 2.0
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    biggest = labels == (int(np.argmax(sizes)) + 1)
    rr = np.flatnonzero(biggest.any(axis=1))
    cc = np.flatnonzero(biggest.any(axis=0))
    return (rr[0] + rr[-1]) / 2.0, (cc[0] + cc[-1]) / 2.0


def _blur_matrix(n: int, sigma: float) -> torch.Tensor:
    """(n, n) Gaussian blur along one axis with mirrored edges, as a matrix (float64, CPU).

    Mirroring (..., 2, 1, 0, 1, 2, ...) like scipy's 'mirror' mode makes the extended signal periodic
    with period 2(n - 1), so the kernel is first folded onto one period: the cost is O(n^2) whatever
    sigma is (an implausible spacing gives a huge sigma; a loop over its offsets took minutes).
    """
    eye = torch.eye(n, dtype=torch.float64)
    if sigma <= 0.05 or n == 1:
        return eye
    period = 2 * (n - 1)
    if sigma >= 4 * period:
        # A kernel this wide folds to a constant (deviation below 1e-9 of its value).
        folded = torch.full((period,), 1.0 / period, dtype=torch.float64)
    else:
        radius = max(1, int(math.ceil(3.0 * sigma)))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel /= kernel.sum()
        folded = torch.zeros(period, dtype=torch.float64).index_add_(0, offsets.long() % period, kernel)
    rows = torch.arange(n).unsqueeze(1)
    cols = (rows + torch.arange(period).unsqueeze(0)) % period
    cols = torch.where(cols >= n, period - cols, cols)
    out = torch.zeros(n, n, dtype=torch.float64)
    out.index_put_((rows.expand_as(cols), cols), folded.expand(n, -1).contiguous(), accumulate=True)
    return out


def _axis_matrix(n_in: int, start: float, step: float, n_out: int) -> torch.Tensor:
    """(n_out, n_in) linear resampling along one axis: output k samples input position start + k*step.

    Bilinear weights, preceded by a Gaussian anti-aliasing blur with sigma = (step - 1) / 2 input pixels
    when step > 1 (downsampling). Weights that would fall outside the input are dropped, so a row of
    zeros means "outside" and the caller fills it with the background value. Being separable, the whole
    in-plane resampling is two matrix products (fast on CPU and GPU alike).
    """
    pos = start + step * torch.arange(n_out, dtype=torch.float64)
    lo = torch.floor(pos)
    frac = pos - lo
    lo = lo.long()
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    for idx, w in ((lo, 1.0 - frac), (lo + 1, frac)):
        ok = (idx >= 0) & (idx < n_in) & (w > 0)
        weights.index_put_((rows[ok], idx[ok]), w[ok], accumulate=True)
    sigma = max(0.0, (step - 1.0) / 2.0)
    return weights @ _blur_matrix(n_in, sigma) if sigma > 0.05 else weights


def _resample(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, fill: float) -> torch.Tensor:
    """rows (Ho, H) @ (x - fill) (N, H, W) @ cols.T (W, Wo) + fill: outside the source gives ``fill``."""
    shifted = x - fill if fill else x
    out = torch.matmul(torch.matmul(rows, shifted), cols.transpose(0, 1))
    return out + fill if fill else out


# Every batch of a volume shares one placement: keep its matrices (a few MB) instead of rebuilding them.
_MATRIX_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_MATRIX_CACHE_SIZE = 8
_MATRIX_LOCK = threading.Lock()


def _matrices(p: CanvasPlacement, device: torch.device, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    key = (p.input_shape, p.spec.canvas_size, p.row0, p.col0, p.step_r, p.step_c, str(device), inverse)
    with _MATRIX_LOCK:  # harmonization may run on worker threads (Slicer, CLI)
        cached = _MATRIX_CACHE.get(key)
        if cached is None:
            cached = _build_matrices(p, device, inverse)
            if len(_MATRIX_CACHE) >= _MATRIX_CACHE_SIZE:
                _MATRIX_CACHE.pop(next(iter(_MATRIX_CACHE)))
            _MATRIX_CACHE[key] = cached
    return cached


def _build_matrices(p: CanvasPlacement, device: torch.device,
                    inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    size = p.spec.canvas_size
    rows_in, cols_in = p.input_shape
    if not inverse:
        mr = _axis_matrix(rows_in, p.row0, p.step_r, size)
        mc = _axis_matrix(cols_in, p.col0, p.step_c, size)
    else:
        # Input pixel r sits at canvas coordinate (r - row0) / step_r.
        mr = _axis_matrix(size, -p.row0 / p.step_r, 1.0 / p.step_r, rows_in)
        mc = _axis_matrix(size, -p.col0 / p.step_c, 1.0 / p.step_c, cols_in)
    return mr.to(device, torch.float32), mc.to(device, torch.float32)


def _as_tensor(x: ArrayLike, device: torch.device | str | None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x if device is None else x.to(device)
        return t.float()
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device or "cpu")


def make_placement(
    input_shape: tuple[int, int],
    spacing_xy: tuple[float, float],
    spec: PreprocessSpec,
    center: tuple[float, float] | None = None,
    *,
    snap: bool = True,
) -> CanvasPlacement:
    """The canvas placement for slices of ``input_shape`` centred on ``center`` (row, col) pixels.

    ``snap=False`` keeps the exact sub-pixel centre (data preparation uses it so that paired series on
    different grids land on the same canvas positions)."""
    rows, cols = int(input_shape[0]), int(input_shape[1])
    sx, sy = float(spacing_xy[0]), float(spacing_xy[1])
    if not (math.isfinite(sx) and math.isfinite(sy) and sx > 0 and sy > 0):
        raise ValueError(f"spacing_xy must be two positive numbers in mm, got {spacing_xy!r}")
    if center is None:
        center = ((rows - 1) / 2.0, (cols - 1) / 2.0)
    size = spec.canvas_size
    step_r, step_c = spec.pixel_spacing_mm / sy, spec.pixel_spacing_mm / sx
    # Snap the canvas origin to the input grid: with equal spacing the canvas is then an exact copy of
    # input pixels (no interpolation blur); the centre moves by less than half a pixel.
    row0 = center[0] - (size - 1) / 2.0 * step_r
    col0 = center[1] - (size - 1) / 2.0 * step_c
    if snap:
        row0, col0 = round(row0), round(col0)
    row0, col0 = float(row0), float(col0)
    return CanvasPlacement((rows, cols), (sx, sy), spec, row0, col0, step_r, step_c)


def to_canvas(
    slices_hu: ArrayLike,
    spacing_xy: tuple[float, float],
    spec: PreprocessSpec,
    center: tuple[float, float] | None = None,
    *,
    device: torch.device | str | None = None,
    snap: bool = True,
) -> tuple[ArrayLike, CanvasPlacement]:
    """Put slices (N, R, C) in HU onto the model canvas (N, S, S) in [-1, 1].

    ``spacing_xy`` is (column spacing x, row spacing y) in mm; ``center`` (row, col) in input pixels, by
    default the image centre (pass ``body_center(volume)`` to centre on the body). Returns the same array
    type as given (torch tensors stay on their device, or move to ``device``).
    """
    as_numpy = not isinstance(slices_hu, torch.Tensor)
    x = _as_tensor(slices_hu, device)
    if x.ndim != 3:
        raise ValueError(f"to_canvas expects (slices, rows, cols), got shape {tuple(x.shape)}")
    placement = make_placement(tuple(x.shape[1:]), spacing_xy, spec, center, snap=snap)
    canvas = _to_canvas_tensor(x, placement)
    return (canvas.cpu().numpy() if as_numpy else canvas), placement


def _to_canvas_tensor(x: torch.Tensor, p: CanvasPlacement) -> torch.Tensor:
    spec = p.spec
    unit = hu_to_unit(x, spec.hu_window)
    fill = float(hu_to_unit(torch.tensor(spec.background_hu), spec.hu_window))
    mr, mc = _matrices(p, x.device, inverse=False)
    return _resample(unit, mr, mc, fill)


def from_canvas(
    canvas: ArrayLike,
    placement: CanvasPlacement,
    original_hu: ArrayLike,
    *,
    device: torch.device | str | None = None,
    fine_detail: str = "scaled",
) -> ArrayLike:
    """Map generator output canvases (N, S, S) in [-1, 1] back into the input grid: (N, R, C) float32 HU.

    The change the generator made (in HU) is resampled into the input grid and added to ``original_hu``
    (see the module docstring); the result is clipped to the HU window. Voxels outside the canvas and
    voxels whose original value lies outside the HU window are returned unchanged.

    ``fine_detail`` decides what happens to the input's detail finer than the canvas pixels, which the
    generator never sees (only when the canvas is coarser than the input): "keep" carries it over
    unchanged; "drop" removes it (the output is then band-limited like the model's canvas, as in the
    paper); "scaled" (default) multiplies it per slice by the factor the generator applied to the finest
    texture it does see (median absolute high-pass of body pixels, output over input canvas, limited to
    0..4), so a sharp-to-smooth harmonization also calms the finer noise. A generator that returns its
    input gives a factor of exactly 1, so "scaled" and "keep" give the input back bit for bit.
    """
    as_numpy = not isinstance(original_hu, torch.Tensor)
    dev = device if device is not None else (canvas.device if isinstance(canvas, torch.Tensor) else None)
    orig = _as_tensor(original_hu, dev)
    out = _as_tensor(canvas, orig.device)
    if orig.ndim != 3 or tuple(orig.shape[1:]) != placement.input_shape:
        raise ValueError(
            f"original_hu must be (slices, {placement.input_shape[0]}, {placement.input_shape[1]}), "
            f"got {tuple(orig.shape)}"
        )
    size = placement.spec.canvas_size
    if out.ndim == 4 and out.shape[1] == 1:
        out = out[:, 0]
    if tuple(out.shape) != (orig.shape[0], size, size):
        raise ValueError(f"canvas must be ({orig.shape[0]}, {size}, {size}), got {tuple(out.shape)}")
    if fine_detail not in _FINE_DETAIL:
        raise ValueError(f"fine_detail must be one of {', '.join(_FINE_DETAIL)}, got {fine_detail!r}")
    result = _from_canvas_tensor(out, placement, orig, fine_detail)
    return result.cpu().numpy() if as_numpy else result


_FINE_DETAIL = ("scaled", "keep", "drop")
_MAX_FINE_GAIN = 4.0


def _fine_gain(canvas_in: torch.Tensor, canvas_out: torch.Tensor, body_unit: float) -> torch.Tensor:
    """Per slice: median |high-pass| of body pixels in the output canvas over that of the input canvas.

    The median keeps the measure on tissue texture and noise rather than on the few strong edges the
    generator preserves anyway. Slices with too little body or no texture get 1 (no change).
    """

    def high_pass(x: torch.Tensor) -> torch.Tensor:
        smooth = torch.nn.functional.avg_pool2d(
            torch.nn.functional.pad(x.unsqueeze(1), (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return (x - smooth.squeeze(1)).abs()

    body = canvas_in > body_unit
    nan = torch.tensor(float("nan"), device=canvas_in.device)
    a = torch.where(body, high_pass(canvas_out), nan).flatten(1).nanmedian(dim=1).values
    b = torch.where(body, high_pass(canvas_in), nan).flatten(1).nanmedian(dim=1).values
    enough = body.flatten(1).sum(dim=1) >= 100
    gain = torch.where(enough & (b > 1e-6), a / b.clamp_min(1e-6), torch.ones_like(b))
    return torch.nan_to_num(gain, nan=1.0).clamp(0.0, _MAX_FINE_GAIN)


def _from_canvas_tensor(out: torch.Tensor, p: CanvasPlacement, orig: torch.Tensor,
                        fine_detail: str = "scaled") -> torch.Tensor:
    spec = p.spec
    lo, hi = spec.hu_window
    size = spec.canvas_size
    scale = (hi - lo) / 2.0
    # Recompute the input canvas (deterministic, cheaper than keeping it) to get the generator's change.
    canvas_in = _to_canvas_tensor(orig, p)
    out = out.float()
    delta = (out - canvas_in) * scale
    mr, mc = _matrices(p, orig.device, inverse=True)
    back = _resample(delta, mr, mc, 0.0)
    coarser = p.step_r > 1.0 + 1e-6 or p.step_c > 1.0 + 1e-6
    if fine_detail != "keep" and coarser:
        # The input's detail finer than the canvas: input minus its canvas version brought back.
        fine = orig.clamp(lo, hi) - _resample((canvas_in + 1.0) * scale + lo, mr, mc, 0.0)
        if fine_detail == "drop":
            gain = torch.zeros(orig.shape[0], device=orig.device)
        else:
            gain = _fine_gain(canvas_in, out, float(hu_to_unit(torch.tensor(BODY_THRESHOLD_HU), spec)))
        back = back + (gain - 1.0).view(-1, 1, 1) * fine
    rows_in, cols_in = p.input_shape
    ci = (torch.arange(rows_in, dtype=torch.float64) - p.row0) / p.step_r
    cj = (torch.arange(cols_in, dtype=torch.float64) - p.col0) / p.step_c
    eps = 1e-6
    inside_r = (ci >= -eps) & (ci <= size - 1 + eps)
    inside_c = (cj >= -eps) & (cj <= size - 1 + eps)
    keep = (inside_r[:, None] & inside_c[None, :]).to(orig.device)
    in_window = (orig >= lo) & (orig <= hi)
    changed = (orig + back).clamp(lo, hi)
    return torch.where(keep.unsqueeze(0) & in_window, changed, orig)
