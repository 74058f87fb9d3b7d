"""FakeLN fine-tuning: remove every LayerNorm of a GPT-2 checkpoint (and train an LN-kept control).

`remove_layernorm(src_dir, out_dir, config)` writes

    OUT/ln_free/            released-format LN-free checkpoint (+ tokenizer, lnscope_removal.json)
    OUT/control/            with control=True: the same data, order, steps and optimiser, LN kept
    OUT/training_log.json   per-step loss, aux loss, lr, grad norm, #fake LNs, every sigma_avg
    OUT/report.html         self-contained Plotly report of those curves
    OUT/checkpoints/{ln_free,control}/step_NNNNNNN.pt   resumable state (every N steps + final)

Training: AdamW (weight decay on matrices/embeddings only, as nanoGPT), linear warmup then
cosine decay to `min_lr`, grad-norm clipping, gradient accumulation, bf16 autocast on CUDA
(fp32 elsewhere), no dropout. The data order is a pure function of (seed, step), so the
control sees exactly the LN-free run's batches and a resumed run continues exactly.

Auxiliary loss (LN-free run, weight `aux_weight`, default 0.1): on ln_f's input, the mean over
positions of (std_pos - target)^2, target = mean std over positions > 0 that are not EOT,
detached. The paper's vanilla control only fine-tunes with LN kept, so the control uses
`control_aux_weight` (default 0: off); set it to `aux_weight` for an aux-matched control.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lnscope.analysis.device import resolve_device
from lnscope.analysis.errors import ConfigError, ModelLoadError
from lnscope.analysis.pairs import PROJECT_ROOT, models_dir, portable_path

from .export import export_control, export_ln_free
from .fake_ln import FakeLNGPT2, removal_order
from .schedule import Schedule

logger = logging.getLogger(__name__)

LOG_FILE = "training_log.json"
REPORT_FILE = "report.html"
CHECKPOINT_DIR = "checkpoints"
EOT_TEXT = "<|endoftext|>"

# Fields a resumed run may change; all others must equal the checkpoint's.
_RESUME_MUTABLE = {"device", "checkpoint_every", "keep_checkpoints", "stop_at_step"}


@dataclass
class RemoveLNConfig:
    """Settings of one `remove-ln` run. Schedule fields left None follow `Schedule.from_depth`."""

    # schedule (see lnscope.analysis.remove_ln.schedule for the default formula)
    total_steps: int | None = None
    start_step: int | None = None
    gap_ln2: int | None = None
    gap_ln1qk: int | None = None
    gap_ln1v: int | None = None
    ln_f_step: int | None = None
    schedule_scale: float | None = None
    # data
    context: int | None = None  # None: the model's n_positions (or the width of train_tokens)
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    bos_each_sequence: bool = True  # every sequence starts with <|endoftext|> (as lnscope's prompts)
    # optimiser
    lr: float = 6e-4
    min_lr: float = 3e-4
    warmup_steps: int | None = None  # None: max(1, round(0.05 * total_steps))
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # FakeLN
    aux_weight: float = 0.1
    control_aux_weight: float = 0.0
    sigma_momentum: float = 0.9
    sigma_exclude_bos: bool = False  # leave position 0 out of the sigma_avg average
    sigma_exclude_eot: bool = False  # leave <|endoftext|> tokens out of the sigma_avg average
    # run
    seed: int = 0
    device: str | None = None  # None: $LNSCOPE_DEVICE, else cuda > mps > cpu
    bf16: bool | None = None  # None: bf16 autocast on CUDA only
    checkpoint_every: int = 100  # steps; 0: only the final checkpoint
    keep_checkpoints: int = 2
    stop_at_step: int | None = None  # train each run only up to this step, checkpoint, return

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def schedule(self, n_layer: int) -> Schedule:
        return Schedule.from_depth(
            n_layer,
            start_step=self.start_step,
            gap_ln2=self.gap_ln2,
            gap_ln1qk=self.gap_ln1qk,
            gap_ln1v=self.gap_ln1v,
            ln_f_step=self.ln_f_step,
            total_steps=self.total_steps,
            scale=self.schedule_scale,
        )

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"remove-ln: {name} must be >= 1")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"remove-ln: need 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")
        if not 0 <= self.sigma_momentum < 1:
            raise ConfigError("remove-ln: sigma_momentum must be in [0, 1)")
        if self.context is not None and self.context < 2:
            raise ConfigError("remove-ln: context must be >= 2")


@dataclass
class RemoveLNResult:
    out_dir: Path
    ln_free_dir: Path | None  # None if the run stopped early (stop_at_step)
    control_dir: Path | None
    final_loss: dict[str, float]  # role -> mean cross-entropy over the last min(10, steps) steps
    final_aux_loss: dict[str, float]
    sigma: dict[str, float]  # LN site -> sigma_avg (the LN-free run's, frozen values)
    removal_steps: dict[str, int]  # LN site -> step it became fake
    schedule: Schedule
    wall_seconds: float
    log_path: Path
    report_path: Path | None
    completed: bool = True
    tokens_per_step: int = 0
    steps_per_second: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- data
def split_documents(text: str) -> list[str]:
    """Documents separated by blank lines or <|endoftext|>; empty ones dropped."""
    parts = re.split(r"<\|endoftext\|>|\n[ \t\r]*\n", text)
    return [p.strip() for p in parts if p.strip()]


def tokenize_documents(
    docs: list[str], tokenizer: Any, context: int, *, bos_each_sequence: bool = True
) -> torch.Tensor:
    """LongTensor[n_seq, context]: the documents joined by EOT, cut into sequences.

    With `bos_each_sequence` every sequence is EOT followed by the next context-1 tokens of the
    stream. The tail that does not fill a sequence is dropped.
    """
    eot = tokenizer.eos_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast path, and no "longer than model_max_length" warnings
        ids = [enc.ids for enc in backend.encode_batch(docs, add_special_tokens=False)]
    else:
        ids = [tokenizer.encode(d, add_special_tokens=False) for d in docs]
    stream: list[int] = []
    for doc in ids:
        stream.extend(doc)
        if eot is not None:
            stream.append(eot)
    bos = bos_each_sequence and eot is not None
    body = context - 1 if bos else context
    n_seq = len(stream) // body
    if n_seq == 0:
        raise ConfigError(f"remove-ln: the training text has {len(stream)} tokens, fewer than one sequence of "
                          f"{context}")
    data = torch.tensor(stream[: n_seq * body], dtype=torch.long).view(n_seq, body)
    if bos:
        data = torch.cat([torch.full((n_seq, 1), eot, dtype=torch.long), data], dim=1)
    return data


def load_text_tokens(path: str | Path, tokenizer: Any, context: int, *, bos_each_sequence: bool = True) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"remove-ln: training text {path} does not exist")
    docs = split_documents(path.read_text(encoding="utf-8", errors="replace"))
    if not docs:
        raise ConfigError(f"remove-ln: training text {path} is empty")
    tokens = tokenize_documents(docs, tokenizer, context, bos_each_sequence=bos_each_sequence)
    logger.info("%s: %d documents -> %d sequences of %d tokens", path, len(docs), tokens.shape[0], context)
    return tokens


class DataOrder:
    """Which sequences each micro-batch of each step reads: a pure function of (seed, step).

    Global sequence g = (step * grad_accum + micro) * batch_size + j is sequence
    perm_e[g mod n] of epoch e = g // n, perm_e a seeded permutation.
    """

    def __init__(self, n_seq: int, batch_size: int, grad_accum: int, seed: int) -> None:
        self.n_seq, self.batch_size, self.grad_accum, self.seed = n_seq, batch_size, grad_accum, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n_seq, generator=gen)
        return self._perms[epoch]

    def step_indices(self, step: int) -> torch.Tensor:
        per_step = self.batch_size * self.grad_accum
        g = torch.arange(step * per_step, (step + 1) * per_step)
        epoch, pos = g // self.n_seq, g % self.n_seq
        out = torch.empty_like(g)
        for e in epoch.unique().tolist():
            sel = epoch == e
            out[sel] = self._perm(e)[pos[sel]]
        return out.view(self.grad_accum, self.batch_size)


def _fingerprint(tokens: torch.Tensor) -> str:
    return hashlib.sha1(tokens.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- source
def load_source(src_dir: str | Path, *, need_tokenizer: bool) -> tuple[torch.nn.Module, Any]:
    """(GPT2LMHeadModel in float32, its tokenizer or None) from a save_pretrained directory."""
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    path = Path(src_dir)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"remove-ln: {path} is not a save_pretrained checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "gpt2":
        raise ModelLoadError(f"remove-ln: {path} is a {config.model_type!r} model; only GPT-2 is supported")
    if config.layer_norm_epsilon >= 1e10:
        raise ModelLoadError(f"remove-ln: {path} is already LN-free (layer_norm_epsilon={config.layer_norm_epsilon:g})")
    model = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        if need_tokenizer:
            raise ModelLoadError(f"remove-ln: cannot load the tokenizer saved in {path}: {exc}") from exc
        logger.warning("no tokenizer in %s (%s); the exports will have none", path, exc)
    return model, tokenizer


# -------------------------------------------------------------------------------- training
def lr_at(step: int, cfg: RemoveLNConfig, total: int) -> float:
    """Linear warmup to cfg.lr over `warmup` steps, then cosine decay to cfg.min_lr at `total`."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def _new_run_log(role: str, names: list[str]) -> dict[str, Any]:
    return {
        "role": role,
        "steps": [],
        "loss": [],
        "aux_loss": [],
        "lr": [],
        "grad_norm": [],
        "n_fake": [],
        "sigma": [],  # per step: sigma_avg of every site (order: ln_names), after the step's update
        "removed_at": {},
        "train_seconds": 0.0,
    }


