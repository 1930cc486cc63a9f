"""Reading and writing CT volumes: NRRD / NIfTI / MHA through SimpleITK, DICOM series through pydicom.

Everything becomes a ``CTVolume`` with the voxels in Hounsfield units as (slices, rows, cols) float32.
Stored values are converted with each slice's own RescaleSlope/RescaleIntercept; padding values (e.g.
-2000 outside the scan circle) are kept as they are, so writing back re-encodes them to the same stored
value. DICOM slices are sorted along the slice normal and every slice keeps its own header, position and
orientation, so a DICOM output (a derived series) reproduces gantry tilt and irregular spacing exactly.
A volume-file output stores one regular grid; for tilted or irregular series that grid is an
approximation (see ``CTVolume.notes``).

Every bad input raises ``InputError`` with a message that names the problem and what to do. Outputs are
written atomically (temporary file or folder beside the target, then ``os.replace``); the input is never
touched. The data pipeline (``Training/dicom_scan.py``, ``prepare.py``) reads through this module too.
"""

from __future__ import annotations

import copy
import gzip
import math
import os
import re
import shutil
import stat
import struct
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import atomic_output

__all__ = [
    "InputError",
    "CTVolume",
    "DicomSeries",
    "SeriesSummary",
    "list_dicom_series",
    "read_volume",
    "read_dicom_files",
    "write_volume",
    "output_kind",
    "check_output_path",
    "check_apart_from_inputs",
    "check_output_writable",
    "validate_ct_values",
    "validate_ct_spacing",
    "cast_clipped",
    "axial_permutation",
    "output_size_estimate",
    "HARMONIZED_SERIES_FILE",
]

# Volume-file suffixes SimpleITK reads and writes, longest first so ".nii.gz" wins over ".gz".
VOLUME_SUFFIXES = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")
_FORMAT_OF_SUFFIX = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd",
                     ".mha": "mha", ".mhd": "mha"}
# Tags copied into CTVolume.tags (and into volume-file metadata on output).
_SUMMARY_TAGS = (
    "Modality", "Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "SeriesInstanceUID",
    "SeriesDescription", "SeriesNumber", "StudyInstanceUID", "PatientID", "BodyPartExamined",
    "SliceThickness", "KVP", "GantryDetectorTilt", "PixelPaddingValue", "DerivationDescription",
)
_FILE_METADATA_TAGS = ("Modality", "Manufacturer", "ManufacturerModelName", "ConvolutionKernel",
                       "SeriesDescription", "BodyPartExamined", "DerivationDescription")
# File names of a DICOM series this module writes (0001.dcm, ...): with the Derivation Code Sequence item
# below they tell a previous output, which --overwrite may replace, from anything else.
HARMONIZED_SERIES_FILE = re.compile(r"^\d{4,}\.dcm$")
# The Derivation Code Sequence item of a harmonized series (a private coding scheme: DICOM's CID 7203
# has no code for kernel harmonization, and "99" schemes are the standard's way to extend it).
_DERIVATION_CODE = ("KERNEL-HARMONIZE", "99CTHARM", "Reconstruction kernel harmonization")
# In-plane spacing of any CT scanner (0.1 .. 2 mm in practice); outside it the unit is wrong.
PLAUSIBLE_SPACING_MM = (0.05, 5.0)
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


class InputError(ValueError):
    """A bad input or output request; the message names the problem and the fix."""


