"""The store on a real PostgreSQL server the tests start themselves (tests/pg_server.py): the backend-independent
storage tests of test_storage.py, PostgreSQL's own cases, and two API processes sharing one database.
"""

import os
import threading
import time

import httpx
import pytest
from sqlalchemy import inspect, text

from lnscope.server.storage import ACTIVE_HASH_INDEX, Store, StoreUnavailable, open_store
from tests import pg_server
from tests.test_server_process import ROOT, start
from tests.test_server_process import free_port as free_http_port
from tests.test_storage import (
    new_job,
    test_a_finished_request_can_run_again,
    test_a_killed_servers_jobs_are_recovered_at_once_on_the_same_machine,
    test_a_released_owners_jobs_are_orphans_at_once,
    test_a_remote_owner_keeps_its_jobs_while_its_lease_is_fresh_and_loses_them_after,
    test_a_second_server_leaves_a_live_servers_jobs_alone,
    test_every_timestamp_leaves_the_store_in_utc,
    test_history_leaves_the_result_and_manifest_unloaded,
    test_identical_concurrent_requests_create_one_job,
    test_open_store_on_a_healthy_database,
    test_rows_get_their_owner_and_heartbeat_is_one_update,
)

# The tests of test_storage.py that run here too, on the `url` fixture below (a fresh PostgreSQL database).
# Left out: the SQLite-file ones (deleted, garbage, corrupt page, read-only file), restated below where they apply.
FROM_THE_SQLITE_SUITE = (
    test_a_second_server_leaves_a_live_servers_jobs_alone,
    test_a_killed_servers_jobs_are_recovered_at_once_on_the_same_machine,
    test_a_remote_owner_keeps_its_jobs_while_its_lease_is_fresh_and_loses_them_after,
    test_a_released_owners_jobs_are_orphans_at_once,
    test_rows_get_their_owner_and_heartbeat_is_one_update,
    test_identical_concurrent_requests_create_one_job,
    test_a_finished_request_can_run_again,
    test_history_leaves_the_result_and_manifest_unloaded,
    test_every_timestamp_leaves_the_store_in_utc,
    test_open_store_on_a_healthy_database,
)

# The schema the store created on PostgreSQL before owners (DateTime(timezone=True) as TIMESTAMPTZ).
OLD_SCHEMA = """
CREATE TABLE results (
    id VARCHAR(36) NOT NULL, kind VARCHAR(64) NOT NULL, pair VARCHAR(128) NOT NULL,
    request_hash VARCHAR(64) NOT NULL, inputs JSON NOT NULL, manifest JSON, status VARCHAR(16) NOT NULL,
    stage VARCHAR(200) NOT NULL, progress FLOAT NOT NULL, error TEXT, error_kind VARCHAR(32),
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, started_at TIMESTAMP WITH TIME ZONE,
    finished_at TIMESTAMP WITH TIME ZONE, result TEXT, PRIMARY KEY (id)
);
CREATE INDEX ix_results_pair_kind_created ON results (pair, kind, created_at);
CREATE INDEX ix_results_request_hash ON results (request_hash);
CREATE INDEX ix_results_kind ON results (kind);
CREATE INDEX ix_results_status ON results (status);
CREATE INDEX ix_results_pair ON results (pair);
INSERT INTO results (id, kind, pair, request_hash, inputs, status, stage, progress, created_at) VALUES
    ('done1', 'probe', 'p', 'd', '{}', 'done', 'queued', 0.0, '2024-01-01 10:00:00+00'),
    ('run1', 'probe', 'p', 'r', '{}', 'running', 'queued', 0.0, '2024-01-01 10:01:00+00'),
    ('dup-old', 'probe', 'p', 'q', '{}', 'queued', 'queued', 0.0, '2024-01-01 10:02:00+00'),
    ('dup-new', 'probe', 'p', 'q', '{}', 'queued', 'queued', 0.0, '2024-01-01 10:03:00+00');
"""


