"""Model workers on a Ray cluster: one named actor per (pair, role) holds its model; the API process holds none.

`RayExecutor.run` sends a prepared request's per-role units to the roles' actors (the lead role first
when the kind shares what it chose, the others in parallel), polls their progress into the job's
Progress, and combines the partials here. Each actor runs one unit at a time (hooks are process
state) but answers progress, cancel and info calls while a unit runs. Ray restarts an actor whose
process dies; the job that was running on it fails with `WorkerDied` and the next one works.

Actors are detached and named `"{pair}:{role}"` in the executor's namespace, so an API process that
restarts finds the loaded models again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

import ray
from pydantic import BaseModel
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from lnscope.analysis.errors import LnscopeError
from lnscope.analysis.kinds import KINDS
from lnscope.analysis.kinds.base import KindOptions, UnitContext
from lnscope.analysis.loading import LoadedModel, ModelCache
from lnscope.analysis.pairs import PairSpec
from lnscope.analysis.pipeline import PreparedRun, combine_partials
from lnscope.analysis.progress import Cancelled, Progress
from lnscope.server.executors import WorkerInfo, WorkerState, _model_bytes

logger = logging.getLogger("lnscope.server.ray")

POLL_S = 0.5  # how often the API side reads the actors' progress while units run
CALL_TIMEOUT_S = 2.0  # a progress / info call unanswered this long counts as unreachable
CANCEL_GRACE_S = 30.0  # how long `run` waits for stopped units to reach a stage boundary before it returns
CANCEL_MEMORY_S = 3600.0  # cancelled job tokens are remembered this long (a cancel may arrive before its unit)
UNIT_SLOTS = 64  # unit calls an actor accepts at once (they wait for its lock)
CONTROL_SLOTS = 4  # threads answering progress / cancel / info while units run


class WorkerDied(LnscopeError):
    """A model worker's process died while it ran a job's unit; Ray is restarting it."""

    error_kind = "worker_died"


@dataclass(frozen=True)
class UnitCall:
    """What an actor needs besides the inputs to run one unit (the inputs travel as an object-store ref)."""

    token: str  # identifies the job's run on every actor (progress, cancel)
    kind: str
    options: KindOptions
    seed: int
    pair: PairSpec
    deadline: float | None  # wall-clock time (time.time()) past which the unit stops at its next stage


class JobTimedOut(Cancelled):
    """A unit ran past the deadline it was given; re-raised in the API as the job manager's JobTimeout."""


