"""Find the CT series in a folder tree: DICOM series (one or several per folder) and volume files.

Shared by the cohort runner (``cohort.py``) and the training data scan (``Training/data/dicom_scan.py``):
the DICOM header helpers and ``ct_image_reason`` (why a DICOM series is not an axial CT image series —
SR, SEG, scouts / localizers, dose reports and screen captures, multi-frame objects, reformats) live here.
Reading goes through ``volume_io`` (one reader for the whole project).

Runs on Python 3.9 (bundled into the Slicer extension).
"""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .volume_io import VOLUME_SUFFIXES, InputError, dicom_text, list_dicom_series

__all__ = [
    "MAX_OBLIQUE_DEG",
    "CohortSeries",
    "Discovery",
    "ct_image_reason",
    "dicom_floats",
    "dicom_text",
    "discover",
    "is_dicom",
    "read_header",
    "volume_suffix",
]

MAX_OBLIQUE_DEG = 40.0  # slice normal vs patient z; gantry tilts (up to ~30 deg) stay "axial"
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # prefix of every Secondary Capture SOP class
# What the common non-image modalities of a CT study are, for the skip reason.
_MODALITY_NAMES = {
    "SR": "structured report, e.g. a dose report", "SEG": "segmentation", "RTSTRUCT": "RT structure set",
    "RTDOSE": "RT dose", "RTPLAN": "RT plan", "PR": "presentation state", "KO": "key object selection",
    "DOC": "document", "OT": "other",
}


def dicom_floats(ds: Any, name: str) -> list[float]:
    """A numeric tag as a list of floats ([] when missing or not numeric)."""
    value = ds.get(name)
    if value is None:
        return []
    try:
        seq = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" \
            else [value]
        return [float(v) for v in seq]
    except (TypeError, ValueError):
        return []


