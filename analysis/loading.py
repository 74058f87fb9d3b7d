"""Load a pair's models into TransformerLens 4 bridges, once per process, on one device.

- `original`, `control`: booted, then compatibility mode (LN folded, writing weights and the
  unembedding centred) so DLA-style analyses work in the residual basis.
- `ln_free`: the released format is checked, made exactly linear and folded, and every LN is
  replaced by an identity (see analysis.ln_free).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

try:  # the HTTP client huggingface_hub is built on (httpx2 from hub 1.x on)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from lnscope.analysis import __version__
from lnscope.analysis.device import dtype_name, resolve_device, resolve_dtype
from lnscope.analysis.errors import ModelLoadError
from lnscope.analysis.ln_free import check_released_format, linearize_layer_norms, remove_normalization
from lnscope.analysis.pairs import ModelSource, PairSpec, Role
from lnscope.analysis.tl_compat import keep_float64_in_weight_processing

keep_float64_in_weight_processing()
logger = logging.getLogger(__name__)

WEIGHT_PROCESSING: dict[str, bool] = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
}


@dataclass
class LoadedModel:
    """One model of a trio, ready for analysis."""

    role: Role
    source: ModelSource
    bridge: TransformerBridge
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    ln_treatment: str  # "folded" (LN kept, weights folded) or "removed" (no normalization)
    weight_processing: dict[str, bool] = field(default_factory=lambda: dict(WEIGHT_PROCESSING))

    @property
    def tokenizer(self):
        return self.bridge.tokenizer

    @property
    def has_layer_norm(self) -> bool:
        return self.ln_treatment != "removed"

    def manifest(self) -> dict[str, Any]:
        """What a result computed on this model needs to be reproduced."""
        from importlib.metadata import version

        return {
            "role": self.role,
            "source": self.source.to_json(),
            "weight_processing": self.weight_processing,
            "ln_treatment": self.ln_treatment,
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
            "versions": {
                "lnscope": __version__,
                "transformer_lens": version("transformer-lens"),
                "transformers": version("transformers"),
                "torch": torch.__version__,
            },
        }


def _hub_error(source: ModelSource, role: str, exc: BaseException) -> ModelLoadError:
    """A message naming the id and saying how to point the pair at a local directory instead."""
    from huggingface_hub import errors as hub_errors

    reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if isinstance(exc, hub_errors.GatedRepoError):
        why = "it is gated: accept its licence on huggingface.co and log in (`hf auth login`)"
    elif isinstance(exc, hub_errors.RevisionNotFoundError):
        why = f"revision {source.revision!r} does not exist"
    elif isinstance(exc, hub_errors.RepositoryNotFoundError):
        why = "no such model on the Hub (or it is private)"
    elif isinstance(exc, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled,
                          httpx.TransportError, ConnectionError, TimeoutError)):
        why = "the Hub cannot be reached (no network or offline mode) and it is not in the local cache"
    else:
        why = f"it could not be fetched ({reason})"
    rev = f" --revision {source.revision}" if source.revision else ""
    return ModelLoadError(
        f"cannot load {role} model {source.describe()!r} from the Hugging Face Hub: {why}. "
        f"To use a local copy, download it where the Hub is reachable "
        f"(`hf download {source.hub_id}{rev} --local-dir DIR`) and point the pair at it in "
        f"lnscope.toml: `{role} = {{ path = \"DIR\" }}`, or pass --{role.replace('_', '-')} DIR."
    )


def _fetch_config(source: ModelSource, role: str) -> None:
    """Resolve the checkpoint's config.json first: the Hub's typed errors say what is wrong."""
    if source.path is not None:
        if not source.path.is_dir():
            raise ModelLoadError(
                f"{role} model directory {source.path} does not exist"
                + (" (build the embedded trio with `make tiny-models`)" if "tiny" in source.path.parts else "")
            )
        if not (source.path / "config.json").is_file():
            raise ModelLoadError(
                f"{role} model directory {source.path} has no config.json (not a save_pretrained directory)"
            )
        return
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(source.hub_id, "config.json", revision=source.revision)
    except (hub_errors.HfHubHTTPError, hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled,
            httpx.HTTPError, OSError) as exc:
        raise _hub_error(source, role, exc) from exc


_tokenizers: dict[tuple, tuple[Any, Any]] = {}  # (location, fingerprint) -> (tokenizer, config)
_tokenizers_lock = threading.Lock()
FAILURE_MEMORY_S = 60.0  # a source that failed to load is answered from memory this long (no Hub wait per request)


class FailureMemory:
    """Load failures per key, re-raised at once for `ttl_s` seconds instead of trying (and waiting) again."""

    def __init__(self, ttl_s: float = FAILURE_MEMORY_S) -> None:
        self.ttl_s = ttl_s
        self._failures: dict[Any, tuple[float, ModelLoadError]] = {}
        self._lock = threading.Lock()

    def check(self, key: Any) -> None:
        with self._lock:
            failure = self._failures.get(key)
        if failure is not None and time.monotonic() - failure[0] < self.ttl_s:
            raise failure[1]

    def remember(self, key: Any, error: ModelLoadError) -> None:
        with self._lock:
            self._failures[key] = (time.monotonic(), error)

    def forget(self, key: Any) -> None:
        with self._lock:
            self._failures.pop(key, None)


load_failures = FailureMemory()


def pair_tokenizer(pair: PairSpec) -> tuple[Any, int]:
    """The pair's tokenizer and context length, read once from the original's files (no weights).

    Every role of a pair shares this tokenizer; requests are tokenized with it before any model loads.
    """
    tokenizer, config = _pair_files(pair)
    return tokenizer, int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024))


def pair_config(pair: PairSpec) -> Any:
    """The original's Hugging Face config (sizes for cost estimates), read once with the tokenizer."""
    return _pair_files(pair)[1]


