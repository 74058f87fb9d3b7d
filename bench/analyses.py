"""Benchmarks of the patching analyses (never run by the tests).

For (a) the `tiny` trio's original model, if models/tiny/* exists, and (b) a GPT-2-small-shaped model with
random weights (12 layers, 12 heads, d_model 768, d_mlp 3072, vocab 50257), measured in one run:
  - AtP over all default nodes (with the AtP* QK fix) / one forward + backward      (target <= 3)
  - TransformerLens's per-node activation-patching sweeps / our batched sweep       (target >= 10),
    ours timed before and after TransformerLens's sweep (their mean; the machine's speed may drift),
    asserting both give the same patched metric within 1e-4
  - DLA for all heads (analysis.dla, cached-scale treatment) / one forward          (target <= 2)
  - peak memory: torch.cuda.max_memory_allocated per phase on CUDA; the process's peak RSS
    (resource.ru_maxrss, cumulative) on CPU.

    python bench/analyses.py [--device cuda] [--quick] [--size 8x16] [--threads N] [--model DIR ...]
--quick: 4 prompts x 8 tokens and the TransformerLens comparison on resid_pre/head/mlp only (CPU-friendly);
default: 16 prompt pairs of 16 tokens and also head x position (TransformerLens's head x position sweep
of a GPT-2-small-shaped model takes about an hour on 2 CPU cores; `--nodes resid_pre head mlp` leaves it out).
--size PROMPTSxTOKENS sets the prompts and tokens of either mode. The activation-patching ratios of every model,
measured in this one run, are repeated at the end.
On a CPU shared with other work, pass --threads 1: two threads on a busy 2-core machine spend most of their time
waiting for each other (a GPT-2-small forward at 16 x 16 took 0.75 s on one thread and 2.5-5.8 s on two), which
hits TransformerLens's many small forwards and our few large ones differently.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lnscope.analysis.loading import load_model  # noqa: E402
from lnscope.analysis.pairs import ModelSource  # noqa: E402
from lnscope.analysis.patching import DEFAULT_NODES, activation_patching, attribution_patching  # noqa: E402


def gpt2_small_shaped(root: Path) -> Path:
    """A randomly initialised GPT-2-small-shaped checkpoint with a small byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_inner=3072, vocab_size=50257, n_positions=1024)
    model = GPT2LMHeadModel(config).eval()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["When Mary and John went to the store, John gave a drink to Mary."] * 10, trainer)
    eos = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)
    path = root / "gpt2-small-shaped"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prompts(vocab: int, n: int, pos: int, seed: int = 0):
    """Random clean prompts; corrupt = clean with two positions replaced (pos/4 and pos/2, like an IOI
    name swap); logit-diff metric at the end. Nodes at positions before pos/4 (and resid_pre 0 away from
    the two) see identical clean and corrupt activations, so the batched sweep skips them."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n, pos), generator=gen)
    corrupt = clean.clone()
    for p in (pos // 4, pos // 2):
        corrupt[:, p] = torch.randint(0, vocab, (n,), generator=gen)
    answers = torch.randint(0, vocab, (n, 2), generator=gen)

    def metric(logits):
        last = logits[:, -1]
        a = answers.to(last.device)
        return last.gather(1, a[:, :1])[:, 0] - last.gather(1, a[:, 1:])[:, 0]

    return clean, corrupt, answers, metric


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


class Memory:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> str:
        if self.device.type == "cuda":
            return f"{torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB (CUDA peak)"
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process peak RSS)"


def tl_sweeps(bridge, clean, corrupt, metric, nodes):
    """TransformerLens 4.3's one-forward-per-node sweeps: node type -> patched metric (batch mean)."""
    from transformer_lens import patching

    fns = {"resid_pre": patching.get_act_patch_resid_pre, "head": patching.get_act_patch_attn_head_out_all_pos,
           "head_pos": patching.get_act_patch_attn_head_out_by_pos, "mlp": patching.get_act_patch_mlp_out,
           "head_q": patching.get_act_patch_attn_head_q_all_pos, "head_k": patching.get_act_patch_attn_head_k_all_pos,
           "head_v": patching.get_act_patch_attn_head_v_all_pos}
    with torch.no_grad():
        _, cache = bridge.run_with_cache(clean)
    out = {}
    with contextlib.redirect_stderr(io.StringIO()):  # tqdm bars
        for n in nodes:
            out[n] = fns[n](bridge, corrupt, cache, metric, reduce="mean").double().cpu()
    return out


