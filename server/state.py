"""What the server holds: the pair registry, the model cache and per-model load state."""

from __future__ import annotations

import logging
import threading

from analysis.device import dtype_name, resolve_device, resolve_dtype
from analysis.errors import LnscopeError
from analysis.loading import ModelCache, model_cache
from analysis.pairs import ModelSource, PairRegistry, PairSpec

from server.settings import Settings

logger = logging.getLogger("lnscope.server")


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
        self._errors: dict[tuple[str, str], str] = {}
        self._loading: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def role_state(self, pair: PairSpec, role: str) -> tuple[str, str | None]:
        key = (pair.name, role)
        if self.cache.is_loaded(pair.source(role), role, device=self.device, dtype=self.dtype):
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

    def load_pair(self, pair: PairSpec) -> None:
        """Load every role of a pair, recording failures instead of raising (for background use)."""
        for role, source in pair.roles().items():
            key = (pair.name, role)
            with self._lock:
                self._loading.add(key)
                self._errors.pop(key, None)
            try:
                self.cache.get(source, role, device=self.device, dtype=self.dtype)
            except LnscopeError as exc:
                logger.error("cannot load %s/%s: %s", pair.name, role, exc)
                with self._lock:
                    self._errors[key] = str(exc)
            except Exception as exc:  # keep serving; the reason is shown by GET /models
                logger.exception("unexpected error loading %s/%s", pair.name, role)
                with self._lock:
                    self._errors[key] = f"{type(exc).__name__}: {exc}"
            finally:
                with self._lock:
                    self._loading.discard(key)

    def preload_in_background(self) -> threading.Thread:
        pair = self.registry.get(self.default_pair)
        thread = threading.Thread(target=self.load_pair, args=(pair,), name="lnscope-preload", daemon=True)
        thread.start()
        return thread
