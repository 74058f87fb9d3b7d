"""Model trios: a pair's `original` (with LN), `ln_free` twin and optional LN-kept `control`.

Built-in pairs are the released checkpoints of the LN-free paper plus the embedded `tiny`
trio; users add pairs in a TOML file ($LNSCOPE_CONFIG, default ./lnscope.toml):

    default_pair = "my-pair"

    [pairs.my-pair]
    description = "GPT-2 small and my own LN-free run"
    original = "gpt2"                                  # a Hub id ...
    ln_free = { path = "/models/gpt2-noln" }           # ... or a local directory
    control = { id = "me/gpt2-vanilla", revision = "v2" }

Where each role's model runs ([workers] applies to every pair, built-in ones too; a pair's own
[pairs.<name>.workers.<role>] overrides it field by field):

    [workers.original]
    device = "cuda:0"                                  # cpu, cuda, cuda:N or mps (local executor)
    [workers.ln_free]
    device = "cuda:1"
    num_gpus = 1                                       # Ray resources of the role's model worker
    num_cpus = 2
    memory = "20GB"                                    # bytes, or B / KB / MB / GB / KiB / MiB / GiB ...

    [pairs.my-pair.workers.ln_free]
    device = "cuda:2"
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from lnscope.analysis.errors import ConfigError, UnknownPairError, UnknownRoleError

Role = Literal["original", "ln_free", "control"]
ROLES: tuple[Role, ...] = ("original", "ln_free", "control")

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def models_dir() -> Path:
    """Where the embedded trio lives: $LNSCOPE_MODELS_DIR, else the repository's models/."""
    return Path(os.environ.get("LNSCOPE_MODELS_DIR", PROJECT_ROOT / "models")).resolve()


def portable_path(path: str | Path) -> str:
    """`path` as files meant for committing write it: models/<relative> inside models_dir(), other paths as given."""
    try:
        relative = Path(path).resolve().relative_to(models_dir())
    except ValueError:
        return str(path)
    return (Path("models") / relative).as_posix()


@dataclass(frozen=True)
class ModelSource:
    """Where one model's weights come from: a Hugging Face id (+ revision) or a local directory."""

    hub_id: str | None = None
    revision: str | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        if (self.hub_id is None) == (self.path is None):
            raise ConfigError("a model source needs exactly one of a Hub id or a local path")

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def location(self) -> str:
        """What from_pretrained is given: the directory or the Hub id."""
        return str(self.path) if self.path is not None else str(self.hub_id)

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.hub_id}@{self.revision}" if self.revision else str(self.hub_id)

    def portable(self) -> str:
        """describe() as files meant for committing write it (see `portable_path`)."""
        return portable_path(self.path) if self.path is not None else self.describe()

    def fingerprint(self) -> str:
        """What identifies these weights now: the revision for a Hub id; for a local directory, a digest of
        its files' names, sizes and modification times (weights replaced at the same path change it)."""
        if self.path is None:
            return f"{self.hub_id}@{self.revision or 'main'}"
        files = sorted(p for p in self.path.iterdir() if p.is_file()) if self.path.is_dir() else []
        stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return hashlib.sha256(repr(stats).encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        # a path inside the models directory as models/<relative> (no machine's path in committed results)
        return {
            "hub_id": self.hub_id,
            "revision": self.revision,
            "path": portable_path(self.path) if self.path is not None else None,
        }


@dataclass(frozen=True)
class WorkerSpec:
    """Where one role's model runs: a device for the local executor, resources for a Ray model worker.

    Unset fields take the executor's defaults (the server's device; one GPU per worker on a cluster
    that has GPUs, else the CPU).
    """

    device: str | None = None  # e.g. "cuda:1" (local executor)
    num_gpus: float | None = None  # Ray resources of the role's model worker
    num_cpus: float | None = None
    memory_bytes: int | None = None


@dataclass(frozen=True)
class PairSpec:
    """A named trio. `control` is optional."""

    name: str
    original: ModelSource
    ln_free: ModelSource
    control: ModelSource | None = None
    description: str = ""
    builtin: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # Transcoder directories per role (any format analysis.transcoders loads); roles not listed
    # use models/<pair>/transcoders/<role>/.
    transcoders: dict[str, Path] = field(default_factory=dict, compare=False, hash=False)
    # Placement per role (lnscope.toml's [workers.<role>] and [pairs.<name>.workers.<role>]).
    workers: dict[str, WorkerSpec] = field(default_factory=dict, compare=False, hash=False)

    def worker(self, role: str) -> WorkerSpec:
        """The role's placement (defaults where lnscope.toml says nothing)."""
        return self.workers.get(role, WorkerSpec())

    def roles(self) -> dict[Role, ModelSource]:
        roles: dict[Role, ModelSource] = {"original": self.original, "ln_free": self.ln_free}
        if self.control is not None:
            roles["control"] = self.control
        return roles

    def source(self, role: str) -> ModelSource:
        roles = self.roles()
        if role not in roles:
            raise UnknownRoleError(
                f"pair {self.name!r} has no role {role!r}; its roles are {sorted(roles)}"
            )
        return roles[role]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "builtin": self.builtin,
            "roles": {role: src.to_json() for role, src in self.roles().items()},
            "transcoders": {role: str(path) for role, path in self.transcoders.items()},
        }


