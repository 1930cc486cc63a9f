"""Harmonize a CT volume node with the TextureStarGANCore engine (MRML only; no Slicer application needed).

A run has three steps: `prepareHarmonization` (main thread: checks the input, copies its voxels, resolves
model and kernels into a `job.HarmonizationJob`), running the job (no MRML: in this process with
`HarmonizationJob.run`, or in the GUI's child process through `worker.SubprocessRun`) and
`finishHarmonization` (main thread: creates or fills the output node). `harmonizeVolumeNode` runs all three
in this process. Nothing is added to the scene before the engine has finished, so a cancelled or failed run
leaves no half-filled node behind, and the input node's voxels are only ever read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import ensureEnginePath
from .job import (
    METHOD_FILTER,
    METHOD_MODEL,
    METHODS,
    HarmonizationCancelled,
    HarmonizationError,
    HarmonizationInputError,
    HarmonizationJob,
    HarmonizationOutOfMemoryError,
    ProgressCallback,
    filterHarmonizer,
    getHarmonizer,
    loadModel,
)

ensureEnginePath()

# The engine's domains module is pure Python (no torch): safe to import before the dependencies are in.
from TextureStarGANCore.domains import (  # noqa: E402
    Domain,
    UnknownDomainError,
    describe_domains,
    detect_domain,
    resolve_domain,
)
from TextureStarGANCore.kernel_families import family_domain  # noqa: E402

if TYPE_CHECKING:
    from TextureStarGANCore.model_file import ModelFile

__all__ = [
    "ATTRIBUTE_PREFIX",
    "METHODS",
    "METHOD_FILTER",
    "METHOD_MODEL",
    "HarmonizationCancelled",
    "HarmonizationError",
    "HarmonizationInputError",
    "HarmonizationJob",
    "HarmonizationOutOfMemoryError",
    "ProgressTracker",
    "availableDevices",
    "describeDetectedKernel",
    "dicomTagsOfNode",
    "finishHarmonization",
    "getHarmonizer",
    "harmonizeVolumeNode",
    "loadModel",
    "modelCardSummary",
    "prepareHarmonization",
]

ATTRIBUTE_PREFIX = "CTHarmonization."
DICOM_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
# DICOM tags read through Slicer's DICOM database: (group,element) -> CTVolume.tags key.
DICOM_TAGS = {
    "0008,0060": "Modality",
    "0008,0070": "Manufacturer",
    "0008,1090": "ManufacturerModelName",
    "0018,1210": "ConvolutionKernel",
}
# The model was trained on axial slices; a slice axis more than 45 degrees off S-I is not axial.
MAX_SLICE_AXIS_TILT_DEG = 45.0

# --------------------------------------------------------------------------------------------------
# Progress of a run, for the status line
# --------------------------------------------------------------------------------------------------
class ProgressTracker:
    """Slices done and the time left; fed by the GUI timer with what the child process last reported."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._start = clock()
        self._done = 0
        self._total = 0

    def __call__(self, done: int, total: int) -> None:
        self._done, self._total = int(done), int(total)

    def snapshot(self) -> tuple[int, int, float, float | None]:
        """(done, total, seconds elapsed, seconds left or None while unknown)."""
        done, total = self._done, self._total
        elapsed = self._clock() - self._start
        remaining = elapsed / done * (total - done) if done > 0 and total >= done else None
        return done, total, elapsed, remaining

    def statusText(self) -> str:
        """'37 / 100 slices, about 1:05 left' for the status line."""
        done, total, elapsed, remaining = self.snapshot()
        if total <= 0:
            return f"Loading the model and preparing slices ({_clock(elapsed)} elapsed)"
        text = f"{done} / {total} slices"
        if remaining is not None and done < total:
            text += f", about {_clock(remaining)} left"
        return text


