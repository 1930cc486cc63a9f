"""Scan a DICOM tree (e.g. LIDC-IDRI: patient / study / series) into CT series records and kernel domains.

Reading is ``TextureStarGANCore.volume_io`` and the generic DICOM checks (CT, axial, images, not a localizer
or dose report) are ``TextureStarGANCore.discovery``, shared with the cohort runner. This module adds what a
dataset needs on top: the patient, study and frame of reference of each series, the dataset's own checks
(enough slices, a kernel tag) with the reason when a series cannot be used, and the grouping of usable
series into domains by scanner + reconstruction kernel.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from TextureStarGANCore.discovery import MAX_OBLIQUE_DEG, ct_image_reason, is_dicom
from TextureStarGANCore.discovery import dicom_floats as _floats
from TextureStarGANCore.discovery import dicom_text as _text
from TextureStarGANCore.discovery import read_header as _header
from TextureStarGANCore.domains import DEFAULT_SIMULATED_DOMAINS, Domain, normalize_kernel
from TextureStarGANCore.volume_io import InputError, list_dicom_series

__all__ = ["SeriesRecord", "DomainGroup", "scan_tree", "group_domains", "MAX_OBLIQUE_DEG", "MIN_SLICES"]

MIN_SLICES = 3


@dataclass
class SeriesRecord:
    """One DICOM series found in the tree and whether it can be used (``skip_reason`` empty)."""

    patient: str
    study_uid: str
    series_uid: str
    frame_uid: str
    folder: str  # relative to the scanned root
    files: list[str]  # relative to the scanned root
    modality: str
    manufacturer: str
    scanner_model: str
    kernel: str  # normalized (upper case, multi-values joined by '\')
    rows: int = 0
    cols: int = 0
    pixel_spacing: tuple[float, float] = (0.0, 0.0)
    slice_thickness: float = 0.0
    gantry_tilt_deg: float = 0.0
    skip_reason: str = ""
    domain: str = ""
    origin: str = "real"  # "simulated" for series written by this project's simulator

    @property
    def num_slices(self) -> int:
        return len(self.files)

    @property
    def usable(self) -> bool:
        return not self.skip_reason

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = len(self.files)
        return d


@dataclass
class DomainGroup:
    """Series sharing scanner + kernel; ``included`` is False when it has too few patients."""

    domain: Domain
    series: list[SeriesRecord] = field(default_factory=list)
    included: bool = True
    note: str = ""

    @property
    def patients(self) -> list[str]:
        return sorted({s.patient for s in self.series})

    @property
    def num_slices(self) -> int:
        return sum(s.num_slices for s in self.series)


def _check(rec: SeriesRecord, ds, has_pixels: bool) -> str:
    """Why a series cannot be used as axial CT training data ('' when it can)."""
    reason = ct_image_reason(ds, has_pixels, rec.num_slices, min_slices=MIN_SLICES)
    if not reason and not rec.kernel:
        reason = "no ConvolutionKernel tag: the kernel domain cannot be told"
    return reason


def _series_records(folder: Path, root: Path, fallback_patient: str) -> list[SeriesRecord]:
    out = []
    for s in list_dicom_series(folder):
        try:
            ds = _header(s.files[0])
        except Exception as exc:  # noqa: BLE001 - one unreadable header must not stop the scan
            out.append(
                SeriesRecord(
                    fallback_patient,
                    "",
                    s.series_uid,
                    "",
                    str(s.files[0].parent.relative_to(root)),
                    [str(p.relative_to(root)) for p in s.files],
                    s.modality,
                    s.manufacturer,
                    s.model,
                    normalize_kernel(s.kernel),
                    skip_reason=f"unreadable header: {exc}",
                )
            )
            continue
        spacing = _floats(ds, "PixelSpacing")
        rec = SeriesRecord(
            patient=_text(ds, "PatientID") or fallback_patient,
            study_uid=_text(ds, "StudyInstanceUID"),
            series_uid=s.series_uid or f"NO-UID-{s.files[0].parent.name}",
            frame_uid=_text(ds, "FrameOfReferenceUID"),
            folder=str(s.files[0].parent.relative_to(root)),
            files=[str(p.relative_to(root)) for p in s.files],
            modality=_text(ds, "Modality"),
            manufacturer=_text(ds, "Manufacturer"),
            scanner_model=_text(ds, "ManufacturerModelName"),
            kernel=normalize_kernel(ds.get("ConvolutionKernel")),
            rows=int(ds.get("Rows", 0) or 0),
            cols=int(ds.get("Columns", 0) or 0),
            pixel_spacing=(spacing[0], spacing[1]) if len(spacing) == 2 else (0.0, 0.0),
            slice_thickness=(_floats(ds, "SliceThickness") or [0.0])[0],
            gantry_tilt_deg=(_floats(ds, "GantryDetectorTilt") or [0.0])[0],
            origin=origin_of(ds),
        )
        rec.skip_reason = _check(rec, ds, s.has_pixels)
        out.append(rec)
    return out


def origin_of(ds) -> str:
    """'simulated' for a series our simulator wrote (ImageComments, or the older InstitutionName mark)."""
    simulated = "SIMULATED" in _text(ds, "ImageComments").upper() or _text(ds, "InstitutionName").startswith(
        "Simulated ("
    )
    return "simulated" if simulated else "real"


def scan_tree(root: str | Path, progress: Callable[[int, int], None] | None = None) -> list[SeriesRecord]:
    """Every DICOM series under ``root`` with its usability verdict, in a stable order.

    Scans one top-level folder (a patient, in LIDC layout) at a time so progress can be reported;
    raises InputError when ``root`` is not a folder or holds no DICOM series at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"DICOM root {root} is not a folder; pass the folder that holds the patients.")
    entries = sorted(root.iterdir())
    # Only DICOM files count as loose (a simulated tree keeps simulation.json and nps/ beside the patients).
    loose_files = [p for p in entries if p.is_file() and not p.name.startswith(".") and is_dicom(p)]
    # Files directly in the root: one recursive scan of everything (cannot split by patient folder).
    units = [root] if loose_files else [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    records: list[SeriesRecord] = []
    for i, unit in enumerate(units):
        records.extend(_series_records(unit, root, unit.name if unit != root else "UNKNOWN"))
        if progress is not None:
            progress(i + 1, len(units))
    if not records:
        raise InputError(
            f"no DICOM series found under {root}; point --dicom-root to the folder that holds "
            "the patient folders (LIDC-IDRI layout: patient / study / series / *.dcm)."
        )
    records.sort(key=lambda r: (r.patient, r.study_uid, r.series_uid))
    return records


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _domain_name(manufacturer: str, model: str, kernel: str) -> str:
    # Compact, file-system safe, readable: "GE_LightSpeed_16_STANDARD".
    first = _clean(manufacturer).split(" ")[0] if manufacturer.strip() else "UNKNOWN"
    raw = f"{first}_{_clean(model) or 'UNKNOWN'}_{kernel.replace(chr(92), '+')}"
    return re.sub(r"[^A-Za-z0-9+.-]+", "_", raw).strip("_")


def group_domains(records: Sequence[SeriesRecord], min_patients: int = 1) -> list[DomainGroup]:
    """Group usable series by scanner + kernel into domains (sets ``record.domain``).

    A group matching one of the simulated default domains (manufacturer, model and kernel alike) takes
    its name and display name, so simulated data gets the DESIGN.md names (B30f, BONE, STANDARD). Ids
    are given to included groups in order: default domains first (by their id), then the others by slice
    count. Groups with fewer than ``min_patients`` patients are kept but marked ``included=False``.
    """
    by_key: dict[tuple[str, str, str], list[SeriesRecord]] = defaultdict(list)
    for r in records:
        if r.usable:
            key = (_clean(r.manufacturer).upper(), _clean(r.scanner_model).upper(), r.kernel)
            by_key[key].append(r)
    defaults = {
        (_clean(d.manufacturer).upper(), _clean(d.scanner_model).upper(), normalize_kernel(d.kernel)): d
        for d in DEFAULT_SIMULATED_DOMAINS
    }
    groups = []
    for key, series in by_key.items():
        d = defaults.get(key)
        first = series[0]
        if d is None:
            name = _domain_name(first.manufacturer, first.scanner_model, first.kernel)
            d = Domain(
                -1,
                name,
                f"{_clean(first.manufacturer)} {_clean(first.scanner_model)} / {first.kernel}",
                _clean(first.manufacturer),
                _clean(first.scanner_model),
                first.kernel,
            )
        g = DomainGroup(d, sorted(series, key=lambda r: (r.patient, r.series_uid)))
        if len(g.patients) < min_patients:
            g.included = False
            g.note = f"{len(g.patients)} patient(s) < --min-patients {min_patients}"
        groups.append(g)

    def order(g: DomainGroup):
        default_id = g.domain.id if g.domain.id >= 0 else math.inf
        return (not g.included, default_id, -g.num_slices, g.domain.name)

    groups.sort(key=order)
    # Names must be unique (two models that clean to the same text): suffix the later ones.
    seen: dict[str, int] = {}
    next_id = 0
    for g in groups:
        name = g.domain.name
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 1
        new_id = next_id if g.included else -1
        if g.included:
            next_id += 1
        g.domain = Domain(
            max(new_id, 0) if g.included else 0,
            name,
            g.domain.display_name,
            g.domain.manufacturer,
            g.domain.scanner_model,
            g.domain.kernel,
        )
        for r in g.series:
            r.domain = name if g.included else ""
            if not g.included:
                r.skip_reason = f"domain {name} excluded: {g.note}"
    return groups
