"""Before/after comparison views: a custom layout, linked slice views and ROI-driven zoomed views.

Layout (custom id `LAYOUT_ID`): Before | After on top, linked in view group `MAIN_VIEW_GROUP`; below them
Before zoom | After zoom, linked in view group `ZOOM_VIEW_GROUP`, whose field of view follows a markups ROI.
Slice nodes come from the layout description through `vtkMRMLLayoutLogic` (the same code path Slicer's
layout manager uses), so the views are identical headless and in the application; slice logics are the
application's own when Slicer created them, or are created here for a plain scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "LAYOUT_ID",
    "MAIN_VIEW_GROUP",
    "VIEW_NAMES",
    "ZOOM_VIEW_GROUP",
    "ComparisonViews",
    "layoutDescription",
    "makeDifferenceVolume",
    "setupComparison",
]

LAYOUT_ID = 5301  # custom layouts use ids above Slicer's built-in ones
BEFORE, AFTER, BEFORE_ZOOM, AFTER_ZOOM = "CTHBefore", "CTHAfter", "CTHBeforeZoom", "CTHAfterZoom"
VIEW_NAMES = (BEFORE, AFTER, BEFORE_ZOOM, AFTER_ZOOM)
# Groups other than 0 keep the comparison views from linking with the standard Red/Yellow/Green views.
MAIN_VIEW_GROUP = 1
ZOOM_VIEW_GROUP = 2
_VIEWS = {
    BEFORE: ("B", "#4A90D9", MAIN_VIEW_GROUP),
    AFTER: ("A", "#E8A33D", MAIN_VIEW_GROUP),
    BEFORE_ZOOM: ("b", "#8AB6E6", ZOOM_VIEW_GROUP),
    AFTER_ZOOM: ("a", "#F0C27F", ZOOM_VIEW_GROUP),
}
DIFFERENCE_RANGE_HU = 100.0  # the difference overlay saturates at +/- this many HU
DEFAULT_VIEW_SIZE = (512, 512)


def _viewXml(name: str) -> str:
    label, color, group = _VIEWS[name]
    return (
        f'<item><view class="vtkMRMLSliceNode" singletontag="{name}">'
        '<property name="orientation" action="default">Axial</property>'
        f'<property name="viewlabel" action="default">{label}</property>'
        f'<property name="viewcolor" action="default">{color}</property>'
        f'<property name="viewgroup" action="default">{group}</property>'
        "</view></item>"
    )


def layoutDescription() -> str:
    """Layout XML: Before | After above Before zoom | After zoom."""
    rows = (
        f'<item splitSize="600"><layout type="horizontal">{_viewXml(BEFORE)}{_viewXml(AFTER)}'
        "</layout></item>",
        f'<item splitSize="400"><layout type="horizontal">{_viewXml(BEFORE_ZOOM)}{_viewXml(AFTER_ZOOM)}'
        "</layout></item>",
    )
    return '<layout type="vertical" split="true">' + "".join(rows) + "</layout>"


@dataclass
class ComparisonViews:
    """The comparison's nodes and logics; keeps the ROI observers alive until `cleanup()`."""

    scene: Any
    beforeVolume: Any
    afterVolume: Any
    roiNode: Any
    sliceNodes: dict[str, Any]
    sliceLogics: dict[str, Any]
    compositeNodes: dict[str, Any]
    differenceVolume: Any = None
    previousLayout: int | None = None
    layoutNode: Any = None
    _keepAlive: list[Any] = field(default_factory=list, repr=False)
    _observations: list[tuple[Any, int]] = field(default_factory=list, repr=False)

    def updateZoomFromROI(self, caller: Any = None, event: Any = None) -> None:
        """Centre both zoomed views on the ROI and fit their field of view to its in-plane size."""
        if self.roiNode is None:
            return
        center = [0.0, 0.0, 0.0]
        self.roiNode.GetCenterWorld(center)
        size = [abs(s) for s in self.roiNode.GetSize()]
        for name in (BEFORE_ZOOM, AFTER_ZOOM):
            node = self.sliceNodes[name]
            width, height = node.GetDimensions()[:2]
            aspect = height / width if width > 0 and height > 0 else 1.0
            # Square pixels: the smaller side follows the view's aspect ratio, and the ROI always fits.
            fovX = max(size[0], size[1] / aspect, 1e-3)
            wasModifying = node.StartModify()
            node.SetFieldOfView(fovX, fovX * aspect, node.GetFieldOfView()[2])
            node.JumpSliceByCentering(*center)
            node.EndModify(wasModifying)

    def setDifferenceVisible(self, visible: bool, opacity: float = 0.6) -> None:
        """Show (after - before) over the After views, creating the difference volume on first use."""
        if visible and self.differenceVolume is None:
            self.differenceVolume = makeDifferenceVolume(self.beforeVolume, self.afterVolume)
        for name in (AFTER, AFTER_ZOOM):
            composite = self.compositeNodes[name]
            composite.SetForegroundVolumeID(self.differenceVolume.GetID() if visible else None)
            composite.SetForegroundOpacity(opacity if visible else 0.0)

    def cleanup(self, restoreLayout: bool = False) -> None:
        """Stop following the ROI (and optionally go back to the layout shown before)."""
        for obj, tag in self._observations:
            obj.RemoveObserver(tag)
        self._observations.clear()
        if restoreLayout and self.layoutNode is not None and self.previousLayout is not None:
            self.layoutNode.SetViewArrangement(self.previousLayout)


