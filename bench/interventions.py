"""Benchmark of the `intervene` kind (never run by the tests): one intervention on a trio / one forward per role.

For (a) the `tiny` pair, if models/tiny/* exists, and (b) a GPT-2-small-shaped random trio (12 layers,
12 heads, d_model 768, vocab 50257; LN-free twin in the released format, control perturbed):
  - one head output ablation (zero) on every role, through prepare_run and run_units (clean run + the edit
    alone, which is also the all-edits run): expected about 2 forward passes per role
  - the same with a mean ablation (eval-text means computed once per model, then cached: the second call)
  - printing each as a ratio to one plain forward pass of the same prompts per role.

    python bench/interventions.py [--device cuda] [--prompts 8] [--tokens 32] [--repeats 3] [--skip-tiny]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lnscope.analysis.kinds import KINDS, Limits  # noqa: E402
from lnscope.analysis.loading import ModelCache  # noqa: E402
from lnscope.analysis.pairs import ModelSource, PairRegistry, PairSpec  # noqa: E402
from lnscope.analysis.pipeline import prepare_run, run_units  # noqa: E402
from lnscope.analysis.requests import AnalysisRequest  # noqa: E402

WORDS = "When Mary and John went to the store John gave a drink to the war lasted from year".split()


def gpt2_small_shaped_trio(root: Path) -> PairSpec:
    """original: random GPT-2-small-shaped; ln_free: a perturbed copy in the released LN-free format; control."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from bench.analyses import gpt2_small_shaped
    from tests.checkpoints import perturbed, to_released_ln_free

    original = gpt2_small_shaped(root)
    model, tokenizer = GPT2LMHeadModel.from_pretrained(original).eval(), AutoTokenizer.from_pretrained(original)
    paths = {"original": original}
    for role, twin in (("ln_free", to_released_ln_free(perturbed(model, 1, 0.002), 2)),
                       ("control", perturbed(model, 3, 0.002))):
        paths[role] = root / role
        twin.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    return PairSpec(name="gpt2-small-shaped", **{role: ModelSource(path=p) for role, p in paths.items()})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_pair(name: str, pair: PairSpec, args, cache: ModelCache) -> None:
    prompts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(args.tokens - 1)) for i in range(args.prompts)]
    models = cache.load_pair(pair, device=args.device)
    device = next(iter(models.values())).device
    kind = KINDS["intervene"]

    def request(how: str):
        options = {"target": {"kind": "logit_diff", "token": " Mary", "other": " John"},
                   "edits": [{"type": "ablate_head", "layer": 0, "head": 0, "how": how}]}
        return prepare_run("intervene", AnalysisRequest(pair=pair.name, prompts=prompts, options=options), pair,
                           Limits(max_prompt_tokens=1024))

    zero, mean = request("zero"), request("mean")
    tokens = zero.inputs.tokens.to(device)

    @torch.no_grad()
    def forwards():
        for model in models.values():
            model.bridge(tokens)

    base = median_time(forwards, device, args.repeats)
    print(f"{name}: {len(prompts)} prompts x {tokens.shape[1]} tokens, roles {list(models)} on {device}")
    print(f"  one forward per role                    {base * 1e3:9.1f} ms")
    for label, run in (("head zero ablation", zero), ("head mean ablation (means cached)", mean)):
        t = median_time(lambda run=run: run_units(kind, models, run.inputs, run.options, pair=pair), device,
                        args.repeats)
        print(f"  {label:<38}  {t * 1e3:9.1f} ms   ratio {t / base:5.2f}   (estimate {run.cost.forward_passes} "
              f"passes per role for {len(prompts)} prompts)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--skip-gpt2", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = ModelCache()
    if not args.skip_tiny:
        try:
            pair = PairRegistry.load().get("tiny")
            if pair.original.path is not None and pair.original.path.is_dir():
                bench_pair("tiny", pair, args, cache)
            else:
                print("tiny trio not built (models/tiny missing): skipped")
        except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
            print(f"tiny trio: skipped ({type(exc).__name__}: {exc})")
    if not args.skip_gpt2:
        with tempfile.TemporaryDirectory() as tmp:
            bench_pair("GPT-2-small-shaped (random weights)", gpt2_small_shaped_trio(Path(tmp)), args, cache)


if __name__ == "__main__":
    main()
