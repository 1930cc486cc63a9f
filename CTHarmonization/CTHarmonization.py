"""CT Harmonization: translate a CT volume to the look of another reconstruction kernel (3D Slicer module).

GUI only; the work is done by `CTHarmonizationLib` (MRML logic, tested headless with slicer-core) and the
`TextureStarGANCore` engine. The engine runs in a separate PythonSlicer process polled by a QTimer, so
Slicer stays responsive and the run can be cancelled; torch and the other packages are installed on first
use. Supported: Slicer 5.6 and later (Python 3.9 and later; see Testing/test_bundled_python39.py).
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
from CTHarmonizationLib.job import METHOD_FILTER, METHOD_MODEL
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
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
        self.parent.title = _("CT Harmonization")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Filtering")]
        self.parent.dependencies = []
        self.parent.contributors = ["CT Harmonization contributors"]
        self.parent.helpText = _("""
Harmonizes CT reconstruction kernels: the input volume is translated, slice by slice, to the look of the
chosen target kernel (for example Philips L to Philips B, or GE BONE to Siemens B30f), so that texture
(radiomic) features agree across scanners. The bundled model is a kernel-transfer network (a learned MTF
transfer plus a residual, at the input's own pixel size; it estimates an unknown source kernel from the
image); texture-aware StarGAN v2 model files can be chosen too. Choose the input, the target kernel and press
Harmonize; the result is a new volume with the input's geometry, shown next to the input in linked views with
a zoomed region of interest that follows the ROI. Method 'Linear transfer filter' applies a linear filter for
the kernel pair instead of the network (CPU, no GPU needed): the model card's fitted filter, or a
kernel-transfer model's own linear part. Research use only, not for diagnosis.
""")
        self.parent.acknowledgementText = _("""
