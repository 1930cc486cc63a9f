"""The harmonization job, defined once: its fields, its folder, its errors and its cancellation.

A job is what the engine needs, copied out of MRML by `logic.prepareHarmonization` on the main thread; it
never touches MRML itself. Its `method` says how: the network (`inference.Harmonizer`, cached per model and
device) or the model file's fitted linear transfer filter for the (source, target) pair
(`filter_method.FilterHarmonizer`). It runs in this process (`HarmonizationJob.run`, scripts and tests) or
in the GUI's child process (`worker`), which exchanges it through a job folder:

    job.json + input.npy (+ reference.npy)   written by the parent (`saveJob`)
    progress.txt ("done total")              written by the child after each batch, best effort
    cancel                                   created by the parent to ask for a stop between batches
    result.npy + run.json, or error.json     written by the child when it ends (`runJobFolder`)

Errors cross the process boundary as a kind ('input', 'memory', 'cancelled', 'failed') and a message, and
are raised again in the parent as the same classes (`collectResult`). Nothing here imports torch at module
level, so the GUI can import it (and catch these classes) before the dependencies are installed.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import ensureEnginePath

ensureEnginePath()
# fileio needs only numpy: safe before the dependencies are installed.
from TextureStarGANCore.fileio import atomic_output, write_text_atomic  # noqa: E402

if TYPE_CHECKING:
    from TextureStarGANCore.domains import Domain
    from TextureStarGANCore.model_file import ModelFile

__all__ = [
    "CANCEL",
    "ERROR",
    "EXIT_CANCELLED",
    "EXIT_FAILED",
    "EXIT_OK",
    "METHODS",
    "METHOD_FILTER",
    "METHOD_MODEL",
    "CancelFile",
    "HarmonizationCancelled",
    "HarmonizationError",
    "HarmonizationInputError",
    "HarmonizationOutOfMemoryError",
    "HarmonizationJob",
    "collectResult",
    "filterHarmonizer",
    "getHarmonizer",
    "loadModel",
    "readProgress",
    "runJobFolder",
    "saveJob",
    "translateEngineError",
]

JOB, INPUT, REFERENCE, RESULT, RUN_INFO = "job.json", "input.npy", "reference.npy", "result.npy", "run.json"
PROGRESS, CANCEL, ERROR, LOG = "progress.txt", "cancel", "error.json", "log.txt"
EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 2
# How the job harmonizes: the network (`inference.Harmonizer`) or the model file's fitted linear
# kernel-transfer filter for the (source, target) pair (`filter_method.FilterHarmonizer`, CPU, no network).
METHOD_MODEL, METHOD_FILTER = "model", "filter"
METHODS = (METHOD_MODEL, METHOD_FILTER)

ProgressCallback = Callable[[int, int], Any]


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
class HarmonizationError(RuntimeError):
    """The run failed for a reason that is not the user's input (a bug, a broken install)."""

    kind = "failed"


class HarmonizationInputError(ValueError):
    """The inputs cannot be harmonized; the message names the problem and what to do about it."""

    kind = "input"


class HarmonizationOutOfMemoryError(RuntimeError):
    """The GPU ran out of memory even after the engine retried with smaller batches."""

    kind = "memory"


class HarmonizationCancelled(RuntimeError):
    """The user cancelled the run; nothing was added to the scene."""

    kind = "cancelled"


_KINDS = {cls.kind: cls for cls in (HarmonizationError, HarmonizationInputError,
                                    HarmonizationOutOfMemoryError, HarmonizationCancelled)}


def _outOfMemory(exc: BaseException) -> HarmonizationOutOfMemoryError:
    detail = (str(exc).splitlines() or [type(exc).__name__])[0]
    return HarmonizationOutOfMemoryError(
        f"The GPU ran out of memory, even after retrying with fewer slices at a time ({detail}). Close other "
        "programs that use the GPU, or run on the CPU (Device: CPU): slower, but not limited by GPU memory."
    )


def translateEngineError(exc: BaseException) -> BaseException:
    """The module's error for an exception the engine raised (the exception itself if it has none)."""
    if isinstance(exc, tuple(_KINDS.values())):
        return exc
    # Only modules already imported can have raised: look them up, so that this never imports torch.
    volume_io = sys.modules.get("TextureStarGANCore.volume_io")
    inference = sys.modules.get("TextureStarGANCore.inference")
    torch = sys.modules.get("torch")
    if volume_io is not None and isinstance(exc, volume_io.InputError):
        return HarmonizationInputError(str(exc))
    if inference is not None and isinstance(exc, inference.HarmonizationCancelled):
        return HarmonizationCancelled(str(exc))
    if (torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    ):
        return _outOfMemory(exc)
    return exc


def _errorReport(exc: BaseException) -> dict[str, str]:
    kind = getattr(exc, "kind", HarmonizationError.kind)
    return {"kind": kind, "message": str(exc) or type(exc).__name__, "type": type(exc).__name__}


