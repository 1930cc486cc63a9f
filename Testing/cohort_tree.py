"""Small synthetic cohorts for the cohort tests and benchmark: DICOM series made from pydicom's CT_small.dcm
(a real GE CT slice, 128 x 128), plus the non-CT objects real studies hold (scouts, SR, dose screens)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

_TEMPLATE: list[pydicom.Dataset] = []


def _template() -> pydicom.Dataset:
    if not _TEMPLATE:
        _TEMPLATE.append(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
    return copy.deepcopy(_TEMPLATE[0])


def make_series(folder: Path, slices: int = 3, *, kernel: str = "STANDARD", prefix: str = "", seed: int = 0,
                image_type: Sequence[str] | None = None, modality: str = "CT", sop_class: str | None = None,
                pixels: bool = True) -> str:
    """Write one DICOM series of ``slices`` files into ``folder`` (which may hold others); returns its UID."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    rng = np.random.default_rng(seed)
    for k in range(slices):
        ds = _template()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ConvolutionKernel = kernel
        ds.Modality = modality
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-63.0, -63.0, 5.0 * k]
        if image_type is not None:
            ds.ImageType = list(image_type)
        if sop_class is not None:
            ds.SOPClassUID = sop_class
            ds.file_meta.MediaStorageSOPClassUID = sop_class
        noise = rng.integers(-20, 21, ds.pixel_array.shape)
        ds.PixelData = (ds.pixel_array.astype(np.int32) + noise).astype(ds.pixel_array.dtype).tobytes()
        if not pixels:
            del ds.PixelData
            for tag in ("Rows", "Columns"):
                delattr(ds, tag)
        ds.save_as(folder / f"{prefix}{k + 1:03d}.dcm", enforce_file_format=True)
    return uid


def make_nifti(path: Path, slices: int = 3, seed: int = 0) -> Path:
    """A CT-like NIfTI volume (no kernel tags)."""
    rng = np.random.default_rng(seed)
    vol = np.full((slices, 80, 80), -1000.0)
    vol[:, 15:65, 15:65] = 40.0
    img = sitk.GetImageFromArray((vol + rng.normal(0, 20, vol.shape)).astype(np.int16))
    img.SetSpacing((3.0, 3.0, 5.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def make_mixed_tree(root: Path) -> dict[str, str]:
    """The cohort of the tests; returns {name: series UID}. Layout:

    two/      two CT series (STANDARD and BONE) and a scout, all in one folder
    p1/ct/    one CT series (STANDARD)
    p2/sr/    a structured report (modality SR, no pixels)
    p2/dose/  a dose screen (modality CT, Secondary Capture)
    p3/vol.nii.gz  a CT volume file without tags
    p3/notes.txt   not a series
    """
    uids = {
        "std": make_series(root / "two", 3, kernel="STANDARD", prefix="a", seed=1),
        "bone": make_series(root / "two", 4, kernel="BONE", prefix="b", seed=2),
        "scout": make_series(root / "two", 1, prefix="s", image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        "p1": make_series(root / "p1" / "ct", 3, seed=3),
        "sr": make_series(root / "p2" / "sr", 1, modality="SR", pixels=False),
        "dose": make_series(root / "p2" / "dose", 1, sop_class="1.2.840.10008.5.1.4.1.1.7",
                            image_type=["DERIVED", "SECONDARY", "SCREEN SAVE"]),
    }
    make_nifti(root / "p3" / "vol.nii.gz")
    (root / "p3" / "notes.txt").write_text("not a series\n")
    return uids
