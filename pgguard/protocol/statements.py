"""Statement-level bookkeeping for the audit trail: which statement each server reply ends.

Sans-IO. The relay tells the tracker what the client sent (Query, Parse, Bind, Execute,
FunctionCall, Sync) and what the server answered (CommandComplete, EmptyQueryResponse,
PortalSuspended, ErrorResponse, ReadyForQuery); the tracker returns one ``StatementRun`` per
statement once its outcome is known. A multi-statement Query yields one run per statement;
statements the server skipped after an error are reported as not executed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from pgguard.audit.recording import RawPreview, RecordedStatement
from pgguard.audit.text import statement_texts


class StatementRun(NamedTuple):
    """One statement, from the moment it was sent to the moment its outcome was known.

    Immutable like the frozen dataclasses elsewhere, but a tuple: the relay makes two or
    three per statement when the audit is on, and a tuple is built in C (a frozen dataclass
    sets each of its 16 fields through ``object.__setattr__``); it also crosses the pipe to
    the audit writer as it is."""

    protocol: str  # "simple" | "extended" | "function"
    statement: str
    started: float
    statement_name: str | None = None
    portal: str | None = None
    params: tuple[bytes | None, ...] = ()
    param_formats: tuple[int, ...] = ()
    batch: int = 0  # the Query or Sync this statement belongs to
    ended: float | None = None
    command_tag: str | None = None
    rows: int | None = None
    sqlstate: str | None = None
    error: str | None = None
    executed: bool = True
    # The rows the client got (session recording): raw from the relay, decoded by the writer.
    preview: RawPreview | RecordedStatement | None = None
    masked_columns: tuple[str, ...] = ()  # source columns masked in its result
    # Refused by pgguard (not run): (rule, decision, approval id); see Refusal.
    refused: tuple[str, str, str | None] | None = None
    row_limit: int = 0  # the Execute's (0: all rows); a suspended run returned that many

    def finished(
        self,
        ended: float,
        command_tag: str | None = None,
        rows: int | None = None,
        sqlstate: str | None = None,
        error: str | None = None,
        executed: bool = True,
    ) -> StatementRun:
        """This run with its outcome."""
        return self._with(ended, command_tag, rows, sqlstate, error, executed, self.preview)

    def with_result(
        self, preview: RawPreview | RecordedStatement | None, masked_columns: tuple[str, ...]
    ) -> StatementRun:
        """This run with what the client got: its preview and the columns masked in it."""
        return self._with(
            self.ended,
            self.command_tag,
            self.rows,
            self.sqlstate,
            self.error,
            self.executed,
            preview,
            masked_columns,
        )

    def _with(
        self,
        ended: float | None,
        command_tag: str | None,
        rows: int | None,
        sqlstate: str | None,
        error: str | None,
        executed: bool,
        preview: RawPreview | RecordedStatement | None,
        masked_columns: tuple[str, ...] | None = None,
    ) -> StatementRun:
        # Positional construction: _replace costs more (hot path).
        return StatementRun(
            self.protocol,
            self.statement,
            self.started,
            self.statement_name,
            self.portal,
            self.params,
            self.param_formats,
            self.batch,
            ended,
            command_tag,
            rows,
            sqlstate,
            error,
            executed,
            preview,
            self.masked_columns if masked_columns is None else masked_columns,
            self.refused,
            self.row_limit,
        )

    @property
    def duration_ms(self) -> float | None:
        return None if self.ended is None else (self.ended - self.started) * 1000.0

    @property
    def command(self) -> str | None:
        """The command of the tag: "SELECT" of "SELECT 5", "CREATE TABLE" of "CREATE TABLE";
        None for a portal suspended at its row limit (no tag says what it ran)."""
        if not self.command_tag or self.command_tag == "SUSPENDED":
            return None
        words = self.command_tag.split()
        while words and words[-1].isdigit():
            words.pop()
        return " ".join(words) or None


def rows_of(tag: str) -> int | None:
    """Rows affected or returned, from a command tag ("INSERT 0 5" → 5, "SELECT 3" → 3)."""
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() and " " in tag else None


def split_statements(sql: str) -> list[str]:
    """Each statement's text, leading comments (and so prompt ids) kept with their statement;
    the whole string if it cannot be split (the server will say what is wrong)."""
    return statement_texts(sql) or [sql]


@dataclass
class _Prepared:
    sql: str
    portals: dict[str, tuple[str, tuple[bytes | None, ...], tuple[int, ...]]] = field(
        default_factory=dict
    )


class StatementTracker:
    """Matches the server's replies to the statements the client sent, in order."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._batch = 0
        self._queue: deque[StatementRun] = deque()
        self._statements: dict[str, str] = {}  # prepared statement name → SQL
        # portal → (statement name, params, formats)
        self._portals: dict[str, tuple[str, tuple[bytes | None, ...], tuple[int, ...]]] = {}
        self._ready: deque[int] = deque()  # the batch each expected ReadyForQuery ends

    # ------------------------------------------------------------------ client side
    def query(self, sql: str) -> None:
        self._batch += 1
        self._ready.append(self._batch)
        now = self._clock()
        for text in split_statements(sql):
            self._queue.append(StatementRun("simple", text, now, batch=self._batch))

    def parse(self, name: str, sql: str) -> None:
        self._statements[name] = sql

    def bind(
        self,
        portal: str,
        statement: str,
        params: Sequence[bytes | None],
        formats: Sequence[int],
    ) -> None:
        self._portals[portal] = (statement, tuple(params), tuple(formats))

    def execute(self, portal: str, row_limit: int = 0) -> None:
        statement, params, formats = self._portals.get(portal, ("", (), ()))
        sql = self._statements.get(statement, "")
        self._queue.append(
            StatementRun(
                "extended",
                sql,
                self._clock(),
                statement_name=statement,
                portal=portal,
                params=params,
                param_formats=formats,
                batch=self._batch + 1,  # belongs to the next Sync
                row_limit=row_limit,
            )
        )

    def function_call(self, oid: int) -> None:
        self._batch += 1
        self._ready.append(self._batch)
        self._queue.append(
            StatementRun("function", f"-- FunctionCall oid {oid}", self._clock(), batch=self._batch)
        )

    def sync(self) -> None:
        self._batch += 1
        self._ready.append(self._batch)

    def abandon(self, now: float, sqlstate: str, message: str) -> list[StatementRun]:
        """The session ends with these statements unanswered (sent, so maybe run): each
        finished with ``message``, for its record."""
        out = [run.finished(now, None, None, sqlstate, message) for run in self._queue]
        self._queue.clear()
        self._ready.clear()
        return out

    def ignored_syncs(self, count: int) -> None:
        """The last ``count`` Syncs reached a COPY FROM STDIN's server in copy-in mode, which
        ignored them: no ReadyForQuery ends their batches; the next Sync's ends them."""
        for _ in range(min(count, len(self._ready))):
            self._ready.pop()
        self._batch -= count

    def close(self, kind: bytes, name: str) -> None:
        if kind == b"S":
            self._statements.pop(name, None)
        else:
            self._portals.pop(name, None)

    # ------------------------------------------------------------------ server side
    def complete(self, tag: str) -> list[StatementRun]:
        return self._finish(tag, rows_of(tag))

    def empty(self) -> list[StatementRun]:
        return self._finish("", 0)

    def suspended(self) -> list[StatementRun]:
        """PortalSuspended: the Execute returned as many rows as it asked for."""
        rows = self._queue[0].row_limit if self._queue else 0
        return self._finish("SUSPENDED", rows or None)

    def error(self, sqlstate: str, message: str) -> list[StatementRun]:
        return self._finish(None, None, sqlstate, message)

    def refused(
        self, sqlstate: str, message: str, refusal: tuple[str, str, str | None]
    ) -> list[StatementRun]:
        """pgguard refused the statement being answered: it did not run. A simple Query is
        judged and refused whole, so each of its statements carries the refusal; in the
        extended protocol, the refused one (the server skips the rest of its batch)."""
        if not self._answering():
            return []
        batch = self._queue[0].batch
        now = self._clock()
        out: list[StatementRun] = []
        while self._queue and self._queue[0].batch == batch:
            run = self._queue.popleft()
            out.append(run.finished(now, None, None, sqlstate, message, executed=False))
            if run.protocol != "simple":
                break
        return [r._replace(refused=refusal) for r in out]

    def _answering(self) -> bool:
        """Whether the first statement queued belongs to the batch being answered: an error
        of a Parse or Bind with no Execute in its batch must not be charged to a later
        batch's statement."""
        return bool(self._queue) and not (self._ready and self._queue[0].batch != self._ready[0])

    def ready(self) -> list[StatementRun]:
        """ReadyForQuery: whatever is left of the batch it ends was not executed."""
        if not self._ready:
            return []
        batch = self._ready.popleft()
        out = []
        now = self._clock()
        while self._queue and self._queue[0].batch <= batch:
            out.append(self._queue.popleft().finished(now, executed=False))
        return out

    def _finish(
        self,
        command_tag: str | None,
        rows: int | None,
        sqlstate: str | None = None,
        error: str | None = None,
    ) -> list[StatementRun]:
        if not self._answering():
            return []
        run = self._queue.popleft()
        return [run.finished(self._clock(), command_tag, rows, sqlstate, error)]

    def pending(self) -> int:
        return len(self._queue)