def _clock(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


# --------------------------------------------------------------------------------------------------
# Model file and devices
# --------------------------------------------------------------------------------------------------
def modelCardSummary(model: ModelFile) -> str:
    """A few lines about the model for the GUI: kernels, training, intended use."""
    card = model.card
    training = card.get("training", {})
    arch = card.get("architecture", {})
    pairs = ", ".join(f"{a} -> {b}" for a, b in model.transfer_filter_pairs)
    spec = model.preprocessing
    if spec is None:  # kernel transfer: the input's own pixel size, no canvas
        lo, hi = model.supported_pixel_mm or (0.0, 0.0)
        network = (f"Network: kernel transfer (learned MTF transfer + residual, width {arch.get('width')}, "
                   f"depth {arch.get('depth')}) at the input's own pixel size; supported pixel size "
                   f"{lo:g}-{hi:g} mm; without DICOM kernel information the source kernel is estimated "
                   "from the image")
        filters = (pairs + "; " if pairs else "") + "every other pair: the model's own linear transfer"
    else:
        network = (f"Network: {arch.get('img_size')} px, widths {arch.get('base_width')}-"
                   f"{arch.get('max_width')}; canvas {spec.canvas_size} px at {spec.pixel_spacing_mm:g} mm")
        filters = pairs or "none, network model only"
    lines = [
        f"File: {model.path.name} (model card format {card.get('format_version')}, created "
        f"{card.get('created', 'unknown')})",
        "Kernels: " + ", ".join(f"{d.name} ({d.display_name})" for d in model.domains),
        network,
        f"Training: {training.get('iterations', 0)} iterations on {training.get('data', 'unknown data')}"
        + (", texture loss" if training.get("texture_loss") else ""),
        "Linear transfer filters (Method: linear transfer filter): " + filters,
    ]
    if not model.trained:
        lines.append("WARNING: untrained (random) weights, for tests only.")
    metrics = card.get("metrics") or {}
    if metrics:
        shown = ", ".join(f"{k}: {v}" for k, v in list(metrics.items())[:4])
        lines.append(f"Metrics: {shown}")
    if card.get("intended_use"):
        lines.append(f"Intended use: {card['intended_use']}")
    return "\n".join(lines)


def availableDevices() -> list[tuple[str, str]]:
    """(key, label) pairs for the device choice; the labels name the GPU that was found, if any."""
    import torch

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        return [("auto", f"Auto (GPU: {gpu})"), ("cuda", f"GPU: {gpu}, {memory:.0f} GB"), ("cpu", "CPU")]
    return [("auto", "Auto (no CUDA GPU found: CPU)"), ("cpu", "CPU")]


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------
def _nodeLabel(node: Any) -> str:
    return f"'{node.GetName()}'" if node is not None and node.GetName() else "the selected node"


def _checkVolumeNode(node: Any, role: str) -> None:
    """Refuse nodes that are not a single 3D scalar CT volume, saying what to do instead."""
    if node is None:
        raise HarmonizationInputError(f"No {role} is selected. Select a CT volume.")
    label = _nodeLabel(node)
    if node.IsA("vtkMRMLSegmentationNode"):
        raise HarmonizationInputError(
            f"The {role} {label} is a segmentation, not an image. Select the CT volume itself."
        )
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise HarmonizationInputError(
            f"The {role} {label} is a label map (a segmentation stored as a volume), not a CT image. "
            "Select the CT volume it was made from."
        )
    if node.GetAttribute("MultiVolume.NumberOfFrames") or node.IsA("vtkMRMLMultiVolumeNode"):
        raise HarmonizationInputError(
            f"The {role} {label} is a 4D multi-volume (time series). Harmonize one 3D time point: "
            "extract it as a scalar volume first (MultiVolume Explorer or Sequences module)."
        )
    if node.IsA("vtkMRMLVectorVolumeNode") or node.IsA("vtkMRMLDiffusionTensorVolumeNode"):
        raise HarmonizationInputError(
            f"The {role} {label} is a vector/colour volume ({node.GetClassName()}), not a grayscale CT. "
            "Convert it with the 'Vector to Scalar Volume' module or load the original CT series."
        )
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise HarmonizationInputError(
            f"The {role} {label} is a {node.GetClassName()}, not a scalar CT volume. Select a CT volume."
        )
    if node.GetScene() is None:
        raise HarmonizationInputError(f"The {role} {label} is not in the scene any more. Select it again.")
    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise HarmonizationInputError(
            f"The {role} {label} has no voxels loaded. Load the CT series (DICOM module or Add Data) again."
        )
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise HarmonizationInputError(
            f"The {role} {label} has {components} values per voxel (a colour or 4D volume). Harmonization "
            "needs one CT value per voxel: convert it with 'Vector to Scalar Volume' or load the original "
            "CT series."
        )
    scene = node.GetScene()
    if scene is not None:
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
            browser = scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
            if browser.IsProxyNodeID(node.GetID()):
                raise HarmonizationInputError(
                    f"The {role} {label} is the current time point of a 4D sequence "
                    f"('{browser.GetName()}'). Harmonize a 3D volume: in the Sequences module save the time "
                    "point as a new volume (or clone it in the Data module) and select that."
                )
    dims = image.GetDimensions()
    if min(dims) <= 1:
        raise HarmonizationInputError(
            f"The {role} {label} is a 2D image ({dims[0]} x {dims[1]} x {dims[2]} voxels). Harmonization "
            "needs a 3D CT volume: load the whole series (all slices) through the DICOM module."
        )
    transform = node.GetParentTransformNode()
    if transform is not None and not transform.IsTransformToWorldLinear():
        raise HarmonizationInputError(
            f"The {role} {label} is under the non-linear (warping) transform '{transform.GetName()}'. "
            "Harmonization works on the voxels as stored and could not place a warped result. Harden the "
            "transform first (Data module: right-click the volume > Harden transform) or remove it."
        )
    _checkAxial(node, role)


def _ijkToRas(node: Any) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _checkAxial(node: Any, role: str) -> None:
    # Only the local IJK-to-RAS matters: a linear parent transform (e.g. a registration) moves the output
    # with the input and does not change which voxels form a slice.
    axis = _ijkToRas(node)[:3, 2]
    norm = float(np.linalg.norm(axis))
    if norm == 0:
        raise HarmonizationInputError(f"The {role} {_nodeLabel(node)} has an invalid (zero) slice spacing.")
    tilt = math.degrees(math.acos(min(1.0, abs(axis[2]) / norm)))
    if tilt > MAX_SLICE_AXIS_TILT_DEG:
        raise HarmonizationInputError(
            f"The {role} {_nodeLabel(node)} is not stored as axial slices (its slice axis is {tilt:.0f} "
            "degrees from head-foot). The model was trained on axial CT slices: resample the volume to axial "
            "(Resample Scalar/Vector/DWI Volume or Crop Volume with an axial ROI) and harmonize that."
        )


def _voxelCopy(node: Any) -> np.ndarray:
    """The node's voxels as a (slices, rows, columns) numpy copy: the worker never touches VTK memory."""
    from vtk.util.numpy_support import vtk_to_numpy

    image = node.GetImageData()
    i, j, k = image.GetDimensions()
    return np.array(vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i), copy=True)