def _hub(hub_id: str, revision: str | None = None) -> ModelSource:
    return ModelSource(hub_id=hub_id, revision=revision)


def _paper_pair(size: str, original: str, steps: int) -> PairSpec:
    return PairSpec(
        name=f"gpt2-{size}",
        original=_hub(original),
        ln_free=_hub(f"schaeff/gpt2-{size}_LNFree{steps}"),
        control=_hub(f"schaeff/gpt2-{size}_vanilla{steps}"),
        description=f"GPT-2 {size} and its LN-free / LN-kept twins ({steps} fine-tuning steps; Baroni et al. 2025)",
    )


def builtin_pairs() -> dict[str, PairSpec]:
    tiny = models_dir() / "tiny"
    pairs = [
        _paper_pair("small", "gpt2", 300),
        _paper_pair("medium", "gpt2-medium", 500),
        _paper_pair("large", "gpt2-large", 600),
        _paper_pair("xl", "gpt2-xl", 800),
        PairSpec(
            name="gpt2-small-2024",
            original=_hub("gpt2"),
            ln_free=_hub("apollo-research/gpt2_noLN", "v4"),
            control=_hub("apollo-research/gpt2_noLN", "vanilla_1200"),
            description="GPT-2 small, LN removed by fine-tuning (Heimersheim 2024)",
        ),
        PairSpec(
            name="tiny",
            original=ModelSource(path=tiny / "original"),
            ln_free=ModelSource(path=tiny / "ln_free"),
            control=ModelSource(path=tiny / "control"),
            description="The embedded 4-layer trio in models/tiny, built by `make tiny-models`",
        ),
    ]
    return {p.name: p for p in pairs}


def _parse_source(value: Any, *, where: str, base_dir: Path) -> ModelSource:
    """A role entry: "hub/id", "./local/dir", {id=, revision=} or {path=}."""
    if isinstance(value, str):
        if value.startswith(("/", "./", "../", "~")):
            value = {"path": value}
        else:
            value = {"id": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a string or a table with `id` or `path`, got {value!r}")
    unknown = set(value) - {"id", "revision", "path"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (allowed: id, revision, path)")
    if "path" in value:
        if "id" in value or "revision" in value:
            raise ConfigError(f"{where}: give either `path` or `id` (+ `revision`), not both")
        path = Path(os.path.expanduser(str(value["path"])))
        if not path.is_absolute():
            path = base_dir / path
        return ModelSource(path=path.resolve())
    if "id" not in value or not isinstance(value["id"], str) or not value["id"]:
        raise ConfigError(f"{where}: needs `id` (a Hugging Face model id) or `path`")
    revision = value.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise ConfigError(f"{where}.revision: expected a string")
    return ModelSource(hub_id=value["id"], revision=revision)


WORKER_KEYS: tuple[str, ...] = ("device", "num_gpus", "num_cpus", "memory")
_DEVICE = re.compile(r"cpu|mps|cuda(?::(\d+))?")
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_memory(value: Any, *, where: str) -> int:
    """Bytes from an int or a size string such as "20GB", "512MiB" or "1.5GiB"."""
    expected = f'{where}: expected a number of bytes > 0 or a size such as "20GB", "512MiB", "1.5GiB"'
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.lower())) and match[2] in _SIZE_UNITS:
        size = round(float(match[1]) * _SIZE_UNITS[match[2]])
    else:
        raise ConfigError(f"{expected}, got {value!r}")
    if size <= 0:
        raise ConfigError(f"{expected}, got {value!r}")
    return size


