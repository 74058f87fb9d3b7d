"""The job system and storage, driven through the API with a kind defined here.

The `probe` kind below reports stages, can wait on an event and can fail in chosen ways, so
the queue, model locks, cancellation, time limits and storage are exercised for real.
"""

import threading
import time

import pytest
from fastapi.testclient import TestClient

from lnscope.analysis.kinds import KINDS
from lnscope.analysis.loading import ModelCache
from lnscope.analysis.pairs import PairRegistry
from lnscope.server.app import create_app
from lnscope.server.settings import Settings
from lnscope.server.storage import Store
from tests.probe_kind import GATE, MAX_CONCURRENT, PROBE, RUNNING


@pytest.fixture
def probe_kind(monkeypatch):
    monkeypatch.setitem(KINDS, "probe", PROBE)
    GATE.clear()
    RUNNING.clear()
    MAX_CONCURRENT[0] = 0
    yield
    GATE.set()


@pytest.fixture
def config(trio_dirs, tmp_path):
    (tmp_path / "lnscope.toml").write_text(
        'default_pair = "local"\n[pairs.local]\n'
        f'original = {{ path = "{trio_dirs["original"]}" }}\n'
        f'ln_free = {{ path = "{trio_dirs["ln_free"]}" }}\n'
        f'control = {{ path = "{trio_dirs["control"]}" }}\n'
        '[pairs.other]\n'
        f'original = {{ path = "{trio_dirs["control"]}" }}\n'
        f'ln_free = {{ path = "{trio_dirs["ln_free"]}" }}\n'
    )
    return tmp_path


def make_client(tmp_path, **settings):
    app = create_app(Settings(device="cpu", preload=False, data_dir=tmp_path / "data", **settings),
                     registry=PairRegistry.load(), cache=ModelCache())
    return TestClient(app)


def body(tag="", **options):
    return {"pair": "local", "prompts": ["When Mary and John went to the store"], "options": {"tag": tag, **options}}


