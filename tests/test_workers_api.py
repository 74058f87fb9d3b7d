"""GET /api/v1/workers and queue positions with the local executor (the default)."""

from __future__ import annotations

import time

import pytest

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
        while "probe stage" not in client.get(f"/api/v1/jobs/{ids[0]}").json()["stage"]:  # loaded and running
            assert time.time() < deadline
            time.sleep(0.05)
        positions = [client.get(f"/api/v1/jobs/{i}").json()["queue_position"] for i in ids]
        assert positions == [None, 2, 3]  # one running on the model, then first come first served
        workers = {w["role"]: w for w in client.get("/api/v1/workers").json()["workers"]}
        assert workers["original"]["state"] == "busy" and workers["original"]["queue_length"] == 2
    finally:
        GATE.set()


def test_the_local_executor_places_each_role_on_its_configured_device(tmp_path, trio_dirs, monkeypatch):
    """lnscope.toml's [workers.<role>] device reaches the server's model loading (cuda:N is refused on a CPU
    machine with a message naming the device; the other roles stay on the server's device)."""
    from lnscope.analysis.errors import ConfigError
    from lnscope.analysis.loading import ModelCache
    from lnscope.analysis.pairs import PairRegistry
    from lnscope.server.settings import Settings
    from lnscope.server.state import ServerState

    (tmp_path / "lnscope.toml").write_text(
        'default_pair = "local"\n[pairs.local]\n' + "".join(f'{r} = {{ path = "{p}" }}\n' for r, p in trio_dirs.items())
        + '[workers.ln_free]\ndevice = "cpu"\n[workers.control]\ndevice = "cuda:7"\n')
    monkeypatch.chdir(tmp_path)
    state = ServerState(Settings(device="cpu", preload=False, data_dir=tmp_path / "data"),
                        registry=PairRegistry.load(), cache=ModelCache())
    pair = state.registry.get("local")
    assert str(state.role_device(pair, "original")) == "cpu" and str(state.role_device(pair, "ln_free")) == "cpu"
    with pytest.raises(ConfigError, match="cuda:7"):
        state.role_device(pair, "control")
    state.store.close()