@dataclass
class SeriesSummary:
    """One DICOM series found in a folder (headers only)."""

    series_uid: str
    description: str
    modality: str
    manufacturer: str
    model: str
    kernel: str
    files: list[Path]
    has_pixels: bool

    @property
    def num_files(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        return (f"{self.series_uid}  '{self.description}'  modality {self.modality or '?'}  "
                f"kernel {self.kernel or '?'}  {self.num_files} file(s)")


@dataclass
class DicomSeries:
    """The DICOM side of a volume: one header per slice (pixel data removed), in slice order."""

    series_uid: str
    files: list[Path]
    headers: list[Any]  # pydicom Datasets without PixelData
    positions: np.ndarray  # (N, 3) ImagePositionPatient
    orientations: np.ndarray  # (N, 6) ImageOrientationPatient
    slopes: np.ndarray  # (N,)
    intercepts: np.ndarray  # (N,)
    locations: np.ndarray  # (N,) position along the slice normal, mm (ascending)
    gantry_tilt_deg: float
    stored_dtype: np.dtype

    @property
    def gaps(self) -> np.ndarray:
        """Distances between consecutive slices along the normal (mm)."""
        return np.diff(self.locations)

    @property
    def irregular(self) -> bool:
        g = self.gaps
        return g.size > 1 and float(g.max() - g.min()) > 0.01 * max(float(np.median(g)), 1e-6)


@dataclass
class CTVolume:
    """A CT volume in HU with its geometry and provenance.

    ``spacing`` is (x, y, z) mm as SimpleITK/Slicer report it (x along a row, i.e. between columns);
    ``direction`` is the row-major 3x3 matrix whose columns are the x, y, z axis directions (LPS).
    """

    hu: np.ndarray  # (N, R, C) float32
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    stored_dtype: np.dtype
    tags: dict[str, str] = field(default_factory=dict)
    dicom: DicomSeries | None = None
    source: Path | None = None
    format: str = "array"  # "dicom", "nrrd", "nifti", "mha" or "array"
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Validation shared by every reader
# --------------------------------------------------------------------------------------------------

def validate_ct_values(hu: np.ndarray, where: str) -> None:
    """Refuse data that cannot be a CT volume in HU: not real numbers, wrong dimensionality, NaN/Inf, no
    air, flat."""
    dtype = np.asarray(hu).dtype
    if np.issubdtype(dtype, np.complexfloating) or dtype == np.bool_ or not np.issubdtype(dtype, np.number):
        raise InputError(f"{where} has voxels of type {dtype} ({_kind_of(dtype)}); a CT volume is an array "
                         "of real numbers in HU (e.g. int16 or float32).")
    if hu.ndim == 2:
        raise InputError(f"{where} is a 2D image; harmonization needs a 3D CT volume "
                         "(a DICOM series folder or a 3D .nrrd/.nii.gz/.mha).")
    if hu.ndim != 3:
        raise InputError(f"{where} has {hu.ndim} dimensions {hu.shape}; a 3D CT volume is needed "
                         "(extract one 3D volume from 4D / multi-component data first).")
    if min(hu.shape) < 1:
        raise InputError(f"{where} is empty (shape {hu.shape}).")
    if hu.shape[1] < 16 or hu.shape[2] < 16:
        raise InputError(f"{where} has slices of only {hu.shape[1]} x {hu.shape[2]} pixels; "
                         "a CT slice is needed (check that the axes are slices, rows, columns).")
    finite = np.isfinite(hu)
    if not finite.all():
        bad = int(hu.size - np.count_nonzero(finite))
        raise InputError(f"{where} contains {bad} NaN/Inf voxel(s); fix or mask them before harmonizing.")
    lo, hi = float(hu.min()), float(hu.max())
    # CT in HU always shows air (about -1000 HU) or padding below it somewhere in the field of view.
    if lo > -300.0 or hi - lo < 100.0:
        raise InputError(
            f"{where} does not look like CT in Hounsfield units (values {lo:g} .. {hi:g}; CT shows air at "
            "about -1000 HU). If it is CT stored without rescaling, convert it to HU first; other "
            "modalities (MR, PET, normalised images) cannot be harmonized."
        )


def _kind_of(dtype: np.dtype) -> str:
    if np.issubdtype(dtype, np.complexfloating):
        return "complex numbers; the imaginary part would be dropped"
    if dtype == np.bool_:
        return "a mask, not intensities"
    return "not numbers"


def _unit_hint(value: float) -> str:
    """The likely unit mistake behind an implausible spacing, or ''."""
    lo, hi = PLAUSIBLE_SPACING_MM
    for factor, unit in ((1000.0, "metres"), (10.0, "centimetres"), (0.001, "micrometres")):
        if lo <= value * factor <= hi:
            return f" (it looks like {unit}: {value:g} {unit} = {value * factor:g} mm)"
    return ""


def validate_ct_spacing(spacing: Sequence[float], where: str) -> None:
    """Refuse an in-plane spacing (x, y; the first two values) no CT scanner produces, naming the likely
    unit mistake: harmonizing it would resample by an absurd factor (a no-op or hours of work)."""
    lo, hi = PLAUSIBLE_SPACING_MM
    values = [float(v) for v in list(spacing)[:2]]
    for axis, value in (("x", values[0]), ("y", values[-1])):
        if not lo <= value <= hi:
            raise InputError(f"{where} has an in-plane pixel spacing of {value:g} mm ({axis}), outside the "
                             f"{lo:g}-{hi:g} mm of CT images{_unit_hint(value)}; fix the spacing in the "
                             "file (in mm) before harmonizing.")


# An axis within about 37 degrees of the patient's head-foot axis counts as the slice axis (gantry tilt
# stays below 30 degrees); a volume with none is oblique.
_MIN_AXIAL_COSINE = 0.8


def axial_permutation(direction: Sequence[float], where: str) -> tuple[int, int, int]:
    """The order of array axes (slices, rows, cols) that makes slices axial, rows anterior-posterior and
    columns left-right, from the row-major 3x3 ``direction`` (columns: x, y, z axis directions, LPS).

    Kernels act in the axial plane of the acquisition, so a sagittal or coronal volume is harmonized
    as axial slices (transpose with this order, harmonize, transpose back); (0, 1, 2) for axial input.
    Raises ``InputError`` for an oblique volume, whose axial plane is not an array plane.
    """
    d = np.abs(np.asarray(direction, dtype=np.float64).reshape(3, 3))
    # Array axis a runs along direction column 2 - a; patient axes wanted: S (LPS z), P (y), L (x).
    align = np.stack([d[k, ::-1] for k in (2, 1, 0)])  # align[k, a]
    order: list[int] = []
    for k in range(3):
        a = max((a for a in range(3) if a not in order), key=lambda a: align[k, a])
        order.append(a)
    if align[0, order[0]] < _MIN_AXIAL_COSINE:
        angle = math.degrees(math.acos(min(1.0, float(align[0, order[0]]))))
        raise InputError(f"{where} is oblique: its nearest axis to the patient's head-foot direction is "
                         f"{angle:.0f} degrees off, so it has no axial slices to harmonize; reformat it to "
                         "axial slices first (e.g. resample in 3D Slicer).")
    return order[0], order[1], order[2]


def _check_modality(modality: str, where: str) -> None:
    if modality and modality.strip().upper() != "CT":
        raise InputError(f"{where} has Modality {modality!r}, not CT; only CT images can be harmonized.")


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------

def dicom_text(ds: Any, name: str) -> str:
    """A tag as text ('' when missing); multi-values joined by a backslash."""
    value = ds.get(name)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _read_header(path: Path) -> Any | None:
    """A DICOM header without pixel data, or None when the file is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, TypeError, KeyError, EOFError, AttributeError):
        return None
    except Exception:  # noqa: BLE001 - a malformed file must not stop the scan of a whole folder
        return None


def _is_dicomdir(ds: Any) -> bool:
    meta = getattr(ds, "file_meta", None)
    return meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_SOP_CLASS


def list_dicom_series(folder: str | os.PathLike) -> list[SeriesSummary]:
    """Every DICOM series under ``folder`` (recursive), largest first. Non-DICOM files are skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder.")
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        ds = _read_header(path)
        if ds is None or _is_dicomdir(ds):
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    out = []
    for uid, items in groups.items():
        first = items[0][1]
        out.append(SeriesSummary(
            series_uid=uid,
            description=dicom_text(first, "SeriesDescription"),
            modality=dicom_text(first, "Modality"),
            manufacturer=dicom_text(first, "Manufacturer"),
            model=dicom_text(first, "ManufacturerModelName"),
            kernel=dicom_text(first, "ConvolutionKernel"),
            files=[p for p, _ in items],
            has_pixels=any("Rows" in ds for _, ds in items),
        ))
    out.sort(key=lambda s: (-s.num_files, s.series_uid))
    return out


def _pick_series(folder: Path, series_uid: str | None) -> SeriesSummary:
    entries = [p for p in folder.rglob("*") if p.is_file()]
    if not entries:
        raise InputError(f"folder {folder} is empty; point to a DICOM series folder or a volume file "
                         "(.nrrd, .nii.gz, .mha).")
    series = list_dicom_series(folder)
    if not series:
        example = ", ".join(p.name for p in entries[:3])
        raise InputError(f"no readable DICOM files in {folder} ({len(entries)} file(s), e.g. {example}); "
                         "point to a DICOM series folder or a volume file (.nrrd, .nii.gz, .mha).")
    listing = "\n".join("  " + s.describe() for s in series)
    if series_uid is not None:
        matches = [s for s in series if s.series_uid == series_uid]
        if not matches:
            matches = [s for s in series if s.series_uid.startswith(series_uid)]
        if len(matches) != 1:
            what = "matches several series" if matches else "is not in this folder"
            raise InputError(f"series {series_uid!r} {what}; the series in {folder} are:\n{listing}")
        return matches[0]
    images = [s for s in series if s.has_pixels]
    if not images:
        raise InputError(f"the DICOM files in {folder} hold no images:\n{listing}")
    if len(images) > 1:
        raise InputError(
            f"{folder} holds {len(images)} DICOM image series; pick one with --series UID "
            f"(Python: read_volume(path, series_uid=...)):\n" + "\n".join("  " + s.describe() for s in images)
        )
    return images[0]


def _decode_pixels(ds: Any, path: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for undecodable data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        if getattr(ts, "is_compressed", True) is False:
            # Uncompressed pixels that do not decode are missing bytes, not a missing codec.
            raise InputError(f"{path} is truncated or damaged: its pixel data cannot be read ({exc}); copy "
                             "the file again from its source.") from exc
        raise InputError(
            f"cannot decode the pixel data of {path} (transfer syntax {ts}: {exc}); decompress the series "
            "first (e.g. `gdcmconv --raw` or `dcmdjpeg`) or install a pydicom pixel-data plugin."
        ) from exc


def _numbers(values: Any) -> str:
    """'[0.5, 0]' for messages (a plain list of numpy floats prints as [np.float64(0.5), ...])."""
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def _float_list(ds: Any, name: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(name)
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.size != n or not np.isfinite(arr).all():
        raise InputError(f"{path} has no valid {name} (got {value!r}); the slice geometry cannot be "
                         "recovered. Export the series with full geometry tags.")
    return arr


def read_dicom_files(files: Sequence[str | os.PathLike], where: str | None = None) -> CTVolume:
    """Read the given DICOM files as one series (single-frame CT images), sorted along the slice normal."""
    import pydicom

    paths = [Path(f) for f in files]
    where = where or (str(paths[0].parent) if paths else "DICOM input")
    if not paths:
        raise InputError(f"{where}: no DICOM files given.")
    headers, arrays = [], []
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read DICOM file {path}: {exc}") from exc
        if not dicom_text(ds, "Modality"):
            raise InputError(f"{path} has no Modality tag, so it cannot be confirmed as CT; only CT images "
                             "can be harmonized (add Modality=CT if it is CT).")
        _check_modality(dicom_text(ds, "Modality"), str(path))
        if "PixelData" not in ds:
            raise InputError(f"{path} holds no image (no Pixel Data); point to a CT image series.")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise InputError(f"{path} is a multi-frame (enhanced) DICOM object with {frames} frames; convert "
                             "it to single-frame files or to .nrrd/.nii.gz first (e.g. with 3D Slicer or "
                             "dcm2niix).")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise InputError(f"{path} is a colour image (SamplesPerPixel={ds.SamplesPerPixel}); "
                             "a greyscale CT series is needed.")
        arr = _decode_pixels(ds, path)
        if arr.ndim != 2:
            raise InputError(f"{path} holds pixel data of shape {arr.shape}; one 2D slice per file is "
                             "needed.")
        arrays.append(arr)
        del ds.PixelData  # keep headers small; pixels live in CTVolume.hu
        headers.append(ds)

    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise InputError(f"{where}: slices have different sizes {sorted(shapes)}; the series mixes images "
                         "(e.g. a localizer); select the axial series only.")
    n = len(headers)
    ipp = np.stack([_float_list(ds, "ImagePositionPatient", 3, p)
                    for ds, p in zip(headers, paths)])
    iop = np.stack([_float_list(ds, "ImageOrientationPatient", 6, p)
                    for ds, p in zip(headers, paths)])
    spacing_rc = _float_list(headers[0], "PixelSpacing", 2, paths[0])
    if (spacing_rc <= 0).any():
        raise InputError(f"{paths[0]} has a non-positive PixelSpacing {_numbers(spacing_rc)}.")
    if np.abs(iop - iop[0]).max() > 1e-3:
        raise InputError(f"{where}: slices have different orientations; the series mixes image planes "
                         "(e.g. a localizer); select the axial series only.")
    row_dir, col_dir = iop[0, :3], iop[0, 3:]
    normal = np.cross(row_dir, col_dir)
    if not math.isclose(float(np.linalg.norm(normal)), 1.0, abs_tol=1e-2):
        raise InputError(f"{where}: ImageOrientationPatient {_numbers(iop[0])} is not two orthonormal "
                         "vectors.")
    loc = ipp @ normal
    instance = np.array([int(ds.get("InstanceNumber", 0) or 0) for ds in headers])
    order = np.lexsort((instance, loc))
    loc = loc[order]
    if n > 1 and np.diff(loc).min() < 1e-3:
        dup = float(loc[int(np.argmin(np.diff(loc)))])
        raise InputError(f"{where}: two or more slices lie at the same position ({dup:.3f} mm along the "
                         "slice normal); the series mixes acquisitions or phases. Select one acquisition "
                         "(e.g. by AcquisitionNumber) into its own folder.")
    headers = [headers[i] for i in order]
    paths = [paths[i] for i in order]
    stored = np.stack([arrays[i] for i in order])
    slopes = np.array([float(ds.get("RescaleSlope", 1) or 1) for ds in headers])
    intercepts = np.array([float(ds.get("RescaleIntercept", 0) or 0) for ds in headers])
    hu = stored.astype(np.float32) * slopes.astype(np.float32)[:, None, None] \
        + intercepts.astype(np.float32)[:, None, None]
    validate_ct_values(hu, where)

    first = headers[0]
    if n > 1:
        dz = float(np.median(np.diff(loc)))
    else:
        dz = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    spacing = (float(spacing_rc[1]), float(spacing_rc[0]), abs(dz) or 1.0)
    direction = tuple(float(v) for v in np.stack([row_dir, col_dir, normal], axis=1).ravel())
    tilt = float(first.get("GantryDetectorTilt", 0) or 0)
    series = DicomSeries(
        series_uid=str(first.get("SeriesInstanceUID", "")),
        files=paths, headers=headers, positions=ipp[order], orientations=iop[order],
        slopes=slopes, intercepts=intercepts, locations=loc, gantry_tilt_deg=tilt,
        stored_dtype=stored.dtype,
    )
    notes = []
    if n > 1:
        step = ipp[order][-1] - ipp[order][0]
        shear = math.degrees(math.acos(min(1.0, abs(float(step @ normal)) / max(np.linalg.norm(step), 1e-9))))
        if shear > 0.5 or abs(tilt) > 0.5:
            notes.append(f"gantry tilt {tilt:g} deg (slices sheared by {shear:.1f} deg): a DICOM output "
                         "keeps every slice's position; a volume-file output stores a regular grid along the "
                         "slice normal (approximate positions).")
        if series.irregular:
            notes.append(f"irregular slice spacing ({series.gaps.min():.2f} .. {series.gaps.max():.2f} mm): "
                         f"a DICOM output keeps every slice's position; a volume file uses {dz:.2f} mm.")
    return CTVolume(
        hu=hu, spacing=spacing, origin=tuple(float(v) for v in ipp[order][0]), direction=direction,
        stored_dtype=stored.dtype, tags={t: dicom_text(first, t) for t in _SUMMARY_TAGS if t in first},
        dicom=series, source=Path(where), format="dicom", notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# Volume files (SimpleITK)
# --------------------------------------------------------------------------------------------------

def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in VOLUME_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def output_kind(path: str | os.PathLike) -> str:
    """'nrrd' / 'nifti' / 'mha' for a volume-file path, 'dicom' for a folder (no known suffix)."""
    p = Path(path)
    s = _suffix(p)
    if s in _FORMAT_OF_SUFFIX:
        return _FORMAT_OF_SUFFIX[s]
    if s in {".dcm", ".dicom", ".ima"}:
        raise InputError(f"{p}: a DICOM output is a series folder; give a folder path (without .dcm).")
    if s and not p.is_dir():
        raise InputError(f"{p}: unknown output format {s!r}; use .nrrd, .nii.gz, .nii, .mha or a folder "
                         "for a DICOM series.")
    return "dicom"


# NIfTI datatype codes of floating-point voxels (the ones that can hold NaN/Inf).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_layout(head: bytes, path: Path) -> tuple[int, int, np.dtype | None]:
    """(voxel data offset, voxel data bytes, float dtype or None) from a NIfTI-1 or NIfTI-2 header."""
    for endian in "<>":
        size = struct.unpack_from(endian + "i", head, 0)[0] if len(head) >= 4 else 0
        if size == 348 and len(head) >= 348:
            dim = struct.unpack_from(endian + "8h", head, 40)
            datatype, bitpix = struct.unpack_from(endian + "2h", head, 70)
            offset = struct.unpack_from(endian + "f", head, 108)[0]
            offset = int(offset) if math.isfinite(offset) else 0
            break
        if size == 540 and len(head) >= 540:
            datatype, bitpix = struct.unpack_from(endian + "2h", head, 12)
            dim = struct.unpack_from(endian + "8q", head, 16)
            offset = struct.unpack_from(endian + "q", head, 168)[0]
            break
    else:
        raise InputError(f"{path} does not start with a NIfTI header; is the file complete?")
    count = math.prod(max(1, int(d)) for d in dim[1:1 + max(0, min(7, int(dim[0])))])
    floats = _NIFTI_FLOATS.get(int(datatype))
    return max(offset, size), count * int(bitpix) // 8, (np.dtype(endian + floats) if floats else None)


def _scan_voxels(f: Any, need: int, floats: np.dtype | None) -> tuple[int, int]:
    """(bytes read to the end of ``f``, NaN/Inf voxels among the first ``need`` bytes when ``floats``)."""
    have = bad = 0
    while True:
        chunk = f.read(1 << 24)  # reading a gzip stream to its end also checks its end marker
        if not chunk:
            return have, bad
        if floats is not None and have < need:
            usable = min(len(chunk), need - have) // floats.itemsize * floats.itemsize
            values = np.frombuffer(chunk[:usable], dtype=floats)
            bad += int(values.size - np.count_nonzero(np.isfinite(values)))
        have += len(chunk)


def _check_nifti_voxels(path: Path) -> None:
    """Refuse a truncated NIfTI file and NaN/Inf voxels, checked on the bytes as stored.

    SimpleITK fills the missing part of a truncated .nii/.nii.gz with zeros and turns NaN/Inf into 0
    without a word, so both would go unnoticed by a check of the voxels it returns.
    """
    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            offset, need, floats = _nifti_layout(f.read(540), path)
            if floats is None and not compressed:  # integers, uncompressed: the size tells it all
                have, bad = path.stat().st_size - offset, 0
            else:
                f.seek(offset)
                have, bad = _scan_voxels(f, need, floats)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"{path} is truncated or damaged ({exc}); copy the file again from its "
                         "source.") from exc
    if have < need:
        raise InputError(f"{path} is truncated: it holds {max(have, 0)} of the {need} bytes of voxel data "
                         "its header announces; copy the file again from its source.")
    if bad:
        raise InputError(f"{path} contains {bad} NaN/Inf voxel(s); fix or mask them before harmonizing.")


def _read_sitk(path: Path) -> CTVolume:
    import SimpleITK as sitk

    if _FORMAT_OF_SUFFIX[_suffix(path)] == "nifti":
        _check_nifti_voxels(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        reason = lines[-1] if lines else str(exc)
        if "No such file" in reason:  # ITK reports a short read of an existing file with a stale errno
            reason = "its voxel data could not be read completely"
        raise InputError(f"cannot read {path} as a {_FORMAT_OF_SUFFIX[_suffix(path)].upper()} volume "
                         f"({reason}); the file is probably truncated or damaged: copy it again from its "
                         "source.") from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} has {img.GetNumberOfComponentsPerPixel()} components per voxel "
                         "(colour or vector data); a greyscale CT volume is needed.")
    dim = img.GetDimension()
    if dim == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]  # a 3D volume saved with a singleton time axis
        dim = 3
    arr = sitk.GetArrayViewFromImage(img)
    if dim != 3:
        validate_ct_values(np.asarray(arr), str(path))  # raises the 2D / 4D message
    tags = {k: img.GetMetaData(k) for k in _SUMMARY_TAGS if img.HasMetaDataKey(k)}
    if tags.get("Modality", "").upper().startswith("MET_MOD_"):
        # MetaImage spells modalities MET_MOD_CT, MET_MOD_MR, ...; MET_MOD_UNKNOWN says nothing.
        modality = tags.pop("Modality").upper()[len("MET_MOD_"):]
        if modality != "UNKNOWN":
            tags["Modality"] = modality
    _check_modality(tags.get("Modality", ""), str(path))
    stored = np.asarray(arr)
    hu = stored.astype(np.float32)
    validate_ct_values(hu, str(path))
    return CTVolume(
        hu=hu, spacing=tuple(float(v) for v in img.GetSpacing()),
        origin=tuple(float(v) for v in img.GetOrigin()),
        direction=tuple(float(v) for v in img.GetDirection()), stored_dtype=stored.dtype, tags=tags,
        source=path, format=_FORMAT_OF_SUFFIX[_suffix(path)],
    )


def read_volume(path: str | os.PathLike, series_uid: str | None = None) -> CTVolume:
    """Read a CT volume: a .nrrd/.nhdr/.nii/.nii.gz/.mha/.mhd file, a DICOM series folder or a DICOM file.

    A folder with several image series raises ``InputError`` listing them; pass ``series_uid`` (or a
    unique prefix of it) to pick one. A single DICOM file is read as a one-slice volume.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"input {p} does not exist.")
    if not (p.is_dir() or stat.S_ISREG(p.stat().st_mode)):
        # A FIFO or device would block or never end; a socket cannot be read.
        raise InputError(f"input {p} is not a regular file or a folder (a pipe, device or socket); save "
                         "the volume to a file first.")
    if p.is_dir():
        summary = _pick_series(p, series_uid)
        return read_dicom_files(summary.files, where=str(p))
    if _suffix(p) in _FORMAT_OF_SUFFIX:
        return _read_sitk(p)
    ds = _read_header(p)
    if ds is None:
        raise InputError(f"cannot read {p}: not a DICOM file and not a known volume format (.nrrd, .nhdr, "
                         ".nii, .nii.gz, .mha, .mhd); for a DICOM series pass its folder.")
    return read_dicom_files([p], where=str(p))


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _existing_folder(out: Path) -> Path:
    """The nearest existing folder above ``out`` (missing folders are created when writing)."""
    existing = next((p for p in out.absolute().parents if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise InputError(f"output folder {out.parent} cannot be created: {existing} is not a folder.")
    return existing


def check_apart_from_inputs(path: str | os.PathLike, inputs: Sequence[str | os.PathLike],
                            what: str = "output") -> None:
    """Refuse an output path that is an input, holds one, or lies inside an input folder."""
    out = Path(path)
    for src in inputs:
        src = Path(src)
        if out.resolve() == src.resolve() or _is_within(src, out) or (src.is_dir() and _is_within(out, src)):
            raise InputError(f"{what} {out} would overwrite or sit inside the input {src}; choose another "
                             "path (the input is never modified).")


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that are not part of a DICOM series written by ``write_volume``."""
    foreign = []
    for entry in sorted(folder.iterdir()):
        ours = entry.is_file() and not entry.is_symlink() and HARMONIZED_SERIES_FILE.match(entry.name)
        if ours:
            ds = _read_header(entry)
            codes = (ds.get("DerivationCodeSequence") or []) if ds is not None else []
            ours = any(str(c.get("CodingSchemeDesignator", "")) == _DERIVATION_CODE[1] for c in codes)
        if not ours:
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False,
                      inputs: Sequence[str | os.PathLike] = ()) -> str:
    """Refuse an output that exists (unless ``overwrite``), cannot be created, or would touch an input
    (missing parent folders are created when writing); returns the output kind ('nrrd', 'nifti', 'mha'
    or 'dicom'). Writes nothing.

    ``overwrite`` replaces a volume file, or a folder holding only a DICOM series this module wrote
    (``write_volume``); a folder holding anything else is refused, so no unrelated file is ever deleted.
    """
    out = Path(path)
    kind = output_kind(out)
    check_apart_from_inputs(out, inputs)
    if _is_within(Path.cwd(), out):
        raise InputError(f"output {out} is the current folder or holds it; name a new folder or file.")
    _existing_folder(out)
    if kind == "dicom":
        if out.exists() and not out.is_dir():
            raise InputError(f"output {out} exists and is a file; a DICOM output is a folder.")
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise InputError(f"output folder {out} already exists and is not empty; pass --overwrite "
                                 "(overwrite=True) to replace it.")
            foreign = _foreign_entries(out)
            if foreign:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise InputError(
                    f"output folder {out} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
                    f"that this tool did not write ({shown}); --overwrite replaces only a DICOM series "
                    "written by a previous run. Choose a new or empty folder."
                )
    elif out.exists():
        if out.is_dir():
            raise InputError(f"output {out} is a folder; give a file name such as out.nrrd.")
        if not overwrite:
            raise InputError(f"output {out} already exists; pass --overwrite (overwrite=True) to replace it.")
    return kind


