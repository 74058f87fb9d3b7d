"""The Ray executor: units on model-worker actors give the in-process numbers; progress, cancel and death.

A local Ray instance with CPU actors (one per tiny role, float32) serves the whole module.
"""

import json
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray")

from lnscope.analysis.kinds import Limits  # noqa: E402
from lnscope.analysis.loading import model_cache  # noqa: E402
from lnscope.analysis.pairs import PairRegistry  # noqa: E402
from lnscope.analysis.pipeline import prepare_run, run_prepared  # noqa: E402
from lnscope.analysis.progress import Cancelled, Progress  # noqa: E402
from lnscope.analysis.requests import AnalysisRequest  # noqa: E402
from lnscope.server.ray_executor import RayExecutor, WorkerDied  # noqa: E402
from tests import test_kind_results  # noqa: E402
from tests.test_kind_results import ROWS, assert_same  # noqa: E402

ROW_IDS = [f"{i}-{row['kind']}" for i, row in enumerate(ROWS)]
SLOW = {"task": {"name": "ioi", "n_prompts": 4, "seed": 0}, "options": {"nodes": ["neuron"]}, "roles": ["original"]}
SMALL = {"prompts": ["When Mary and John went to the store, John gave a drink to"], "roles": ["original"],
         "options": {"target": {"kind": "logit_diff", "token": " Mary", "other": " John"}, "n_bootstrap": 10}}


@pytest.fixture(scope="module")
def tiny():
    return PairRegistry.load().get("tiny")


@pytest.fixture(scope="module")
def executor():
    ex = RayExecutor(device="cpu", dtype="float32", namespace=f"lnscope-test-{uuid.uuid4().hex[:8]}", num_cpus=4,
                     log_to_driver=False, object_store_memory=200 * 2**20)
    ex.start()
    yield ex
    ex.shutdown_workers()
    ex.stop()


@pytest.fixture(scope="module")
def expected(tiny):
    """Each fixture row's in-process result as JSON, computed once."""
    out = {}
    for i, row in enumerate(ROWS):
        run = prepare_run(row["kind"], AnalysisRequest(pair="tiny", **row["request"]), tiny, Limits())
        models = model_cache.load_pair(tiny, run.roles, device="cpu", dtype="float32")
        out[i] = json.loads(run_prepared(run, models).model_dump_json())
    return out


@pytest.fixture
def tight(monkeypatch):
    """assert_same to 1e-6 relative."""
    monkeypatch.setattr(test_kind_results, "REL", 1e-6)


def _prepared(tiny, kind, request):
    return prepare_run(kind, AnalysisRequest(pair="tiny", **request), tiny, Limits())


def _run_row(executor, tiny, i, progress=None):
    row = ROWS[i]
    result = executor.run(_prepared(tiny, row["kind"], row["request"]), progress or Progress())
    return json.loads(result.model_dump_json())


@pytest.mark.parametrize("i", range(len(ROWS)), ids=ROW_IDS)
def test_every_kind_gives_the_in_process_numbers(executor, tiny, expected, tight, i):
    got = _run_row(executor, tiny, i)
    assert_same(got, expected[i])
    assert got["manifest"] == expected[i]["manifest"]


def test_a_trio_analysis_leaves_three_idle_workers(executor, tiny):
    _run_row(executor, tiny, 0)
    workers = [w for w in executor.workers() if w.pair == "tiny"]
    assert sorted(w.role for w in workers) == ["control", "ln_free", "original"]
    for w in workers:
        assert w.state == "idle" and w.jobs_done >= 1 and w.device == "cpu" and w.memory_bytes > 0, w
        assert w.node and w.queue_length == 0


def test_progress_reaches_the_job_from_every_role(executor, tiny):
    stages = []
    _run_row(executor, tiny, 0, Progress(lambda stage, fraction: stages.append((stage, fraction))))
    for role in ("original", "ln_free", "control"):
        assert any(stage.startswith(f"{role}: ") for stage, _ in stages), stages
    fractions = [f for _, f in stages]
    assert fractions[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in fractions)


def test_concurrent_runs_give_the_sequential_results(executor, tiny, expected, tight):
    rows = [i % len(ROWS) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: _run_row(executor, tiny, i), rows))
    for i, got in zip(rows, results):
        assert_same(got, expected[i])


def _worker(executor, role):
    return next(w for w in executor.workers() if w.pair == "tiny" and w.role == role)


def test_a_cancelled_job_stops_on_the_worker_which_serves_the_next(executor, tiny):
    stop = threading.Event()

    asked = []

    def on_progress(stage, fraction):
        if stage.startswith("original: activation patching") and not stop.is_set():
            stop.set()
            asked.append(time.monotonic())

    with pytest.raises(Cancelled):
        executor.run(_prepared(tiny, "activation-patching", SLOW), Progress(on_progress, stop.is_set))
    assert stop.is_set() and time.monotonic() - asked[0] < 2.0  # the unit alone runs for seconds
    assert _worker(executor, "original").state == "idle"
    assert executor.run(_prepared(tiny, "dla", SMALL), Progress()).roles["original"]


def test_a_unit_past_its_time_limit_stops_on_the_worker(executor, tiny):
    from lnscope.server.jobs import JobTimeout

    with pytest.raises(JobTimeout, match="time limit"):
        executor.run(_prepared(tiny, "activation-patching", SLOW), Progress(), time_limit_s=0.5)
    assert _worker(executor, "original").state == "idle"


def test_a_worker_killed_mid_job_fails_that_job_and_comes_back(executor, tiny):
    actor = executor.actor(tiny, "original")
    pid = ray.get(actor.pid.remote())
    busy = threading.Event()

    def on_progress(stage, fraction):
        if stage.startswith("original: activation patching"):
            busy.set()

    outcome = {}

    def job():
        try:
            executor.run(_prepared(tiny, "activation-patching", SLOW), Progress(on_progress))
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    assert busy.wait(60)
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert isinstance(outcome.get("error"), WorkerDied), outcome
    assert "the model worker tiny:original died" in str(outcome["error"]) and "submit the job again" in str(
        outcome["error"])
    result = executor.run(_prepared(tiny, "dla", SMALL), Progress())
    assert list(result.roles) == ["original"]
    assert ray.get(executor.actor(tiny, "original").pid.remote()) != pid
    assert _worker(executor, "original").state == "idle"
