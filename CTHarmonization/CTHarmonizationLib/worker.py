"""Run a harmonization job in a child Python process (PythonSlicer inside Slicer), polled by the GUI.

The engine runs in its own process so that Slicer stays responsive: no contention with the application's
interpreter lock, and GPU memory is returned when the process ends. The job's files, errors and cancel
request are defined in `job`; this module only starts, polls, stops and cleans up the process.

    python -m CTHarmonizationLib.worker JOB_FOLDER
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import job as jobfiles

__all__ = ["SubprocessRun", "popenOptions", "pythonExecutable"]

WINDOWS_CREATE_NO_WINDOW = 0x08000000  # subprocess.CREATE_NO_WINDOW (exists only on Windows)


def pythonExecutable() -> str:
    """Slicer's own Python (PythonSlicer, found on the launcher's PATH) or, outside Slicer, this Python."""
    return shutil.which("PythonSlicer") or sys.executable


def popenOptions(platform: str = os.name) -> dict[str, Any]:
    """Popen options that hide the child's console on Windows (as slicer.util.launchConsoleProcess does)
    and make the child the leader of its own process group elsewhere, so that `kill` reaches the real
    Python process behind the PythonSlicer launcher too."""
    if platform == "nt":
        options: dict[str, Any] = {"creationflags": WINDOWS_CREATE_NO_WINDOW}
        if hasattr(subprocess, "STARTUPINFO"):
            info = subprocess.STARTUPINFO()
            info.dwFlags = subprocess.STARTF_USESHOWWINDOW
            info.wShowWindow = 0  # SW_HIDE
            options["startupinfo"] = info
        return options
    return {"start_new_session": True}


def _killTree(process: subprocess.Popen) -> None:
    """Kill the process and everything it started (PythonSlicer is a launcher: the Python doing the work
    is its child)."""
    if process.poll() is not None:
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True,
                       creationflags=WINDOWS_CREATE_NO_WINDOW, check=False)
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the group popenOptions made it lead
        except (ProcessLookupError, PermissionError):
            pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class SubprocessRun:
    """One job running in a child process; poll it from a QTimer (no Qt needed here).

    `finish()` after the process ended gives the job with its result (or raises the job's error);
    `abort()` at any time kills the process tree and deletes the job folder (scene closed, Slicer exits).
    """

    def __init__(self, job: Any, python: str | None = None) -> None:
        self.job = job
        self.folder = Path(tempfile.mkdtemp(prefix="CTHarmonization-job-"))
        self._cancel = jobfiles.CancelFile(self.folder)
        self._progress = (0, 0)
        try:
            jobfiles.saveJob(job, self.folder)
            packageParent = Path(__file__).resolve().parents[1]
            env = dict(os.environ)
            paths = [str(packageParent), *sys.path]  # the engine's location as seen by this process
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
            # Same intra-op thread count as this process: CPU float reductions then run in the same order,
            # so the child's voxels equal the in-process result exactly.
            import torch

            env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
            self._log = (self.folder / jobfiles.LOG).open("wb")
            self.process = subprocess.Popen(
                [python or pythonExecutable(), "-m", "CTHarmonizationLib.worker", str(self.folder)],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                cwd=str(packageParent), **popenOptions(),
            )
        except BaseException:
            self._removeFolder()
            raise

    def progress(self) -> tuple[int, int]:
        """(slices done, total); the last value read when the file is busy or not written yet."""
        latest = jobfiles.readProgress(self.folder)
        if latest is not None:
            self._progress = latest
        return self._progress

    def running(self) -> bool:
        return self.process.poll() is None

    def cancel(self) -> None:
        """Ask the child to stop after the current batch; `finish()` then raises HarmonizationCancelled."""
        if self.folder.is_dir():
            self._cancel.set()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def finish(self) -> Any:
        """After the process ended: the job with its result, or the error the child reported."""
        code = self.process.wait()
        self._log.close()
        try:
            return jobfiles.collectResult(self.job, self.folder, code)
        finally:
            self._removeFolder()

    def abort(self) -> None:
        """Stop now, without waiting for the current batch: kill the process tree, delete the job folder."""
        _killTree(self.process)
        self._log.close()
        self._removeFolder()

    def _removeFolder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(jobfiles.runJobFolder(Path(sys.argv[1])))
