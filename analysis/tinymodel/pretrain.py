"""Pretraining the tiny GPT-2 (`transformers.GPT2LMHeadModel`) from scratch on CPU.

Deterministic: dropout 0, a seeded init and a seeded data order, a fixed number of steps
(`PretrainConfig.steps`); the time budget is only a safety stop. AdamW (weight decay on the
matrices only), linear warmup, then a cosine to `min_lr` over every later step or (with
`decay_steps`) the lr held until a cosine over the last steps; gradient clipping. An optional
context curriculum trains on short rows before the full-length ones.

`pretrain(tokens, config, out_dir)` saves the model (safetensors + config.json), the
tokenizer if given, and `training_log.json` (loss curve, held-out CE, timing) to `out_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
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
    # "normal": GPT-2's N(0, 0.02) position embeddings; "sinusoidal": they start from the Transformer's sin/cos
    # table x position_init_scale, so heads can read relative position from the first step (a short context,
    # not this init, is what makes induction heads form: docs/tiny-trio-history.md)
    position_init: str = "normal"
    position_init_scale: float = 0.1
    # optimiser
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    # None: cosine from lr to min_lr over every step after the warmup. N: lr held after the warmup, then the
    # cosine over the last N steps only (warmup-stable-decay): induction heads form while the lr is high
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
    # diluted by the number of keys. The lr schedule runs over all `steps`, phases included.
    curriculum: tuple[tuple[int, int], ...] = ()
    # each curriculum row at positions o .. o + context - 1, o uniform in [0, n_positions - context] per row,
    # so short rows train every position embedding, not only the first `context` (off by default: on short
    # repeated rows it slows induction)
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

    The same packing as `lnscope.analysis.remove_ln.train.tokenize_documents`: every sequence starts
    with <|endoftext|> (as lnscope's prompts do); the tail that does not fill a row is dropped.
    """
    stream = torch.as_tensor(stream, dtype=torch.long).flatten()
    body = context - 1 if bos_id is not None else context
    n_seq = stream.numel() // body
    if n_seq == 0:
        raise ValueError(f"{stream.numel()} tokens are fewer than one sequence of {context}")
    data = stream[: n_seq * body].view(n_seq, body)  # [n_seq, body]
    if bos_id is not None:
        data = torch.cat([torch.full((n_seq, 1), bos_id, dtype=torch.long), data], dim=1)
    return data.contiguous()


def as_rows(tokens: torch.Tensor | Sequence[int], context: int, bos_id: int, name: str = "tokens") -> torch.Tensor:
    """LongTensor[n_seq, ctx <= context]: `tokens` as given if 2-D, else the 1-D stream packed by pack_stream."""
    t = torch.as_tensor(tokens).long()
    if t.dim() == 1:
        return pack_stream(t, context, bos_id)
    if t.dim() != 2 or t.shape[1] > context or t.shape[1] < 2:
        raise ValueError(f"{name} must be [n_seq, ctx <= {context}] or 1-D; got {tuple(t.shape)}")
    return t.contiguous()


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
    order: torch.Tensor | None = None  # [n_seq]: this epoch's permutation of the rows
    cursor: int = 0

    def next_batch(self) -> torch.Tensor:
        """LongTensor[batch_size, context]: the next rows of this epoch's order (a new epoch when they run out)."""
        if self.order is None or self.cursor + self.batch_size > self.rows.shape[0]:
            self.order, self.cursor = torch.randperm(self.rows.shape[0], generator=self.generator), 0
        batch = self.rows[self.order[self.cursor : self.cursor + self.batch_size]]
        self.cursor += self.batch_size
        return batch

    def tokens_seen(self, steps_taken: int) -> int:
        return max(0, min(steps_taken, self.end_step) - self.first_step) * self.batch_size * self.rows.shape[1]