def bench_model(name: str, model, n_prompts: int, n_pos: int, tl_nodes: list[str], repeats: int,
                chunk: int | None, ratios: dict[str, str] | None = None) -> None:
    bridge, device = model.bridge, model.device
    mem = Memory(device)
    clean, corrupt, answers, metric = prompts(int(bridge.cfg.d_vocab), n_prompts, n_pos)
    clean, corrupt = clean.to(device), corrupt.to(device)
    print(f"\n== {name}: {bridge.cfg.n_layers} layers x {bridge.cfg.n_heads} heads, d_model {bridge.cfg.d_model}, "
          f"d_mlp {bridge.cfg.d_mlp}, vocab {bridge.cfg.d_vocab}; {n_prompts} prompts x {n_pos} tokens, "
          f"{device}, {model.dtype}")

    def forward():
        with torch.no_grad():
            return bridge(corrupt)

    def forward_backward():
        logits = bridge(corrupt)
        metric(logits).sum().backward()
        bridge.zero_grad(set_to_none=True)

    mem.reset()
    t_fwd, _ = timed(forward, device, repeats)
    t_fb, _ = timed(forward_backward, device, repeats)
    print(f"one forward {t_fwd * 1e3:.1f} ms; one forward+backward {t_fb * 1e3:.1f} ms; peak {mem.peak()}")

    mem.reset()
    t_atp, atp = timed(lambda: attribution_patching(model, clean, corrupt, metric, DEFAULT_NODES, qk_fix=True),
                       device, repeats)
    n_atp = sum(m.tensor().numel() for m in atp.atp.values())
    print(f"AtP + AtP* over {n_atp} nodes {list(DEFAULT_NODES)}: {t_atp * 1e3:.1f} ms = "
          f"{t_atp / t_fb:.2f} x forward+backward (target <= 3); peak {mem.peak()}")

    def ours_timed():
        start = time.perf_counter()
        result = activation_patching(model, clean, corrupt, metric, tl_nodes, chunk_size=chunk)
        sync(device)
        return time.perf_counter() - start, result

    # ours runs before and after TransformerLens's sweep and the ratio uses the mean of the two, so that a
    # machine whose speed drifts during the (long) TransformerLens sweep favours neither side
    mem.reset()
    t_before, ours = ours_timed()
    peak_ours = mem.peak()
    n_nodes = sum(m.tensor().numel() for m in ours.effects.values())
    start = time.perf_counter()
    ref = tl_sweeps(bridge, clean, corrupt, metric, tl_nodes)
    sync(device)
    t_tl = time.perf_counter() - start
    t_after, _ = ours_timed()
    t_ours = (t_before + t_after) / 2
    diff = max(float((ours.effects[n].tensor() + ours.metric.corrupt - ref[n]).abs().max()) for n in tl_nodes)
    assert diff < 1e-4, f"batched activation patching differs from TransformerLens by {diff}"
    print(f"activation patching {tl_nodes} ({n_nodes} nodes): TransformerLens {t_tl:.2f} s, ours {t_ours:.2f} s "
          f"(before / after TransformerLens {t_before:.2f} / {t_after:.2f} s; chunk {ours.chunk_size}, "
          f"{ours.n_forward_passes} passes, {ours.n_unchanged_nodes} unchanged nodes not run, shortcuts "
          f"{', '.join(ours.shortcuts) or 'none'}) = {t_tl / t_ours:.1f} x faster (target >= 10); "
          f"max |diff| {diff:.1e}; peak {peak_ours}")
    if ratios is not None:
        ratios[name] = (f"{t_tl / t_ours:.1f} x ({n_prompts} x {n_pos}, {tl_nodes}: TransformerLens {t_tl:.1f} s, "
                        f"ours {t_ours:.1f} s)")

    try:
        from lnscope.analysis.dla import DLATarget, dla
    except ImportError:
        print("DLA: analysis.dla not available, skipped")
        return
    target = DLATarget(kind="task_metric", answer_tokens=answers.tolist())
    mem.reset()
    end = [n_pos - 1] * n_prompts
    t_dla, _ = timed(lambda: dla(model, corrupt, target=target, end_pos=end, treatments=["cached_scale"],
                                 top_k_neurons=0, n_bootstrap=0, batch_size=n_prompts), device, repeats)
    print(f"DLA for all heads (cached_scale): {t_dla * 1e3:.1f} ms = {t_dla / t_fwd:.2f} x one forward "
          f"(target <= 2); peak {mem.peak()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    parser.add_argument("--quick", action="store_true",
                        help="4 prompts x 8 tokens, TL comparison on resid_pre/head/mlp")
    parser.add_argument("--size", default=None, metavar="PROMPTSxTOKENS",
                        help="prompts x tokens, e.g. 16x16 or 8x16 (default: 4x8 with --quick, else 16x16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy shared CPU)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="nodes per batched forward (default: the library's, 8 on CPU, 32 on CUDA)")
    parser.add_argument("--nodes", nargs="+", default=None,
                        help="node types of the TransformerLens comparison (default: resid_pre head head_pos mlp; "
                             "quick: resid_pre head mlp)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--skip-gpt2", action="store_true")
    parser.add_argument("--model", type=Path, action="append", default=[],
                        help="also benchmark this save_pretrained directory (as role original)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_prompts, n_pos = (4, 8) if args.quick else (16, 16)
    if args.size:
        try:
            n_prompts, n_pos = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            parser.error(f"--size must look like 16x16, not {args.size!r}")
    ratios: dict[str, str] = {}
    tl_nodes = args.nodes or (["resid_pre", "head", "mlp"] if args.quick else ["resid_pre", "head", "head_pos", "mlp"])
    repeats = args.repeats or (1 if args.quick else 3)
    chunk = args.chunk_size

    if not args.skip_tiny:
        from lnscope.analysis.pairs import PairRegistry

        try:
            spec = PairRegistry.load().get("tiny")
            source = spec.source("original")
            if source.path is not None and source.path.is_dir():
                model = load_model(source, "original", device=args.device)
                bench_model("tiny (original)", model, n_prompts, n_pos, tl_nodes, repeats, chunk, ratios)
            else:
                print("tiny trio not built (models/tiny missing): skipped")
        except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
            print(f"tiny trio: skipped ({type(exc).__name__}: {exc})")

    for path in args.model:
        bench_model(f"{path}", load_model(ModelSource(path=path), "original", device=args.device),
                    n_prompts, n_pos, tl_nodes, repeats, chunk, ratios)

    if not args.skip_gpt2:
        with tempfile.TemporaryDirectory() as tmp:
            path = gpt2_small_shaped(Path(tmp))
            model = load_model(ModelSource(path=path), "original", device=args.device)
            bench_model("GPT-2-small-shaped (random weights)", model, n_prompts, n_pos, tl_nodes, repeats, chunk,
                        ratios)
    print("\n== activation patching, TransformerLens / ours, this run (target >= 10):")
    for name, ratio in ratios.items():
        print(f"  {name}: {ratio}")


if __name__ == "__main__":
    main()
