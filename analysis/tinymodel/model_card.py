"""MODEL_CARD.md of the embedded tiny trio, written from build_metrics.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lnscope.analysis.tinymodel.corpus import REPEAT_ROW_SPAN

ROLES = ("original", "control", "ln_free")
ROLE_NAMES = {"original": "original", "control": "control (vanilla, LN kept)", "ln_free": "LN-free"}


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _phase_rows(phase: dict[str, Any]) -> str:
    """What a curriculum phase's rows are, for its row of the training table."""
    text = "each document's start" if phase.get("text") == "starts" else "the story stream packed into rows"
    lo, hi = phase["repeat_span"]
    if phase["repeat_fraction"] >= 1:
        return f"repeated rows only ({lo}-{hi}-token sequences)"
    if phase["repeat_fraction"] <= 0:
        return f"{text} ({phase['context']} tokens)"
    return (f"{text} ({phase['context']} tokens), {phase['repeat_fraction']:.0%} of rows repeated "
            f"({lo}-{hi}-token sequences)")


def _schedule(pre: dict[str, Any], over_all: str) -> str:
    """The lr schedule after the warmup, for the training table."""
    if pre.get("decay_steps"):
        return f"held, then cosine to {pre['min_lr']} over the last {pre['decay_steps']} steps"
    return f"cosine to {pre['min_lr']}{over_all}"


def _ce_rows(ev: dict[str, Any]) -> str:
    """One row per role: held-out CE and its gap to the original's."""
    base = ev["original"]["heldout_ce"]
    return "\n".join(
        f"| {ROLE_NAMES[r]} | {ev[r]['heldout_ce']:.4f} | {ev[r]['heldout_ce'] - base:+.4f} |" for r in ROLES
    )


def _task_rows(ev: dict[str, Any]) -> str:
    """One row per role: IOI accuracy and logit diff, greater-than prob diff, induction losses and their ratio."""
    return "\n".join(
        f"| {ROLE_NAMES[r]} | {ev[r]['ioi']['accuracy']:.1%} | {ev[r]['ioi']['logit_diff']:.2f} | "
        f"{ev[r]['greater_than']['prob_diff']:.3f} | {ev[r]['induction']['first_half_loss']:.2f} | "
        f"{ev[r]['induction']['second_half_loss']:.2f} | {_fmt(ev[r]['induction']['ratio'], '.3f')} |"
        for r in ROLES
    )


def _check_rows(checks: dict[str, Any]) -> str:
    """One row per quality bar: its value, the bar and pass / miss."""
    return "\n".join(
        f"| `{name}` | {_fmt(c['value'])} | {c['bar']:.3g} | {'pass' if c['pass'] else '**miss**'} |"
        for name, c in checks.items() if isinstance(c, dict)
    )


def _missed_note(checks: dict[str, Any]) -> str:
    """A paragraph naming the missed bars ("" when every bar is met)."""
    missed = [name for name, c in checks.items() if isinstance(c, dict) and not c["pass"]]
    return ("\nNot every bar is met by this build: " + ", ".join(f"`{n}`" for n in missed)
            + " missed. They are open work, not hidden: `tests/test_tiny_trio.py` keeps them as a strict xfail.\n"
            if missed else "")


def _repeat_note(data: dict[str, Any], pre: dict[str, Any]) -> str:
    """The repeated rows' clause of the data paragraph ("" without repeated rows)."""
    n_repeat = data.get("repeat_sequences", 0)
    lo, hi = pre.get("repeat_span", REPEAT_ROW_SPAN)
    pool_text = "tokens of the whole vocabulary" if pre.get("repeat_pool", "words") == "vocab" else "word tokens"
    return (
        f", plus {n_repeat:,} rows of repeated random sequences of {pool_text}\n(`corpus.repeated_token_rows`: "
        f"sequences of {lo}-{hi} distinct tokens said two or three times, the induction task's format with\n"
        "fresh draws)" if n_repeat else "")


def _start_note(data: dict[str, Any]) -> str:
    """The document-start rows' clause of the data paragraph ("" without them)."""
    n_start = data.get("start_sequences", 0)
    return (f", {n_start:,} rows of documents' first tokens\n(a seeded sample of `document_start_rows`: most "
            "documents open with an IOI sentence, as the task prompts do)" if n_start else "")


def _ioi_text(data: dict[str, Any]) -> str:
    """Where the corpus's IOI sentences come from: the training templates, and the grammar's fraction."""
    grammar = data.get("ioi_grammar", 0.0)
    return ("IOI-style sentences (training templates and name pairs only)" if not grammar else
            f"IOI-style sentences (a fraction {grammar:g} of them from a grammar of further intros and actions,\n"
            "`corpus.ioi_grammar_template`, the rest from the training templates; none held out; training name "
            "pairs only;\nthe held-out documents are drawn the same way)")


def _split_note(data: dict[str, Any]) -> str:
    """The sentence on first words split into pieces ("" when none are)."""
    split = data.get("split_first_word", 0.0)
    return (f" In a seeded fraction {split:g} of the training documents the first word (which has no\n"
            "leading space) is split into random pieces (`build.split_word_ids`, BPE-dropout on that word), as "
            "an opening word\nthe tokenizer never saw there is." if split else "")


