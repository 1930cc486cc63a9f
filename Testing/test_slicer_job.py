"""The Slicer job protocol and the child process the GUI runs it in, on real MRML (slicer-core).

Covers what the GUI relies on and cannot show headless: the job folder round trip, every error kind crossing
the process boundary as the same class, cancellation, progress reporting that tolerates a busy file, and
stopping a run (scene closed, Slicer exits): the child's whole process tree killed, the job folder deleted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core is needed for the Slicer module tests")

from model_factory import make_model_file  # noqa: E402
from slicer_helpers import add_volume, body_phantom  # noqa: E402

from CTHarmonization.CTHarmonizationLib import dependencies, logic, worker  # noqa: E402
from CTHarmonization.CTHarmonizationLib import job as jobfiles  # noqa: E402


def prepared(scene, model_path, slices=4, **kwargs):
    node = add_volume(scene, body_phantom(slices=slices, size=64), name="child")
    return logic.prepareHarmonization(node, "B30f", "BONE", model_path, "cpu", allowUntrained=True, **kwargs)


def wait_for(run: worker.SubprocessRun, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while run.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not run.running(), "the child process did not end"


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an orphan may wait to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_job_folder_round_trip_keeps_every_field(scene, model_path, tmp_path):
    reference = add_volume(scene, body_phantom(slices=3, size=64, seed=4), name="B30f scan",
                           spacing=(0.6, 0.6, 3.0))
    job = prepared(scene, model_path, referenceNode=reference)
    jobfiles.saveJob(job, tmp_path)
    loaded = jobfiles.loadJob(tmp_path)
    for name in ("device", "sourceFoundBy", "inputNodeID", "inputName", "spacing", "parentTransformID",
                 "method", "referenceName"):
        assert getattr(loaded, name) == getattr(job, name), name
    assert (loaded.target.name, loaded.source.name) == (job.target.name, job.source.name)
    assert loaded.model.path == job.model.path
    np.testing.assert_array_equal(loaded.volume, job.volume)
    np.testing.assert_array_equal(loaded.ijkToRas, job.ijkToRas)
    np.testing.assert_array_equal(loaded.reference[0], job.reference[0])
    assert loaded.reference[1] == job.reference[1] == (0.6, 0.6, 3.0)
    assert loaded.result is None and loaded.runInfo == {} and loaded.method == "model"


def test_filter_method_crosses_the_job_folder_and_runs_the_filter(scene, tmp_path):
    """Method 'filter' is a job field: saved, loaded and used by the child's side (runJobFolder) to build
    the FilterHarmonizer of the bundled (kernel-transfer) model's GE_BONE -> SIEMENS_B30f linear part instead
    of the network."""
    from TextureStarGANCore.filter_method import FilterHarmonizer

    node = add_volume(scene, body_phantom(slices=3, size=64), name="bone")
    job = logic.prepareHarmonization(node, "B30f", "BONE", device="cpu", method="filter")
    assert job.method == jobfiles.METHOD_FILTER
    jobfiles.saveJob(job, tmp_path)
    assert json.loads((tmp_path / jobfiles.JOB).read_text())["method"] == "filter"
    assert jobfiles.loadJob(tmp_path).method == "filter"
    assert jobfiles.runJobFolder(tmp_path) == jobfiles.EXIT_OK
    finished = jobfiles.collectResult(job, tmp_path, jobfiles.EXIT_OK)
    expected = FilterHarmonizer(job.model, job.source, job.target).harmonize(job.volume, job.spacing, "B30f")
    np.testing.assert_array_equal(finished.result, expected)
    assert finished.runInfo["method"] == "filter" and finished.runInfo["device"] == "cpu"
    assert "the model's own linear transfer GE_BONE -> SIEMENS_B30f" in finished.runInfo["filter"]
    assert not np.array_equal(finished.result, job.volume)


def test_a_pair_without_a_filter_in_the_child_is_an_input_error(scene, tmp_path):
    """E.g. the model file was replaced between preparing and running: the child reports the engine's
    NoFilterError as an input error naming the fitted pairs, not as a crash with a traceback."""
    from TextureStarGANCore.transfer_filter import TransferFilter

    blur = TransferFilter(np.array([0.0, 2.0]), np.array([1.0, 0.5]), "test")
    path = make_model_file(tmp_path / "one_filter.safetensors", iterations=5, transfer_filters=[
        {"source": "BONE", "target": "B30f", "filter": blur.to_dict(), "fitted_on": "test"}])
    node = add_volume(scene, body_phantom(slices=2, size=64), name="standard")
    job = logic.prepareHarmonization(node, "B30f", "BONE", path, "cpu", method="filter")
    job.source = {d.name: d for d in job.model.domains}["STANDARD"]
    folder = tmp_path / "job"
    folder.mkdir()
    jobfiles.saveJob(job, folder)
    assert jobfiles.runJobFolder(folder) == jobfiles.EXIT_FAILED
    report = json.loads((folder / jobfiles.ERROR).read_text())
    assert report["kind"] == "input" and "traceback" not in report
    with pytest.raises(logic.HarmonizationInputError) as raised:
        jobfiles.collectResult(job, folder, jobfiles.EXIT_FAILED)
    message = str(raised.value)
    assert "no fitted transfer filter for STANDARD -> B30f" in message and "BONE -> B30f" in message
    assert "Choose 'Network model'" in message and "--method" not in message


def test_an_estimated_source_crosses_the_job_folder(scene, kt_model_path, tmp_path):
    """A kernel-transfer job without a source: the child estimates it and the parent learns which."""
    node = add_volume(scene, body_phantom(slices=2, size=64), name="no dicom")
    job = logic.prepareHarmonization(node, "BONE", None, kt_model_path, "cpu", allowUntrained=True)
    jobfiles.saveJob(job, tmp_path)
    assert jobfiles.loadJob(tmp_path).source is None
    assert jobfiles.runJobFolder(tmp_path) == jobfiles.EXIT_OK
    finished = jobfiles.collectResult(job, tmp_path, jobfiles.EXIT_OK)
    assert finished.source.name == finished.runInfo["source"]
    assert finished.sourceFoundBy.startswith("estimated from the image (p=")
    assert logic.finishHarmonization(finished, scene).GetAttribute("CTHarmonization.SourceKernel") == \
        finished.source.name


def test_child_process_gives_the_in_process_result(scene, model_path):
    """The GUI's path: the job runs in a child Python process polled through its folder."""
    job = prepared(scene, model_path)
    expected = prepared(scene, model_path)
    expected.run()

    run = worker.SubprocessRun(job, python=sys.executable)
    wait_for(run)
    assert run.progress() == (4, 4)
    finished = run.finish()
    np.testing.assert_array_equal(finished.result, expected.result)
    assert finished.runInfo["device"] == "cpu" and not run.folder.exists()
    out = logic.finishHarmonization(finished, scene)
    assert out.GetAttribute("CTHarmonization.SourceKernel") == "BONE"


