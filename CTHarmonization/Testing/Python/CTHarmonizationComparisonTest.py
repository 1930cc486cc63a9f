"""Comparison views inside the Slicer application: layout manager, view widgets, links and ROI zoom.

Registered with `slicer_add_python_unittest`; runs in Slicer's Python (`slicer.app` available). The same
functions are tested headless on a plain MRML scene by Testing/test_slicer_compare.py.
"""

import os
import tempfile
import unittest

import numpy as np
import slicer
from CTHarmonizationLib import compare, render


class CTHarmonizationComparisonTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()
        rng = np.random.default_rng(0)
        y, x = np.mgrid[:96, :96] / 96 - 0.5
        body = (x / 0.4) ** 2 + (y / 0.3) ** 2 < 1
        before = np.where(body, 40.0, -1000.0)[None].repeat(8, axis=0)
        before = before + body * rng.normal(0, 30, before.shape)
        after = np.where(body, 40.0, -1000.0)[None].repeat(8, axis=0) + body * rng.normal(0, 5, before.shape)
        ijkToRas = np.diag([-0.8, -0.8, 2.0, 1.0])
        self.before = slicer.util.addVolumeFromArray(before.astype(np.int16), ijkToRas, "before")
        self.after = slicer.util.addVolumeFromArray(after.astype(np.int16), ijkToRas, "after")

    def test_views_are_linked_and_follow_the_roi(self):
        views = compare.setupComparison(self.before, self.after, appLogic=slicer.app.applicationLogic())
        layoutManager = slicer.app.layoutManager()
        self.assertEqual(layoutManager.layout, compare.LAYOUT_ID)
        for name in compare.VIEW_NAMES:
            widget = layoutManager.sliceWidget(name)
            self.assertIsNotNone(widget, f"view {name} not created by the layout manager")
            self.assertIs(widget.sliceLogic(), views.sliceLogics[name])
        slicer.app.processEvents()

        before, after = views.sliceLogics[compare.BEFORE], views.sliceLogics[compare.AFTER]
        target = before.GetSliceOffset() + 4.0
        before.StartSliceOffsetInteraction()
        before.SetSliceOffset(target)
        before.EndSliceOffsetInteraction()
        self.assertAlmostEqual(after.GetSliceOffset(), target, places=4)

        views.roiNode.SetSize(20.0, 20.0, 4.0)
        views.roiNode.SetCenter(5.0, -5.0, 6.0)
        for name in (compare.BEFORE_ZOOM, compare.AFTER_ZOOM):
            fov = views.sliceNodes[name].GetFieldOfView()
            self.assertGreaterEqual(min(fov[0], fov[1]), 20.0 - 1e-6)
            self.assertLess(min(fov[0], fov[1]), 20.0 + 1e-3)

        path = os.path.join(tempfile.mkdtemp(), "comparison.png")
        render.renderComparisonPNG(views, path, cellSize=(200, 200))
        self.assertTrue(os.path.getsize(path) > 1000)
        views.cleanup(restoreLayout=True)