def _checkpoint_paths(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("step_*.pt"))


class _Run:
    """One fine-tuning run (role 'ln_free' with a schedule, or 'control' with none)."""

    def __init__(
        self,
        role: str,
        wrapper: FakeLNGPT2,
        tokens: torch.Tensor,
        schedule: Schedule,
        cfg: RemoveLNConfig,
        device: torch.device,
        ckpt_dir: Path,
        fingerprint: str,
        remove: bool,
    ) -> None:
        self.role, self.wrapper, self.schedule, self.cfg = role, wrapper, schedule, cfg
        self.device, self.ckpt_dir, self.fingerprint, self.remove = device, ckpt_dir, fingerprint, remove
        self.tokens = tokens.to(device)
        self.total = schedule.total_steps
        self.aux_weight = cfg.aux_weight if remove else cfg.control_aux_weight
        self.order = DataOrder(tokens.shape[0], cfg.batch_size, cfg.grad_accum, cfg.seed)
        self.events = schedule.events_by_step() if remove else {}
        self.bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
        self.eot = None
        model = wrapper.model
        decay = [p for _, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for _, p in model.named_parameters() if p.dim() < 2]
        self.params = decay + no_decay
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = device.type in ("cuda", "cpu")
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
        self.step = 0
        self.log = _new_run_log(role, wrapper.names)

    # -------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "format": 1,
            "role": self.role,
            "step": self.step,  # the next step to run
            "model": self.wrapper.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": {"kind": "warmup_cosine", "next_step": self.step, "total_steps": self.total},
            "rng": rng,
            "log": self.log,
            "config": self.cfg.to_dict(),
            "schedule": self.schedule.to_dict(),
            "data_fingerprint": self.fingerprint,
        }
        path = self.ckpt_dir / f"step_{self.step:07d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        keep = max(1, self.cfg.keep_checkpoints)
        for old in _checkpoint_paths(self.ckpt_dir)[:-keep]:
            old.unlink(missing_ok=True)
        logger.debug("%s: checkpoint %s", self.role, path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state.get("role") != self.role:
            raise ConfigError(f"remove-ln --resume: {path} belongs to run {state.get('role')!r}, not {self.role!r}")
        saved, now = state["config"], self.cfg.to_dict()
        diff = {k: (saved.get(k), v) for k, v in now.items() if k not in _RESUME_MUTABLE and saved.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"remove-ln --resume: settings differ from the checkpoint's ({listed})")
        if state["schedule"] != self.schedule.to_dict():
            raise ConfigError(f"remove-ln --resume: the schedule differs from the checkpoint's {state['schedule']}")
        if state["data_fingerprint"] != self.fingerprint:
            raise ConfigError("remove-ln --resume: the training data differ from the checkpoint's")
        self.wrapper.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.log = state["log"]
        self.step = state["step"]
        logger.info("%s: resumed from %s at step %d", self.role, path, self.step)

    # ----------------------------------------------------------------------- training
    def _masks(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        stat_mask = None
        cfg = self.cfg
        if self.remove and (cfg.sigma_exclude_bos or (cfg.sigma_exclude_eot and self.eot is not None)):
            m = torch.ones(x.shape, dtype=torch.bool, device=x.device)
            if cfg.sigma_exclude_bos:
                m[:, 0] = False
            if cfg.sigma_exclude_eot and self.eot is not None:
                m &= x != self.eot
            stat_mask = m.float()
        aux_mask = None
        if self.aux_weight > 0 and self.eot is not None:
            m = x != self.eot
            m[:, 0] = False
            aux_mask = m.float()
        return stat_mask, aux_mask

    def _bar(self, progress: bool | Callable[[str, float], None]) -> Any:
        """A tqdm bar over all steps (disabled when progress is False or a callback)."""
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total, initial=self.step, desc=f"remove-ln {self.role}", unit="step",
            disable=not progress or callable(progress), dynamic_ncols=True, leave=True,
        )

    def _autocast(self) -> Any:
        """bf16 autocast when the run uses bf16, else a no-op context."""
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _remove_scheduled(self, step: int) -> None:
        """Make FakeLN of every LN site the schedule removes at `step` (its sigma_avg frozen from then on)."""
        wrapper = self.wrapper
        for name in self.events.get(step, []):
            if not bool(wrapper.sigma_initialized[wrapper.index[name]]):
                raise RuntimeError(f"{name}: no sigma_avg measured before its removal at step {step}")
            wrapper.set_fake(name)
            self.log["removed_at"][name] = step
            logger.debug("%s: step %d: %s is now FakeLN (sigma_avg %.5g)", self.role, step, name,
                         wrapper.sigma_dict()[name])

    def _accumulate_gradients(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Backpropagate (CE + aux_weight x aux) / grad_accum over the step's micro-batches; (sum CE, sum aux)."""
        ga = self.cfg.grad_accum
        idx = self.order.step_indices(step).to(self.device)  # [grad_accum, batch_size]
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for micro in range(ga):
            x = self.tokens[idx[micro]]  # [batch_size, context]
            stat_mask, aux_mask = self._masks(x)
            with self._autocast():
                ce, aux = self.wrapper.losses(x, aux_weight=self.aux_weight, aux_mask=aux_mask, stat_mask=stat_mask)
                total = ce if aux is None else ce + self.aux_weight * aux
            (total / ga).backward()
            loss_sum += ce.detach()
            if aux is not None:
                aux_sum += aux.detach()
        return loss_sum, aux_sum

    def _grad_norm(self) -> torch.Tensor:
        """The gradients' global L2 norm, after clipping them to cfg.grad_clip (when > 0)."""
        if self.cfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])

    def _record_step(self, step: int, lr: float, loss_sum: torch.Tensor, aux_sum: torch.Tensor,
                     grad_norm: torch.Tensor) -> tuple[float, float]:
        """Append the step's mean CE, mean aux loss, lr, grad norm, #fake LNs and sigma_avg to the log; (CE, aux)."""
        ga, wrapper = self.cfg.grad_accum, self.wrapper
        values = torch.cat([
            torch.stack([loss_sum / ga, aux_sum / ga, grad_norm.float()]).float(),
            wrapper.sigma.float(),
        ]).tolist()  # one device sync: [ce, aux, grad norm, sigma_avg per site]
        loss, aux_loss, gnorm = values[:3]
        if not math.isfinite(loss):
            raise RuntimeError(f"remove-ln {self.role}: the loss is {loss} at step {step}; lower --lr")
        log = self.log
        log["steps"].append(step)
        log["loss"].append(loss)
        log["aux_loss"].append(aux_loss if self.aux_weight > 0 else None)
        log["lr"].append(lr)
        log["grad_norm"].append(gnorm)
        log["n_fake"].append(wrapper.n_fake)
        if self.remove:
            log["sigma"].append(values[3:])
        return loss, aux_loss

    def _train_step(self) -> tuple[float, float]:
        """One optimiser step: scheduled removals, lr, gradients, AdamW, sigma_avg update; (CE, aux loss)."""
        step = self.step
        self._remove_scheduled(step)
        lr = lr_at(step, self.cfg, self.total)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss_sum, aux_sum = self._accumulate_gradients(step)
        grad_norm = self._grad_norm()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.wrapper.update_sigma()
        result = self._record_step(step, lr, loss_sum, aux_sum, grad_norm)
        self.step = step + 1
        return result

    def train(self, progress: bool | Callable[[str, float], None] = True) -> bool:
        """Run to total_steps (or cfg.stop_at_step), checkpointing every cfg.checkpoint_every steps and at the end.
        True if the run is complete."""
        cfg, wrapper = self.cfg, self.wrapper
        end = self.total if cfg.stop_at_step is None else min(self.total, max(cfg.stop_at_step, self.step))
        wrapper.train()
        wrapper.track_sigma = self.remove
        callback = progress if callable(progress) else None
        bar = self._bar(progress)
        n_sites = len(wrapper.names)
        t0 = time.perf_counter()
        try:
            while self.step < end:
                loss, aux_loss = self._train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", aux=f"{aux_loss:.3g}", ln_removed=f"{wrapper.n_fake}/{n_sites}",
                                refresh=False)
                if callback is not None:
                    callback(f"remove-ln {self.role}", self.step / self.total)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < end:
                    self._add_time(t0)
                    t0 = time.perf_counter()
                    self.save_checkpoint()
        finally:
            bar.close()
        self._add_time(t0)
        wrapper.discard_stats()
        self.save_checkpoint()
        wrapper.eval()
        return self.step >= self.total

    def _add_time(self, t0: float) -> None:
        self.log["train_seconds"] += time.perf_counter() - t0


