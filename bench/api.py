"""Latency of an inline DLA request on the tiny pair, as ratios to the library call alone.

Starts a real uvicorn server on 127.0.0.1, then measures p50 / p95 wall time of
POST /api/v1/analyses/dla?wait=true under 1 and 8 concurrent clients, against the library
call (`run_units` of the `dla` kind on the same, already loaded models) timed in the same run. Every request is
distinct (its seed differs), so none is answered from the store. Each client keeps one HTTP connection open (as a
real client does), so what is timed is the server, not a new client and TCP connection per request.

The one-client figure alternates a library call and a request, so that a shared machine's drift (on a 2-core VM
the same call varies by 1.5x from minute to minute) weighs on both sides alike.

    python bench/api.py [--requests 24] [--pair tiny]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import httpx

from lnscope.server.compute_threads import IDLE_S

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "When Tom and Anna went to the park, Anna gave a ball to",
]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def library_call(pair_name: str) -> Callable[[int], float]:
    """A function that runs the library's DLA once with a given seed and returns its wall time."""
    from lnscope.analysis.checks import tokenize_prompts
    from lnscope.analysis.dla import DLATarget
    from lnscope.analysis.kinds import KINDS, Inputs
    from lnscope.analysis.kinds.dla import DLAOptions
    from lnscope.analysis.loading import model_cache
    from lnscope.analysis.pairs import PairRegistry
    from lnscope.analysis.pipeline import run_units

    pair = PairRegistry.load().get(pair_name)
    models = model_cache.load_pair(pair, device="cpu")
    tok = models["original"].tokenizer
    tokens, lengths = tokenize_prompts(tok, PROMPTS, 128)
    (a,), (b,) = (tok.encode(w, add_special_tokens=False) for w in (" John", " Anna"))
    target = DLATarget.logit_diff(a, b)

    def call(seed: int) -> float:
        t = time.perf_counter()
        run_units(KINDS["dla"], models, Inputs(tokens=tokens, end_pos=lengths - 1, extra={"target": target}),
                  DLAOptions(n_bootstrap=200), pair=pair, seed=seed)
        return time.perf_counter() - t

    call(-1)  # a warm-up run
    return call


def serve(port: int, data_dir: str, pair: str = "tiny") -> subprocess.Popen:
    env = {**os.environ, "LNSCOPE_DATA_DIR": data_dir, "LNSCOPE_DEVICE": "cpu", "LNSCOPE_WORKERS": "8"}
    proc = subprocess.Popen([sys.executable, "-m", "lnscope.analysis.cli", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/api/v1/models/{pair}/load", timeout=120).raise_for_status()
            return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


def request_seconds(client: httpx.Client, seed: int, pair: str = "tiny") -> float:
    """Wall time of one inline DLA request (a new seed: never answered from the store) on an open connection."""
    body = {"pair": pair, "prompts": PROMPTS, "seed": seed,
            "options": {"target": {"kind": "logit_diff", "token": " John", "other": " Anna"}, "n_bootstrap": 200}}
    t = time.perf_counter()
    r = client.post("/api/v1/analyses/dla?wait=true&timeout=300", json=body)
    r.raise_for_status()
    elapsed = time.perf_counter() - t
    assert r.json()["status"] == "done" and not r.json()["cached"]
    return elapsed


def http_seconds(port: int, clients: int, n: int, seed0: int, pair: str = "tiny") -> list[float]:
    """`n` requests from `clients` concurrent clients, each on its own keep-alive connection."""
    local = threading.local()
    opened: list[httpx.Client] = []

    def one(i: int) -> float:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=400)
            opened.append(local.client)
        return request_seconds(local.client, seed0 + i, pair)

    try:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            return list(pool.map(one, range(n)))
    finally:
        for client in opened:
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--pair", default="tiny")
    args = parser.parse_args()
    library = library_call(args.pair)
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    port_no = port.getsockname()[1]
    port.close()
    with tempfile.TemporaryDirectory() as data:
        proc = serve(port_no, data, args.pair)
        try:
            lib, one = [], []
            with httpx.Client(base_url=f"http://127.0.0.1:{port_no}", timeout=400) as client:
                for i in range(3):  # warm-up
                    request_seconds(client, 10_000 + i, args.pair)
                time.sleep(IDLE_S + 0.5)  # the steady state: compute threads that only the start-up used have exited
                for i in range(args.requests):  # alternated: drift weighs on both sides alike
                    lib.append(library(i))
                    one.append(request_seconds(client, 20_000 + i, args.pair))
            lib_p50 = statistics.median(lib)
            print(f"library dla (3 roles, 2 prompts): p50 {lib_p50 * 1000:.1f} ms, "
                  f"p95 {percentile(lib, 0.95) * 1000:.1f} ms")
            eight = http_seconds(port_no, 8, args.requests, 30_000, args.pair)
            for clients, t in ((1, one), (8, eight)):
                p50, p95 = statistics.median(t), percentile(t, 0.95)
                print(f"HTTP inline dla, {clients} client(s): p50 {p50 * 1000:.1f} ms ({p50 / lib_p50:.2f}x library), "
                      f"p95 {p95 * 1000:.1f} ms ({p95 / lib_p50:.2f}x library p50)")
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    one_p50 = statistics.median(one)
    print(f"p50 ratio, 1 client: API {one_p50 * 1000:.1f} ms / library {lib_p50 * 1000:.1f} ms = "
          f"{one_p50 / lib_p50:.2f}x (goal: at most 1.10x)")


if __name__ == "__main__":
    main()