def _pair_files(pair: PairSpec) -> tuple[Any, Any]:
    """The original's tokenizer and config, cached per directory and weights; a failure is remembered."""
    source = pair.original
    key = (source.location, source.fingerprint())
    with _tokenizers_lock:
        if key in _tokenizers:
            return _tokenizers[key]
    load_failures.check(("tokenizer", key))
    try:
        files = _load_tokenizer(pair)
    except ModelLoadError as exc:
        load_failures.remember(("tokenizer", key), exc)
        raise
    with _tokenizers_lock:
        _tokenizers[key] = files
    return files


def _load_tokenizer(pair: PairSpec) -> tuple[Any, Any]:
    """The original's tokenizer and config, or a ModelLoadError saying why not."""
    from transformers import AutoConfig, AutoTokenizer

    source = pair.original
    _fetch_config(source, "original")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, revision=source.revision)
        config = AutoConfig.from_pretrained(source.location, revision=source.revision)
    except OSError as exc:
        raise ModelLoadError(f"cannot load the tokenizer of pair {pair.name!r}: {exc}") from exc
    return tokenizer, config


def load_hf_model(source: ModelSource, role: str, dtype: torch.dtype) -> torch.nn.Module:
    """The plain Hugging Face causal LM, with eager attention (as the bridge uses)."""
    from transformers import AutoModelForCausalLM

    _fetch_config(source, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.location, revision=source.revision, dtype=dtype, attn_implementation="eager"
        )
    except OSError as exc:
        if source.is_local:
            raise ModelLoadError(f"cannot load {role} model from {source.path}: {exc}") from exc
        raise _hub_error(source, role, exc) from exc
    return model.eval()


# transformers builds models under process-global patches (meta-device init, tied-weight set-up),
# so two from_pretrained / boot calls in different threads corrupt each other (a parameter left on
# the meta device). Loads are CPU-bound anyway: one at a time per process.
_LOAD_LOCK = threading.RLock()