def _parse_device(value: Any, *, where: str) -> str:
    """A torch device string: cpu, cuda, cuda:N or mps."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise ConfigError(f'{where}: expected a device ("cpu", "cuda", "cuda:N" or "mps"), got {value!r}')
    return value


def _parse_number(value: Any, *, where: str, allow_zero: bool) -> float:
    """A resource count: a number >= 0 (`allow_zero`) or > 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 or allow_zero and value == 0)
    if not ok:
        raise ConfigError(f"{where}: expected a number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def _parse_worker(table: Any, *, where: str) -> WorkerSpec:
    """One role's table: device, num_gpus, num_cpus, memory (each optional)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table with keys {', '.join(WORKER_KEYS)}")
    for key in table:
        if key not in WORKER_KEYS:
            raise ConfigError(f"{where}.{key}: unknown key (allowed: {', '.join(WORKER_KEYS)})")
    parsers = {
        "device": lambda v, w: _parse_device(v, where=w),
        "num_gpus": lambda v, w: _parse_number(v, where=w, allow_zero=True),
        "num_cpus": lambda v, w: _parse_number(v, where=w, allow_zero=False),
        "memory": lambda v, w: parse_memory(v, where=w),
    }
    parsed = {key: parsers[key](value, f"{where}.{key}") for key, value in table.items()}
    return WorkerSpec(device=parsed.get("device"), num_gpus=parsed.get("num_gpus"),
                      num_cpus=parsed.get("num_cpus"), memory_bytes=parsed.get("memory"))


def _parse_workers(value: Any, *, where: str) -> dict[str, WorkerSpec]:
    """A workers table: role = { device, num_gpus, num_cpus, memory }."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table of [workers.<role>] tables ({', '.join(ROLES)})")
    for role in value:
        if role not in ROLES:
            raise ConfigError(f"{where}.{role}: unknown role (roles: {', '.join(ROLES)})")
    return {role: _parse_worker(table, where=f"{where}.{role}") for role, table in value.items()}


def parse_workers(data: dict[str, Any], *, origin: str = "lnscope.toml") -> dict[str, WorkerSpec]:
    """The top-level [workers.<role>] tables of a parsed TOML document (every pair's placement)."""
    return _parse_workers(data.get("workers", {}), where=f"{origin}: workers")


def merge_worker(base: WorkerSpec, override: WorkerSpec) -> WorkerSpec:
    """`base` with every field `override` sets replaced."""
    changes = {f.name: getattr(override, f.name) for f in fields(override) if getattr(override, f.name) is not None}
    return replace(base, **changes)


def with_workers(spec: PairSpec, defaults: dict[str, WorkerSpec]) -> PairSpec:
    """`spec` with `defaults` under its own workers, for the roles it has."""
    workers = {
        role: merge_worker(defaults.get(role, WorkerSpec()), spec.workers.get(role, WorkerSpec()))
        for role in spec.roles()
        if role in defaults or role in spec.workers
    }
    return replace(spec, workers=workers)


def _cuda_index(device: str) -> int | None:
    """N of "cuda:N"; None for other devices and a bare "cuda"."""
    match = _DEVICE.fullmatch(device)
    return int(match[1]) if match and match[1] is not None else None


