"""Benchmark of transcoder attribution graphs (never run by the tests).

For each role of the `tiny` pair (models/tiny/*) and prompts of 16, 64 and 128 tokens: the time of one
attribution graph (all active features attributed, analysis.transcoders.attribute), its peak memory,
and the ratio of the graph time to one forward + backward pass of the model on the same prompt.
Transcoders come from models/tiny/transcoders/<role>; when absent, quick TopK (k = 16) ones are trained
here (a message says so) and cached in build/bench/transcoders-<model>/<role>; the graph size (and time)
grows with the number of active features, i.e. with L0 x positions x layers. Without models/tiny, a random 4-layer
GPT-2 trio (d_model 128, context 256; LN-free in the released format) stands in, also with a message.

Peak memory: each (role, length) runs in a fresh subprocess; on CUDA torch.cuda.max_memory_allocated,
on CPU the subprocess's peak RSS (ru_maxrss) minus its RSS after loading the model and transcoders.

    python bench/circuits.py [--device cuda] [--roles original ln_free] [--lengths 16 64 128] [--threads N]

`--against circuit-tracer` times lnscope's graph and circuit-tracer's (`attribute`, batch 64, float32, the
same prompt and transcoders; TopK / ReLU as the transcoder config says) in one run: per length, `--rounds`
alternating pairs of subprocesses (ours, theirs, ours, ...), each loading its model once, warming up on 8
tokens and timing `--repeats` graphs with `--threads` threads. It prints per length each side's median,
the ratio theirs / ours (> 1: lnscope is faster) and each side's peak RSS (the largest over its
subprocesses, whole process). circuit-tracer runs in its own interpreter (TransformerLens < 4):
`--ct-python`, default $LNSCOPE_CIRCUIT_TRACER_PYTHON, else .venv-ct/bin/python.

    python bench/circuits.py --against circuit-tracer [--roles original] [--rounds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / "build" / "bench"


def _rss_mib() -> float:
    """Current resident set size (Linux), MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return float("nan")


def fallback_trio(root: Path) -> dict[str, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.checkpoints import make_tokenizer, save, to_released_ln_free

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_head=4, n_embd=128, n_positions=256, vocab_size=len(tok),
                     bos_token_id=0, eos_token_id=0)
    original = GPT2LMHeadModel(cfg).eval()
    return {"original": save(original, tok, root / "original"),
            "ln_free": save(to_released_ln_free(original, 1), tok, root / "ln_free")}


def sources() -> tuple[str, dict[str, Path]]:
    from lnscope.analysis.pairs import PairRegistry

    pair = PairRegistry.load().get("tiny")
    paths = {r: s.path for r, s in pair.roles().items()}
    if all(p is not None and (p / "config.json").is_file() for p in paths.values()):
        return "tiny", paths
    root = CACHE / "fallback-trio"
    if not (root / "ln_free" / "config.json").is_file():
        print("models/tiny is missing (build it with `make tiny-models`): using a random 4-layer GPT-2 trio",
              flush=True)
        fallback_trio(root)
    else:
        print("models/tiny is missing: using the cached random 4-layer GPT-2 trio", flush=True)
    return "fallback", {"original": root / "original", "ln_free": root / "ln_free"}


def transcoder_dir(name: str, role: str) -> Path:
    from lnscope.analysis.transcoders import default_transcoder_dir

    d = default_transcoder_dir("tiny", role) if name == "tiny" else None
    if d is not None and (d / "config.yaml").is_file():
        return d
    return CACHE / f"transcoders-{name}" / role