def _layoutNode(scene: Any, keepAlive: list[Any]) -> Any:
    node = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if node is not None:
        return node
    # A plain scene has no layout yet: the layout logic creates the node and, like in Slicer, the views.
    import slicer

    layoutLogic = slicer.vtkMRMLLayoutLogic()
    layoutLogic.SetMRMLScene(scene)
    keepAlive.append(layoutLogic)
    return layoutLogic.GetLayoutNode()


def _sliceLogic(appLogic: Any, scene: Any, sliceNode: Any, keepAlive: list[Any]) -> Any:
    logic = appLogic.GetSliceLogicByLayoutName(sliceNode.GetLayoutName())
    if logic is not None:
        return logic  # created by Slicer's layout manager for the view widget
    import slicer
    import vtk

    logics = appLogic.GetSliceLogics()
    if logics is None:
        logics = vtk.vtkCollection()
        appLogic.SetSliceLogics(logics)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(appLogic)
    logic.SetSliceNode(sliceNode)
    logics.AddItem(logic)  # the slice-link logic finds views through the application logic's slice logics
    keepAlive.append(logic)
    return logic


def _defaultRoi(scene: Any, volume: Any) -> Any:
    """An ROI over the central quarter of the volume's field of view, on its middle slice."""
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    center = [(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)]
    size = [(bounds[1] - bounds[0]) / 4, (bounds[3] - bounds[2]) / 4, max(1.0, (bounds[5] - bounds[4]) / 8)]
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", scene.GenerateUniqueName("Zoom region"))
    roi.SetCenter(center)
    roi.SetSize(size)
    return roi