def _cuda_device_count() -> int | None:
    """This machine's CUDA device count; None where CUDA is not available."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else None


def place_roles(
    pair: PairSpec, roles: Iterable[str], default_device: str, *, device_count: int | None = None
) -> dict[str, str]:
    """Each role's device: its worker's `device`, else `default_device` (the local executor's placement).

    A "cuda:N" beyond the machine's CUDA devices is refused; `device_count` pretends a machine with that
    many (None: torch.cuda.device_count() where CUDA is available, else no check).
    """
    count = _cuda_device_count() if device_count is None else device_count
    placement: dict[str, str] = {}
    for role in roles:
        pair.source(role)
        device = pair.worker(role).device or str(default_device)
        index = _cuda_index(device)
        if count is not None and index is not None and index >= count:
            have = f"cuda:0..cuda:{count - 1}" if count else "none"
            raise ConfigError(f"pair {pair.name!r}, role {role!r}: device {device!r} is not on this machine "
                              f"({count} CUDA device(s): {have}); see workers.{role}.device in lnscope.toml")
        placement[role] = device
    return placement


def parse_config(
    data: dict[str, Any], *, base_dir: Path, origin: str = "lnscope.toml"
) -> tuple[dict[str, PairSpec], str | None]:
    """User pairs and default pair from a parsed TOML document."""
    unknown = set(data) - {"pairs", "default_pair", "workers"}
    if unknown:
        raise ConfigError(f"{origin}: unknown top-level keys {sorted(unknown)}")
    defaults = parse_workers(data, origin=origin)
    pairs: dict[str, PairSpec] = {}
    for name, table in (data.get("pairs") or {}).items():
        where = f"{origin}: pairs.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        for required in ("original", "ln_free"):
            if required not in table:
                raise ConfigError(f"{where}: missing role `{required}`")
        unknown_keys = set(table) - {*ROLES, "description", "transcoders", "workers"}
        if unknown_keys:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown_keys)} "
                              f"(roles: {', '.join(ROLES)}; description; transcoders; workers)")
        transcoders = table.get("transcoders") or {}
        if not isinstance(transcoders, dict) or set(transcoders) - set(ROLES) or not all(
                isinstance(v, str) and v for v in transcoders.values()):
            raise ConfigError(f"{where}.transcoders: expected a table of role = \"directory or file\" "
                              f"({', '.join(ROLES)})")
        sources = {
            role: _parse_source(table[role], where=f"{where}.{role}", base_dir=base_dir)
            for role in ROLES
            if role in table
        }
        workers = _parse_workers(table.get("workers", {}), where=f"{where}.workers")
        for role in workers:
            if role not in sources:
                raise ConfigError(f"{where}.workers.{role}: the pair has no `{role}` model")
        spec = PairSpec(
            name=name,
            original=sources["original"],
            ln_free=sources["ln_free"],
            control=sources.get("control"),
            description=str(table.get("description", "")),
            builtin=False,
            transcoders={role: (base_dir / os.path.expanduser(v)).resolve() for role, v in transcoders.items()},
            workers=workers,
        )
        pairs[name] = with_workers(spec, defaults)
    default = data.get("default_pair")
    if default is not None and not isinstance(default, str):
        raise ConfigError(f"{origin}: default_pair must be a string")
    return pairs, default


def config_path() -> Path:
    return Path(os.environ.get("LNSCOPE_CONFIG", "lnscope.toml")).expanduser()


class PairRegistry:
    """Built-in pairs overlaid with the user's TOML pairs (a user pair may replace a built-in)."""

    def __init__(self, pairs: dict[str, PairSpec], default_pair: str = "tiny") -> None:
        self._pairs = dict(pairs)
        self.default_pair = default_pair

    @classmethod
    def load(cls, path: Path | None = None) -> "PairRegistry":
        pairs = builtin_pairs()
        default = "tiny"
        explicit = path is not None or "LNSCOPE_CONFIG" in os.environ
        path = path if path is not None else config_path()
        if path.exists():
            try:
                data = tomllib.loads(path.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: not valid TOML ({exc})") from None
            user_pairs, user_default = parse_config(data, base_dir=path.resolve().parent, origin=str(path))
            defaults = parse_workers(data, origin=str(path))
            pairs = {name: with_workers(spec, defaults) for name, spec in pairs.items()}
            pairs.update(user_pairs)
            default = user_default or default
        elif explicit:
            raise ConfigError(f"config file {path} (LNSCOPE_CONFIG) does not exist")
        if default not in pairs:
            raise ConfigError(f"default_pair {default!r} is not a known pair ({', '.join(sorted(pairs))})")
        return cls(pairs, default)

    def names(self) -> list[str]:
        return list(self._pairs)

    def __iter__(self):
        return iter(self._pairs.values())

    def __contains__(self, name: object) -> bool:
        return name in self._pairs

    def get(self, name: str) -> PairSpec:
        try:
            return self._pairs[name]
        except KeyError:
            raise UnknownPairError(
                f"unknown pair {name!r}; known pairs: {', '.join(sorted(self._pairs))} "
                f"(add your own in {config_path()})"
            ) from None
