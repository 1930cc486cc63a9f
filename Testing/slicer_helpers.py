"""Helpers for the headless Slicer tests: real MRML scenes (slicer-core), volume nodes, a DICOM index.

The module's code must run inside Slicer too, so the tests build scenes the way Slicer does: an application
logic, the colour logic (default colour tables) and the markups logic on one `vtkMRMLScene`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

# No display on CI: VTK must pick OSMesa before the first render window exists.
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")

import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util.numpy_support import get_vtk_array_type, numpy_to_vtk, vtk_to_numpy  # noqa: E402

# The bundled default model (kernel transfer) has these domains; the StarGAN v2 model v1 it replaced (domains
# B30f, BONE, STANDARD and six fitted transfer filters in its card) is kept for what only it has.
DEFAULT_MODEL_KERNELS = [
    "SIEMENS_B30f", "SIEMENS_B40f", "SIEMENS_B50f", "SIEMENS_B70f", "SIEMENS_I30f_3",
    "GE_SOFT", "GE_STANDARD", "GE_LUNG", "GE_BONE", "GE_HISPEED_STDPLUS",
    "PHILIPS_B", "PHILIPS_C", "PHILIPS_L", "PHILIPS_UB_IDOSE", "PHILIPS_YA",
]
V1_MODEL_PATH = (Path(__file__).resolve().parents[1] / "Training" / "baseline_models" / "stargan_v1" /
                 "stargan_v1.safetensors")


def offscreen_rendering_available() -> bool:
    """VTK can render without a display when Mesa's OSMesa library is installed (Debian: libosmesa6)."""
    import ctypes.util

    return bool(os.environ.get("DISPLAY")) or ctypes.util.find_library("OSMesa") is not None


def new_scene() -> tuple[Any, Any, list[Any]]:
    """(scene, application logic, logics to keep alive) like Slicer sets them up at startup."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app)
    colors.SetMRMLScene(scene)
    markups = slicer.vtkSlicerMarkupsLogic()
    markups.SetMRMLApplicationLogic(app)
    markups.SetMRMLScene(scene)
    sequences = slicer.vtkSlicerSequencesLogic()
    sequences.SetMRMLApplicationLogic(app)
    sequences.SetMRMLScene(scene)
    return scene, app, [colors, markups, sequences]


def matrix(array: np.ndarray) -> Any:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def matrix_array(m: Any) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def add_volume(scene: Any, voxels: np.ndarray, *, ijk_to_ras: np.ndarray | None = None,
               spacing: tuple[float, float, float] = (0.7, 0.7, 2.5), name: str = "CT",
               class_name: str = "vtkMRMLScalarVolumeNode") -> Any:
    """A volume node holding `voxels` (slices, rows, columns[, components]) with the given geometry."""
    voxels = np.ascontiguousarray(voxels)
    node = scene.AddNewNodeByClass(class_name, name)
    image = vtk.vtkImageData()
    shape = voxels.shape
    image.SetDimensions(shape[2], shape[1], shape[0])
    components = shape[3] if voxels.ndim == 4 else 1
    scalars = numpy_to_vtk(voxels.reshape(-1, components) if components > 1 else voxels.ravel(), deep=True,
                           array_type=get_vtk_array_type(voxels.dtype))
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)
    if ijk_to_ras is None:
        ijk_to_ras = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        ijk_to_ras[:3, 3] = (shape[2] * spacing[0] / 2, shape[1] * spacing[1] / 2, -shape[0] * spacing[2] / 2)
    node.SetIJKToRASMatrix(matrix(ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    return node


def voxels_of(node: Any) -> np.ndarray:
    image = node.GetImageData()
    i, j, k = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i).copy()


def node_from_ct_volume(scene: Any, volume: Any, name: str = "CT") -> Any:
    """A volume node from an engine CTVolume (LPS direction/origin converted to RAS)."""
    direction = np.array(volume.direction, dtype=float).reshape(3, 3)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = direction * np.array(volume.spacing)[None, :]
    ijk_to_ras[:3, 3] = volume.origin
    ijk_to_ras[:2, :] *= -1  # LPS -> RAS
    # Slicer's DICOM import stores the rescaled HU; unsigned stored pixels (e.g. uint16 with intercept -1024)
    # become a signed volume, as HU below 0 do not fit the stored type.
    dtype = np.dtype(volume.stored_dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        if volume.hu.min() < info.min or volume.hu.max() > info.max:
            dtype = np.dtype(np.int16)
    return add_volume(scene, volume.hu.astype(dtype), ijk_to_ras=ijk_to_ras, name=name)


def body_phantom(slices: int = 8, size: int = 128, seed: int = 0) -> np.ndarray:
    """A CT-like int16 volume in HU: air, a soft-tissue ellipse with noise, two bones, a lung."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size - 0.5
    body = (x / 0.42) ** 2 + (y / 0.32) ** 2 < 1
    bone = ((x - 0.18) ** 2 + y**2 < 0.05**2) | ((x + 0.18) ** 2 + y**2 < 0.05**2)
    lung = ((x / 0.12) ** 2 + ((y + 0.05) / 0.15) ** 2) < 1
    out = np.full((slices, size, size), -1000.0)
    for k in range(slices):
        s = np.where(body, 40.0, -1000.0)
        s[lung] = -820.0
        s[bone] = 900.0
        s[body] += rng.normal(0, 25, size=int(body.sum()))
        out[k] = s
    return np.round(out).astype(np.int16)


class FolderDicomDatabase:
    """The two calls of Slicer's DICOM database the module uses, answered from DICOM files with pydicom."""

    def __init__(self, files: Iterable[Path]) -> None:
        import pydicom

        self._files: dict[str, str] = {}
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            self._files[str(ds.SOPInstanceUID)] = str(path)

    @property
    def uids(self) -> list[str]:
        return list(self._files)

    def fileForInstance(self, uid: str) -> str:
        return self._files.get(uid, "")

    def fileValue(self, path: str, tag: str) -> str:
        import pydicom

        group, element = (int(part, 16) for part in tag.split(","))
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        item = ds.get((group, element))
        if item is None or item.value is None:
            return ""
        value = item.value
        if isinstance(value, (list, tuple)) or item.VM > 1:
            return "\\".join(str(v) for v in value)
        return str(value)
