"""Build the tiny trio from nothing: corpus -> tokenizer -> pretraining -> LN removal -> eval -> card.

`build_tiny(out_dir="models/tiny", seed=0)` writes

    OUT/original/   the pretrained GPT-2 (LayerNorm kept)           safetensors, config, tokenizer
    OUT/ln_free/    its LayerNorm-free twin (FakeLN fine-tuning),   released format (LN weight x 1e6/sigma, eps 1e12)
    OUT/control/    the same fine-tuning with LayerNorm kept
    OUT/MODEL_CARD.md, OUT/build_metrics.json

Everything else (pretraining log, remove-ln checkpoints, its log and report) goes to the work
directory (default build/tiny-work), never into OUT. Every stage is seeded, and step counts
are fixed, so a build is reproducible; the stage time budgets are safety stops only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import operator
import platform
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from lnscope.analysis.tinymodel.pretrain import PretrainConfig, curriculum_batch_size, mean_ce, pack_stream, pretrain

logger = logging.getLogger(__name__)

# What a shipped model directory holds (anything else stays in the work directory).
MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "lnscope_removal.json",
)
ROLES = ("original", "control", "ln_free")
METRICS_FILE = "build_metrics.json"
CARD_FILE = "MODEL_CARD.md"

# Quality bars of the shipped trio, on held-out prompts (build_metrics.json records each check).
BARS = {
    "ioi_accuracy_min": 0.90,
    "ioi_logit_diff_min": 2.0,
    "greater_than_prob_diff_min": 0.5,
    "induction_ratio_max": 1 / 3,  # second-half loss / first-half loss
    "ln_free_ce_gap_max": 0.10,  # nats, LN-free minus original, held-out split
}


class CurriculumPhase(NamedTuple):
    """One phase of the context curriculum: `steps` steps on rows of `context` tokens, a `repeat_fraction`
    of them repeated random sequences of `span` = (LO, HI) tokens (None: curriculum_span(context)) and the rest
    story text: the training stream packed into rows ("stream": sentences at every offset) or each document's
    start ("starts": as the task prompts are)."""

    context: int
    repeat_fraction: float
    steps: int
    text: str = "stream"
    span: tuple[int, int] | None = None

    @property
    def repeat_span(self) -> tuple[int, int]:
        """Lengths of this phase's repeated sequences: its span, else curriculum_span(context)."""
        return (self.span[0], self.span[1]) if self.span is not None else curriculum_span(self.context)


CURRICULUM_TEXTS = ("stream", "starts")


