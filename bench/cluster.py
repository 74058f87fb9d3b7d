"""In-process models vs Ray model workers on the tiny trio (never run by the tests).

Measured in one run, each mode in a fresh subprocess (so each API side's RSS is its own):
  - a trio DLA and a trio patching-fidelity: wall time per mode, ray / local
  - the per-request overhead of the Ray hop: p50 of 20 small DLAs, ray / local and the difference
  - the API process's RSS (/proc/self/status VmRSS) after the runs; under ray also the workers' RSS

Model loading and actor start-up are left out (one warm-up run of each request first).

    python bench/cluster.py [--device cuda] [--address auto] [--num-cpus 4] [--gpus-per-worker 0.3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASK = {"name": "ioi", "n_prompts": 4, "seed": 0}
REQUESTS = {
    "trio dla": ("dla", {"task": TASK, "options": {"n_bootstrap": 50, "top_k_neurons": 5}}),
    "trio patching-fidelity": ("patching-fidelity", {"task": TASK, "options": {
        "nodes": ["head", "mlp"], "group_size": 2, "n_bootstrap": 50}}),
    "small dla": ("dla", {"prompts": ["When Mary and John went to the store, John gave a drink to"], "options": {
        "target": {"kind": "logit_diff", "token": " Mary", "other": " John"}, "n_bootstrap": 10}}),
}
SMALL_RUNS = 20


def rss_bytes(pid: int | str = "self") -> int:
    """A process's resident set size, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def make_runner(args):
    """(run(prepared) -> result, worker pids) for the mode in `args`."""
    from lnscope.analysis.pairs import PairRegistry, WorkerSpec
    from lnscope.analysis.pipeline import run_prepared
    from lnscope.analysis.progress import Progress

    pair = PairRegistry.load().get("tiny")
    if args.mode == "local":
        from lnscope.analysis.loading import model_cache

        return pair, lambda run: run_prepared(run, model_cache.load_pair(pair, run.roles, device=args.device,
                                                                        dtype=args.dtype)), None
    from lnscope.server.ray_executor import RayExecutor

    if args.gpus_per_worker is not None:
        pair = dataclasses.replace(pair, workers={r: WorkerSpec(num_gpus=args.gpus_per_worker) for r in pair.roles()})
    options = {} if args.address else {"num_cpus": args.num_cpus}
    executor = RayExecutor(args.address, device=args.device, dtype=args.dtype, namespace="lnscope-bench",
                           log_to_driver=False, **options)
    executor.start()

    def pids():
        import ray

        return [ray.get(executor.actor(pair, role).pid.remote()) for role in pair.roles()]

    return pair, lambda run: executor.run(run, Progress()), pids


def measure(args) -> dict:
    """This mode's timings and RSS, as one JSON-able dict."""
    from lnscope.analysis.kinds import Limits
    from lnscope.analysis.pipeline import prepare_run
    from lnscope.analysis.requests import AnalysisRequest

    pair, run, pids = make_runner(args)
    prepared = {name: prepare_run(kind, AnalysisRequest(pair="tiny", **request), pair, Limits())
                for name, (kind, request) in REQUESTS.items()}
    out: dict = {}
    for name, p in prepared.items():
        run(p)  # warm-up: loads the models / starts the workers
        runs = SMALL_RUNS if name == "small dla" else 3
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run(p)
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    out["api rss"] = rss_bytes()
    if pids is not None:
        out["worker rss"] = [rss_bytes(pid) if Path(f"/proc/{pid}").exists() else 0 for pid in pids()]
    return out


def in_subprocess(mode: str, args) -> dict:
    """`measure` for `mode` in a fresh Python process."""
    cmd = [sys.executable, __file__, "--mode", mode, "--device", args.device, "--dtype", args.dtype,
           "--num-cpus", str(args.num_cpus)]
    if args.address:
        cmd += ["--address", args.address]
    if args.gpus_per_worker is not None:
        cmd += ["--gpus-per-worker", str(args.gpus_per_worker)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(local: dict, remote: dict) -> None:
    mib = 2**20
    print(f"{'':38} {'local':>10} {'ray':>10} {'ray/local':>10}")
    for name in REQUESTS:
        label = f"{name} (p50 of {SMALL_RUNS})" if name == "small dla" else f"{name} (median of 3)"
        print(f"{label:38} {local[name] * 1e3:8.1f}ms {remote[name] * 1e3:8.1f}ms {remote[name] / local[name]:10.2f}")
    overhead = (remote["small dla"] - local["small dla"]) * 1e3
    print(f"ray hop overhead per request (small dla p50): {overhead:+.1f} ms")
    print(f"{'API process RSS':38} {local['api rss'] / mib:8.0f}MiB {remote['api rss'] / mib:8.0f}MiB "
          f"{remote['api rss'] / local['api rss']:10.2f}")
    workers = ", ".join(f"{b / mib:.0f}" for b in remote.get("worker rss", []))
    print(f"ray workers' RSS (MiB, one per role): {workers}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--address", default=None, help="a Ray cluster (default: a local instance)")
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local Ray instance")
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help="GPUs per model worker (default 0.3 with --device cuda: the trio shares one GPU)")
    parser.add_argument("--mode", choices=["local", "ray"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpus_per_worker is None and args.device.startswith("cuda"):
        args.gpus_per_worker = 0.3
    if args.mode:
        print(json.dumps(measure(args)))
        return
    print(f"tiny trio on {args.device} ({args.dtype}); each mode in a fresh process, warm-up runs left out")
    report(in_subprocess("local", args), in_subprocess("ray", args))


if __name__ == "__main__":
    main()