# --------------------------------------------------------------------------------------------------
# Source kernel from DICOM
# --------------------------------------------------------------------------------------------------
def dicomTagsOfNode(node: Any, dicomDatabase: Any = None) -> dict[str, str]:
    """Modality, Manufacturer, ManufacturerModelName and ConvolutionKernel of a volume loaded from DICOM.

    Reads the first instance listed in the node's `DICOM.instanceUIDs` attribute through the DICOM database
    (`fileForInstance`, `fileValue`; Slicer's `slicer.dicomDatabase` by default). Empty when the volume was
    not loaded from DICOM or its files are no longer in the database.
    """
    uids = (node.GetAttribute(DICOM_UIDS_ATTRIBUTE) or "").split()
    if not uids:
        return {}
    if dicomDatabase is None:
        import slicer

        dicomDatabase = getattr(slicer, "dicomDatabase", None)
        if dicomDatabase is None:
            return {}
    path = dicomDatabase.fileForInstance(uids[0])
    if not path:
        return {}
    tags = {}
    for tag, key in DICOM_TAGS.items():
        value = dicomDatabase.fileValue(path, tag)
        if value:
            tags[key] = str(value).strip()
    return tags


def describeDetectedKernel(node: Any, domains: list[Domain], dicomDatabase: Any = None,
                           canEstimate: bool = False) -> str:
    """One line for the GUI: the kernel DICOM reports for `node` and which model kernel it is, if any.
    `canEstimate`: the model (kernel transfer) estimates an unknown source kernel from the image."""
    tags = dicomTagsOfNode(node, dicomDatabase)
    kernel = tags.get("ConvolutionKernel")
    estimate = " (or leave it: the model estimates it from the image)" if canEstimate else ""
    if not kernel:
        return "No DICOM kernel information: choose the source kernel" + estimate + "."
    scanner = " ".join(filter(None, (tags.get("Manufacturer"), tags.get("ManufacturerModelName"))))
    domain = detect_domain(domains, tags.get("Manufacturer"), tags.get("ManufacturerModelName"), kernel)
    if domain is None:
        family = family_domain(domains, tags.get("Manufacturer"), kernel) if canEstimate else None
        if family is not None:
            return (f"DICOM: kernel {kernel} ({scanner}) is not one of the model's kernels; the nearest of "
                    f"its kernel family is {family.name} (used unless you choose another source kernel).")
        return (f"DICOM: kernel {kernel} ({scanner}) is not one of the model's kernels: choose the closest "
                "source kernel" + estimate + ".")
    return f"DICOM: kernel {kernel} ({scanner}) = model kernel {domain.name}"