@dataclass
class BuildConfig:
    seed: int = 0
    # data
    n_docs: int = 60_000  # training-split documents (pretraining and LN-removal fine-tuning)
    n_heldout_docs: int = 1_000  # held-out-split documents (held-out CE)
    tokenizer_docs: int = 20_000  # the first this many training documents train the tokenizer
    vocab_size: int = 4096  # upper bound; BPE stops when no pair occurs twice
    # fraction of training rows that are repeated random token sequences (corpus.repeated_token_rows, drawn
    # from repeat_pool), the rest story text; in [0, 1). They teach induction only after the curriculum's
    # short rows have formed induction heads
    repeat_rows: float = 0.35
    # fraction of the full-length training rows that are documents' first tokens (a seeded sample of
    # document_start_rows; most documents open with an IOI sentence, as the task prompts do), in [0, 1) with
    # repeat_rows + start_rows < 1. These rows also feed the LN-removal fine-tuning, so the LN-free model and the
    # control keep what they teach
    start_rows: float = 0.15
    # fraction of the corpus's IOI sentences drawn from corpus.ioi_grammar_template instead of the fixed
    # training templates (corpus.generate_documents' ioi_grammar); 0: the fixed templates only
    ioi_grammar: float = 0.7
    # fraction of training documents whose first word is split into pieces (tokenize_docs' split_first_word,
    # BPE-dropout on that word). A document's first word has no leading space, so an opening word the tokenizer
    # never saw there is split into pieces ("As" -> "A s", "Last" -> "L ast"); these documents teach the model
    # to read such openings, as in the held-out IOI intros
    split_first_word: float = 0.3
    # the tokens the repeated rows draw from: "vocab" (every non-special token) or "words" (the induction
    # task's pool of word tokens). "vocab", because a pool of part of the vocabulary keeps the repeated half's
    # loss on the plateau at ln(pool size)
    repeat_pool: str = "vocab"
    # (LO, HI): tokens per repeated sequence in the full-length repeated rows. Induction works at the distances
    # it was trained on (a sequence of n tokens said twice trains copying from n tokens back), so HI reaches
    # past the induction task's 25 + 25 tokens
    repeat_span: tuple[int, int] = (3, 50)
    # the context curriculum before the full-length rows: CurriculumPhase(context, repeat_fraction, steps,
    # text, span) per phase (PretrainConfig.curriculum). Repeated rows' spans are curriculum_span(context) unless
    # given; a repeat_fraction of 1.0 means repeated rows only. The defaults are the shipped trio's, so
    # `make tiny-models` rebuilds it: induction heads form on repeated rows of 32 tokens, IOI (on the training
    # templates) on documents' starts, then the full-length rows (story text, starts and repeated sequences of
    # 3-50 tokens) carry induction to 25 + 25 tokens
    curriculum: tuple[CurriculumPhase, ...] = (
        CurriculumPhase(32, 1.0, 300), CurriculumPhase(32, 0.5, 700), CurriculumPhase(32, 0.25, 500, "starts"),
        CurriculumPhase(128, 0.25, 500, "starts", (3, 50)))
    # stages
    # 6500 steps of 4096 tokens (26.6M tokens; 2000 of them in the curriculum). The lr is held at its peak until
    # the last 2500 steps: induction reaches 25 + 25 tokens while the lr is high, held-out IOI forms as it decays
    pretrain: PretrainConfig = field(
        default_factory=lambda: PretrainConfig(steps=6500, decay_steps=2500, batch_size=32, snapshot_every=500))
    # FakeLN fine-tuning steps (the control gets the same); with half as many the LN-free model loses clearly more
    # of the original's greater-than and held-out IOI scores
    remove_ln_steps: int = 600
    remove_ln_batch_size: int = 32
    remove_ln_lr: float = 6e-4
    remove_ln_min_lr: float = 1e-4
    # evaluation
    eval_prompts: int = 200  # per task
    induction_half_len: int = 25
    eval_seed: int = 0
    num_threads: int | None = 2  # torch threads (None: torch's default); part of what makes a build reproducible

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def micro_config(seed: int = 0) -> BuildConfig:
    """A build that runs in well under a minute (tests, smoke checks); its models learn little."""
    return BuildConfig(
        seed=seed, n_docs=400, n_heldout_docs=40, tokenizer_docs=400, vocab_size=1024,
        pretrain=PretrainConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64, steps=20, batch_size=8,
                                warmup_steps=2, decay_steps=10, eval_every=0, eval_sequences=8, log_every=5,
                                seed=seed, position_init="sinusoidal"),
        repeat_rows=0.1, start_rows=0.1, ioi_grammar=0.5, split_first_word=0.3, repeat_span=(4, 20),
        curriculum=(CurriculumPhase(16, 1.0, 3), CurriculumPhase(16, 0.5, 2, span=(2, 7)),
                    CurriculumPhase(16, 0.5, 2, "starts")),
        remove_ln_steps=None, remove_ln_batch_size=4, eval_prompts=8, induction_half_len=10,
    )


# ---------------------------------------------------------------------------- helpers
_FIRST_WORD = re.compile(r"[A-Za-z]{2,}")


def split_word_ids(tokenizer: Any, word: str, rng: random.Random) -> list[int]:
    """`word`'s ids with its BPE merges dropped at 1..len(word)-1 random cut points (BPE-dropout, Provilkov
    et al. 2020, for one word): each piece is encoded on its own, so no merge crosses a cut."""
    cuts = sorted(rng.sample(range(1, len(word)), rng.randint(1, len(word) - 1)))
    pieces = [word[i:j] for i, j in zip([0, *cuts], [*cuts, len(word)])]
    return [i for enc in tokenizer.backend_tokenizer.encode_batch(pieces, add_special_tokens=False) for i in enc.ids]


