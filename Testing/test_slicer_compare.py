"""Before/after comparison on a real MRML scene: layout, linked views, ROI-driven zoom, PNG rendering."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core is needed for the Slicer module tests")

from slicer_helpers import (  # noqa: E402
    add_volume,
    body_phantom,
    new_scene,
    offscreen_rendering_available,
    voxels_of,
)

from CTHarmonization.CTHarmonizationLib import compare, render  # noqa: E402

B, A, BZ, AZ = compare.VIEW_NAMES


@pytest.fixture()
def comparison():
    scene, app, keep = new_scene()
    before_voxels = body_phantom(slices=10, size=128, seed=1)
    # A stand-in "after" with visibly different texture: smoothed noise in the body (no model needed here;
    # the logic tests cover the model).
    after_voxels = before_voxels.copy()
    body = before_voxels > -500
    after_voxels[body] = (before_voxels[body] * 0.3 + 40 * 0.7).astype(np.int16)
    before = add_volume(scene, before_voxels, spacing=(0.8, 0.8, 2.0), name="CT BONE")
    after = add_volume(scene, after_voxels, spacing=(0.8, 0.8, 2.0), name="CT harmonized to B30f")
    for node in (before, after):
        node.GetDisplayNode().SetAutoWindowLevel(False)
        node.GetDisplayNode().SetWindowLevel(400, 40)
    after.SetAttribute("CTHarmonization.TargetKernel", "B30f")
    views = compare.setupComparison(before, after, appLogic=app, viewSize=(256, 256))
    yield views
    views.cleanup()
    del keep


def test_layout_description_is_valid_xml_with_two_view_groups():
    root = ET.fromstring(compare.layoutDescription())
    views = root.findall(".//view")
    assert [v.get("singletontag") for v in views] == list(compare.VIEW_NAMES)
    groups = [v.find("property[@name='viewgroup']").text for v in views]
    assert groups == ["1", "1", "2", "2"]


def test_views_show_before_and_after_in_linked_groups(comparison):
    nodes, composites = comparison.sliceNodes, comparison.compositeNodes
    assert comparison.layoutNode.GetViewArrangement() == compare.LAYOUT_ID
    assert [nodes[n].GetViewGroup() for n in (B, A, BZ, AZ)] == [1, 1, 2, 2]
    assert all(nodes[n].GetOrientation() == "Axial" for n in nodes)
    assert composites[B].GetBackgroundVolumeID() == comparison.beforeVolume.GetID()
    assert composites[BZ].GetBackgroundVolumeID() == comparison.beforeVolume.GetID()
    assert composites[A].GetBackgroundVolumeID() == comparison.afterVolume.GetID()
    assert composites[AZ].GetBackgroundVolumeID() == comparison.afterVolume.GetID()
    assert all(composites[n].GetLinkedControl() and composites[n].GetHotLinkedControl() for n in composites)
    # The ROI the comparison created is drawn on the full views only.
    display = comparison.roiNode.GetDisplayNode()
    assert [display.GetNthViewNodeID(i) for i in range(display.GetNumberOfViewNodeIDs())] == [
        nodes[B].GetID(), nodes[A].GetID()]


def test_before_slice_offset_moves_after_view_only(comparison):
    logics = comparison.sliceLogics
    zoom_offset = logics[BZ].GetSliceOffset()
    before = logics[B]
    target = before.GetSliceOffset() + 6.0
    before.StartSliceOffsetInteraction()
    before.SetSliceOffset(target)
    before.EndSliceOffsetInteraction()
    assert logics[B].GetSliceOffset() == pytest.approx(target)
    assert logics[A].GetSliceOffset() == pytest.approx(target)
    assert logics[BZ].GetSliceOffset() == pytest.approx(zoom_offset)  # other view group: not linked
    # And back from the After view (links work both ways).
    after = logics[A]
    after.StartSliceOffsetInteraction()
    after.SetSliceOffset(target - 10.0)
    after.EndSliceOffsetInteraction()
    assert logics[B].GetSliceOffset() == pytest.approx(target - 10.0)


def _center(node):
    m = node.GetSliceToRAS()
    return np.array([m.GetElement(i, 3) for i in range(3)])


def test_roi_drives_both_zoomed_views(comparison):
    roi, nodes = comparison.roiNode, comparison.sliceNodes
    main_fov = nodes[B].GetFieldOfView()
    roi.SetSize(20.0, 12.0, 4.0)
    for name in (BZ, AZ):
        fov = nodes[name].GetFieldOfView()
        assert fov[0] == pytest.approx(20.0) and fov[1] == pytest.approx(20.0)  # square view: the ROI fits
    roi.SetCenter(-10.0, 8.0, 3.0)
    for name in (BZ, AZ):
        np.testing.assert_allclose(_center(nodes[name]), (-10.0, 8.0, 3.0), atol=1e-6)
    roi.SetSize(40.0, 60.0, 4.0)
    for name in (BZ, AZ):
        assert nodes[name].GetFieldOfView()[1] == pytest.approx(60.0)
    assert nodes[B].GetFieldOfView() == pytest.approx(main_fov)  # the main views keep their zoom
    comparison.cleanup()
    roi.SetSize(10.0, 10.0, 4.0)
    assert nodes[BZ].GetFieldOfView()[1] == pytest.approx(60.0)  # no longer following after cleanup


def test_difference_overlay_is_after_minus_before(comparison):
    comparison.setDifferenceVisible(True)
    diff = comparison.differenceVolume
    expected = voxels_of(comparison.afterVolume).astype(np.float32) - voxels_of(comparison.beforeVolume)
    np.testing.assert_array_equal(voxels_of(diff), expected)
    assert comparison.compositeNodes[A].GetForegroundVolumeID() == diff.GetID()
    assert comparison.compositeNodes[B].GetForegroundVolumeID() is None
    comparison.setDifferenceVisible(False)
    assert comparison.compositeNodes[A].GetForegroundVolumeID() is None


def test_rendered_png_shows_different_before_and_after(comparison, tmp_path):
    from PIL import Image

    if not offscreen_rendering_available():
        pytest.skip("no display and no OSMesa: install libosmesa6 (.ci/setup does when run as root)")

    comparison.roiNode.SetCenter(20.0, 0.0, 0.0)
    comparison.roiNode.SetSize(30.0, 30.0, 4.0)
    path = render.renderComparisonPNG(comparison, tmp_path / "comparison.png", cellSize=(256, 256))
    assert path.is_file() and not list(tmp_path.glob(".*tmp*"))
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape == (512, 512, 3)
    cells = {B: image[:256, :256], A: image[:256, 256:], BZ: image[256:, :256], AZ: image[256:, 256:]}
    for name, cell in cells.items():
        assert cell.std() > 10, f"{name} view is blank"
    # Harmonized texture: the After views are smoother than the Before views in the body.
    assert np.abs(cells[B] - cells[A]).mean() > 3
    assert np.abs(cells[BZ] - cells[AZ]).mean() > 3
    grey = lambda c: c.mean(axis=2)  # noqa: E731
    assert np.abs(np.diff(grey(cells[BZ]), axis=1)).mean() > np.abs(np.diff(grey(cells[AZ]), axis=1)).mean()
    # The ROI is outlined in yellow on the main views only.
    yellow = lambda c: ((c[..., 0] > 200) & (c[..., 1] > 170) & (c[..., 2] < 80)).sum()  # noqa: E731
    assert yellow(cells[B]) > 50 and yellow(cells[A]) > 50
    assert yellow(cells[BZ]) == 0


def test_render_refuses_a_bad_path(comparison, tmp_path):
    with pytest.raises(ValueError, match="ending in .png"):
        render.renderComparisonPNG(comparison, tmp_path / "comparison.jpg")
    with pytest.raises(ValueError, match="does not exist"):
        render.renderComparisonPNG(comparison, tmp_path / "missing" / "comparison.png")
