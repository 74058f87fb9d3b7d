"""JobManager on its own: workers that survive the store failing, async waiters, shutdown, the memory budget."""

import asyncio
import sqlite3
import threading
import time
import uuid

import pytest
from sqlalchemy.exc import OperationalError

from lnscope.server.jobs import Job, JobManager, QueueFull, TooManyWaiters
from lnscope.server.storage import Store


def locked(statement: str = "UPDATE results SET status=? WHERE results.id = ?") -> OperationalError:
    """The error SQLAlchemy raises when SQLite stays locked, its statement and parameters in the message."""
    return OperationalError(statement, ("running", "abc"), sqlite3.OperationalError("database is locked"))


class FlakyStore:
    """A real Store whose chosen methods raise `locked()` for their next `n` calls (n < 0: always)."""

    def __init__(self, store: Store, **failures: int) -> None:
        self.store = store
        self.failures = failures

    def __getattr__(self, name):
        method = getattr(self.store, name)
        if name not in self.failures:
            return method

        def flaky(*args, **kwargs):
            if self.failures[name] != 0:
                self.failures[name] -= 1
                raise locked()
            return method(*args, **kwargs)

        return flaky


@pytest.fixture
def store(tmp_path):
    return Store(f"sqlite:///{tmp_path / 'db.sqlite'}")


@pytest.fixture
def managers():
    """Build started JobManagers; every one is stopped at the end of the test."""
    made = []

    def make(store, **kwargs) -> JobManager:
        jobs = JobManager(store, **kwargs)
        jobs.start()
        made.append(jobs)
        return jobs

    yield make
    for jobs in made:
        jobs.stop(timeout=1)


def submit(jobs: JobManager, store: Store, run, key: str = "m", **job_args) -> str:
    """Create a row and queue a job for it; its id."""
    row = store.create(kind="probe", pair="p", inputs={}, req_hash=uuid.uuid4().hex, manifest=None)
    jobs.submit(Job(id=row.id, kind="probe", model_keys=[key], run=run, timeout_s=60, **job_args))
    return row.id


def done(progress):
    return "{}", None


def blocked(gate: threading.Event, started: threading.Event | None = None):
    """A job's run that waits for `gate`."""

    def run(progress):
        if started is not None:
            started.set()
        assert gate.wait(10)
        return "{}", None

    return run


def spinning(started: threading.Event):
    """A job's run that reports stages until it is stopped."""

    def run(progress):
        started.set()
        for _ in range(1000):
            progress.stage("spin", 0.5)
            time.sleep(0.01)
        return "{}", None

    return run


# -- workers survive the store failing -----------------------------------------------------------
def test_a_store_write_that_keeps_failing_leaves_the_worker_serving(store, managers):
    flaky = FlakyStore(store, mark_running=1 + 3)  # the first job's write and its three retries
    jobs = managers(flaky, workers=1)
    first = submit(jobs, store, done)
    assert jobs.wait(first, 10)
    assert store.get(first).status == "queued"  # left for the next start-up's recovery
    second = submit(jobs, store, done)
    assert jobs.wait(second, 10) and store.get(second).status == "done"
    health = jobs.alive()
    assert health["workers_alive"] == health["workers_expected"] == 1


def test_a_store_write_that_fails_for_a_moment_is_retried(store, managers):
    jobs = managers(FlakyStore(store, finish=2), workers=1)
    job_id = submit(jobs, store, done)
    assert jobs.wait(job_id, 10)
    assert store.get(job_id).status == "done"


def test_a_progress_write_that_fails_does_not_stop_the_job(store, managers):
    jobs = managers(FlakyStore(store, set_progress=-1), workers=1)

    def run(progress):
        progress.stage("one", 0.5)
        return "{}", None

    job_id = submit(jobs, store, run)
    assert jobs.wait(job_id, 10)
    assert store.get(job_id).status == "done"


def store_unavailable() -> Exception:
    """storage.StoreUnavailable (an LnscopeError) where storage defines it."""
    from lnscope.server import storage

    if not hasattr(storage, "StoreUnavailable"):
        pytest.skip("storage has no StoreUnavailable")
    return storage.StoreUnavailable("the results database is unusable: UPDATE results SET [parameters: x]")


@pytest.mark.parametrize("error", [lambda: locked("INSERT INTO results (id, kind) VALUES (?, ?)"), store_unavailable])
def test_a_database_error_in_a_job_is_stored_without_its_sql(store, managers, error):
    jobs = managers(store, workers=1)
    exc = error()

    def run(progress):
        raise exc

    job_id = submit(jobs, store, run)
    assert jobs.wait(job_id, 10)
    row = store.get(job_id)
    assert row.status == "failed" and row.error == "the results database failed: try again later"
    assert not any(word in row.error for word in ("INSERT", "UPDATE", "SELECT", "[parameters", "[SQL"))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_that_dies_anyway_is_restarted(store, managers):
    jobs = managers(store, workers=1)

    def die(progress):
        raise SystemExit("a worker killed by something no handler catches")

    dying = submit(jobs, store, die)
    assert jobs.wait(dying, 10)
    time.sleep(0.2)  # the thread ends just after it marks the job finished
    after = submit(jobs, store, done)  # submit() restarts the dead worker
    assert jobs.wait(after, 10) and store.get(after).status == "done"
    health = jobs.alive()
    assert health["workers_alive"] == 1 and health["worker_restarts"] == 1


def test_health_counts_workers_queue_and_running_jobs(store, managers):
    jobs = managers(store, workers=1)
    gate, started = threading.Event(), threading.Event()
    running = submit(jobs, store, blocked(gate, started))
    assert started.wait(10)
    submit(jobs, store, done)
    health = jobs.alive()
    assert health["workers_alive"] == health["workers_expected"] == 1
    assert health["queue_size"] == 1 and health["running"] == 1
    gate.set()
    assert jobs.wait(running, 10)


