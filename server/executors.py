"""Where a prepared analysis runs: on this process's models (`local`, the default) or on model workers.

An executor runs one prepared request (its kind's per-role units, then the combine step) and lists
its model workers for `GET /api/v1/workers`. The job system around it (queue, model locks,
cancellation, time limit, storage) is the same for every executor.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, Field

from lnscope.analysis.pipeline import PreparedRun, run_prepared
from lnscope.analysis.progress import Progress
from lnscope.server.compute_threads import device_key, run_on

if TYPE_CHECKING:
    from lnscope.server.state import ServerState

WorkerState = Literal["loading", "idle", "busy", "dead"]


class WorkerInfo(BaseModel):
    """One model worker: a (pair, role) model held on a device, and what it is doing."""

    pair: str
    role: str
    node: str = Field(description="the machine (host name, or the Ray node id) holding the model")
    device: str
    memory_bytes: int = Field(description="the model's parameters and buffers on its device")
    state: WorkerState
    queue_length: int = Field(description="jobs waiting for this model")
    jobs_done: int


class Executor(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def run(self, run: PreparedRun, progress: Progress, *, time_limit_s: float | None = None) -> BaseModel:
        """The combined result of `run` (blocking; called on a job worker thread); model workers elsewhere stop
        a unit at `time_limit_s` themselves (here the job's Progress does)."""

    def workers(self) -> list[WorkerInfo]: ...


@dataclass
class _Activity:
    """What the local executor knows of one model: jobs waiting for it, running on it, done."""

    waiting: int = 0
    running: int = 0
    done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class LocalExecutor:
    """Units run in this process, on the models the server's cache holds (each role on its device)."""

    name = "local"

    def __init__(self, state: "ServerState") -> None:
        self.state = state
        self._activity: dict[tuple[str, str], _Activity] = {}
        self._guard = threading.Lock()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def _track(self, pair: str, roles: list[str]) -> list[_Activity]:
        with self._guard:
            return [self._activity.setdefault((pair, role), _Activity()) for role in roles]

    def run(self, run: PreparedRun, progress: Progress, *, time_limit_s: float | None = None) -> BaseModel:
        """The run on its devices' compute thread (compute_threads: one OpenMP team per device, not per job)."""
        devices = [str(self.state.role_device(run.pair, role)) for role in run.roles]
        return run_on(device_key(devices), lambda: self._run_here(run, progress))

    def _run_here(self, run: PreparedRun, progress: Progress) -> BaseModel:
        progress.stage("loading models", 0.0)
        models = {role: self.state.load_role(run.pair, role) for role in run.roles}
        activity = self._track(run.pair.name, run.roles)
        for a in activity:
            with a.lock:
                a.running += 1
        try:
            return run_prepared(run, models, progress)
        finally:
            for a in activity:
                with a.lock:
                    a.running -= 1
                    a.done += 1

    def workers(self) -> list[WorkerInfo]:
        """A worker per model this process has loaded (or is loading), with its jobs."""
        out = []
        for pair in self.state.registry:
            for role in pair.roles():
                status, _ = self.state.role_state(pair, role)
                if status == "not_loaded":
                    continue
                activity = self._track(pair.name, [role])[0]
                model = self.state.loaded_model(pair, role)
                out.append(WorkerInfo(
                    pair=pair.name, role=role, node=socket.gethostname(),
                    device=str(self.state.role_device(pair, role)),
                    memory_bytes=_model_bytes(model) if model is not None else 0,
                    state={"loading": "loading", "error": "dead"}.get(status, "busy" if activity.running else "idle"),
                    queue_length=self.state.jobs.waiting_for(f"{pair.source(role).describe()}|{role}"),
                    jobs_done=activity.done))
        return out


def _model_bytes(model) -> int:
    """Bytes of a loaded model's parameters and buffers."""
    module = model.bridge
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
