"""Audit stores: SQL (SQLAlchemy Core: SQLite by default, PostgreSQL in production) and JSON
lines (a file, or stdout).

Every store has ``append(records)`` — all of them durable when it returns, or none (an
exception) — and ``last_link(instance_id)`` so that a restarted writer continues its chain.
``append`` is idempotent for records already stored with the same ``(instance_id, seq, hash)``,
so the writer can retry a batch whose commit succeeded although the acknowledgement was lost.

SQL schema. ``pgguard_schema(version)`` holds the schema version; opening a store creates or
migrates it (under a lock: ``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL), and
refuses a database whose version is newer than this pgguard knows. Migrations are the
:data:`MIGRATIONS` list: version N is reached by running the first N functions; a later issue
(approvals) appends its own. ``audit_records`` keeps one row per record; the JSON-array fields
(groups, params, objects, masked_columns) and ``extra`` are JSON text; ``id`` is a monotonic
row id (never reused on SQLite: AUTOINCREMENT) that ``tail`` follows and that ``verify`` reads
the chain in. Column names are the JSON keys except ``user`` → ``username`` and ``rows`` →
``row_count`` (``user`` means ``current_user`` in unquoted PostgreSQL SQL).

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit survives a power cut), a busy
timeout, and real transactions (pysqlite's implicit ones are replaced by explicit
``BEGIN`` / ``BEGIN IMMEDIATE``). On PostgreSQL, a session whose ``synchronous_commit`` is
``off`` turns it ``on``: an audit commit must be durable when it returns. With
``audit.sync: normal`` (``fsync=False``) both trade that for speed: SQLite
``synchronous=NORMAL``, PostgreSQL ``synchronous_commit=off``, the JSON lines unsynced; a
commit then survives pgguard being killed, not a power cut or an OS crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol, cast

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    tuple_,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from pgguard.audit.chain import Link
from pgguard.audit.jsoncodec import compact_json
from pgguard.audit.records import JSON_KEYS, AuditRecord, PlainExtra, decode_extra

SCHEMA_VERSION_TABLE = "pgguard_schema"
RECORDS_TABLE = "audit_records"
_PG_MIGRATION_LOCK = 0x70676775617264  # "pgguard": the advisory lock id for migrations
_SQLITE_BUSY_TIMEOUT_S = 30.0
_PG_STATEMENT_TIMEOUT_MS = 60_000


class StoreError(RuntimeError):
    """A store cannot be used as configured."""


class SchemaError(StoreError):
    """The database's schema is missing, or newer than this pgguard supports."""


class ChainConflictError(StoreError):
    """A record's ``(instance_id, seq)`` is already stored with a different hash: two writers
    share one instance id."""


class AuditStore(Protocol):
    """What the writer needs from a store."""

    def append(self, records: Sequence[AuditRecord]) -> None: ...

    def last_link(self, instance_id: str) -> Link | None: ...

    def close(self) -> None: ...


# -- schema -------------------------------------------------------------------------------

metadata = MetaData()

schema_table = Table(
    SCHEMA_VERSION_TABLE,
    metadata,
    Column("version", Integer, nullable=False),
)

