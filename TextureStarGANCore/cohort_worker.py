"""The cohort's worker: one loaded model, series in, harmonized series out.

``serve`` runs three stages in threads so disk and compute overlap: a reader fetches the next task and
loads its volume while the current one is harmonized, and a writer writes the previous result. Every
series ends in exactly one message to the parent: ``("result", worker, index, fields)`` (done or failed,
never raised: one bad series never stops the worker) or ``("cancelled", worker, index)``.
``worker_process`` is the entry point of a spawned worker process (one per CPU share or per GPU).

Runs on Python 3.9 (bundled into the Slicer extension).
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .volume_io import CTVolume, read_dicom_files, read_volume, write_volume

__all__ = ["Task", "input_checksum", "serve", "worker_process"]

Send = Callable[[tuple], Any]


@dataclass
class Task:
    """One series to harmonize (picklable: it crosses to worker processes)."""

    index: int
    kind: str  # "dicom" (files of one series) or "file" (a volume file)
    files: list[str]  # absolute paths
    where: str  # the input folder or file, for messages
    root: str  # the input root (checksums name files relative to it)
    output: str  # absolute output path (a folder for DICOM, else a volume file)
    target: str  # domain name
    source: str  # domain name
    description: str  # the derived series' description


def input_checksum(files: Sequence[str | os.PathLike], root: str | os.PathLike) -> str:
    """sha256 over the series' files: relative names and bytes, in name order."""
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def _load(task: Task) -> CTVolume:
    if task.kind == "dicom":
        return read_dicom_files(task.files, where=task.where)
    return read_volume(task.files[0])


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, ValueError) else text


def serve(harmonizer: Any, worker: int, next_task: Callable[[], Task | None], send: Send, cancel: Any,
          fine_detail: str = "scaled") -> None:
    """Harmonize tasks until ``next_task`` returns None or ``cancel`` (an Event) is set."""
    from .inference import HarmonizationCancelled

    loaded: queue.Queue = queue.Queue(maxsize=1)  # read one series ahead
    to_write: queue.Queue = queue.Queue(maxsize=1)  # write the last result while the next one computes

    def fail(task: Task, exc: BaseException, seconds: float, checksum: str = "", slices: int = 0) -> None:
        send(("result", worker, task.index, {"status": "failed", "reason": _why(exc), "seconds": seconds,
                                             "input_checksum": checksum, "slices": slices}))

    def reader() -> None:
        while True:
            task = next_task()
            if task is None:
                loaded.put(None)
                return
            send(("start", worker, task.index))
            t0, checksum = time.perf_counter(), ""
            try:
                # Checksum first: it records even a series that then fails to load (a re-run skips it
                # unless asked to retry), and it leaves the bytes in the page cache for the reader.
                checksum = input_checksum(task.files, task.root)
                volume = _load(task)
            except Exception as exc:  # noqa: BLE001 - recorded, the cohort goes on
                fail(task, exc, time.perf_counter() - t0, checksum)
                continue
            loaded.put((task, volume, checksum, time.perf_counter() - t0))

    def writer() -> None:
        while True:
            item = to_write.get()
            if item is None:
                return
            task, volume, result, checksum, seconds = item
            t0 = time.perf_counter()
            try:
                write_volume(task.output, volume, result, description=task.description, overwrite=True)
            except Exception as exc:  # noqa: BLE001
                fail(task, exc, seconds + time.perf_counter() - t0, checksum, volume.shape[0])
                continue
            send(("result", worker, task.index, {"status": "done", "reason": "", "input_checksum": checksum,
                                                 "seconds": seconds + time.perf_counter() - t0,
                                                 "slices": volume.shape[0]}))

    threads = [threading.Thread(target=reader, name="cohort-read", daemon=True),
               threading.Thread(target=writer, name="cohort-write", daemon=True)]
    for t in threads:
        t.start()
    try:
        while True:
            item = loaded.get()
            if item is None:
                break
            task, volume, checksum, seconds = item
            if cancel.is_set():
                send(("cancelled", worker, task.index))
                continue  # drain: the reader stops on its own (next_task returns None once cancelled)
            t0 = time.perf_counter()

            def progress(done: int, total: int, index: int = task.index) -> None:
                send(("progress", worker, index, done, total))

            try:
                result = harmonizer.harmonize(volume.hu, volume.spacing, task.target, source=task.source,
                                              progress=progress, cancel=cancel, fine_detail=fine_detail)
            except HarmonizationCancelled:
                send(("cancelled", worker, task.index))
                continue
            except Exception as exc:  # noqa: BLE001
                fail(task, exc, seconds + time.perf_counter() - t0, checksum, volume.shape[0])
                continue
            to_write.put((task, volume, result, checksum, seconds + time.perf_counter() - t0))
    finally:
        to_write.put(None)
        threads[1].join()  # a started write always finishes (atomic, then recorded)


def worker_process(worker: int, model_path: str, device: str, gpu: str | None, threads: int, tasks: Any,
                   results: Any, cancel: Any, parent_pid: int, fine_detail: str) -> None:
    """Entry point of a spawned worker: load the model once, then serve tasks from ``tasks``."""
    # The parent handles Ctrl-C / SIGTERM and tells the workers through ``cancel``, so the series in
    # flight can finish writing or be dropped cleanly instead of dying half-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before CUDA initialises: this worker sees one GPU
    import torch

    from .inference import Harmonizer
    from .model_file import load_model_file

    torch.set_num_threads(threads)
    try:
        harmonizer = Harmonizer(load_model_file(model_path), device=device)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops the run
        results.put(("fatal", worker, _why(exc)))
        return

    def next_task() -> Task | None:
        while not cancel.is_set():
            try:
                return tasks.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent_pid:  # the parent died: do not linger as an orphan
                    return None
        return None

    try:
        serve(harmonizer, worker, next_task, results.put, cancel, fine_detail)
    finally:
        results.put(("exit", worker))