# ------------------------------------------------------------------------------ results
def _final(values: list[float | None], k: int = 10) -> float:
    tail = [v for v in values[-k:] if v is not None]
    return float(sum(tail) / len(tail)) if tail else float("nan")


def _write_log(path: Path, payload: dict[str, Any], runs: dict[str, dict[str, Any]], names: list[str]) -> None:
    out_runs = {}
    for role, log in runs.items():
        entry = {k: v for k, v in log.items() if k != "sigma"}
        if log["sigma"]:
            entry["sigma"] = {name: [row[k] for row in log["sigma"]] for k, name in enumerate(names)}
        out_runs[role] = entry
    data = {**payload, "runs": out_runs}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, allow_nan=True) + "\n")
    os.replace(tmp, path)


@dataclass
class _Removal:
    """What every run of one remove_layernorm call shares: its source, output, data, schedule and settings."""

    src: Path
    out: Path
    cfg: RemoveLNConfig
    device: torch.device
    tokens: torch.Tensor  # [n_seq, context]
    schedule: Schedule
    tokenizer: Any
    eot: int | None  # <|endoftext|> id inside the vocabulary, else None
    names: list[str]  # LN sites in removal order
    payload: dict[str, Any]  # training_log.json's fields other than "runs"
    version: str

    @property
    def ckpt_root(self) -> Path:
        return self.out / CHECKPOINT_DIR

    @property
    def log_path(self) -> Path:
        return self.out / LOG_FILE