records_table = Table(
    RECORDS_TABLE,
    metadata,
    Column(
        "id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("event", Text, nullable=False),
    Column("ts", Double, nullable=False),
    Column("instance_id", Text, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("session_id", Text),
    Column("username", Text),
    Column("email", Text),
    Column("groups", Text, nullable=False),  # JSON array
    Column("agent", Text),
    Column("client_addr", Text),
    Column("application_name", Text),
    Column("database", Text),
    Column("upstream_role", Text),
    Column("prompt_id", Text),
    Column("prompt_source", Text),
    Column("protocol", Text),
    Column("statement_name", Text),
    Column("portal", Text),
    Column("statement", Text),
    Column("fingerprint", Text),
    Column("params", Text, nullable=False),  # JSON array
    Column("class", Text),
    Column("command", Text),
    Column("objects", Text, nullable=False),  # JSON array
    Column("decision", Text),
    Column("rule", Text),
    Column("approval_id", Text),
    Column("masked_columns", Text, nullable=False),  # JSON array
    Column("row_count", BigInteger),
    Column("sqlstate", Text),
    Column("duration_ms", Double),
    Column("prev_hash", Text, nullable=False),
    Column("hash", Text, nullable=False),
    Column("extra", Text),  # JSON object, NULL when empty
    Index("audit_records_ts", "ts"),
    Index("audit_records_username", "username"),
    Index("audit_records_prompt_id", "prompt_id"),
    Index("audit_records_decision", "decision"),
    Index("audit_records_fingerprint", "fingerprint"),
    Index("audit_records_session_id", "session_id"),
    Index("audit_records_instance_seq", "instance_id", "seq", unique=True),
    sqlite_autoincrement=True,
)


def _migration_1(conn: Connection) -> None:
    records_table.create(conn)


def _migration_2(conn: Connection) -> None:
    # Just-in-time approval (SPEC §6): requests and the windows approvals grant. Imported here:
    # pgguard.approvals imports this module.
    from pgguard.approvals.schema import create_v2

    create_v2(conn)


# Version N = the first N migrations applied. Append, never edit.
MIGRATIONS: list[Callable[[Connection], None]] = [_migration_1, _migration_2]
SCHEMA_VERSION = len(MIGRATIONS)


def _dumps_list(items: tuple[str | None, ...]) -> str:
    # Sealed records hold tuples of str or None here (storable), so no float at all.
    return compact_json(items, finite=True) if items else "[]"


def _dumps_extra(extra: Mapping[str, Any]) -> str:
    return compact_json(extra, finite=type(extra) is PlainExtra)


# Insert columns, in the order of _row_tuple.
# The JSON keys in order, under the two column names that differ (``user`` and ``rows`` are
# reserved words in SQL).
_COLUMN_NAMES = {"user": "username", "rows": "row_count"}
_INSERT_COLUMNS: tuple[str, ...] = tuple(_COLUMN_NAMES.get(key, key) for key in JSON_KEYS)


def _row_tuple(r: AuditRecord) -> tuple[Any, ...]:
    if r.seq is None or r.hash is None or r.prev_hash is None:
        raise ValueError("only sealed records (seq, prev_hash, hash set) can be stored")
    return (
        r.event,
        r.ts,
        r.instance_id,
        r.seq,
        r.session_id,
        r.user,
        r.email,
        _dumps_list(r.groups),
        r.agent,
        r.client_addr,
        r.application_name,
        r.database,
        r.upstream_role,
        r.prompt_id,
        r.prompt_source,
        r.protocol,
        r.statement_name,
        r.portal,
        r.statement,
        r.fingerprint,
        _dumps_list(r.params),
        r.class_,
        r.command,
        _dumps_list(r.objects),
        r.decision,
        r.rule,
        r.approval_id,
        _dumps_list(r.masked_columns),
        r.rows,
        r.sqlstate,
        r.duration_ms,
        r.prev_hash,
        r.hash,
        _dumps_extra(r.extra) if r.extra else None,
    )


def _insert_sql(paramstyle: str) -> str:
    mark = "?" if paramstyle == "qmark" else "%s"
    columns = ", ".join(f'"{c}"' for c in _INSERT_COLUMNS)
    marks = ", ".join(mark for _ in _INSERT_COLUMNS)
    return f"INSERT INTO {RECORDS_TABLE} ({columns}) VALUES ({marks})"


def _record_from_row(m: Mapping[Any, Any]) -> AuditRecord:
    return AuditRecord(
        event=m["event"],
        ts=float(m["ts"]),
        instance_id=m["instance_id"],
        seq=int(m["seq"]),
        session_id=m["session_id"],
        user=m["username"],
        email=m["email"],
        groups=tuple(json.loads(m["groups"] or "[]")),
        agent=m["agent"],
        client_addr=m["client_addr"],
        application_name=m["application_name"],
        database=m["database"],
        upstream_role=m["upstream_role"],
        prompt_id=m["prompt_id"],
        prompt_source=m["prompt_source"],
        protocol=m["protocol"],
        statement_name=m["statement_name"],
        portal=m["portal"],
        statement=m["statement"],
        fingerprint=m["fingerprint"],
        params=tuple(json.loads(m["params"] or "[]")),
        class_=m["class"],
        command=m["command"],
        objects=tuple(json.loads(m["objects"] or "[]")),
        decision=m["decision"],
        rule=m["rule"],
        approval_id=m["approval_id"],
        masked_columns=tuple(json.loads(m["masked_columns"] or "[]")),
        rows=m["row_count"],
        sqlstate=m["sqlstate"],
        duration_ms=m["duration_ms"],
        prev_hash=m["prev_hash"],
        hash=m["hash"],
        extra=decode_extra(m["extra"]),
    )


TimeBound = float | int | datetime | None


def _epoch(value: TimeBound) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value)


def _normalise_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` mean psycopg 3 (the driver pgguard ships)."""
    u = make_url(url)
    if u.drivername in ("postgres", "postgresql"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


# -- SQL store ----------------------------------------------------------------------------


class SqlStore:
    """The audit trail in a SQL database (SQLAlchemy Core).

    ``SqlStore("sqlite:///pgguard-audit.db")`` or ``SqlStore("postgresql+psycopg://…")``.
    ``migrate=False`` (read-only tools) refuses a missing or older schema instead of
    creating or upgrading it. Thread-safe: one engine, a small connection pool.
    """

    def __init__(
        self, url: str, *, migrate: bool = True, echo: bool = False, fsync: bool = True
    ) -> None:
        self.url = _normalise_url(url)
        u = make_url(self.url)
        self.dialect: str = u.get_backend_name()
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.dialect == "sqlite":
            connect_args: dict[str, Any] = {
                "timeout": _SQLITE_BUSY_TIMEOUT_S,
                "check_same_thread": False,
            }
            if u.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool  # one shared in-memory database
            elif str(u.query.get("uri", "")).lower() not in ("1", "true"):  # a path, not a URI
                db = Path(u.database or "")
                if not db.parent.exists():
                    raise StoreError(f"audit store {self.safe_url}: directory {db.parent} missing")
                if db.is_dir():
                    raise StoreError(f"audit store {self.safe_url}: {db} is a directory")
                if not db.exists():
                    if not migrate:  # a reader: never leave an empty trail behind
                        raise SchemaError(
                            f"audit store {self.safe_url}: no such file {db}, so no pgguard "
                            "audit schema (start pgguard serve once to create it)"
                        )
                    db.touch(mode=0o600)  # the trail holds statements: private by default
            kwargs["connect_args"] = connect_args
        elif self.dialect == "postgresql":
            kwargs["pool_pre_ping"] = True
            if "connect_timeout" not in u.query:
                kwargs["connect_args"] = {"connect_timeout": 10}
        self.engine: Engine = create_engine(self.url, **kwargs)
        self._writer_conn: Any = None  # the writer's own driver connection (see append)
        self._insert = _insert_sql(self.engine.dialect.paramstyle)
        if self.dialect == "sqlite":
            _sqlite_events(self.engine, fsync)
        elif self.dialect == "postgresql":
            _postgres_events(self.engine, fsync)
        try:
            self.schema_version = self._ensure_schema(migrate)
        except BaseException:
            self.engine.dispose()
            raise

    @property
    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"SqlStore({self.safe_url!r})"

    # -- schema ---------------------------------------------------------------------------

    def _read_version(self, conn: Connection) -> int | None:
        if not inspect(conn).has_table(SCHEMA_VERSION_TABLE):
            return None
        value = conn.execute(select(func.max(schema_table.c.version))).scalar()
        return int(value) if value is not None else None

    def _ensure_schema(self, migrate: bool) -> int:
        with self.engine.connect() as conn:
            version = self._read_version(conn)
            conn.rollback()
        if version is not None and version > SCHEMA_VERSION:
            raise SchemaError(
                f"audit store {self.safe_url} has schema version {version}, newer than this "
                f"pgguard supports ({SCHEMA_VERSION}): upgrade pgguard"
            )
        if version == SCHEMA_VERSION:
            return version
        if not migrate:
            state = "no pgguard audit schema" if version is None else f"schema version {version}"
            raise SchemaError(
                f"audit store {self.safe_url} has {state} (this pgguard needs "
                f"{SCHEMA_VERSION}); start pgguard serve once to create or migrate it"
            )
        with self.write_transaction() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            version = self._read_version(conn)  # again, under the lock
            if version is not None and version > SCHEMA_VERSION:
                raise SchemaError(
                    f"audit store {self.safe_url} has schema version {version}, newer than "
                    f"this pgguard supports ({SCHEMA_VERSION}): upgrade pgguard"
                )
            if version is None:
                schema_table.create(conn)
                conn.execute(schema_table.insert().values(version=0))
                version = 0
            for number in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[number - 1](conn)
            if version != SCHEMA_VERSION:
                conn.execute(schema_table.update().values(version=SCHEMA_VERSION))
        return SCHEMA_VERSION

    @contextlib.contextmanager
    def write_transaction(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite: the write lock up front)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(pgguard_begin="BEGIN IMMEDIATE")
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def read_connection(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            try:
                yield conn
            finally:
                conn.rollback()

    # -- writing --------------------------------------------------------------------------

    def append(self, records: Sequence[AuditRecord]) -> None:
        """Store ``records`` (sealed) in one transaction; returns once committed."""
        if not records:
            return
        rows = [_row_tuple(r) for r in records]
        try:
            self._append_rows(rows)
        except self._integrity_errors:
            # Some of them may already be there: a retried batch whose first commit went
            # through. Store the others; a different hash under the same seq is a conflict.
            self._append_missing(records)

    def _append_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """One transaction on the writer's own driver connection, kept open between
        batches: the pool, SQLAlchemy's transaction objects and events would cost more per
        commit than the insert itself (group commits in strict mode are small)."""
        conn = self._writer_conn
        if conn is None:
            conn = self._writer_conn = self.engine.raw_connection()
        try:
            cur = conn.cursor()
            try:
                if self.dialect == "sqlite":
                    cur.execute("BEGIN IMMEDIATE")
                cur.executemany(self._insert, rows)
            finally:
                cur.close()
            conn.commit()
        except BaseException as exc:
            self._writer_conn = None
            with contextlib.suppress(Exception):
                conn.rollback()
            with contextlib.suppress(Exception):
                conn.invalidate() if _connection_lost(exc) else conn.close()
            raise

    def _append_missing(self, records: Sequence[AuditRecord]) -> None:
        t = records_table
        keys = [(r.instance_id, r.seq) for r in records]
        with self.write_transaction() as conn:
            stored: dict[tuple[str, int], str] = {}
            for chunk in _chunks(keys, 200):
                rows = conn.execute(
                    select(t.c.instance_id, t.c.seq, t.c.hash).where(
                        tuple_(t.c.instance_id, t.c.seq).in_(chunk)
                    )
                )
                for instance_id, seq, h in rows:
                    stored[(instance_id, int(seq))] = h
            missing = []
            for r in records:
                key = (r.instance_id, cast(int, r.seq))
                if key not in stored:
                    missing.append(r)
                elif stored[key] != r.hash:
                    raise ChainConflictError(
                        f"audit store {self.safe_url}: instance {r.instance_id!r} seq {r.seq} "
                        f"is already stored with another hash; is another pgguard running "
                        f"with the same instance id?"
                    )
            if missing:
                conn.exec_driver_sql(self._insert, [_row_tuple(r) for r in missing])

    # -- reading --------------------------------------------------------------------------

    def last_link(self, instance_id: str) -> Link | None:
        """The last ``(seq, hash)`` of ``instance_id``'s chain, or None."""
        t = records_table
        with self.read_connection() as conn:
            row = conn.execute(
                select(t.c.seq, t.c.hash)
                .where(t.c.instance_id == instance_id)
                .order_by(t.c.seq.desc())
                .limit(1)
            ).first()
        return Link(int(row[0]), row[1]) if row is not None else None

    def search(
        self,
        *,
        user: str | None = None,
        prompt_id: str | None = None,
        since: TimeBound = None,
        until: TimeBound = None,
        decision: str | Sequence[str] | None = None,
        table: str | None = None,
        fingerprint: str | None = None,
        session_id: str | None = None,
        event: str | Sequence[str] | None = None,
        instance_id: str | None = None,
        limit: int | None = None,
        order: Literal["asc", "desc"] = "asc",
    ) -> list[AuditRecord]:
        """Records matching every given filter, by time (``order``), at most ``limit``.

        ``since`` is inclusive, ``until`` exclusive (epoch seconds or datetimes).
        ``table`` matches records whose objects contain it: ``schema.name`` exactly, or a bare
        ``name`` in any schema.
        """
        t = records_table
        q = select(t)
        if user is not None:
            q = q.where(t.c.username == user)
        if prompt_id is not None:
            q = q.where(t.c.prompt_id == prompt_id)
        if fingerprint is not None:
            q = q.where(t.c.fingerprint == fingerprint)
        if session_id is not None:
            q = q.where(t.c.session_id == session_id)
        if instance_id is not None:
            q = q.where(t.c.instance_id == instance_id)
        if decision is not None:
            decisions = [decision] if isinstance(decision, str) else list(decision)
            q = q.where(t.c.decision.in_(decisions))
        if event is not None:
            events = [event] if isinstance(event, str) else list(event)
            q = q.where(t.c.event.in_(events))
        lo, hi = _epoch(since), _epoch(until)
        if lo is not None:
            q = q.where(t.c.ts >= lo)
        if hi is not None:
            q = q.where(t.c.ts < hi)
        if table is not None:
            if "." in table:
                q = q.where(self._contains(t.c.objects, compact_json(table)))
            else:
                # a bare name: "name" (unqualified) or ….name" (any schema)
                quoted = compact_json(table)
                q = q.where(
                    self._contains(t.c.objects, quoted)
                    | self._contains(t.c.objects, "." + quoted[1:])
                )
        if order == "desc":
            q = q.order_by(t.c.ts.desc(), t.c.id.desc())
        else:
            q = q.order_by(t.c.ts, t.c.id)
        if limit is not None:
            q = q.limit(limit)
        with self.read_connection() as conn:
            return [_record_from_row(row._mapping) for row in conn.execute(q)]

    def _contains(self, column: Any, needle: str) -> Any:
        """Case-sensitive substring test without LIKE wildcards, on either dialect."""
        if self.dialect == "postgresql":
            return func.strpos(column, needle) > 0
        return func.instr(column, needle) > 0

    def after(self, position: int, limit: int = 1000) -> list[tuple[int, AuditRecord]]:
        """Records stored after row id ``position`` as ``(row id, record)``, in id order."""
        t = records_table
        q = select(t).where(t.c.id > position).order_by(t.c.id).limit(limit)
        with self.read_connection() as conn:
            return [(int(row.id), _record_from_row(row._mapping)) for row in conn.execute(q)]

    def at(self, positions: Iterable[int]) -> list[tuple[int, AuditRecord]]:
        """The records with these row ids (those that exist), in id order."""
        wanted = sorted(set(positions))
        out: list[tuple[int, AuditRecord]] = []
        t = records_table
        with self.read_connection() as conn:
            for chunk in _chunks(wanted, 500):
                q = select(t).where(t.c.id.in_(chunk)).order_by(t.c.id)
                out.extend((int(row.id), _record_from_row(row._mapping)) for row in conn.execute(q))
        return out

    def last(self, n: int) -> list[tuple[int, AuditRecord]]:
        """The last ``n`` records stored, as ``(row id, record)`` in id order."""
        t = records_table
        q = select(t).order_by(t.c.id.desc()).limit(n)
        with self.read_connection() as conn:
            rows = [(int(row.id), _record_from_row(row._mapping)) for row in conn.execute(q)]
        rows.reverse()
        return rows

    def max_position(self) -> int:
        """The highest row id stored (0 when empty)."""
        with self.read_connection() as conn:
            value = conn.execute(select(func.max(records_table.c.id))).scalar()
        return int(value or 0)

    def chain(
        self, instance_id: str | None = None, *, batch: int = 1000
    ) -> Iterator[tuple[int, AuditRecord]]:
        """Every record (or ``instance_id``'s) as ``(row id, record)``, in storage (row id)
        order — the order :func:`pgguard.audit.chain.verify_stream` checks, where a
        reordering shows. Read in pages, so memory stays flat."""
        t = records_table
        position = 0
        while True:
            q = select(t).where(t.c.id > position)
            if instance_id is not None:
                q = q.where(t.c.instance_id == instance_id)
            q = q.order_by(t.c.id).limit(batch)
            with self.read_connection() as conn:
                page = [(int(row.id), _record_from_row(row._mapping)) for row in conn.execute(q)]
            if not page:
                return
            yield from page
            position = page[-1][0]

    def instances(self) -> list[str]:
        t = records_table
        with self.read_connection() as conn:
            return [
                r[0]
                for r in conn.execute(select(t.c.instance_id).distinct().order_by(t.c.instance_id))
            ]

    def count(self) -> int:
        with self.read_connection() as conn:
            return int(conn.execute(select(func.count()).select_from(records_table)).scalar() or 0)

    @property
    def _integrity_errors(self) -> tuple[type[BaseException], ...]:
        dbapi = self.engine.dialect.dbapi
        driver_error = getattr(dbapi, "IntegrityError", None) if dbapi is not None else None
        return (IntegrityError, driver_error) if driver_error is not None else (IntegrityError,)

    def close(self) -> None:
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        self.engine.dispose()

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _connection_lost(exc: BaseException) -> bool:
    """Whether a driver error means the connection itself is gone (not just the statement)."""
    return getattr(exc, "connection_invalidated", False) or type(exc).__name__ in (
        "OperationalError",
        "InterfaceError",
    )


def _sqlite_events(engine: Engine, fsync: bool = True) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite (it would BEGIN only before DML and
        # leave DDL and reads outside any transaction); SQLAlchemy's begin emits BEGIN below.
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout={int(_SQLITE_BUSY_TIMEOUT_S * 1000)}")
            # Switching to WAL takes an exclusive lock that the busy handler does not wait for
            # when several processes open a new file at once (workers starting together).
            for attempt in range(100):
                try:
                    row = cur.execute("PRAGMA journal_mode").fetchone()
                    if row is None or str(row[0]).lower() != "wal":
                        cur.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or attempt == 99:
                        raise
                    time.sleep(0.05)
            # NORMAL in WAL mode: a commit is in the WAL file (the OS has it) without an
            # fsync; it survives the process, not a power cut.
            cur.execute("PRAGMA synchronous=FULL" if fsync else "PRAGMA synchronous=NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("pgguard_begin", "BEGIN"))


def _postgres_events(engine: Engine, fsync: bool = True) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cur:
            if not fsync:
                # The server has the commit (it survives pgguard), not yet its WAL on disk.
                cur.execute("SET synchronous_commit = off")
            else:
                cur.execute("SHOW synchronous_commit")
                row = cur.fetchone()
                if row is not None and row[0] == "off":
                    cur.execute("SET synchronous_commit = on")
            cur.execute(f"SET statement_timeout = {_PG_STATEMENT_TIMEOUT_MS}")
        dbapi_connection.commit()


# -- JSON lines ---------------------------------------------------------------------------


class JsonlSink:
    """Appends one JSON object per record, one per line, to ``path`` ("-": stdout).

    For a file, each batch is written with one ``write`` under an exclusive ``flock`` and
    fsynced before ``append`` returns; a batch that fails part way is cut off again, so a
    retried batch is never written twice. New files are created mode 0600.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = str(path)
        self.fsync = fsync
        self._stream: IO[str] | None = None
        self._fd: int | None = None
        if self.path == "-":
            self._stream = sys.stdout
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    @staticmethod
    def _encode(records: Sequence[AuditRecord]) -> bytes:
        text = "".join(r.to_json_line() + "\n" for r in records)
        # A lone surrogate becomes its \\uXXXX escape: the same JSON string value.
        return text.encode("utf-8", "backslashreplace")

    def append(self, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        data = self._encode(records)
        if self._fd is None:
            self._write_stream(data)
            return
        fd = self._fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if self.fsync:
                    os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _write_stream(self, data: bytes) -> None:
        stream = self._stream or sys.stdout
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            stream.flush()
            buffer.write(data)
            buffer.flush()
        else:
            stream.write(data.decode("utf-8"))
            stream.flush()

    def last_link(self, instance_id: str) -> Link | None:
        """The last link of ``instance_id`` in the file (read backwards), or None."""
        if self._fd is None:
            return None
        for record in _read_backwards(self.path):
            if record.instance_id == instance_id and record.seq is not None and record.hash:
                return Link(record.seq, record.hash)
        return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __repr__(self) -> str:
        return f"JsonlSink({self.path!r})"


class StdoutSink(JsonlSink):
    """JSON lines on stdout (or ``stream``); no chain to resume, nothing to fsync."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__("-")
        self._stream = stream

    def __repr__(self) -> str:
        return "StdoutSink()"


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, AuditRecord]]:
    """``(line number, record)`` for each record of a JSON-lines file (blank lines skipped;
    a line that is not a record raises ValueError naming it)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield number, AuditRecord.from_json(json.loads(line))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not an audit record: {exc}") from None


def _read_backwards(path: str, chunk: int = 65536) -> Iterator[AuditRecord]:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        tail = b""
        while end > 0:
            start = max(0, end - chunk)
            fh.seek(start)
            data = fh.read(end - start) + tail
            end = start
            lines = data.split(b"\n")
            tail = lines.pop(0) if start > 0 else b""
            for line in reversed(lines):
                record = _parse_line(line)
                if record is not None:
                    yield record
        if tail:
            record = _parse_line(tail)
            if record is not None:
                yield record


def _parse_line(line: bytes) -> AuditRecord | None:
    if not line.strip():
        return None
    try:
        return AuditRecord.from_json(json.loads(line))
    except (ValueError, TypeError):
        return None


# -- configuration ------------------------------------------------------------------------


def open_stores(url: str | None, jsonl: str | None, *, fsync: bool = True) -> list[AuditStore]:
    """The stores ``audit.url`` / ``audit.jsonl`` configure (SPEC §9), SQL first.
    ``fsync`` False (``audit.sync: normal``): commits are handed to the OS or the server, not
    waited for on stable storage."""
    stores: list[AuditStore] = []
    if url:
        stores.append(SqlStore(url, fsync=fsync))
    if jsonl:
        stores.append(StdoutSink() if jsonl == "-" else JsonlSink(jsonl, fsync=fsync))
    return stores
