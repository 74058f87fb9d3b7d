"""Random transcoders with a feature index for a test trio (attribution identities hold for any weights)."""

from __future__ import annotations

from pathlib import Path

from lnscope.analysis.loading import ModelCache
from lnscope.analysis.pairs import ModelSource
from lnscope.analysis.transcoders import build_feature_index, random_transcoders, save_transcoders

ROLES = ("original", "ln_free", "control")
INDEX_TEXT = ["When Mary and John went to the store, John gave a drink to Mary."] * 3 + [
    "The war lasted from the year 1732 to the year 1758."]


def build_transcoders(trio_dirs: dict[str, Path], root: Path, *, d_transcoder: int = 96,
                      cache: ModelCache | None = None) -> dict[str, Path]:
    """models-like directories root/<role> in circuit-tracer's layout plus feature_index.safetensors."""
    cache = cache or ModelCache()
    dirs = {}
    for i, role in enumerate(ROLES):
        model = cache.get(ModelSource(path=Path(trio_dirs[role])), role, device="cpu", dtype="float32")
        cfg = model.bridge.cfg
        tset = random_transcoders(cfg.d_model, d_transcoder, range(cfg.n_layers), seed=i, bias=-0.05)
        d = save_transcoders(tset, root / role, model_name=role)
        build_feature_index(model, tset, INDEX_TEXT, top_k=5).save(d)
        dirs[role] = d
    return dirs


def transcoders_toml(dirs: dict[str, Path], pair: str = "local") -> str:
    return f"[pairs.{pair}.transcoders]\n" + "".join(f'{role} = "{path}"\n' for role, path in dirs.items())