def setupComparison(
    beforeVolume: Any,
    afterVolume: Any,
    roiNode: Any = None,
    *,
    appLogic: Any,
    showDifference: bool = False,
    viewSize: tuple[int, int] | None = None,
) -> ComparisonViews:
    """Show `beforeVolume` and `afterVolume` side by side, linked, with a zoomed pair following `roiNode`.

    `appLogic`: Slicer's application logic (`slicer.app.applicationLogic()`) or, headless, a
    `vtkSlicerApplicationLogic` set on the scene. `roiNode=None` creates an ROI over the volume's centre.
    `viewSize` sets the views' pixel size where no view widget does (headless rendering).
    """
    scene = beforeVolume.GetScene()
    if scene is None or afterVolume.GetScene() is not scene:
        raise ValueError("the before and after volumes must be in the same MRML scene")
    keepAlive: list[Any] = []
    layoutNode = _layoutNode(scene, keepAlive)
    previous = layoutNode.GetViewArrangement()
    if layoutNode.IsLayoutDescription(LAYOUT_ID):
        layoutNode.SetLayoutDescription(LAYOUT_ID, layoutDescription())
    else:
        layoutNode.AddLayoutDescription(LAYOUT_ID, layoutDescription())
    layoutNode.SetViewArrangement(LAYOUT_ID)  # Slicer's layout manager creates the view widgets here

    sliceNodes, logics, composites = {}, {}, {}
    for name in VIEW_NAMES:
        node = scene.GetSingletonNode(name, "vtkMRMLSliceNode")
        if node is None:
            raise RuntimeError(f"the comparison layout did not create the slice view '{name}'")
        if viewSize is not None:
            node.SetDimensions(int(viewSize[0]), int(viewSize[1]), 1)
        elif appLogic.GetSliceLogicByLayoutName(name) is None:
            node.SetDimensions(*DEFAULT_VIEW_SIZE, 1)
        logic = _sliceLogic(appLogic, scene, node, keepAlive)
        composite = logic.GetSliceCompositeNode()
        volume = beforeVolume if name in (BEFORE, BEFORE_ZOOM) else afterVolume
        composite.SetBackgroundVolumeID(volume.GetID())
        composite.SetForegroundVolumeID(None)
        composite.SetLabelVolumeID(None)
        composite.SetLinkedControl(True)
        composite.SetHotLinkedControl(True)
        sliceNodes[name], logics[name], composites[name] = node, logic, composite
    for name in (BEFORE, AFTER):
        logics[name].FitSliceToAll()

    if roiNode is None:
        roiNode = _defaultRoi(scene, beforeVolume)
        roiNode.CreateDefaultDisplayNodes()
        display = roiNode.GetDisplayNode()
        if display is not None:  # our own ROI: draw it on the full views only, not over the zoomed ones
            display.SetViewNodeIDs([sliceNodes[BEFORE].GetID(), sliceNodes[AFTER].GetID()])
    views = ComparisonViews(
        scene=scene, beforeVolume=beforeVolume, afterVolume=afterVolume, roiNode=roiNode,
        sliceNodes=sliceNodes, sliceLogics=logics, compositeNodes=composites,
        previousLayout=previous if previous != LAYOUT_ID else None, layoutNode=layoutNode,
        _keepAlive=keepAlive,
    )
    import slicer
    import vtk

    for event in (vtk.vtkCommand.ModifiedEvent, slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
                  slicer.vtkMRMLTransformableNode.TransformModifiedEvent):
        views._observations.append((roiNode, roiNode.AddObserver(event, views.updateZoomFromROI)))
    views.updateZoomFromROI()
    if showDifference:
        views.setDifferenceVisible(True)
    return views


def _differenceColors(scene: Any) -> Any:
    """A blue-transparent-red colour table: small differences stay see-through over the CT."""
    name = "CTHarmonization difference"
    existing = scene.GetFirstNodeByName(name)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    import slicer

    table = slicer.vtkMRMLColorTableNode()
    table.SetName(name)
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    table.SetHideFromEditors(True)
    for i in range(256):
        t = i / 255.0 * 2.0 - 1.0  # -1 (after darker) .. +1 (after brighter)
        alpha = min(1.0, abs(t) * 2.0)
        rgb = (1.0, 1.0 - abs(t), 1.0 - abs(t)) if t > 0 else (1.0 - abs(t), 1.0 - abs(t), 1.0)
        table.SetColor(i, f"{t * DIFFERENCE_RANGE_HU:+.0f} HU", *rgb, alpha)
    scene.AddNode(table)
    return table


def makeDifferenceVolume(beforeVolume: Any, afterVolume: Any) -> Any:
    """A new volume node `after - before` (float HU) with the after volume's geometry."""
    import slicer
    from vtk.util.numpy_support import vtk_to_numpy

    def voxels(node: Any) -> np.ndarray:
        image = node.GetImageData()
        i, j, k = image.GetDimensions()
        return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i).astype(np.float32)

    before, after = voxels(beforeVolume), voxels(afterVolume)
    if before.shape != after.shape:
        raise ValueError(
            f"cannot show a difference: the volumes have different sizes {before.shape} and {after.shape}"
        )
    scene = afterVolume.GetScene()
    node = scene.AddNewNodeByClass(
        "vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(f"{afterVolume.GetName()} difference")
    )
    import vtk

    matrix = vtk.vtkMatrix4x4()
    afterVolume.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveTransformNodeID(afterVolume.GetTransformNodeID())
    slicer.util.updateVolumeFromArray(node, after - before)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(2 * DIFFERENCE_RANGE_HU, 0.0)
    display.SetAndObserveColorNodeID(_differenceColors(scene).GetID())
    return node