def check_output_writable(path: str | os.PathLike, nbytes: int) -> None:
    """Refuse an output whose folder cannot be written or lacks room for about ``nbytes``; writes nothing
    that stays (a probe file is created and removed). Run before computing, so a long run cannot end in
    a failed write."""
    out = Path(path).absolute()
    existing = _existing_folder(out)
    try:
        fd, probe = tempfile.mkstemp(prefix=".ctharmonize-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write in {existing} ({exc.strerror or exc}); choose a folder you can "
                         "write to.") from None
    free = shutil.disk_usage(existing).free
    if free < nbytes:
        raise InputError(f"not enough free space for {out}: about {nbytes / 1e6:.1f} MB are needed, "
                         f"{free / 1e6:.1f} MB are free in {existing}.")


def _integer_range(dtype: np.dtype) -> tuple[float, float]:
    """The dtype's range as float64 values that convert back without wrapping (float64(INT64_MAX) is
    2**63, one past the top, so the top is moved down to the next float)."""
    info = np.iinfo(dtype)
    lo, hi = np.float64(info.min), np.float64(info.max)
    if int(hi) > info.max:
        hi = np.nextafter(hi, 0.0)
    return float(lo), float(hi)


def _file_dtype(volume: CTVolume) -> np.dtype:
    """Voxel type of a volume-file output: the input's stored type; for DICOM inputs (stored values are
    not HU) int16 when every slope/intercept is integral, else float32."""
    if volume.dicom is None:
        return np.dtype(volume.stored_dtype)
    d = volume.dicom
    integral = np.all(d.slopes == np.round(d.slopes)) and np.all(d.intercepts == np.round(d.intercepts))
    return np.dtype(np.int16) if integral else np.dtype(np.float32)