@ray.remote(concurrency_groups={"units": UNIT_SLOTS, "control": CONTROL_SLOTS})
class ModelWorker:
    """One model of a pair, loaded once in this process; runs units one at a time and reports on them."""

    def __init__(self, pair: PairSpec, role: str, device: str | None, dtype: str | None) -> None:
        self.pair, self.role = pair, role
        self._device = device or ("cuda" if ray.get_gpu_ids() else "cpu")
        self._dtype = dtype
        self._cache = ModelCache()
        self._unit_lock = threading.Lock()  # one unit at a time: hooks are process state
        self._guard = threading.Lock()
        self._waiting = 0
        self._running: str | None = None
        self._done = 0
        self._load_error: str | None = None
        self._stages: dict[str, tuple[str, float]] = {}
        self._cancelled: dict[str, float] = {}
        threading.Thread(target=self._preload, name="lnscope-preload", daemon=True).start()

    def _preload(self) -> None:
        """Load the model as the actor starts, so the first job finds it ready."""
        try:
            self._model_for(self.pair)
        except Exception as exc:  # reported by info(); the next unit tries again and raises it
            self._load_error = f"{type(exc).__name__}: {exc}"
            logger.warning("model worker %s:%s could not load its model: %s", self.pair.name, self.role, exc)

    def _model_for(self, pair: PairSpec) -> LoadedModel:
        """The role's model of `pair` (reloaded when its weights or its source changed)."""
        if pair.source(self.role) != self.pair.source(self.role):
            self._cache.clear()
        self.pair = pair
        model = self._cache.get(pair.source(self.role), self.role, device=self._device, dtype=self._dtype)
        self._load_error = None
        return model

    def _loaded(self) -> LoadedModel | None:
        """The model if it is loaded (no waiting)."""
        source = self.pair.source(self.role)
        if not self._cache.is_loaded(source, self.role, device=self._device, dtype=self._dtype):
            return None
        return self._cache.get(source, self.role, device=self._device, dtype=self._dtype)

    @ray.method(concurrency_group="units")
    def run_unit(self, call: UnitCall, inputs: Any, shared: dict[str, Any]) -> tuple[BaseModel, dict[str, Any]]:
        """The kind's unit on this model, and the model's manifest; waits for any unit running before it."""
        self._update(call.token, waiting=1, stage=("waiting for the model worker", 0.0))
        try:
            with self._unit_lock:
                self._update(call.token, waiting=-1, running=call.token)
                return self._run_locked(call, inputs, shared)
        finally:
            self._finish(call.token)

    def _run_locked(self, call: UnitCall, inputs: Any, shared: dict[str, Any]) -> tuple[BaseModel, dict[str, Any]]:
        """Run one unit holding the lock, reporting into this job's progress and stopping when told."""
        progress = Progress(lambda stage, fraction: self._update(call.token, stage=(stage, fraction)),
                            lambda: self._should_stop(call))
        progress.stage("loading the model", 0.0)
        model = self._model_for(call.pair)
        partial = KINDS[call.kind].unit(UnitContext(model=model, inputs=inputs, options=call.options, seed=call.seed,
                                                    pair=call.pair, progress=progress, shared=shared))
        return partial, model.manifest()

    def _update(self, token: str, *, waiting: int = 0, running: str | None = None,
                stage: tuple[str, float] | None = None) -> None:
        with self._guard:
            self._waiting += waiting
            if running is not None:
                self._running = running
            if stage is not None:
                self._stages[token] = stage

    def _finish(self, token: str) -> None:
        """Forget a unit that ended (whatever its outcome)."""
        with self._guard:
            if self._running == token:
                self._running = None
                self._done += 1
            else:  # stopped while it waited for the lock
                self._waiting -= 1
            self._stages.pop(token, None)
            self._cancelled.pop(token, None)

    def _should_stop(self, call: UnitCall) -> bool:
        """Whether the job was cancelled; raises JobTimedOut past its deadline."""
        if call.deadline is not None and time.time() > call.deadline:
            raise JobTimedOut("the job ran past its time limit on the model worker")
        with self._guard:
            return call.token in self._cancelled

    @ray.method(concurrency_group="control")
    def cancel(self, token: str) -> None:
        """Stop the unit of job `token` at its next stage boundary (or before it starts)."""
        now = time.time()
        with self._guard:
            self._cancelled = {t: at for t, at in self._cancelled.items() if now - at < CANCEL_MEMORY_S}
            self._cancelled[token] = now

    @ray.method(concurrency_group="control")
    def progress(self, token: str) -> tuple[str, float] | None:
        """The (stage, fraction) job `token` last reported here, None when it has no unit here."""
        with self._guard:
            return self._stages.get(token)

    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        """The worker's state, device, model memory, node, queue length and units done (WorkerInfo's fields)."""
        model = self._loaded()
        with self._guard:
            state: WorkerState = "busy" if self._running else "idle"
            waiting, done = self._waiting, self._done
        if model is None:
            state = "dead" if self._load_error else "loading"
        return {"pair": self.pair.name, "role": self.role, "node": ray.get_runtime_context().get_node_id(),
                "device": str(model.device) if model is not None else self._device,
                "memory_bytes": _model_bytes(model) if model is not None else 0,
                "state": state, "queue_length": waiting, "jobs_done": done}

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        """This worker's process id (tests kill it)."""
        return os.getpid()