SOURCE_ESTIMATED = "estimated"
SOURCE_FAMILY = "DICOM kernel family"  # the nearest domain of the kernel's vendor scale (kernel_families)


def _resolveSource(
    node: Any, domains: list[Domain], sourceKernel: str | int | None, dicomDatabase: Any, method: str,
    canEstimate: bool = False, family: bool = False,
) -> tuple[Domain | None, str]:
    """The source domain and how it was found ('chosen' or 'DICOM'); with `family` (a kernel-transfer
    model), for a kernel none of the domains has, the nearest of its vendor's kernel family (SOURCE_FAMILY);
    with `canEstimate` (such a model run as a network) else None and 'estimated': the engine then
    estimates the source from the image."""
    # The filter exists only per pair of the model's kernels: an unknown source (no family) cannot be
    # filtered.
    why = (" The linear transfer filter needs it: its filters are fitted per pair of the model's kernels."
           if method == METHOD_FILTER else "")
    if sourceKernel not in (None, ""):
        try:
            return resolve_domain(domains, sourceKernel), "chosen"
        except UnknownDomainError as exc:
            raise HarmonizationInputError(f"Source kernel: {exc}") from None
    tags = dicomTagsOfNode(node, dicomDatabase)
    modality = tags.get("Modality", "")
    notCT = HarmonizationInputError(
        f"The input {_nodeLabel(node)} is {modality}, not CT; only CT images can be harmonized."
    )
    if not tags.get("ConvolutionKernel"):
        if canEstimate:
            if modality and modality.upper() != "CT":
                raise notCT
            return None, SOURCE_ESTIMATED
        raise HarmonizationInputError(
            f"The input {_nodeLabel(node)} has no DICOM information telling its reconstruction kernel "
            "(it was not loaded through the DICOM module, or its files left the DICOM database). "
            "Choose the source kernel yourself from the list." + why
        )
    if modality and modality.upper() != "CT":
        raise notCT
    domain = detect_domain(
        domains, tags.get("Manufacturer"), tags.get("ManufacturerModelName"), tags["ConvolutionKernel"]
    )
    if domain is None and family:  # the engine's order: tags, kernel family, image estimate
        nearest = family_domain(domains, tags.get("Manufacturer"), tags["ConvolutionKernel"])
        if nearest is not None:
            return nearest, SOURCE_FAMILY
    if domain is None and canEstimate:
        return None, SOURCE_ESTIMATED
    if domain is None:
        scanner = " ".join(filter(None, (tags.get("Manufacturer"), tags.get("ManufacturerModelName"))))
        raise HarmonizationInputError(
            f"The input's kernel '{tags['ConvolutionKernel']}' ({scanner or 'unknown scanner'}) is not one "
            f"this model knows ({describe_domains(domains)}). Choose the closest source kernel yourself, or "
            "use a model trained with this kernel." + why
        )
    return domain, "DICOM"