def ensure_transcoders(name: str, paths: dict[str, Path], roles, device: str, train_tokens: int) -> None:
    from lnscope.analysis.loading import load_model
    from lnscope.analysis.pairs import ModelSource
    from lnscope.analysis.transcoders import save_transcoders, train_transcoders
    from tests.checkpoints import TEXT

    for role in roles:
        d = transcoder_dir(name, role)
        if (d / "config.yaml").is_file():
            continue
        print(f"no transcoders for {name}/{role}: training quick TopK (k=16) ones ({train_tokens} tokens) -> {d}",
              flush=True)
        model = load_model(ModelSource(path=paths[role]), role, device=device)
        texts = TEXT * 50
        if name == "tiny":
            from lnscope.analysis.tinymodel.build import trio_ioi_grammar
            from lnscope.analysis.tinymodel.corpus import generate_documents

            texts = generate_documents(500, seed=0, split="train", ioi_grammar=trio_ioi_grammar(paths["original"]))
        tset, res = train_transcoders(model, texts, d_transcoder=8 * int(model.bridge.cfg.d_model),
                                      activation="topk", k=16, n_tokens=train_tokens, batch_size=512,
                                      show_progress_bar=False)
        print("   FVU per layer", [round(m.fvu, 3) for m in res.layers], "L0", [round(m.l0, 1) for m in res.layers])
        save_transcoders(tset, d)


def prompt_ids(tokenizer, n: int) -> list[int]:
    from tests.checkpoints import TEXT

    text = " ".join(TEXT * 40)
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    return ids[:n]