class _RemoteModel:
    """A model held by a worker, as `combine_partials` reads it here: only its manifest."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self._manifest = manifest

    def manifest(self) -> dict[str, Any]:
        return self._manifest


def worker_name(pair: str, role: str) -> str:
    return f"{pair}:{role}"


class RayExecutor:
    """Units run on Ray actors, one per (pair, role), each holding its model; results are combined here."""

    name = "ray"

    def __init__(self, address: str | None = None, *, device: str | None = None, dtype: str | None = None,
                 namespace: str = "lnscope", time_limit_s: float | None = None, **init_options: Any) -> None:
        """`address`: "auto", "ray://host:10001", or None for a local Ray instance this executor starts.

        `time_limit_s` bounds each run on the workers (a backstop for units the API can no longer stop);
        `init_options` go to `ray.init` (e.g. num_cpus for a local instance).
        """
        self.address, self.device, self.dtype, self.namespace = address, device, dtype, namespace
        self.time_limit_s = time_limit_s
        self._init_options = init_options
        self._owns_ray = False
        self._actors: dict[str, Any] = {}
        self._guard = threading.Lock()

    def start(self) -> None:
        """Connect to the cluster at `address`, or start a local Ray instance (none if already connected)."""
        if ray.is_initialized():
            logger.info("ray executor: using this process's Ray connection")
            return
        ray.init(address=self.address or "local", namespace=self.namespace, include_dashboard=False,
                 **self._init_options)
        self._owns_ray = True
        logger.info("ray executor: connected to %s (namespace %s)", self.address or "a local instance", self.namespace)

    def stop(self) -> None:
        """Disconnect (a local instance this executor started goes down with its workers)."""
        with self._guard:
            self._actors.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def actor(self, pair: PairSpec, role: str) -> Any:
        """The (pair, role) model worker: found by name, else created with the role's resources."""
        name = worker_name(pair.name, role)
        with self._guard:
            if name not in self._actors:
                self._actors[name] = ModelWorker.options(
                    name=name, namespace=self.namespace, get_if_exists=True, lifetime="detached", max_restarts=-1,
                    **self._resources(pair, role)).remote(pair, role, self.device, self.dtype)
            return self._actors[name]

    def _resources(self, pair: PairSpec, role: str) -> dict[str, Any]:
        """Ray resources of a role's worker: its WorkerSpec, else one GPU on a cluster with GPUs, else one CPU."""
        spec = pair.worker(role)
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        options: dict[str, Any] = {"num_cpus": spec.num_cpus if spec.num_cpus is not None else 1,
                                   "num_gpus": spec.num_gpus if spec.num_gpus is not None else int(has_gpus)}
        if spec.memory_bytes is not None:
            options["memory"] = spec.memory_bytes
        return options

    def ready_actors(self, pair: PairSpec, roles: list[str], progress: Progress) -> dict[str, Any]:
        """The roles' workers once each answers: waits while Ray (re)starts one, recreates one that is gone."""
        ready: dict[str, Any] = {}
        while len(ready) < len(roles):
            calls = {role: self.actor(pair, role) for role in roles if role not in ready}
            pings = {role: actor.pid.remote() for role, actor in calls.items()}
            for role, ping in pings.items():
                try:
                    ray.get(ping, timeout=CALL_TIMEOUT_S)
                    ready[role] = calls[role]
                except ActorDiedError:
                    self._forget(pair.name, role)
                except (ActorUnavailableError, GetTimeoutError):
                    time.sleep(POLL_S)
            for role in calls.keys() - ready.keys():
                progress.stage(f"{role}: waiting for the model worker to start", 0.0)
        return {role: ready[role] for role in roles}

    def _forget(self, pair: str, role: str) -> None:
        """Drop a cached handle, so the next run looks the worker up (or creates it) again."""
        with self._guard:
            self._actors.pop(worker_name(pair, role), None)

    def run(self, run: PreparedRun, progress: Progress, *, time_limit_s: float | None = None) -> BaseModel:
        """The combined result of `run`, its units run on the roles' workers (blocking, on a job thread).

        `time_limit_s` (default: the executor's) stops the units on the workers past it, with JobTimeout.
        """
        progress.stage("waiting for model workers", 0.0)
        roles = run.kind.in_result_order(run.roles)
        actors = self.ready_actors(run.pair, roles, progress)
        limit = time_limit_s if time_limit_s is not None else self.time_limit_s
        deadline = time.time() + limit if limit is not None else None
        call = UnitCall(token=uuid.uuid4().hex, kind=run.kind.name, options=run.options, seed=run.request.seed,
                        pair=run.pair, deadline=deadline)
        session = _RunSession(self, run, call, actors, ray.put(run.inputs), progress)
        outputs = session.execute(roles)
        partials = {role: outputs[role][0] for role in roles}
        models = {role: _RemoteModel(outputs[role][1]) for role in roles}
        return combine_partials(run.kind, partials, models, lead=session.lead, inputs=run.inputs,  # type: ignore[arg-type]
                                options=run.options, pair=run.pair, seed=run.request.seed)

    def workers(self) -> list[WorkerInfo]:
        """A WorkerInfo per model worker of this namespace; "dead" where the worker cannot be reached."""
        names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["namespace"] == self.namespace and a["name"].count(":") == 1)
        calls = {}
        for name in names:
            try:
                calls[name] = ray.get_actor(name, namespace=self.namespace).info.remote()
            except (ValueError, RayActorError):
                calls[name] = None
        return [self._info(name, ref) for name, ref in calls.items()]

    @staticmethod
    def _info(name: str, ref: Any) -> WorkerInfo:
        """One worker's info, or a "dead" entry when it does not answer."""
        pair, role = name.split(":")
        if ref is not None:
            try:
                return WorkerInfo(**ray.get(ref, timeout=CALL_TIMEOUT_S))
            except (RayActorError, GetTimeoutError) as exc:
                logger.info("model worker %s does not answer: %s", name, type(exc).__name__)
        return WorkerInfo(pair=pair, role=role, node="", device="", memory_bytes=0, state="dead", queue_length=0,
                          jobs_done=0)

    def shutdown_workers(self) -> None:
        """Kill this namespace's model workers for good (they are detached: they outlive API processes)."""
        for info in self.workers():
            try:
                ray.kill(ray.get_actor(worker_name(info.pair, info.role), namespace=self.namespace), no_restart=True)
            except ValueError:
                pass
        with self._guard:
            self._actors.clear()


