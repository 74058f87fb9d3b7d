"""What every analysis returns: a typed, JSON-serialisable result stamped with a manifest."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field

from lnscope.analysis import __version__
from lnscope.analysis.loading import LoadedModel

PAPER_ORDER: tuple[str, ...] = ("original", "control", "ln_free")  # the paper's table layout


class ModelManifest(BaseModel):
    role: str
    source: dict[str, Any] = Field(description="hub_id + revision, or local path")
    weight_processing: dict[str, bool]
    ln_treatment: str = Field(description="'folded' (LN kept, folded) or 'removed' (no normalization)")
    dtype: str
    device: str
    versions: dict[str, str | None]


class Manifest(BaseModel):
    """Everything needed to reproduce a result."""

    model_config = ConfigDict(protected_namespaces=())

    kind: str = Field(examples=["dla"])
    pair: str | None = Field(default=None, examples=["tiny"])
    roles: dict[str, ModelManifest]
    seed: int | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="the analysis options as run")
    lnscope_version: str = __version__


def make_manifest(
    kind: str,
    models: Mapping[str, LoadedModel],
    *,
    pair: str | None = None,
    seed: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> Manifest:
    return Manifest(
        kind=kind,
        pair=pair,
        roles={role: ModelManifest(**m.manifest()) for role, m in models.items()},
        seed=seed,
        options=dict(options or {}),
    )

