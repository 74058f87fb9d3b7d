"""The results store: owners and leases, atomic dedupe, light history pages, UTC timestamps, schema
upgrade of older databases, and a database deleted, corrupt or read-only under the server.

Each test's docstring says how the store before owners (one Store per database, `recover_unfinished`
failing every unfinished row) failed it.
"""

import datetime as dt
import os
import sqlite3
import subprocess
import sys
import threading

import pytest
from sqlalchemy import event, inspect, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex

from lnscope.server.storage import (
    ACTIVE_HASH_INDEX,
    INTERRUPTED,
    OwnerRow,
    ResultRow,
    Store,
    StoreUnavailable,
    open_store,
    utcnow,
)

UTC = dt.timezone.utc

# The schema the store created before owners existed (sqlite3 .schema of a database it made).
OLD_SCHEMA = """
CREATE TABLE results (
    id VARCHAR(36) NOT NULL, kind VARCHAR(64) NOT NULL, pair VARCHAR(128) NOT NULL,
    request_hash VARCHAR(64) NOT NULL, inputs JSON NOT NULL, manifest JSON, status VARCHAR(16) NOT NULL,
    stage VARCHAR(200) NOT NULL, progress FLOAT NOT NULL, error TEXT, error_kind VARCHAR(32),
    created_at DATETIME NOT NULL, started_at DATETIME, finished_at DATETIME, result TEXT, PRIMARY KEY (id)
);
CREATE INDEX ix_results_pair_kind_created ON results (pair, kind, created_at);
CREATE INDEX ix_results_request_hash ON results (request_hash);
CREATE INDEX ix_results_kind ON results (kind);
CREATE INDEX ix_results_status ON results (status);
CREATE INDEX ix_results_pair ON results (pair);
"""

# A server in another process: registers, starts a job, prints its id, finishes it when told.
OTHER_SERVER = """
import sys
from lnscope.server.storage import Store
store = Store(sys.argv[1])
row = store.create(kind="probe", pair="p", inputs={}, req_hash="other", manifest=None)
store.mark_running(row.id)
print(row.id, flush=True)
if sys.stdin.readline().strip() == "finish":
    print(store.finish(row.id, '{"ok": true}', None) is not None, flush=True)
"""


@pytest.fixture
def db(tmp_path):
    return tmp_path / "lnscope.db"


@pytest.fixture
def url(db):
    return f"sqlite:///{db}"


def new_job(store: Store, req_hash: str = "h", running: bool = False) -> ResultRow:
    row = store.create(kind="probe", pair="p", inputs={"x": 1}, req_hash=req_hash, manifest=None)
    if running:
        store.mark_running(row.id)
    return row


def as_remote(store: Store, observer: Store, heartbeat_age_s: float = 0.0) -> None:
    """Make `store`'s owner look like a server on another machine whose last heartbeat was that long ago."""
    with observer.session() as s, s.begin():
        heartbeat_at = utcnow() - dt.timedelta(seconds=heartbeat_age_s)
        s.execute(update(OwnerRow).where(OwnerRow.id == store.owner_id).values(
            host="elsewhere", pid_space="another-machine", heartbeat_at=heartbeat_at))