def one(args) -> dict:
    """Runs in a subprocess: one (role, length) measurement, printed as JSON."""
    from lnscope.analysis.loading import load_model
    from lnscope.analysis.pairs import ModelSource
    from lnscope.analysis.transcoders import attribute, load_transcoders

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_model(ModelSource(path=Path(args.model_dir)), args.role, device=device, dtype="float32")
    tset = load_transcoders(args.transcoder_dir, model=model)
    ids = prompt_ids(model.tokenizer, args.length)
    toks = torch.tensor([ids], device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fwd_bwd():
        model.bridge.zero_grad(set_to_none=True)
        logits = model.bridge(toks)
        logits[0, -1].logsumexp(-1).backward()
        sync()

    fb = float("nan")
    if not args.graph_only:
        fwd_bwd()  # warm-up
        t = time.perf_counter()
        for _ in range(args.repeats):
            fwd_bwd()
        fb = (time.perf_counter() - t) / args.repeats
    model.bridge.zero_grad(set_to_none=True)
    for p in model.bridge.parameters():
        p.requires_grad_(False)
    attribute(model, tset, ids[:8], batch_size=args.batch_size)  # warm-up
    base_rss = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        g = attribute(model, tset, ids, batch_size=args.batch_size)
        sync()
        times.append(time.perf_counter() - t)
    graph_s = min(times)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.graph_only:
        return {"role": args.role, "tokens": len(ids), "active_features": int(g.active_features.shape[0]),
                "nodes": g.n_nodes, "times": times, "peak_rss_mib": peak_rss, "base_rss_mib": base_rss}
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        peak_kind = "CUDA max_memory_allocated above baseline"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
        peak_kind = "peak RSS above the RSS after loading"
    s = g.summary()
    return {"role": args.role, "tokens": len(ids), "active_features": s.n_active_features, "nodes": s.n_nodes,
            "graph_s": graph_s, "fwd_bwd_s": fb, "ratio": graph_s / fb, "peak_mib": peak, "peak_kind": peak_kind,
            "identity_max_rel_error": s.identity_max_rel_error, "replacement": s.replacement_score,
            "completeness": s.completeness_score}

# ------------------------------------------------------------------------------ --against circuit-tracer
CT_SCRIPT = r"""
import json, math, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, yaml
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, AutoTokenizer
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
from circuit_tracer import attribute
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
from circuit_tracer.transcoder.activation_functions import TopK
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

dtype = torch.float32
hf = GPT2LMHeadModel.from_pretrained(args["model_dir"], torch_dtype=dtype).eval()
tok = AutoTokenizer.from_pretrained(args["model_dir"])
c = hf.config
cfg = HookedTransformerConfig(
    n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
    d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
    eps=c.layer_norm_epsilon, original_architecture="GPT2LMHeadModel", tokenizer_name=args["model_dir"],
    model_name="lnscope-bench", dtype=dtype, device="cpu", default_prepend_bos=False)
model = TransformerLensReplacementModel(cfg, tokenizer=tok)
model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                  center_unembed=False, fold_value_biases=False,
                                  refactor_factored_attn_matrices=False)
# lnscope's transcoders read the bridge's MLP input x (LN folded); this model's MLP reads u = x * g + beta
tcfg = yaml.safe_load(open(args["transcoder_dir"] + "/config.yaml"))
act = TopK(int(tcfg["k"])) if tcfg.get("activation") == "topk" else torch.relu
tcs = {}
for i, name in enumerate(tcfg["transcoders"]):
    t = load_file(args["transcoder_dir"] + "/" + name)
    ln = hf.transformer.h[i].ln_2
    g = ln.weight.detach().to(dtype) / (math.sqrt(ln.eps) if ln.eps >= 1e10 else 1.0)
    beta = ln.bias.detach().to(dtype)
    W_enc = t["W_enc"].to(dtype)
    tc = SingleLayerTranscoder(c.n_embd, W_enc.shape[0], act, i, dtype=dtype, device="cpu")
    with torch.no_grad():
        tc.W_enc.copy_(W_enc / g)
        tc.b_enc.copy_(t["b_enc"].to(dtype) - W_enc @ (beta / g))
        tc.W_dec.copy_(t["W_dec"].to(dtype))
        tc.b_dec.copy_(t["b_dec"].to(dtype))
    tcs[i] = tc
model._configure_replacement_model(TranscoderSet(tcs, feature_input_hook="mlp.hook_in",
                                                 feature_output_hook="hook_mlp_out", scan="lnscope-bench"))
ids = args["token_ids"]
attribute(torch.tensor(ids[:8]), model, batch_size=args["batch_size"])  # warm-up
base = rss_mib()
times = []
for _ in range(args["repeats"]):
    t = time.perf_counter()
    graph = attribute(torch.tensor(ids), model, batch_size=args["batch_size"])
    times.append(time.perf_counter() - t)
print(json.dumps({"times": times, "active_features": int(graph.active_features.shape[0]),
                  "nodes": int(graph.adjacency_matrix.shape[0]),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mib": base}))
"""


def ct_python(arg: str | None) -> str:
    for cand in (arg, os.environ.get("LNSCOPE_CIRCUIT_TRACER_PYTHON"), str(ROOT / ".venv-ct" / "bin" / "python")):
        if cand and Path(cand).exists():
            return cand
    raise SystemExit("no interpreter with circuit-tracer: pass --ct-python or set LNSCOPE_CIRCUIT_TRACER_PYTHON")


def _last_json(run: subprocess.CompletedProcess, what: str) -> dict:
    if run.returncode != 0:
        raise SystemExit(f"{what} failed\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def against_circuit_tracer(args, name: str, paths: dict[str, Path]) -> list[dict]:
    """Per role and length: `rounds` alternating (ours, circuit-tracer) subprocess pairs; medians and peaks."""
    from transformers import AutoTokenizer

    python = ct_python(args.ct_python)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    rows = []
    print(f"{'role':>9} {'tokens':>6} {'features':>8} {'lnscope s':>10} {'c-t s':>8} {'c-t/ours':>8} "
          f"{'lnscope RSS':>12} {'c-t RSS':>9}", flush=True)
    for role in args.roles:
        tc_dir = transcoder_dir(name, role)
        ids_all = prompt_ids(AutoTokenizer.from_pretrained(str(paths[role])), max(args.lengths))
        for n in args.lengths:
            ids = ids_all[:n]
            ours_cmd = [sys.executable, __file__, "--one", "--graph-only", "--role", role, "--length", str(n),
                        "--model-dir", str(paths[role]), "--transcoder-dir", str(tc_dir), "--device", "cpu",
                        "--repeats", str(args.repeats), "--batch-size", str(args.batch_size),
                        "--threads", str(args.threads)]
            ct_args = {"model_dir": str(paths[role]), "transcoder_dir": str(tc_dir), "token_ids": ids,
                       "threads": args.threads, "repeats": args.repeats, "batch_size": args.batch_size}
            ct_cmd = [python, "-c", CT_SCRIPT, json.dumps(ct_args)]
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(_last_json(subprocess.run(ours_cmd, capture_output=True, text=True, env=env),
                                       f"lnscope {role} {n}"))
                theirs.append(_last_json(subprocess.run(ct_cmd, capture_output=True, text=True, env=env),
                                         f"circuit-tracer {role} {n}"))
            t_ours = statistics.median(t for r in ours for t in r["times"])
            t_ct = statistics.median(t for r in theirs for t in r["times"])
            row = {"role": role, "tokens": n, "active_features": ours[0]["active_features"],
                   "ct_active_features": theirs[0]["active_features"], "lnscope_s": t_ours, "circuit_tracer_s": t_ct,
                   "ratio": t_ct / t_ours, "lnscope_peak_rss_mib": max(r["peak_rss_mib"] for r in ours),
                   "circuit_tracer_peak_rss_mib": max(r["peak_rss_mib"] for r in theirs),
                   "lnscope_times": [t for r in ours for t in r["times"]],
                   "circuit_tracer_times": [t for r in theirs for t in r["times"]]}
            rows.append(row)
            print(f"{role:>9} {n:>6} {row['active_features']:>8} {t_ours:>10.3f} {t_ct:>8.3f} {row['ratio']:>7.2f}x "
                  f"{row['lnscope_peak_rss_mib']:>8.0f} MiB {row['circuit_tracer_peak_rss_mib']:>5.0f} MiB",
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--roles", nargs="+", default=["original", "ln_free"])
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="targets per backward pass")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-tokens", type=int, default=100_000, help="for quick transcoders when none exist")
    p.add_argument("--against", choices=["circuit-tracer"], help="time circuit-tracer's graph too (see above)")
    p.add_argument("--rounds", type=int, default=3, help="--against: alternating subprocess pairs per length")
    p.add_argument("--ct-python", help="--against: an interpreter that imports circuit_tracer")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--graph-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--transcoder-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return
    torch.set_num_threads(args.threads)
    name, paths = sources()
    ensure_transcoders(name, paths, args.roles, args.device, args.train_tokens)
    if args.against:
        if args.device != "cpu":
            raise SystemExit("--against circuit-tracer runs on the CPU (--device cpu)")
        rows = against_circuit_tracer(args, name, paths)
        out = CACHE / "circuits-vs-circuit-tracer.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": name, "threads": args.threads, "batch_size": args.batch_size,
                                   "rows": rows}, indent=2))
        print(f"-> {out}")
        return
    rows = []
    for role in args.roles:
        for n in args.lengths:
            cmd = [sys.executable, __file__, "--one", "--role", role, "--length", str(n),
                   "--model-dir", str(paths[role]),
                   "--transcoder-dir", str(transcoder_dir(name, role)), "--device", args.device,
                   "--repeats", str(args.repeats), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                print(f"{role} {n}: failed\n{run.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{role:>9} {row['tokens']:>4} tokens: {row['active_features']:>6} active features, graph "
                  f"{row['graph_s']:7.2f} s = {row['ratio']:7.1f} x fwd+bwd ({row['fwd_bwd_s'] * 1e3:.1f} ms), peak "
                  f"{row['peak_mib']:7.1f} MiB ({row['peak_kind']}), identity {row['identity_max_rel_error']:.1e}",
                  flush=True)
    out = CACHE / "circuits.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": name, "device": args.device, "rows": rows}, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
