"""The gateway's end of the audit pipe against real writer processes (no PostgreSQL needed):
respawn after a failed start, no two writers on one chain, close reporting what was lost,
sessions re-sent as they are now, and signals at spawn."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pgguard.audit.chain import verify_stream
from pgguard.audit.events import SessionContext
from pgguard.audit.link import WriterConfig
from pgguard.audit.records import AuditRecord
from pgguard.audit.store import SqlStore, open_stores
from pgguard.protocol.statements import StatementRun
from pgguard.proxy.audit_link import AuditLink


def config(tmp_path: Path, mode: str = "strict") -> WriterConfig:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    for store in open_stores(url, None):
        store.close()
    return WriterConfig(url=url, jsonl=None, mode=mode, instance_id="t")


def stored(cfg: WriterConfig) -> list[AuditRecord]:
    assert cfg.url is not None
    with SqlStore(cfg.url, migrate=False) as store:
        return store.search(limit=10_000, order="asc")


async def durable(link: AuditLink, record: AuditRecord, timeout: float = 10.0) -> Any:
    done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    link.submit(record, lambda e: done.done() or done.set_result(e))
    return await asyncio.wait_for(done, timeout)


async def until(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_a_writer_that_cannot_start_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        link = AuditLink(config(tmp_path))
        await link.start()
        assert await durable(link, AuditRecord(event="policy_reload", ts=1.0)) is None
        real = subprocess.Popen
        failures = {"left": 2}

        def flaky(*args: Any, **kwargs: Any) -> Any:
            if failures["left"]:
                failures["left"] -= 1
                raise OSError(24, "Too many open files")
            return real(*args, **kwargs)

        monkeypatch.setattr(subprocess, "Popen", flaky)
        first = link.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await until(lambda: not link.healthy)
        await until(lambda: link.healthy and link.pid != first, timeout=20)
        assert failures["left"] == 0
        assert await durable(link, AuditRecord(event="policy_reload", ts=2.0)) is None
        assert await link.close(5)

    asyncio.run(main())
    assert [r.ts for r in stored(config(tmp_path))] == [1.0, 2.0]


def test_an_aborted_link_stops_the_old_writer_first(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = config(tmp_path)
        link = AuditLink(cfg)
        await link.start()
        assert await durable(link, AuditRecord(event="policy_reload", ts=1.0)) is None
        old = link.pid
        assert old is not None and link._transport is not None
        link._transport.abort()  # as after an unreadable frame
        await until(lambda: gone(old))
        await until(lambda: link.healthy and link.pid != old, timeout=20)
        for i in range(5):
            assert await durable(link, AuditRecord(event="policy_reload", ts=2.0 + i)) is None
        assert await link.close(5)
        records = stored(cfg)
        assert [r.seq for r in records] == list(range(1, 7))
        assert verify_stream(enumerate(records)).ok

    asyncio.run(main())


def test_close_says_so_when_the_writer_dies_before_writing(tmp_path: Path) -> None:
    cfg = config(tmp_path, mode="buffered")
    assert cfg.url is not None
    blocker = sqlite3.connect(cfg.url.removeprefix("sqlite:///"), isolation_level=None)

    async def main() -> bool:
        link = AuditLink(cfg)
        await link.start()
        await durable(link, AuditRecord(event="policy_reload", ts=0.5))
        blocker.execute("begin exclusive")  # the writer cannot commit now
        for i in range(100):
            link.submit(AuditRecord(event="policy_reload", ts=1.0 + i))
        pid = link.pid
        assert pid is not None
        asyncio.get_running_loop().call_later(1.0, os.kill, pid, signal.SIGKILL)
        return await link.close(10)

    try:
        assert asyncio.run(main()) is False
    finally:
        blocker.execute("rollback")
        blocker.close()


def test_a_new_writer_gets_the_sessions_as_they_are_now(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = config(tmp_path)
        link = AuditLink(cfg)
        await link.start()
        ctx = SessionContext("t", "s1", "10.0.0.1:5", "app")
        link.session(ctx)
        run = StatementRun("simple", "set pgguard.prompt_id = 'p-1'", 1.0).finished(1.1, "SET")
        ctx.note_statement(run)  # what the gateway's session does with each run
        await until(lambda: link.pid is not None)
        answered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.statement("s1", run, (None, (), None, ()), None, answered.set_result)
        assert await asyncio.wait_for(answered, 10) is None
        old = link.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await until(lambda: link.healthy and link.pid != old, timeout=20)
        second = StatementRun("simple", "select 2", 2.0).finished(2.1, "SELECT 1", 1)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.statement("s1", second, (None, (), None, ()), None, done.set_result)
        assert await asyncio.wait_for(done, 10) is None
        assert await link.close(5)
        got = [(r.statement, r.prompt_id, r.prompt_source) for r in stored(cfg)]
        assert got[-1] == ("select 2", "p-1", "set")

    asyncio.run(main())


def test_the_writer_survives_a_ctrl_c_right_after_it_starts(tmp_path: Path) -> None:
    async def main() -> None:
        link = AuditLink(config(tmp_path))
        await link.start()
        pid = link.pid
        assert pid is not None
        os.kill(pid, signal.SIGINT)  # before its own imports could ignore it
        os.kill(pid, signal.SIGHUP)
        await asyncio.sleep(1.0)
        assert not gone(pid)
        assert await durable(link, AuditRecord(event="policy_reload", ts=1.0)) is None
        assert link.pid == pid
        assert await link.close(5)

    asyncio.run(main())


def test_the_writer_gets_no_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGGUARD_JWT_SECRET", "jwt-secret-value")
    monkeypatch.setenv("MY_DB_PASSWORD", "db-secret-value")
    monkeypatch.setenv("UNRELATED", "kept")

    async def main() -> None:
        link = AuditLink(config(tmp_path), secret_env=frozenset({"MY_DB_PASSWORD"}))
        await link.start()
        assert link.pid is not None
        environ = Path(f"/proc/{link.pid}/environ").read_bytes()
        assert b"jwt-secret-value" not in environ and b"db-secret-value" not in environ
        assert b"UNRELATED=kept" in environ
        assert await link.close(5)

    asyncio.run(main())


def test_a_stdout_chain_continues_after_the_writer_is_replaced(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    async def main() -> None:
        link = AuditLink(WriterConfig(url=None, jsonl="-", mode="strict", instance_id="out"))
        await link.start()
        for i in range(3):
            assert await durable(link, AuditRecord(event="policy_reload", ts=float(i))) is None
        await until(lambda: link.status.head is not None and link.status.head[0] == 3)
        old = link.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await until(lambda: link.healthy and link.pid != old, timeout=20)
        for i in range(3, 5):
            assert await durable(link, AuditRecord(event="policy_reload", ts=float(i))) is None
        assert await link.close(5)

    asyncio.run(main())
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    records = [AuditRecord.from_json(json.loads(line)) for line in lines]
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert verify_stream(enumerate(records)).ok
