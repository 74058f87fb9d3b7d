"""The threads that run this process's model work (loading and analysis units): per device, the most recently
used idle one first, and each one that idles for IDLE_S exits.

On the CPU, torch parallelises each kernel over an OpenMP team that belongs to the calling thread, and libgomp
stops spin-waiting once its teams hold more threads than there are cores: every kernel then waits for sleeping
workers to wake. Job workers, request threads and the preload thread each running models made a team apiece, and
on a 2-core machine the same DLA ran 1.3-1.8x slower in the server than in a notebook. Here a single client's jobs
all run on one warm thread (one team, as in a notebook), while jobs on independent models still run side by side
(each on a thread of its own) when they come together.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")
IDLE_S = 2.0  # an idle compute thread exits after this long, and its OpenMP team with it

_local = threading.local()  # .keys: the device keys whose compute thread this is


def device_key(devices: list[str] | set[str]) -> str:
    """Which threads run work on these devices: those of the device, or of the mix of devices."""
    return "+".join(sorted(set(devices))) or "cpu"


class _Task:
    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn, self.done = fn, threading.Event()
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the caller, raised there
            self.error = exc
        finally:
            self.done.set()


class _Worker:
    """One compute thread: it runs the tasks handed to it, and exits after IDLE_S without one."""

    def __init__(self, pool: "_DevicePool", first: _Task) -> None:
        self.pool = pool
        self.task: _Task | None = first
        self.wake = threading.Condition(pool.lock)
        self.thread = threading.Thread(target=self._loop, name=f"lnscope-compute-{pool.key}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        _local.keys = {self.pool.key}
        while True:
            with self.pool.lock:
                while self.task is None:
                    if not self.wake.wait(IDLE_S) and self.task is None and self in self.pool.idle:
                        self.pool.idle.remove(self)
                        return
                task, self.task = self.task, None
            task.run()
            with self.pool.lock:
                self.pool.idle.append(self)


class _DevicePool:
    def __init__(self, key: str) -> None:
        self.key = key
        self.lock = threading.Lock()
        self.idle: list[_Worker] = []  # a stack: the last one to finish is warmest

    def run(self, task: _Task) -> None:
        with self.lock:
            worker = self.idle.pop() if self.idle else None
            if worker is not None:
                worker.task = task
                worker.wake.notify()
        if worker is None:
            _Worker(self, task)
        task.done.wait()


_pools: dict[str, _DevicePool] = {}
_pools_lock = threading.Lock()


def run_on(key: str, fn: Callable[[], T]) -> T:
    """`fn()` on a compute thread of `key` (inline when called from one), blocking until it returns or raises."""
    if key in getattr(_local, "keys", ()):
        return fn()
    with _pools_lock:
        pool = _pools.setdefault(key, _DevicePool(key))
    task = _Task(fn)
    pool.run(task)
    if task.error is not None:
        raise task.error
    return task.result  # type: ignore[return-value]