def read_header(path: Path) -> Any:
    """The DICOM header without pixel data; raises what pydicom raises for an unreadable file."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True)


def is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    try:  # old files without the preamble
        read_header(path)
        return True
    except Exception:  # noqa: BLE001
        return False


def ct_image_reason(ds: Any, has_pixels: bool, num_slices: int, *, min_slices: int = 1) -> str:
    """Why a DICOM series (``ds``: its first header) is not an axial CT image series; '' when it is."""
    modality = dicom_text(ds, "Modality").upper()
    if modality != "CT":
        what = _MODALITY_NAMES.get(modality)
        return f"modality {modality or '(missing)'}{f' ({what})' if what else ''} is not CT"
    if not has_pixels:
        return "no image data (e.g. a structured report or presentation state)"
    image_type = dicom_text(ds, "ImageType").upper()
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return "localizer / scout image"
    if dicom_text(ds, "SOPClassUID").startswith(_SECONDARY_CAPTURE) or "SCREEN SAVE" in image_type:
        return "secondary capture (a dose report, protocol page or screen save), not a CT image"
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return "multi-frame (enhanced) object; convert to single-frame files first"
    iop = dicom_floats(ds, "ImageOrientationPatient")
    if len(iop) != 6:
        return "no ImageOrientationPatient (slice geometry unknown)"
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        return f"invalid ImageOrientationPatient {iop}"
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])) / norm)))
    if angle > MAX_OBLIQUE_DEG:
        return (f"not axial (slice normal {angle:.0f} deg from the patient z axis: coronal, sagittal or "
                "oblique)")
    if num_slices < min_slices:
        return f"only {num_slices} slice(s) (at least {min_slices} needed)"
    return ""


@dataclass
class CohortSeries:
    """One series found under the root: a DICOM series of one folder, or a volume file."""

    path: str  # relative to the root, '/'-separated: the DICOM folder or the volume file
    series_uid: str  # '' for volume files
    kind: str  # "dicom" or "file"
    files: list[Path] = field(default_factory=list)  # absolute
    modality: str = ""
    manufacturer: str = ""
    scanner_model: str = ""
    kernel: str = ""
    description: str = ""
    slices: int = 0
    skip_reason: str = ""

    @property
    def key(self) -> str:
        """What identifies the series across runs and shards: its UID, else (volume files) its path."""
        return self.series_uid or self.path

    @property
    def scanner(self) -> str:
        return " ".join(t for t in (self.manufacturer, self.scanner_model) if t) or "unknown"

    @property
    def tags(self) -> dict[str, str]:
        """The tags source-kernel detection reads (``inference.detect_source`` accepts this dict)."""
        return {"Manufacturer": self.manufacturer, "ManufacturerModelName": self.scanner_model,
                "ConvolutionKernel": self.kernel}


@dataclass
class Discovery:
    series: list[CohortSeries]  # in a stable order (path, series UID)
    ignored_files: list[str]  # neither DICOM nor a volume file (relative paths)
    filtered_out: int = 0  # series left out by --include / --exclude


def volume_suffix(name: str) -> str:
    """The volume-file suffix of a file name ('.nii.gz', '.nrrd', ...), '' for any other name."""
    low = name.lower()
    return next((s for s in VOLUME_SUFFIXES if low.endswith(s)), "")


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel if rel else "."


def _dicom_series(root: Path) -> list[CohortSeries]:
    out = []
    for summary in list_dicom_series(root):
        # A UID seen in several folders (copies of one series) is one series per folder: the mirrored
        # output tree keeps folders, and read_dicom_files must never mix two copies.
        by_folder: dict[Path, list[Path]] = {}
        for f in summary.files:
            if not any(part.startswith(".") for part in f.relative_to(root).parts):
                by_folder.setdefault(f.parent, []).append(f)
        for folder, files in sorted(by_folder.items()):
            s = CohortSeries(_rel(folder, root), summary.series_uid, "dicom", files, summary.modality,
                             summary.manufacturer, summary.model, summary.kernel, summary.description,
                             len(files))
            try:
                ds = read_header(files[0])
            except Exception as exc:  # noqa: BLE001 - one unreadable header must not stop discovery
                s.skip_reason = f"unreadable header: {exc}"
            else:
                s.skip_reason = ct_image_reason(ds, summary.has_pixels, len(files))
                if not s.series_uid and not s.skip_reason:
                    s.skip_reason = "no SeriesInstanceUID"
            out.append(s)
    return out


def _volume_file(path: Path, root: Path) -> CohortSeries:
    """A volume file from its header only (SimpleITK reads no voxels here)."""
    import SimpleITK as sitk

    s = CohortSeries(_rel(path, root), "", "file", [path])
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        s.skip_reason = f"unreadable volume file ({lines[-1] if lines else exc})"
        return s
    meta = {k: reader.GetMetaData(k).strip() for k in reader.GetMetaDataKeys()}
    s.modality = meta.get("Modality", "")
    if s.modality.upper().startswith("MET_MOD_"):  # MetaImage spelling: MET_MOD_CT, MET_MOD_UNKNOWN
        s.modality = "" if s.modality.upper() == "MET_MOD_UNKNOWN" else s.modality[len("MET_MOD_"):]
    s.manufacturer = meta.get("Manufacturer", "")
    s.scanner_model = meta.get("ManufacturerModelName", "")
    s.kernel = meta.get("ConvolutionKernel", "")
    s.description = meta.get("SeriesDescription", "")
    size = reader.GetSize()
    s.slices = int(size[2]) if len(size) >= 3 else 1
    if s.modality and s.modality.upper() != "CT":
        s.skip_reason = f"modality {s.modality} is not CT"
    elif len(size) < 3 or (len(size) == 4 and size[3] != 1) or len(size) > 4:
        s.skip_reason = f"not a 3D volume (size {tuple(size)})"
    elif reader.GetNumberOfComponents() != 1:
        s.skip_reason = f"{reader.GetNumberOfComponents()} components per voxel (not a greyscale CT volume)"
    return s


def _selected(path: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatch(path, p) for p in include):
        return False
    return not any(fnmatch.fnmatch(path, p) for p in exclude)


def discover(root: str | os.PathLike, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Discovery:
    """Every series under ``root``: DICOM series (split by folder) and NIfTI / NRRD / MHA files.

    Non-CT series stay in the list with ``skip_reason`` set. ``include`` / ``exclude`` are glob patterns
    matched against each series' relative path (``*`` also crosses folders). Hidden files and folders
    (names starting with '.') are ignored. Raises InputError when ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"input root {root} is not a folder.")
    root = root.absolute()
    volume_files, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            (volume_files if volume_suffix(name) else others).append(Path(dirpath) / name)
    series = _dicom_series(root) if others else []
    dicom_files = {f for s in series for f in s.files}
    series += [_volume_file(p, root) for p in volume_files]
    # .raw / .img data files of .mhd / .nhdr headers belong to their header: not "ignored".
    ignored = [_rel(p, root) for p in others if p not in dicom_files
               and p.suffix.lower() not in (".raw", ".img", ".zraw") and not p.name.upper() == "DICOMDIR"]
    kept = [s for s in series if _selected(s.path, include, exclude)]
    kept.sort(key=lambda s: (s.path, s.series_uid))
    return Discovery(kept, ignored, len(series) - len(kept))