def cast_clipped(values: np.ndarray, dtype: Any, lo: float | None = None,
                 hi: float | None = None) -> np.ndarray:
    """``values`` as ``dtype``: integers rounded and clipped to the dtype's range (and to ``lo``..``hi``)
    before the cast, so nothing wraps: INT32_MAX stays INT32_MAX (clipped in float32, 2**31 - 1 rounds up
    to 2**31, which the cast turned into INT32_MIN)."""
    dtype, values = np.dtype(dtype), np.asarray(values)
    if np.issubdtype(dtype, np.integer):
        dlo, dhi = _integer_range(dtype)
        lo = dlo if lo is None else max(lo, dlo)
        hi = dhi if hi is None else min(hi, dhi)
        # float32 holds every 8/16-bit integer exactly; wider types need float64 (and twice the memory).
        work = np.float64 if dtype.itemsize > 2 else np.result_type(values.dtype, np.float32)
        return np.clip(np.rint(values.astype(work, copy=False)), lo, hi).astype(dtype)
    return values.astype(dtype, copy=False)


def _write_sitk(path: Path, volume: CTVolume, hu: np.ndarray, description: str) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(cast_clipped(hu, _file_dtype(volume)))
    img.SetSpacing(tuple(float(v) for v in volume.spacing))
    img.SetOrigin(tuple(float(v) for v in volume.origin))
    img.SetDirection(tuple(float(v) for v in volume.direction))
    for key in _FILE_METADATA_TAGS:
        if volume.tags.get(key):
            img.SetMetaData(key, str(volume.tags[key]))
    if description:
        img.SetMetaData("SeriesDescription", description)
        img.SetMetaData("DerivationDescription", description)
    sitk.WriteImage(img, str(path), useCompression=True)


