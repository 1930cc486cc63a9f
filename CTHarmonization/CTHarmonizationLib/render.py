"""Render the comparison views to a PNG offscreen (VTK; OSMesa when there is no display).

Each view's slice logic already blends its layers (window/level, colour table, difference overlay) into the
RGBA image the slice view shows; this module lays the four images out 2 x 2 in an offscreen render window,
outlines the ROI on the Before/After views and titles every view, so the PNG matches what Slicer displays.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import ensureEnginePath
from .compare import AFTER, AFTER_ZOOM, BEFORE, BEFORE_ZOOM, ComparisonViews

ensureEnginePath()
from TextureStarGANCore.fileio import atomic_output  # noqa: E402

__all__ = ["configureOffscreenRendering", "renderComparisonPNG"]

# (view, column, row); row 0 is the bottom of the window.
_GRID = ((BEFORE, 0, 1), (AFTER, 1, 1), (BEFORE_ZOOM, 0, 0), (AFTER_ZOOM, 1, 0))
_ROI_COLOR = (1.0, 0.85, 0.1)


def configureOffscreenRendering() -> None:
    """Use OSMesa for VTK render windows on Linux without a display (CI, servers, headless tests).

    Inside the Slicer application (or with a display) the platform's own OpenGL window is kept.
    """
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get(
        "WAYLAND_DISPLAY"
    ):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")


def _defaultTitles(views: ComparisonViews) -> dict[str, str]:
    def kernel(volume: Any, fallback: str) -> str:
        return volume.GetAttribute("CTHarmonization.TargetKernel") or fallback

    after = views.afterVolume
    source = after.GetAttribute("CTHarmonization.SourceKernel")
    before = f"Before: {views.beforeVolume.GetName()}" + (f" ({source})" if source else "")
    after_title = f"After: {kernel(after, after.GetName())}"
    return {BEFORE: before, AFTER: after_title, BEFORE_ZOOM: "Before, zoomed", AFTER_ZOOM: "After, zoomed"}


def _roiOutline(views: ComparisonViews, name: str) -> Any | None:
    """The ROI's in-plane rectangle in the view's XY pixel coordinates, as a polyline, or None."""
    import vtk

    roi = views.roiNode
    if roi is None:
        return None
    center = [0.0, 0.0, 0.0]
    roi.GetCenterWorld(center)
    sx, sy, _ = (abs(s) / 2 for s in roi.GetSize())
    rasToXy = vtk.vtkMatrix4x4()
    rasToXy.DeepCopy(views.sliceNodes[name].GetXYToRAS())
    rasToXy.Invert()
    points = vtk.vtkPoints()
    for dx, dy in ((-sx, -sy), (sx, -sy), (sx, sy), (-sx, sy), (-sx, -sy)):
        xy = rasToXy.MultiplyPoint((center[0] + dx, center[1] + dy, center[2], 1.0))
        points.InsertNextPoint(xy[0], xy[1], 0.5)  # just in front of the image plane
    line = vtk.vtkPolyLine()
    line.GetPointIds().SetNumberOfIds(points.GetNumberOfPoints())
    for i in range(points.GetNumberOfPoints()):
        line.GetPointIds().SetId(i, i)
    cells = vtk.vtkCellArray()
    cells.InsertNextCell(line)
    poly = vtk.vtkPolyData()
    poly.SetPoints(points)
    poly.SetLines(cells)
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputData(poly)
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*_ROI_COLOR)
    actor.GetProperty().SetLineWidth(2)
    return actor


def renderComparisonPNG(
    views: ComparisonViews,
    path: str | os.PathLike[str],
    *,
    cellSize: tuple[int, int] = (512, 512),
    titles: Mapping[str, str] | None = None,
) -> Path:
    """Write the four comparison views to `path` (PNG, written atomically) and return the path."""
    configureOffscreenRendering()
    import vtk

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"the comparison is saved as PNG: give a file name ending in .png, "
                         f"not '{path.name}'")
    if not path.parent.is_dir():
        raise ValueError(f"folder '{path.parent}' does not exist; choose an existing folder")
    names = {**_defaultTitles(views), **(titles or {})}
    width, height = cellSize
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(True)
    window.SetSize(2 * width, 2 * height)
    window.SetMultiSamples(0)
    for name, column, row in _GRID:
        logic = views.sliceLogics[name]
        connection = logic.GetImageDataConnection()
        connection.GetProducer().Update()
        image = connection.GetProducer().GetOutputDataObject(connection.GetIndex())
        renderer = vtk.vtkRenderer()
        renderer.SetViewport(column / 2, row / 2, (column + 1) / 2, (row + 1) / 2)
        renderer.SetBackground(0, 0, 0)
        actor = vtk.vtkImageActor()
        actor.GetMapper().SetInputData(image)
        actor.InterpolateOff()
        renderer.AddActor(actor)
        if name in (BEFORE, AFTER):
            outline = _roiOutline(views, name)
            if outline is not None:
                renderer.AddActor(outline)
        text = vtk.vtkTextActor()
        text.SetInput(names[name])
        text.GetTextProperty().SetFontSize(max(12, height // 28))
        text.GetTextProperty().SetColor(1, 1, 1)
        text.GetTextProperty().SetBackgroundColor(0, 0, 0)  # readable over bright images too
        text.GetTextProperty().SetBackgroundOpacity(0.6)
        text.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
        text.GetPositionCoordinate().SetValue(0.02, 0.03)
        renderer.AddViewProp(text)
        # Parallel camera showing exactly the slice image (its pixels are the view's XY coordinates).
        dims = image.GetDimensions()
        cx, cy = (dims[0] - 1) / 2, (dims[1] - 1) / 2
        camera = renderer.GetActiveCamera()
        camera.ParallelProjectionOn()
        camera.SetFocalPoint(cx, cy, 0)
        camera.SetPosition(cx, cy, 1000)
        camera.SetViewUp(0, 1, 0)
        imageAspect = dims[0] / max(dims[1], 1)
        viewAspect = width / height
        camera.SetParallelScale(dims[1] / 2 if imageAspect <= viewAspect else dims[0] / viewAspect / 2)
        renderer.ResetCameraClippingRange()
        window.AddRenderer(renderer)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetInputConnection(grab.GetOutputPort())
    try:
        with atomic_output(path) as temporary:
            writer.SetFileName(str(temporary))
            writer.Write()
            if writer.GetErrorCode() or not temporary.is_file():
                raise OSError(f"could not write '{path}' (VTK error code {writer.GetErrorCode()})")
    finally:
        window.Finalize()
    return path