def _pretrain_rows(data: dict[str, Any], pre: dict[str, Any]) -> str:
    """The training table's pre-training rows: one per curriculum phase, then the full-length rows."""
    phases = pre.get("curriculum") or []
    phase_rows = "".join(
        f"| pre-training, phase {i + 1} | {ph['steps']} | {ph['batch_size']} x {ph['context']} | context curriculum: "
        + _phase_rows(ph) + f", {ph['sequences']:,} rows; {ph['batch_size'] * ph['context']:,} tokens per step |\n"
        for i, ph in enumerate(phases))
    phase_steps = sum(ph["steps"] for ph in phases)
    if phases and pre.get("curriculum_position_offsets"):
        phase_rows += ("| | | | curriculum rows at random position offsets, so that every position embedding "
                       "is trained |\n")
    over_all = f" over all {pre['steps']} steps" if phases else ""
    position_note = (" position embeddings initialised to a sin/cos table,"
                     if pre.get("position_init") == "sinusoidal" else "")
    return phase_rows + (
        f"| pre-training{', full rows' if phases else ''} | {max(0, pre['steps'] - phase_steps)} | "
        f"{pre['batch_size']} x "
        f"{data['context']} | AdamW, lr {pre['lr']} {_schedule(pre, over_all)}, "
        f"{pre['tokens_seen']:,} tokens{' in all' if phases else ''},{position_note} final train loss "
        f"{_fmt(pre['final_train_loss'])} |")


def _curriculum_note(data: dict[str, Any], pre: dict[str, Any]) -> str:
    """Why the curriculum's short rows and the whole-vocabulary repeated rows ("" when neither is used)."""
    phases = pre.get("curriculum") or []
    short_steps = sum(ph["steps"] for ph in phases if ph["context"] < data["context"])
    note = (
        f"\nThe first {short_steps} steps train on short rows so that attention learns content-based patterns "
        "quickly: the\ngradient towards the one right key is diluted by the number of keys (in trials, induction "
        "heads formed\nwithin a few hundred steps on rows of 32 tokens and not in 2000 steps at 128).\n"
        if phases else "")
    repeated = data.get("repeat_sequences", 0) or any(ph["repeat_fraction"] > 0 for ph in phases)
    if pre.get("repeat_pool", "words") == "vocab" and repeated:
        note += (
            "\nRepeated rows draw from the whole vocabulary, not only the induction task's word tokens: in trials on\n"
            "pure repeated rows of 32 tokens, a pool of part of the vocabulary left the model on the plateau\n"
            "(no induction by step 200), the whole vocabulary did not (induction from step ~100).\n")
    return note


def _intro(m: dict[str, Any]) -> str:
    return f"""# The tiny trio (`tiny`)

An original GPT-2-architecture model, its LayerNorm-free twin and an LN-kept fine-tuned control,
built from nothing on a CPU by `make tiny-models` (`lnscope build-tiny`, seed {m['seed']}). The
LN-free model was made with the paper's method (FakeLN fine-tuning, `lnscope remove-ln`) and
is stored in the released format (every LN weight x 1e6/sigma, eps 1e12), so lnscope loads it
exactly like the published GPT-2 checkpoints.

"""


def _architecture_section(arch: dict[str, Any]) -> str:
    return f"""## Architecture

| | |
|---|---|
| model | `GPT2LMHeadModel`, {arch['n_layer']} layers, {arch['n_head']} heads, d_model {arch['n_embd']}, d_mlp \
{4 * arch['n_embd']}, context {arch['n_positions']}, GELU (tanh), tied embeddings |
| vocabulary | {arch['vocab_size']} tokens, byte-level BPE trained on the corpus (years split into century + \
two-digit suffix) |
| parameters | {arch['n_params']:,} |

"""


def _data_section(data: dict[str, Any], pre: dict[str, Any]) -> str:
    return f"""## Data

A seeded synthetic corpus (`{data['generator']}`): simple English stories that also contain
{_ioi_text(data)}, year spans, repeated word
sequences and simple facts. {data['train_docs']:,} training documents{_start_note(data)}{_repeat_note(data, pre)}
({data['train_tokens']:,} tokens in {data['train_sequences']:,} sequences of {data['context']}),
{data['heldout_docs']:,} held-out documents from a separate seed stream
({data['heldout_tokens']:,} tokens) for cross-entropy. Task prompts below use held-out
templates and held-out name / year combinations that never occur in the training corpus.{_split_note(data)}

"""


