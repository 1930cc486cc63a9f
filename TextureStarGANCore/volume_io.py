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

import contextlib
import copy
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "InputError",
    "CTVolume",
    "DicomSeries",
    "SeriesSummary",
    "list_dicom_series",
    "read_volume",
    "read_dicom_files",
    "write_volume",
    "atomic_output",
    "output_kind",
    "check_output_path",
    "validate_ct_values",
]

# Volume-file suffixes SimpleITK reads and writes, longest first so ".nii.gz" wins over ".gz".
VOLUME_SUFFIXES = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")
_FORMAT_OF_SUFFIX = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd",
                     ".mha": "mha", ".mhd": "mha"}
# Tags copied into CTVolume.tags (and into volume-file metadata on output).
_SUMMARY_TAGS = (
    "Modality", "Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "SeriesInstanceUID",
    "SeriesDescription", "SeriesNumber", "StudyInstanceUID", "PatientID", "BodyPartExamined",
    "SliceThickness", "KVP", "GantryDetectorTilt", "PixelPaddingValue",
)
_FILE_METADATA_TAGS = ("Modality", "Manufacturer", "ManufacturerModelName", "ConvolutionKernel",
                       "SeriesDescription", "BodyPartExamined")
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
    """Refuse data that cannot be a CT volume in HU: wrong dimensionality, NaN/Inf, no air, flat."""
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


def _check_modality(modality: str, where: str) -> None:
    if modality and modality.strip().upper() != "CT":
        raise InputError(f"{where} has Modality {modality!r}, not CT; only CT images can be harmonized.")


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------

def _tag_text(ds: Any, name: str) -> str:
    value = ds.get(name)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


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
            description=_tag_text(first, "SeriesDescription"),
            modality=_tag_text(first, "Modality"),
            manufacturer=_tag_text(first, "Manufacturer"),
            model=_tag_text(first, "ManufacturerModelName"),
            kernel=_tag_text(first, "ConvolutionKernel"),
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
        raise InputError(
            f"cannot decode the pixel data of {path} (transfer syntax {ts}: {exc}); decompress the series "
            "first (e.g. `gdcmconv --raw` or `dcmdjpeg`) or install a pydicom pixel-data plugin."
        ) from exc


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
        if not _tag_text(ds, "Modality"):
            raise InputError(f"{path} has no Modality tag, so it cannot be confirmed as CT; only CT images "
                             "can be harmonized (add Modality=CT if it is CT).")
        _check_modality(_tag_text(ds, "Modality"), str(path))
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
        raise InputError(f"{paths[0]} has a non-positive PixelSpacing {list(spacing_rc)}.")
    if np.abs(iop - iop[0]).max() > 1e-3:
        raise InputError(f"{where}: slices have different orientations; the series mixes image planes "
                         "(e.g. a localizer); select the axial series only.")
    row_dir, col_dir = iop[0, :3], iop[0, 3:]
    normal = np.cross(row_dir, col_dir)
    if not math.isclose(float(np.linalg.norm(normal)), 1.0, abs_tol=1e-2):
        raise InputError(f"{where}: ImageOrientationPatient {list(iop[0])} is not two orthonormal vectors.")
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
        stored_dtype=stored.dtype, tags={t: _tag_text(first, t) for t in _SUMMARY_TAGS if t in first},
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


