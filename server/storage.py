"""Where results live: SQLAlchemy 2, SQLite (WAL) by default, any URL via LNSCOPE_DATABASE_URL.

One row per analysis request: kind, inputs, manifest, status, timings and the result JSON.
Finished rows are never rewritten; a row left unfinished by a killed server is marked failed
(with the reason) when the server starts again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import JSON, DateTime, Float, Index, String, Text, create_engine, event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

logger = logging.getLogger("lnscope.server.storage")

UNFINISHED = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def request_hash(kind: str, inputs: dict[str, Any], manifest_key: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of what determines a result: kind, inputs, models and settings."""
    canonical = json.dumps({"kind": kind, "inputs": inputs, "manifest": manifest_key}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class Base(DeclarativeBase):
    pass


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
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)  # the result JSON, as text

    __table_args__ = (Index("ix_results_pair_kind_created", "pair", "kind", "created_at"),)

    def timings(self) -> dict[str, float | None]:
        def seconds(a, b):
            if a is None or b is None:
                return None
            return (_aware(b) - _aware(a)).total_seconds()

        return {
            "queued_s": seconds(self.created_at, self.started_at),
            "run_s": seconds(self.started_at, self.finished_at),
        }


def _aware(t: dt.datetime) -> dt.datetime:
    """SQLite hands datetimes back naive; they were written in UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def database_url(data_dir: Path, url: str | None = None) -> str:
    if url:
        return url
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(data_dir / 'lnscope.db').resolve()}"


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


class Store:
    """All database access of the server."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._session()

    def recover_unfinished(self) -> int:
        """Mark every job a previous server process left queued or running as failed."""
        with self.session() as s, s.begin():
            n = s.execute(
                update(ResultRow)
                .where(ResultRow.status.in_(UNFINISHED))
                .values(status="failed", error_kind="interrupted", finished_at=utcnow(),
                        error="the server stopped before this job finished; submit it again")
            ).rowcount
        if n:
            logger.warning("marked %d unfinished job(s) from a previous run as failed", n)
        return n

    def create(self, *, kind: str, pair: str, inputs: dict, req_hash: str, manifest: dict | None) -> ResultRow:
        row = ResultRow(id=str(uuid.uuid4()), kind=kind, pair=pair, inputs=inputs, request_hash=req_hash,
                        manifest=manifest, status="queued", stage="queued", progress=0.0, created_at=utcnow())
        with self.session() as s, s.begin():
            s.add(row)
        return row

    def get(self, result_id: str) -> ResultRow | None:
        with self.session() as s:
            return s.get(ResultRow, result_id)

    def find_done(self, req_hash: str) -> ResultRow | None:
        """The newest finished result of an identical request, if any."""
        with self.session() as s:
            return s.scalars(
                select(ResultRow).where(ResultRow.request_hash == req_hash, ResultRow.status == "done")
                .order_by(ResultRow.finished_at.desc()).limit(1)
            ).first()

    def find_active(self, req_hash: str) -> ResultRow | None:
        """An identical request that is queued or running now."""
        with self.session() as s:
            return s.scalars(
                select(ResultRow).where(ResultRow.request_hash == req_hash, ResultRow.status.in_(UNFINISHED))
                .order_by(ResultRow.created_at.desc()).limit(1)
            ).first()

    def _update(self, result_id: str, only_unfinished: bool = True, **values) -> bool:
        stmt = update(ResultRow).where(ResultRow.id == result_id)
        if only_unfinished:  # a finished result is never overwritten
            stmt = stmt.where(ResultRow.status.in_(UNFINISHED))
        with self.session() as s, s.begin():
            return s.execute(stmt.values(**values)).rowcount == 1

    def mark_running(self, result_id: str) -> bool:
        return self._update(result_id, status="running", started_at=utcnow(), stage="starting")

    def set_progress(self, result_id: str, stage: str, progress: float) -> None:
        self._update(result_id, stage=stage[:200], progress=progress)

    def finish(self, result_id: str, result_json: str, manifest: dict | None) -> bool:
        return self._update(result_id, status="done", result=result_json, manifest=manifest, progress=1.0,
                            stage="done", finished_at=utcnow())

    def fail(self, result_id: str, error: str, error_kind: str, status: str = "failed") -> bool:
        return self._update(result_id, status=status, error=error, error_kind=error_kind, finished_at=utcnow())

    def history(
        self, *, pair: str | None, kind: str | None, status: str | None, limit: int, offset: int
    ) -> tuple[int, list[ResultRow]]:
        query = select(ResultRow)
        count = select(func.count()).select_from(ResultRow)
        for column, value in ((ResultRow.pair, pair), (ResultRow.kind, kind), (ResultRow.status, status)):
            if value is not None:
                query = query.where(column == value)
                count = count.where(column == value)
        with self.session() as s:
            total = s.scalar(count) or 0
            rows = list(s.scalars(query.order_by(ResultRow.created_at.desc()).limit(limit).offset(offset)))
        return total, rows

    def iter_unfinished(self) -> Iterator[ResultRow]:
        with self.session() as s:
            yield from s.scalars(select(ResultRow).where(ResultRow.status.in_(UNFINISHED)))