def _training_tokens(cfg: RemoveLNConfig, model_config: Any, tokenizer: Any, train_tokens: torch.Tensor | None,
                     train_text: str | Path | None) -> torch.Tensor:
    """LongTensor[n_seq, context]: `train_tokens` checked against the model, or `train_text` tokenised."""
    n_positions = model_config.n_positions
    if train_tokens is not None:
        tokens = torch.as_tensor(train_tokens)
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ConfigError("remove-ln: train_tokens must be an integer tensor [n_seq, context]")
        tokens = tokens.long()
        if cfg.context is not None and cfg.context != tokens.shape[1]:
            raise ConfigError(f"remove-ln: context {cfg.context} != train_tokens width {tokens.shape[1]}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= model_config.vocab_size:
            raise ConfigError("remove-ln: train_tokens has ids outside the model's vocabulary")
    else:
        tokens = load_text_tokens(train_text, tokenizer, cfg.context or n_positions,
                                  bos_each_sequence=cfg.bos_each_sequence)
    context = tokens.shape[1]
    if context > n_positions or context < 2:
        raise ConfigError(f"remove-ln: context {context} must be in [2, n_positions={n_positions}]")
    return tokens


def _eot_id(tokenizer: Any, model_config: Any) -> int | None:
    """The <|endoftext|> id (the tokenizer's, else the model config's), or None when it is outside the vocabulary."""
    eot = tokenizer.eos_token_id if tokenizer is not None else getattr(model_config, "eos_token_id", None)
    return eot if eot is not None and 0 <= eot < model_config.vocab_size else None


def _refuse_stale_checkpoints(ckpt_root: Path, roles: list[str], resume: bool) -> None:
    """ConfigError when a fresh run (no resume) would mix with an older run's checkpoints."""
    if resume:
        return
    if any(p for r in roles for p in _checkpoint_paths(ckpt_root / r)):
        raise ConfigError(
            f"remove-ln: {ckpt_root} holds checkpoints of an earlier run; pass --resume to continue it "
            "or choose another output directory"
        )


def _log_payload(cfg: RemoveLNConfig, src: Path, schedule: Schedule, tokens: torch.Tensor, names: list[str],
                 device: torch.device, version: str) -> dict[str, Any]:
    """training_log.json's fields other than "runs": the source, settings, schedule and data."""
    return {
        "format": "lnscope-remove-ln-log/1",
        "source": str(src),
        "config": cfg.to_dict(),
        "schedule": {**schedule.to_dict(), "events": schedule.events()},
        "ln_names": names,
        "data": {"n_sequences": tokens.shape[0], "context": tokens.shape[1],
                 "tokens_per_step": cfg.batch_size * cfg.grad_accum * tokens.shape[1],
                 "fingerprint": _fingerprint(tokens)},
        "device": str(device),
        "lnscope_version": version,
    }


def _log_plan(job: _Removal, n_layer: int) -> None:
    """Log the source, schedule and data, and how often the steps read the data."""
    cfg, tokens, schedule = job.cfg, job.tokens, job.schedule
    logger.info(
        "remove-ln: %s -> %s on %s; %d layers, schedule %s; %d sequences of %d tokens, %d tokens/step",
        job.src, job.out, job.device, n_layer, schedule.to_dict(), tokens.shape[0], tokens.shape[1],
        job.payload["data"]["tokens_per_step"],
    )
    epochs = schedule.total_steps * cfg.batch_size * cfg.grad_accum / tokens.shape[0]
    if epochs > 1:
        logger.info("remove-ln: %d steps read the %d sequences %.1f times over", schedule.total_steps,
                    tokens.shape[0], epochs)


def _train_role(job: _Removal, role: str, model: torch.nn.Module, resume: bool,
                progress: bool | Callable[[str, float], None]) -> tuple[_Run, bool]:
    """Fine-tune `model` as `role` ("ln_free": FakeLN on the schedule; "control": LN kept), from its latest
    checkpoint when resuming; (the run, whether it reached its last step)."""
    cfg = job.cfg
    torch.manual_seed(cfg.seed)
    remove = role == "ln_free"
    wrapper = FakeLNGPT2(model.to(job.device), track_sigma=remove, momentum=cfg.sigma_momentum)
    run = _Run(role, wrapper, job.tokens, job.schedule, cfg, job.device, job.ckpt_root / role,
               job.payload["data"]["fingerprint"], remove=remove)
    run.eot = job.eot
    existing = _checkpoint_paths(job.ckpt_root / role) if resume else []
    if existing:
        run.load_checkpoint(existing[-1])
    done = run.train(progress) if run.step < run.total else True
    return run, done


def portable_source(src: Path) -> str:
    """The source as lnscope_removal.json records it: models/<relative> inside the models directory, relative to the
    repository root elsewhere inside it (the file is copied between folders, so not relative to its own), else
    absolute."""
    resolved = src.resolve()
    if resolved.is_relative_to(models_dir()):
        return portable_path(resolved)
    if resolved.is_relative_to(PROJECT_ROOT):
        return resolved.relative_to(PROJECT_ROOT).as_posix()
    return str(resolved)


def _export_metadata(job: _Removal, run: _Run) -> dict[str, Any]:
    """lnscope_removal.json of an exported run: method, source, steps, schedule, final loss, settings."""
    cfg, ln_free = job.cfg, run.role == "ln_free"
    return {
        "method": "FakeLN fine-tuning (Baroni et al. 2025; Heimersheim 2024)" if ln_free
        else "fine-tuning with LayerNorm kept (control)",
        "source": portable_source(job.src),
        "steps": run.total,
        "seed": cfg.seed,
        "schedule": job.schedule.to_dict() if ln_free else None,
        "removal_steps": dict(run.log["removed_at"]) if ln_free else None,
        "aux_weight": run.aux_weight,
        "final_loss": _final(run.log["loss"]),
        "config": cfg.to_dict(),
        "data": job.payload["data"],
        "lnscope_version": job.version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _export(job: _Removal, run: _Run) -> Path:
    """Save a finished run to OUT/<role>: the LN-free model in the released format, or the control as it is."""
    meta = _export_metadata(job, run)
    if run.role == "ln_free":
        return export_ln_free(run.wrapper.to("cpu"), job.out / run.role, tokenizer=job.tokenizer, metadata=meta)
    return export_control(run.wrapper.model, job.out / run.role, tokenizer=job.tokenizer, metadata=meta)


_RunLogs = dict[str, dict[str, Any]]  # role -> its run's log


def _fine_tune(job: _Removal, model: torch.nn.Module, roles: list[str], resume: bool,
               progress: bool | Callable[[str, float], None]
               ) -> tuple[_RunLogs, dict[str, Path | None], dict[str, float], bool]:
    """Train and export each role in turn, rewriting training_log.json after each; stop at the first run that ends
    early. (run logs, exported dirs, the LN-free run's frozen sigma_avg per site, whether every run completed)."""
    run_logs: dict[str, dict[str, Any]] = {}
    dirs: dict[str, Path | None] = {"ln_free": None, "control": None}
    sigma: dict[str, float] = {}
    for role in roles:
        if role == "control":
            model, _ = load_source(job.src, need_tokenizer=False)  # a fresh copy of the source
        run, done = _train_role(job, role, model, resume, progress)
        run_logs[role] = run.log
        _write_log(job.log_path, job.payload, run_logs, job.names)
        if not done:
            logger.info("remove-ln %s: stopped at step %d of %d (resume with --resume)", role, run.step, run.total)
            return run_logs, dirs, sigma, False
        if role == "ln_free":
            sigma = run.wrapper.sigma_dict()
        dirs[role] = _export(job, run)
        del run
    return run_logs, dirs, sigma, True


def _write_report_file(log_path: Path, report_path: Path) -> Path | None:
    """report.html from training_log.json (None when plotly is missing)."""
    try:
        from .report import write_report

        return write_report(json.loads(log_path.read_text()), report_path)
    except ImportError as exc:  # pragma: no cover - plotly is a dependency
        logger.warning("no report: %s", exc)
        return None


def _steps_per_second(run_logs: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {
        role: (len(log["steps"]) / log["train_seconds"] if log["train_seconds"] > 0 else float("nan"))
        for role, log in run_logs.items()
    }


def remove_layernorm(
    src_dir: str | Path,
    out_dir: str | Path,
    config: RemoveLNConfig | None = None,
    train_tokens: torch.Tensor | None = None,
    train_text: str | Path | None = None,
    control: bool = False,
    progress: bool | Callable[[str, float], None] = True,
    resume: bool = False,
) -> RemoveLNResult:
    """Fine-tune the GPT-2 in `src_dir` with FakeLN until it has no LayerNorm; export it.

    Data: `train_tokens` (LongTensor[n_seq, ctx], already tokenised) or `train_text` (path of a
    plain-text file: documents separated by blank lines or <|endoftext|>, tokenised with the
    checkpoint's tokenizer into sequences of `config.context` tokens). `control=True` also
    trains and exports the LN-kept control. `resume=True` continues from OUT/checkpoints.
    `progress`: a tqdm bar (True), nothing (False), or a callback(stage, fraction).
    """
    from lnscope.analysis import __version__

    cfg = config or RemoveLNConfig()
    cfg.validate()
    t_start = time.perf_counter()
    src, out = Path(src_dir), Path(out_dir)
    if (train_tokens is None) == (train_text is None):
        raise ConfigError("remove-ln: give exactly one of train_tokens or train_text")
    device = resolve_device(cfg.device)
    model, tokenizer = load_source(src, need_tokenizer=train_text is not None)
    tokens = _training_tokens(cfg, model.config, tokenizer, train_tokens, train_text)
    schedule = cfg.schedule(model.config.n_layer)
    names = removal_order(model.config.n_layer)
    job = _Removal(src, out, cfg, device, tokens, schedule, tokenizer, _eot_id(tokenizer, model.config), names,
                   _log_payload(cfg, src, schedule, tokens, names, device, __version__), __version__)

    out.mkdir(parents=True, exist_ok=True)
    roles = ["ln_free"] + (["control"] if control else [])
    _refuse_stale_checkpoints(job.ckpt_root, roles, resume)
    _log_plan(job, model.config.n_layer)
    run_logs, dirs, sigma, completed = _fine_tune(job, model, roles, resume, progress)

    if not sigma and "ln_free" in run_logs and run_logs["ln_free"]["sigma"]:
        sigma = dict(zip(names, run_logs["ln_free"]["sigma"][-1]))  # a stopped run's latest sigma_avg
    report = _write_report_file(job.log_path, out / REPORT_FILE)
    return RemoveLNResult(
        out_dir=out,
        ln_free_dir=dirs["ln_free"],
        control_dir=dirs["control"],
        final_loss={r: _final(log["loss"]) for r, log in run_logs.items()},
        final_aux_loss={r: _final(log["aux_loss"]) for r, log in run_logs.items()},
        sigma=sigma,
        removal_steps=dict(run_logs.get("ln_free", {}).get("removed_at", {})),
        schedule=schedule,
        wall_seconds=time.perf_counter() - t_start,
        log_path=job.log_path,
        report_path=report,
        completed=completed,
        tokens_per_step=job.payload["data"]["tokens_per_step"],
        steps_per_second=_steps_per_second(run_logs),
    )