# --------------------------------------------------------------------------------------------------
# MRML -> job -> MRML
# --------------------------------------------------------------------------------------------------
def prepareHarmonization(
    inputNode: Any,
    targetKernel: str | int,
    sourceKernel: str | int | None = None,
    modelPath: str | Path | None = None,
    device: str = "auto",
    referenceNode: Any = None,
    dicomDatabase: Any = None,
    allowUntrained: bool = False,
    method: str = METHOD_MODEL,
) -> HarmonizationJob:
    """Check the inputs and copy what the engine needs out of MRML (main thread).

    `method` is 'model' (the network) or 'filter' (the model file's fitted linear transfer filter for the
    source/target pair: the source must be one of the model's kernels, and no reference volume is used).
    """
    if method not in METHODS:
        raise HarmonizationInputError(
            f"Method: unknown method '{method}'. Choose '{METHOD_MODEL}' (network model) or "
            f"'{METHOD_FILTER}' (linear transfer filter)."
        )
    _checkVolumeNode(inputNode, "input volume")
    if referenceNode is not None:
        _checkVolumeNode(referenceNode, "reference volume")
        if referenceNode.GetID() == inputNode.GetID():
            raise HarmonizationInputError(
                "The reference volume is the input itself. The reference must be a scan reconstructed with "
                "the target kernel; leave it empty to use the model's stored target style."
            )
        if method == METHOD_FILTER:
            raise HarmonizationInputError(
                "The linear transfer filter does not use a reference volume (its filter is fixed per kernel "
                "pair). Clear the reference, or choose 'Network model' as the method to use its style."
            )
    model = loadModel(modelPath)
    kernelTransfer = model.preprocessing is None  # a kernel-transfer model: native pixel size, no style
    if referenceNode is not None and kernelTransfer:
        raise HarmonizationInputError(
            f"The model '{model.path.name}' is a kernel-transfer model: it maps one kernel to another and "
            "does not use a reference volume. Clear the reference volume."
        )
    if not model.trained and not allowUntrained:
        raise HarmonizationInputError(
            f"The model file '{model.path}' has untrained (random) weights (training.iterations = 0); it is "
            "only meant for tests. Choose a trained model file."
        )
    try:
        target = resolve_domain(model.domains, targetKernel)
    except UnknownDomainError as exc:
        raise HarmonizationInputError(f"Target kernel: {exc}") from None
    source, foundBy = _resolveSource(inputNode, model.domains, sourceKernel, dicomDatabase, method,
                                     canEstimate=kernelTransfer and method == METHOD_MODEL,
                                     family=kernelTransfer)
    if source is not None and source.id == target.id and foundBy == SOURCE_FAMILY:
        raise HarmonizationInputError(
            f"The input's kernel is not one of the model's; the nearest of its kernel family is the target "
            f"kernel {target.name}, so the result would be almost unchanged. Choose the source kernel "
            "yourself if it is not that close, or a different target kernel."
        )
    if source is not None and source.id == target.id:
        raise HarmonizationInputError(
            f"The input already has the target kernel {target.name} ({foundBy.lower()} source kernel). "
            "Choose a different target kernel."
        )
    if method == METHOD_FILTER:
        filterHarmonizer(model, source, target)  # refuse a pair without a fitted filter before copying
    reference = None
    if referenceNode is not None:
        reference = (_voxelCopy(referenceNode), tuple(float(s) for s in referenceNode.GetSpacing()))
    return HarmonizationJob(
        model=model, device=device, target=target, source=source, sourceFoundBy=foundBy,
        inputNodeID=inputNode.GetID(), inputName=inputNode.GetName() or "CT",
        volume=_voxelCopy(inputNode), spacing=tuple(float(s) for s in inputNode.GetSpacing()),
        ijkToRas=_ijkToRas(inputNode), parentTransformID=inputNode.GetTransformNodeID(), method=method,
        reference=reference, referenceName=referenceNode.GetName() if referenceNode is not None else None,
    )


def _checkOutputNode(outputNode: Any, inputNodeID: str) -> None:
    if outputNode is None:
        return
    if outputNode.GetID() == inputNodeID:
        raise HarmonizationInputError(
            "The output volume is the input volume. Choose 'Create new volume' so the original stays intact."
        )
    if not outputNode.IsA("vtkMRMLScalarVolumeNode") or outputNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise HarmonizationInputError(
            f"The output {_nodeLabel(outputNode)} is a {outputNode.GetClassName()}; choose a scalar volume "
            "or 'Create new volume'."
        )


