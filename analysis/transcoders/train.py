"""Training per-layer transcoders on a model's own activations, and measuring them.

Per layer l: input x = what the MLP receives (`blocks.{l}.mlp.hook_in`; see model.py), target
y = `blocks.{l}.hook_mlp_out`. Activations from many sequences go into a buffer that is shuffled
across prompts; batches are drawn from it and half of it is refilled when used up.

Scale: inputs and targets are multiplied by one constant per layer each (s_in, s_out) so that
E||x||^2 = E||y||^2 = d_model (so `l1_coeff` means the same on a model with and without LayerNorm,
whose residuals differ in scale); the constants are folded back into the weights at the end (ReLU and
TopK are positively homogeneous, the decoder rows stay unit-norm).

Loss (normalised units):  ||y_hat - y||^2 / d_model  +  l1_coeff * sum_f z_f ||W_dec[f]||   (ReLU; the
L1 coefficient is ramped up over `l1_warmup_frac` of training), or the TopK reconstruction plus
`aux_coeff` * the aux-k loss (the dead features' top `aux_k` pre-activations reconstructing the
residual error). Decoder rows are renormalised to unit norm after every step (and the gradient
parallel to them removed before it). Dead features (no activation in the last `dead_window` training
tokens) of a ReLU transcoder are resampled at a few checkpoints as in Anthropic's recipe: toward
inputs drawn with probability proportional to their squared reconstruction loss (decoder row = the
normalised residual error there, encoder row = the normalised centred input scaled to 0.2 x the mean
alive encoder norm, b_enc = 0, Adam state reset).

Metrics, on held-out sequences (the last `eval_fraction` of the text's sequences; position 0, the BOS
token, excluded when `exclude_bos`): per layer L0 (mean active features per token), FVU
(sum ||y_hat - y||^2 / sum ||y - mean(y)||^2) and the dead fraction (never active on the eval tokens);
for the whole model the cross-entropy with every trained layer's MLP replaced by its transcoder vs the
clean model vs those MLPs zero-ablated, CE recovered = (CE_zero - CE_tc) / (CE_zero - CE_clean), and
KL(clean || spliced) per token. With `exclude_bos` position 0 keeps its real MLP output in the spliced
and ablated runs (the transcoders never saw it; graphs treat it the same way).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch
from pydantic import BaseModel, Field

from lnscope.analysis.ln_stats import text_sequences
from lnscope.analysis.loading import LoadedModel
from lnscope.analysis.progress import Progress, ensure
from lnscope.analysis.results import Manifest, make_manifest
from lnscope.analysis.transcoders.model import Transcoder, TranscoderSet

logger = logging.getLogger(__name__)


class LayerMetrics(BaseModel):
    layer: int
    l0: float = Field(description="mean number of active features per token")
    fvu: float = Field(description="fraction of variance unexplained")
    dead_fraction: float = Field(description="features never active on the eval tokens")
    mse: float = Field(description="mean ||y_hat - y||^2 per token (model units)")
    n_eval_tokens: int
    n_resampled: int = Field(description="features resampled during training")
    final_train_loss: float | None


class TranscoderTrainingResult(BaseModel):
    manifest: Manifest
    role: str
    d_model: int
    d_transcoder: int
    activation: str
    layers: list[LayerMetrics]
    ce_clean: float
    ce_transcoders: float = Field(description="CE with every trained layer's MLP replaced by its transcoder")
    ce_zero_ablation: float = Field(description="CE with those MLPs zero-ablated")
    ce_recovered: float | None = Field(description="(CE_zero - CE_tc) / (CE_zero - CE_clean)")
    kl_to_original: float = Field(description="mean KL(clean || spliced) per token, nats")
    n_train_tokens: int
    n_eval_tokens: int
    steps: int
    seconds: float
    out_dir: str | None = None


# ------------------------------------------------------------------------------------ activations
def _batches(seqs: Sequence[Sequence[int]], size: int) -> Iterator[list[Sequence[int]]]:
    for s in range(0, len(seqs), size):
        yield list(seqs[s:s + size])


@torch.no_grad()
def collect_activations(model: LoadedModel, seqs: Sequence[Sequence[int]], layers: Sequence[int], *,
                        exclude_bos: bool = True, seq_batch: int = 8) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (MLP inputs [n, d], MLP outputs [n, d]) over all real positions of `seqs`."""
    bridge = model.bridge
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    names = {f"blocks.{l}.mlp.hook_in" for l in layers} | {f"blocks.{l}.hook_mlp_out" for l in layers}
    xs: dict[int, list] = {l: [] for l in layers}
    ys: dict[int, list] = {l: [] for l in layers}
    for batch in _batches(seqs, seq_batch):
        width = max(len(s) for s in batch)
        toks = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for i, s in enumerate(batch):
            toks[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = True
        if exclude_bos:
            mask[:, 0] = False
        _, cache = bridge.run_with_cache(toks.to(model.device), names_filter=lambda n: n in names)
        m = mask.to(model.device)
        for l in layers:
            xs[l].append(cache[f"blocks.{l}.mlp.hook_in"][m].float())
            ys[l].append(cache[f"blocks.{l}.hook_mlp_out"][m].float())
        del cache
    return {l: (torch.cat(xs[l]), torch.cat(ys[l])) for l in layers}


class ActivationBuffer:
    """Shuffled (input, target) rows for every layer, refilled from a cycling stream of sequences."""

    def __init__(self, model: LoadedModel, seqs: Sequence[Sequence[int]], layers: Sequence[int], *, size: int,
                 batch_size: int, exclude_bos: bool, seed: int) -> None:
        if not seqs:
            raise ValueError("no training sequences (is the text empty?)")
        self.model, self.seqs, self.layers = model, list(seqs), list(layers)
        self.size, self.batch_size, self.exclude_bos = max(size, batch_size), batch_size, exclude_bos
        self.gen = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(len(self.seqs), generator=self.gen).tolist()
        self._next = 0
        self.epochs = 0
        self.x = {l: torch.empty(0) for l in self.layers}
        self.y = {l: torch.empty(0) for l in self.layers}
        self._pos = 0
        self._fill(self.size)

    def _more(self, n: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        got: dict[int, list] = {l: [] for l in self.layers}
        count = 0
        while count < n:
            chunk = []
            while len(chunk) < 8:
                if self._next >= len(self._order):
                    self._order = torch.randperm(len(self.seqs), generator=self.gen).tolist()
                    self._next = 0
                    self.epochs += 1
                chunk.append(self.seqs[self._order[self._next]])
                self._next += 1
            acts = collect_activations(self.model, chunk, self.layers, exclude_bos=self.exclude_bos)
            for l in self.layers:
                got[l].append(acts[l])
            count += acts[self.layers[0]][0].shape[0]
        return {l: (torch.cat([a[0] for a in got[l]])[:n], torch.cat([a[1] for a in got[l]])[:n]) for l in self.layers}

    def _fill(self, n: int) -> None:
        new = self._more(n)
        for l in self.layers:
            if self.x[l].numel():
                self.x[l] = torch.cat([self.x[l][self._pos:], new[l][0]])
                self.y[l] = torch.cat([self.y[l][self._pos:], new[l][1]])
            else:
                self.x[l], self.y[l] = new[l]
        perm = torch.randperm(self.x[self.layers[0]].shape[0], generator=self.gen)
        for l in self.layers:
            self.x[l], self.y[l] = self.x[l][perm], self.y[l][perm]
        self._pos = 0

    def next(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        if self._pos + self.batch_size > self.size // 2:
            self._fill(self._pos)  # replace the used half with fresh activations, reshuffle everything
        s = self._pos
        self._pos += self.batch_size
        return {l: (self.x[l][s:s + self.batch_size], self.y[l][s:s + self.batch_size]) for l in self.layers}

    def sample(self, n: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.randint(0, self.x[self.layers[0]].shape[0], (n,), generator=self.gen)
        return {l: (self.x[l][idx], self.y[l][idx]) for l in self.layers}


# -------------------------------------------------------------------------------------- training
def _init(tc: Transcoder, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> None:
    with torch.no_grad():
        W = torch.randn(tc.d_transcoder, tc.d_model, generator=gen)
        W = W / W.norm(dim=-1, keepdim=True)
        tc.W_dec.copy_(W)
        # tied initialisation, small; mean-free like the (centred) residual stream it reads, so that an
        # LN-free model's transcoder does not read the all-ones direction its decoder rows may write
        tc.W_enc.copy_((W - W.mean(-1, keepdim=True)) * 0.1)
        tc.b_enc.zero_()
        tc.b_in.copy_(x.mean(0))
        tc.b_dec.copy_(y.mean(0))
        if tc.W_skip is not None:
            tc.W_skip.zero_()


def _losses(tc: Transcoder, x: torch.Tensor, y: torch.Tensor, *, l1: float, dead: torch.Tensor | None,
            aux_k: int, aux_coeff: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    pre = tc.pre_acts(x)
    z = tc.activate(pre)
    y_hat = tc.decode(z, x)
    d = y.shape[-1]
    err = y_hat - y
    mse = err.pow(2).sum(-1).mean() / d
    loss = mse
    stats = {"mse": float(mse.detach())}
    if tc.activation == "relu":
        sparsity = (z * tc.W_dec.norm(dim=-1)).sum(-1).mean()
        loss = loss + l1 * sparsity
        stats["l1"] = float(sparsity.detach())
    elif dead is not None and dead.any():
        # aux-k: the dead features' largest pre-activations reconstruct the residual error
        k = min(aux_k, int(dead.sum()))
        masked = torch.where(dead[None], torch.relu(pre), torch.zeros_like(pre))
        vals, idx = masked.topk(k, dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, idx, vals)
        residual = (y - y_hat).detach()
        aux = (z_aux @ tc.W_dec - residual).pow(2).sum(-1).mean() / d
        loss = loss + aux_coeff * aux
        stats["aux"] = float(aux.detach())
    return loss, z, stats


@torch.no_grad()
def _resample(tc: Transcoder, dead: torch.Tensor, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Adam,
              gen: torch.Generator) -> int:
    n = int(dead.sum())
    if n == 0:
        return 0
    y_hat = tc(x)
    loss = (y_hat - y).pow(2).sum(-1)
    if float(loss.max()) < 1e-12:
        return 0
    p = loss.pow(2) / loss.pow(2).sum()
    pick = torch.multinomial(p.cpu(), n, replacement=True, generator=gen).to(x.device)
    resid = (y - y_hat)[pick]
    inp = (x - tc.b_in)[pick]
    alive = ~dead
    enc_norm = float(tc.W_enc[alive].norm(dim=-1).mean()) if alive.any() else 1.0
    tc.W_dec[dead] = resid / resid.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    tc.W_enc[dead] = inp / inp.norm(dim=-1, keepdim=True).clamp_min(1e-8) * enc_norm * 0.2
    tc.b_enc[dead] = 0.0
    for param, rows in ((tc.W_dec, dead), (tc.W_enc, dead), (tc.b_enc, dead)):
        state = opt.state.get(param)
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][rows] = 0.0
    return n


@torch.no_grad()
def _fold_scales(tc: Transcoder, s_in: float, s_out: float) -> None:
    """Turn a transcoder trained on (x s_in -> y s_out) into one on (x -> y)."""
    tc.W_enc.mul_(s_in / s_out)
    tc.b_in.div_(s_in)
    tc.b_enc.div_(s_out)
    tc.b_dec.div_(s_out)
    if tc.W_skip is not None:
        tc.W_skip.mul_(s_in / s_out)


def train_transcoders(
    model: LoadedModel,
    texts: Sequence[str],
    *,
    d_transcoder: int,
    layers: Sequence[int] | None = None,
    activation: Literal["relu", "topk"] = "relu",
    l1_coeff: float = 3e-3,
    k: int = 16,
    skip: bool = False,
    n_tokens: int = 200_000,
    batch_size: int = 512,
    lr: float = 1e-3,
    seed: int = 0,
    context: int | None = None,
    buffer_batches: int = 32,
    dead_window: int | None = None,
    n_resamples: int = 3,
    aux_k: int | None = None,
    aux_coeff: float = 1 / 32,
    l1_warmup_frac: float = 0.05,
    eval_fraction: float = 0.1,
    eval_max_tokens: int = 20_000,
    exclude_bos: bool = True,
    pair: str | None = None,
    progress: Progress | None = None,
    show_progress_bar: bool = True,
) -> tuple[TranscoderSet, TranscoderTrainingResult]:
    """Train one transcoder per layer on `model`'s activations over `texts` (see the module docstring).

    `n_tokens` training tokens (steps = n_tokens // batch_size; the text is cycled if shorter),
    `buffer_batches` batches of activations shuffled together, `dead_window` tokens without activation
    make a feature dead (default: a fifth of training). Returns the transcoders and their metrics.
    """
    progress = ensure(progress)
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layers = _checked_layers(model, layers, activation)
    n_ctx = int(model.bridge.cfg.n_ctx)
    context = min(context or n_ctx, n_ctx)
    train_seqs, eval_seqs = _split_sequences(model, texts, context, eval_fraction)
    steps = max(1, n_tokens // batch_size)
    schedule = _Schedule(steps=steps, lr=lr, l1_coeff=l1_coeff, l1_warmup_frac=l1_warmup_frac,
                         dead_window=dead_window or max(batch_size, (steps * batch_size) // 5),
                         resample_at=_resample_steps(steps, n_resamples) if activation == "relu" else set())
    aux_k = aux_k or max(2 * k, 32)

    progress.stage("transcoders: activations", 0.0)
    buffer = ActivationBuffer(model, train_seqs, layers, size=buffer_batches * batch_size, batch_size=batch_size,
                              exclude_bos=exclude_bos, seed=seed)
    run = _start_training(model, buffer, layers, d_transcoder=d_transcoder, activation=activation, k=k, skip=skip,
                          lr=lr, gen=gen)
    _optimise(model, run, buffer, schedule, aux_k=aux_k, aux_coeff=aux_coeff, gen=gen, progress=progress,
              show_progress_bar=show_progress_bar)
    tset = _finished_set(model, run)
    options = dict(d_transcoder=d_transcoder, layers=layers, activation=activation, l1_coeff=l1_coeff,
                   k=k if activation == "topk" else None, skip=skip, n_tokens=n_tokens, batch_size=batch_size, lr=lr,
                   context=context, buffer_batches=buffer_batches, dead_window=schedule.dead_window,
                   n_resamples=n_resamples, aux_k=aux_k if activation == "topk" else None, aux_coeff=aux_coeff,
                   exclude_bos=exclude_bos, eval_fraction=eval_fraction, n_texts=len(texts),
                   input_scales={str(l): run.scales[l][0] for l in layers},
                   output_scales={str(l): run.scales[l][1] for l in layers})
    progress.stage("transcoders: evaluation", 0.85)
    result = evaluate_transcoders(model, tset, eval_seqs, exclude_bos=exclude_bos, max_tokens=eval_max_tokens,
                                  pair=pair, seed=seed, options=options)
    result.n_train_tokens = run.tokens_seen
    result.steps = steps
    result.seconds = time.perf_counter() - start
    for m in result.layers:
        m.n_resampled = run.resampled.get(m.layer, 0)
        m.final_train_loss = run.final_loss.get(m.layer)
    tset.info = {"training": options, "metrics": result.model_dump(mode="json", exclude={"manifest"})}
    progress.stage("transcoders: done", 1.0)
    return tset, result


def _checked_layers(model: LoadedModel, layers: Sequence[int] | None, activation: str) -> list[int]:
    """The layers to train (default all), sorted; raises on a layer outside the model or an unknown activation."""
    L = int(model.bridge.cfg.n_layers)
    layers = list(range(L)) if layers is None else sorted({int(l) for l in layers})
    if not layers or any(not 0 <= l < L for l in layers):
        raise ValueError(f"layers must be in 0..{L - 1}, got {layers}")
    if activation not in ("relu", "topk"):
        raise ValueError(f"activation must be relu or topk, not {activation!r}")
    return layers


def _split_sequences(model: LoadedModel, texts: Sequence[str], context: int,
                     eval_fraction: float) -> tuple[list[list[int]], list[list[int]]]:
    """(training, held-out) token sequences: the last `eval_fraction` are held out (all reused when only one)."""
    seqs = text_sequences(model.tokenizer, texts, context)
    if not seqs:
        raise ValueError("the training text gives no sequences")
    n_eval = max(1, int(round(len(seqs) * eval_fraction))) if len(seqs) > 1 else 0
    return (seqs[:-n_eval], seqs[-n_eval:]) if n_eval else (seqs, seqs)


def _resample_steps(steps: int, n_resamples: int) -> set[int]:
    """The steps after which dead features are resampled: 20%, 40%, 60% of training (the first n_resamples)."""
    return {int(steps * f) for f in (0.2, 0.4, 0.6)[:n_resamples]}


@dataclass
class _Schedule:
    """Learning rate (linear warm-up over 1% of the steps, linear decay over the last 20%) and L1 ramp."""

    steps: int
    lr: float
    l1_coeff: float
    l1_warmup_frac: float
    dead_window: int  # tokens without activation that make a feature dead
    resample_at: set[int]

    def lr_at(self, step: int) -> float:
        warmup = max(1, self.steps // 100)
        decay_from = int(self.steps * 0.8)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if step >= decay_from:
            return self.lr * max(0.0, (self.steps - step) / max(1, self.steps - decay_from))
        return self.lr

    def l1_at(self, step: int) -> float:
        return self.l1_coeff * min(1.0, (step + 1) / max(1, self.l1_warmup_frac * self.steps))


@dataclass
class _Training:
    """The transcoders being trained (in normalised units) and what the loop tracks per layer."""

    tcs: dict[int, Transcoder]
    scales: dict[int, tuple[float, float]]  # layer -> (s_in, s_out)
    opt: torch.optim.Adam
    device: torch.device | str
    last_fired: dict[int, torch.Tensor]  # layer -> [d_transcoder] long: tokens seen when each feature last fired
    resampled: dict[int, int]
    final_loss: dict[int, float]
    tokens_seen: int = 0


def _start_training(model: LoadedModel, buffer: ActivationBuffer, layers: Sequence[int], *, d_transcoder: int,
                    activation: str, k: int, skip: bool, lr: float, gen: torch.Generator) -> _Training:
    """Scales s_in, s_out per layer (E||x s_in||^2 = E||y s_out||^2 = d_model on the first buffer), initialised
    transcoders and their Adam optimiser."""
    d_model, dev = int(model.bridge.cfg.d_model), model.device
    scales: dict[int, tuple[float, float]] = {}
    tcs: dict[int, Transcoder] = {}
    for l in layers:
        x, y = buffer.x[l], buffer.y[l]
        s_in = math.sqrt(d_model / float(x.pow(2).sum(-1).mean().clamp_min(1e-12)))
        s_out = math.sqrt(d_model / float(y.pow(2).sum(-1).mean().clamp_min(1e-12)))
        scales[l] = (s_in, s_out)
        tc = Transcoder(d_model, d_transcoder, activation=activation, k=k if activation == "topk" else None,
                        skip=skip, layer=l, dtype=torch.float32, device=dev)
        _init(tc, (x * s_in).to(dev), (y * s_out).to(dev), gen)
        tcs[l] = tc
    params = [p for tc in tcs.values() for p in tc.parameters()]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    return _Training(tcs=tcs, scales=scales, opt=opt, device=dev,
                     last_fired={l: torch.zeros(d_transcoder, dtype=torch.long, device=dev) for l in layers},
                     resampled={l: 0 for l in layers}, final_loss={})


def _optimise(model: LoadedModel, run: _Training, buffer: ActivationBuffer, schedule: _Schedule, *, aux_k: int,
              aux_coeff: float, gen: torch.Generator, progress: Progress, show_progress_bar: bool) -> None:
    """`schedule.steps` Adam steps on all layers at once, resampling dead features at `schedule.resample_at`."""
    from tqdm.auto import tqdm

    bar = tqdm(total=schedule.steps, desc=f"transcoders ({model.role})", disable=not show_progress_bar, leave=False)
    for step in range(schedule.steps):
        for group in run.opt.param_groups:
            group["lr"] = schedule.lr_at(step)
        total = _train_step(run, buffer.next(), l1=schedule.l1_at(step), dead_window=schedule.dead_window,
                            aux_k=aux_k, aux_coeff=aux_coeff)
        run.tokens_seen += buffer.batch_size
        if step in schedule.resample_at:
            _resample_dead(run, buffer, schedule.dead_window, gen)
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{total / len(run.tcs):.4f}")
            progress.stage("transcoders: training", 0.05 + 0.8 * step / schedule.steps)
    bar.close()


def _train_step(run: _Training, batch: dict[int, tuple[torch.Tensor, torch.Tensor]], *, l1: float, dead_window: int,
                aux_k: int, aux_coeff: float) -> float:
    """One optimiser step on every layer's batch ([batch, d_model] inputs and targets); returns the summed loss.

    The decoder gradient's component along each row is removed before the step and the rows renormalised
    after it, so rows stay unit-norm.
    """
    run.opt.zero_grad(set_to_none=True)
    total = 0.0
    for l, tc in run.tcs.items():
        s_in, s_out = run.scales[l]
        x = (batch[l][0] * s_in).to(run.device)
        y = (batch[l][1] * s_out).to(run.device)
        dead = (run.tokens_seen - run.last_fired[l]) >= dead_window
        loss, z, _ = _losses(tc, x, y, l1=l1, dead=dead, aux_k=aux_k, aux_coeff=aux_coeff)
        loss.backward()
        total += float(loss.detach())
        run.final_loss[l] = float(loss.detach())
        fired = (z > 0).any(0)
        run.last_fired[l][fired] = run.tokens_seen + x.shape[0]
    with torch.no_grad():
        for tc in run.tcs.values():
            if tc.W_dec.grad is not None:
                par = (tc.W_dec.grad * tc.W_dec).sum(-1, keepdim=True)
                tc.W_dec.grad -= par * tc.W_dec
    run.opt.step()
    for tc in run.tcs.values():
        tc.normalize_decoder()
    return total


def _resample_dead(run: _Training, buffer: ActivationBuffer, dead_window: int, gen: torch.Generator) -> None:
    """Resample every layer's dead features toward badly reconstructed buffer rows; they get a fresh window."""
    sample = buffer.sample(min(8 * buffer.batch_size, buffer.size))
    for l, tc in run.tcs.items():
        dead = (run.tokens_seen - run.last_fired[l]) >= min(dead_window, run.tokens_seen)
        s_in, s_out = run.scales[l]
        x, y = (sample[l][0] * s_in).to(run.device), (sample[l][1] * s_out).to(run.device)
        run.resampled[l] += _resample(tc, dead, x, y, run.opt, gen)
        run.last_fired[l][dead] = run.tokens_seen


def _finished_set(model: LoadedModel, run: _Training) -> TranscoderSet:
    """The trained transcoders in model units (scales folded back in), in eval mode."""
    for l, tc in run.tcs.items():
        _fold_scales(tc, *run.scales[l])
        tc.eval()
    return TranscoderSet(run.tcs, d_model=int(model.bridge.cfg.d_model), model_name=model.source.describe(),
                         feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out")


# ------------------------------------------------------------------------------------ evaluation
def layer_metrics(tc: Transcoder, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """L0, FVU, dead fraction and MSE of one transcoder on (inputs, targets) rows."""
    with torch.no_grad():
        y_hat, z = tc.forward_with_acts(x.to(tc.W_enc.dtype))
        y = y.to(y_hat.dtype)
        sq = (y_hat - y).pow(2).sum(-1)
        var = (y - y.mean(0)).pow(2).sum(-1).sum()
        return {
            "l0": float((z > 0).sum(-1).float().mean()),
            "fvu": float(sq.sum() / var.clamp_min(1e-30)),
            "dead_fraction": float((~(z > 0).any(0)).float().mean()),
            "mse": float(sq.mean()),
        }


def _splice_hooks(tset: TranscoderSet, mode: Literal["transcoder", "zero"], exclude_bos: bool):
    live: dict[int, torch.Tensor] = {}

    def grab(t, hook):
        live[int(hook.name.split(".")[1])] = t
        return t

    def replace(t, hook):
        l = int(hook.name.split(".")[1])
        new = tset[l](live[l]).to(t.dtype) if mode == "transcoder" else torch.zeros_like(t)
        if exclude_bos:
            new = torch.cat([t[:, :1], new[:, 1:]], 1)
        return new

    hooks = []
    for l in tset.layers:
        hooks += [(f"blocks.{l}.mlp.hook_in", grab), (f"blocks.{l}.hook_mlp_out", replace)]
    return hooks


@torch.no_grad()
def spliced_loss(model: LoadedModel, tset: TranscoderSet, seqs: Sequence[Sequence[int]], *, exclude_bos: bool = True,
                 seq_batch: int = 8) -> dict[str, float]:
    """CE (nats per predicted token) clean / with transcoders / zero-ablated, and KL(clean || transcoders)."""
    bridge = model.bridge
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    sums = {"clean": 0.0, "transcoders": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    for batch in _batches(seqs, seq_batch):
        width = max(len(s) for s in batch)
        toks = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width - 1, dtype=torch.bool)
        for i, s in enumerate(batch):
            toks[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s) - 1] = True
        toks = toks.to(model.device)
        targets = toks[:, 1:]
        lp = {}
        lp["clean"] = bridge(toks).double().log_softmax(-1)[:, :-1]
        for key, mode in (("transcoders", "transcoder"), ("zero", "zero")):
            spliced = bridge.run_with_hooks(toks, fwd_hooks=_splice_hooks(tset, mode, exclude_bos))
            lp[key] = spliced.double().log_softmax(-1)[:, :-1]
        m = mask.to(model.device)
        for key in ("clean", "transcoders", "zero"):
            nll = -lp[key].gather(-1, targets[..., None])[..., 0]
            sums[key] += float(nll[m].sum())
        kl = (lp["clean"].exp() * (lp["clean"] - lp["transcoders"])).sum(-1)
        sums["kl"] += float(kl[m].sum())
        count += int(m.sum())
    return {k: v / max(count, 1) for k, v in sums.items()} | {"n_tokens": count}


def evaluate_transcoders(model: LoadedModel, tset: TranscoderSet, seqs: Sequence[Sequence[int]], *,
                         exclude_bos: bool = True, max_tokens: int | None = 20_000, pair: str | None = None,
                         seed: int | None = None, options: dict | None = None) -> TranscoderTrainingResult:
    """Per-layer L0 / FVU / dead fraction and the spliced-in CE of `tset` on `seqs`."""
    if max_tokens is not None:
        kept, total = [], 0
        for s in seqs:
            if total >= max_tokens:
                break
            kept.append(s)
            total += len(s)
        seqs = kept
    tset.to(device=model.device)
    acts = collect_activations(model, seqs, tset.layers, exclude_bos=exclude_bos)
    rows = []
    for l in tset.layers:
        x, y = acts[l]
        m = layer_metrics(tset[l], x.to(model.device), y.to(model.device))
        rows.append(LayerMetrics(layer=l, n_eval_tokens=int(x.shape[0]), n_resampled=0, final_train_loss=None, **m))
    ce = spliced_loss(model, tset, seqs, exclude_bos=exclude_bos)
    gap = ce["zero"] - ce["clean"]
    return TranscoderTrainingResult(
        manifest=make_manifest("transcoders", {model.role: model}, pair=pair, seed=seed, options=options or {}),
        role=model.role, d_model=tset.d_model, d_transcoder=tset.d_transcoder, activation=tset.activation,
        layers=rows, ce_clean=ce["clean"], ce_transcoders=ce["transcoders"], ce_zero_ablation=ce["zero"],
        ce_recovered=(ce["zero"] - ce["transcoders"]) / gap if abs(gap) > 1e-12 else None,
        kl_to_original=ce["kl"], n_train_tokens=0, n_eval_tokens=int(ce["n_tokens"]), steps=0, seconds=0.0,
    )