def one_line_without_sql(message: str) -> bool:
    """test_storage's check, less the keywords: PostgreSQL's own reasons name them ("cannot execute UPDATE in ...")."""
    return "\n" not in message and not any(w in message for w in ("[SQL", "[parameters", "%(", "SET status", "FROM "))


@pytest.fixture(scope="session")
def pg(request):
    """One PostgreSQL server for the session, stopped and removed by a finalizer whatever happens."""
    if pg_server.binaries() is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on PATH: install postgresql to run these tests")
    server = pg_server.start_server()
    request.addfinalizer(server.stop)
    return server


@pytest.fixture
def database(pg):
    """A fresh empty database, dropped after the test."""
    name = pg.create_database()
    yield name
    pg.drop_database(name)


@pytest.fixture
def url(pg, database):
    return pg.url(database)


# -- PostgreSQL's own cases ---------------------------------------------------------------------
def test_the_active_index_is_a_unique_partial_index_in_the_database(url):
    """The dedupe index as PostgreSQL built it: unique, on request_hash, over queued and running rows only."""
    store = Store(url)
    index = next(ix for ix in inspect(store.engine).get_indexes("results") if ix["name"] == ACTIVE_HASH_INDEX)
    assert index["unique"] and index["column_names"] == ["request_hash"]
    with store.engine.connect() as conn:
        ddl = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"),
                           {"n": ACTIVE_HASH_INDEX}).scalar_one()
    assert ddl.startswith("CREATE UNIQUE INDEX") and "WHERE" in ddl and "'queued'" in ddl and "'running'" in ddl
    store.close()


def test_a_database_from_before_owners_is_upgraded_in_place(pg, database, url):
    """test_storage's upgrade test with the old schema as the store made it on PostgreSQL."""
    pg.execute(database, OLD_SCHEMA)
    store = Store(url)
    columns = {c["name"] for c in inspect(store.engine).get_columns("results")}
    indexes = {ix["name"] for ix in inspect(store.engine).get_indexes("results")}
    assert "owner" in columns and {ACTIVE_HASH_INDEX, "ix_results_owner"} <= indexes
    assert inspect(store.engine).has_table("owners")
    assert store.get("dup-old").error_kind == "duplicate" and store.get("dup-new").status == "queued"
    assert store.recover_orphans() == 2  # rows without an owner are orphans
    assert store.get("done1").status == "done" and store.get("run1").error_kind == "interrupted"
    again = Store(url)  # idempotent
    assert again.get("run1").status == "failed" and again.create_or_get_active(
        kind="probe", pair="p", inputs={}, req_hash="q", manifest=None)[1]


def test_two_stores_upgrading_one_database_at_once_both_start(url):
    """Four servers starting together on an empty database: without the schema lock CREATE TABLE collides."""
    barrier, stores, errors = threading.Barrier(4), [], []

    def open_one():
        barrier.wait()
        try:
            stores.append(Store(url))
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(repr(exc))

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(stores) == 4


def test_an_unreachable_database_is_one_line_without_the_password(pg):
    url = pg.url("no_such_database").replace(f"{pg_server.USER}@", f"{pg_server.USER}:s3cret@")
    with pytest.raises(StoreUnavailable) as raised:
        open_store(url)
    message = str(raised.value)
    assert "no_such_database" in message and "s3cret" not in message and one_line_without_sql(message)


