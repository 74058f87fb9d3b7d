"""`lnscope check-pair`: load a trio and print how exact each model is."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lnscope.analysis.checks import PairCheck, check_pair
from lnscope.analysis.errors import ConfigError
from lnscope.analysis.pairs import ModelSource, PairRegistry


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check-pair",
        help="load a trio and report load time, logit error vs Hugging Face and DLA exactness",
        description="Load a pair by name, or three local directories, and report per role the device, "
        "load time, max_rel_logit_error (bridge vs plain Hugging Face log-probs) and dla_sum_rel_error.",
    )
    p.add_argument("name", nargs="?", help="a built-in or configured pair (see `lnscope pairs`)")
    p.add_argument("--original", type=Path, metavar="DIR", help="local original checkpoint (with LN)")
    p.add_argument("--ln-free", type=Path, metavar="DIR", help="local LN-free checkpoint (released format)")
    p.add_argument("--control", type=Path, metavar="DIR", help="local LN-kept fine-tuned control")
    p.add_argument("--device", help="cuda, mps or cpu (default: $LNSCOPE_DEVICE or the best available)")
    p.add_argument("--dtype", help="float32 (default), float64, bfloat16, float16")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)

    pairs = subparsers.add_parser("pairs", help="list the built-in and configured pairs")
    pairs.add_argument("--json", action="store_true")
    pairs.set_defaults(func=list_pairs)


def _sources(args: argparse.Namespace) -> tuple[str, dict[str, ModelSource]]:
    dirs = {"original": args.original, "ln_free": args.ln_free, "control": args.control}
    if args.name:
        if any(dirs.values()):
            raise ConfigError("give either a pair NAME or --original/--ln-free/--control, not both")
        pair = PairRegistry.load().get(args.name)
        return pair.name, dict(pair.roles())
    if args.original is None or args.ln_free is None:
        raise ConfigError("give a pair NAME, or at least --original DIR and --ln-free DIR")
    return "local", {role: ModelSource(path=d.resolve()) for role, d in dirs.items() if d is not None}


def format_table(result: PairCheck) -> str:
    header = (f"{'role':<9} {'device':<7} {'dtype':<9} {'load s':>7} "
              f"{'max_rel_logit_error':>20} {'dla_sum_rel_error':>18}  source")
    lines = [f"pair {result.pair}", header]
    for r in result.roles:
        dla = f"{r.dla_sum_rel_error:.2e}" + ("" if r.dla_final_scale == "none" else "*")
        lines.append(
            f"{r.role:<9} {r.device:<7} {r.dtype:<9} {r.load_seconds:>7.2f} "
            f"{r.max_rel_logit_error:>20.2e} {dla:>18}  {r.source}"
        )
    if any(r.dla_final_scale == "frozen" for r in result.roles):
        lines.append("* model with LN: DLA sum with the final LN scale frozen at its cached value")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    name, sources = _sources(args)
    result = check_pair(name, sources, device=args.device, dtype=args.dtype)
    print(result.model_dump_json(indent=2) if args.json else format_table(result))
    return 0


def list_pairs(args: argparse.Namespace) -> int:
    registry = PairRegistry.load()
    if args.json:
        print(json.dumps({"default_pair": registry.default_pair, "pairs": [p.to_json() for p in registry]}, indent=2))
        return 0
    for pair in registry:
        mark = "*" if pair.name == registry.default_pair else " "
        print(f"{mark} {pair.name:<16} {pair.description}")
        for role, src in pair.roles().items():
            print(f"    {role:<9} {src.describe()}")
    return 0
