"""What the inline request path does to go fast stays correct (issue 23): the response built around the stored
result text, progress writes throttled, the weights' part of the cache key reused while the files are unchanged.
Timings belong in bench/api.py; nothing here asserts one."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from lnscope.analysis.pairs import ModelSource
from lnscope.analysis.pipeline import prepare_run, run_prepared
from lnscope.analysis.progress import Cancelled, Progress
from lnscope.server import app as app_module
from lnscope.server.app import ThrottledProgress, _manifest_key, _role_key, _stored_result
from lnscope.server.schemas import AnalysisRequest, ResultOut
from tests.probe_kind import GATE, PROBE
from tests.test_reliability import client_for  # noqa: F401 (a fixture)

IOI = "When Mary and John went to the store, John gave a drink to"
DLA = {"pair": "local", "prompts": [IOI, "When Tom and Anna went to the park, Anna gave a ball to"], "seed": 3,
       "options": {"target": {"kind": "logit_diff", "token": " Mary", "other": " John"}, "n_bootstrap": 20}}


@pytest.fixture
def probe_kind(monkeypatch):
    from lnscope.analysis.kinds import KINDS

    monkeypatch.setitem(KINDS, "probe", PROBE)
    GATE.clear()
    yield
    GATE.set()


def _state(client: TestClient):
    return client.app.state.lnscope


def _wait_finished(client: TestClient, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.get(f"/api/v1/jobs/{job_id}").json()
        if info["status"] in ("done", "failed", "cancelled"):
            return info
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish: {info}")


# -- the response ------------------------------------------------------------------------------
def test_inline_response_equals_the_stored_result_and_the_library_call(client_for, trio_dirs):
    client = client_for(trio_dirs)
    r = client.post("/api/v1/analyses/dla?wait=true&timeout=120", json=DLA)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    out = ResultOut.model_validate_json(r.content).model_dump(mode="json")  # the documented shape
    assert out == r.json() and out["status"] == "done" and not out["cached"]
    assert list(r.json()) == list(ResultOut.model_fields)

    again = client.get(f"/api/v1/results/{out['id']}")
    assert again.status_code == 200 and again.json() == out and again.content == r.content
    cached = client.post("/api/v1/analyses/dla?wait=true", json=DLA).json()
    assert cached == {**out, "cached": True}

    state = _state(client)  # the library call on the server's own (already loaded) models
    spec = state.registry.get("local")
    run = prepare_run("dla", AnalysisRequest(**DLA), spec, state.limits)
    library = run_prepared(run, {role: state.load_role(spec, role) for role in run.roles}).model_dump(mode="json")
    assert out["manifest"] == library.pop("manifest")
    assert out["result"] == library


def test_an_inline_answer_is_the_row_the_job_wrote_without_reading_it_back(client_for, trio_dirs, monkeypatch):
    client = client_for(trio_dirs)
    store = _state(client).store
    reads: list[str] = []
    real_get = store.get
    monkeypatch.setattr(store, "get", lambda result_id: reads.append(result_id) or real_get(result_id))
    r = client.post("/api/v1/analyses/dla?wait=true&timeout=120", json={**DLA, "seed": 11})
    assert r.status_code == 200, r.text
    assert reads == []  # the finish statement returned the row
    stored = client.get(f"/api/v1/results/{r.json()['id']}")
    assert stored.content == r.content  # timings and all, as stored


def test_finish_returns_the_finished_row_and_never_overwrites(tmp_path):
    from lnscope.server.storage import Store

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    row = store.create(kind="probe", pair="p", inputs={}, req_hash="h", manifest=None)
    store.mark_running(row.id)
    done = store.finish(row.id, '{"x": 1}', {"pair": "p"})
    assert done.status == "done" and done.result == '{"x": 1}' and done.manifest == {"pair": "p"}
    assert done.timings() == store.get(row.id).timings() and done.finished_at.tzinfo is not None
    assert store.finish(row.id, '{"x": 2}', None) is None and store.get(row.id).result == '{"x": 1}'


def test_stored_text_with_nan_or_non_objects_is_served_as_before(client_for, trio_dirs):
    """Rows written by json.dumps may hold NaN / Infinity: the body stays JSON, with null for them."""
    client = client_for(trio_dirs)
    store = _state(client).store
    ids = {}
    for name, text in {"nan": '{"x": NaN, "y": [1.5, Infinity, -Infinity], "s": "ok"}', "empty": "",
                       "plain": '{"a": {"b": [1, 2.5, "\\u00e9"]}, "c": null}'}.items():
        row = store.create(kind="dla", pair="local", inputs={"prompts": ["a"]}, req_hash=f"h-{name}", manifest=None)
        store.mark_running(row.id)
        store.finish(row.id, text, {"pair": "local"})
        ids[name] = row.id
    nan = client.get(f"/api/v1/results/{ids['nan']}")
    assert nan.status_code == 200 and b"NaN" not in nan.content and b"Infinity" not in nan.content
    assert nan.json()["result"] == {"x": None, "y": [1.5, None, None], "s": "ok"}
    assert client.get(f"/api/v1/results/{ids['empty']}").json()["result"] is None
    plain = client.get(f"/api/v1/results/{ids['plain']}").json()
    assert plain["result"] == {"a": {"b": [1, 2.5, "é"]}, "c": None} and plain["manifest"] == {"pair": "local"}


class _Inner(BaseModel):
    values: list[float]
    label: str


class _Result(BaseModel):
    manifest: dict
    inner: dict[str, _Inner]
    score: float


def test_stored_result_is_what_the_api_answered_before():
    """pydantic's JSON for the result (manifest apart) parses to what model_dump + json.dumps + the API gave."""
    result = _Result(manifest={"pair": "p", "roles": {"a": 1}}, score=0.1 + 0.2,
                     inner={"é": _Inner(values=[1e-5, 1e16, float("nan"), float("inf"), 2.0], label="ü\n\"q\"")})
    text, manifest = _stored_result(result)
    old = result.model_dump(mode="json")
    assert manifest == old.pop("manifest")

    def finite(value):  # the API always sent NaN / Infinity as null
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return [finite(v) for v in value] if isinstance(value, list) else value

    assert json.loads(text) == finite(json.loads(json.dumps(old)))
    assert "NaN" not in text and "Infinity" not in text