Methods: a kernel-transfer network (learned MTF transfer + residual) and a texture-aware StarGAN v2 for CT
kernel harmonization. Built on 3D Slicer and PyTorch.
""")


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
    method: str = METHOD_MODEL  # or METHOD_FILTER: the model file's linear transfer filter for the pair
    device: str = "auto"
    showDifference: bool = False


#
# CTHarmonizationWidget
#
class CTHarmonizationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: binds the .ui to the parameter node and runs jobs through CTHarmonizationLib.worker.

    Everything that can be tested headless (input checks, the job, the child process) lives in
    CTHarmonizationLib; this class only moves values between widgets, parameter node and those functions.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._model = None
        self._run = None
        self._cancelRequested = False
        self._tracker = None
        self._outputRequest = None
        self._comparison = None
        self._updatingGui = False
        self._shownModelPath = ""
        self._missing = []

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
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onCombosChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onCombosChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.showComparisonButton.connect("clicked(bool)", self.onShowComparison)
        self.ui.saveComparisonButton.connect("clicked(bool)", self.onSaveComparison)
        self.ui.showDifferenceCheckBox.connect("toggled(bool)", self.onShowDifference)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollWorker)

        self._fillMethods(None)
        self._missing = dependencies.missingDependencies()  # before the parameter node may load a model
        self.initializeParameterNode()
        self.refreshDependencies()

    def cleanup(self) -> None:
        self._abortRun(_("Stopped: Slicer is closing."))
        if self._comparison is not None:
            self._comparison.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Keep the parameter node: a run that ends while another module is shown still records its output.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.updateGuiFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self._abortRun(_("Stopped: the scene was closed. Nothing was added."))
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
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.updateGuiFromParameterNode)
        self._parameterNode = parameterNode
        if self._parameterNode:
            # Node selectors and the check box bind through the .ui (SlicerParameterName); the model path and
            # the kernel/device combos hold data keys, so they are bound here, both ways.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                             self.updateGuiFromParameterNode)
        self.updateGuiFromParameterNode()

    # ------------------------------------------------------------------ parameter node <-> GUI
    def updateGuiFromParameterNode(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is not None:
            previous, self._updatingGui = self._updatingGui, True
            try:
                # Compared with what was last shown, not the line edit's text (ctkPathLineEdit normalizes it).
                if node.modelPath != self._shownModelPath:
                    self._shownModelPath = node.modelPath
                    self.ui.modelPathLineEdit.currentPath = node.modelPath
                    self.loadModelCard()  # another model: other kernels
                self._select(self.ui.targetKernelComboBox, node.targetKernel, kernel=True)
                self._select(self.ui.sourceKernelComboBox, node.sourceKernel, kernel=True)
                self._select(self.ui.methodComboBox, node.method)
                self._select(self.ui.deviceComboBox, node.device)
                self.ui.deviceComboBox.enabled = node.method != METHOD_FILTER  # the filter runs on the CPU
            finally:
                self._updatingGui = previous
        self._updateButtons()

    def _select(self, combo, key, kernel=False) -> None:
        """Show `key` in the combo; a key the list lacks (e.g. saved with another model) shows as empty.
        `kernel`: a kernel named otherwise than the model's domain (e.g. 'B30f', saved in a scene made with an
        older model) shows as the domain it resolves to, as the harmonization itself resolves it."""
        index = combo.findData(key)
        if index < 0 and key and kernel:
            index = combo.findData(self._resolveKernel(key))
        combo.setCurrentIndex(index)

    def _resolveKernel(self, key):
        """The name of the model domain `key` names (name, kernel or id), or None."""
        if self._model is None:
            return None
        from TextureStarGANCore.domains import UnknownDomainError, resolve_domain

        try:
            return resolve_domain(self._model.domains, key).name
        except UnknownDomainError:
            return None

    def onCombosChanged(self, *args) -> None:
        if self._updatingGui or self._parameterNode is None:
            return
        for combo, name in ((self.ui.targetKernelComboBox, "targetKernel"),
                            (self.ui.sourceKernelComboBox, "sourceKernel"),
                            (self.ui.methodComboBox, "method"),
                            (self.ui.deviceComboBox, "device")):
            # Only the changed value: each write makes updateGuiFromParameterNode show all values again.
            if combo.currentIndex >= 0 and combo.currentData != getattr(self._parameterNode, name):
                setattr(self._parameterNode, name, combo.currentData)

    def _fillCombo(self, combo, items) -> None:
        """Replace the items; the selection is then taken from the parameter node (never the first item)."""
        previous, self._updatingGui = self._updatingGui, True
        try:
            combo.clear()
            for key, text in items:
                combo.addItem(text, key)
        finally:
            self._updatingGui = previous
        self.updateGuiFromParameterNode()

    # ------------------------------------------------------------------ dependencies, model, kernels, devices
    def refreshDependencies(self) -> None:
        """Check (without importing them) the packages the engine needs; fill model and devices if present."""
        self._missing = dependencies.missingDependencies()
        if self._missing:
            self.ui.modelCardLabel.text = _(
                "Required Python packages are missing ({packages}). Press 'Install dependencies'; the "
                "model's kernels are listed afterwards."
            ).format(packages=", ".join(self._missing))
            self._fillKernels([])
        else:
            self.refreshDevices()
            self.loadModelCard()
        self._updateButtons()

    def refreshDevices(self) -> None:
        """Fill the device list; the labels name the GPU that was found."""
        devices = [("auto", _("Auto (GPU if available)")), ("cuda", _("GPU (CUDA)")), ("cpu", _("CPU"))]
        if not self._missing:
            try:
                from CTHarmonizationLib import logic

                devices = logic.availableDevices()
            except Exception:  # a broken torch install: keep the generic list, Harmonize will say why
                logging.exception("CTHarmonization: could not query devices")
        self._fillCombo(self.ui.deviceComboBox, devices)

    def onDefaultModel(self) -> None:
        self.ui.modelPathLineEdit.currentPath = ""
        self.onModelPathChanged("")

    def onModelPathChanged(self, path) -> None:
        if self._updatingGui or self._parameterNode is None:
            return
        self._shownModelPath = self._parameterNode.modelPath = str(path or "")
        self.loadModelCard()

    def loadModelCard(self) -> None:
        """Load the chosen model and show its card; fill the kernel lists from its domains."""
        self._model = None
        if self._missing:
            return
        path = self._parameterNode.modelPath if self._parameterNode else ""
        try:
            from CTHarmonizationLib import logic

            self._model = logic.loadModel(path or None)
            text = logic.modelCardSummary(self._model).replace("\n", "<br>")
        except Exception as exc:  # a missing bundled model, a broken file or install: say so, no traceback
            logging.exception("CTHarmonization: model not usable")
            self._model = None
            text = _("<b>Model not usable:</b> {error}").format(error=exc)
        self.ui.modelCardLabel.text = text
        self._fillMethods(self._model)
        self._fillKernels(self._model.domains if self._model is not None else [])

    def _fillMethods(self, model) -> None:
        """The method choice, named for the model kind: its network, where its linear filter comes from."""
        if model is not None and model.preprocessing is None:  # kernel transfer: no canvas
            items = [(METHOD_MODEL, _("Network model (kernel transfer: MTF transfer + residual)")),
                     (METHOD_FILTER, _("Linear transfer filter (the model's own linear part, CPU)"))]
        elif model is not None:
            items = [(METHOD_MODEL, _("Network model (texture-aware StarGAN)")),
                     (METHOD_FILTER, _("Linear transfer filter (fitted per kernel pair, CPU)"))]
        else:
            items = [(METHOD_MODEL, _("Network model")), (METHOD_FILTER, _("Linear transfer filter (CPU)"))]
        self._fillCombo(self.ui.methodComboBox, items)

    def _fillKernels(self, domains) -> None:
        targets = [(d.name, f"{d.name}: {d.display_name}") for d in domains]
        self._fillCombo(self.ui.targetKernelComboBox, targets)
        sources = [(DETECT_SOURCE, _("Detect from DICOM")), *targets] if targets else []
        self._fillCombo(self.ui.sourceKernelComboBox, sources)
        self.onInputChanged()

    def onInputChanged(self, *args) -> None:
        """Show the kernel the DICOM database reports for the input, and whether the model knows it."""
        node = self.ui.inputSelector.currentNode()
        text = ""
        if node is not None and self._model is not None:
            from CTHarmonizationLib import logic

            text = logic.describeDetectedKernel(node, self._model.domains,
                                                canEstimate=self._model.preprocessing is None)
        self.ui.detectedKernelLabel.text = text

    # ------------------------------------------------------------------ run
    def _running(self) -> bool:
        return self._run is not None

    def _updateButtons(self, caller=None, event=None) -> None:
        node = self._parameterNode
        button = self.ui.applyButton
        if self._running():
            button.text = _("Cancel")
            button.toolTip = _("Stop after the current batch of slices; nothing is added.")
            button.enabled = not self._cancelRequested
            return
        if self._missing:
            button.text = _("Install dependencies")
            button.toolTip = _("Install the Python packages the module needs: ") + ", ".join(self._missing)
            button.enabled = True
            return
        button.text = _("Harmonize")
        problem = None
        if node is None or node.inputVolume is None:
            problem = _("Select an input CT volume")
        elif self._model is None:
            problem = _("Choose a usable model file")
        elif not node.targetKernel or self.ui.targetKernelComboBox.currentIndex < 0:
            problem = _("Choose the target kernel")  # none, or one the model does not know
        button.enabled = problem is None
        button.toolTip = problem or _("Harmonize the input volume")
        hasResult = node is not None and node.lastOutputVolume is not None and node.inputVolume is not None
        self.ui.showComparisonButton.enabled = hasResult
        self.ui.saveComparisonButton.enabled = self._comparison is not None

    def onApplyButton(self) -> None:
        if self._running():
            self._run.cancel()
            self._cancelRequested = True
            self.ui.statusLabel.text = _("Cancelling after the current batch of slices...")
            self._updateButtons()
            return
        if self._missing:
            self.installDependencies()
            return  # the user now chooses the target kernel among the model's, then presses Harmonize
        from CTHarmonizationLib import logic

        node = self._parameterNode
        try:
            job = logic.prepareHarmonization(
                node.inputVolume, node.targetKernel, node.sourceKernel or None, node.modelPath or None,
                node.device, referenceNode=node.referenceVolume, method=node.method,
            )
        except logic.HarmonizationInputError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("CT Harmonization"))
            return
        self._outputRequest = node.outputVolume
        self._startWorker(job)

    def installDependencies(self) -> None:
        self.ui.statusLabel.text = _("Installing the required Python packages (first use only)...")
        slicer.app.processEvents()
        try:
            message = _("Could not install the required packages.")
            with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
                dependencies.ensureDependencies()
        except Exception as exc:  # already shown to the user
            self.ui.statusLabel.text = str(exc)
        self.refreshDependencies()
        if not self._missing:
            self.ui.statusLabel.text = _("Packages installed. Choose the target kernel, then press "
                                         "Harmonize.")

    def _startWorker(self, job) -> None:
        from CTHarmonizationLib import logic, worker

        try:
            with slicer.util.tryWithErrorDisplay(_("Could not start the harmonization."), waitCursor=True):
                self._run = worker.SubprocessRun(job)
        except Exception:  # already shown to the user
            return
        self._cancelRequested = False
        self._tracker = logic.ProgressTracker()
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setRange(0, 0)  # busy until the first batch reports
        if job.method == METHOD_FILTER:
            how = _("with the linear transfer filter")
        else:
            how = _("on {device}").format(device=job.device)
        self.ui.statusLabel.text = _("Harmonizing {name}: {source} -> {target} {how}...").format(
            name=job.inputName, target=job.target.name, how=how,
            source=job.source.name if job.source is not None else _("source estimated from the image"))
        self._timer.start()
        self._updateButtons()

    def _abortRun(self, message) -> None:
        """Stop a run at once (scene closed, Slicer exits): no result is wanted any more."""
        self._timer.stop()
        run, self._run = self._run, None
        if run is None:
            return
        run.abort()  # kills the child process tree and deletes the job folder
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = message
        self._updateButtons()

    def onPollWorker(self) -> None:
        if self._run is None:
            self._timer.stop()
            return
        self._tracker(*self._run.progress())
        done, total, elapsed, _left = self._tracker.snapshot()
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

        title = _("CT Harmonization")
        if isinstance(error, logic.HarmonizationCancelled):
            self.ui.statusLabel.text = _("Cancelled. Nothing was added to the scene.")
        elif isinstance(error, logic.HarmonizationOutOfMemoryError):
            self.ui.statusLabel.text = _("The GPU ran out of memory.")
            if slicer.util.confirmYesNoDisplay(f"{error}\n\n" + _("Run on the CPU now?"), windowTitle=title):
                job.device = "cpu"
                if self._parameterNode is not None:
                    self._parameterNode.device = "cpu"
                self._startWorker(job)
        elif isinstance(error, logic.HarmonizationInputError):
            self.ui.statusLabel.text = _("The input cannot be harmonized.")
            slicer.util.errorDisplay(str(error), windowTitle=title)
        elif error is not None:
            self.ui.statusLabel.text = _("Harmonization failed: {error}").format(error=error)
            logging.error("CTHarmonization failed", exc_info=(type(error), error, error.__traceback__))
            slicer.util.errorDisplay(self.ui.statusLabel.text, windowTitle=title)
        if error is not None:
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Could not create the output volume."), waitCursor=True):
                output = logic.finishHarmonization(job, slicer.mrmlScene, self._outputRequest)
        except Exception:  # already shown to the user
            self.ui.statusLabel.text = _("Could not create the output volume.")
            return
        if self._parameterNode is not None:
            self._parameterNode.lastOutputVolume = output
        if job.method == METHOD_FILTER:
            how = _("linear transfer filter")
        elif job.runInfo.get("kind") == "kernel_transfer":
            how = _("{device}, kernel transfer, source {found}").format(
                device=job.runInfo.get("device", job.device), found=job.sourceFoundBy)
        else:
            how = _("{device}, {style} style").format(device=job.runInfo.get("device", job.device),
                                                       style=job.runInfo.get("style", "domain"))
        self.ui.statusLabel.text = _("Done in {seconds} s: '{name}' ({source} -> {target}, {how}).").format(
            seconds=f"{elapsed:.0f}", name=output.GetName(), source=job.source.name, target=job.target.name,
            how=how)
        self.onShowComparison()

    # ------------------------------------------------------------------ comparison
    def showComparison(self) -> None:
        node = self._parameterNode
        if node is None or node.inputVolume is None or node.lastOutputVolume is None:
            return
        if self._comparison is not None:
            self._comparison.cleanup()
        self._comparison = self.logic.showComparison(node.inputVolume, node.lastOutputVolume, node.zoomRegion,
                                                     showDifference=node.showDifference)
        node.zoomRegion = self._comparison.roiNode
        self._updateButtons()

    def onShowComparison(self) -> None:
        try:
            with slicer.util.tryWithErrorDisplay(_("Could not show the comparison."), waitCursor=True):
                self.showComparison()
        except Exception:  # already shown to the user
            logging.exception("CTHarmonization: comparison failed")

    def onShowDifference(self, visible) -> None:
        if self._comparison is not None:
            with slicer.util.tryWithErrorDisplay(_("Could not show the difference."), waitCursor=True):
                self._comparison.setDifferenceVisible(bool(visible))

    def onSaveComparison(self) -> None:
        if self._comparison is None or self._parameterNode is None:
            return
        name = self._parameterNode.lastOutputVolume.GetName()
        default = os.path.join(slicer.app.defaultScenePath, f"{name}.png")
        path = qt.QFileDialog.getSaveFileName(None, _("Save comparison"), default, _("PNG images (*.png)"))
        if not path:
            return
        from CTHarmonizationLib import render

        with slicer.util.tryWithErrorDisplay(_("Could not save the comparison."), waitCursor=True):
            render.renderComparisonPNG(self._comparison, path)
            self.ui.statusLabel.text = _("Comparison saved to {path}").format(path=path)


#
# CTHarmonizationLogic
#
class CTHarmonizationLogic(ScriptedLoadableModuleLogic):
    """Scripting entry point; the work is in CTHarmonizationLib (usable without this class)."""

    def getParameterNode(self):
        return CTHarmonizationParameterNode(super().getParameterNode())

    def harmonize(self, inputNode, targetKernel, sourceKernel=None, modelPath=None, device="auto",
                  outputNode=None, progressCallback=None, cancelEvent=None, **kwargs):
        """Blocking harmonization in this process (scripts); see CTHarmonizationLib.logic.harmonizeVolumeNode.
        Installs missing packages first (asks the user)."""
        if dependencies.missingDependencies():
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
    """In-Slicer self-test: the bundled sample volume, harmonized on CPU with the bundled default model in a
    PythonSlicer child process, as the GUI does. Skips (never downloads torch) when packages are missing."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        missing = dependencies.missingDependencies()
        if missing:
            # Installing torch is a multi-GB download: a test must not do it unasked.
            message = ("CTHarmonization self-test SKIPPED: missing Python packages " + ", ".join(missing)
                       + ". Press 'Install dependencies' in the module (or install the PyTorch extension and "
                       "run PyTorch Utils), then run the test again.")
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.setUp()
        self.test_HarmonizeBundledSampleInWorkerProcess()
        self.setUp()
        self.test_BadInputIsRefused()

    def _sampleFolder(self) -> Path:
        import TextureStarGANCore

        return Path(TextureStarGANCore.__file__).resolve().parent / "samples" / "chest_l_sharp"

    def _loadSample(self):
        """The bundled DICOM sample, imported through the DICOM database so its kernel is read from tags."""
        from CTHarmonizationLib import logic
        from DICOMLib import DICOMUtils

        with DICOMUtils.TemporaryDICOMDatabase() as db:
            DICOMUtils.importDicom(str(self._sampleFolder()), db)
            nodeIDs = DICOMUtils.loadPatientByUID(db.patients()[0])
            node = slicer.mrmlScene.GetNodeByID(nodeIDs[0])
            # Read the kernel now: the temporary database goes away at the end of this block.
            kernel = logic.dicomTagsOfNode(node, db).get("ConvolutionKernel")
        return node, kernel

    def test_HarmonizeBundledSampleInWorkerProcess(self):
        self.delayDisplay("Harmonizing the bundled sample on CPU in a PythonSlicer process")
        import numpy as np
        from CTHarmonizationLib import logic, worker

        node, kernel = self._loadSample()
        self.assertIsNotNone(node)
        self.assertEqual(kernel, "L")
        before = slicer.util.arrayFromVolume(node).copy()
        start = time.monotonic()
        job = logic.prepareHarmonization(node, "PHILIPS_B", sourceKernel=kernel, device="cpu")
        run = worker.SubprocessRun(job)
        while run.running():
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertEqual(run.progress(), (before.shape[0], before.shape[0]))
        output = logic.finishHarmonization(run.finish(), slicer.mrmlScene)
        self.assertFalse(run.folder.exists())
        logging.info(f"CTHarmonization self-test: {before.shape} in {time.monotonic() - start:.1f} s")
        after = slicer.util.arrayFromVolume(output)
        self.assertEqual(after.shape, before.shape)
        self.assertTrue((slicer.util.arrayFromVolume(node) == before).all(), "input voxels changed")
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(a)
        output.GetIJKToRASMatrix(b)
        for r in range(4):
            for c in range(4):
                self.assertAlmostEqual(a.GetElement(r, c), b.GetElement(r, c), places=6)
        self.assertEqual(output.GetAttribute("CTHarmonization.TargetKernel"), "PHILIPS_B")
        # A smoother kernel: less high-frequency content inside the body than the sharp L input.
        body = before > -500

        def roughness(v):
            return float(np.abs(np.diff(v.astype(np.float32), axis=2))[body[:, :, 1:]].mean())

        self.assertLess(roughness(after), roughness(before))
        views = CTHarmonizationLogic().showComparison(node, output)
        offsets = [views.sliceLogics[name].GetSliceOffset() for name in ("CTHBefore", "CTHAfter")]
        self.assertAlmostEqual(offsets[0], offsets[1])
        views.cleanup()
        self.delayDisplay("Test passed")

    def test_BadInputIsRefused(self):
        from CTHarmonizationLib import logic

        label = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
        with self.assertRaises(logic.HarmonizationInputError):
            logic.prepareHarmonization(label, "PHILIPS_B", sourceKernel="PHILIPS_L", device="cpu")
        self.delayDisplay("Test passed")