def finishHarmonization(job: HarmonizationJob, scene: Any, outputNode: Any = None) -> Any:
    """Put the job's result into `outputNode` (or a new scalar volume node) with the input's geometry."""
    import vtk
    from vtk.util.numpy_support import get_vtk_array_type, numpy_to_vtk

    if job.result is None:
        raise RuntimeError("the harmonization job has no result; run it first")
    _checkOutputNode(outputNode, job.inputNodeID)
    inputNode = scene.GetNodeByID(job.inputNodeID)
    result = np.ascontiguousarray(job.result)
    image = vtk.vtkImageData()
    image.SetDimensions(result.shape[2], result.shape[1], result.shape[0])
    scalars = numpy_to_vtk(result.ravel(), deep=True, array_type=get_vtk_array_type(result.dtype))
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(job.ijkToRas[r, c]))

    if outputNode is None:
        name = scene.GenerateUniqueName(f"{job.inputName} harmonized to {job.target.name}")
        outputNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    wasModifying = outputNode.StartModify()
    outputNode.SetIJKToRASMatrix(matrix)
    outputNode.SetAndObserveImageData(image)
    outputNode.SetAndObserveTransformNodeID(job.parentTransformID)
    card = job.model.card
    attributes = {
        "ModelFile": str(job.model.path),
        "ModelCardVersion": str(card.get("format_version")),
        "ModelCreated": str(card.get("created", "")),
        "ModelTrainingIterations": str(card.get("training", {}).get("iterations", "")),
        "SourceKernel": job.source.name,
        "SourceKernelFrom": job.sourceFoundBy,
        "TargetKernel": job.target.name,
        "Method": job.method,
        "Style": "reference" if job.reference is not None else "domain",
        "ReferenceVolume": job.referenceName or "",
        "InputVolume": job.inputName,
        "Device": str(job.runInfo.get("device", job.device)),
        "Notes": "; ".join(job.runInfo.get("notes", [])),  # e.g. a pixel size the model was not trained for
        "Noise": str(job.runInfo.get("noise", "")),  # kernel transfer: synthesized (with its seed), off, ...
    }
    for key, value in attributes.items():
        outputNode.SetAttribute(ATTRIBUTE_PREFIX + key, value)
    outputNode.EndModify(wasModifying)
    _matchDisplay(inputNode, outputNode)
    _placeBesideInput(scene, inputNode, outputNode)
    return outputNode


def _matchDisplay(inputNode: Any, outputNode: Any) -> None:
    """Same window/level and colours as the input, so before and after are compared fairly."""
    if outputNode.GetDisplayNode() is None:
        outputNode.CreateDefaultDisplayNodes()
    source = inputNode.GetDisplayNode() if inputNode is not None else None
    target = outputNode.GetDisplayNode()
    if source is None or target is None:
        return
    target.SetAutoWindowLevel(False)
    target.SetWindowLevel(source.GetWindow(), source.GetLevel())
    if source.GetColorNodeID():
        target.SetAndObserveColorNodeID(source.GetColorNodeID())


def _placeBesideInput(scene: Any, inputNode: Any, outputNode: Any) -> None:
    # Keep the result in the input's study in the Data module's subject hierarchy.
    import slicer

    if inputNode is None:
        return
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if shNode is None:
        return
    inputItem = shNode.GetItemByDataNode(inputNode)
    outputItem = shNode.GetItemByDataNode(outputNode)
    if inputItem and outputItem:
        shNode.SetItemParent(outputItem, shNode.GetItemParent(inputItem))


def harmonizeVolumeNode(
    inputNode: Any,
    targetKernel: str | int,
    sourceKernel: str | int | None = None,
    modelPath: str | Path | None = None,
    device: str = "auto",
    outputNode: Any = None,
    progressCallback: ProgressCallback | None = None,
    cancelEvent: Any = None,
    *,
    referenceNode: Any = None,
    dicomDatabase: Any = None,
    allowUntrained: bool = False,
    method: str = METHOD_MODEL,
) -> Any:
    """Harmonize `inputNode` to `targetKernel` and return the output scalar volume node.

    The output has the input's IJK-to-RAS matrix, parent transform, window/level, a name naming the target
    kernel and `CTHarmonization.*` attributes recording the model file, model card version, source,
    target and method. `sourceKernel=None` reads the kernel from the DICOM database. `method='filter'` applies
    the model file's fitted linear transfer filter for the pair instead of the network (see
    prepareHarmonization). Raises HarmonizationInputError (bad input, nothing changed), HarmonizationCancelled
    (nothing added) or HarmonizationOutOfMemoryError.
    """
    job = prepareHarmonization(
        inputNode, targetKernel, sourceKernel, modelPath, device,
        referenceNode=referenceNode, dicomDatabase=dicomDatabase, allowUntrained=allowUntrained,
        method=method,
    )
    _checkOutputNode(outputNode, job.inputNodeID)
    job.run(progressCallback, cancelEvent)
    return finishHarmonization(job, inputNode.GetScene(), outputNode)
