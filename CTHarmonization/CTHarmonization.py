"""CT Harmonization: translate a CT volume to the look of another reconstruction kernel (3D Slicer module).

GUI only; the work is done by `CTHarmonizationLib` (MRML logic, tested headless with slicer-core) and the
`TextureStarGANCore` engine. The engine runs in a separate PythonSlicer process polled by a QTimer, so
Slicer stays responsive and the run can be cancelled; torch and the other packages are installed on first
use.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import ctk  # noqa: F401  (registers ctk widgets used by the .ui file)
import qt
import slicer
import vtk
from CTHarmonizationLib import dependencies, ensureEnginePath
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

ensureEnginePath()

DETECT_SOURCE = ""  # sourceKernel value meaning "read it from the DICOM database"
POLL_INTERVAL_MS = 200


#
# CTHarmonization
#
class CTHarmonization(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "CT Harmonization"
        self.parent.categories = ["Filtering"]
        self.parent.dependencies = []
        self.parent.contributors = ["CT Harmonization contributors"]
        self.parent.helpText = """
Harmonizes CT reconstruction kernels with a texture-aware StarGAN v2: the input volume is translated, slice
by slice, to the look of the chosen target kernel (for example GE BONE to Siemens B30f), so that texture
(radiomic) features agree across scanners. Choose the input, the target kernel and press Harmonize; the
result is a new volume with the input's geometry, shown next to the input in linked views with a zoomed
region of interest that follows the ROI. Research use only, not for diagnosis.
"""
        self.parent.acknowledgementText = """
