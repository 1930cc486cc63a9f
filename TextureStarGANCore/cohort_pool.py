"""The cohort's parent side of the workers: which workers (CPU processes, one per GPU), starting them,
handing out series dynamically from one queue, progress with ETA, Ctrl-C / SIGTERM, dead workers.

One worker runs in-process (a thread; no process start-up, the model already loaded); more are spawned
processes (``cohort_worker.worker_process``), each loading the model once.

Runs on Python 3.9 (bundled into the Slicer extension).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from .cohort_worker import Task, serve, worker_process
from .model_file import ModelFile

__all__ = ["WorkerPool", "execute", "sigterm_as_interrupt", "worker_slots"]


def worker_slots(device: str, workers: int | None) -> list[tuple[str, str | None]]:
    """(device, CUDA_VISIBLE_DEVICES value) per worker: on CUDA one worker per GPU by default."""
    from .inference import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return [("cpu", None)] * (workers or 1)
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    if dev.index is not None:  # --device cuda:K: that GPU only
        gpus = [gpus[dev.index]]
    return [("cuda", gpus[i % len(gpus)]) for i in range(workers or len(gpus))]


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Cluster schedulers stop jobs with SIGTERM: treat it like Ctrl-C (finish writes, keep the manifest)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class WorkerPool:
    """The workers: one in-process thread (one worker, no process start-up) or spawned processes."""

    def __init__(self, tasks: Sequence[Task], model: ModelFile, device: str,
                 slots: Sequence[tuple[str, str | None]], fine_detail: str) -> None:
        self.inline = len(slots) == 1
        if self.inline:
            from .inference import Harmonizer

            self.results: Any = queue.Queue()
            self.cancel: Any = threading.Event()
            todo: queue.Queue = queue.Queue()
            for t in tasks:
                todo.put(t)
            harmonizer = Harmonizer(model, device=device)  # one worker: the device as asked, no re-mapping

            def next_task() -> Task | None:
                if self.cancel.is_set():
                    return None
                try:
                    return todo.get_nowait()
                except queue.Empty:
                    return None

            def run() -> None:
                try:
                    serve(harmonizer, 0, next_task, self.results.put, self.cancel, fine_detail)
                finally:
                    self.results.put(("exit", 0))

            thread = threading.Thread(target=run, name="cohort-worker", daemon=True)
            self.workers: dict[int, Any] = {0: thread}
        else:
            ctx = mp.get_context("spawn")  # fork + torch threads (or CUDA) is unsafe
            self.results, self.cancel, self.todo = ctx.Queue(), ctx.Event(), ctx.Queue()
            for t in tasks:
                self.todo.put(t)
            threads = max(1, (os.cpu_count() or 1) // len(slots))
            self.workers = {
                i: ctx.Process(target=worker_process, name=f"cohort-worker-{i}", daemon=True,
                               args=(i, str(model.path), dev, gpu, threads, self.todo, self.results,
                                     self.cancel, os.getpid(), fine_detail))
                for i, (dev, gpu) in enumerate(slots)}
        for w in self.workers.values():
            w.start()

    def alive(self, worker: int) -> bool:
        return self.workers[worker].is_alive()

    def exit_code(self, worker: int) -> str:
        return "" if self.inline else f" (exit code {self.workers[worker].exitcode})"

    def finish(self) -> None:
        """No task left: let the workers stop (in-process: the queue is simply empty)."""
        if not self.inline:
            for _ in self.workers:
                self.todo.put(None)

    def stop(self, timeout: float = 30.0) -> None:
        for w in self.workers.values():
            w.join(timeout)
            if not self.inline and w.is_alive():
                w.terminate()


def execute(tasks: Sequence[Task], labels: Sequence[str], slices: Sequence[int], model: ModelFile,
            device: str, slots: Sequence[tuple[str, str | None]], fine_detail: str,
            on_result: Callable[[int, dict], None], err: TextIO) -> tuple[int, bool]:
    """Harmonize ``tasks`` (``labels`` and ``slices`` per task, for progress) on ``slots`` workers.

    ``on_result(task index, fields)`` is called in this thread for every finished series (done or
    failed). Returns (series finished, cancelled by Ctrl-C / SIGTERM); series no worker took (all workers
    gone) get no result.
    """
    from tqdm import tqdm

    total_slices = sum(slices)
    slices_done: dict[int, int] = {}
    outstanding = set(range(len(tasks)))
    inflight: dict[int, set[int]] = {w: set() for w in range(len(slots))}
    pool = WorkerPool(tasks, model, device, slots, fine_detail)
    alive, suspect, ran, cancelled, t0 = set(pool.workers), set(), 0, False, time.perf_counter()
    finishing = False
    bar = tqdm(total=total_slices, unit="slice", desc=f"series 0/{len(tasks)}", file=err, disable=None)

    def record(k: int, fields: dict) -> None:
        nonlocal ran
        outstanding.discard(k)
        ran += 1
        bar.update(slices[k] - slices_done.get(k, 0))
        slices_done[k] = slices[k]
        bar.set_description(f"series {ran}/{len(tasks)}")
        elapsed = time.perf_counter() - t0
        left = total_slices - sum(slices_done.values())
        eta = f", ETA {left * elapsed / max(1, total_slices - left) / 60:.1f} min" if left else ""
        why = f": {fields['reason']}" if fields["reason"] else ""
        seconds = float(fields["seconds"])
        bar.write(f"[{ran}/{len(tasks)}] {fields['status']} {labels[k]} ({seconds:.2f} s{eta}){why}",
                  file=err)
        on_result(k, fields)

    with sigterm_as_interrupt():
        while alive:
            try:
                if not outstanding and not finishing:
                    pool.finish()
                    finishing = True
                try:
                    msg = pool.results.get(timeout=0.5)
                except queue.Empty:
                    for w in [w for w in alive if not pool.alive(w)]:
                        if w in suspect:  # dead for two polls without saying goodbye: it crashed
                            alive.discard(w)
                            for k in inflight[w]:
                                record(k, {"status": "failed", "seconds": 0.0,
                                           "reason": f"worker process ended unexpectedly{pool.exit_code(w)}"})
                        suspect.add(w)
                    continue
                kind, w = msg[0], msg[1]
                if kind == "start":
                    inflight[w].add(msg[2])
                elif kind == "progress":
                    k, done = msg[2], msg[3]
                    bar.update(done - slices_done.get(k, 0))
                    slices_done[k] = done
                elif kind == "result":
                    inflight[w].discard(msg[2])
                    record(msg[2], msg[3])
                elif kind == "cancelled":
                    inflight[w].discard(msg[2])
                elif kind == "fatal":  # the others go on; with none left, the rest stays pending
                    bar.write(f"error: worker {w} could not start: {msg[2]}", file=err)
                    alive.discard(w)
                elif kind == "exit":
                    alive.discard(w)
            except KeyboardInterrupt:
                if cancelled:  # second Ctrl-C: stop now; unfinished temporaries are removed next run
                    break
                cancelled = True
                pool.cancel.set()
                bar.write("\ncancelling: finishing the writes in progress (Ctrl-C again to stop at once)...",
                          file=err)
    bar.close()
    pool.stop(timeout=0.0 if alive else 30.0)
    return ran, cancelled