def _dicom_stored(hu: np.ndarray, ds: Any, slope: float, intercept: float, dtype: np.dtype) -> np.ndarray:
    """HU -> stored values with the slice's own rescale, clipped to what BitsStored can hold."""
    bits = int(ds.get("BitsStored", 8 * dtype.itemsize) or 8 * dtype.itemsize)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    else:
        lo, hi = 0.0, 2.0**bits - 1
    return cast_clipped((hu.astype(np.float64) - intercept) / slope, dtype, lo, hi)


def _record_derivation(ds: Any, description: str) -> None:
    """Record the harmonization in the standard places; ConvolutionKernel keeps the scanner's kernel."""
    from pydicom.dataset import Dataset

    ds.SeriesDescription = description[:64]  # LO: at most 64 characters
    ds.DerivationDescription = description[:1024]  # ST
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _DERIVATION_CODE
    ds.DerivationCodeSequence = [code]
    note = f"{description}; ConvolutionKernel is the kernel the scanner reconstructed with."
    old = dicom_text(ds, "ImageComments")
    ds.ImageComments = (note + (f" {old}" if old else ""))[:10240]  # LT


def _write_dicom(folder: Path, volume: CTVolume, hu: np.ndarray, description: str) -> None:
    from pydicom.dataset import Dataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        generate_uid,
    )

    d = volume.dicom
    assert d is not None
    series_uid = generate_uid()
    width = max(4, len(str(len(d.headers))))
    for i, header in enumerate(d.headers):
        ds = copy.deepcopy(header)
        stored = _dicom_stored(hu[i], ds, float(d.slopes[i]), float(d.intercepts[i]), d.stored_dtype)
        old_sop = str(ds.get("SOPInstanceUID", ""))
        sop = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = sop
        image_type = [str(v) for v in (ds.get("ImageType") or [])]
        ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
        _record_derivation(ds, description)
        if old_sop:
            ref = Dataset()
            ref.ReferencedSOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")
            ref.ReferencedSOPInstanceUID = old_sop
            ds.SourceImageSequence = [ref]
        extremes = (("SmallestImagePixelValue", stored.min()), ("LargestImagePixelValue", stored.max()))
        for name, value in extremes:
            if name in ds:
                ds[name].value = int(value)
        ds.add_new(0x7FE00010, "OB" if stored.dtype.itemsize == 1 else "OW", stored.tobytes())
        meta = ds.file_meta
        meta.MediaStorageSOPInstanceUID = sop
        if meta.get("TransferSyntaxUID") not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            # Compressed or big-endian inputs: the new pixels are written uncompressed, little endian.
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / f"{i + 1:0{width}d}.dcm", **_standard_file_format())