@pytest.mark.parametrize("case", ["cancelled", "input", "memory", "failed"])
def test_each_error_kind_is_raised_again_in_the_parent(scene, model_path, tmp_path, monkeypatch, case):
    """What the child reports for a cancel request, bad values, exhausted GPU memory or a bug (run here,
    same function as in the child), and what the parent raises from it."""
    job = prepared(scene, model_path)
    if case == "input":
        job.volume = np.full((4, 64, 64), 300, np.int16)  # not CT: no air
    jobfiles.saveJob(job, tmp_path)
    if case == "cancelled":
        jobfiles.CancelFile(tmp_path).set()
    if case in ("memory", "failed"):
        harmonizer = jobfiles.getHarmonizer(jobfiles.loadModel(model_path), "cpu")
        error = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB") if case == "memory" else \
            KeyError("a bug")

        def broken(*args, **kwargs):
            raise error

        monkeypatch.setattr(harmonizer, "harmonize", broken)
    code = jobfiles.runJobFolder(tmp_path)
    assert code == (jobfiles.EXIT_CANCELLED if case == "cancelled" else jobfiles.EXIT_FAILED)
    assert json.loads((tmp_path / jobfiles.ERROR).read_text())["kind"] == case
    assert not (tmp_path / jobfiles.RESULT).exists()
    expected = {"cancelled": logic.HarmonizationCancelled, "input": logic.HarmonizationInputError,
                "memory": logic.HarmonizationOutOfMemoryError, "failed": logic.HarmonizationError}[case]
    with pytest.raises(expected) as raised:
        jobfiles.collectResult(job, tmp_path, code)
    message = str(raised.value)
    assert {"cancelled": "cancelled", "input": "does not look like CT", "memory": "run on the CPU",
            "failed": "KeyError: 'a bug'"}[case] in message
    if case == "failed":
        assert "Traceback" in message  # where it happened, for the log


