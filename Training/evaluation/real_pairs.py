"""Real paired reconstructions: two DICOM series of one acquisition, reconstructed with two kernels.

A pair is usable as ground truth only if the two series are pixel-aligned: same FrameOfReferenceUID, the
same slice positions and the same pixel grid (matrix, pixel spacing, orientation). :func:`load_pair`
checks all three and refuses otherwise, naming what differs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from TextureStarGANCore.domains import normalize_kernel
from TextureStarGANCore.volume_io import CTVolume, InputError, read_volume

POSITION_TOL_MM = 0.01
SPACING_TOL = 1e-4


class PairingError(ValueError):
    """The two series are not one acquisition on one grid, or a slice range is unusable."""


@dataclass
class SeriesPair:
    name: str
    sharp: CTVolume
    smooth: CTVolume

    @property
    def kernels(self) -> tuple[str, str]:
        return series_kernel(self.sharp), series_kernel(self.smooth)

    @property
    def spacing_xy(self) -> tuple[float, float]:
        return float(self.sharp.spacing[0]), float(self.sharp.spacing[1])

    @property
    def slices(self) -> int:
        return int(self.sharp.shape[0])


def series_kernel(volume: CTVolume) -> str:
    kernel = normalize_kernel(volume.tags.get("ConvolutionKernel", ""))
    if not kernel:
        raise PairingError(f"{volume.source}: no ConvolutionKernel tag; the kernel of each series must be "
                           "known from its DICOM tags")
    return kernel


def _frame_of_reference(volume: CTVolume) -> str:
    assert volume.dicom is not None
    uid = str(volume.dicom.headers[0].get("FrameOfReferenceUID", "") or "")
    if not uid:
        raise PairingError(f"{volume.source}: no FrameOfReferenceUID; cannot confirm the two series share "
                           "one acquisition")
    return uid


def check_pair(sharp: CTVolume, smooth: CTVolume) -> None:
    """Raise :class:`PairingError` unless the two series are one acquisition on one pixel grid."""
    for v in (sharp, smooth):
        if v.format != "dicom" or v.dicom is None:
            raise PairingError(f"{v.source}: a DICOM series folder is needed (its tags prove the pairing)")
    if _frame_of_reference(sharp) != _frame_of_reference(smooth):
        raise PairingError(f"{sharp.source} and {smooth.source} have different FrameOfReferenceUIDs: "
                           "they are not one acquisition")
    if sharp.shape != smooth.shape:
        raise PairingError(f"different grids: {sharp.source} is {sharp.shape} (slices, rows, cols), "
                           f"{smooth.source} is {smooth.shape}")
    if not np.allclose(sharp.spacing[:2], smooth.spacing[:2], rtol=SPACING_TOL, atol=0):
        raise PairingError(f"different pixel spacing: {sharp.spacing[:2]} vs {smooth.spacing[:2]} mm")
    if not np.allclose(sharp.direction, smooth.direction, atol=1e-4):
        raise PairingError("different image orientations (ImageOrientationPatient)")
    dpos = np.abs(sharp.dicom.positions - smooth.dicom.positions).max()
    if dpos > POSITION_TOL_MM:
        raise PairingError(f"slice positions differ by up to {dpos:.3f} mm (ImagePositionPatient); the "
                           "series must have identical slice positions")
    if series_kernel(sharp) == series_kernel(smooth):
        raise PairingError(f"both series have kernel {series_kernel(sharp)!r}: nothing to convert")


def load_pair(sharp_dir: str | os.PathLike, smooth_dir: str | os.PathLike) -> SeriesPair:
    """Read and check a (sharp, smooth) pair of DICOM series folders."""
    try:
        sharp, smooth = read_volume(sharp_dir), read_volume(smooth_dir)
    except InputError as exc:
        raise PairingError(str(exc)) from exc
    check_pair(sharp, smooth)
    a, b = Path(sharp_dir).resolve(), Path(smooth_dir).resolve()
    name = a.parent.name if a.parent == b.parent else f"{a.name}_{b.name}"
    return SeriesPair(name, sharp, smooth)


def parse_range(text: str | None, n: int, default: tuple[int, int], what: str) -> range:
    """'A:B' (0-based, B exclusive, either side may be empty, negative counts from the end) -> range."""
    if text is None:
        start, stop = default
    else:
        parts = text.split(":")
        if len(parts) != 2:
            raise PairingError(f"{what} must look like A:B (0-based, B exclusive), got {text!r}")
        try:
            start, stop, _ = slice(*(int(p) if p.strip() else None for p in parts)).indices(n)
        except ValueError as exc:
            raise PairingError(f"{what} must look like A:B with whole numbers, got {text!r}") from exc
    r = range(start, stop)
    if len(r) == 0:
        raise PairingError(f"{what} {text or default} selects no slices of the {n}")
    return r


def split_slices(n: int, slices: str | None, fit_slices: str | None) -> tuple[range, range]:
    """(fit, evaluate) slice ranges; default: fit on the first half, evaluate on the second; disjoint."""
    fit = parse_range(fit_slices, n, (0, n // 2), "--fit-slices")
    ev = parse_range(slices, n, (n // 2, n), "--slices")
    if set(fit) & set(ev):
        raise PairingError(f"--fit-slices {fit.start}:{fit.stop} and --slices {ev.start}:{ev.stop} overlap; "
                           "baselines must be fitted on slices that are not evaluated")
    return fit, ev
