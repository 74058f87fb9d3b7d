"""Jobs: a bounded queue and worker threads that run analyses and store what they return.

A model's hooks are process state, so a job holds a lock on every model it uses for as long
as it runs: analyses on one model never interleave, while jobs on independent models run in
parallel on different workers. Cancellation and the job time limit take effect at the next
stage boundary the analysis reports (analysis.progress.Progress).

A worker survives any failure of a job or of the results database: store writes are retried
with a short backoff, and a write that still fails is logged and left to the next start-up's
recovery. With a memory budget, a job starts only when the bytes it reserves fit next to those
of the running jobs; one that does not fit yet is set aside while the workers serve others.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from sqlalchemy.exc import SQLAlchemyError

from lnscope.analysis.errors import LnscopeError, ModelLoadError
from lnscope.analysis.progress import Cancelled, Progress
from lnscope.server import storage
from lnscope.server.storage import Store

logger = logging.getLogger("lnscope.server.jobs")

DATABASE_FAILED = "the results database failed: try again later"
INTERRUPTED = "interrupted by shutdown"


class QueueFull(Exception):
    """The job queue is full; nothing was written to the store."""


class TooManyWaiters(Exception):
    """Too many requests are already waiting for jobs."""


class StoreWriteFailed(Exception):
    """A store write still failed after every retry."""


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
    reserve_bytes: int = 0  # memory the job needs while it runs, counted against the manager's budget
    interrupted: threading.Event = field(default_factory=threading.Event)  # set by shutdown, not by a user
    started: threading.Event = field(default_factory=threading.Event)  # holds its models' locks
    submitted: float = field(default_factory=time.monotonic)
    stored: storage.ResultRow | None = None  # its finished row, as the store wrote it (an inline waiter answers it)


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()))


def is_database_error(exc: BaseException) -> bool:
    """Whether an exception comes from the results database (its message may hold SQL and parameters)."""
    unavailable = getattr(storage, "StoreUnavailable", None)
    kinds: tuple[type, ...] = (SQLAlchemyError, sqlite3.Error, StoreWriteFailed)
    if isinstance(unavailable, type):
        kinds += (unavailable,)
    return isinstance(exc, kinds)


def _resolve(fut: asyncio.Future) -> None:
    """Mark an async waiter's future done (on its own event loop)."""
    if not fut.done():
        fut.set_result(True)