def _read_sitk(path: Path) -> CTVolume:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise InputError(f"cannot read {path} as a {_FORMAT_OF_SUFFIX[_suffix(path)].upper()} volume "
                         f"({first[-1] if first else exc}); is the file complete?") from exc
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


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False,
                      inputs: Sequence[str | os.PathLike] = ()) -> str:
    """Refuse an output that exists (unless ``overwrite``), cannot be created, or would touch an input
    (missing parent folders are created when writing); returns the output kind ('nrrd', 'nifti', 'mha'
    or 'dicom'). Writes nothing."""
    out = Path(path)
    kind = output_kind(out)
    for src in inputs:
        src = Path(src)
        if out.resolve() == src.resolve() or _is_within(src, out) or (src.is_dir() and _is_within(out, src)):
            raise InputError(f"output {out} would overwrite or sit inside the input {src}; choose another "
                             "path (the input is never modified).")
    existing = next((p for p in out.absolute().parents if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise InputError(f"output folder {out.parent} cannot be created: {existing} is not a folder.")
    if kind == "dicom":
        if out.exists() and not out.is_dir():
            raise InputError(f"output {out} exists and is a file; a DICOM output is a folder.")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise InputError(f"output folder {out} already exists and is not empty; pass --overwrite "
                             "(overwrite=True) to replace it.")
    elif out.exists():
        if out.is_dir():
            raise InputError(f"output {out} is a folder; give a file name such as out.nrrd.")
        if not overwrite:
            raise InputError(f"output {out} already exists; pass --overwrite (overwrite=True) to replace it.")
    return kind


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one ``os.replace``.

    The temporary name keeps the suffix (writers pick the format from it). On any error, including
    KeyboardInterrupt, the temporary file or folder is removed and ``path`` is left as it was.
    """
    out = Path(path)
    suffix = _suffix(out) if not folder else ""
    stem = out.name[: len(out.name) - len(suffix)] if suffix else out.name
    tmp = out.parent / f".{stem}.tmp-{uuid.uuid4().hex[:8]}{suffix}"
    # Missing parent folders are created (a user naming out/result.nrrd expects that) and removed again
    # if the write fails, so a failed run leaves nothing behind.
    created = [p for p in reversed(out.absolute().parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if folder and out.is_dir():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            old = out.parent / f".{stem}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if still empty
        raise


def _integer_range(dtype: np.dtype) -> tuple[float, float]:
    info = np.iinfo(dtype)
    return float(info.min), float(info.max)


def _file_dtype(volume: CTVolume) -> np.dtype:
    """Voxel type of a volume-file output: the input's stored type; for DICOM inputs (stored values are
    not HU) int16 when every slope/intercept is integral, else float32."""
    if volume.dicom is None:
        return np.dtype(volume.stored_dtype)
    d = volume.dicom
    integral = np.all(d.slopes == np.round(d.slopes)) and np.all(d.intercepts == np.round(d.intercepts))
    return np.dtype(np.int16) if integral else np.dtype(np.float32)


def _to_dtype(values: np.ndarray, dtype: np.dtype, lo: float | None = None,
              hi: float | None = None) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        dlo, dhi = _integer_range(dtype)
        lo = dlo if lo is None else max(lo, dlo)
        hi = dhi if hi is None else min(hi, dhi)
        return np.clip(np.rint(values), lo, hi).astype(dtype)
    return values.astype(dtype)


def _write_sitk(path: Path, volume: CTVolume, hu: np.ndarray, description: str) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(_to_dtype(hu, _file_dtype(volume)))
    img.SetSpacing(tuple(float(v) for v in volume.spacing))
    img.SetOrigin(tuple(float(v) for v in volume.origin))
    img.SetDirection(tuple(float(v) for v in volume.direction))
    for key in _FILE_METADATA_TAGS:
        if volume.tags.get(key):
            img.SetMetaData(key, str(volume.tags[key]))
    if description:
        img.SetMetaData("SeriesDescription", description)
    sitk.WriteImage(img, str(path), useCompression=True)


def _dicom_stored(hu: np.ndarray, ds: Any, slope: float, intercept: float, dtype: np.dtype) -> np.ndarray:
    """HU -> stored values with the slice's own rescale, clipped to what BitsStored can hold."""
    bits = int(ds.get("BitsStored", 8 * dtype.itemsize) or 8 * dtype.itemsize)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    else:
        lo, hi = 0.0, 2.0**bits - 1
    return _to_dtype((hu.astype(np.float64) - intercept) / slope, dtype, lo, hi)


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
        ds.SeriesDescription = description[:64]  # LO: at most 64 characters
        ds.DerivationDescription = description[:1024]
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
    UIDs, ImageType DERIVED\\SECONDARY, SeriesDescription = ``description``, every other tag and every
    slice's geometry kept, pixels re-encoded with each slice's rescale (clipped to the stored range).
    """
    out = Path(path)
    hu = np.asarray(hu)
    if hu.shape != volume.hu.shape:
        raise InputError(f"the harmonized array has shape {hu.shape}, the input volume {volume.hu.shape}.")
    if not np.isfinite(hu).all():
        raise InputError("the harmonized array contains NaN/Inf; nothing was written.")
    inputs = [volume.source] if volume.source is not None else []
    kind = check_output_path(out, overwrite=overwrite, inputs=inputs)
    if kind == "dicom":
        if volume.dicom is None:
            raise InputError(f"a DICOM output ({out}) needs a DICOM input, whose tags the derived series "
                             "copies; write a .nrrd, .nii.gz or .mha file instead.")
        with atomic_output(out, folder=True) as tmp:
            _write_dicom(tmp, volume, hu, description)
    else:
        with atomic_output(out) as tmp:
            _write_sitk(tmp, volume, hu, description)
    return out