def tokenize_docs(tokenizer: Any, docs: list[str], starts: list[int] | None = None,
                  split_first_word: float = 0.0, seed: int = 0) -> list[int]:
    """The documents' tokens joined into one stream, each document followed by <|endoftext|>.

    `starts`, if given, receives each document's offset in the stream. `split_first_word`: the fraction of
    documents (a seeded draw) whose first word, when it opens with two or more letters, is encoded by
    split_word_ids. A document's first word has no leading space, so a word the tokenizer never saw there
    (a held-out template's "As", "Last") is split into pieces; these documents teach the model such openings.
    """
    if not 0 <= split_first_word <= 1:
        raise ValueError(f"split_first_word must be in [0, 1]; got {split_first_word}")
    eos = tokenizer.eos_token_id
    rng = random.Random(f"split-first-word/{seed}")
    backend = tokenizer.backend_tokenizer
    stream: list[int] = []
    for doc, enc in zip(docs, backend.encode_batch(docs, add_special_tokens=False)):
        if starts is not None:
            starts.append(len(stream))
        ids = enc.ids
        if split_first_word and rng.random() < split_first_word and (word := _FIRST_WORD.match(doc)):
            # the rest starts at a letter/non-letter boundary, where byte-level pre-tokenization cuts anyway
            rest = backend.encode(doc[word.end():], add_special_tokens=False).ids
            ids = split_word_ids(tokenizer, word.group(), rng) + rest
        stream.extend(ids)
        stream.append(eos)
    return stream


def document_start_rows(stream: list[int], starts: list[int], context: int, bos_id: int) -> torch.Tensor:
    """LongTensor[n_docs, context]: <|endoftext|> then the first context-1 tokens from each document's start
    (running on into the next document when one is shorter); the documents that cannot fill a row are left out."""
    body = context - 1
    rows = [[bos_id] + stream[start : start + body] for start in starts if start + body <= len(stream)]
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), context)