def wait_status(client, job_id, statuses, timeout=30, stage=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = client.get(f"/api/v1/jobs/{job_id}").json()
        if info["status"] in statuses and stage in info["stage"]:
            return info
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {statuses} {stage}: {info}")


def test_inline_request_returns_the_result_with_its_inputs(probe_kind, config):
    with make_client(config) as client:
        r = client.post("/api/v1/analyses/probe?wait=true", json=body("a"))
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["status"] == "done" and out["result"]["roles"] == ["original", "ln_free", "control"]
        assert out["result"]["n_layers"] == {"original": 2, "ln_free": 2, "control": 2}
        assert out["inputs"]["options"]["tag"] == "a" and out["manifest"] == {"pair": "local"}
        assert out["timings"]["run_s"] >= 0
        again = client.get(f"/api/v1/results/{out['id']}").json()
        assert again["result"] == out["result"]


def test_identical_requests_return_the_stored_result(probe_kind, config):
    with make_client(config) as client:
        first = client.post("/api/v1/analyses/probe?wait=true", json=body("same")).json()
        second = client.post("/api/v1/analyses/probe?wait=true", json=body("same")).json()
        assert second["id"] == first["id"] and second["cached"] and RUNNING.count("same") == 1
        third = client.post("/api/v1/analyses/probe?wait=true", json=body("different")).json()
        assert third["id"] != first["id"]


def test_job_progress_then_cancel_at_a_stage_boundary(probe_kind, config):
    with make_client(config) as client:
        r = client.post("/api/v1/analyses/probe", json=body("c", block=True, stages=5))
        assert r.status_code == 202
        job = r.json()
        running = wait_status(client, job["id"], {"running"}, stage="probe stage")
        assert 0 <= running["progress"] < 1
        cancel = client.delete(f"/api/v1/jobs/{job['id']}")
        assert cancel.status_code == 200
        GATE.set()
        info = wait_status(client, job["id"], {"cancelled"})
        assert info["error_kind"] == "cancelled"
        assert client.delete(f"/api/v1/jobs/{job['id']}").status_code == 409  # already finished


def test_failures_keep_the_worker_serving(probe_kind, config):
    with make_client(config) as client:
        oom = client.post("/api/v1/analyses/probe?wait=true", json=body("o", fail="oom"))
        assert oom.status_code == 503 and "out of memory" in oom.json()["detail"] and oom.headers["retry-after"]
        ok = client.post("/api/v1/analyses/probe?wait=true", json=body("after-oom"))
        assert ok.status_code == 200
        history = client.get("/api/v1/results", params={"kind": "probe", "status": "failed"}).json()
        assert history["total"] == 1 and history["items"][0]["error_kind"] == "oom"


def test_time_limit_stops_a_job(probe_kind, config):
    with make_client(config, job_timeout_s=0.05) as client:
        job = client.post("/api/v1/analyses/probe", json=body("t", stages=50)).json()
        info = wait_status(client, job["id"], {"failed"})
        assert info["error_kind"] == "timeout" and "time limit" in info["error"]


def test_a_full_queue_is_refused_with_503(probe_kind, config):
    with make_client(config, workers=1, max_queue=1) as client:
        first = client.post("/api/v1/analyses/probe", json=body("q1", block=True)).json()
        wait_status(client, first["id"], {"running"})
        second = client.post("/api/v1/analyses/probe", json=body("q2", block=True))
        assert second.status_code == 202
        third = client.post("/api/v1/analyses/probe", json=body("q3", block=True))
        assert third.status_code == 503 and "queue is full" in third.json()["detail"]
        GATE.set()
        wait_status(client, second.json()["id"], {"done"})


def test_jobs_on_one_model_never_interleave_but_other_pairs_run_alongside(probe_kind, config):
    with make_client(config, workers=3) as client:
        a = client.post("/api/v1/analyses/probe", json=body("a1", block=True)).json()
        b = client.post("/api/v1/analyses/probe", json=body("a2", block=True)).json()
        wait_status(client, a["id"], {"running"}, stage="probe stage")
        other = {**body("b1", block=True), "pair": "other", "roles": ["original"]}
        c = client.post("/api/v1/analyses/probe", json=other).json()
        wait_status(client, c["id"], {"running"}, stage="probe stage")
        time.sleep(0.2)
        assert client.get(f"/api/v1/jobs/{b['id']}").json()["status"] == "queued"  # waits for a's models
        GATE.set()
        for j in (a, b, c):
            wait_status(client, j["id"], {"done"})
        assert MAX_CONCURRENT[0] == 2


def test_unfinished_jobs_of_a_killed_server_are_reported_and_finished_ones_kept(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    done = store.create(kind="probe", pair="p", inputs={}, req_hash="h1", manifest=None)
    store.mark_running(done.id)
    store.finish(done.id, '{"x": 1}', {"pair": "p"})
    running = store.create(kind="probe", pair="p", inputs={}, req_hash="h2", manifest=None)
    store.mark_running(running.id)
    queued = store.create(kind="probe", pair="p", inputs={}, req_hash="h3", manifest=None)

    restarted = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert restarted.recover_unfinished() == 2
    assert restarted.get(done.id).status == "done" and restarted.get(done.id).result == '{"x": 1}'
    for row_id in (running.id, queued.id):
        row = restarted.get(row_id)
        assert row.status == "failed" and row.error_kind == "interrupted" and "submit it again" in row.error
    assert not restarted.fail(done.id, "late", "x")  # a finished result is never overwritten


@pytest.mark.parametrize(
    "path, payload, status, field",
    [
        ("/api/v1/analyses/nope", body(), 404, None),
        ("/api/v1/analyses/probe", {**body(), "pair": "gpt5"}, 404, None),
        ("/api/v1/analyses/probe", {**body(), "pair": "other", "roles": ["control"]}, 404, None),
        ("/api/v1/analyses/probe", {**body(), "roles": ["teacher"]}, 422, "roles"),
        ("/api/v1/analyses/probe", {**body(), "options": {"stages": 0}}, 422, "stages"),
        ("/api/v1/analyses/probe", {**body(), "options": {"colour": "red"}}, 422, "colour"),
        ("/api/v1/analyses/probe", {**body(), "prompts": []}, 422, "prompts"),
        ("/api/v1/analyses/probe", {**body(), "prompts": ["a " * 100]}, 422, "prompts"),
        ("/api/v1/analyses/probe", {**body(), "prompts": ["x"] * 65}, 422, "prompts"),
        ("/api/v1/analyses/probe", {"pair": "local", "options": {}}, 422, "prompts"),
        ("/api/v1/analyses/probe", {**body(), "surprise": 1}, 422, "surprise"),
    ],
)
def test_bad_requests_name_the_field(probe_kind, config, path, payload, status, field):
    with make_client(config) as client:
        r = client.post(path, json=payload)
        assert r.status_code == status, r.text
        if field:
            assert field in str(r.json()["detail"])


def test_unknown_ids_are_404(probe_kind, config):
    with make_client(config) as client:
        assert client.get("/api/v1/jobs/not-a-uuid").status_code == 404
        assert client.get("/api/v1/results/00000000-0000-0000-0000-000000000000").status_code == 404
        assert client.delete("/api/v1/jobs/00000000-0000-0000-0000-000000000000").status_code == 404


def test_bearer_token_guards_everything_but_health(probe_kind, config):
    with make_client(config, api_token="s3cret") as client:
        assert client.get("/api/v1/health").status_code == 200
        assert client.get("/api/v1/models").status_code == 401
        assert client.post("/api/v1/analyses/probe", json=body()).status_code == 401
        assert client.get("/api/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_cors_origins_are_configurable(probe_kind, config):
    with make_client(config, cors_origins=["http://lab.example"]) as client:
        r = client.options("/api/v1/models",
                           headers={"Origin": "http://lab.example", "Access-Control-Request-Method": "GET"})
        assert r.headers.get("access-control-allow-origin") == "http://lab.example"
        r = client.options("/api/v1/models",
                           headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
        assert r.headers.get("access-control-allow-origin") is None


def test_a_model_that_cannot_load_is_409(probe_kind, config, trio_dirs):
    (config / "lnscope.toml").write_text(
        f'[pairs.broken]\noriginal = {{ path = "{trio_dirs["original"]}" }}\n'
        f'ln_free = {{ path = "{trio_dirs["original"]}" }}\n')
    with make_client(config) as client:
        r = client.post("/api/v1/analyses/probe?wait=true", json={**body(), "pair": "broken"})
        assert r.status_code == 409 and "registered as `ln_free`" in r.json()["detail"]
        assert client.post("/api/v1/models/broken/load").status_code == 409
        assert client.get("/api/v1/health").status_code == 200


def test_tokenize(config):
    with make_client(config) as client:
        r = client.post("/api/v1/tokenize", json={"pair": "local", "text": "The capital of France"}).json()
        assert r["n_ctx"] == 64 and r["tokens"][0]["text"] == "<|endoftext|>"
        assert "".join(t["text"] for t in r["tokens"][1:]) == "The capital of France"
        assert client.post("/api/v1/tokenize", json={"pair": "local", "text": ""}).status_code == 422
        assert client.post("/api/v1/tokenize", json={"pair": "zzz", "text": "a"}).status_code == 404


def test_workers_restart_while_an_old_worker_is_still_busy(tmp_path):
    """stop() with a job still running, then start(): the new workers serve the queue."""
    from lnscope.server.jobs import Job, JobManager

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    jobs = JobManager(store, workers=1)
    jobs.start()
    release = threading.Event()

    def slow(progress):
        release.wait(10)
        return "{}", None

    first = store.create(kind="probe", pair="p", inputs={}, req_hash="a", manifest=None)
    jobs.submit(Job(id=first.id, kind="probe", model_keys=["m1"], run=slow, timeout_s=60))
    time.sleep(0.3)
    jobs.stop(timeout=0.1)  # the old worker is still inside `slow`
    jobs.start()
    release.set()
    second = store.create(kind="probe", pair="p", inputs={}, req_hash="b", manifest=None)
    jobs.submit(Job(id=second.id, kind="probe", model_keys=["m2"], run=lambda progress: ("{}", None), timeout_s=60))
    assert jobs.wait(second.id, 10)
    assert store.get(second.id).status == "done"
    jobs.stop()
