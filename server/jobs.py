"""Jobs: a bounded queue and worker threads that run analyses and store what they return.

A model's hooks are process state, so a job holds a lock on every model it uses for as long
as it runs: analyses on one model never interleave, while jobs on independent models run in
parallel on different workers. Cancellation and the job time limit take effect at the next
stage boundary the analysis reports (analysis.progress.Progress).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from lnscope.analysis.errors import LnscopeError, ModelLoadError
from lnscope.analysis.progress import Cancelled, Progress
from lnscope.server.storage import Store

logger = logging.getLogger("lnscope.server.jobs")


class QueueFull(Exception):
    pass


class JobTimeout(Cancelled):
    pass


@dataclass
class Job:
    id: str
    kind: str
    model_keys: list[str]  # one lock per model the job uses
    run: Callable[[Progress], tuple[str, dict | None]]  # -> (result JSON, manifest)
    timeout_s: float
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()))


class JobManager:
    def __init__(self, store: Store, *, workers: int = 2, max_queue: int = 64) -> None:
        self.store = store
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._jobs: dict[str, Job] = {}
        self._model_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def start(self) -> None:
        """Start a fresh set of workers (an app may run several lifespans in one process).

        Each set has its own stop event: workers of an earlier set still finishing a job exit after
        it, while the new set serves the queue.
        """
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(self._stopping,), name=f"lnscope-worker-{i}",
                                          daemon=True) for i in range(self._workers)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        for job in list(self._jobs.values()):
            job.cancel_requested.set()
        for t in self._threads:
            t.join(timeout=timeout)

    # -- submission -----------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._guard:
            self._jobs[job.id] = job
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._guard:
                self._jobs.pop(job.id, None)
            self.store.fail(job.id, "the job queue is full; try again later", "queue_full")
            raise QueueFull from None
        return job

    def get(self, job_id: str) -> Job | None:
        with self._guard:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> bool:
        """Ask a queued or running job to stop; False if it is not (or no longer) active."""
        job = self.get(job_id)
        if job is None or job.finished.is_set():
            return False
        job.cancel_requested.set()
        return True

    def wait(self, job_id: str, timeout: float) -> bool:
        job = self.get(job_id)
        return True if job is None else job.finished.wait(timeout)

    # -- workers ----------------------------------------------------------------------------
    def _locks_for(self, keys: list[str]) -> list[threading.Lock]:
        with self._guard:
            return [self._model_locks.setdefault(k, threading.Lock()) for k in sorted(set(keys))]

    def _work(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._run(job)
            finally:
                job.finished.set()
                with self._guard:
                    self._jobs.pop(job.id, None)
                self._queue.task_done()

    def _run(self, job: Job) -> None:
        if job.cancel_requested.is_set():
            self._end(job, "cancelled", "cancelled before it started", "cancelled")
            return
        locks = self._locks_for(job.model_keys)  # sorted: no two jobs deadlock
        for lock in locks:
            lock.acquire()
        try:
            if job.cancel_requested.is_set():
                self._end(job, "cancelled", "cancelled before it started", "cancelled")
                return
            if not self.store.mark_running(job.id):
                return
            job.deadline = time.monotonic() + job.timeout_s

            def should_stop() -> bool:
                if job.deadline is not None and time.monotonic() > job.deadline:
                    raise JobTimeout(f"the job ran past its time limit of {job.timeout_s:g} s")
                return job.cancel_requested.is_set()

            progress = Progress(lambda stage, f: self.store.set_progress(job.id, stage, f), should_stop)
            started = time.perf_counter()
            try:
                result_json, manifest = job.run(progress)
            except JobTimeout as exc:
                self._end(job, "failed", str(exc), "timeout")
            except Cancelled:
                self._end(job, "cancelled", "cancelled by request", "cancelled")
            except ModelLoadError as exc:
                self._end(job, "failed", str(exc), "model_load")
            except LnscopeError as exc:
                self._end(job, "failed", str(exc), "invalid")
            except Exception as exc:  # the worker keeps serving whatever happened
                if is_out_of_memory(exc):
                    _free_device_memory()
                    self._end(job, "failed", f"out of memory on the device: {exc}", "oom")
                else:
                    logger.exception("job %s (%s) failed", job.id, job.kind)
                    self._end(job, "failed", f"{type(exc).__name__}: {exc}", "internal")
            else:
                self.store.finish(job.id, result_json, manifest)
                logger.info("job %s (%s) done in %.2f s", job.id, job.kind, time.perf_counter() - started)
        finally:
            for lock in reversed(locks):
                lock.release()

    def _end(self, job: Job, status: str, error: str, kind: str) -> None:
        self.store.fail(job.id, error, kind, status=status)


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

