"""`lnscope analyze KIND PAIR`: run any analysis kind from the command line (the API's kinds)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lnscope.analysis.errors import ConfigError
from lnscope.analysis.eval_text import pair_eval_text, split_documents
from lnscope.analysis.inputs import prepare_inputs
from lnscope.analysis.kinds import KINDS, Limits, RunContext, load_builtin_kinds
from lnscope.analysis.loading import model_cache
from lnscope.analysis.pairs import PairRegistry
from lnscope.analysis.progress import Progress
from lnscope.analysis.requests import AnalysisRequest


def register(subparsers: argparse._SubParsersAction) -> None:
    load_builtin_kinds()
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
    p.add_argument("--text-file", type=Path, help="text for loss / ln-stats / confidence-neurons (blank-line separated)")
    p.add_argument("--options", default="{}", help='options as JSON, e.g. \'{"target": {"kind": "logit", "token": " Paris"}}\'')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompts", type=int, default=256)
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--out", type=Path, help="also write the JSON result to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    kind = KINDS[args.kind]
    pair = PairRegistry.load().get(args.pair)
    try:
        options = kind.options.model_validate(json.loads(args.options))
        if args.task and args.custom_pairs:
            raise ConfigError("give --task or --custom-pairs, not both")
        task = None
        if args.task:
            task = {"name": args.task, "n_prompts": args.n_prompts, "seed": args.seed, "split": args.split}
        elif args.custom_pairs:
            task = {"name": "custom", "pairs": json.loads(args.custom_pairs.read_text())}
        request = AnalysisRequest(
            pair=pair.name, roles=args.roles, prompts=args.prompts, seed=args.seed, task=task,
            text=split_documents(args.text_file.read_text()) if args.text_file else None,
        )
    except (ValidationError, json.JSONDecodeError) as exc:
        raise ConfigError(f"invalid options or inputs: {exc}") from None
    roles = request.roles or kind.default_roles_for(pair)
    kind.check_role_count(roles)
    if kind.resources is not None:
        kind.resources(pair, roles)
    models = model_cache.load_pair(pair, roles, device=args.device, dtype=args.dtype)
    tokenizer = models[roles[0]].tokenizer
    n_ctx = models[roles[0]].bridge.cfg.n_ctx
    limits = Limits(max_prompts=args.max_prompts, max_prompt_tokens=n_ctx)
    inputs = prepare_inputs(kind, request, tokenizer, n_ctx, limits, default_text=pair_eval_text(pair))
    if kind.prepare is not None:
        inputs.extra = kind.prepare(options, inputs, tokenizer)
    ctx = RunContext(pair=pair, models=models, request=request, options=options, inputs=inputs,
                     progress=Progress(), limits=limits)
    result = kind.run(ctx)
    text = result.model_dump_json(indent=2)
    if args.out:
        args.out.write_text(text)
    print(text if args.json else kind.summarize(result) if kind.summarize else text)
    return 0