def load_model(
    source: ModelSource,
    role: Role,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load one model of a trio (uncached; use ModelCache in long-lived processes)."""
    with _LOAD_LOCK:
        return _load_model(source, role, device=device, dtype=dtype)


def _load_model(source: ModelSource, role: Role, *, device, dtype) -> LoadedModel:
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    start = time.perf_counter()
    hf_model = load_hf_model(source, role, dtype)
    if role == "ln_free":
        check_released_format(hf_model, f"{source.describe()!r}")
        linearize_layer_norms(hf_model)
    try:
        bridge = TransformerBridge.boot_transformers(
            source.location, hf_model=hf_model, device=device, dtype=dtype, revision=source.revision
        )
        bridge.enable_compatibility_mode(disable_warnings=True, **WEIGHT_PROCESSING)
    except (OSError, ValueError, NotImplementedError) as exc:
        raise ModelLoadError(f"TransformerLens cannot boot {role} model {source.describe()!r}: {exc}") from exc
    ln_treatment = "folded"
    if role == "ln_free":
        remove_normalization(bridge)
        ln_treatment = "removed"
    bridge.eval()
    seconds = time.perf_counter() - start
    logger.info("loaded %s model %s on %s (%s) in %.1f s", role, source.describe(), device, dtype_name(dtype), seconds)
    return LoadedModel(role, source, bridge, device, dtype, seconds, ln_treatment)


class ModelCache:
    """Each (source, role, device, dtype) is loaded once per process and reloaded when its weights change
    (`ModelSource.fingerprint`); concurrent asks wait; a failed load is answered from memory for a while."""

    def __init__(self) -> None:
        self._models: dict[tuple, tuple[str, LoadedModel]] = {}  # key -> (fingerprint, model)
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()
        self.failures = FailureMemory()
        self.loads = 0  # how many loads actually ran (for tests and /models)

    @staticmethod
    def _key(source: ModelSource, role: str, device: torch.device, dtype: torch.dtype) -> tuple:
        return (source, role, str(device), dtype)

    def _cached(self, key: tuple, fingerprint: str) -> LoadedModel | None:
        with self._guard:
            hit = self._models.get(key)
        return hit[1] if hit is not None and hit[0] == fingerprint else None

    def get(self, source: ModelSource, role: Role, *, device=None, dtype=None) -> LoadedModel:
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        key, fingerprint = self._key(source, role, device, dtype), source.fingerprint()
        if (model := self._cached(key, fingerprint)) is not None:
            return model
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if (model := self._cached(key, fingerprint)) is not None:
                return model
            self.failures.check((key, fingerprint))
            try:
                model = load_model(source, role, device=device, dtype=dtype)
            except ModelLoadError as exc:
                self.failures.remember((key, fingerprint), exc)
                raise
            with self._guard:
                self._models[key] = (fingerprint, model)  # replaces a model whose weights changed
                self.loads += 1
            return model

    def peek(self, source: ModelSource, role: str, *, device=None, dtype=None) -> LoadedModel | None:
        """The cached model of these current weights, or None (nothing is loaded)."""
        device = resolve_device(device)
        return self._cached(self._key(source, role, device, resolve_dtype(dtype, device)), source.fingerprint())

    def is_loaded(self, source: ModelSource, role: str, *, device=None, dtype=None) -> bool:
        return self.peek(source, role, device=device, dtype=dtype) is not None

    def load_pair(self, pair: PairSpec, roles: list[str] | None = None, *, device=None,
                  dtype=None) -> dict[str, LoadedModel]:
        """All (or the given) roles of a pair, on one shared device."""
        device = resolve_device(device)
        wanted = roles or list(pair.roles())
        return {role: self.get(pair.source(role), role, device=device, dtype=dtype) for role in wanted}

    def clear(self) -> None:
        with self._guard:
            self._models.clear()
            self._locks.clear()


model_cache = ModelCache()