class _RunSession:
    """One `run`: units sent to the workers, their progress polled into the job's, stopped on any failure."""

    def __init__(self, executor: RayExecutor, run: PreparedRun, call: UnitCall, actors: Mapping[str, Any],
                 inputs_ref: Any, progress: Progress) -> None:
        self.executor, self.run, self.call, self.actors = executor, run, call, actors
        self.inputs_ref, self.progress = inputs_ref, progress
        self.lead = run.kind.lead_role(list(actors))
        self._pending: dict[Any, str] = {}  # unit ref -> role, units not yet ended

    def execute(self, roles: list[str]) -> dict[str, tuple[BaseModel, dict[str, Any]]]:
        """Every role's (partial, manifest): the lead first when the kind shares, the others in parallel."""
        try:
            if self.run.kind.shares is None:
                return self._phase(roles, {}, 0.0, 1.0)
            span = 1 / len(roles)
            first = self._phase([self.lead], {}, 0.0, span)
            shared = self.run.kind.shares(first[self.lead][0])
            rest = self._phase([r for r in roles if r != self.lead], shared, span, 1.0)
            return {**first, **rest}
        except BaseException:
            self._stop_units()
            raise

    def _phase(self, roles: list[str], shared: dict[str, Any], start: float,
               end: float) -> dict[str, tuple[BaseModel, dict[str, Any]]]:
        """Run `roles`' units in parallel, reporting into [start, end] of the job's progress."""
        if not roles:
            return {}
        refs = {self.actors[role].run_unit.remote(self.call, self.inputs_ref, shared): role for role in roles}
        self._pending.update(refs)
        fractions = {role: 0.0 for role in roles}
        outputs: dict[str, tuple[BaseModel, dict[str, Any]]] = {}
        overall = lambda: start + (end - start) * sum(fractions.values()) / len(roles)
        polled = time.monotonic()
        while len(outputs) < len(roles):
            waiting = [ref for ref in refs if refs[ref] not in outputs]
            ready, _ = ray.wait(waiting, num_returns=1, timeout=POLL_S)
            for ref in ready:
                role = self._pending.pop(ref)
                outputs[role] = self._result(ref, role)
                fractions[role] = 1.0
                self.progress.stage(f"{role}: done", overall())
            if time.monotonic() - polled >= POLL_S:
                self._poll({refs[ref] for ref in waiting if ref not in ready}, fractions, overall)
                polled = time.monotonic()
        return outputs

    def _poll(self, roles: set[str], fractions: dict[str, float], overall) -> None:
        """Report the running roles' stages into the job's progress (which raises when the job must stop)."""
        calls = {role: self.actors[role].progress.remote(self.call.token) for role in roles}
        for role, ref in calls.items():
            try:
                reported = ray.get(ref, timeout=CALL_TIMEOUT_S)
            except (RayActorError, GetTimeoutError):
                continue  # a dead worker shows in its unit's result
            if reported is not None:
                stage, fractions[role] = reported
                self.progress.stage(f"{role}: {stage}", overall())
        self.progress.check()

    def _result(self, ref: Any, role: str) -> tuple[BaseModel, dict[str, Any]]:
        """A unit's (partial, manifest); the unit's own error, or WorkerDied when its worker's process died."""
        try:
            return ray.get(ref)
        except RayActorError as exc:
            self.executor._forget(self.run.pair.name, role)
            raise WorkerDied(f"the model worker {worker_name(self.run.pair.name, role)} died ({_reason(exc)}); "
                             f"it is being restarted: submit the job again") from None
        except RayTaskError as exc:
            raise _cause(exc) from None

    def _stop_units(self) -> None:
        """Tell the workers to stop this job's units and wait (a while) until they have."""
        if not self._pending:
            return
        for role in set(self._pending.values()):
            self.actors[role].cancel.remote(self.call.token)
        ray.wait(list(self._pending), num_returns=len(self._pending), timeout=CANCEL_GRACE_S)
        self._pending.clear()


def _cause(exc: RayTaskError) -> BaseException:
    """The exception a unit raised on its worker (JobTimedOut as the job manager's JobTimeout)."""
    cause = exc.cause if isinstance(exc.cause, BaseException) else RuntimeError(str(exc).splitlines()[0])
    if isinstance(cause, JobTimedOut):
        from lnscope.server.jobs import JobTimeout

        return JobTimeout(str(cause))
    if not isinstance(cause, LnscopeError):
        logger.warning("a unit failed on its model worker:\n%s", exc)
    return cause


def _reason(exc: RayActorError) -> str:
    """A short reason from Ray's actor error (its full text is logged)."""
    logger.warning("a model worker died: %s", exc)
    text = str(exc).lower()
    if "out of memory" in text or "oom" in text.split():
        return "out of memory"
    if isinstance(exc, ActorUnavailableError):
        return "its process stopped answering"
    return "its process exited"
