"""Pretraining the tiny GPT-2 (`transformers.GPT2LMHeadModel`) from scratch on CPU.

Deterministic: dropout 0, a seeded init and a seeded data order, a fixed number of steps
(`PretrainConfig.steps`); the time budget is only a safety stop. AdamW (weight decay on the
matrices only), linear warmup then cosine decay to `min_lr`, gradient clipping.

`pretrain(tokens, config, out_dir)` saves the model (safetensors + config.json), the
tokenizer if given, and `training_log.json` (loss curve, held-out CE, timing) to `out_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)

LOG_FILE = "training_log.json"


@dataclass
class PretrainConfig:
    # architecture (vocab_size None: len(tokenizer), else the largest token id + 1)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 128
    vocab_size: int | None = None
    # "normal": GPT-2's N(0, 0.02) position embeddings; "sinusoidal": the learned position embeddings
    # start from the Transformer's sin/cos table (x position_init_scale), so heads can read relative
    # position from the first step. In the 2026-11-23 trials it did not make induction heads form; a short
    # context did (2-layer d128 on repeated tokens: none by step 1500 at context 64, at once at context 16)
    position_init: str = "normal"
    position_init_scale: float = 0.1
    # optimiser
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    # None: cosine from lr to min_lr over every step after the warmup. N: lr held after the warmup, then the
    # cosine over the last N steps only (warmup-stable-decay). In trials induction on 25 + 25 tokens formed at
    # lr 2e-3 on the full-length rows and not as the single cosine fell from 1.1e-3 (2026-11-24, b1 and t1)
    decay_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    batch_size: int = 32
    steps: int = 2000
    # context curriculum: phases (context, steps) that run before the full-length rows, on rows of
    # `context` tokens (pretrain's `curriculum_tokens`, one tensor per phase), batch_size x n_positions
    # / context of them per step, so every step sees the same number of tokens. Attention learns
    # content-based patterns far faster on short rows: the gradient towards the one right key is
    # diluted by the number of keys (2026-11-23 trials: induction heads formed at once at context 16-32,
    # not by step 1500 at 64). The lr schedule runs over all `steps`, phases included.
    curriculum: tuple[tuple[int, int], ...] = ()
    # each curriculum row at positions o .. o + context - 1, o uniform in [0, n_positions - context] per row,
    # so short rows train every position embedding, not only the first `context`. Untried in a full build; in a
    # 450-step trial on repeated rows of 32 it slowed induction (repeated-half loss 7.04 vs 4.85 without)
    curriculum_position_offsets: bool = False
    # run
    seed: int = 0
    eval_every: int = 250  # steps; 0: only at the end
    eval_sequences: int = 64  # held-out sequences per evaluation
    snapshot_every: int = 0  # steps; >0: also save the model to out_dir/step-N (to watch circuits form)
    log_every: int = 10
    time_budget_minutes: float | None = None  # safety stop: save and return when exceeded
    num_threads: int | None = None  # None: torch's default (all cores)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PretrainResult:
    out_dir: Path
    steps: int  # steps actually taken
    completed: bool  # False if the time budget stopped it early
    final_loss: float  # mean training loss over the last min(50, steps) steps
    eval_ce: float | None  # last held-out CE
    tokens_seen: int
    tokens_per_second: float
    wall_seconds: float
    n_params: int
    log_path: Path
    history: dict[str, list] = field(default_factory=dict)


def pack_stream(stream: torch.Tensor | list[int], context: int, bos_id: int | None) -> torch.Tensor:
    """LongTensor[n_seq, context] from a 1-D token stream: each row is bos + context-1 tokens.

    The same packing as `analysis.remove_ln.train.tokenize_documents`: every sequence starts
    with <|endoftext|> (as lnscope's prompts do); the tail that does not fill a row is dropped.
    """
    stream = torch.as_tensor(stream, dtype=torch.long).flatten()
    body = context - 1 if bos_id is not None else context
    n_seq = stream.numel() // body
    if n_seq == 0:
        raise ValueError(f"{stream.numel()} tokens are fewer than one sequence of {context}")
    data = stream[: n_seq * body].view(n_seq, body)
    if bos_id is not None:
        data = torch.cat([torch.full((n_seq, 1), bos_id, dtype=torch.long), data], dim=1)
    return data.contiguous()


def curriculum_batch_size(cfg: PretrainConfig, context: int, full_context: int | None = None) -> int:
    """Rows per step of a curriculum phase: batch_size x full_context / context, the same tokens per step."""
    return max(1, cfg.batch_size * (full_context or cfg.n_positions) // context)


@dataclass
class _Phase:
    """Steps [first_step, end_step) on `rows` (a curriculum phase, or the full-length rows), each epoch in a
    fresh seeded order."""

    rows: torch.Tensor  # [n_seq, context]
    batch_size: int
    first_step: int
    end_step: int
    generator: torch.Generator
    order: torch.Tensor | None = None
    cursor: int = 0

    def next_batch(self) -> torch.Tensor:
        if self.order is None or self.cursor + self.batch_size > self.rows.shape[0]:
            self.order, self.cursor = torch.randperm(self.rows.shape[0], generator=self.generator), 0
        batch = self.rows[self.order[self.cursor : self.cursor + self.batch_size]]
        self.cursor += self.batch_size
        return batch

    def tokens_seen(self, steps_taken: int) -> int:
        return max(0, min(steps_taken, self.end_step) - self.first_step) * self.batch_size * self.rows.shape[1]


def _curriculum_phases(
    cfg: PretrainConfig, curriculum_tokens: Sequence[torch.Tensor], as_rows: Callable[..., torch.Tensor], ctx: int
) -> list[_Phase]:
    """The curriculum's phases, in order, from cfg.curriculum and one row tensor per phase."""
    if len(curriculum_tokens) != len(cfg.curriculum):
        raise ValueError(f"curriculum_tokens has {len(curriculum_tokens)} tensors; the curriculum has "
                         f"{len(cfg.curriculum)} phases")
    phases, first = [], 0
    for i, ((context, steps), tokens) in enumerate(zip(cfg.curriculum, curriculum_tokens)):
        name = f"curriculum_tokens[{i}]"
        if not 2 <= context <= ctx or steps < 0:
            raise ValueError(f"curriculum phase {i}: context must be in [2, {ctx}] and steps >= 0; "
                             f"got ({context}, {steps})")
        rows = as_rows(tokens, context, name)
        if rows.shape[1] != context:
            raise ValueError(f"{name} rows have {rows.shape[1]} tokens; the phase's context is {context}")
        batch = curriculum_batch_size(cfg, context, ctx)
        if rows.shape[0] < batch:
            raise ValueError(f"{name} has {rows.shape[0]} rows, fewer than one step's {batch}")
        phases.append(_Phase(rows, batch, first, first + steps, torch.Generator().manual_seed(cfg.seed + 1 + i)))
        first += steps
    if first > cfg.steps:
        raise ValueError(f"the curriculum's {first} steps exceed steps ({cfg.steps})")
    return phases


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to lr, then lr_min + (lr - lr_min) (1 + cos(pi p)) / 2 with p the progress through the decay:
    every step after the warmup, or the last cfg.decay_steps steps (lr held until then)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_start = cfg.warmup_steps if cfg.decay_steps is None else max(cfg.warmup_steps, cfg.steps - cfg.decay_steps)
    progress = min(1.0, max(0.0, (step - decay_start) / max(1, cfg.steps - decay_start)))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_model(cfg: PretrainConfig, vocab_size: int, eos_id: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(config)
    if cfg.position_init == "sinusoidal":
        with torch.no_grad():
            model.transformer.wpe.weight.copy_(sinusoidal_positions(cfg.n_positions, cfg.n_embd) * cfg.position_init_scale)
    elif cfg.position_init != "normal":
        raise ValueError(f"position_init must be 'normal' or 'sinusoidal'; got {cfg.position_init!r}")
    return model


def sinusoidal_positions(n_positions: int, d_model: int) -> torch.Tensor:
    """[n_positions, d_model]: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]
    return table


def _optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)  # no decay on biases and LN
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def _loss(model: torch.nn.Module, batch: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    logits = model(input_ids=batch, position_ids=position_ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
    )


@torch.no_grad()
def mean_ce(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 32, skip_first: int = 0) -> float:
    """Mean per-token next-token cross-entropy (nats) of `model` over LongTensor[n_seq, ctx].

    `skip_first` leaves the predictions made at the first positions out (1: the token after
    the leading <|endoftext|> is not scored... 0 scores every next token).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i : i + batch_size]
        logits = model(input_ids=batch).logits[:, skip_first:-1]
        targets = batch[:, skip_first + 1 :]
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
        )
        total += float(ce)
        count += targets.numel()
    model.train(was_training)
    return total / max(count, 1)