# -- progress ----------------------------------------------------------------------------------
class _Recorder:
    def __init__(self, cancel: bool = False) -> None:
        self.writes: list[tuple[str, float]] = []
        self.cancel = cancel
        self.progress = Progress(lambda s, f: self.writes.append((s, f)), lambda: self.cancel)


def test_throttled_progress_holds_reports_and_writes_the_newest():
    inner = _Recorder()
    progress = ThrottledProgress(inner.progress, interval=3600)
    for i in range(20):
        progress.stage(f"stage {i}", i / 20)
    assert inner.writes == []  # all within the interval: held
    progress.close(flush=True)  # a failing job keeps its last stage
    assert inner.writes == [("stage 19", 0.95)]
    progress.stage("after close", 1.0)
    progress.flush()
    assert inner.writes == [("stage 19", 0.95)]

    quiet = _Recorder()
    done = ThrottledProgress(quiet.progress, interval=3600)
    done.stage("held", 0.5)
    done.close(flush=False)  # a job that succeeds: the row's stage becomes "done" with the result
    assert quiet.writes == []


def test_a_held_report_is_written_when_the_interval_is_over_without_another_report():
    inner = _Recorder()
    progress = ThrottledProgress(inner.progress, interval=0.05)
    progress.stage("first", 0.1)
    progress.stage("second", 0.2)  # replaces "first" while it is held
    deadline = time.monotonic() + 10
    while not inner.writes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert inner.writes == [("second", 0.2)]
    time.sleep(0.1)
    progress.stage("third", 0.3)  # the interval is over: written at once by the job's thread
    assert inner.writes[-1] == ("third", 0.3)
    progress.close(flush=True)


def test_throttled_progress_still_stops_at_every_stage_boundary():
    inner = _Recorder(cancel=True)
    progress = ThrottledProgress(inner.progress, interval=3600)
    with pytest.raises(Cancelled):
        progress.stage("one", 0.1)
    with pytest.raises(Cancelled):
        progress.span("original: ", 0, 0.5).stage("two", 0.5)
    progress.close(flush=True)  # the flush does not raise: the job already stopped
    assert inner.writes == [("original: two", 0.25)]