def _standard_file_format() -> dict[str, bool]:
    """save_as() options that write a standard DICOM file (preamble, file meta): pydicom 3 (Python >= 3.10)
    renamed pydicom 2's write_like_original=False, and pydicom 2 is what Python 3.9 (Slicer 5.6/5.8) has."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        return {"enforce_file_format": True}
    return {"write_like_original": False}


def write_volume(path: str | os.PathLike, volume: CTVolume, hu: np.ndarray, *, description: str,
                 overwrite: bool = False) -> Path:
    """Write ``hu`` (same shape as ``volume.hu``) with ``volume``'s geometry, atomically.

    A path ending in .nrrd/.nii/.nii.gz/.mha writes a volume file with the input's stored voxel type;
    any other path is a folder for a DICOM derived series (needs a DICOM input): new Series/SOP Instance
    UIDs, ImageType DERIVED\\SECONDARY, ``description`` in SeriesDescription, DerivationDescription and
    ImageComments with a Derivation Code Sequence item (``_record_derivation``), every other tag (the
    ConvolutionKernel too) and every slice's geometry kept, pixels re-encoded with each slice's rescale
    (clipped to the stored range). ``overwrite`` replaces a file or a series this function wrote (see
    ``check_output_path``). A failed write raises ``InputError`` and leaves nothing behind.
    """
    out = Path(path)
    hu = np.asarray(hu)
    if hu.shape != volume.hu.shape:
        raise InputError(f"the harmonized array has shape {hu.shape}, the input volume {volume.hu.shape}.")
    if not np.isfinite(hu).all():
        raise InputError("the harmonized array contains NaN/Inf; nothing was written.")
    inputs = [volume.source] if volume.source is not None else []
    kind = check_output_path(out, overwrite=overwrite, inputs=inputs)
    if kind == "dicom" and volume.dicom is None:
        raise InputError(f"a DICOM output ({out}) needs a DICOM input, whose tags the derived series "
                         "copies; write a .nrrd, .nii.gz or .mha file instead.")
    try:
        with atomic_output(out, folder=kind == "dicom") as tmp:
            if kind == "dicom":
                _write_dicom(tmp, volume, hu, description)
            else:
                _write_sitk(tmp, volume, hu, description)
    except (OSError, RuntimeError) as exc:  # RuntimeError: SimpleITK's writers
        raise InputError(f"writing {out} failed ({_reason(exc)}); its temporary files were removed and "
                         f"{out} was left as it was.") from exc
    return out


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def output_size_estimate(volume: CTVolume, kind: str) -> int:
    """Bytes an output of ``kind`` needs at most: uncompressed voxels, plus headers for DICOM."""
    if kind == "dicom" and volume.dicom is not None:
        return volume.hu.size * np.dtype(volume.dicom.stored_dtype).itemsize + 8192 * volume.shape[0]
    return volume.hu.size * _file_dtype(volume).itemsize