def pretrain(
    tokens: torch.Tensor,
    config: PretrainConfig | None = None,
    out_dir: str | Path = "pretrained",
    *,
    tokenizer: Any = None,
    eval_tokens: torch.Tensor | None = None,
    curriculum_tokens: Sequence[torch.Tensor] = (),
    progress: bool | Callable[[str, float], None] = True,
) -> PretrainResult:
    """Train a GPT2LMHeadModel from scratch on `tokens`; save it to `out_dir`.

    `tokens`: LongTensor[n_seq, ctx] (ctx <= n_positions), or a 1-D token stream that is packed
    into rows of n_positions tokens, each starting with the tokenizer's eos (id 0 without one).
    `eval_tokens`: held-out sequences (same forms) for the periodic held-out CE.
    `curriculum_tokens`: one LongTensor[n_seq, context] (or a 1-D stream, packed to that) per phase of
    cfg.curriculum, the rows of that phase's steps.
    `progress`: a tqdm bar (True), nothing (False), or a callback(stage, fraction).
    """
    cfg = config or PretrainConfig()
    out = Path(out_dir)
    t_start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    eos_id = tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None else 0

    def as_rows(t: torch.Tensor, context: int = cfg.n_positions, name: str = "tokens") -> torch.Tensor:
        t = torch.as_tensor(t).long()
        if t.dim() == 1:
            return pack_stream(t, context, eos_id)
        if t.dim() != 2 or t.shape[1] > context or t.shape[1] < 2:
            raise ValueError(f"{name} must be [n_seq, ctx <= {context}] or 1-D; got {tuple(t.shape)}")
        return t.contiguous()

    data = as_rows(tokens)
    evals = as_rows(eval_tokens)[: cfg.eval_sequences] if eval_tokens is not None else None
    phases = _curriculum_phases(cfg, curriculum_tokens, as_rows, data.shape[1])
    if cfg.vocab_size is not None:
        vocab_size = cfg.vocab_size
    elif tokenizer is not None:
        vocab_size = len(tokenizer)
    else:
        vocab_size = max(int(t.max()) for t in [data] + [ph.rows for ph in phases]) + 1
    for name, t in [("tokens", data)] + [(f"curriculum_tokens[{i}]", ph.rows) for i, ph in enumerate(phases)]:
        if int(t.max()) >= vocab_size:
            raise ValueError(f"{name}: token id {int(t.max())} is outside the vocabulary ({vocab_size})")

    model = make_model(cfg, vocab_size, eos_id)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = _optimizer(model, cfg)
    n_seq, ctx = data.shape
    # the full-length rows are the last phase, to the end of training
    full_rows = _Phase(data, cfg.batch_size, phases[-1].end_step if phases else 0, cfg.steps,
                       torch.Generator().manual_seed(cfg.seed))
    offset_gen = torch.Generator().manual_seed(cfg.seed + 100)
    for i, phase in enumerate(phases):
        logger.info("pretrain: curriculum phase %d, steps %d-%d: %d rows of %d tokens, %d per step", i + 1,
                    phase.first_step + 1, phase.end_step, phase.rows.shape[0], phase.rows.shape[1], phase.batch_size)
    logger.info(
        "pretrain: %d params, %d sequences of %d tokens (%.2fM tokens, %.2f epochs for %d steps x %d)",
        n_params, n_seq, ctx, n_seq * ctx / 1e6, cfg.steps * cfg.batch_size / n_seq, cfg.steps, cfg.batch_size,
    )

    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="pretrain", unit="step", dynamic_ncols=True)
    callback = progress if callable(progress) else None

    history: dict[str, list] = {"step": [], "loss": [], "lr": [], "eval_step": [], "eval_ce": [], "time": []}
    budget_s = cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else None
    completed = True
    step = 0
    t_train = time.perf_counter()
    losses: list[float] = []
    last_eval: float | None = None

    def evaluate() -> None:
        nonlocal last_eval
        if evals is None:
            return
        last_eval = mean_ce(model, evals)
        history["eval_step"].append(step)
        history["eval_ce"].append(last_eval)
        logger.info("pretrain step %d: held-out CE %.4f", step, last_eval)

    while step < cfg.steps:
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            completed = False
            logger.warning("pretrain: time budget of %.1f min reached at step %d of %d", cfg.time_budget_minutes,
                           step, cfg.steps)
            break
        phase = next((ph for ph in phases if ph.first_step <= step < ph.end_step), full_rows)
        batch = phase.next_batch()
        position_ids = None
        if phase is not full_rows and cfg.curriculum_position_offsets:
            offsets = torch.randint(0, cfg.n_positions - batch.shape[1] + 1, (batch.shape[0], 1),
                                    generator=offset_gen)
            position_ids = offsets + torch.arange(batch.shape[1])
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = _loss(model, batch, position_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"pretrain: loss is {value} at step {step}")
        losses.append(value)
        if step % cfg.log_every == 0 or step == cfg.steps:
            history["step"].append(step)
            history["loss"].append(sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]))
            history["lr"].append(lr)
            history["time"].append(round(time.perf_counter() - t_train, 2))
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            evaluate()
        if cfg.snapshot_every and step % cfg.snapshot_every == 0 and step < cfg.steps:
            model.save_pretrained(out / f"step-{step}", safe_serialization=True)
        if bar is not None:
            bar.update(1)
            if step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{value:.3f}", ce=f"{last_eval:.3f}" if last_eval is not None else "-")
        if callback is not None:
            callback("pretrain", step / cfg.steps)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t_train
    evaluate()
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    tokens_seen = sum(ph.tokens_seen(step) for ph in phases + [full_rows])
    tps = tokens_seen / train_seconds if train_seconds > 0 else float("nan")
    final_loss = sum(losses[-50:]) / max(1, len(losses[-50:])) if losses else float("nan")
    log = {
        "format": "lnscope-pretrain-log/1",
        "config": cfg.to_dict(),
        "vocab_size": vocab_size,
        "n_params": n_params,
        "data": {"n_sequences": n_seq, "context": ctx, "tokens": n_seq * ctx,
                 "eval_sequences": 0 if evals is None else evals.shape[0],
                 "curriculum": [{"context": ph.rows.shape[1], "steps": ph.end_step - ph.first_step,
                                 "sequences": ph.rows.shape[0], "batch_size": ph.batch_size} for ph in phases]},
        "steps": step,
        "completed": completed,
        "tokens_seen": tokens_seen,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(tps, 1),
        "torch_threads": torch.get_num_threads(),
        "final_loss": final_loss,
        "eval_ce": last_eval,
        "history": history,
    }
    log_path = out / LOG_FILE
    log_path.write_text(json.dumps(log, indent=1))
    logger.info("pretrain: %d steps in %.0f s (%.0f tokens/s), final loss %.4f, held-out CE %s", step,
                train_seconds, tps, final_loss, f"{last_eval:.4f}" if last_eval is not None else "-")
    return PretrainResult(
        out_dir=out, steps=step, completed=completed, final_loss=final_loss, eval_ce=last_eval,
        tokens_seen=tokens_seen, tokens_per_second=tps, wall_seconds=time.perf_counter() - t_start,
        n_params=n_params, log_path=log_path, history=history,
    )