def test_a_database_turned_read_only_under_the_server_refuses_writes(pg, database, url):
    """test_storage's read-only case with PostgreSQL's read-only transactions for new connections."""
    store = Store(url)
    job = new_job(store)
    pg.execute(database, f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    store.engine.dispose()  # new connections: read-only
    health = store.check()
    assert not health.writable and "read-only" in health.message
    for write in (lambda: new_job(store, "other"), lambda: store.finish(job.id, "{}", None),
                  lambda: store.set_progress(job.id, "stage", 0.5), lambda: store.mark_running(job.id)):
        with pytest.raises(StoreUnavailable) as raised:
            write()
        assert one_line_without_sql(str(raised.value))
    assert store.get(job.id).status == "queued"  # reads still work
    assert not store.heartbeat()
    store.engine.dispose()


# -- two API processes sharing one database ------------------------------------------------------
@pytest.fixture
def api_env(url, trio_dirs, tmp_path):
    """The environment of test_server_process's servers, with the results in the PostgreSQL database."""
    config = tmp_path / "lnscope.toml"
    config.write_text(
        'default_pair = "local"\n[pairs.local]\n'
        f'original = {{ path = "{trio_dirs["original"]}" }}\n'
        f'ln_free = {{ path = "{trio_dirs["ln_free"]}" }}\n'
    )
    return {**os.environ, "LNSCOPE_CONFIG": str(config), "LNSCOPE_DATA_DIR": str(tmp_path / "data"),
            "LNSCOPE_DEVICE": "cpu", "LNSCOPE_PRELOAD": "false", "PYTHONPATH": str(ROOT), "LNSCOPE_DATABASE_URL": url}


def start_both(environ: dict) -> list[tuple[object, str]]:
    """Start two servers at once; [(process, base URL)], the started ones stopped when one fails."""
    ports, servers, errors = [free_http_port(), free_http_port()], {}, []

    def start_one(port):
        try:
            servers[port] = start(environ, port)
        except Exception as exc:  # noqa: BLE001 (raised below)
            errors.append(exc)

    threads = [threading.Thread(target=start_one, args=(p,)) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors or len(servers) != 2:
        stop_all(list(servers.values()))
        raise errors[0] if errors else AssertionError("a server did not start")
    return [(servers[p], f"http://127.0.0.1:{p}/api/v1") for p in ports]


def stop_all(procs) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except Exception:  # noqa: BLE001 (a server that ignores SIGTERM)
            proc.kill()
            proc.wait(timeout=10)


def submit_at_once(requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    """POST every (url, body) from its own thread, released together by a barrier."""
    barrier, answers = threading.Barrier(len(requests)), [None] * len(requests)

    def post(i, url, body):
        barrier.wait()
        answers[i] = httpx.post(url, json=body, timeout=60)

    threads = [threading.Thread(target=post, args=(i, u, b)) for i, (u, b) in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return answers


def wait_finished(base: str, job_id: str, timeout_s: float = 60) -> dict:
    deadline = time.time() + timeout_s
    while (job := httpx.get(f"{base}/jobs/{job_id}", timeout=10).json())["status"] in ("queued", "running"):
        assert time.time() < deadline, job
        time.sleep(0.1)
    return job


def test_two_api_processes_share_one_database(api_env):
    """Identical requests split across two servers make one job; both list the same history in the same order."""
    servers = start_both(api_env)
    (_, a), (_, b) = servers
    body = {"pair": "local", "prompts": ["When Mary and John went to the store"]}
    try:
        same = {**body, "options": {"tag": "same", "stages": 10, "sleep_s": 0.05}}
        answers = submit_at_once([(f"{(a, b)[i % 2]}/analyses/probe", same) for i in range(20)])
        assert all(r is not None and r.status_code in (200, 202) for r in answers), [r and r.text for r in answers]
        ids = {r.json()["id"] for r in answers}
        assert len(ids) == 1
        assert wait_finished(a, ids.pop())["status"] == "done"
        for base, tag in ((a, "a"), (b, "b")):
            done = httpx.post(f"{base}/analyses/probe?wait=true&timeout=60", json={**body, "options": {"tag": tag}},
                              timeout=90)
            assert done.status_code == 200, done.text
        pages = [httpx.get(f"{base}/results", params={"pair": "local"}, timeout=10).json() for base in (a, b)]
        rows = [[(item["id"], item["status"]) for item in page["items"]] for page in pages]
        assert pages[0]["total"] == pages[1]["total"] == 3 and rows[0] == rows[1]
        assert {status for _, status in rows[0]} == {"done"}
    finally:
        stop_all([proc for proc, _ in servers])