class JobManager:
    def __init__(self, store: Store, *, workers: int = 2, max_queue: int = 64, max_waiters: int = 256,
                 memory_budget_bytes: int | None = None,
                 retry_delays: tuple[float, ...] = (0.2, 0.5, 1.0)) -> None:
        self.store = store
        self._max_queue = max_queue
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._deferred: list[Job] = []  # taken from the queue, waiting for room in the memory budget
        self._jobs: dict[str, Job] = {}
        self._model_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._started = False
        self._restarts = 0
        self._max_waiters = max_waiters
        self._waiters = 0
        self._async_waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._memory_budget = memory_budget_bytes
        self._reserved: dict[str, int] = {}  # job id -> bytes, for jobs a worker has taken
        self._retry_delays = retry_delays

    def start(self) -> None:
        """Start a fresh set of workers (an app may run several lifespans in one process).

        Each set has its own stop event: workers of an earlier set still finishing a job exit after
        it, while the new set serves the queue.
        """
        self._stopping = threading.Event()
        self._threads = [self._new_worker(i) for i in range(self._workers)]
        self._started = True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers; running jobs end as failed, "interrupted by shutdown"."""
        self._stopping.set()
        self._started = False
        for job in list(self._jobs.values()):
            job.interrupted.set()
            job.cancel_requested.set()
        for t in self._threads:
            t.join(timeout=timeout)

    def _new_worker(self, i: int) -> threading.Thread:
        """Start one worker thread of the current set."""
        t = threading.Thread(target=self._work, args=(self._stopping,), name=f"lnscope-worker-{i}", daemon=True)
        t.start()
        return t

    def _supervise(self) -> None:
        """Replace any worker thread of the current set that died."""
        if not self._started or self._stopping.is_set():
            return
        with self._guard:
            for i, t in enumerate(self._threads):
                if not t.is_alive():
                    logger.error("worker %s died; starting a new one", t.name)
                    self._threads[i] = self._new_worker(i)
                    self._restarts += 1

    def alive(self) -> dict[str, Any]:
        """Worker and queue health for /health (dead workers are restarted first)."""
        self._supervise()
        with self._guard:
            return {
                "workers_alive": sum(t.is_alive() for t in self._threads),
                "workers_expected": self._workers if self._started else 0,
                "worker_restarts": self._restarts,
                "queue_size": self._queue.qsize() + len(self._deferred),
                "running": len(self._reserved),
                "waiters": self._waiters,
                "reserved_bytes": sum(self._reserved.values()),
                "memory_budget_bytes": self._memory_budget,
            }

    # -- submission -----------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue a job; QueueFull when the queue is full, ValueError when it can never fit the memory budget."""
        if self._memory_budget is not None and job.reserve_bytes > self._memory_budget:
            raise ValueError(f"the job needs {job.reserve_bytes} bytes of memory, more than the server's whole "
                             f"budget of {self._memory_budget} bytes; ask for a smaller analysis")
        self._supervise()
        with self._guard:
            if self._queue.qsize() + len(self._deferred) >= self._max_queue:
                raise QueueFull
            self._jobs[job.id] = job
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._guard:
                self._jobs.pop(job.id, None)
            raise QueueFull from None
        return job

    def _waiting(self) -> list[Job]:
        with self._guard:
            return sorted((j for j in self._jobs.values() if not j.started.is_set() and not j.finished.is_set()),
                          key=lambda j: j.submitted)

    def waiting_for(self, model_key: str) -> int:
        """Jobs submitted and not yet running that need the model `model_key` (its queue's length)."""
        return sum(model_key in job.model_keys for job in self._waiting())

    def queue_position(self, job_id: str) -> int | None:
        """1 + the jobs ahead of this one that need one of its models (FIFO per model); None once it runs."""
        waiting = self._waiting()
        job = next((j for j in waiting if j.id == job_id), None)
        if job is None:
            return None
        ahead = [j for j in waiting[: waiting.index(job)] if set(j.model_keys) & set(job.model_keys)]
        running = [j for j in self._jobs.values() if j.started.is_set() and not j.finished.is_set()
                   and set(j.model_keys) & set(job.model_keys)]
        return 1 + len(ahead) + len(running)

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
        """Block this thread until the job finishes; False on timeout."""
        job = self.get(job_id)
        return True if job is None else job.finished.wait(timeout)

    async def wait_async(self, job_id: str, timeout: float,
                         is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> bool:
        """Wait for a job without holding a thread; False on timeout or when the client left.

        Raises TooManyWaiters when `max_waiters` requests already wait.
        """
        with self._guard:
            if self._waiters >= self._max_waiters:
                raise TooManyWaiters(f"{self._max_waiters} requests are already waiting for jobs; try again later")
            self._waiters += 1
        try:
            fut = self._finish_future(job_id)
            return True if fut is None else await self._await_finish(job_id, fut, timeout, is_disconnected)
        finally:
            with self._guard:
                self._waiters -= 1

    def _finish_future(self, job_id: str) -> asyncio.Future | None:
        """A future the worker resolves when the job finishes; None if it already has."""
        loop = asyncio.get_running_loop()
        with self._guard:
            job = self._jobs.get(job_id)
            if job is None or job.finished.is_set():
                return None
            fut = loop.create_future()
            self._async_waiters.setdefault(job_id, set()).add((loop, fut))
            return fut

    async def _await_finish(self, job_id: str, fut: asyncio.Future, timeout: float,
                            is_disconnected: Callable[[], Awaitable[bool]] | None, poll_s: float = 0.5) -> bool:
        """Await the future, checking every `poll_s` whether the client left."""
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                await asyncio.wait({fut}, timeout=min(poll_s, left))
                if fut.done():
                    return True
                if is_disconnected is not None and await is_disconnected():
                    return False
            return fut.done()
        finally:
            with self._guard:
                self._async_waiters.get(job_id, set()).discard((asyncio.get_running_loop(), fut))

    def _mark_finished(self, job: Job) -> None:
        """Wake every waiter of a job, sync and async, and forget it."""
        with self._guard:
            job.finished.set()
            self._jobs.pop(job.id, None)
            self._reserved.pop(job.id, None)
            waiters = self._async_waiters.pop(job.id, set())
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # that event loop is closed: nobody waits there any more
                pass

    # -- workers ----------------------------------------------------------------------------
    def _locks_for(self, keys: list[str]) -> list[threading.Lock]:
        with self._guard:
            return [self._model_locks.setdefault(k, threading.Lock()) for k in sorted(set(keys))]

    def _fits(self, job: Job) -> bool:
        """Whether the job may start now (caller holds the guard); a cancelled job always may, to end."""
        if self._memory_budget is None or job.cancel_requested.is_set():
            return True
        return sum(self._reserved.values()) + job.reserve_bytes <= self._memory_budget

    def _take(self, job: Job) -> bool:
        """Reserve the job's memory if it fits now (caller holds the guard)."""
        if not self._fits(job):
            return False
        self._reserved[job.id] = 0 if job.cancel_requested.is_set() else job.reserve_bytes
        return True

    def _next_job(self) -> Job | None:
        """The next job that may start, its memory reserved: a set-aside one that fits now, else from the queue."""
        with self._guard:
            for i, job in enumerate(self._deferred):
                if self._take(job):
                    return self._deferred.pop(i)
        try:
            job = self._queue.get(timeout=0.2)
        except queue.Empty:
            return None
        self._queue.task_done()
        with self._guard:
            if self._take(job):
                return job
            self._deferred.append(job)
        return None

    def _work(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            job = self._next_job()
            if job is None:
                continue
            try:
                self._run(job)
            except StoreWriteFailed as exc:
                logger.error("job %s (%s): %s; its row stays unfinished until the next start-up", job.id, job.kind,
                             exc, exc_info=exc.__cause__)
            except Exception:
                logger.exception("job %s (%s): the worker caught an unexpected error", job.id, job.kind)
            finally:
                self._mark_finished(job)

    def _write(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A store write, retried after each of `retry_delays`; StoreWriteFailed when every try failed."""
        for delay in (*self._retry_delays, None):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if delay is None:
                    raise StoreWriteFailed(f"the results database failed to {what}: {type(exc).__name__}") from exc
                logger.warning("the results database failed to %s (%s); retrying in %g s", what,
                               type(exc).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _report(self, job: Job, stage: str, fraction: float) -> None:
        """Store a job's progress; best effort: a failed write is logged and the job goes on."""
        try:
            self.store.set_progress(job.id, stage, fraction)
        except Exception as exc:
            logger.warning("job %s: progress not stored (%s)", job.id, type(exc).__name__)

    def _run(self, job: Job) -> None:
        if job.cancel_requested.is_set():
            self._end(job, *self._stopped(job, "cancelled before it started"))
            return
        locks = self._locks_for(job.model_keys)  # sorted: no two jobs deadlock
        for lock in locks:
            lock.acquire()
        try:
            if job.cancel_requested.is_set():
                self._end(job, *self._stopped(job, "cancelled before it started"))
                return
            job.started.set()
            if not self._write("mark a job running", self.store.mark_running, job.id):
                return
            self._execute(job)
        finally:
            for lock in reversed(locks):
                lock.release()

    def _execute(self, job: Job) -> None:
        """Run a job marked running and store its result or its failure."""
        job.deadline = time.monotonic() + job.timeout_s

        def should_stop() -> bool:
            if job.deadline is not None and time.monotonic() > job.deadline:
                raise JobTimeout(f"the job ran past its time limit of {job.timeout_s:g} s")
            return job.cancel_requested.is_set()

        progress = Progress(lambda stage, f: self._report(job, stage, f), should_stop)
        started = time.perf_counter()
        try:
            result_json, manifest = job.run(progress)
        except Exception as exc:  # the worker keeps serving whatever happened
            self._end(job, *self._outcome(job, exc))
        else:
            job.stored = self._write("store a result", self.store.finish, job.id, result_json, manifest)
            logger.info("job %s (%s) done in %.2f s", job.id, job.kind, time.perf_counter() - started)

    def _outcome(self, job: Job, exc: Exception) -> tuple[str, str, str]:
        """(status, error, error kind) of a job whose run raised; no SQL or parameters in the error."""
        if isinstance(exc, JobTimeout):
            return "failed", str(exc), "timeout"
        if is_database_error(exc):
            logger.error("job %s (%s): the results database failed", job.id, job.kind, exc_info=exc)
            return "failed", DATABASE_FAILED, "database"
        if isinstance(exc, Cancelled):
            return self._stopped(job, "cancelled by request")
        if isinstance(exc, ModelLoadError):
            return "failed", str(exc), "model_load"
        if getattr(exc, "error_kind", None):  # an error that names its own kind (e.g. a model worker that died)
            return "failed", str(exc), exc.error_kind
        if isinstance(exc, LnscopeError):
            return "failed", str(exc), "invalid"
        if is_out_of_memory(exc):
            _free_device_memory()
            return "failed", f"out of memory on the device: {exc}", "oom"
        logger.error("job %s (%s) failed", job.id, job.kind, exc_info=exc)
        return "failed", f"{type(exc).__name__}: {exc}", "internal"

    def _stopped(self, job: Job, by_user: str) -> tuple[str, str, str]:
        """(status, error, error kind) of a stopped job: interrupted by shutdown, or cancelled by its user."""
        if job.interrupted.is_set():
            return "failed", INTERRUPTED, "interrupted"
        return "cancelled", by_user, "cancelled"

    def _end(self, job: Job, status: str, error: str, kind: str) -> None:
        self._write("record a job's end", self.store.fail, job.id, error, kind, status=status)


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