def _errorFromReport(report: dict[str, str]) -> BaseException:
    cls = _KINDS.get(report.get("kind", ""), HarmonizationError)
    message = report.get("message", "")
    if cls is HarmonizationError:
        message = f"{report.get('type', 'error')}: {message}\n{report.get('traceback', '')}".rstrip()
    return cls(message)


# --------------------------------------------------------------------------------------------------
# Cancellation
# --------------------------------------------------------------------------------------------------
class CancelFile:
    """A cancel request that crosses processes: behaves like threading.Event for the engine."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / CANCEL

    def set(self) -> None:
        self.path.touch()

    def is_set(self) -> bool:
        return self.path.exists()


# --------------------------------------------------------------------------------------------------
# Model and harmonizer, cached between runs in one process
# --------------------------------------------------------------------------------------------------
_cacheLock = threading.Lock()
_modelCache: dict[tuple, ModelFile] = {}
_harmonizerCache: dict[tuple, Any] = {}


def _fileKey(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def loadModel(modelPath: str | Path | None = None) -> ModelFile:
    """The validated model file (None = the bundled default), cached while the file is unchanged.

    Raises HarmonizationInputError with the engine's explanation for a missing or invalid file.
    """
    from TextureStarGANCore.model_file import DEFAULT_MODEL_PATH, ModelFileError, load_model_file

    path = Path(modelPath) if modelPath else DEFAULT_MODEL_PATH
    try:
        key = _fileKey(path)
    except OSError:
        key = None
    with _cacheLock:
        if key is not None and key in _modelCache:
            return _modelCache[key]
    try:
        model = load_model_file(path)
    except ModelFileError as exc:
        raise HarmonizationInputError(str(exc)) from None
    with _cacheLock:
        _modelCache.clear()  # one model at a time: weights can be hundreds of MB
        if key is not None:
            _modelCache[key] = model
    return model


def getHarmonizer(model: ModelFile, device: str) -> Any:
    """A Harmonizer for the model on the device, kept for the next run (loading takes seconds)."""
    from TextureStarGANCore.inference import Harmonizer, resolve_device

    try:
        dev = str(resolve_device(device))
    except ValueError as exc:
        raise HarmonizationInputError(f"{exc}. Choose Auto or CPU as the device.") from None
    key = (str(model.path), id(model), dev)
    with _cacheLock:
        cached = _harmonizerCache.get(key)
        if cached is None:
            _harmonizerCache.clear()  # release the previous model's GPU memory
            cached = Harmonizer(model, device=dev)
            _harmonizerCache[key] = cached
    return cached


def filterHarmonizer(model: ModelFile, source: Domain, target: Domain) -> Any:
    """A FilterHarmonizer for the pair (cheap: not cached). Raises HarmonizationInputError naming the
    pairs that have a filter when this one has none."""
    from TextureStarGANCore.filter_method import FilterHarmonizer, NoFilterError

    try:
        return FilterHarmonizer(model, source, target)
    except NoFilterError as exc:
        raise HarmonizationInputError(
            f"The linear transfer filter cannot be used: {exc} Choose 'Network model' as the method for this "
            "pair."
        ) from None


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
@dataclass
class HarmonizationJob:
    """Everything the engine needs, copied out of MRML on the main thread."""

    model: ModelFile
    device: str
    target: Domain
    # None until the run for a kernel-transfer model that estimates the source from the image: the run then
    # fills in the domain it used and sourceFoundBy (e.g. 'estimated from the image (p=0.83)').
    source: Domain | None
    sourceFoundBy: str  # 'chosen', 'DICOM', 'DICOM kernel family' or 'estimated'
    inputNodeID: str
    inputName: str
    volume: np.ndarray  # (slices, rows, columns) copy of the input voxels
    spacing: tuple[float, float, float]
    ijkToRas: np.ndarray
    parentTransformID: str | None
    method: str = METHOD_MODEL  # one of METHODS
    reference: tuple[np.ndarray, tuple[float, float, float]] | None = None
    referenceName: str | None = None
    result: np.ndarray | None = field(default=None, repr=False)
    runInfo: dict[str, Any] = field(default_factory=dict)

    def run(self, progressCallback: ProgressCallback | None = None, cancelEvent: Any = None) -> np.ndarray:
        """Harmonize the copied voxels (any thread or process). Raises HarmonizationCancelled,
        HarmonizationInputError (e.g. values that are not CT) or HarmonizationOutOfMemoryError."""
        if self.method == METHOD_FILTER:
            harmonizer = filterHarmonizer(self.model, self.source, self.target)
        else:
            harmonizer = getHarmonizer(self.model, self.device)
        try:
            self.result = harmonizer.harmonize(
                self.volume, self.spacing, self.target.name,
                source=self.source.name if self.source is not None else None,
                reference=self.reference, progress=progressCallback, cancel=cancelEvent,
            )
        except Exception as exc:
            translated = translateEngineError(exc)
            if translated is exc:
                raise
            raise translated from None
        self.runInfo = dict(harmonizer.last_run)
        self.runInfo.setdefault("device", "cpu")  # the filter runs on the CPU and does not record it
        self.adoptRunSource()
        return self.result

    def adoptRunSource(self) -> None:
        """After a run that estimated the source (kernel-transfer models): the domain it used and how."""
        if self.source is None and self.runInfo.get("source"):
            self.source = next(d for d in self.model.domains if d.name == self.runInfo["source"])
            self.sourceFoundBy = str(self.runInfo.get("source_from") or self.sourceFoundBy)


# --------------------------------------------------------------------------------------------------
# The job folder
# --------------------------------------------------------------------------------------------------
def saveJob(job: HarmonizationJob, folder: Path) -> None:
    """Write what the child process needs to run `job` (parent side)."""
    folder = Path(folder)
    np.save(folder / INPUT, job.volume)
    if job.reference is not None:
        np.save(folder / REFERENCE, job.reference[0])
    spec = {
        "modelPath": str(job.model.path), "device": job.device, "target": job.target.name,
        "source": job.source.name if job.source is not None else None, "sourceFoundBy": job.sourceFoundBy,
        "inputNodeID": job.inputNodeID,
        "inputName": job.inputName, "spacing": list(job.spacing), "ijkToRas": job.ijkToRas.tolist(),
        "parentTransformID": job.parentTransformID, "method": job.method,
        "referenceSpacing": list(job.reference[1]) if job.reference is not None else None,
        "referenceName": job.referenceName,
    }
    write_text_atomic(folder / JOB, json.dumps(spec))


def loadJob(folder: Path) -> HarmonizationJob:
    """The job `saveJob` wrote (child side); loads the model named in it."""
    folder = Path(folder)
    spec = json.loads((folder / JOB).read_text(encoding="utf-8"))
    model = loadModel(spec["modelPath"])
    domains = {d.name: d for d in model.domains}
    reference = None
    if spec["referenceSpacing"] is not None:
        reference = (np.load(folder / REFERENCE), tuple(spec["referenceSpacing"]))
    return HarmonizationJob(
        model=model, device=spec["device"], target=domains[spec["target"]],
        source=domains[spec["source"]] if spec["source"] is not None else None,
        sourceFoundBy=spec["sourceFoundBy"], inputNodeID=spec["inputNodeID"], inputName=spec["inputName"],
        volume=np.load(folder / INPUT), spacing=tuple(spec["spacing"]), ijkToRas=np.array(spec["ijkToRas"]),
        parentTransformID=spec["parentTransformID"], method=spec["method"], reference=reference,
        referenceName=spec["referenceName"],
    )


def _writeProgress(folder: Path, done: int, total: int) -> None:
    # Best effort: on Windows os.replace fails while the GUI has the file open to read it. Progress is only
    # advisory, so a busy file skips this update instead of aborting the run.
    try:
        write_text_atomic(folder / PROGRESS, f"{int(done)} {int(total)}")
    except OSError:
        pass


def readProgress(folder: Path) -> tuple[int, int] | None:
    """(done, total) as last reported by the child, or None when there is nothing (readable) yet."""
    try:
        done, total = (Path(folder) / PROGRESS).read_text(encoding="utf-8").split()
        return int(done), int(total)
    except (OSError, ValueError):
        return None


def runJobFolder(folder: Path) -> int:
    """Run the job in `folder` in this process (the child's main); returns its exit code."""
    folder = Path(folder)
    try:
        job = loadJob(folder)
        job.run(lambda done, total: _writeProgress(folder, done, total), CancelFile(folder))
    except Exception as exc:  # reported to the parent, which raises the same kind of error
        error = translateEngineError(exc)
        report = _errorReport(error)
        if report["kind"] == HarmonizationError.kind:  # unexpected: keep where it happened
            traceback.print_exc()
            report["traceback"] = traceback.format_exc()[-3000:]
        write_text_atomic(folder / ERROR, json.dumps(report))
        return EXIT_CANCELLED if isinstance(error, HarmonizationCancelled) else EXIT_FAILED
    with atomic_output(folder / RESULT) as temporary, open(temporary, "wb") as f:
        np.save(f, job.result)
    write_text_atomic(folder / RUN_INFO, json.dumps(job.runInfo))
    return EXIT_OK


def collectResult(job: HarmonizationJob, folder: Path, exitCode: int) -> HarmonizationJob:
    """After the child ended (parent side): `job` with its result and run info, or the child's error."""
    folder = Path(folder)
    if (folder / ERROR).exists():
        raise _errorFromReport(json.loads((folder / ERROR).read_text(encoding="utf-8")))
    if exitCode != EXIT_OK or not (folder / RESULT).exists():
        try:
            log = (folder / LOG).read_text(encoding="utf-8", errors="replace")[-2000:]
        except OSError:
            log = ""
        raise HarmonizationError(f"the harmonization process stopped with exit code {exitCode}:\n{log}")
    job.result = np.load(folder / RESULT)
    job.runInfo = json.loads((folder / RUN_INFO).read_text(encoding="utf-8"))
    job.adoptRunSource()
    return job
