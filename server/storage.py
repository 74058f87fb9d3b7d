"""Where results live: SQLAlchemy 2, SQLite (WAL) by default, any URL via LNSCOPE_DATABASE_URL.

One row per analysis request: kind, inputs, manifest, status, timings and the result JSON.
Finished rows are never rewritten.

Owners and leases: every Store (one per server process) registers an owner row and refreshes its
heartbeat; each job row names the owner that created and runs it. `recover_orphans` fails only the
unfinished jobs whose owner is gone: its heartbeat older than the lease, its process no longer running
(checked where it shares this process's pid namespace), its row released by a graceful shutdown, or no
owner recorded at all (rows from before owners existed). A live server's jobs are never touched, so
several servers or API replicas can share one database. One process serves one server: a Store opened
again in the same process takes over the unfinished jobs of the earlier Stores of this process.
A server calls `heartbeat()` every few seconds and `recover_orphans()` at start-up and then about once a
lease, so that the jobs of a server that died less than a lease before this one started are failed too.

Identical active requests are deduplicated by a unique partial index on `request_hash` over queued
and running rows (SQLite and PostgreSQL); `create_or_get_active` relies on it. A database that is
deleted, replaced, corrupt, read-only or unreachable surfaces as `StoreUnavailable`, whose message names
the database and never carries SQL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    and_,
    case,
    create_engine,
    delete,
    event,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DatabaseError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, defer, mapped_column, sessionmaker

from lnscope.analysis.errors import LnscopeError

logger = logging.getLogger("lnscope.server.storage")

UNFINISHED = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")
ACTIVE_HASH_INDEX = "ux_results_active_request_hash"
PARTIAL_INDEX_DIALECTS = ("sqlite", "postgresql")
INTERRUPTED = "the server stopped before this job finished; submit it again"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def request_hash(kind: str, inputs: dict[str, Any], manifest_key: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of what determines a result: kind, inputs, models and settings."""
    canonical = json.dumps({"kind": kind, "inputs": inputs, "manifest": manifest_key}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class StoreUnavailable(LnscopeError):
    """The results database cannot be used now (deleted, replaced, corrupt, read-only or unreachable)."""


@dataclass(frozen=True)
class StoreHealth:
    writable: bool
    message: str | None = None


def _aware(t: dt.datetime) -> dt.datetime:
    """SQLite hands datetimes back naive; they were written in UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timestamp written in UTC and always read back timezone-aware UTC (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else _aware(value).astimezone(dt.timezone.utc)

    def process_result_value(self, value, dialect):
        return None if value is None else _aware(value).astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class OwnerRow(Base):
    """A server process using the database, alive while its heartbeat is fresh."""

    __tablename__ = "owners"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    pid_space: Mapped[str | None] = mapped_column(String(80), nullable=True)  # boot id and pid namespace
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class ResultRow(Base):
    __tablename__ = "results"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    pair: Mapped[str] = mapped_column(String(128), index=True)
    request_hash: Mapped[str] = mapped_column(String(64), index=True)
    inputs: Mapped[dict] = mapped_column(JSON)
    manifest: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str] = mapped_column(String(200), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)  # the result JSON, as text
    owner: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)  # the owner running it

    __table_args__ = (
        Index("ix_results_pair_kind_created", "pair", "kind", "created_at"),
        Index(ACTIVE_HASH_INDEX, "request_hash", unique=True, sqlite_where=text("status IN ('queued', 'running')"),
              postgresql_where=text("status IN ('queued', 'running')")).ddl_if(dialect=PARTIAL_INDEX_DIALECTS),
    )

    def timings(self) -> dict[str, float | None]:
        def seconds(a, b):
            if a is None or b is None:
                return None
            return (_aware(b) - _aware(a)).total_seconds()

        return {
            "queued_s": seconds(self.created_at, self.started_at),
            "run_s": seconds(self.started_at, self.finished_at),
        }


def database_url(data_dir: Path, url: str | None = None) -> str:
    if url:
        return url
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(data_dir / 'lnscope.db').resolve()}"


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL (plain or `file:` URI), None for other databases and in-memory ones."""
    parsed = make_url(url)
    database = parsed.database or ""
    if not parsed.drivername.startswith("sqlite") or database in ("", ":memory:"):
        return None
    if parsed.query.get("uri") in ("true", "1"):
        if parsed.query.get("mode") == "memory":
            return None
        database = database.removeprefix("file:")
    return Path(database).resolve()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # WAL: readers never block the writer
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


# -- schema upgrade ---------------------------------------------------------------------------
SCHEMA_LOCK_KEY = 0x6C6E73636F7065  # PostgreSQL advisory lock held while one server upgrades the schema


def upgrade_schema(engine: Engine) -> None:
    """Bring a database made by an earlier lnscope to this schema; idempotent and safe to run concurrently."""
    with _schema_lock(engine):
        Base.metadata.create_all(engine)
        _add_missing_columns(engine)
        _add_missing_indexes(engine)


@contextlib.contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    """On PostgreSQL one server at a time (concurrent CREATE TABLE collide in pg_type); released at commit."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        yield


def _add_missing_columns(engine: Engine) -> None:
    """ALTER TABLE ... ADD COLUMN for every nullable column the database lacks (new columns are nullable)."""
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspect(engine).get_columns(table.name)}
        for column in table.columns:
            if column.name in present or not column.nullable:
                continue
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.type.compile(engine.dialect)}"
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(ddl)
            except DatabaseError:  # fine when another server added it meanwhile
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise
            logger.info("database upgraded: column %s.%s added", table.name, column.name)


def _add_missing_indexes(engine: Engine) -> None:
    """Create the indexes the database lacks; one that cannot be built is logged and start-up goes on."""
    for table in Base.metadata.sorted_tables:
        present = {ix["name"] for ix in inspect(engine).get_indexes(table.name)}
        for index in table.indexes:
            if index.name in present:
                continue
            if index.name == ACTIVE_HASH_INDEX and engine.dialect.name not in PARTIAL_INDEX_DIALECTS:
                continue
            try:
                with engine.begin() as conn:
                    if index.name == ACTIVE_HASH_INDEX:
                        _fail_duplicate_active(conn)
                    index.create(conn, checkfirst=True)
            except DatabaseError as exc:
                logger.warning("cannot create index %s: %s", index.name, _reason(exc))


def _fail_duplicate_active(conn: Connection) -> int:
    """Fail all but the newest of identical active requests, so the unique active-request index can be built."""
    rows = conn.execute(select(ResultRow.id, ResultRow.request_hash).where(ResultRow.status.in_(UNFINISHED))
                        .order_by(ResultRow.request_hash, ResultRow.created_at.desc())).all()
    older = [row.id for previous, row in zip([None, *rows], rows)
             if previous is not None and previous.request_hash == row.request_hash]
    if older:
        conn.execute(update(ResultRow).where(ResultRow.id.in_(older)).values(
            status="failed", error_kind="duplicate", finished_at=utcnow(),
            error="an identical request was queued more than once; the newest copy was kept"))
        logger.warning("failed %d duplicate active job(s) to build the unique active-request index", len(older))
    return len(older)


# -- owners ---------------------------------------------------------------------------------------
def _pid_space() -> str | None:
    """This boot and pid namespace: owners sharing it can be checked with kill(pid, 0); None off Linux."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}:{namespace}"[:80]


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _reason(exc: BaseException) -> str:
    """The driver's one-line reason, without the SQL statement or its parameters SQLAlchemy appends."""
    message = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return (message[0] if message else type(exc).__name__)[:300]


class Store:
    """All database access of the server, as one owner (one process) among those sharing the database."""

    def __init__(self, url: str, owner_id: str | None = None) -> None:
        self.url = url
        self.owner_id = owner_id or str(uuid.uuid4())
        self.host = socket.gethostname()[:255]
        self.pid = os.getpid()
        self.pid_space = _pid_space()
        self.path = sqlite_path(url)
        self.where = str(self.path) if self.path else make_url(url).render_as_string(hide_password=True)
        self._health = StoreHealth(writable=True)
        self.engine = make_engine(url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        try:
            with self._db_errors():
                upgrade_schema(self.engine)
                self._register()
        except StoreUnavailable:
            self.engine.dispose()
            raise
        self._identity = self._file_identity()

    def session(self) -> Session:
        return self._session()

    # -- health -------------------------------------------------------------------------------
    def _unavailable(self, reason: str) -> StoreUnavailable:
        message = f"the results database {self.where} cannot be used: {reason}"
        self._health = StoreHealth(writable=False, message=message)
        return StoreUnavailable(message)

    @contextlib.contextmanager
    def _db_errors(self) -> Iterator[None]:
        """Database failures as StoreUnavailable with a message for people; duplicates stay IntegrityError."""
        try:
            yield
        except IntegrityError:
            raise
        except DatabaseError as exc:
            raise self._unavailable(_reason(exc)) from None
        except self.engine.dialect.loaded_dbapi.DatabaseError as exc:  # raised while connecting
            raise self._unavailable(_reason(exc)) from None

    def _file_identity(self) -> tuple[int, int] | None:
        if self.path is None or not self.path.exists():
            return None
        st = self.path.stat()
        return st.st_dev, st.st_ino

    def _file_problem(self) -> str | None:
        """Why the SQLite file is no longer the one this Store opened, if it is not."""
        if self.path is None:
            return None
        if not self.path.exists():
            return "the file was deleted while the server was running; restart the server"
        if self._file_identity() != self._identity:
            return "the file was replaced while the server was running; restart the server"
        return None

    def _read_problem(self, deep: bool) -> str | None:
        """Why the database cannot be read (deep: SQLite's quick_check of every page), if it cannot."""
        try:
            with self.engine.connect() as conn:
                conn.execute(select(func.count()).select_from(OwnerRow)).scalar()
                if deep and conn.dialect.name == "sqlite":
                    verdict = conn.exec_driver_sql("PRAGMA quick_check").scalar()
                    if verdict != "ok":
                        return f"the file is corrupt ({str(verdict).splitlines()[0][:200]})"
        except (DatabaseError, self.engine.dialect.loaded_dbapi.DatabaseError) as exc:
            return _reason(exc)
        return None

    def check(self, deep: bool = False) -> StoreHealth:
        """Whether the database can be written now: still the file opened, readable, writable (deep: intact)."""
        problem = self._file_problem() or self._read_problem(deep)
        if problem is not None:
            self._unavailable(problem)
            return self._health
        try:
            self._beat()  # the cheap write: fails on a read-only or locked-out database
        except StoreUnavailable:
            return self._health
        self._health = StoreHealth(writable=True)
        return self._health

    def _require_writable(self) -> None:
        """Refuse a write up front when the file is gone or the last check failed and a new one fails too."""
        if (problem := self._file_problem()) is not None:
            raise self._unavailable(problem)
        if not self._health.writable and not self.check().writable:
            raise StoreUnavailable(self._health.message)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        self._require_writable()
        with self._db_errors():
            yield

    # -- owners -------------------------------------------------------------------------------
    def _register(self) -> None:
        now = utcnow()
        with self.session() as s, s.begin():
            s.merge(OwnerRow(id=self.owner_id, host=self.host, pid=self.pid, pid_space=self.pid_space,
                             started_at=now, heartbeat_at=now))

    def _beat(self) -> None:
        """One UPDATE of this owner's heartbeat; re-registers when the row is gone (released or reaped)."""
        if (problem := self._file_problem()) is not None:
            raise self._unavailable(problem)
        with self._db_errors():
            with self.engine.begin() as conn:
                refreshed = conn.execute(update(OwnerRow).where(OwnerRow.id == self.owner_id)
                                         .values(heartbeat_at=utcnow())).rowcount
            if not refreshed:
                self._register()

    def heartbeat(self) -> bool:
        """Refresh this owner's lease (call every few seconds); False, and logged, when the database refuses."""
        was_writable = self._health.writable
        try:
            self._beat()
        except StoreUnavailable as exc:
            if was_writable:
                logger.error("%s", exc)
            return False
        return True

    def release(self) -> None:
        """Remove this owner (graceful shutdown): its unfinished jobs are orphans at once for other servers."""
        with contextlib.suppress(StoreUnavailable), self._writing(), self.session() as s, s.begin():
            s.execute(delete(OwnerRow).where(OwnerRow.id == self.owner_id))

    def close(self) -> None:
        """Release this owner and close the connections; a later call re-registers on its first heartbeat."""
        self.release()
        self.engine.dispose()

    def _dead_owners(self, s: Session) -> list[str]:
        """Owners that share this pid namespace whose process is gone or is this process (an earlier Store)."""
        if self.pid_space is None:
            return []
        rows = s.execute(select(OwnerRow.id, OwnerRow.pid).where(OwnerRow.pid_space == self.pid_space,
                                                                 OwnerRow.id != self.owner_id)).all()
        return [r.id for r in rows if r.pid == self.pid or not _pid_running(r.pid)]

    def recover_orphans(self, lease_s: float = 30.0) -> int:
        """Fail the unfinished jobs whose owner is gone (see the module docstring); never a live owner's."""
        cutoff = utcnow() - dt.timedelta(seconds=lease_s)
        with self._writing(), self.session() as s, s.begin():
            dead = self._dead_owners(s)
            live = select(OwnerRow.id).where(OwnerRow.heartbeat_at >= cutoff, OwnerRow.id.not_in(dead))
            n = s.execute(
                update(ResultRow)
                .where(ResultRow.status.in_(UNFINISHED),
                       or_(ResultRow.owner.is_(None), and_(ResultRow.owner != self.owner_id,
                                                           ResultRow.owner.not_in(live))))
                .values(status="failed", error_kind="interrupted", finished_at=utcnow(), error=INTERRUPTED)
            ).rowcount
            s.execute(delete(OwnerRow).where(OwnerRow.id != self.owner_id,
                                             or_(OwnerRow.heartbeat_at < cutoff, OwnerRow.id.in_(dead))))
        if n:
            logger.warning("marked %d unfinished job(s) of stopped servers as failed", n)
        return n

    def recover_unfinished(self) -> int:
        """Start-up recovery: the orphans of stopped servers, with the default lease."""
        return self.recover_orphans()

    # -- results ------------------------------------------------------------------------------
    def create(self, *, kind: str, pair: str, inputs: dict, req_hash: str, manifest: dict | None) -> ResultRow:
        """A new queued row owned by this Store; IntegrityError when an identical request is already active."""
        row = ResultRow(id=str(uuid.uuid4()), kind=kind, pair=pair, inputs=inputs, request_hash=req_hash,
                        manifest=manifest, status="queued", stage="queued", progress=0.0, created_at=utcnow(),
                        owner=self.owner_id)
        with self._writing(), self.session() as s, s.begin():
            s.add(row)
        return row

    def create_or_get_active(self, *, kind: str, pair: str, inputs: dict, req_hash: str,
                             manifest: dict | None) -> tuple[ResultRow, bool]:
        """(row, created): a new queued row, or the queued or running row of an identical request; atomic.

        Insert first (one round trip for a new request, which callers have just looked up with
        `find_reusable`); the unique index on active rows refuses a duplicate, and then that row is read.
        """
        for _ in range(5):  # the active row may finish between a refused insert and the lookup
            try:
                return self.create(kind=kind, pair=pair, inputs=inputs, req_hash=req_hash, manifest=manifest), True
            except IntegrityError:
                if (active := self.find_active(req_hash)) is not None:
                    return active, False
        raise StoreUnavailable(f"the results database {self.where} keeps refusing request {req_hash[:12]}")

    def discard(self, result_id: str) -> bool:
        """Delete a row that is still queued and never ran (a job the queue refused): no history entry."""
        stmt = delete(ResultRow).where(ResultRow.id == result_id, ResultRow.status == "queued",
                                       ResultRow.started_at.is_(None))
        with self._writing(), self.session() as s, s.begin():
            return s.execute(stmt).rowcount == 1

    def get(self, result_id: str) -> ResultRow | None:
        with self._db_errors(), self.session() as s:
            return s.get(ResultRow, result_id)

    def find_reusable(self, req_hash: str) -> ResultRow | None:
        """In one query: the newest finished result of an identical request, else its queued or running row."""
        done_first = case((ResultRow.status == "done", 0), else_=1)
        with self._db_errors(), self.session() as s:
            return s.scalars(
                select(ResultRow).where(ResultRow.request_hash == req_hash,
                                        ResultRow.status.in_(("done", *UNFINISHED)))
                .order_by(done_first, ResultRow.finished_at.desc(), ResultRow.created_at.desc()).limit(1)
            ).first()

    def find_active(self, req_hash: str) -> ResultRow | None:
        """An identical request that is queued or running now."""
        with self._db_errors(), self.session() as s:
            return s.scalars(
                select(ResultRow).where(ResultRow.request_hash == req_hash, ResultRow.status.in_(UNFINISHED))
                .order_by(ResultRow.created_at.desc()).limit(1)
            ).first()

    def _update(self, result_id: str, only_unfinished: bool = True, **values) -> bool:
        stmt = update(ResultRow).where(ResultRow.id == result_id)
        if only_unfinished:  # a finished result is never overwritten
            stmt = stmt.where(ResultRow.status.in_(UNFINISHED))
        with self._writing(), self.session() as s, s.begin():
            return s.execute(stmt.values(**values)).rowcount == 1

    def mark_running(self, result_id: str) -> bool:
        return self._update(result_id, status="running", started_at=utcnow(), stage="starting", owner=self.owner_id)

    def set_progress(self, result_id: str, stage: str, progress: float) -> None:
        self._update(result_id, stage=stage[:200], progress=progress)

    def finish(self, result_id: str, result_json: str, manifest: dict | None) -> ResultRow | None:
        """Store a job's result: the finished row, read back by the same statement where the database can (else
        read after it); None when the job had already ended (a finished result is never overwritten)."""
        values = dict(status="done", result=result_json, manifest=manifest, progress=1.0, stage="done",
                      finished_at=utcnow())
        if not self.engine.dialect.update_returning:
            return self.get(result_id) if self._update(result_id, **values) else None
        stmt = (update(ResultRow).where(ResultRow.id == result_id, ResultRow.status.in_(UNFINISHED))
                .values(**values).returning(ResultRow))
        with self._writing(), self.session() as s, s.begin():
            return s.scalars(stmt).first()

    def fail(self, result_id: str, error: str, error_kind: str, status: str = "failed") -> bool:
        return self._update(result_id, status=status, error=error, error_kind=error_kind, finished_at=utcnow())

    def history(
        self, *, pair: str | None, kind: str | None, status: str | None, limit: int, offset: int
    ) -> tuple[int, list[ResultRow]]:
        """A page of rows, newest first, without the result JSON and manifest (they can be megabytes each)."""
        query = select(ResultRow).options(defer(ResultRow.result), defer(ResultRow.manifest))
        count = select(func.count()).select_from(ResultRow)
        for column, value in ((ResultRow.pair, pair), (ResultRow.kind, kind), (ResultRow.status, status)):
            if value is not None:
                query = query.where(column == value)
                count = count.where(column == value)
        with self._db_errors(), self.session() as s:
            total = s.scalar(count) or 0
            rows = list(s.scalars(query.order_by(ResultRow.created_at.desc()).limit(limit).offset(offset)))
        return total, rows


def open_store(url: str, owner_id: str | None = None) -> Store:
    """A Store checked in depth at start-up: a corrupt, read-only or unreachable database is one StoreUnavailable."""
    store = Store(url, owner_id)
    health = store.check(deep=True)
    if not health.writable:
        store.engine.dispose()
        raise StoreUnavailable(health.message)
    return store
