"""Hostile and heavy input: bounded bodies and costs, clear 4xx instead of 500s, no stale cache.

Each test here reproduces one defect a reliability run found (see the test's docstring) and failed
before its fix.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from lnscope.analysis.loading import ModelCache
from lnscope.analysis.pairs import PairRegistry
from lnscope.server.app import create_app
from lnscope.server.schemas import ErrorBody, JobInfo
from lnscope.server.settings import Settings

IOI = "When Mary and John went to the store, John gave a drink to"
DLA_OPTIONS = {"target": {"kind": "logit_diff", "token": " Mary", "other": " John"}, "n_bootstrap": 10}


def _config(tmp_path, trio: dict) -> None:
    (tmp_path / "lnscope.toml").write_text(
        'default_pair = "local"\n[pairs.local]\n' + "".join(f'{r} = {{ path = "{p}" }}\n' for r, p in trio.items()))


@pytest.fixture
def client_for(tmp_path):
    """A TestClient on the random trio (pair `local`) with the given settings."""
    clients = []

    def make(trio: dict, **settings) -> TestClient:
        _config(tmp_path, trio)
        app = create_app(Settings(device="cpu", preload=False, data_dir=tmp_path / "data", **settings),
                         registry=PairRegistry.load(), cache=ModelCache())
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(client_for, trio_dirs):
    return client_for(trio_dirs)


def dla(client, **body):
    return client.post("/api/v1/analyses/dla?wait=true&timeout=60",
                       json={"pair": "local", "prompts": [IOI], "options": DLA_OPTIONS, **body})


def assert_422_naming(response, *path):
    assert response.status_code == 422, response.text
    ErrorBody.model_validate(response.json())  # the documented error shape
    locs = [issue["loc"] for issue in response.json()["detail"]]
    assert any(list(path) == [p for p in loc if p != "body"][: len(path)] for loc in locs), locs


# -- 1. request size ---------------------------------------------------------------------------
def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(client_for, trio_dirs):
    """A 100 MB prompt was read, parsed and tokenized (101 s, 16 GB) before the token limit answered."""
    client = client_for(trio_dirs, max_body_bytes=64 * 1024)
    big = json.dumps({"pair": "local", "prompts": ["x" * 100_000], "options": DLA_OPTIONS})
    r = client.post("/api/v1/analyses/dla", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "LNSCOPE_MAX_BODY_BYTES" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(200):
            yield b"x" * 1024

    r = client.post("/api/v1/tokenize", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_strings_are_capped_before_anything_is_tokenized(client):
    """A 10 MB target token or custom pair cost 8-14 s of tokenizing before being refused."""
    assert_422_naming(dla(client, prompts=["a" * 16_001]), "prompts", 0)
    long_token = {**DLA_OPTIONS, "target": {"kind": "logit", "token": " Mary" * 100}}
    assert_422_naming(dla(client, options=long_token), "options", "target", "token")
    pairs = [{"clean": IOI, "corrupt": IOI, "correct": " Mary" * 100, "wrong": " John"}]
    r = client.post("/api/v1/analyses/attribution-patching?wait=true",
                    json={"pair": "local", "task": {"name": "custom", "pairs": pairs}})
    assert_422_naming(r, "task", "pairs", 0, "correct")
    assert_422_naming(client.post("/api/v1/tokenize", json={"pair": "local", "text": "a" * 16_001}), "text")


# -- 5. cost estimates ---------------------------------------------------------------------------
def test_requests_that_would_run_for_hours_are_refused_with_their_cost(client):
    """Patching-fidelity on 64 prompts, every node type, groups of 1 ran ~4 h, holding all three models."""
    every_node = ["resid_pre", "head", "head_pos", "head_q", "head_k", "head_v", "head_q_pos", "head_k_pos",
                  "head_v_pos", "mlp", "neuron", "neuron_pos"]
    r = client.post("/api/v1/analyses/patching-fidelity", json={
        "pair": "tiny", "task": {"name": "ioi", "n_prompts": 64},
        "options": {"nodes": every_node, "group_size": 1, "chunk_size": 1}})
    assert r.status_code == 422, r.text
    message = r.json()["detail"][0]["msg"]
    assert "forward passes" in message and "100,000" in message and "LNSCOPE_MAX_FORWARD_PASSES" in message
    assert client.get("/api/v1/results").json()["total"] == 0  # refused up front: no job, no history row


def test_a_graph_over_the_memory_budget_is_refused():
    """A 128-token circuit with 20,000 feature nodes took 204 s and 10.6 GB."""
    from lnscope.analysis.kinds import Limits, RequestError
    from lnscope.analysis.pipeline import prepare_run
    from lnscope.analysis.requests import AnalysisRequest

    tiny = PairRegistry.load().get("tiny")
    prompt = " ".join(["Mary gave John a drink."] * 20)  # about 120 tokens
    request = AnalysisRequest(pair="tiny", prompts=[prompt], options={"max_feature_nodes": 20_000})
    with pytest.raises(RequestError) as err:
        prepare_run("circuit", request, tiny, Limits(max_graph_bytes=2**30))
    assert err.value.loc == ["body", "options", "max_feature_nodes"] and "MiB" in err.value.message
    small = AnalysisRequest(pair="tiny", prompts=[IOI], options={"max_feature_nodes": 200})
    assert prepare_run("circuit", small, tiny, Limits(max_graph_bytes=2**30)).cost.graph_bytes < 2**30


# -- 7. the result cache ------------------------------------------------------------------------
def test_weights_replaced_at_the_same_path_are_not_answered_from_the_cache(client_for, trio_dirs, tmp_path):
    """Weights replaced at the same path returned the old numbers as a cached result."""
    trio = {role: shutil.copytree(path, tmp_path / "trio" / role) for role, path in trio_dirs.items()}
    client = client_for(trio)
    first = dla(client, roles=["original"])
    assert first.status_code == 200, first.text
    weights = trio["original"] / "model.safetensors"
    shutil.copyfile(trio_dirs["control"] / "model.safetensors", weights)  # other weights, same path
    second = dla(client, roles=["original"])
    assert second.status_code == 200 and not second.json()["cached"]
    heads = [r.json()["result"]["roles"]["original"]["treatments"]["cached_scale"]["heads"] for r in (first, second)]
    assert heads[0] != heads[1]


# -- 8. the induction task -----------------------------------------------------------------------
def test_the_induction_task_runs_over_http(client):
    """TaskSpec always sent `split`, which the induction builder refuses (422 "has no parameter(s) split")."""
    r = client.post("/api/v1/analyses/ln-stats?wait=true&timeout=60",
                    json={"pair": "tiny", "roles": ["ln_free"], "task": {"name": "induction", "n_prompts": 2}})
    assert r.status_code == 200, r.text
    r = client.post("/api/v1/analyses/ln-stats", json={"pair": "tiny", "task": {"name": "induction",
                                                                                "split": "train"}})
    assert_422_naming(r, "task")
    assert "no split" in r.text


# -- 10. malformed values -------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [
    '{"pair": "local", "prompts": ["a"], "options": {"n_bootstrap": NaN}}',
    '{"pair": "local", "prompts": ["a"], "options": {"n_bootstrap": Infinity}}',
    '{"pair": "local", "prompts": ["a"], "seed": NaN}',
])
def test_nan_and_infinity_are_422(client, raw):
    """NaN / Infinity in the body made the 422 itself fail to render: 500."""
    r = client.post("/api/v1/analyses/dla", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("where", ["prompts", "target", "tokenize", "pairs"])
def test_lone_surrogates_are_422(client, where):
    """A lone surrogate ("\\ud800") in a prompt, target, tokenize text or pair gave 500."""
    bad = "When \ud800 Mary"
    if where == "tokenize":
        r = client.post("/api/v1/tokenize", content=json.dumps({"pair": "local", "text": bad}),
                        headers={"content-type": "application/json"})
    elif where == "pairs":
        body = {"pair": "local", "task": {"name": "custom", "pairs": [
            {"clean": bad, "corrupt": IOI, "correct": " Mary", "wrong": " John"}]}}
        r = client.post("/api/v1/analyses/attribution-patching", content=json.dumps(body),
                        headers={"content-type": "application/json"})
    else:
        options = {**DLA_OPTIONS, "target": {"kind": "logit", "token": "\ud800"}} if where == "target" else DLA_OPTIONS
        body = {"pair": "local", "prompts": [bad if where == "prompts" else IOI], "options": options}
        r = client.post("/api/v1/analyses/dla?wait=true", content=json.dumps(body),
                        headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


def test_a_seed_beyond_64_bits_is_422(client):
    """"seed": 2**70 with ?wait=true failed inside the job: 500 "Overflow when unpacking long long"."""
    assert_422_naming(dla(client, seed=2**70), "seed")
    r = client.post("/api/v1/analyses/ln-stats", json={"pair": "local", "task": {"name": "ioi", "seed": 2**70}})
    assert_422_naming(r, "task", "seed")


# -- 11. the token --------------------------------------------------------------------------------
def test_non_ascii_tokens_and_headers_are_compared_as_bytes(client_for, trio_dirs):
    """A non-ASCII Authorization header gave 500 on every protected route; so did a non-ASCII token."""
    client = client_for(trio_dirs, api_token="clé-secrète")

    def models(value: bytes) -> int:
        return client.get("/api/v1/models", headers=[(b"authorization", b"Bearer " + value)]).status_code

    assert models("clé-secrète".encode()) == 200  # the token's UTF-8 bytes
    assert models(b"wrong") == 401
    assert models("clé".encode("latin-1")) == 401  # a non-ASCII header that is not the token


# -- 14. the token covers the API docs ------------------------------------------------------------
def test_the_token_covers_the_docs_and_the_openapi_spec(client_for, trio_dirs):
    """/docs, /redoc and /api/v1/openapi.json answered without the token."""
    client = client_for(trio_dirs, api_token="s3cret")
    for path in ("/docs", "/redoc", "/api/v1/openapi.json"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"authorization": "Bearer s3cret"}).status_code == 200, path
        assert client.get(path, cookies={"lnscope_token": "s3cret"}).status_code == 200, path  # the web UI's cookie
    assert client.get("/").status_code == 200  # the static UI stays public; it asks for the token
    assert client.post("/api/v1/tokenize", json={"pair": "local", "text": "a"},
                       cookies={"lnscope_token": "s3cret"}).status_code == 401  # the cookie opens docs only


# -- 15. small ones ---------------------------------------------------------------------------------
def test_timestamps_carry_their_timezone(client):
    """Timestamps had no timezone, so the UI showed UTC as local time."""
    r = dla(client)
    job = client.get(f"/api/v1/jobs/{r.json()['id']}").json()
    for key in ("created_at", "started_at", "finished_at"):
        assert job[key].endswith(("Z", "+00:00")), job[key]
    assert JobInfo.model_validate(job).created_at.utcoffset().total_seconds() == 0


def test_models_show_paths_relative_to_the_models_directory(client_for, trio_dirs, monkeypatch):
    """/models and manifests exposed absolute model paths."""
    monkeypatch.setenv("LNSCOPE_MODELS_DIR", str(trio_dirs["original"].parent))
    client = client_for(trio_dirs)
    pairs = client.get("/api/v1/models").json()["pairs"]
    paths = [r["path"] for p in pairs if p["name"] == "local" for r in p["roles"]]
    assert paths and all(path.startswith("models/") for path in paths), paths
    r = dla(client)
    assert r.json()["manifest"]["roles"]["original"]["source"]["path"].startswith("models/")


def test_other_host_names_are_refused_by_default_on_loopback(monkeypatch, tmp_path, trio_dirs):
    """No Host-header check: a server without a token was open to DNS rebinding."""
    _config(tmp_path, trio_dirs)
    monkeypatch.setenv("LNSCOPE_DATA_DIR", str(tmp_path / "data"))
    settings = Settings.from_env(device="cpu", preload=False)
    assert settings.allowed_hosts and "localhost" in settings.allowed_hosts
    with TestClient(create_app(settings, registry=PairRegistry.load(), cache=ModelCache()),
                    base_url="http://127.0.0.1") as client:
        assert client.get("/api/v1/health").status_code == 200
        assert client.get("/api/v1/health", headers={"host": "evil.example"}).status_code == 400
    assert Settings.from_env(host="0.0.0.0").allowed_hosts is None  # bound on purpose: set LNSCOPE_ALLOWED_HOSTS


# -- 2. a pair that failed to load is remembered --------------------------------------------------
def test_a_pair_that_failed_to_load_is_answered_from_memory(monkeypatch, trio_dirs):
    """45 /tokenize calls naming an unreachable Hub pair took 23 s each: the failure was not remembered."""
    from lnscope.analysis import loading
    from lnscope.analysis.errors import ModelLoadError
    from lnscope.analysis.pairs import ModelSource, PairSpec

    calls = []

    def unreachable(pair):
        calls.append(pair.name)
        raise ModelLoadError("cannot reach the Hub")

    monkeypatch.setattr(loading, "_load_tokenizer", unreachable)
    monkeypatch.setattr(loading, "load_failures", loading.FailureMemory())
    pair = PairSpec(name="hub", original=ModelSource(hub_id="nobody/none"), ln_free=ModelSource(hub_id="nobody/x"))
    for _ in range(3):
        with pytest.raises(ModelLoadError, match="cannot reach"):
            loading.pair_tokenizer(pair)
    assert calls == ["hub"]


# -- 4 and 9. the database under the server -------------------------------------------------------
def test_a_deleted_database_is_reported_and_refuses_writes_with_503(client_for, trio_dirs, tmp_path):
    """After the database was deleted one result was accepted (200) and lost; /health said 200 throughout."""
    client = client_for(trio_dirs)
    state = client.app.state.lnscope
    assert client.get("/api/v1/health").status_code == 200
    (tmp_path / "data" / "lnscope.db").unlink()
    state.database = state.store.check()  # what the maintenance thread does every few seconds
    health = client.get("/api/v1/health")
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert "lnscope.db" in health.json()["database"]["message"]
    r = dla(client)
    assert r.status_code == 503 and "database" in r.json()["detail"] and "INSERT" not in r.text


def test_a_corrupt_database_stops_start_up_with_one_line(tmp_path, trio_dirs):
    """A corrupt or read-only database aborted start-up with a 120-line traceback."""
    import os
    import subprocess
    import sys

    _config(tmp_path, trio_dirs)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "lnscope.db").write_bytes(b"this is not a database" * 100)
    env = {**os.environ, "LNSCOPE_DATA_DIR": str(tmp_path / "data"), "LNSCOPE_PRELOAD": "false"}
    out = subprocess.run([sys.executable, "-m", "lnscope.analysis.cli", "serve", "--port", "1"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "lnscope.db" in errors[0], out.stderr


# -- 12. cancelling a job someone waits on ------------------------------------------------------------
def test_cancelling_a_waited_job_answers_409_cancelled(client_for, trio_dirs, monkeypatch):
    """The ?wait=true request of a cancelled job got a 500."""
    from concurrent.futures import ThreadPoolExecutor

    from lnscope.analysis.kinds import KINDS
    from tests.probe_kind import GATE, PROBE

    monkeypatch.setitem(KINDS, "probe", PROBE)
    GATE.clear()
    client = client_for(trio_dirs)
    body = {"pair": "local", "prompts": [IOI], "options": {"block": True, "stages": 50, "tag": "c"}}
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.post, "/api/v1/analyses/probe?wait=true&timeout=30", json=body)
            deadline = time.time() + 30
            while not (jobs := client.get("/api/v1/results", params={"status": "running"}).json()["items"]):
                assert time.time() < deadline
                time.sleep(0.1)
            client.delete(f"/api/v1/jobs/{jobs[0]['id']}")
            GATE.set()
            r = waiting.result(timeout=30)
        assert r.status_code == 409 and "cancelled" in r.json()["detail"]
    finally:
        GATE.set()


# -- 15. a full queue leaves no history ------------------------------------------------------------------
def test_a_full_queue_leaves_no_failed_history_row(client_for, trio_dirs, monkeypatch):
    """Every 503 queue-full rejection left a failed row in the history."""
    from lnscope.analysis.kinds import KINDS
    from tests.probe_kind import GATE, PROBE

    monkeypatch.setitem(KINDS, "probe", PROBE)
    GATE.clear()
    client = client_for(trio_dirs, workers=1, max_queue=1)
    try:
        codes = [client.post("/api/v1/analyses/probe", json={"pair": "local", "prompts": [IOI],
                                                             "options": {"block": True, "tag": f"q{i}"}}).status_code
                 for i in range(4)]
        assert 503 in codes, codes
        items = client.get("/api/v1/results").json()["items"]
        assert len(items) == codes.count(202) and not [r for r in items if r["status"] == "failed"]
    finally:
        GATE.set()