def sample_rows(rows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n of `rows` [N, ctx]: seeded permutations of the N rows, one after another, cut at n, so each row is used
    floor(n / N) or ceil(n / N) times."""
    if n and not rows.shape[0]:
        raise ValueError(f"cannot sample {n} rows from none")
    generator = torch.Generator().manual_seed(seed)
    passes = [torch.randperm(rows.shape[0], generator=generator) for _ in range(math.ceil(n / max(1, rows.shape[0])))]
    return rows[torch.cat(passes)[:n]] if passes else rows[:0]


def check_phase(phase: CurriculumPhase, n_positions: int | None = None) -> CurriculumPhase:
    """`phase` if its fields are in range (context up to n_positions when given), else ValueError."""
    if phase.text not in CURRICULUM_TEXTS or not 0 <= phase.repeat_fraction <= 1:
        raise ValueError(f"curriculum phase {phase}: text must be one of {CURRICULUM_TEXTS} and "
                         "0 <= repeat_fraction <= 1")
    if phase.context < 2 or (n_positions is not None and phase.context > n_positions) or phase.steps < 0:
        raise ValueError(f"curriculum phase {phase}: context must be in [2, {n_positions or 'n_positions'}] "
                         "and steps >= 0")
    if phase.span is not None:
        phase = phase._replace(span=check_span(phase.span, phase.context, f"curriculum phase {phase}: span"))
    return phase


def check_span(span: Any, context: int, name: str) -> tuple[int, int]:
    """`span` as (LO, HI) if it is two whole numbers with 2 <= LO <= HI <= (context - 1) // 2, so that a sequence
    and its copy fit in a row after <|endoftext|>; else ValueError naming `name`."""
    limit = (context - 1) // 2
    try:
        lo, hi = (operator.index(n) for n in span)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be LO-HI, two whole numbers; got {span!r}") from None
    if not 2 <= lo <= hi <= limit:
        raise ValueError(f"{name} must be LO-HI with 2 <= LO <= HI <= {limit} (half the row after "
                         f"<|endoftext|>, so the copy fits); got {lo}-{hi}")
    return lo, hi


def check_config(cfg: BuildConfig) -> list[CurriculumPhase]:
    """Check the row fractions, the IOI grammar fraction, the repeated rows' span (when there are repeated rows)
    and the curriculum before any stage runs (ValueError naming the field); returns cfg.curriculum as
    CurriculumPhase tuples, spans as (LO, HI) tuples."""
    if not 0 <= cfg.repeat_rows < 1:
        raise ValueError(f"repeat_rows must be in [0, 1); got {cfg.repeat_rows}")
    if not 0 <= cfg.start_rows < 1 or cfg.repeat_rows + cfg.start_rows >= 1:
        raise ValueError(f"start_rows must be in [0, 1) with repeat_rows + start_rows < 1; got start_rows "
                         f"{cfg.start_rows}, repeat_rows {cfg.repeat_rows}")
    if not 0 <= cfg.ioi_grammar <= 1:
        raise ValueError(f"ioi_grammar must be in [0, 1]; got {cfg.ioi_grammar}")
    if not 0 <= cfg.split_first_word <= 1:
        raise ValueError(f"split_first_word must be in [0, 1]; got {cfg.split_first_word}")
    decay = cfg.pretrain.decay_steps
    if decay is not None and not 1 <= decay <= cfg.pretrain.steps:
        raise ValueError(f"pretrain.decay_steps must be None or in [1, {cfg.pretrain.steps}] (the pretraining "
                         f"steps); got {decay}")
    if cfg.repeat_rows > 0:
        check_span(cfg.repeat_span, cfg.pretrain.n_positions, "repeat_span")
    phases = [check_phase(CurriculumPhase(*phase), cfg.pretrain.n_positions) for phase in cfg.curriculum]
    if sum(phase.steps for phase in phases) > cfg.pretrain.steps:
        raise ValueError(f"the curriculum's {sum(p.steps for p in phases)} steps exceed the pretraining steps "
                         f"({cfg.pretrain.steps})")
    return phases


def curriculum_span(context: int) -> tuple[int, int]:
    """Default lengths of a curriculum phase's repeated sequences: 3 to 2/5 of the row (at least 4), so most are
    seen twice."""
    return 3, max(4, (context - 1) * 2 // 5)


def repeat_pool(tokenizer: Any, kind: str) -> list[int]:
    """The token ids repeated rows draw from: every non-special token ("vocab") or word tokens ("words")."""
    from lnscope.analysis.tasks.induction import word_token_pool

    if kind == "words":
        return word_token_pool(tokenizer)
    if kind == "vocab":
        special = set(tokenizer.all_special_ids)
        return [i for i in range(len(tokenizer)) if i not in special]
    raise ValueError(f"repeat_pool must be 'vocab' or 'words'; got {kind!r}")


def copy_model_dir(src: Path, dst: Path) -> Path:
    """Copy only the files a shipped model needs (MODEL_FILES) from src to a fresh dst."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if not (dst / "model.safetensors").is_file():
        raise FileNotFoundError(f"{src} has no model.safetensors")
    return dst


def trio_ioi_grammar(original_dir: Path | None) -> float:
    """The corpus's `ioi_grammar` that the trio whose `original` is in `original_dir` was built with (the trio's
    build_metrics.json, beside the roles' directories; 0.0, the fixed templates only, when there is no directory,
    file or field), so that text drawn later matches the trio's training data."""
    metrics = Path(original_dir).parent / METRICS_FILE if original_dir is not None else None
    if metrics is None or not metrics.is_file():
        return 0.0
    return float(json.loads(metrics.read_text()).get("data", {}).get("ioi_grammar", 0.0))


def load_hf(path: Path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()


def evaluate_model(model: Any, tokenizer: Any, heldout: torch.Tensor, cfg: BuildConfig) -> dict[str, Any]:
    """Held-out CE and the three tasks (held-out prompts) of one HF model."""
    from lnscope.analysis.tasks.evaluate import evaluate_task
    from lnscope.analysis.tasks.greater_than import make_greater_than
    from lnscope.analysis.tasks.induction import make_induction
    from lnscope.analysis.tasks.ioi import make_ioi

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens).logits

    out: dict[str, Any] = {"heldout_ce": mean_ce(model, heldout)}
    n, seed = cfg.eval_prompts, cfg.eval_seed
    with torch.no_grad():
        ioi = evaluate_task(logits_fn, make_ioi(tokenizer, n_prompts=n, seed=seed, split="heldout"))
        gt = evaluate_task(logits_fn, make_greater_than(tokenizer, n_prompts=n, seed=seed, split="heldout"))
        ind = evaluate_task(logits_fn, make_induction(tokenizer, n_prompts=n, half_len=cfg.induction_half_len,
                                                      seed=seed))
    out["ioi"] = {"n": ioi.n, "accuracy": ioi.accuracy, "logit_diff": ioi.metric_mean,
                  "logit_diff_std": ioi.metric_std}
    out["greater_than"] = {"n": gt.n, "prob_diff": gt.metric_mean, "prob_diff_std": gt.metric_std,
                           "accuracy": gt.accuracy}
    first, second = ind.first_half_loss, ind.second_half_loss
    out["induction"] = {"n": ind.n, "half_len": cfg.induction_half_len, "first_half_loss": first,
                        "second_half_loss": second, "ratio": second / first if first else None,
                        "accuracy": ind.accuracy}
    return out


def check_bars(evals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each quality bar per role: {"role.check": {"value", "bar", "pass"}} and "all_pass"."""
    checks: dict[str, Any] = {}

    def add(name: str, value: float | None, bar: float, higher: bool) -> None:
        ok = value is not None and (value >= bar if higher else value <= bar)
        checks[name] = {"value": value, "bar": bar, "pass": bool(ok)}

    for role, ev in evals.items():
        add(f"{role}.ioi_accuracy", ev["ioi"]["accuracy"], BARS["ioi_accuracy_min"], True)
        add(f"{role}.ioi_logit_diff", ev["ioi"]["logit_diff"], BARS["ioi_logit_diff_min"], True)
        add(f"{role}.greater_than_prob_diff", ev["greater_than"]["prob_diff"], BARS["greater_than_prob_diff_min"], True)
        add(f"{role}.induction_ratio", ev["induction"]["ratio"], BARS["induction_ratio_max"], False)
    if "ln_free" in evals and "original" in evals:
        gap = evals["ln_free"]["heldout_ce"] - evals["original"]["heldout_ce"]
        add("ln_free.ce_gap_vs_original", gap, BARS["ln_free_ce_gap_max"], False)
    checks["all_pass"] = all(c["pass"] for c in checks.values() if isinstance(c, dict))
    return checks


class _Stages:
    """Wall time of each stage, logged as it ends."""

    def __init__(self, callback: Callable[[str, float], None] | None) -> None:
        self.seconds: dict[str, float] = {}
        self.callback = callback
        self._t0 = time.perf_counter()

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        logger.info("build-tiny: %s ...", name)
        if self.callback:
            self.callback(name, 0.0)
        t = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - t, 2)
        logger.info("build-tiny: %s done in %.1f s (total %.1f min)", name, self.seconds[name],
                    (time.perf_counter() - self._t0) / 60)
        return result


# ------------------------------------------------------------------------------ build
def build_tiny(
    out_dir: str | Path = "models/tiny",
    seed: int = 0,
    budget: float | None = None,
    *,
    config: BuildConfig | None = None,
    work_dir: str | Path | None = None,
    progress: bool | Callable[[str, float], None] = True,
    strict: bool = False,
) -> dict[str, Any]:
    """Build, evaluate and describe the tiny trio; return the build metrics (also written to JSON).

    `budget`: a safety stop for pretraining, in minutes (None: the config's, if any).
    `strict`: raise RuntimeError after writing everything if a quality bar is missed.
    The torch thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    try:
        return _build_tiny(out_dir, seed, budget, config=config, work_dir=work_dir, progress=progress, strict=strict)
    finally:
        torch.set_num_threads(threads)



# ------------------------------------------------------------------------------ _build_tiny's phases
class _TrainingRows(NamedTuple):
    """The build's token rows, each starting with <|endoftext|>."""

    stories: torch.Tensor  # [n_story, ctx]: the training stream packed into rows
    starts: torch.Tensor  # [n_start, ctx]: a seeded sample of documents' first tokens
    repeats: torch.Tensor  # [n_repeat, ctx]: repeated random token sequences
    heldout: torch.Tensor  # [n_heldout, ctx]: the held-out stream packed into rows
    phases: list[torch.Tensor]  # one [n_rows, context] per curriculum phase


class _StoryRows:
    """The training documents' token stream as rows of any context: packed ("stream") or each document's start
    ("starts"), each computed once."""

    def __init__(self, stream: list[int], starts: list[int], eos: int) -> None:
        self.stream, self.starts, self.eos = stream, starts, eos
        self.stream_ids = torch.as_tensor(stream, dtype=torch.long)  # [n_tokens], converted once
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def rows(self, text: str, context: int) -> torch.Tensor:
        """LongTensor[n_rows, context] of the story text: the packed stream, or each document's start."""
        if (text, context) not in self._cache:
            self._cache[text, context] = (pack_stream(self.stream_ids, context, self.eos) if text == "stream"
                                          else document_start_rows(self.stream, self.starts, context, self.eos))
        return self._cache[text, context]


def _resolve_config(config: BuildConfig | None, seed: int,
                    budget: float | None) -> tuple[BuildConfig, list[CurriculumPhase]]:
    """A copy of the config with the build's seed (and pretraining budget), checked; and its curriculum phases."""
    cfg = config or BuildConfig()
    cfg = dataclasses.replace(cfg, seed=seed, pretrain=dataclasses.replace(cfg.pretrain, seed=seed))
    if budget is not None:
        cfg.pretrain.time_budget_minutes = budget
    curriculum = check_config(cfg)
    cfg.pretrain.curriculum = tuple((phase.context, phase.steps) for phase in curriculum)
    return cfg, curriculum


def _full_length_rows(cfg: BuildConfig, story: _StoryRows, pool: list[int],
                      seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stories, starts, repeats), each [n, n_positions]: the packed stream, then as many start rows and repeated
    rows as make them the fractions start_rows and repeat_rows of all three."""
    from lnscope.analysis.tinymodel.corpus import repeated_token_rows

    ctx = cfg.pretrain.n_positions
    stories = story.rows("stream", ctx)
    story_fraction = 1 - cfg.repeat_rows - cfg.start_rows
    n_repeats = round(cfg.repeat_rows * stories.shape[0] / story_fraction)
    repeats = repeated_token_rows(pool, n_repeats, ctx, seed, story.eos, span=cfg.repeat_span)
    n_starts = round(cfg.start_rows * stories.shape[0] / story_fraction)
    starts = sample_rows(story.rows("starts", ctx), n_starts, seed + 500) if n_starts else stories[:0]
    return stories, starts, repeats


def _curriculum_phase_rows(cfg: BuildConfig, i: int, phase: CurriculumPhase, story: _StoryRows, pool: list[int],
                           seed: int) -> torch.Tensor:
    """LongTensor[n_rows, phase.context] of curriculum phase i: one epoch's rows at most, a seeded sample of its
    story text, then its own seeded repeated sequences (the fraction repeat_fraction of the rows)."""
    from lnscope.analysis.tinymodel.corpus import repeated_token_rows

    phase_seed = seed + 1000 * (i + 1)
    text = story.rows(phase.text, phase.context)
    needed = phase.steps * curriculum_batch_size(cfg.pretrain, phase.context)
    if phase.repeat_fraction >= 1:
        text, n_repeats = text[:0], needed
    else:
        keep = min(text.shape[0], math.ceil(needed * (1 - phase.repeat_fraction)))
        order = torch.randperm(text.shape[0], generator=torch.Generator().manual_seed(phase_seed))
        text = text[order[:keep].sort().values]
        n_repeats = round(phase.repeat_fraction * keep / (1 - phase.repeat_fraction))
    repeats = repeated_token_rows(pool, n_repeats, phase.context, phase_seed, story.eos, span=phase.repeat_span)
    return torch.cat([text, repeats])


def _tokenize(cfg: BuildConfig, curriculum: list[CurriculumPhase], tokenizer: Any, train_docs: list[str],
              heldout_docs: list[str], seed: int) -> _TrainingRows:
    """Tokenize and pack: every row is <|endoftext|> + context-1 tokens."""
    eos = tokenizer.eos_token_id
    starts: list[int] = []
    story = _StoryRows(tokenize_docs(tokenizer, train_docs, starts, cfg.split_first_word, seed), starts, eos)
    pool = repeat_pool(tokenizer, cfg.repeat_pool)
    stories, start_sample, repeats = _full_length_rows(cfg, story, pool, seed)
    phases = [_curriculum_phase_rows(cfg, i, phase, story, pool, seed) for i, phase in enumerate(curriculum)]
    heldout = pack_stream(tokenize_docs(tokenizer, heldout_docs), cfg.pretrain.n_positions, eos)
    return _TrainingRows(stories, start_sample, repeats, heldout, phases)


def _train_tokens(rows: _TrainingRows, tokenizer: Any) -> torch.Tensor:
    """LongTensor[n_train, ctx]: story, start and repeated rows (pretraining and fine-tuning shuffle them)."""
    train_tokens = torch.cat([rows.stories, rows.starts, rows.repeats])
    logger.info("build-tiny: %d train sequences (%d of story text, %d document starts, %d of repeated tokens; "
                "%.2fM tokens), %d held-out sequences, vocabulary %d", train_tokens.shape[0], rows.stories.shape[0],
                rows.starts.shape[0], rows.repeats.shape[0], train_tokens.numel() / 1e6, rows.heldout.shape[0],
                len(tokenizer))
    return train_tokens


def _remove_ln(cfg: BuildConfig, original: Path, work: Path, train_tokens: torch.Tensor, seed: int,
               progress: bool) -> Any:
    """FakeLN fine-tuning of `original` into its LN-free twin, and the LN-kept control (in work/remove_ln)."""
    from lnscope.analysis.remove_ln import RemoveLNConfig, remove_layernorm

    rl_dir = work / "remove_ln"
    if rl_dir.exists():
        shutil.rmtree(rl_dir)
    rl_cfg = RemoveLNConfig(
        total_steps=cfg.remove_ln_steps, batch_size=cfg.remove_ln_batch_size, lr=cfg.remove_ln_lr,
        min_lr=min(cfg.remove_ln_min_lr, cfg.remove_ln_lr), seed=seed, device="cpu", checkpoint_every=0,
    )
    rl = remove_layernorm(original, rl_dir, rl_cfg, train_tokens=train_tokens, control=True, progress=progress)
    if not rl.completed or rl.ln_free_dir is None or rl.control_dir is None:
        raise RuntimeError("build-tiny: LN removal stopped before the end")
    return rl


def _data_metrics(cfg: BuildConfig, rows: _TrainingRows, train_tokens: torch.Tensor) -> dict[str, Any]:
    """build_metrics.json's "data": the corpus, its token counts and row kinds."""
    return {
        "generator": "lnscope.analysis.tinymodel.corpus.generate_documents",
        "train_docs": cfg.n_docs, "heldout_docs": cfg.n_heldout_docs, "tokenizer_docs": cfg.tokenizer_docs,
        "train_tokens": int(train_tokens.numel()), "train_sequences": int(train_tokens.shape[0]),
        "story_sequences": int(rows.stories.shape[0]), "repeat_sequences": int(rows.repeats.shape[0]),
        "start_sequences": int(rows.starts.shape[0]), "ioi_grammar": cfg.ioi_grammar,
        "split_first_word": cfg.split_first_word,
        "heldout_tokens": int(rows.heldout.numel()), "heldout_sequences": int(rows.heldout.shape[0]),
        "context": cfg.pretrain.n_positions,
    }


def _pretrain_metrics(cfg: BuildConfig, curriculum: list[CurriculumPhase], rows: _TrainingRows,
                      pre: Any) -> dict[str, Any]:
    """build_metrics.json's "pretrain": the run's outcome, its lr schedule, row settings and curriculum."""
    p = cfg.pretrain
    return {"steps": pre.steps, "planned_steps": p.steps, "completed": pre.completed,
            "batch_size": p.batch_size, "tokens_seen": pre.tokens_seen,
            "tokens_per_second": round(pre.tokens_per_second, 1), "final_train_loss": pre.final_loss,
            "lr": p.lr, "min_lr": p.min_lr, "decay_steps": p.decay_steps,
            "position_init": p.position_init,
            "repeat_pool": cfg.repeat_pool,
            "repeat_span": list(cfg.repeat_span),
            "curriculum_position_offsets": p.curriculum_position_offsets,
            "curriculum": [{"context": phase.context, "repeat_fraction": phase.repeat_fraction,
                            "steps": phase.steps, "text": phase.text, "sequences": int(phase_rows.shape[0]),
                            "repeat_span": list(phase.repeat_span),
                            "batch_size": curriculum_batch_size(p, phase.context)}
                           for phase, phase_rows in zip(curriculum, rows.phases)]}


def _remove_ln_metrics(cfg: BuildConfig, rl: Any) -> dict[str, Any]:
    """build_metrics.json's "remove_ln": the FakeLN schedule and the fine-tuning's outcome."""
    return {"steps": rl.schedule.total_steps, "schedule": rl.schedule.to_dict(),
            "batch_size": cfg.remove_ln_batch_size, "tokens_per_step": rl.tokens_per_step,
            "final_loss": rl.final_loss, "final_aux_loss": rl.final_aux_loss,
            "steps_per_second": rl.steps_per_second, "sigma": rl.sigma}


def _architecture(cfg: BuildConfig, vocab_size: int, n_params: int) -> dict[str, Any]:
    """build_metrics.json's "architecture"."""
    p = cfg.pretrain
    return {"model_type": "gpt2", "n_layer": p.n_layer, "n_head": p.n_head, "n_embd": p.n_embd,
            "n_positions": p.n_positions, "vocab_size": vocab_size, "n_params": n_params, "activation": "gelu_new",
            "tied_embeddings": True}


def _environment() -> dict[str, Any]:
    """build_metrics.json's "environment": what a reproduction must match."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine()}


def _write_outputs(out: Path, metrics: dict[str, Any]) -> None:
    """build_metrics.json and MODEL_CARD.md in `out`."""
    from lnscope.analysis.tinymodel.model_card import write_model_card

    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(out / CARD_FILE, metrics)
    logger.info("build-tiny: wrote %s in %.1f min; quality bars %s", out, metrics["total_seconds"] / 60,
                "all pass" if metrics["checks"]["all_pass"] else "NOT all met")


def _raise_if_missed(checks: dict[str, Any]) -> None:
    """RuntimeError naming every quality bar that is missed."""
    if not checks["all_pass"]:
        failed = [k for k, v in checks.items() if isinstance(v, dict) and not v["pass"]]
        raise RuntimeError(f"build-tiny: quality bars missed: {', '.join(failed)}")


def _build_tiny(
    out_dir: str | Path = "models/tiny",
    seed: int = 0,
    budget: float | None = None,
    *,
    config: BuildConfig | None = None,
    work_dir: str | Path | None = None,
    progress: bool | Callable[[str, float], None] = True,
    strict: bool = False,
) -> dict[str, Any]:
    """build_tiny's stages, in order: corpus, tokenizer, tokenize, pretrain, remove_ln, evaluate; then the metrics
    and the model card."""
    from lnscope.analysis.tinymodel.corpus import generate_documents
    from lnscope.analysis.tinymodel.tokenizer import train_tokenizer

    cfg, curriculum = _resolve_config(config, seed, budget)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else Path("build") / "tiny-work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stages = _Stages(progress if callable(progress) else None)
    t_start = time.perf_counter()

    train_docs, heldout_docs = stages.run("corpus", lambda: (
        generate_documents(cfg.n_docs, seed, "train", cfg.ioi_grammar),
        generate_documents(cfg.n_heldout_docs, seed, "heldout", cfg.ioi_grammar)))
    tokenizer = stages.run("tokenizer", lambda: train_tokenizer(train_docs[: cfg.tokenizer_docs], cfg.vocab_size,
                                                               model_max_length=cfg.pretrain.n_positions))
    rows = stages.run("tokenize", lambda: _tokenize(cfg, curriculum, tokenizer, train_docs, heldout_docs, seed))
    train_tokens = _train_tokens(rows, tokenizer)
    # pretraining writes to the work directory; only the model files are shipped
    pre = stages.run("pretrain", lambda: pretrain(train_tokens, cfg.pretrain, work / "pretrain", tokenizer=tokenizer,
                                                  eval_tokens=rows.heldout, curriculum_tokens=rows.phases,
                                                  progress=progress))
    copy_model_dir(work / "pretrain", out / "original")
    rl = stages.run("remove_ln", lambda: _remove_ln(cfg, out / "original", work, train_tokens, seed,
                                                    progress=progress is True))
    copy_model_dir(Path(rl.ln_free_dir), out / "ln_free")
    copy_model_dir(Path(rl.control_dir), out / "control")
    evals = stages.run("evaluate", lambda: {
        role: evaluate_model(load_hf(out / role), tokenizer, rows.heldout, cfg) for role in ROLES})

    metrics: dict[str, Any] = {
        "format": "lnscope-tiny-build/1",
        "seed": seed,
        "config": cfg.to_dict(),
        "architecture": _architecture(cfg, len(tokenizer),
                                      sum(p.numel() for p in load_hf(out / "original").parameters())),
        "data": _data_metrics(cfg, rows, train_tokens),
        "pretrain": _pretrain_metrics(cfg, curriculum, rows, pre),
        "remove_ln": _remove_ln_metrics(cfg, rl),
        "stage_seconds": stages.seconds,
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "eval": evals,
        "checks": check_bars(evals),
        "environment": _environment(),
    }
    _write_outputs(out, metrics)
    if strict:
        _raise_if_missed(metrics["checks"])
    return metrics