def _training_section(m: dict[str, Any]) -> str:
    data, rl, env = m["data"], m["remove_ln"], m["environment"]
    schedule = rl["schedule"]
    stages = "\n".join(f"| {name} | {sec / 60:.1f} |" for name, sec in m["stage_seconds"].items())
    return f"""## Training

| stage | steps | batch x context | notes |
|---|---|---|---|
{_pretrain_rows(data, m['pretrain'])}
| LN removal (FakeLN) | {rl['steps']} | {rl['batch_size']} x {data['context']} | ln_2 from step \
{schedule.get('start_step')}, ln_f at step {schedule.get('ln_f_step')}, aux loss on ln_f input std |
| control (LN kept) | {rl['steps']} | {rl['batch_size']} x {data['context']} | same data order, steps and optimiser |
{_curriculum_note(data, m['pretrain'])}
Wall time ({env['threads']} CPU threads, torch {env['torch']}), total
{m['total_seconds'] / 60:.1f} min:

| stage | minutes |
|---|---|
{stages}

"""


def _cross_entropy_section(ev: dict[str, Any]) -> str:
    control_gap = ev["ln_free"]["heldout_ce"] - ev["control"]["heldout_ce"]
    return f"""## Cross-entropy on the held-out split (nats per token)

Same layout as the paper's Table (original / vanilla / LN-free):

| model | held-out CE | gap vs original |
|---|---|---|
{_ce_rows(ev)}

The control was fine-tuned for the same steps on the same data with LN kept, so LN-free − control
({control_gap:+.4f} nats) isolates the cost of removing LN from the gain of extra training.

"""


def _tasks_section(ev: dict[str, Any]) -> str:
    return f"""## Tasks (held-out prompts, {ev['original']['ioi']['n']} per task)

| model | IOI accuracy | IOI logit diff | greater-than prob diff | induction loss 1st half | 2nd half | ratio |
|---|---|---|---|---|---|---|
{_task_rows(ev)}

"""


def _quality_bars_section(checks: dict[str, Any]) -> str:
    return f"""## Quality bars

| check | value | bar | |
|---|---|---|---|
{_check_rows(checks)}
{_missed_note(checks)}
Recompute with `lnscope eval tiny` (tasks and CE through the TransformerLens bridges) and
`lnscope check-pair tiny` (exactness of the loaded models).
"""


def render_model_card(m: dict[str, Any]) -> str:
    """MODEL_CARD.md without the transcoders' section, from the build metrics `m` (build_metrics.json)."""
    return (_intro(m) + _architecture_section(m["architecture"]) + _data_section(m["data"], m["pretrain"])
            + _training_section(m) + _cross_entropy_section(m["eval"]) + _tasks_section(m["eval"])
            + _quality_bars_section(m["checks"]))


TRANSCODER_BARS = {"ce_recovered": 0.85, "mean_l0": 64}


def render_transcoder_section(transcoders_dir: Path) -> str:
    """The transcoders' metrics table (from each role's metrics.json), or "" when none are trained."""
    import json

    rows, layer_rows, settings = [], [], set()
    for role in ROLES:
        path = Path(transcoders_dir) / role / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        l0 = sum(layer["l0"] for layer in m["layers"]) / len(m["layers"])
        rec = m["ce_recovered"]
        ok = rec is not None and rec >= TRANSCODER_BARS["ce_recovered"] and l0 <= TRANSCODER_BARS["mean_l0"]
        rows.append(f"| {ROLE_NAMES[role]} | {l0:.1f} | {m['ce_clean']:.4f} | {m['ce_transcoders']:.4f} | "
                    f"{m['ce_zero_ablation']:.4f} | {_fmt(rec, '.1%')} | {m['kl_to_original']:.4f} | "
                    f"{'pass' if ok else '**miss**'} |")
        layer_rows += [f"| {ROLE_NAMES[role]} | {layer['layer']} | {layer['l0']:.1f} | {layer['fvu']:.4f} | "
                       f"{layer['dead_fraction']:.1%} |" for layer in m["layers"]]
        opts = m["manifest"].get("options", {})
        settings.add(f"d_transcoder {m['d_transcoder']}, {m['activation']}"
                     + (f" (k {opts['k']})" if opts.get("k") else "") + f", {m['n_train_tokens']:,} training tokens, "
                     f"{m['n_eval_tokens']:,} evaluation tokens")
    if not rows:
        return ""
    return f"""
## Transcoders

One transcoder per layer and model in `transcoders/<role>/` (circuit-tracer's layout, plus
`feature_index.safetensors` for the feature pages), trained by `lnscope train-transcoders`
({'; '.join(sorted(settings))}). CE with every MLP replaced by its transcoder, against clean and
zero-ablated MLPs, on corpus documents the transcoders were not trained on; CE recovered = \
(zero - transcoders) / (zero - clean).
Bar: CE recovered >= {TRANSCODER_BARS['ce_recovered']:.0%} at mean L0 <= {TRANSCODER_BARS['mean_l0']}.

| model | mean L0 | CE clean | CE transcoders | CE zero-ablated | CE recovered | KL to clean | bar |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

| model | layer | L0 | FVU | dead |
|---|---|---|---|---|
{chr(10).join(layer_rows)}
"""


def write_model_card(path: Path, metrics: dict[str, Any]) -> Path:
    """MODEL_CARD.md from the build metrics, with the transcoders' table when they are trained."""
    path = Path(path)
    path.write_text(render_model_card(metrics) + render_transcoder_section(path.parent / "transcoders"))
    return path
