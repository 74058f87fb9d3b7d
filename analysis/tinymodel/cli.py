"""`lnscope build-tiny`: build the embedded tiny trio from nothing (what `make tiny-models` runs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("build-tiny",
                              help="build the embedded tiny trio (corpus, tokenizer, pretraining, remove-ln)")
    p.add_argument("--out", type=Path, default=Path("models/tiny"))
    p.add_argument("--work-dir", type=Path, default=Path("build/tiny-work"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", type=int, help="training documents")
    p.add_argument("--steps", type=int, help="pretraining steps")
    p.add_argument("--batch-size", type=int, help="pretraining batch size (sequences)")
    p.add_argument("--decay-steps", type=int,
                   help="hold the peak lr after the warmup and decay it over only the last N pretraining steps "
                        "(default 2500, the shipped trio's; N equal to --steps gives one cosine after the warmup)")
    p.add_argument("--curriculum", type=parse_curriculum, metavar="CTX:FRACTION:STEPS[:TEXT][:LO-HI],...",
                   help="context curriculum before the full-length rows, e.g. 32:1.0:300,32:0.5:700:starts:3-12 "
                        "(STEPS steps on rows of CTX tokens, FRACTION of them repeated random sequences of LO-HI "
                        "tokens (default 3 to 2/5 of CTX), the rest story text: TEXT 'stream' (the packed stream, the "
                        "default) or 'starts' (each document's start)); 'none': off")
    p.add_argument("--position-offsets", action="store_true",
                   help="curriculum rows start at random positions, so short rows train every position embedding")
    p.add_argument("--repeat-rows", type=float, help="fraction of training rows that are repeated random tokens")
    p.add_argument("--repeat-span", type=parse_span, metavar="LO-HI",
                   help="tokens per repeated sequence in the full-length repeated rows (default 3-50; induction "
                        "works at the distances it was trained on)")
    p.add_argument("--start-rows", type=float,
                   help="fraction of the full-length training rows that are documents' starts (as task prompts are)")
    p.add_argument("--ioi-grammar", type=float,
                   help="fraction of the corpus's IOI sentences drawn from its grammar instead of the fixed templates")
    p.add_argument("--split-first-word", type=float,
                   help="fraction of training documents whose first word is split into random pieces (BPE-dropout "
                        "on that word), as an opening word the tokenizer never saw there is (default 0.3)")
    p.add_argument("--repeat-pool", choices=("vocab", "words"),
                   help="tokens the repeated rows draw from: the whole vocabulary, or the induction task's word tokens")
    p.add_argument("--pretrain-minutes", type=float, help="safety stop for pretraining")
    p.add_argument("--remove-ln-steps", type=int, help="FakeLN fine-tuning steps (the control gets the same)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--strict", action="store_true", help="exit non-zero if a quality bar is missed")
    p.add_argument("--card-only", action="store_true",
                   help="only rewrite OUT/MODEL_CARD.md from OUT/build_metrics.json and OUT/transcoders/*/metrics.json")
    p.set_defaults(func=run)


SPAN = re.compile(r"([0-9]+)-([0-9]+)")


def parse_span(text: str) -> tuple[int, int]:
    """"3-50" -> (3, 50); the bounds against a context are checked by the build."""
    match = SPAN.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"span {text!r} is not LO-HI (two whole numbers)")
    return int(match[1]), int(match[2])


def parse_curriculum(text: str) -> tuple:
    """"32:1.0:300,32:0.5:700:starts:3-12" -> (CurriculumPhase(32, 1.0, 300),
    CurriculumPhase(32, 0.5, 700, "starts", (3, 12))); "none" or "" -> ()."""
    from lnscope.analysis.tinymodel.build import CurriculumPhase, check_phase

    if text.strip().lower() in ("", "none"):
        return ()
    phases = []
    for part in text.split(","):
        fields = part.split(":")
        try:
            if not 3 <= len(fields) <= 5:
                raise ValueError
            span = parse_span(fields.pop()) if len(fields) > 3 and SPAN.fullmatch(fields[-1]) else None
            if len(fields) > 4:
                raise ValueError
            phase = CurriculumPhase(int(fields[0]), float(fields[1]), int(fields[2]), *fields[3:], span=span)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(
                f"curriculum phase {part!r} is not CTX:FRACTION:STEPS[:TEXT][:LO-HI]") from None
        try:
            phases.append(check_phase(phase))  # the context's upper bound is checked when the build starts
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return tuple(phases)


def run(args: argparse.Namespace) -> int:
    from lnscope.analysis.tinymodel.build import BuildConfig, build_tiny

    if args.card_only:
        from lnscope.analysis.tinymodel.build import CARD_FILE, METRICS_FILE
        from lnscope.analysis.tinymodel.model_card import write_model_card

        path = write_model_card(args.out / CARD_FILE, json.loads((args.out / METRICS_FILE).read_text()))
        print(f"wrote {path}")
        return 0
    cfg = BuildConfig()
    pre = cfg.pretrain
    if args.steps is not None:
        pre = dataclasses.replace(pre, steps=args.steps)
    if args.batch_size is not None:
        pre = dataclasses.replace(pre, batch_size=args.batch_size)
    if args.decay_steps is not None:
        pre = dataclasses.replace(pre, decay_steps=args.decay_steps)
    if args.position_offsets:
        pre = dataclasses.replace(pre, curriculum_position_offsets=True)
    cfg = dataclasses.replace(
        cfg, pretrain=pre,
        n_docs=args.docs if args.docs is not None else cfg.n_docs,
        repeat_rows=args.repeat_rows if args.repeat_rows is not None else cfg.repeat_rows,
        start_rows=args.start_rows if args.start_rows is not None else cfg.start_rows,
        ioi_grammar=args.ioi_grammar if args.ioi_grammar is not None else cfg.ioi_grammar,
        split_first_word=args.split_first_word if args.split_first_word is not None else cfg.split_first_word,
        curriculum=args.curriculum if args.curriculum is not None else cfg.curriculum,
        repeat_pool=args.repeat_pool or cfg.repeat_pool,
        repeat_span=args.repeat_span or cfg.repeat_span,
        remove_ln_steps=args.remove_ln_steps if args.remove_ln_steps is not None else cfg.remove_ln_steps,
        num_threads=args.threads if args.threads is not None else cfg.num_threads,
    )
    metrics = build_tiny(args.out, seed=args.seed, budget=args.pretrain_minutes, config=cfg, work_dir=args.work_dir,
                         strict=args.strict)
    print(json.dumps({"checks": metrics["checks"], "total_minutes": round(metrics["total_seconds"] / 60, 1)}, indent=2))
    return 0