def test_a_slow_job_shows_its_stages_and_ends_done(probe_kind, client_for, trio_dirs):
    client = client_for(trio_dirs)
    job = client.post("/api/v1/analyses/probe",
                      json={"pair": "local", "prompts": [IOI], "options": {"stages": 4, "sleep_s": 0.35}}).json()
    seen, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        info = client.get(f"/api/v1/jobs/{job['id']}").json()
        if info["status"] == "running" and (not seen or seen[-1] != (info["stage"], info["progress"])):
            seen.append((info["stage"], info["progress"]))
        if info["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert info["status"] == "done" and info["stage"] == "done" and info["progress"] == 1.0
    stages = {stage for stage, _ in seen if "probe stage" in stage}
    assert len(stages) >= 2, seen  # intermediate stages of a 4 s job are visible while it runs
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and all(0 <= f < 1 for f in fractions)


def test_a_failed_job_keeps_the_last_stage_it_reported(probe_kind, client_for, trio_dirs):
    client = client_for(trio_dirs)
    r = client.post("/api/v1/analyses/probe?wait=true",
                    json={"pair": "local", "prompts": [IOI], "options": {"stages": 3, "sleep_s": 0, "fail": "bug"}})
    assert r.status_code == 500
    job = client.get("/api/v1/results", params={"kind": "probe"}).json()["items"][0]
    info = _wait_finished(client, job["id"])
    assert info["status"] == "failed" and info["stage"].endswith("probe stage 2"), info


def test_a_short_job_writes_no_progress_rows(probe_kind, client_for, trio_dirs, monkeypatch):
    client = client_for(trio_dirs)
    monkeypatch.setattr(app_module, "PROGRESS_WRITE_S", 3600.0)
    store, writes = _state(client).store, []
    real = store.set_progress
    monkeypatch.setattr(store, "set_progress", lambda *a: (writes.append(a), real(*a))[1])
    r = client.post("/api/v1/analyses/probe?wait=true",
                    json={"pair": "local", "prompts": [IOI], "options": {"stages": 5, "sleep_s": 0}})
    assert r.status_code == 200 and r.json()["status"] == "done"
    assert writes == []  # 16 reports, none written: the row went from running to done


# -- the weights' part of the cache key ------------------------------------------------------------
def _copy(trio_dirs, tmp_path) -> dict:
    return {role: shutil.copytree(path, tmp_path / "trio" / role) for role, path in trio_dirs.items()}


def test_role_key_is_the_fingerprint_and_is_reused_while_the_files_are_unchanged(trio_dirs, tmp_path, monkeypatch):
    directory = _copy(trio_dirs, tmp_path)["original"]
    source = ModelSource(path=directory)
    calls = []
    real = ModelSource.fingerprint
    monkeypatch.setattr(ModelSource, "fingerprint", lambda self: (calls.append(self), real(self))[1])
    first = _role_key(source)
    assert first == {**source.to_json(), "weights": real(source)} and len(calls) == 1
    assert _role_key(source) == first and len(calls) == 1  # unchanged files: reused

    weights = directory / "model.safetensors"
    stat = weights.stat()
    shutil.copyfile(trio_dirs["control"] / "model.safetensors", weights)  # other weights, same path and size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # even within one clock tick
    changed = _role_key(source)
    assert changed["weights"] != first["weights"] and changed["weights"] == real(source) and len(calls) == 2

    (directory / "extra.bin").write_bytes(b"x")  # a new file changes the fingerprint too
    assert _role_key(source)["weights"] == real(source) != changed["weights"]

    monkeypatch.setattr(app_module, "WEIGHTS_KEY_TTL_S", 0.0)  # an old entry is computed again
    before = len(calls)
    _role_key(source)
    assert len(calls) == before + 1


def test_role_key_of_hub_and_missing_sources():
    hub = ModelSource(hub_id="someone/model", revision="abc")
    assert _role_key(hub) == {**hub.to_json(), "weights": "someone/model@abc"}
    missing = ModelSource(path=__import__("pathlib").Path("/nonexistent/lnscope/weights"))
    assert _role_key(missing) == {**missing.to_json(), "weights": missing.fingerprint()}


def test_manifest_key_roles_are_copies(client_for, trio_dirs):
    client = client_for(trio_dirs)
    state = _state(client)
    spec = state.registry.get("local")
    key = _manifest_key(state, spec, ["original"])
    key["roles"]["original"]["weights"] = "changed"
    assert _manifest_key(state, spec, ["original"])["roles"]["original"]["weights"] != "changed"


def test_replaced_weights_are_not_answered_from_the_cache(client_for, trio_dirs, tmp_path):
    trio = _copy(trio_dirs, tmp_path)
    client = client_for(trio)
    body = {**DLA, "roles": ["original"]}
    first = client.post("/api/v1/analyses/dla?wait=true&timeout=120", json=body)
    assert first.status_code == 200, first.text
    assert client.post("/api/v1/analyses/dla?wait=true", json=body).json()["cached"]
    shutil.copyfile(trio_dirs["control"] / "model.safetensors", trio["original"] / "model.safetensors")
    second = client.post("/api/v1/analyses/dla?wait=true&timeout=120", json=body)
    assert second.status_code == 200 and not second.json()["cached"]
    assert second.json()["id"] != first.json()["id"]
    assert second.json()["result"] != first.json()["result"]


def test_concurrent_role_keys_agree(trio_dirs):
    source = ModelSource(path=trio_dirs["ln_free"])
    out: list[dict] = []
    threads = [threading.Thread(target=lambda: out.extend(_role_key(source) for _ in range(20))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 80 and all(entry == out[0] for entry in out)
