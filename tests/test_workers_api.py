"""GET /api/v1/workers and queue positions with the local executor (the default)."""

from __future__ import annotations

import time

from lnscope.analysis.kinds import KINDS
from tests.probe_kind import GATE, PROBE
from tests.test_reliability import DLA_OPTIONS, IOI, client_for  # noqa: F401 (client_for is a fixture)


def test_a_trio_analysis_leaves_three_idle_workers(client_for, trio_dirs):  # noqa: F811
    client = client_for(trio_dirs)
    assert client.get("/api/v1/workers").json() == {"executor": "local", "workers": []}  # nothing loaded yet
    r = client.post("/api/v1/analyses/dla?wait=true&timeout=60",
                    json={"pair": "local", "prompts": [IOI], "options": DLA_OPTIONS})
    assert r.status_code == 200, r.text
    workers = client.get("/api/v1/workers").json()["workers"]
    assert sorted(w["role"] for w in workers) == ["control", "ln_free", "original"]
    for w in workers:
        assert w["pair"] == "local" and w["state"] == "idle" and w["jobs_done"] == 1 and w["queue_length"] == 0
        assert w["device"] == "cpu" and w["memory_bytes"] > 0 and w["node"]


def test_queued_jobs_report_their_position_per_model(client_for, trio_dirs, monkeypatch):  # noqa: F811
    monkeypatch.setitem(KINDS, "probe", PROBE)
    GATE.clear()
    client = client_for(trio_dirs, workers=3)
    try:
        ids = [client.post("/api/v1/analyses/probe", json={"pair": "local", "prompts": [IOI], "roles": ["original"],
                                                           "options": {"block": True, "tag": f"p{i}"}}).json()["id"]
               for i in range(3)]
        deadline = time.time() + 30
        while client.get(f"/api/v1/jobs/{ids[0]}").json()["status"] != "running":
            assert time.time() < deadline
            time.sleep(0.05)
        positions = [client.get(f"/api/v1/jobs/{i}").json()["queue_position"] for i in ids]
        assert positions == [None, 2, 3]  # one running on the model, then first come first served
        workers = {w["role"]: w for w in client.get("/api/v1/workers").json()["workers"]}
        assert workers["original"]["state"] == "busy" and workers["original"]["queue_length"] == 2
    finally:
        GATE.set()