# -- async waiting -----------------------------------------------------------------------------------
def test_many_async_waiters_hold_no_threads_and_all_wake(store, managers):
    jobs = managers(store, workers=1)
    gate = threading.Event()
    job_id = submit(jobs, store, blocked(gate))

    async def main():
        before = threading.active_count()
        tasks = [asyncio.create_task(jobs.wait_async(job_id, 20)) for _ in range(200)]
        await asyncio.sleep(0.5)
        during = threading.active_count()
        assert not any(t.done() for t in tasks)
        gate.set()
        return before, during, await asyncio.wait_for(asyncio.gather(*tasks), 10)

    before, during, results = asyncio.run(main())
    assert during <= before + 2
    assert results == [True] * 200 and store.get(job_id).status == "done"


def test_an_async_waiter_whose_client_left_returns_early(store, managers):
    jobs = managers(store, workers=1)
    gate = threading.Event()
    job_id = submit(jobs, store, blocked(gate))
    left_at = time.monotonic() + 0.3

    async def disconnected() -> bool:
        return time.monotonic() > left_at

    started = time.monotonic()
    assert asyncio.run(jobs.wait_async(job_id, 20, disconnected)) is False
    assert time.monotonic() - started < 3
    assert asyncio.run(jobs.wait_async(job_id, 0.2)) is False  # a plain time-out
    gate.set()
    assert asyncio.run(jobs.wait_async(job_id, 10)) is True


def test_async_waiters_beyond_the_cap_are_refused(store, managers):
    jobs = managers(store, workers=1, max_waiters=3)
    gate = threading.Event()
    job_id = submit(jobs, store, blocked(gate))

    async def main():
        tasks = [asyncio.create_task(jobs.wait_async(job_id, 20)) for _ in range(3)]
        await asyncio.sleep(0.1)
        with pytest.raises(TooManyWaiters):
            await jobs.wait_async(job_id, 20)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), 10)

    assert asyncio.run(main()) == [True] * 3
    assert jobs.alive()["waiters"] == 0


# -- cancel vs shutdown ------------------------------------------------------------------------------
def test_shutdown_records_a_running_job_as_interrupted(store):
    jobs = JobManager(store, workers=1)
    jobs.start()
    started = threading.Event()
    job_id = submit(jobs, store, spinning(started))
    assert started.wait(10)
    jobs.stop(timeout=5)
    row = store.get(job_id)
    assert (row.status, row.error_kind, row.error) == ("failed", "interrupted", "interrupted by shutdown")


def test_a_users_cancel_stays_cancelled_by_request(store, managers):
    jobs = managers(store, workers=1)
    started = threading.Event()
    job_id = submit(jobs, store, spinning(started))
    assert started.wait(10)
    assert jobs.cancel(job_id) and jobs.wait(job_id, 10)
    row = store.get(job_id)
    assert (row.status, row.error_kind, row.error) == ("cancelled", "cancelled", "cancelled by request")


# -- a full queue ----------------------------------------------------------------------------------------
def test_a_full_queue_raises_and_writes_nothing(store, managers):
    jobs = managers(store, workers=1, max_queue=1)
    gate, started = threading.Event(), threading.Event()
    first = submit(jobs, store, blocked(gate, started))
    assert started.wait(10)
    second = submit(jobs, store, done)
    refused = store.create(kind="probe", pair="p", inputs={}, req_hash="refused", manifest=None)
    with pytest.raises(QueueFull):
        jobs.submit(Job(id=refused.id, kind="probe", model_keys=["m"], run=done, timeout_s=60))
    row = store.get(refused.id)
    assert (row.status, row.error, row.error_kind) == ("queued", None, None)
    assert store.history(pair=None, kind=None, status="failed", limit=10, offset=0)[0] == 0
    gate.set()
    assert jobs.wait(first, 10) and jobs.wait(second, 10)


# -- the memory budget ---------------------------------------------------------------------------------
def test_jobs_that_do_not_fit_the_budget_together_never_overlap(store, managers):
    jobs = managers(store, workers=2, memory_budget_bytes=100)
    active, most = [0], [0]
    lock = threading.Lock()

    def heavy(progress):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.3)
        with lock:
            active[0] -= 1
        return "{}", None

    ids = [submit(jobs, store, heavy, key=f"m{i}", reserve_bytes=60) for i in range(2)]
    for job_id in ids:
        assert jobs.wait(job_id, 10) and store.get(job_id).status == "done"
    assert most[0] == 1


def test_a_job_that_fits_runs_while_a_larger_one_waits_for_room(store, managers):
    jobs = managers(store, workers=2, memory_budget_bytes=100)
    gate, started = threading.Event(), threading.Event()
    first = submit(jobs, store, blocked(gate, started), key="a", reserve_bytes=60)
    assert started.wait(10)
    waiting = submit(jobs, store, done, key="b", reserve_bytes=60)
    small = submit(jobs, store, done, key="c", reserve_bytes=30)
    assert jobs.wait(small, 10) and store.get(small).status == "done"
    assert store.get(waiting).status == "queued"
    gate.set()
    assert jobs.wait(first, 10) and jobs.wait(waiting, 10)
    assert store.get(waiting).status == "done" and jobs.alive()["reserved_bytes"] == 0


def test_a_job_larger_than_the_whole_budget_is_refused(store, managers):
    jobs = managers(store, workers=1, memory_budget_bytes=100)
    with pytest.raises(ValueError, match="budget"):
        submit(jobs, store, done, reserve_bytes=101)
    assert jobs.alive()["queue_size"] == 0