def _curriculum_phases(
    cfg: PretrainConfig, curriculum_tokens: Sequence[torch.Tensor], bos_id: int, ctx: int
) -> list[_Phase]:
    """The curriculum's phases, in order, from cfg.curriculum and one row tensor (or 1-D stream) per phase."""
    if len(curriculum_tokens) != len(cfg.curriculum):
        raise ValueError(f"curriculum_tokens has {len(curriculum_tokens)} tensors; the curriculum has "
                         f"{len(cfg.curriculum)} phases")
    phases, first = [], 0
    for i, ((context, steps), tokens) in enumerate(zip(cfg.curriculum, curriculum_tokens)):
        name = f"curriculum_tokens[{i}]"
        if not 2 <= context <= ctx or steps < 0:
            raise ValueError(f"curriculum phase {i}: context must be in [2, {ctx}] and steps >= 0; "
                             f"got ({context}, {steps})")
        rows = as_rows(tokens, context, bos_id, name)
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
    """A freshly initialised GPT2LMHeadModel (seeded by cfg.seed): no dropout, tied embeddings, eos as bos/pad."""
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
            table = sinusoidal_positions(cfg.n_positions, cfg.n_embd)  # [n_positions, n_embd]
            model.transformer.wpe.weight.copy_(table * cfg.position_init_scale)
    elif cfg.position_init != "normal":
        raise ValueError(f"position_init must be 'normal' or 'sinusoidal'; got {cfg.position_init!r}")
    return model


def sinusoidal_positions(n_positions: int, d_model: int) -> torch.Tensor:
    """[n_positions, d_model]: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]  # [n_positions, 1]
    freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)  # [ceil(d_model / 2)]
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d_model // 2]
    return table


def _optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only (not on biases and LN parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def _loss(model: torch.nn.Module, batch: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of `batch` [batch, ctx] (positions `position_ids` [batch, ctx], else 0..ctx-1)."""
    logits = model(input_ids=batch, position_ids=position_ids).logits  # [batch, ctx, vocab]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
    )


@torch.no_grad()
def mean_ce(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 32, skip_first: int = 0) -> float:
    """Mean per-token next-token cross-entropy (nats) of `model` over LongTensor[n_seq, ctx].

    `skip_first` leaves the predictions made at the first `skip_first` positions out (0 scores every next token;
    1 does not score the token after the leading <|endoftext|>).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i : i + batch_size]  # [batch, ctx]
        logits = model(input_ids=batch).logits[:, skip_first:-1]  # [batch, ctx - 1 - skip_first, vocab]
        targets = batch[:, skip_first + 1 :]
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
        )
        total += float(ce)
        count += targets.numel()
    model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- pretrain's phases
@dataclass
class _TrainingData:
    """What pretraining reads: the full-length rows, the held-out rows and the curriculum's phases."""

    rows: torch.Tensor  # [n_seq, ctx]
    evals: torch.Tensor | None  # [<= eval_sequences, ctx]
    phases: list[_Phase]  # the curriculum, in order (the full-length rows follow them)
    eos_id: int
    vocab_size: int


@dataclass
class _TrainingRun:
    """The loop's state and record: steps taken, every step's loss, the logged curves and the last held-out CE."""

    full_rows: _Phase
    step: int = 0
    completed: bool = True
    losses: list[float] = field(default_factory=list)
    history: dict[str, list] = field(default_factory=lambda: {
        "step": [], "loss": [], "lr": [], "eval_step": [], "eval_ce": [], "time": []})
    last_eval: float | None = None
    train_seconds: float = 0.0


def _eos_id(tokenizer: Any) -> int:
    """The tokenizer's <|endoftext|> id (0 without a tokenizer or without one)."""
    return tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None else 0


def _training_data(cfg: PretrainConfig, tokens: torch.Tensor, eval_tokens: torch.Tensor | None,
                   curriculum_tokens: Sequence[torch.Tensor], tokenizer: Any) -> _TrainingData:
    """Pack and check every input: rows of at most n_positions tokens, ids inside the vocabulary."""
    eos_id = _eos_id(tokenizer)
    rows = as_rows(tokens, cfg.n_positions, eos_id)
    evals = as_rows(eval_tokens, cfg.n_positions, eos_id)[: cfg.eval_sequences] if eval_tokens is not None else None
    phases = _curriculum_phases(cfg, curriculum_tokens, eos_id, rows.shape[1])
    if cfg.vocab_size is not None:
        vocab_size = cfg.vocab_size
    elif tokenizer is not None:
        vocab_size = len(tokenizer)
    else:
        vocab_size = max(int(t.max()) for t in [rows] + [ph.rows for ph in phases]) + 1
    for name, t in [("tokens", rows)] + [(f"curriculum_tokens[{i}]", ph.rows) for i, ph in enumerate(phases)]:
        if int(t.max()) >= vocab_size:
            raise ValueError(f"{name}: token id {int(t.max())} is outside the vocabulary ({vocab_size})")
    return _TrainingData(rows, evals, phases, eos_id, vocab_size)