Method: texture-aware StarGAN v2 for CT kernel harmonization. Built on 3D Slicer and PyTorch.
"""


#
# Parameter node
#
@parameterNodeWrapper
class CTHarmonizationParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    referenceVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    lastOutputVolume: vtkMRMLScalarVolumeNode
    zoomRegion: vtkMRMLMarkupsROINode
    modelPath: str = ""  # empty: the bundled default model
    targetKernel: str = ""
    sourceKernel: str = DETECT_SOURCE
    device: str = "auto"
    showDifference: bool = False


#
# CTHarmonizationWidget
#
class CTHarmonizationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._model = None
        self._run = None
        self._tracker = None
        self._outputRequest = None
        self._comparison = None
        self._updatingCombos = False

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTHarmonization.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CTHarmonizationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.progressBar.setVisible(False)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.defaultModelButton.connect("clicked(bool)", self.onDefaultModel)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)
        self.ui.targetKernelComboBox.connect("currentIndexChanged(int)", self.onCombosChanged)
        self.ui.sourceKernelComboBox.connect("currentIndexChanged(int)", self.onCombosChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onCombosChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.showComparisonButton.connect("clicked(bool)", self.onShowComparison)
        self.ui.saveComparisonButton.connect("clicked(bool)", self.onSaveComparison)
        self.ui.showDifferenceCheckBox.connect("toggled(bool)", self.onShowDifference)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollWorker)

        self.initializeParameterNode()
        self.refreshDevices()
        self.loadModelCard()

    def cleanup(self) -> None:
        if self._run is not None:
            self._run.cancel()
        self._timer.stop()
        if self._comparison is not None:
            self._comparison.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self._run.cancel()
        if self._comparison is not None:
            self._comparison.cleanup()
            self._comparison = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updatingCombos = True
            self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelPath
            self._updatingCombos = False
        self._updateButtons()

    # ------------------------------------------------------------------ model, kernels, devices
    def refreshDevices(self) -> None:
        """Fill the device list; with torch installed the labels name the GPU that was found."""
        devices = [("auto", "Auto (GPU if available)"), ("cuda", "GPU (CUDA)"), ("cpu", "CPU")]
        if dependencies.torchInstalled():
            try:
                from CTHarmonizationLib import logic

                devices = logic.availableDevices()
            except Exception:  # a broken torch install: keep the generic list, Harmonize will say why
                logging.exception("CTHarmonization: could not query devices")
        current = self._parameterNode.device if self._parameterNode else "auto"
        self._fillCombo(self.ui.deviceComboBox, devices, current)

    def _fillCombo(self, combo, items, current) -> None:
        self._updatingCombos = True
        combo.clear()
        for key, text in items:
            combo.addItem(text, key)
        index = max(0, combo.findData(current))
        combo.setCurrentIndex(index)
        self._updatingCombos = False
        self.onCombosChanged()

    def onDefaultModel(self) -> None:
        self.ui.modelPathLineEdit.currentPath = ""
        self.onModelPathChanged("")

    def onModelPathChanged(self, path) -> None:
        if self._updatingCombos or self._parameterNode is None:
            return
        self._parameterNode.modelPath = str(path or "")
        self.loadModelCard()

    def loadModelCard(self) -> None:
        """Load the chosen model (needs torch) and show its card; fill the kernel lists from its domains."""
        self._model = None
        path = self._parameterNode.modelPath if self._parameterNode else ""
        if not dependencies.torchInstalled():
            self.ui.modelCardLabel.text = (
                "PyTorch is not installed yet. Press Harmonize to install the required packages; the model's "
                "kernels are listed afterwards."
            )
            self._fillKernels([])
            return
        from CTHarmonizationLib import logic

        from TextureStarGANCore.model_file import DEFAULT_MODEL_PATH

        if not path and not DEFAULT_MODEL_PATH.exists():
            self.ui.modelCardLabel.text = ("This build has no bundled default model: choose a .safetensors "
                                           "model file above.")
            self._fillKernels([])
            return
        try:
            self._model = logic.loadModel(path or None)
        except Exception as exc:
            self.ui.modelCardLabel.text = f"<b>Model not usable:</b> {exc}"
            self._fillKernels([])
            return
        self.ui.modelCardLabel.text = logic.modelCardSummary(self._model).replace("\n", "<br>")
        self._fillKernels(self._model.domains)

    def _fillKernels(self, domains) -> None:
        node = self._parameterNode
        targets = [(d.name, f"{d.name}: {d.display_name}") for d in domains]
        self._fillCombo(self.ui.targetKernelComboBox, targets, node.targetKernel if node else "")
        sources = [(DETECT_SOURCE, "Detect from DICOM"), *targets] if targets else []
        self._fillCombo(self.ui.sourceKernelComboBox, sources, node.sourceKernel if node else DETECT_SOURCE)
        self.onInputChanged()

    def onCombosChanged(self, *args) -> None:
        if self._updatingCombos or self._parameterNode is None:
            return
        # An empty list (model not loaded yet) must not overwrite a choice saved in the scene.
        if self.ui.targetKernelComboBox.count:
            self._parameterNode.targetKernel = self.ui.targetKernelComboBox.currentData or ""
        if self.ui.sourceKernelComboBox.count:
            self._parameterNode.sourceKernel = self.ui.sourceKernelComboBox.currentData or DETECT_SOURCE
        if self.ui.deviceComboBox.count:
            self._parameterNode.device = self.ui.deviceComboBox.currentData or "auto"

    def onInputChanged(self, *args) -> None:
        """Show the kernel the DICOM database reports for the input, and whether the model knows it."""
        node = self.ui.inputSelector.currentNode()
        text = ""
        if node is not None and self._model is not None:
            from CTHarmonizationLib import logic

            from TextureStarGANCore.domains import detect_domain

            tags = logic.dicomTagsOfNode(node)
            kernel = tags.get("ConvolutionKernel")
            if not kernel:
                text = "No DICOM kernel information: choose the source kernel."
            else:
                domain = detect_domain(self._model.domains, tags.get("Manufacturer"),
                                       tags.get("ManufacturerModelName"), kernel)
                scanner = " ".join(filter(None, (tags.get("Manufacturer"),
                                                 tags.get("ManufacturerModelName"))))
                text = (f"DICOM: kernel {kernel} ({scanner}) = model kernel {domain.name}" if domain else
                        f"DICOM: kernel {kernel} ({scanner}) is not one of the model's kernels: choose the "
                        "closest source kernel.")
        self.ui.detectedKernelLabel.text = text

    # ------------------------------------------------------------------ run
    def _running(self) -> bool:
        return self._run is not None

    def _updateButtons(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if self._running():
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop after the current batch of slices; nothing is added."
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = "Harmonize"
        ready = node is not None and node.inputVolume is not None
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = "Harmonize the input volume" if ready else "Select an input CT volume"
        hasResult = node is not None and node.lastOutputVolume is not None and node.inputVolume is not None
        self.ui.showComparisonButton.enabled = hasResult
        self.ui.saveComparisonButton.enabled = self._comparison is not None

    def onApplyButton(self) -> None:
        if self._running():
            self._run.cancel()
            self.ui.statusLabel.text = "Cancelling after the current batch of slices..."
            self.ui.applyButton.enabled = False
            return
        try:
            with slicer.util.tryWithErrorDisplay("Could not install the required packages.", waitCursor=True):
                self._ensureDependencies()
        except Exception:  # already shown to the user
            return
        if self._model is None:
            self.refreshDevices()
            self.loadModelCard()
            if self._model is None:
                slicer.util.errorDisplay("The model could not be loaded:\n\n" + self.ui.modelCardLabel.text)
                return
        from CTHarmonizationLib import logic

        node = self._parameterNode
        try:
            job = logic.prepareHarmonization(
                node.inputVolume, node.targetKernel, node.sourceKernel or None, node.modelPath or None,
                node.device, referenceNode=node.referenceVolume,
            )
        except logic.HarmonizationInputError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="CT Harmonization")
            return
        self._outputRequest = node.outputVolume
        self._startWorker(job)

    def _ensureDependencies(self) -> None:
        missing = dependencies.missingRequirements(dependencies.readRequirements())
        if dependencies.torchInstalled() and not missing:
            return
        self.ui.statusLabel.text = "Installing the required Python packages (first use only)..."
        slicer.app.processEvents()
        try:
            dependencies.ensureDependencies()
        except dependencies.DependencyError as exc:
            self.ui.statusLabel.text = str(exc)
            raise
        self.ui.statusLabel.text = "Packages installed."
        self.refreshDevices()

    def _startWorker(self, job) -> None:
        from CTHarmonizationLib import logic, worker

        self._tracker = logic.ProgressTracker()
        self._run = worker.SubprocessRun(job)
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setRange(0, 0)  # busy until the first batch reports
        self.ui.statusLabel.text = (f"Harmonizing {job.inputName}: {job.source.name} -> {job.target.name} "
                                    f"on {job.device}...")
        self._timer.start()
        self._updateButtons()

    def onPollWorker(self) -> None:
        self._tracker(*self._run.progress())
        done, total, elapsed, _ = self._tracker.snapshot()
        if total > 0:
            self.ui.progressBar.setRange(0, total)
            self.ui.progressBar.setValue(done)
        self.ui.statusLabel.text = self._tracker.statusText()
        if self._run.running():
            return
        self._timer.stop()
        run, self._run = self._run, None
        job, error = run.job, None
        try:
            run.finish()
        except Exception as exc:  # shown by _finish
            error = exc
        self.ui.progressBar.setVisible(False)
        self._updateButtons()
        self._finish(job, error, elapsed)

    def _finish(self, job, error, elapsed) -> None:
        from CTHarmonizationLib import logic

        if error is not None:
            if isinstance(error, logic.HarmonizationCancelled):
                self.ui.statusLabel.text = "Cancelled. Nothing was added to the scene."
            elif isinstance(error, logic.HarmonizationOutOfMemoryError):
                self.ui.statusLabel.text = "The GPU ran out of memory."
                question = f"{error}\n\nRun on the CPU now?"
                if slicer.util.confirmYesNoDisplay(question, windowTitle="CT Harmonization"):
                    job.device = "cpu"
                    self.ui.deviceComboBox.setCurrentIndex(self.ui.deviceComboBox.findData("cpu"))
                    self._startWorker(job)
            elif isinstance(error, logic.HarmonizationInputError):
                self.ui.statusLabel.text = "The input cannot be harmonized."
                slicer.util.errorDisplay(str(error), windowTitle="CT Harmonization")
            else:
                self.ui.statusLabel.text = f"Harmonization failed: {error}"
                logging.error("CTHarmonization failed", exc_info=(type(error), error, error.__traceback__))
                slicer.util.errorDisplay(f"Harmonization failed: {error}", windowTitle="CT Harmonization")
            return
        try:
            with slicer.util.tryWithErrorDisplay("Could not create the output volume.", waitCursor=True):
                output = logic.finishHarmonization(job, slicer.mrmlScene, self._outputRequest)
        except Exception:  # already shown to the user
            self.ui.statusLabel.text = "Could not create the output volume."
            return
        self._parameterNode.lastOutputVolume = output
        self.ui.statusLabel.text = (
            f"Done in {elapsed:.0f} s: '{output.GetName()}' ({job.source.name} -> {job.target.name}, "
            f"{job.runInfo.get('device', job.device)}, {job.runInfo.get('style', 'domain')} style)."
        )
        self.onShowComparison()

    # ------------------------------------------------------------------ comparison
    def showComparison(self) -> None:
        node = self._parameterNode
        if node.inputVolume is None or node.lastOutputVolume is None:
            return
        if self._comparison is not None:
            self._comparison.cleanup()
        self._comparison = self.logic.showComparison(node.inputVolume, node.lastOutputVolume, node.zoomRegion,
                                                     showDifference=node.showDifference)
        node.zoomRegion = self._comparison.roiNode
        self._updateButtons()

    def onShowComparison(self) -> None:
        try:
            with slicer.util.tryWithErrorDisplay("Could not show the comparison.", waitCursor=True):
                self.showComparison()
        except Exception:  # already shown to the user
            logging.exception("CTHarmonization: comparison failed")

    def onShowDifference(self, visible) -> None:
        if self._comparison is not None:
            with slicer.util.tryWithErrorDisplay("Could not show the difference.", waitCursor=True):
                self._comparison.setDifferenceVisible(bool(visible))

    def onSaveComparison(self) -> None:
        if self._comparison is None:
            return
        name = self._parameterNode.lastOutputVolume.GetName()
        default = os.path.join(slicer.app.defaultScenePath, f"{name}.png")
        path = qt.QFileDialog.getSaveFileName(None, "Save comparison", default, "PNG images (*.png)")
        if not path:
            return
        from CTHarmonizationLib import render

        with slicer.util.tryWithErrorDisplay("Could not save the comparison.", waitCursor=True):
            render.renderComparisonPNG(self._comparison, path)
            self.ui.statusLabel.text = f"Comparison saved to {path}"


#
# CTHarmonizationLogic
#
class CTHarmonizationLogic(ScriptedLoadableModuleLogic):
    """Scripting entry point; the work is in CTHarmonizationLib (usable without this class)."""

    def getParameterNode(self):
        return CTHarmonizationParameterNode(super().getParameterNode())

    def harmonize(self, inputNode, targetKernel, sourceKernel=None, modelPath=None, device="auto",
                  outputNode=None, progressCallback=None, cancelEvent=None, **kwargs):
        """Blocking harmonization (scripts, tests); see CTHarmonizationLib.logic.harmonizeVolumeNode."""
        dependencies.ensureDependencies()
        from CTHarmonizationLib import logic

        return logic.harmonizeVolumeNode(inputNode, targetKernel, sourceKernel, modelPath, device, outputNode,
                                         progressCallback, cancelEvent, **kwargs)

    def showComparison(self, beforeVolume, afterVolume, roiNode=None, showDifference=False):
        from CTHarmonizationLib import compare

        return compare.setupComparison(beforeVolume, afterVolume, roiNode,
                                       appLogic=slicer.app.applicationLogic(), showDifference=showDifference)


#
# CTHarmonizationTest
#
class CTHarmonizationTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: the bundled sample volume, harmonized on CPU with the bundled default model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_HarmonizeBundledSample()
        self.setUp()
        self.test_BadInputIsRefused()

    def _sampleFolder(self) -> Path:
        import TextureStarGANCore

        return Path(TextureStarGANCore.__file__).resolve().parent / "samples" / "sim_bone_ct"

    def _loadSample(self):
        folder = self._sampleFolder()
        suffixes = (".nrrd", ".nii.gz", ".nhdr", ".mha")
        volumes = sorted(p for p in folder.iterdir() if p.name.endswith(suffixes))
        if volumes:
            return slicer.util.loadVolume(str(volumes[0])), "BONE"
        # A DICOM series: import it through the DICOM database so the kernel is read from its tags.
        from DICOMLib import DICOMUtils

        with DICOMUtils.TemporaryDICOMDatabase() as db:
            DICOMUtils.importDicom(str(folder), db)
            nodeIDs = DICOMUtils.loadPatientByUID(db.patients()[0])
            node = slicer.mrmlScene.GetNodeByID(nodeIDs[0])
            # Read the kernel now: the temporary database goes away at the end of this block.
            from CTHarmonizationLib import logic

            kernel = logic.dicomTagsOfNode(node, db).get("ConvolutionKernel")
        return node, kernel

    def test_HarmonizeBundledSample(self):
        self.delayDisplay("Harmonizing the bundled sample on CPU with the default model")
        dependencies.ensureDependencies(confirm=lambda message: True)
        from CTHarmonizationLib import logic

        node, kernel = self._loadSample()
        self.assertIsNotNone(node)
        self.assertTrue(kernel)
        before = slicer.util.arrayFromVolume(node).copy()
        progress = []
        start = time.monotonic()
        output = logic.harmonizeVolumeNode(node, "B30f", sourceKernel=kernel, device="cpu",
                                           progressCallback=lambda d, t: progress.append((d, t)))
        seconds = time.monotonic() - start
        logging.info(f"CTHarmonization self-test: {before.shape} harmonized in {seconds:.1f} s")
        after = slicer.util.arrayFromVolume(output)
        self.assertEqual(after.shape, before.shape)
        self.assertTrue((slicer.util.arrayFromVolume(node) == before).all(), "input voxels changed")
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(a)
        output.GetIJKToRASMatrix(b)
        for r in range(4):
            for c in range(4):
                self.assertAlmostEqual(a.GetElement(r, c), b.GetElement(r, c), places=6)
        self.assertEqual(output.GetAttribute("CTHarmonization.TargetKernel"), "B30f")
        self.assertEqual(progress[-1][0], before.shape[0])
        # A smoother kernel: less high-frequency content inside the body than the BONE input.
        body = before > -500
        import numpy as np

        def roughness(v):
            return float(np.abs(np.diff(v.astype(np.float32), axis=2))[body[:, :, 1:]].mean())

        self.assertLess(roughness(after), roughness(before))
        views = CTHarmonizationLogic().showComparison(node, output)
        offsets = [views.sliceLogics[name].GetSliceOffset() for name in ("CTHBefore", "CTHAfter")]
        self.assertAlmostEqual(offsets[0], offsets[1])
        views.cleanup()
        self.delayDisplay("Test passed")

    def test_BadInputIsRefused(self):
        dependencies.ensureDependencies(confirm=lambda message: True)
        from CTHarmonizationLib import logic

        label = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
        with self.assertRaises(logic.HarmonizationInputError):
            logic.harmonizeVolumeNode(label, "B30f", sourceKernel="BONE", device="cpu")
        self.delayDisplay("Test passed")
