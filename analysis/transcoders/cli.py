"""`lnscope train-transcoders PAIR --role ROLE` and `lnscope transcoder-graph PAIR --prompt TEXT`.

train-transcoders: trains one transcoder per layer on the role's own activations, writes them in
circuit-tracer's layout to models/<pair>/transcoders/<role>/ (or --out) with `metrics.json` (L0, FVU,
dead fraction per layer; CE clean / spliced / zero-ablated, CE recovered, KL) and, unless --no-index,
the feature index over the pair's eval text (`feature_index.safetensors`).
Training text: --text FILE (documents separated by blank lines); else the `tiny` pair's training split
of its seeded corpus; else the pair's eval text (a warning says so: give --text for real runs).

transcoder-graph: attribution graphs of one prompt for each given role (circuit-tracer JSON, opens in
its viewer: `<out>/<slug>-<role>.json` + graph-metadata.json), and with two roles the paired-circuit
diff (`<out>/<slug>-diff.json`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_TRAIN_DOCS = 2000


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-transcoders", help="train per-layer transcoders on one role of a pair")
    p.add_argument("pair", help="a built-in or configured pair")
    p.add_argument("--role", required=True, choices=["original", "ln_free", "control"])
    p.add_argument("--d-transcoder", type=int, default=None, help="features per layer (default 8 x d_model)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default: every layer")
    p.add_argument("--activation", choices=["relu", "topk"], default="relu")
    p.add_argument("--k", type=int, default=16, help="active features per token (topk)")
    p.add_argument("--skip", action="store_true", help="add a linear skip connection (W_skip)")
    p.add_argument("--l1-coeff", type=float, default=3e-3, help="L1 coefficient (normalised units; relu)")
    p.add_argument("--n-tokens", type=int, default=200_000, help="training tokens")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context", type=int, default=None, help="sequence length (default: the model's context)")
    p.add_argument("--text", type=Path, default=None, help="training text file (documents separated by blank lines)")
    p.add_argument("--out", type=Path, default=None, help="default: models/<pair>/transcoders/<role>/")
    p.add_argument("--no-index", action="store_true", help="do not build the feature index")
    p.add_argument("--index-top-k", type=int, default=20)
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run_train)

    g = subparsers.add_parser("transcoder-graph", help="attribution graphs of a prompt (and their diff across roles)")
    g.add_argument("pair")
    g.add_argument("--prompt", required=True)
    g.add_argument("--roles", nargs="+", default=["original", "ln_free"])
    g.add_argument("--out", type=Path, default=Path("graphs"))
    g.add_argument("--slug", default="graph")
    g.add_argument("--logit-diff", nargs=2, metavar=("TOKEN", "OTHER"), default=None,
                   help="target logit(TOKEN) - logit(OTHER) (token strings, each one token)")
    g.add_argument("--max-n-logits", type=int, default=10)
    g.add_argument("--desired-logit-prob", type=float, default=0.95)
    g.add_argument("--max-feature-nodes", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--node-threshold", type=float, default=0.8)
    g.add_argument("--edge-threshold", type=float, default=0.98)
    g.add_argument("--transcoders", nargs="+", type=Path, default=None,
                   help="transcoder directories, one per role (default models/<pair>/transcoders/<role>)")
    g.add_argument("--device")
    g.add_argument("--dtype")
    g.set_defaults(func=run_graph)


def _read_text(path: Path) -> list[str]:
    from lnscope.analysis.errors import LnscopeError
    from lnscope.analysis.eval_text import split_documents

    if not path.is_file():
        raise LnscopeError(f"training text {path} does not exist")
    return split_documents(path.read_text())


def training_text(pair, text: Path | None) -> list[str]:
    if text is not None:
        return _read_text(text)
    if pair.name == "tiny":
        from lnscope.analysis.tinymodel.build import trio_ioi_grammar
        from lnscope.analysis.tinymodel.corpus import generate_documents

        return generate_documents(TINY_TRAIN_DOCS, seed=0, split="train",
                                  ioi_grammar=trio_ioi_grammar(pair.original.path))
    from lnscope.analysis.eval_text import pair_eval_text

    logger.warning("no --text given: training on pair %r's eval text (small; give --text for a real run)", pair.name)
    return pair_eval_text(pair)


def run_train(args: argparse.Namespace) -> int:
    from lnscope.analysis.eval_text import pair_eval_text
    from lnscope.analysis.loading import model_cache
    from lnscope.analysis.pairs import PairRegistry, portable_path
    from lnscope.analysis.transcoders.features import build_feature_index
    from lnscope.analysis.transcoders.formats import save_transcoders, transcoder_dir
    from lnscope.analysis.transcoders.train import train_transcoders

    pair = PairRegistry.load().get(args.pair)
    model = model_cache.get(pair.source(args.role), args.role, device=args.device, dtype=args.dtype)
    texts = training_text(pair, args.text)
    d_tc = args.d_transcoder or 8 * int(model.bridge.cfg.d_model)
    tset, result = train_transcoders(
        model, texts, d_transcoder=d_tc, layers=args.layers, activation=args.activation, l1_coeff=args.l1_coeff,
        k=args.k, skip=args.skip, n_tokens=args.n_tokens, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        context=args.context, pair=pair.name, show_progress_bar=not args.quiet and sys.stderr.isatty())
    out = args.out or transcoder_dir(pair, args.role)
    result.out_dir = portable_path(out)  # models/<relative> inside the models directory: no machine's path
    save_transcoders(tset, out, model_name=model.source.describe(), scan=f"lnscope/{pair.name}/{args.role}")
    (out / "metrics.json").write_text(result.model_dump_json(indent=2))
    if not args.no_index:
        index = build_feature_index(model, tset, pair_eval_text(pair), top_k=args.index_top_k, pair=pair.name)
        index.save(out)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(format_training(result))
    return 0


def format_training(result) -> str:
    lines = [f"transcoders for {result.role}: d_transcoder {result.d_transcoder}, {result.activation}, "
             f"{result.n_train_tokens} training tokens, {result.seconds:.0f} s"
             + (f" -> {result.out_dir}" if result.out_dir else ""),
             f"{'layer':>5} {'L0':>8} {'FVU':>8} {'dead':>6} {'resampled':>9}"]
    for m in result.layers:
        lines.append(f"{m.layer:>5} {m.l0:>8.1f} {m.fvu:>8.4f} {m.dead_fraction:>6.2%} {m.n_resampled:>9}")
    rec = f"{result.ce_recovered:.3f}" if result.ce_recovered is not None else "n/a"
    lines.append(f"CE clean {result.ce_clean:.4f} | transcoders {result.ce_transcoders:.4f} | zero-ablated "
                 f"{result.ce_zero_ablation:.4f} | recovered {rec} | KL {result.kl_to_original:.4f} "
                 f"({result.n_eval_tokens} eval tokens)")
    return "\n".join(lines)


def run_graph(args: argparse.Namespace) -> int:
    from lnscope.analysis.errors import LnscopeError
    from lnscope.analysis.loading import model_cache
    from lnscope.analysis.pairs import PairRegistry
    from lnscope.analysis.transcoders.attribution import attribute
    from lnscope.analysis.transcoders.diff import paired_circuits
    from lnscope.analysis.transcoders.formats import load_transcoders, load_transcoders_for

    pair = PairRegistry.load().get(args.pair)
    roles = args.roles
    if len(roles) > 2:
        raise LnscopeError("give one or two roles")
    models = {r: model_cache.get(pair.source(r), r, device=args.device, dtype=args.dtype) for r in roles}
    if args.transcoders:
        if len(args.transcoders) != len(roles):
            raise LnscopeError("give one --transcoders directory per role")
        tsets = {r: load_transcoders(d, model=models[r]) for r, d in zip(roles, args.transcoders)}
    else:
        tsets = {r: load_transcoders_for(pair, r, model=models[r]) for r in roles}
    kw = dict(max_n_logits=args.max_n_logits, desired_logit_prob=args.desired_logit_prob,
              max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    if args.logit_diff:
        tok = models[roles[0]].tokenizer
        ids = []
        for s in args.logit_diff:
            enc = tok.encode(s, add_special_tokens=False)
            if len(enc) != 1:
                raise LnscopeError(f"{s!r} is {len(enc)} tokens, not one")
            ids.append(enc[0])
        kw["logit_diff"] = tuple(ids)
    out = args.out
    if len(roles) == 2:
        graphs, diff = paired_circuits(models, tsets, args.prompt, roles=roles, node_threshold=args.node_threshold,
                                       edge_threshold=args.edge_threshold, pair=pair.name, **kw)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.slug}-diff.json").write_text(diff.model_dump_json(indent=2))
    else:
        graphs = {roles[0]: attribute(models[roles[0]], tsets[roles[0]], args.prompt, pair=pair.name, **kw)}
    for role, g in graphs.items():
        path = g.write_json(out, f"{args.slug}-{role}", node_threshold=args.node_threshold,
                            edge_threshold=args.edge_threshold, scan=f"lnscope/{pair.name}/{role}")
        s = g.summary(args.node_threshold, args.edge_threshold)
        print(f"{role}: {s.n_active_features} active features, {s.n_pruned_nodes} nodes / {s.n_pruned_edges} edges "
              f"after pruning, replacement {s.replacement_score:.3f}, completeness {s.completeness_score:.3f}, "
              f"identity max rel error {s.identity_max_rel_error:.1e} -> {path}")
    if len(roles) == 2:
        print(f"diff: {len(diff.matched_nodes)} matched nodes, {len(diff.only_a)} only in {roles[0]}, "
              f"{len(diff.only_b)} only in {roles[1]}, node Jaccard {diff.node_jaccard:.3f} "
              f"-> {out / (args.slug + '-diff.json')}")
    return 0
