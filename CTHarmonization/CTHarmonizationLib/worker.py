"""Run a prepared harmonization job in a separate Python process (PythonSlicer inside Slicer).

The GUI keeps Slicer responsive by running the engine here: torch gets its own process (no contention with
the application's Python interpreter lock, GPU memory is returned when the process ends) and the GUI only
polls files with a QTimer. Files in the job folder: `job.json` + `input.npy` (+ `reference.npy`) written by
the parent; `progress.txt` ("done total"), then `result.npy` + `run.json` or `error.json` written here,
each atomically. The parent asks for a stop by creating `cancel`; the engine checks it between batches.

    python -m CTHarmonizationLib.worker JOB_FOLDER
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SubprocessRun", "pythonExecutable", "runJobFolder", "writeJobFolder"]

JOB, INPUT, REFERENCE, RESULT, RUN_INFO = "job.json", "input.npy", "reference.npy", "result.npy", "run.json"
PROGRESS, CANCEL, ERROR, LOG = "progress.txt", "cancel", "error.json", "log.txt"
EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 2


def _atomicWrite(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def writeJobFolder(job: Any, folder: Path) -> None:
    """Write what the worker process needs to run `job` (a logic.HarmonizationJob)."""
    np.save(folder / INPUT, job.volume)
    if job.reference is not None:
        np.save(folder / REFERENCE, job.reference[0])
    spec = {
        "modelPath": str(job.model.path), "device": job.device, "target": job.target.name,
        "source": job.source.name, "sourceFoundBy": job.sourceFoundBy, "inputNodeID": job.inputNodeID,
        "inputName": job.inputName, "spacing": list(job.spacing), "ijkToRas": job.ijkToRas.tolist(),
        "parentTransformID": job.parentTransformID,
        "referenceSpacing": list(job.reference[1]) if job.reference is not None else None,
        "referenceName": job.referenceName,
    }
    _atomicWrite(folder / JOB, json.dumps(spec))


class _CancelFile:
    """Quacks like threading.Event for the engine: set once the parent created the cancel file."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def is_set(self) -> bool:
        return self._path.exists()


def runJobFolder(folder: Path) -> int:
    """Run the job in `folder` (in this process); returns the exit code for the parent."""
    from . import logic

    spec = json.loads((folder / JOB).read_text(encoding="utf-8"))
    try:
        model = logic.loadModel(spec["modelPath"])
        reference = None
        if spec["referenceSpacing"] is not None:
            reference = (np.load(folder / REFERENCE), tuple(spec["referenceSpacing"]))
        domains = {d.name: d for d in model.domains}
        job = logic.HarmonizationJob(
            model=model, device=spec["device"], target=domains[spec["target"]],
            source=domains[spec["source"]], sourceFoundBy=spec["sourceFoundBy"],
            inputNodeID=spec["inputNodeID"], inputName=spec["inputName"], volume=np.load(folder / INPUT),
            spacing=tuple(spec["spacing"]), ijkToRas=np.array(spec["ijkToRas"]),
            parentTransformID=spec["parentTransformID"], reference=reference,
            referenceName=spec["referenceName"],
        )

        def progress(done: int, total: int) -> None:
            _atomicWrite(folder / PROGRESS, f"{done} {total}")

        job.run(progress, _CancelFile(folder / CANCEL))
    except logic.HarmonizationCancelled:
        return EXIT_CANCELLED
    except Exception as exc:  # reported to the parent, which raises the same kind of error
        kind = {logic.HarmonizationInputError: "input", logic.HarmonizationOutOfMemoryError: "memory"}.get(
            type(exc), "failed")
        report = {"kind": kind, "message": str(exc), "type": type(exc).__name__}
        _atomicWrite(folder / ERROR, json.dumps(report))
        if kind == "failed":
            raise
        return EXIT_FAILED
    temporary = folder / f".{RESULT}"
    with temporary.open("wb") as f:
        np.save(f, job.result)
    os.replace(temporary, folder / RESULT)
    _atomicWrite(folder / RUN_INFO, json.dumps(job.runInfo))
    return EXIT_OK


def pythonExecutable() -> str:
    """Slicer's own Python (PythonSlicer, found on the launcher's PATH) or, outside Slicer, this Python."""
    return shutil.which("PythonSlicer") or sys.executable


class SubprocessRun:
    """One job running in a child process; poll it from a QTimer (no Qt needed here)."""

    def __init__(self, job: Any, python: str | None = None) -> None:
        self.job = job
        self.folder = Path(tempfile.mkdtemp(prefix="CTHarmonization-job-"))
        writeJobFolder(job, self.folder)
        packageParent = Path(__file__).resolve().parents[1]
        env = dict(os.environ)
        paths = [str(packageParent), *sys.path]  # the engine's location as seen by this process
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        # Same intra-op thread count as this process: CPU float reductions then run in the same order, so
        # the child's voxels equal the in-process result exactly (a different count can flip a rounding).
        import torch

        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        self._log = (self.folder / LOG).open("wb")
        self.process = subprocess.Popen(
            [python or pythonExecutable(), "-m", "CTHarmonizationLib.worker", str(self.folder)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(packageParent),
        )

    def progress(self) -> tuple[int, int]:
        try:
            done, total = (self.folder / PROGRESS).read_text(encoding="utf-8").split()
            return int(done), int(total)
        except (OSError, ValueError):
            return 0, 0

    def running(self) -> bool:
        return self.process.poll() is None

    def cancel(self) -> None:
        (self.folder / CANCEL).touch()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def finish(self) -> Any:
        """After the process ended: the job with its result, or the error the engine raised."""
        from . import logic

        code = self.process.wait()
        self._log.close()
        try:
            if code == EXIT_CANCELLED:
                raise _cancelled("harmonization cancelled")
            if (self.folder / ERROR).exists():
                error = json.loads((self.folder / ERROR).read_text(encoding="utf-8"))
                cls = {"input": logic.HarmonizationInputError,
                       "memory": logic.HarmonizationOutOfMemoryError}.get(error["kind"], RuntimeError)
                raise cls(error["message"])
            if code != EXIT_OK or not (self.folder / RESULT).exists():
                log = (self.folder / LOG).read_text(encoding="utf-8", errors="replace")[-2000:]
                raise RuntimeError(f"the harmonization process stopped with exit code {code}:\n{log}")
            self.job.result = np.load(self.folder / RESULT)
            self.job.runInfo = json.loads((self.folder / RUN_INFO).read_text(encoding="utf-8"))
            return self.job
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def _cancelled(message: str) -> BaseException:
    from .logic import _cancelledClass

    return _cancelledClass()(message)


if __name__ == "__main__":
    sys.exit(runJobFolder(Path(sys.argv[1])))
