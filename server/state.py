"""What the server holds: registry, model cache, per-model load state, the store and the jobs."""

from __future__ import annotations

import logging
import os
import threading

import torch

from lnscope.analysis.device import dtype_name, resolve_device, resolve_dtype
from lnscope.analysis.errors import ConfigError, LnscopeError, ModelLoadError
from lnscope.analysis.kinds.base import Limits
from lnscope.analysis.loading import ModelCache, model_cache, pair_tokenizer
from lnscope.analysis.pairs import ModelSource, PairRegistry, PairSpec, place_roles
from lnscope.server.compute_threads import device_key, run_on
from lnscope.server.executors import Executor, LocalExecutor
from lnscope.server.jobs import JobManager
from lnscope.server.settings import Settings
from lnscope.server.storage import StoreHealth, database_url, open_store

logger = logging.getLogger("lnscope.server")
HEARTBEAT_S = 5.0  # how often the server says it is alive and checks its database
LEASE_S = 30.0  # a server silent this long is gone: its unfinished jobs are marked failed


def _in_hub_cache(source: ModelSource) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.hub_id, "config.json", revision=source.revision)
    return isinstance(found, str)


class ServerState:
    def __init__(self, settings: Settings, registry: PairRegistry | None = None, cache: ModelCache | None = None):
        self.settings = settings
        self.registry = registry or PairRegistry.load()
        self.cache = cache or model_cache
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.default_pair = self.registry.get(settings.pair or self.registry.default_pair).name
        self.limits = Limits(max_prompts=settings.max_prompts, max_prompt_tokens=settings.max_prompt_tokens,
                             max_forward_passes=settings.max_forward_passes, max_graph_bytes=settings.max_graph_bytes)
        self.store = open_store(database_url(settings.data_dir, settings.database_url))
        self.jobs = JobManager(self.store, workers=settings.workers, max_queue=settings.max_queue,
                               max_waiters=settings.max_waiters, memory_budget_bytes=settings.graph_memory_bytes)
        self.database = StoreHealth(writable=True, message=None)  # the last check, read by /health
        self.executor = make_executor(self)
        self._maintenance_stop = threading.Event()
        self._errors: dict[tuple[str, str], str] = {}
        self._loading: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def start(self) -> None:
        self.store.recover_orphans(LEASE_S)
        self.executor.start()
        self.jobs.start()
        self._maintenance_stop = threading.Event()
        threading.Thread(target=self._maintain, args=(self._maintenance_stop,), name="lnscope-maintenance",
                         daemon=True).start()
        if self.settings.preload:
            logger.info("loading pair %s on %s in the background", self.default_pair, self.device)
            self.preload_in_background()

    def stop(self) -> None:
        self._maintenance_stop.set()
        self.jobs.stop()
        self.executor.stop()
        self.store.close()

    def _maintain(self, stop: threading.Event) -> None:
        """Every few seconds: the heartbeat and a check of the database (for /health); now and then, the
        jobs of servers that are gone (another replica's, a killed process's) are marked failed."""
        beats = 0
        while not stop.wait(HEARTBEAT_S):
            self.database = self.store.check()
            beats += 1
            if beats % max(1, round(LEASE_S / HEARTBEAT_S)) == 0 and self.database.writable:
                try:
                    self.store.recover_orphans(LEASE_S)
                except Exception:  # the next round tries again; /health reports the database
                    logger.exception("recovering orphaned jobs failed")

    def health(self) -> dict:
        """The database's last check and the workers' state; `ok` only when both are."""
        workers = self.jobs.alive()
        ok = self.database.writable and workers["workers_alive"] == workers["workers_expected"]
        return {"ok": ok, "database": {"writable": self.database.writable, "message": self.database.message},
                "workers": workers}

    # -- models ------------------------------------------------------------------------------
    def role_device(self, pair: PairSpec, role: str) -> torch.device:
        """Where the role's model runs here: its `device` in lnscope.toml's workers table, else the server's."""
        return resolve_device(place_roles(pair, [role], str(self.device))[role])

    def _role_dtype(self, pair: PairSpec, role: str) -> torch.dtype:
        return resolve_dtype(self.settings.dtype, self.role_device(pair, role))

    def loaded_model(self, pair: PairSpec, role: str):
        """The role's model if this process holds it (nothing is loaded)."""
        return self.cache.peek(pair.source(role), role, device=self.role_device(pair, role),
                               dtype=self._role_dtype(pair, role))

    def role_state(self, pair: PairSpec, role: str) -> tuple[str, str | None]:
        key = (pair.name, role)
        if self.loaded_model(pair, role) is not None:
            return "loaded", None
        with self._lock:
            if key in self._loading:
                return "loading", None
            if key in self._errors:
                return "error", self._errors[key]
        return "not_loaded", None

    def available_locally(self, source: ModelSource) -> bool:
        if source.path is not None:
            return (source.path / "config.json").is_file()
        return _in_hub_cache(source)

    def load_role(self, pair: PairSpec, role: str):
        """Load (or fetch from the cache) one model, recording the outcome for GET /models."""
        key = (pair.name, role)
        with self._lock:
            self._loading.add(key)
            self._errors.pop(key, None)
        device = self.role_device(pair, role)
        try:
            return run_on(device_key([str(device)]), lambda: self.cache.get(
                pair.source(role), role, device=device, dtype=self._role_dtype(pair, role)))
        except LnscopeError as exc:
            with self._lock:
                self._errors[key] = str(exc)
            raise
        except Exception as exc:
            with self._lock:
                self._errors[key] = f"{type(exc).__name__}: {exc}"
            raise ModelLoadError(f"cannot load {pair.name}/{role}: {type(exc).__name__}: {exc}") from exc
        finally:
            with self._lock:
                self._loading.discard(key)

    def load_pair(self, pair: PairSpec) -> dict[str, str]:
        """Load every role, recording failures instead of raising; returns role -> error."""
        errors = {}
        for role in pair.roles():
            try:
                self.load_role(pair, role)
            except LnscopeError as exc:
                logger.error("cannot load %s/%s: %s", pair.name, role, exc)
                errors[role] = str(exc)
        return errors

    def preload_in_background(self) -> threading.Thread:
        pair = self.registry.get(self.default_pair)
        thread = threading.Thread(target=self.load_pair, args=(pair,), name="lnscope-preload", daemon=True)
        thread.start()
        return thread

    def tokenizer(self, pair: PairSpec) -> tuple[object, int]:
        """The pair's tokenizer and context length, read from the original's files (no weights)."""
        return pair_tokenizer(pair)


def make_executor(state: ServerState) -> Executor:
    """The executor the settings name: this process's models, or Ray model workers (lnscope[cluster])."""
    if state.settings.executor == "local":
        return LocalExecutor(state)
    try:
        from lnscope.server.ray_executor import RayExecutor
    except ImportError as exc:
        raise ConfigError(f"LNSCOPE_EXECUTOR=ray needs Ray: pip install 'lnscope[cluster]' ({exc})") from None
    # A local instance (no address) gets logical CPU slots for a trio of workers even on a 2-core machine.
    local = {} if state.settings.ray_address else {"num_cpus": max(os.cpu_count() or 1, 8)}
    return RayExecutor(state.settings.ray_address, device=state.settings.device, dtype=state.settings.dtype, **local)
