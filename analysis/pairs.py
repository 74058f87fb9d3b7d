"""Model trios: a pair's `original` (with LN), `ln_free` twin and optional LN-kept `control`.

Built-in pairs are the released checkpoints of the LN-free paper plus the embedded `tiny`
trio; users add pairs in a TOML file ($LNSCOPE_CONFIG, default ./lnscope.toml):

    default_pair = "my-pair"

    [pairs.my-pair]
    description = "GPT-2 small and my own LN-free run"
    original = "gpt2"                                  # a Hub id ...
    ln_free = { path = "/models/gpt2-noln" }           # ... or a local directory
    control = { id = "me/gpt2-vanilla", revision = "v2" }
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass, field
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


def parse_config(
    data: dict[str, Any], *, base_dir: Path, origin: str = "lnscope.toml"
) -> tuple[dict[str, PairSpec], str | None]:
    """User pairs and default pair from a parsed TOML document."""
    unknown = set(data) - {"pairs", "default_pair"}
    if unknown:
        raise ConfigError(f"{origin}: unknown top-level keys {sorted(unknown)}")
    pairs: dict[str, PairSpec] = {}
    for name, table in (data.get("pairs") or {}).items():
        where = f"{origin}: pairs.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        for required in ("original", "ln_free"):
            if required not in table:
                raise ConfigError(f"{where}: missing role `{required}`")
        unknown_keys = set(table) - {*ROLES, "description", "transcoders"}
        if unknown_keys:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown_keys)} "
                              f"(roles: {', '.join(ROLES)}; description; transcoders)")
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
        pairs[name] = PairSpec(
            name=name,
            original=sources["original"],
            ln_free=sources["ln_free"],
            control=sources.get("control"),
            description=str(table.get("description", "")),
            builtin=False,
            transcoders={role: (base_dir / os.path.expanduser(v)).resolve() for role, v in transcoders.items()},
        )
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
