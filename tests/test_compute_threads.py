"""Model work runs on per-device compute threads (issue 23): a single client's jobs and model loads on one warm
thread, concurrent work on threads of its own, idle threads gone after IDLE_S. Timings belong in bench/api.py."""

from __future__ import annotations

import threading
import time

import pytest

from lnscope.server import compute_threads, executors
from lnscope.server.compute_threads import device_key, run_on
from tests.test_reliability import IOI, client_for, dla  # noqa: F401 (client_for is a fixture)


@pytest.fixture
def short_idle(monkeypatch):
    monkeypatch.setattr(compute_threads, "IDLE_S", 0.3)


def _compute_threads(key: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"lnscope-compute-{key}"]


def test_sequential_calls_share_one_thread_that_is_not_the_callers(short_idle):
    key = "test-seq"
    idents = [run_on(key, threading.get_ident) for _ in range(6)]
    assert len(set(idents)) == 1 and idents[0] != threading.get_ident()
    assert run_on(key, lambda: run_on(key, threading.get_ident)) == idents[0]  # nested: inline, no deadlock
    with pytest.raises(ZeroDivisionError):
        run_on(key, lambda: 1 / 0)
    assert run_on(key, lambda: "still serving") == "still serving"


def test_concurrent_calls_run_side_by_side_and_idle_threads_exit(short_idle):
    key = "test-concurrent"
    release, inside, seen = threading.Event(), threading.Barrier(3, timeout=5), []

    def blocked() -> int:
        inside.wait()  # all three at once: three threads, none waits for another
        release.wait(5)
        return threading.get_ident()

    callers = [threading.Thread(target=lambda: seen.append(run_on(key, blocked))) for _ in range(3)]
    for t in callers:
        t.start()
    time.sleep(0.1)
    assert len(_compute_threads(key)) == 3
    release.set()
    for t in callers:
        t.join(5)
    assert len(set(seen)) == 3
    deadline = time.monotonic() + 5
    while _compute_threads(key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _compute_threads(key) == []  # their OpenMP teams go with them


def test_device_keys():
    assert device_key(["cpu", "cpu"]) == "cpu"
    assert device_key(["cuda:1", "cuda:0", "cuda:1"]) == "cuda:0+cuda:1"


def test_a_clients_model_work_runs_on_one_compute_thread(client_for, trio_dirs, monkeypatch):
    """Before: each job ran on whichever of the job workers took it and models loaded on request threads,
    one OpenMP team apiece, which made every CPU kernel slower than in a notebook."""
    client = client_for(trio_dirs, workers=4)
    cache = client.app.state.lnscope.cache
    ran_on: list[tuple[str, int]] = []

    def recording(fn):
        def wrapper(*args, **kwargs):
            ran_on.append((threading.current_thread().name, threading.get_ident()))
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(executors, "run_prepared", recording(executors.run_prepared))
    monkeypatch.setattr(cache, "get", recording(cache.get))
    assert client.post("/api/v1/models/local/load").status_code == 200  # a request thread asks for the models
    for seed in range(5):
        r = dla(client, seed=seed)
        assert r.status_code == 200, r.text
    assert len(ran_on) >= 3 + 5 * 2  # three loads, then per job its cached models and its units
    assert {name for name, _ in ran_on} == {"lnscope-compute-cpu"}
    assert len({ident for _, ident in ran_on}) == 1  # one after another: the same warm thread