def start_other_server(url: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", OTHER_SERVER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    return proc, proc.stdout.readline().strip()


def one_line_without_sql(message: str) -> bool:
    return "\n" not in message and not any(w in message for w in ("SELECT", "INSERT", "UPDATE", "[SQL", "[parameters"))


# -- owners and leases ----------------------------------------------------------------------------
def test_a_second_server_leaves_a_live_servers_jobs_alone(url):
    """Before: the second server's start-up recovery failed the live server's running job, and that
    server's finish() then returned False, losing the result."""
    proc, job_id = start_other_server(url)
    try:
        second = Store(url)
        assert second.recover_unfinished() == 0 and second.recover_orphans() == 0
        assert second.get(job_id).status == "running"
        proc.stdin.write("finish\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "True"
    finally:
        proc.communicate(timeout=30)
    row = second.get(job_id)
    assert row.status == "done" and row.result == '{"ok": true}'


def test_a_killed_servers_jobs_are_recovered_at_once_on_the_same_machine(url):
    """Its process is gone (same pid namespace), so its fresh heartbeat does not keep its jobs for the lease."""
    proc, job_id = start_other_server(url)
    proc.kill()
    proc.communicate(timeout=30)
    second = Store(url)
    assert second.recover_orphans(lease_s=3600) == 1
    row = second.get(job_id)
    assert row.status == "failed" and row.error_kind == "interrupted" and row.error == INTERRUPTED


def test_a_remote_owner_keeps_its_jobs_while_its_lease_is_fresh_and_loses_them_after(url):
    """Before: recovery ignored owners; every queued and running row was failed at once."""
    first = Store(url)
    running, queued = new_job(first, "a", running=True), new_job(first, "b")
    second = Store(url)
    own = new_job(second, "c")
    as_remote(first, second, heartbeat_age_s=5)
    assert second.recover_orphans(lease_s=30) == 0
    assert {second.get(r.id).status for r in (running, queued)} == {"running", "queued"}
    as_remote(first, second, heartbeat_age_s=60)
    assert second.recover_orphans(lease_s=30) == 2
    assert all(second.get(r.id).error_kind == "interrupted" for r in (running, queued))
    assert second.get(own.id).status == "queued"  # never its own, however old its heartbeat
    assert not first.finish(running.id, "{}", None)  # a recovered job stays failed
    assert first.heartbeat()  # the reaped owner registers again
    with second.session() as s:
        assert s.get(OwnerRow, first.owner_id) is not None


def test_a_released_owners_jobs_are_orphans_at_once(url):
    """close() removes the owner row on a graceful shutdown: its unfinished jobs need no lease to expire."""
    first = Store(url)
    job = new_job(first, running=True)
    second = Store(url)
    as_remote(first, second)
    first.close()
    assert second.recover_orphans(lease_s=3600) == 1 and second.get(job.id).status == "failed"


def test_rows_get_their_owner_and_heartbeat_is_one_update(url):
    """Before: rows had no owner and there was no heartbeat."""
    store = Store(url)
    assert new_job(store).owner == store.owner_id
    with store.session() as s:
        before = s.get(OwnerRow, store.owner_id).heartbeat_at
    statements = []
    event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    assert store.heartbeat()
    assert len(statements) == 1 and statements[0].startswith("UPDATE owners")
    with store.session() as s:
        assert s.get(OwnerRow, store.owner_id).heartbeat_at > before


# -- dedupe ---------------------------------------------------------------------------------------
def test_identical_concurrent_requests_create_one_job(url):
    """Before: find_active then create is a check-then-insert race, and 40 concurrent identical requests
    created 2-3 rows (create_or_get_active did not exist)."""
    store = Store(url)
    barrier = threading.Barrier(40)
    results: list[tuple[str, bool]] = []

    def submit():
        barrier.wait()
        row, created = store.create_or_get_active(kind="probe", pair="p", inputs={}, req_hash="same", manifest=None)
        results.append((row.id, created))

    threads = [threading.Thread(target=submit) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 40
    assert sum(created for _, created in results) == 1 and len({i for i, _ in results}) == 1
    assert store.history(pair=None, kind=None, status="queued", limit=50, offset=0)[0] == 1


def test_a_finished_request_can_run_again(url):
    """The unique index covers active rows only: a done row does not block a new identical job."""
    store = Store(url)
    first, created = store.create_or_get_active(kind="probe", pair="p", inputs={}, req_hash="h", manifest=None)
    store.finish(first.id, "{}", None)
    second, created_again = store.create_or_get_active(kind="probe", pair="p", inputs={}, req_hash="h", manifest=None)
    assert created and created_again and second.id != first.id


def test_the_active_index_is_partial_on_postgresql():
    index = next(ix for ix in ResultRow.__table__.indexes if ix.name == ACTIVE_HASH_INDEX)
    ddl = str(CreateIndex(index).compile(dialect=postgresql.dialect()))
    assert "UNIQUE" in ddl and "WHERE status IN ('queued', 'running')" in ddl


# -- schema upgrade -------------------------------------------------------------------------------
def make_old_database(db) -> None:
    """A database as the store made it before owners, with a done row, a running row and two identical queued ones."""
    conn = sqlite3.connect(db)
    conn.executescript(OLD_SCHEMA)
    rows = [("done1", "d", "done", "2024-01-01 10:00:00.000000"),
            ("run1", "r", "running", "2024-01-01 10:01:00.000000"),
            ("dup-old", "q", "queued", "2024-01-01 10:02:00.000000"),
            ("dup-new", "q", "queued", "2024-01-01 10:03:00.000000")]
    conn.executemany("INSERT INTO results (id, kind, pair, request_hash, inputs, status, stage, progress, created_at) "
                     "VALUES (?, 'probe', 'p', ?, '{}', ?, 'queued', 0.0, ?)", rows)
    conn.commit()
    conn.close()


def test_a_database_from_before_owners_is_upgraded_in_place(db, url):
    """Before: nothing to upgrade; this store's queries name `results.owner`, which an old file lacks."""
    make_old_database(db)
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


# -- list queries ---------------------------------------------------------------------------------
def test_history_leaves_the_result_and_manifest_unloaded(url):
    """Before: history() selected every column, the megabytes of result JSON of each row included."""
    store = Store(url)
    for i in range(20):
        row = new_job(store, f"h{i}")
        store.finish(row.id, "x" * 1_000_000, {"pair": "p"})
    total, rows = store.history(pair=None, kind=None, status=None, limit=500, offset=0)
    assert total == 20 and len(rows) == 20
    for row in rows:
        unloaded = inspect(row).unloaded
        assert {"result", "manifest"} <= unloaded and "inputs" not in unloaded and row.inputs == {"x": 1}
    assert store.get(rows[0].id).result == "x" * 1_000_000


# -- timestamps -----------------------------------------------------------------------------------
def test_every_timestamp_leaves_the_store_in_utc(url):
    """Before: SQLite handed created_at, started_at and finished_at back naive (tzinfo None)."""
    store = Store(url)
    row = new_job(store, running=True)
    store.finish(row.id, "{}", None)
    stored = store.get(row.id)
    listed = store.history(pair=None, kind=None, status=None, limit=10, offset=0)[1][0]
    for r in (stored, listed):
        assert all(t.tzinfo == UTC for t in (r.created_at, r.started_at, r.finished_at))
    assert store.find_reusable("h").finished_at.tzinfo == UTC


# -- a database gone bad --------------------------------------------------------------------------
def test_a_deleted_database_file_refuses_writes(db, url):
    """Before: writes went on into the unlinked file (lost at the next start) and no check existed."""
    store = Store(url)
    new_job(store)
    for path in db.parent.glob(db.name + "*"):
        path.unlink()
    health = store.check()
    assert not health.writable and "deleted" in health.message and str(db) in health.message
    with pytest.raises(StoreUnavailable) as raised:
        new_job(store, "other")
    assert one_line_without_sql(str(raised.value))
    assert not store.heartbeat()


def test_a_garbage_file_is_one_line_at_start_up(db, url):
    """Before: Store(url) raised sqlalchemy's DatabaseError (two lines, a traceback), no lnscope error."""
    db.write_bytes(os.urandom(8192))
    with pytest.raises(StoreUnavailable) as raised:
        open_store(url)
    message = str(raised.value)
    assert str(db) in message and "not a database" in message and one_line_without_sql(message)


def test_a_corrupt_page_is_found_at_start_up(db, url):
    """Before: a database with a damaged page opened fine; open_store runs SQLite's quick_check."""
    store = Store(url)
    for i in range(50):
        store.finish(new_job(store, f"h{i}").id, "y" * 5000, None)
    store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(db, "r+b") as f:
        f.seek(4096 * 3)
        f.write(b"\xff" * 4096 * 4)
    with pytest.raises(StoreUnavailable) as raised:
        open_store(url)
    assert str(db) in str(raised.value) and one_line_without_sql(str(raised.value))


def test_a_read_only_database_is_refused_at_start_up(db, url):
    """chmod 0o444 does not stop root, so SQLite's own read-only mode stands in for a read-only file."""
    Store(url).close()
    with pytest.raises(StoreUnavailable) as raised:
        open_store(f"sqlite:///file:{db}?mode=ro&uri=true")
    assert str(db) in str(raised.value) and "readonly" in str(raised.value)


def test_a_database_turned_read_only_under_the_server_refuses_writes(url):
    """Before: an OperationalError whose message carried the SQL and its parameters reached the caller."""
    store = Store(url)
    job = new_job(store)
    event.listen(store.engine, "connect", lambda dbapi_conn, _: dbapi_conn.execute("PRAGMA query_only=ON"))
    store.engine.dispose()  # new connections: read-only
    health = store.check()
    assert not health.writable and "readonly" in health.message
    for write in (lambda: new_job(store, "other"), lambda: store.finish(job.id, "{}", None),
                  lambda: store.set_progress(job.id, "stage", 0.5), lambda: store.mark_running(job.id)):
        with pytest.raises(StoreUnavailable) as raised:
            write()
        assert one_line_without_sql(str(raised.value))
    assert store.get(job.id).status == "queued"  # reads still work


def test_open_store_on_a_healthy_database(url):
    store = open_store(url)
    assert store.check(deep=True).writable and new_job(store).status == "queued"