def _log_plan(cfg: PretrainConfig, data: _TrainingData, n_params: int) -> None:
    """Log each curriculum phase and the full-length rows before training."""
    for i, phase in enumerate(data.phases):
        logger.info("pretrain: curriculum phase %d, steps %d-%d: %d rows of %d tokens, %d per step", i + 1,
                    phase.first_step + 1, phase.end_step, phase.rows.shape[0], phase.rows.shape[1], phase.batch_size)
    n_seq, ctx = data.rows.shape
    logger.info(
        "pretrain: %d params, %d sequences of %d tokens (%.2fM tokens, %.2f epochs for %d steps x %d)",
        n_params, n_seq, ctx, n_seq * ctx / 1e6, cfg.steps * cfg.batch_size / n_seq, cfg.steps, cfg.batch_size,
    )


class _ProgressReport:
    """A tqdm bar (progress True), a callback(stage, fraction) (progress callable), or nothing."""

    def __init__(self, progress: bool | Callable[[str, float], None], steps: int) -> None:
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc="pretrain", unit="step", dynamic_ncols=True)
        self.callback = progress if callable(progress) else None
        self.steps = steps

    def update(self, step: int, loss: float, last_eval: float | None, log_every: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if step % log_every == 0:
                self.bar.set_postfix(loss=f"{loss:.3f}", ce=f"{last_eval:.3f}" if last_eval is not None else "-")
        if self.callback is not None:
            self.callback("pretrain", step / self.steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _evaluate(model: torch.nn.Module, evals: torch.Tensor | None, run: _TrainingRun) -> None:
    """Record the held-out CE at the current step (nothing without held-out rows)."""
    if evals is None:
        return
    run.last_eval = mean_ce(model, evals)
    run.history["eval_step"].append(run.step)
    run.history["eval_ce"].append(run.last_eval)
    logger.info("pretrain step %d: held-out CE %.4f", run.step, run.last_eval)


def _phase_at(step: int, phases: list[_Phase], full_rows: _Phase) -> _Phase:
    """The curriculum phase that holds `step`, else the full-length rows."""
    return next((ph for ph in phases if ph.first_step <= step < ph.end_step), full_rows)


def _position_offsets(batch: torch.Tensor, n_positions: int, generator: torch.Generator) -> torch.Tensor:
    """LongTensor[batch, context]: row r's positions o_r .. o_r + context - 1, o_r uniform in
    [0, n_positions - context]."""
    offsets = torch.randint(0, n_positions - batch.shape[1] + 1, (batch.shape[0], 1), generator=generator)
    return offsets + torch.arange(batch.shape[1])


def _optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: PretrainConfig, lr: float,
                    batch: torch.Tensor, position_ids: torch.Tensor | None) -> float:
    """One AdamW step at `lr` on the batch's next-token loss (gradient norm clipped to cfg.grad_clip); the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = _loss(model, batch, position_ids)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.item()


def _record_step(run: _TrainingRun, cfg: PretrainConfig, loss: float, lr: float, t_train: float) -> None:
    """Keep the step's loss; every log_every steps (and at the last) log the mean loss since the last entry."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"pretrain: loss is {loss} at step {run.step}")
    run.losses.append(loss)
    if run.step % cfg.log_every == 0 or run.step == cfg.steps:
        recent = run.losses[-cfg.log_every:]
        run.history["step"].append(run.step)
        run.history["loss"].append(sum(recent) / len(recent))
        run.history["lr"].append(lr)
        run.history["time"].append(round(time.perf_counter() - t_train, 2))


def _over_budget(cfg: PretrainConfig, t_start: float, step: int) -> bool:
    """True (with a warning) once the safety stop's time budget is spent."""
    if not cfg.time_budget_minutes:
        return False
    if time.perf_counter() - t_start <= cfg.time_budget_minutes * 60:
        return False
    logger.warning("pretrain: time budget of %.1f min reached at step %d of %d", cfg.time_budget_minutes,
                   step, cfg.steps)
    return True


def _train(model: torch.nn.Module, cfg: PretrainConfig, data: _TrainingData, out: Path,
           progress: bool | Callable[[str, float], None], t_start: float) -> _TrainingRun:
    """The training loop: curriculum phases, then the full-length rows to cfg.steps (or the time budget)."""
    opt = _optimizer(model, cfg)
    # the full-length rows are the last phase, to the end of training
    full_start = data.phases[-1].end_step if data.phases else 0
    full_rows = _Phase(data.rows, cfg.batch_size, full_start, cfg.steps, torch.Generator().manual_seed(cfg.seed))
    run = _TrainingRun(full_rows)
    offset_gen = torch.Generator().manual_seed(cfg.seed + 100)
    report = _ProgressReport(progress, cfg.steps)
    t_train = time.perf_counter()
    while run.step < cfg.steps:
        if _over_budget(cfg, t_start, run.step):
            run.completed = False
            break
        phase = _phase_at(run.step, data.phases, run.full_rows)
        batch = phase.next_batch()  # [rows per step, phase context]
        offsets = phase is not run.full_rows and cfg.curriculum_position_offsets
        position_ids = _position_offsets(batch, cfg.n_positions, offset_gen) if offsets else None
        lr = lr_at(run.step, cfg)
        loss = _optimizer_step(model, opt, cfg, lr, batch, position_ids)
        run.step += 1
        _record_step(run, cfg, loss, lr, t_train)
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.steps:
            _evaluate(model, data.evals, run)
        if cfg.snapshot_every and run.step % cfg.snapshot_every == 0 and run.step < cfg.steps:
            model.save_pretrained(out / f"step-{run.step}", safe_serialization=True)
        report.update(run.step, loss, run.last_eval, cfg.log_every)
    report.close()
    run.train_seconds = time.perf_counter() - t_train
    _evaluate(model, data.evals, run)
    return run


def _training_log(cfg: PretrainConfig, data: _TrainingData, run: _TrainingRun, n_params: int, tokens_seen: int,
                  final_loss: float) -> dict[str, Any]:
    """The content of training_log.json (format lnscope-pretrain-log/1)."""
    n_seq, ctx = data.rows.shape
    tps = tokens_seen / run.train_seconds if run.train_seconds > 0 else float("nan")
    return {
        "format": "lnscope-pretrain-log/1",
        "config": cfg.to_dict(),
        "vocab_size": data.vocab_size,
        "n_params": n_params,
        "data": {"n_sequences": n_seq, "context": ctx, "tokens": n_seq * ctx,
                 "eval_sequences": 0 if data.evals is None else data.evals.shape[0],
                 "curriculum": [{"context": ph.rows.shape[1], "steps": ph.end_step - ph.first_step,
                                 "sequences": ph.rows.shape[0], "batch_size": ph.batch_size} for ph in data.phases]},
        "steps": run.step,
        "completed": run.completed,
        "tokens_seen": tokens_seen,
        "train_seconds": round(run.train_seconds, 2),
        "tokens_per_second": round(tps, 1),
        "torch_threads": torch.get_num_threads(),
        "final_loss": final_loss,
        "eval_ce": run.last_eval,
        "history": run.history,
    }


def _save(model: torch.nn.Module, tokenizer: Any, out: Path, cfg: PretrainConfig, data: _TrainingData,
          run: _TrainingRun, n_params: int, t_start: float) -> PretrainResult:
    """Write the model, the tokenizer (if any) and training_log.json to `out`; the run's summary."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    tokens_seen = sum(ph.tokens_seen(run.step) for ph in data.phases + [run.full_rows])
    tps = tokens_seen / run.train_seconds if run.train_seconds > 0 else float("nan")
    final_loss = sum(run.losses[-50:]) / max(1, len(run.losses[-50:])) if run.losses else float("nan")
    log_path = out / LOG_FILE
    log_path.write_text(json.dumps(_training_log(cfg, data, run, n_params, tokens_seen, final_loss), indent=1))
    logger.info("pretrain: %d steps in %.0f s (%.0f tokens/s), final loss %.4f, held-out CE %s", run.step,
                run.train_seconds, tps, final_loss, f"{run.last_eval:.4f}" if run.last_eval is not None else "-")
    return PretrainResult(
        out_dir=out, steps=run.step, completed=run.completed, final_loss=final_loss, eval_ce=run.last_eval,
        tokens_seen=tokens_seen, tokens_per_second=tps, wall_seconds=time.perf_counter() - t_start,
        n_params=n_params, log_path=log_path, history=run.history,
    )


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
    t_start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    data = _training_data(cfg, tokens, eval_tokens, curriculum_tokens, tokenizer)
    model = make_model(cfg, data.vocab_size, data.eos_id)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    _log_plan(cfg, data, n_params)
    run = _train(model, cfg, data, Path(out_dir), progress, t_start)
    model.eval()
    return _save(model, tokenizer, Path(out_dir), cfg, data, run, n_params, t_start)
