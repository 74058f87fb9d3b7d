"""`lnscope eval PAIR`: held-out cross-entropy and task metrics of every role of a pair."""

from __future__ import annotations

import argparse

from lnscope.analysis.eval_text import pair_eval_text
from lnscope.analysis.evaluation import EVAL_TASKS, evaluate_trio, format_eval
from lnscope.analysis.loading import model_cache
from lnscope.analysis.pairs import PairRegistry


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="held-out cross-entropy and IOI / greater-than / induction per role")
    p.add_argument("pair", help="a built-in or configured pair")
    p.add_argument("--tasks", nargs="+", default=list(EVAL_TASKS), choices=list(EVAL_TASKS))
    p.add_argument("--n-prompts", type=int, default=200)
    p.add_argument("--split", default="heldout", choices=["heldout", "train", "all"])
    p.add_argument("--max-tokens", type=int, default=50_000, help="held-out tokens for cross-entropy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pair = PairRegistry.load().get(args.pair)
    models = model_cache.load_pair(pair, device=args.device, dtype=args.dtype)
    result = evaluate_trio(models, pair_eval_text(pair), pair=pair.name, tasks=args.tasks, n_prompts=args.n_prompts,
                           seed=args.seed, split=args.split, max_tokens=args.max_tokens)
    print(result.model_dump_json(indent=2) if args.json else format_eval(result))
    return 0
