"""`lnscope analyze KIND PAIR`: run any analysis kind from the command line (the API's kinds)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lnscope.analysis.errors import ConfigError
from lnscope.analysis.eval_text import split_documents
from lnscope.analysis.kinds import KINDS, Limits
from lnscope.analysis.loading import model_cache, pair_tokenizer
from lnscope.analysis.pairs import PairRegistry
from lnscope.analysis.pipeline import prepare_run, run_prepared
from lnscope.analysis.progress import Progress
from lnscope.analysis.requests import AnalysisRequest


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze", help="run an analysis (dla, patching, confidence-neurons, ln-stats, loss, ...) on a pair",
        description="Run one analysis kind on a pair's roles and print its result. Inputs: --prompt (repeatable), "
        "--task, or --text-file; options as JSON (see GET /api/v1/kinds for each kind's options).",
    )
    p.add_argument("kind", choices=sorted(KINDS))
    p.add_argument("pair")
    p.add_argument("--roles", nargs="+", choices=["original", "ln_free", "control"])
    p.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--task", choices=["ioi", "greater_than", "induction"], help="a built-in task")
    p.add_argument("--custom-pairs", type=Path, metavar="JSON",
                   help='a custom task: a JSON list of {"clean", "corrupt", "correct", "wrong"}')
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--split", default="heldout", choices=["heldout", "train", "all"])
    p.add_argument("--text-file", type=Path,
                   help="text for loss / ln-stats / confidence-neurons (blank-line separated)")
    p.add_argument("--options", default="{}",
                   help='options as JSON, e.g. \'{"target": {"kind": "logit", "token": " Paris"}}\'')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompts", type=int, default=256)
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--out", type=Path, help="also write the JSON result to this file")
    p.set_defaults(func=run)


def _request(args: argparse.Namespace, pair: str) -> AnalysisRequest:
    """The API request the command line describes."""
    from pydantic import ValidationError

    if args.task and args.custom_pairs:
        raise ConfigError("give --task or --custom-pairs, not both")
    task = None
    if args.task:
        task = {"name": args.task, "n_prompts": args.n_prompts, "seed": args.seed, "split": args.split}
    elif args.custom_pairs:
        task = {"name": "custom", "pairs": json.loads(args.custom_pairs.read_text())}
    try:
        return AnalysisRequest(
            pair=pair, roles=args.roles, prompts=args.prompts, seed=args.seed, task=task,
            options=json.loads(args.options),
            text=split_documents(args.text_file.read_text()) if args.text_file else None,
        )
    except (ValidationError, json.JSONDecodeError) as exc:
        raise ConfigError(f"invalid options or inputs: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    pair = PairRegistry.load().get(args.pair)
    request = _request(args, pair.name)
    _, n_ctx = pair_tokenizer(pair)
    try:
        prepared = prepare_run(args.kind, request, pair, Limits(max_prompts=args.max_prompts, max_prompt_tokens=n_ctx))
    except ValidationError as exc:
        raise ConfigError(f"invalid options: {exc}") from None
    models = model_cache.load_pair(pair, prepared.roles, device=args.device, dtype=args.dtype)
    result = run_prepared(prepared, models, Progress())
    text = result.model_dump_json(indent=2)
    if args.out:
        args.out.write_text(text)
    print(text if args.json or prepared.kind.summarize is None else prepared.kind.summarize(result))
    return 0