def test_a_child_that_dies_without_a_report_is_an_error_with_its_log(scene, model_path, tmp_path):
    job = prepared(scene, model_path)
    (tmp_path / jobfiles.LOG).write_text("Segmentation fault (core dumped)\n")
    with pytest.raises(logic.HarmonizationError, match="(?s)exit code -11.*Segmentation fault"):
        jobfiles.collectResult(job, tmp_path, -11)


def test_cancel_through_the_child_process(scene, model_path):
    job = prepared(scene, model_path, slices=6)
    run = worker.SubprocessRun(job, python=sys.executable)
    run.cancel()  # before the first batch: the engine checks before it starts
    wait_for(run)
    with pytest.raises(logic.HarmonizationCancelled):
        run.finish()
    assert not run.folder.exists()


def test_progress_is_best_effort_when_the_file_is_busy(tmp_path):
    # A directory in the way makes os.replace fail, like a file the GUI holds open on Windows.
    (tmp_path / jobfiles.PROGRESS).mkdir()
    jobfiles._writeProgress(tmp_path, 2, 6)  # must not raise: the run goes on
    assert jobfiles.readProgress(tmp_path) is None
    (tmp_path / jobfiles.PROGRESS).rmdir()
    jobfiles._writeProgress(tmp_path, 4, 6)
    assert jobfiles.readProgress(tmp_path) == (4, 6)
    (tmp_path / jobfiles.PROGRESS).write_text("4 ")  # torn read: keep the last value
    assert jobfiles.readProgress(tmp_path) is None


def test_abort_kills_the_launcher_and_its_child_and_deletes_the_folder(scene, model_path, tmp_path):
    """PythonSlicer is a launcher that starts the real Python as its child: killing the launcher alone
    would leave the engine running. A shell script plays the launcher here."""
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\n"{sys.executable}" "$@" &\necho $! > "$3/child.pid"\nwait\n')
    launcher.chmod(0o755)
    run = worker.SubprocessRun(prepared(scene, model_path, slices=64), python=str(launcher))
    folder = run.folder
    deadline = time.monotonic() + 60
    while not (folder / "child.pid").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    child = int((folder / "child.pid").read_text())
    assert alive(run.process.pid) and alive(child)
    run.abort()
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(run.process.pid) and not alive(child)
    assert not folder.exists()
    run.abort()  # twice (scene close, then Slicer exit) is harmless


def test_popen_options_hide_the_console_on_windows_and_group_the_tree_elsewhere():
    windows = worker.popenOptions("nt")
    assert windows["creationflags"] & 0x08000000  # CREATE_NO_WINDOW
    assert worker.popenOptions("posix") == {"start_new_session": True}


def test_missing_dependencies_include_an_old_torch():
    assert dependencies.missingDependencies() == []  # this venv has everything
    assert dependencies.missingDependencies(torchRequirement=">=999") == ["torch>=999"]
    assert dependencies.missingDependencies(["safetensors>=999"]) == ["safetensors>=999"]
    assert dependencies.TORCH_REQUIREMENT == ">=2.1"


def test_importing_the_logic_does_not_import_torch_or_safetensors():
    """The GUI imports the logic before it knows the dependencies are there (issue 19, point 2)."""
    import subprocess

    module = Path(__file__).resolve().parents[1] / "CTHarmonization"
    code = ("import sys; import CTHarmonizationLib.logic, CTHarmonizationLib.worker, CTHarmonizationLib.job; "
            "print(sorted(m for m in ('torch', 'safetensors', 'scipy') if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(module), str(module.parent)]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
