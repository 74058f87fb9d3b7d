"""Saving and loading transcoders.

Written (and read): circuit-tracer's per-layer layout, a directory holding

    config.yaml                 model_kind: transcoder_set, model_name, scan, feature_input_hook,
                                feature_output_hook, activation (relu | topk), k, transcoders: [files]
                                (+ lnscope: {d_model, n_layers, training options, metrics})
    layer_{i}.safetensors       W_enc [d_tc, d_model], W_dec [d_tc, d_model], b_enc [d_tc],
                                b_dec [d_model], optional W_skip [d_model, d_model], optional k

`b_enc` is stored with the input centring folded in (circuit-tracer has no input bias).
`model_name` is a Hub id as given, or for a local model its path relative to the directory
("../../original"), so that a committed set names no build machine's path; it is read back absolute.
`transcoders` lists the files relative to the directory (circuit-tracer resolves plain entries
against the working directory: load such a set there with absolute paths, see `circuit_tracer_config`).

Read only:
- SAELens transcoders: a directory with `cfg.json` (+ `sae_weights.safetensors`) holding W_enc
  [d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec (output bias), optional b_dec_out (then b_dec is
  the input centring) and W_skip [d_out, d_in] (skip_transcoder); or a directory of such directories.
  The layer comes from cfg `hook_name` (blocks.{l}.…) or `hook_layer`.
- Dunefsky et al.'s GPT-2 small set (pchlenski/gpt2-transcoders): torch-pickled `.pt` files holding
  {"cfg": config, "state_dict": {W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec (input
  centring), b_dec_out}}; a file or a directory of them. They are read with
  `torch.load(weights_only=True)`: only tensors, containers and primitive values are rebuilt; the
  original config class (sae_training.config.*) becomes an inert attribute bag; any other global
  (os.system, eval, ...) makes the file refused with TranscoderFormatError, nothing is executed.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import threading
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from lnscope.analysis.errors import LnscopeError
from lnscope.analysis.transcoders.model import Transcoder, TranscoderSet

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1


class TranscoderFormatError(LnscopeError, ValueError):
    """Transcoder files that cannot be read, or do not fit the model they are used with."""


# ------------------------------------------------------------------------------------------ saving
def save_transcoders(tset: TranscoderSet, directory: str | Path, *, model_name: str | None = None,
                     scan: str | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `tset` in circuit-tracer's layout (see the module docstring); returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for layer, tc in tset.transcoders.items():
        name = f"layer_{layer}.safetensors"
        tensors = {
            "W_enc": tc.W_enc.detach().cpu().contiguous(),
            "W_dec": tc.W_dec.detach().cpu().contiguous(),
            "b_enc": tc.effective_b_enc().detach().cpu().contiguous(),
            "b_dec": tc.b_dec.detach().cpu().contiguous(),
        }
        if tc.W_skip is not None:
            tensors["W_skip"] = tc.W_skip.detach().cpu().contiguous()
        if tc.activation == "topk":
            tensors["k"] = torch.tensor(tc.k)
        save_file(tensors, str(out / name), metadata={"layer": str(layer), "activation": tc.activation})
        files.append(name)
    first = next(iter(tset.transcoders.values()))
    config: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "model_name": portable_model_name(model_name or tset.model_name or "unknown", out),
        "scan": scan or tset.scan or f"lnscope-{out.name}",
        "feature_input_hook": tset.feature_input_hook,
        "feature_output_hook": tset.feature_output_hook,
        "activation": first.activation,
        "transcoders": files,
        "lnscope": {
            "format_version": FORMAT_VERSION,
            "d_model": tset.d_model,
            "layers": tset.layers,
            "skip": tset.skip,
            **{k: v for k, v in (extra or tset.info or {}).items()},
        },
    }
    if first.activation == "topk":
        config["k"] = first.k
    (out / CONFIG_FILE).write_text(yaml.safe_dump(_plain(config), sort_keys=False))
    return out


def _plain(value: Any) -> Any:
    """JSON/YAML-safe copy (tensors -> lists, tuples -> lists, Paths -> str)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def portable_model_name(model_name: str, directory: Path) -> str:
    """An absolute local model path as a path relative to `directory` ("./..." or "../..."); other names as given."""
    path = Path(model_name)
    if not path.is_absolute():
        return model_name
    try:
        relative = Path(os.path.relpath(path.resolve(), directory.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return path.name
    return relative if relative.startswith("../") or relative == ".." else f"./{relative}"


def resolved_model_name(model_name: str | None, directory: Path) -> str | None:
    """A model name written by `portable_model_name` as an absolute path again; other names as given."""
    if isinstance(model_name, str) and (model_name.startswith("./") or model_name.startswith("../")):
        return str((directory / model_name).resolve())
    return model_name


def circuit_tracer_config(directory: str | Path) -> dict[str, Any]:
    """The directory's config.yaml with absolute transcoder (and local model) paths, as circuit-tracer's loader
    wants them."""
    d = Path(directory).resolve()
    cfg = yaml.safe_load((d / CONFIG_FILE).read_text())
    cfg["transcoders"] = [str(d / p) for p in cfg["transcoders"]]
    if "model_name" in cfg:
        cfg["model_name"] = resolved_model_name(cfg["model_name"], d)
    cfg.setdefault("scan_name", cfg.get("scan"))
    return cfg


# ----------------------------------------------------------------------------------------- loading
def load_transcoders(path: str | Path, *, model=None, d_model: int | None = None, n_layers: int | None = None,
                     device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TranscoderSet:
    """Read a transcoder set in any supported format (detected from the files).

    With `model` (a LoadedModel) or `d_model` / `n_layers`, shapes and layers are checked against the
    model: a mismatch raises TranscoderFormatError naming the file and what is wrong.
    """
    p = Path(path)
    if not p.exists():
        raise TranscoderFormatError(f"no transcoders at {p}")
    if model is not None:
        d_model = d_model or int(model.bridge.cfg.d_model)
        n_layers = n_layers or int(model.bridge.cfg.n_layers)
        device = device or model.device
        dtype = dtype or model.dtype
    if p.is_dir() and (p / CONFIG_FILE).is_file():
        tset = _load_circuit_tracer(p)
    elif p.is_dir() and (p / "cfg.json").is_file():
        tset = _merge([_load_saelens(p)], p)
    elif p.is_file() and p.suffix in (".pt", ".pth", ".pkl", ".bin"):
        tset = _merge([_load_dunefsky(p)], p)
    elif p.is_dir():
        subdirs = sorted(d for d in p.iterdir() if d.is_dir() and (d / "cfg.json").is_file())
        pts = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".pt", ".pth"))
        if subdirs:
            tset = _merge([_load_saelens(d) for d in subdirs], p)
        elif pts:
            tset = _merge([_load_dunefsky(f) for f in pts], p)
        else:
            raise TranscoderFormatError(
                f"{p} holds no transcoders: expected circuit-tracer's config.yaml + layer_*.safetensors, "
                "SAELens cfg.json + sae_weights.safetensors, or Dunefsky .pt files")
    else:
        raise TranscoderFormatError(f"{p}: unrecognised transcoder file (expected a directory or a .pt file)")
    validate(tset, d_model=d_model, n_layers=n_layers, where=str(p))
    tset.to(device=device, dtype=dtype)
    return tset.eval()


def validate(tset: TranscoderSet, *, d_model: int | None, n_layers: int | None, where: str = "transcoders") -> None:
    if not tset.transcoders:
        raise TranscoderFormatError(f"{where}: no layers")
    for layer, tc in tset.transcoders.items():
        if n_layers is not None and not 0 <= layer < n_layers:
            raise TranscoderFormatError(
                f"{where}: a transcoder for layer {layer}, but the model has layers 0..{n_layers - 1}")
        if d_model is not None and tc.d_model != d_model:
            raise TranscoderFormatError(
                f"{where}: layer {layer} transcoder reads/writes d_model={tc.d_model}, "
                f"but the model's d_model is {d_model} (transcoders of another model?)")


def _merge(parts: list[tuple[int, Transcoder, dict[str, Any]]], where: Path) -> TranscoderSet:
    layers: dict[int, Transcoder] = {}
    info: dict[str, Any] = {}
    for layer, tc, meta in parts:
        if layer in layers:
            raise TranscoderFormatError(f"{where}: two transcoders for layer {layer}")
        layers[layer] = tc
        info = info or meta
    d_models = {tc.d_model for tc in layers.values()}
    if len(d_models) != 1:
        raise TranscoderFormatError(f"{where}: transcoders with different d_model {sorted(d_models)}")
    return TranscoderSet(layers, d_model=d_models.pop(), model_name=info.get("model_name"), scan=info.get("scan"),
                         feature_input_hook=info.get("feature_input_hook", "mlp.hook_in"),
                         feature_output_hook=info.get("feature_output_hook", "hook_mlp_out"),
                         info={"source_format": info.get("source_format")})


def _build(layer: int, *, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
           b_in: torch.Tensor | None = None, W_skip: torch.Tensor | None = None, activation: str = "relu",
           k: int | None = None, where: str) -> Transcoder:
    """A Transcoder from tensors in our orientation (W_enc, W_dec: [d_tc, d_model]), shape-checked."""
    if W_enc.ndim != 2 or W_dec.ndim != 2:
        raise TranscoderFormatError(
            f"{where}: W_enc and W_dec must be matrices, got {tuple(W_enc.shape)}, {tuple(W_dec.shape)}")
    d_tc, d_model = W_enc.shape
    checks = {"W_dec": (W_dec, (d_tc, d_model)), "b_enc": (b_enc, (d_tc,)), "b_dec": (b_dec, (d_model,))}
    if b_in is not None:
        checks["input bias"] = (b_in, (d_model,))
    if W_skip is not None:
        checks["W_skip"] = (W_skip, (d_model, d_model))
    for name, (t, shape) in checks.items():
        if tuple(t.shape) != shape:
            raise TranscoderFormatError(f"{where}: {name} has shape {tuple(t.shape)}, expected {shape} "
                                        f"(W_enc is {tuple(W_enc.shape)})")
    tc = Transcoder(d_model, d_tc, activation=activation, k=k, skip=W_skip is not None, layer=layer)
    with torch.no_grad():
        tc.W_enc.copy_(W_enc.float())
        tc.W_dec.copy_(W_dec.float())
        tc.b_enc.copy_(b_enc.float())
        tc.b_dec.copy_(b_dec.float())
        if b_in is not None:
            tc.b_in.copy_(b_in.float())
        if W_skip is not None:
            tc.W_skip.copy_(W_skip.float())
    return tc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise TranscoderFormatError(f"cannot read {path}: {exc}") from exc


def _need(tensors: Mapping[str, torch.Tensor], keys, where: str) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise TranscoderFormatError(f"{where}: missing {missing} (has {sorted(tensors)})")


def _load_circuit_tracer(directory: Path) -> TranscoderSet:
    try:
        cfg = yaml.safe_load((directory / CONFIG_FILE).read_text()) or {}
    except yaml.YAMLError as exc:
        raise TranscoderFormatError(f"{directory / CONFIG_FILE}: not valid YAML ({exc})") from exc
    kind = cfg.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise TranscoderFormatError(
            f"{directory}: model_kind {kind!r} is not supported (only per-layer transcoder_set)")
    entries = cfg.get("transcoders")
    if entries:
        paths: dict[int, Path] = {}
        for i, entry in enumerate(entries):
            entry = str(entry)
            if entry.startswith("hf://"):
                raise TranscoderFormatError(f"{directory}: layer {i} is a Hub reference ({entry}); download it first")
            f = Path(entry)
            f = f if f.is_absolute() else directory / f
            m = re.search(r"layer_(\d+)\.safetensors$", f.name)
            paths[int(m.group(1)) if m else i] = f
    else:
        paths = {int(m.group(1)): f for f in directory.glob("layer_*.safetensors")
                 if (m := re.fullmatch(r"layer_(\d+)\.safetensors", f.name))}
    if not paths:
        raise TranscoderFormatError(
            f"{directory}: config.yaml lists no transcoders and there is no layer_*.safetensors")
    activation = cfg.get("activation") or "relu"
    if activation not in ("relu", "topk"):
        raise TranscoderFormatError(f"{directory}: activation {activation!r} is not supported (relu or topk)")
    layers = {}
    for layer, f in sorted(paths.items()):
        if not f.is_file():
            raise TranscoderFormatError(f"{directory}: layer {layer} file {f} is missing")
        t = _read_safetensors(f)
        where = str(f)
        _need(t, ["W_enc", "W_dec", "b_enc", "b_dec"], where)
        if "activation_function.threshold" in t or "threshold" in t:
            raise TranscoderFormatError(f"{where}: JumpReLU transcoders are not supported (relu or topk only)")
        k = int(t["k"]) if "k" in t else cfg.get("k")
        layers[layer] = _build(layer, W_enc=t["W_enc"], W_dec=t["W_dec"], b_enc=t["b_enc"], b_dec=t["b_dec"],
                               W_skip=t.get("W_skip"), activation=activation, k=k, where=where)
    meta = cfg.get("lnscope") or {}
    d_models = {tc.d_model for tc in layers.values()}
    if len(d_models) != 1:
        raise TranscoderFormatError(f"{directory}: transcoders with different d_model {sorted(d_models)}")
    model_name = resolved_model_name(cfg.get("model_name"), directory)
    return TranscoderSet(layers, d_model=d_models.pop(), model_name=model_name,
                         scan=cfg.get("scan") or cfg.get("scan_name"),
                         feature_input_hook=cfg.get("feature_input_hook", "mlp.hook_in"),
                         feature_output_hook=cfg.get("feature_output_hook", "hook_mlp_out"),
                         info={"source_format": "circuit-tracer", **meta})


_LAYER_RE = re.compile(r"blocks\.(\d+)\.")


def _layer_from(cfg: Mapping[str, Any], *names: str) -> int | None:
    for key in ("hook_layer", "hook_point_layer", "layer"):
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    for text in [cfg.get("hook_name"), cfg.get("hook_point"), *names]:
        if text and (m := _LAYER_RE.search(str(text))):
            return int(m.group(1))
    return None


def _load_saelens(directory: Path) -> tuple[int, Transcoder, dict[str, Any]]:
    where = str(directory)
    try:
        cfg = json.loads((directory / "cfg.json").read_text())
    except json.JSONDecodeError as exc:
        raise TranscoderFormatError(f"{directory / 'cfg.json'}: not valid JSON ({exc})") from exc
    arch = str(cfg.get("architecture", "transcoder"))
    if "jumprelu" in arch:
        raise TranscoderFormatError(f"{where}: JumpReLU transcoders are not supported (relu or topk only)")
    weights = directory / "sae_weights.safetensors"
    if not weights.is_file():
        cands = sorted(directory.glob("*.safetensors"))
        if not cands:
            raise TranscoderFormatError(f"{where}: no sae_weights.safetensors")
        weights = cands[0]
    t = _read_safetensors(weights)
    _need(t, ["W_enc", "W_dec", "b_enc", "b_dec"], str(weights))
    layer = _layer_from(cfg, directory.name)
    if layer is None:
        raise TranscoderFormatError(f"{where}: cannot tell the layer (cfg.json has no hook_name like blocks.N.…)")
    act = str(cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu")
    k = (cfg.get("activation_fn_kwargs") or {}).get("k") or cfg.get("k")
    activation = "topk" if act.startswith("topk") or arch.startswith("topk") else "relu"
    b_in, b_out = None, t["b_dec"]
    if "b_dec_out" in t:  # Dunefsky-style: b_dec is the input centring
        b_in, b_out = t["b_dec"], t["b_dec_out"]
    elif cfg.get("apply_b_dec_to_input") and t["b_dec"].shape == t["W_enc"].shape[:1]:
        b_in = t["b_dec"]
    W_enc = t["W_enc"]
    if W_enc.shape[0] != t["b_enc"].shape[0]:  # SAELens: [d_in, d_sae]
        W_enc = W_enc.T
    tc = _build(layer, W_enc=W_enc, W_dec=t["W_dec"], b_enc=t["b_enc"], b_dec=b_out, b_in=b_in,
                W_skip=t.get("W_skip"), activation=activation, k=int(k) if k else None, where=str(weights))
    return layer, tc, {"source_format": "saelens", "model_name": cfg.get("model_name"),
                       "feature_input_hook": _local_hook(cfg.get("hook_name")),
                       "feature_output_hook": _local_hook(cfg.get("hook_name_out")) or "hook_mlp_out"}


def _local_hook(name: Any) -> str | None:
    """blocks.8.ln2.hook_normalized -> ln2.hook_normalized (circuit-tracer's per-block form)."""
    if not name:
        return None
    return re.sub(r"^blocks\.\d+\.", "", str(name))


class _InertConfig:
    """Stands in for the pickled config class of Dunefsky's training code: holds its fields, runs nothing."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# The config classes Dunefsky's (and SAELens-0.x-derived) training code pickled into its .pt files.
_CONFIG_CLASSES = [
    f"{module}.{name}"
    for module in ("sae_training.config", "sae_lens.training.config", "sae_lens.config")
    for name in ("LanguageModelSAERunnerConfig", "RunnerConfig", "CacheActivationsRunnerConfig")
]


def safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True; a file needing any other global is refused, never run."""
    allowed = [(_InertConfig, name) for name in _CONFIG_CLASSES]
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"global ([\w.]+)", msg)
        what = f" it references {m.group(1)!r}, which is" if m else " it needs something"
        raise TranscoderFormatError(
            f"refusing to load {path}:{what} not on lnscope's allow-list (tensors, containers, "
            "primitive values and Dunefsky's config class only); the file was not executed") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise TranscoderFormatError(f"cannot read {path} as a torch file: {exc}") from exc


def _load_dunefsky(path: Path) -> tuple[int, Transcoder, dict[str, Any]]:
    where = str(path)
    data = safe_torch_load(path)
    if not isinstance(data, Mapping) or "state_dict" not in data:
        raise TranscoderFormatError(f"{where}: expected a dict with 'cfg' and 'state_dict' (Dunefsky's format)")
    cfg = data.get("cfg")
    cfg = cfg.as_dict() if isinstance(cfg, _InertConfig) else dict(cfg or {})
    sd = data["state_dict"]
    _need(sd, ["W_enc", "W_dec", "b_enc", "b_dec"], where)
    layer = _layer_from(cfg, path.name)
    if layer is None:
        raise TranscoderFormatError(f"{where}: cannot tell the layer (cfg has no hook_point_layer / hook_point)")
    W_enc = sd["W_enc"]
    if W_enc.shape[0] != sd["b_enc"].shape[0]:  # Dunefsky: [d_in, d_sae]
        W_enc = W_enc.T
    if "b_dec_out" in sd and sd["b_dec_out"] is not None:
        b_in, b_out = sd["b_dec"], sd["b_dec_out"]
    else:  # an SAE-like file (no b_dec_out): b_dec is both input centring and output bias
        b_in, b_out = sd["b_dec"], sd["b_dec"]
    tc = _build(layer, W_enc=W_enc, W_dec=sd["W_dec"], b_enc=sd["b_enc"], b_dec=b_out, b_in=b_in,
                W_skip=sd.get("W_skip"), where=where)
    return layer, tc, {"source_format": "dunefsky", "model_name": cfg.get("model_name"),
                       "feature_input_hook": _local_hook(cfg.get("hook_point")) or "ln2.hook_normalized",
                       "feature_output_hook": _local_hook(cfg.get("out_hook_point")) or "hook_mlp_out"}


# ------------------------------------------------------------------------------------- pair lookup
def default_transcoder_dir(pair_name: str, role: str) -> Path:
    """models/<pair>/transcoders/<role>/ under analysis.pairs.models_dir()."""
    from lnscope.analysis.pairs import models_dir

    return models_dir() / pair_name / "transcoders" / role


def transcoder_dir(pair, role: str) -> Path:
    """Where a pair's transcoders for `role` live: the pair's `transcoders` table, else the default dir.

    `pair`: a PairSpec or a pair name (then always the default directory).
    """
    if isinstance(pair, str):
        return default_transcoder_dir(pair, role)
    return pair.transcoders.get(role) or default_transcoder_dir(pair.name, role)


def missing_transcoders_message(pair, role: str) -> str | None:
    """None when `role` of `pair` has transcoders on disk, else what to do about it."""
    d = transcoder_dir(pair, role)
    if d.exists():
        return None
    name = pair if isinstance(pair, str) else pair.name
    return (f"no transcoders for pair {name!r} role {role!r} at {d}; train them with "
            f"`lnscope train-transcoders {name} --role {role}` or set `transcoders.{role}` of the pair in lnscope.toml")


def load_transcoders_for(pair, role: str, *, model=None, **kwargs) -> TranscoderSet:
    """The transcoders of a pair's role (see `transcoder_dir`); `pair` is a PairSpec or a name."""
    if (message := missing_transcoders_message(pair, role)) is not None:
        raise TranscoderFormatError(message)
    return load_transcoders(transcoder_dir(pair, role), model=model, **kwargs)


def transcoder_fingerprint(path: Path) -> str:
    """sha256 over the names, sizes and modification times of the files under `path` (cheap, no reads)."""
    import hashlib

    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(path) if p != path else p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class FileCache:
    """Values built from the files under a path, built once per (path, files, extra key) and rebuilt
    when the files change (the stale value is dropped); safe under concurrent requests."""

    def __init__(self) -> None:
        self._values: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, build, *extra: Any):
        key = (str(path), transcoder_fingerprint(path), *extra)
        with self._lock:
            if key not in self._values:
                for old in [k for k in self._values if k[0] == key[0] and k[1] != key[1]]:
                    del self._values[old]
                self._values[key] = build()
            return self._values[key]


_transcoder_cache = FileCache()


def cached_transcoders_for(pair, role: str, model) -> TranscoderSet:
    """`load_transcoders_for` once per (directory, files, device, dtype); safe under concurrent requests."""
    if (message := missing_transcoders_message(pair, role)) is not None:
        raise TranscoderFormatError(message)
    path = transcoder_dir(pair, role)
    return _transcoder_cache.get(path,
                                 lambda: load_transcoders(path, model=model).to(device=model.device, dtype=model.dtype),
                                 str(model.device), str(model.dtype))
