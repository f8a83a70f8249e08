"""The audit trail through real clients: one record per statement, linked to its prompt,
tamper-evident, and in strict mode never behind what a client was told."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from pgguard.audit.store import SqlStore
from tests.support.gateway import Gateway, MakeGateway, readyz

PGGUARD = str(Path(sys.executable).parent / "pgguard")


def audited(
    make_gateway: MakeGateway, tmp_path: Path, mode: str = "strict", **extra: Any
) -> Gateway:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    return make_gateway(audit={"url": url, "mode": mode}, **extra)


def prompt_log_table(pg: Any, table: str) -> None:
    """A table whose trigger stamps each row with ``pgguard.prompt_id`` as the server has it."""
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as admin:
        admin.execute(
            f"""
            drop table if exists public.{table};
            create table public.{table} (id serial primary key, note text, prompt text);
            create or replace function public.stamp_{table}() returns trigger language plpgsql
              as $$ begin new.prompt := current_setting('pgguard.prompt_id', true);
                     return new; end $$;
            create trigger stamp before insert on public.{table}
              for each row execute function public.stamp_{table}();
            grant all on public.{table} to public;
            grant all on sequence public.{table}_id_seq to public;
            """
        )


def allowing(make_gateway: MakeGateway, tmp_path: Path) -> Gateway:
    """An audited gateway whose policy allows everything (so every statement is judged)."""
    policy = tmp_path / "allow.yaml"
    policy.write_text("version: 1\ndefaults: {action: allow}\nrules: []\n")
    return audited(make_gateway, tmp_path, policies=[str(policy)])


def records(gw: Gateway, **filters: Any) -> list[Any]:
    store = SqlStore(gw.config["audit"]["url"], migrate=False)
    try:
        return store.search(limit=1_000_000, order="asc", **filters)
    finally:
        store.close()


def eventually(check: Any, timeout: float = 10.0) -> Any:
    """Records written without waiting (session and auth events) land a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def works_again(gw: Gateway, user: str, sql: bytes, timeout: float) -> None:
    """Run ``sql`` in a new session of ``user`` until it succeeds (the store is back)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(gw.dsn(user), autocommit=True) as conn:
                conn.execute(sql)
            return
        except psycopg.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def statements(gw: Gateway, user: str) -> list[Any]:
    return [r for r in records(gw, user=user) if r.event == "statement"]


def test_one_record_per_statement_with_prompt_links(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    gw = audited(make_gateway, tmp_path)
    dsn = gw.dsn("ana", groups=["dev"], claims={"prompt_id": "from-jwt", "agent": "cursor"})
    with psycopg.connect(dsn, autocommit=True, options="-c pgguard.prompt_id=from-startup") as conn:
        conn.execute(b"/* prompt_id='from%20comment' */ select 1; select 2")
        conn.execute("select %s::int + 1", (41,))  # extended, with a parameter
        conn.execute("set pgguard.prompt_id = 'from-set'")
        conn.execute(b"select 3")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("set role postgres")
        with pytest.raises(errors.DivisionByZero):
            conn.execute("select 1/0")
    got = statements(gw, "ana")
    summary = [(r.statement, r.prompt_id, r.prompt_source, r.decision, r.sqlstate) for r in got]
    assert summary == [
        ("/* prompt_id='from%20comment' */ select 1", "from comment", "comment", "allow", None),
        ("select 2", "from-startup", "startup", "allow", None),
        ("select $1::int + 1", "from-startup", "startup", "allow", None),
        ("set pgguard.prompt_id = 'from-set'", "from-set", "set", "allow", None),
        ("select 3", "from-set", "set", "allow", None),
        ("set role postgres", "from-set", "set", "deny", "42501"),
        ("select 1/0", "from-set", "set", "allow", "22012"),
    ]
    extended = got[2]
    # psycopg sends the int in binary: audited as base64 (0x0029 = 41)
    assert extended.protocol == "extended" and extended.params == ("base64:ACk=",)
    assert got[5].rule == "identity-guard"
    assert all(r.agent == "cursor" and r.groups == ("dev",) for r in got)
    assert all(r.fingerprint and r.duration_ms is not None for r in got)
    events = eventually(
        lambda: (
            [r.event for r in records(gw, user="ana") if r.event == "session_end"]
            and [r.event for r in records(gw, user="ana")]
        )
    )
    assert events[0] == "session_start" and events[-1] == "session_end"


def test_jwt_prompt_and_auth_failures(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = audited(make_gateway, tmp_path)
    with psycopg.connect(gw.dsn("bo", claims={"prompt_id": "p-jwt"}), autocommit=True) as conn:
        conn.execute("select 1")
    [run] = statements(gw, "bo")
    assert (run.prompt_id, run.prompt_source) == ("p-jwt", "jwt")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(gw.dsn("bo", password="not-a-token"))
    failures = eventually(lambda: records(gw, event="auth_failure"))
    assert failures and failures[-1].user == "bo"
    assert failures[-1].sqlstate == "28000" and failures[-1].extra["error"].startswith("pgguard:")
    assert "not-a-token" not in json.dumps([r.to_json() for r in failures])
    # Logging in as someone else through a startup option: refused, and on the record.
    with pytest.raises(psycopg.OperationalError, match="reserved"):
        psycopg.connect(gw.dsn("bo", options="-c pgguard.user=admin"))
    refused = eventually(
        lambda: [r for r in records(gw, event="auth_failure") if r.extra["reason"] != "malformed"]
    )
    assert [(r.user, r.extra["reason"]) for r in refused] == [("bo", "startup_refused")]
    assert refused[0].sqlstate and "pgguard.user" in refused[0].extra["error"]
    ends = [r for r in records(gw, user="bo") if r.event in ("session_start", "session_end")]
    assert [r.event for r in ends] == ["session_start", "session_end"]  # the first session's


def test_secrets_are_redacted_in_statement_text(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = audited(make_gateway, tmp_path)
    with psycopg.connect(gw.dsn("cy"), autocommit=True) as conn:
        conn.execute("drop role if exists audit_tmp_role")
        conn.execute("create role audit_tmp_role password 'hunter2-secret'")
        conn.execute("drop role audit_tmp_role")
    texts = [r.statement for r in statements(gw, "cy")]
    assert any("create role audit_tmp_role" in t for t in texts)
    assert not any("hunter2-secret" in t for t in texts)


def test_search_verify_and_tamper_detection_via_cli(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    gw = audited(make_gateway, tmp_path)
    with psycopg.connect(gw.dsn("dee"), autocommit=True) as conn:
        for i in range(5):
            conn.execute(f"select {i}".encode())
    config = str(gw.config_path)
    out = subprocess.run(
        [PGGUARD, "audit", "search", "--config", config, "--user", "dee", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["statement"] for r in lines if r["event"] == "statement"] == [
        f"select {i}" for i in range(5)
    ]
    for key in ("event", "ts", "instance_id", "session_id", "prompt_source", "class", "hash"):
        assert key in lines[0]
    verify = subprocess.run(
        [PGGUARD, "audit", "verify", "--config", config], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0, verify.stdout
    gw.stop()
    import sqlite3

    db = sqlite3.connect(gw.config["audit"]["url"].removeprefix("sqlite:///"))
    db.execute("update audit_records set statement = 'select 99' where statement = 'select 2'")
    db.commit()
    db.close()
    broken = subprocess.run(
        [PGGUARD, "audit", "verify", "--config", config], capture_output=True, text=True, timeout=60
    )
    assert broken.returncode == 1
    assert "edited" in broken.stdout


def test_buffered_mode_flushes_on_sigterm(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = audited(make_gateway, tmp_path, mode="buffered")
    with psycopg.connect(gw.dsn("eve"), autocommit=True) as conn:
        for i in range(200):
            conn.execute(f"select {i}".encode())
    assert gw.proc is not None
    os.kill(gw.proc.pid, signal.SIGTERM)
    assert gw.proc.wait(20) == 0
    assert len(statements(gw, "eve")) == 200


def test_strict_mode_loses_nothing_acknowledged_on_kill_9(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    gw = audited(make_gateway, tmp_path)
    acknowledged: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        try:
            with psycopg.connect(gw.dsn(f"crash{n}"), autocommit=True) as conn:
                i = 0
                while not stop.is_set():
                    text = f"select {n * 100000 + i}"
                    conn.execute(text.encode())
                    acknowledged.append(text)  # the client saw it succeed
                    i += 1
        except psycopg.Error:
            pass  # the gateway died under us

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    assert gw.proc is not None
    os.kill(gw.proc.pid, signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(10)
    gw.proc.wait(10)
    assert len(acknowledged) > 50
    stored = {r.statement for r in records(gw, event="statement")}
    missing = [text for text in acknowledged if text not in stored]
    assert missing == [], f"{len(missing)} acknowledged statements have no record"


def test_strict_mode_refuses_statements_when_the_store_fails(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    import sqlite3

    gw = audited(make_gateway, tmp_path)
    path = gw.config["audit"]["url"].removeprefix("sqlite:///")
    with psycopg.connect(gw.dsn("fay"), autocommit=True) as conn:
        conn.execute("select 1")
        # Another process holds the store's write lock: the writer cannot commit.
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("begin exclusive")
        try:
            started = time.monotonic()
            with pytest.raises(psycopg.Error) as info:
                conn.execute(b"select 2")
            assert "audit" in str(info.value)
            assert time.monotonic() - started < 20
        finally:
            blocker.execute("rollback")
            blocker.close()
    # Once the store is back, sessions work again and the held record was not lost.
    works_again(gw, "fay", b"select 3", timeout=20)
    texts = [r.statement for r in statements(gw, "fay")]
    assert "select 2" in texts and "select 3" in texts


def test_sessions_are_recorded_and_replayed(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = audited(make_gateway, tmp_path, recording={"max_rows": 5, "max_bytes": 65536})
    with psycopg.connect(gw.dsn("gus"), autocommit=True) as conn:
        conn.execute(b"select g, 'row ' || g as label from generate_series(1, 12) g").fetchall()
        with pytest.raises(errors.DivisionByZero):
            conn.execute("select 1/0")
    config = str(gw.config_path)
    listing = subprocess.run(
        [PGGUARD, "sessions", "list", "--config", config, "--user", "gus", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    [session] = [json.loads(line) for line in listing.splitlines()]

    def show() -> str:
        out = subprocess.run(
            [PGGUARD, "sessions", "show", "--config", config, session["session_id"]],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return "" if "(still open)" in out else out  # wait for the session_end record

    shown = eventually(show)
    assert "=> select g, 'row ' || g as label from generate_series(1, 12) g" in shown
    assert " 5 | row 5" in shown and "row 6" not in shown
    assert "7 more rows not recorded" in shown and "(12 rows)" in shown
    assert "=> select 1/0" in shown and "ERROR:  division by zero" in shown


def test_policy_reloads_and_tail_are_audited(make_gateway: MakeGateway, tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules: []\n")
    gw = audited(make_gateway, tmp_path, policies=[str(policy)])
    assert gw.proc is not None
    policy.write_text("version: 1\nrules:\n  - name: BAD NAME\n")
    os.kill(gw.proc.pid, signal.SIGHUP)
    reloads = eventually(lambda: records(gw, event="policy_reload"))
    assert reloads and reloads[-1].extra["applied"] is False
    with psycopg.connect(gw.dsn("hal"), autocommit=True) as conn:
        conn.execute(b"select 'tail me'")
    tail = subprocess.run(
        [
            PGGUARD,
            "audit",
            "tail",
            "--config",
            str(gw.config_path),
            "--no-follow",
            "--json",
            "--last",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "select 'tail me'" in tail


def test_a_query_sent_with_the_password_is_audited(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    """A client may pipeline its first query right behind the password: it must be recorded."""
    import socket as socketlib

    from pgguard.protocol import messages as m

    gw = audited(make_gateway, tmp_path)
    token = gw.token("ivy")
    with socketlib.create_connection((gw.host, gw.port), timeout=10) as sock:
        sock.sendall(m.StartupMessage((("user", "ivy"), ("database", "app"))).encode())
        assert sock.recv(1024)[:1] == b"R"  # AuthenticationCleartextPassword
        sock.sendall(
            m.PasswordMessage(token.encode()).encode() + m.Query("select 'first one'").encode()
        )
        received = b""
        while received.count(b"Z\x00\x00\x00\x05") < 2:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        assert b"first one" in received
        sock.sendall(m.Terminate().encode())
    texts = [r.statement for r in statements(gw, "ivy")]
    assert texts == ["select 'first one'"]


def test_row_limit_errors_are_audited_as_the_client_saw_them(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    policy = tmp_path / "limits.yaml"
    policy.write_text(
        "version: 1\nlimits:\n  - when: {groups: [capped]}\n    max_rows: 3\n"
        "  - when: {groups: [trimmed]}\n    max_rows: 3\n    on_max_rows: truncate\n"
    )
    gw = audited(make_gateway, tmp_path, policies=[str(policy)])
    with (
        psycopg.connect(gw.dsn("cap", groups=["capped"]), autocommit=True) as conn,
        pytest.raises(errors.ProgramLimitExceeded),
    ):
        conn.execute("select g from generate_series(1, 10) g").fetchall()
    with psycopg.connect(gw.dsn("trim", groups=["trimmed"]), autocommit=True) as conn:
        assert len(conn.execute("select g from generate_series(1, 10) g").fetchall()) == 3
    [capped] = eventually(lambda: statements(gw, "cap"))
    assert capped.sqlstate == "54000" and capped.rows is None
    [trimmed] = eventually(lambda: statements(gw, "trim"))
    assert trimmed.sqlstate is None and trimmed.rows == 3


def test_comment_prompt_ids_reach_database_triggers(
    make_gateway: MakeGateway, tmp_path: Path, pg: Any
) -> None:
    """`/* prompt_id='…' */` is set as pgguard.prompt_id upstream before the statement runs,
    so a trigger can record which prompt wrote a row."""
    prompt_log_table(pg, "prompt_log")
    gw = allowing(make_gateway, tmp_path)
    with psycopg.connect(
        gw.dsn("pat", claims={"prompt_id": "jwt-prompt"}), autocommit=True
    ) as conn:
        conn.execute(b"insert into prompt_log(note) values ('plain')")
        conn.execute(b"/* prompt_id='p-123' */ insert into prompt_log(note) values ('one')")
        conn.execute(b"insert into prompt_log(note) values ('two') /* prompt_id='p%2D456' */")
        conn.execute(b"/* prompt_id='p-456' */ insert into prompt_log(note) values ('three')")
        # Without a comment again: the session's own prompt id is back for the trigger, also
        # after a set_config of another setting (a row-level security key, say).
        conn.execute(b"select set_config('app.tenant', '7', false)")
        conn.execute(b"insert into prompt_log(note) values ('four')")
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as admin:
        rows = admin.execute("select note, prompt from public.prompt_log order by id").fetchall()
    assert rows == [
        ("plain", "jwt-prompt"),
        ("one", "p-123"),
        ("two", "p-456"),
        ("three", "p-456"),
        ("four", "jwt-prompt"),
    ]

    def logged() -> list[Any]:
        found = [r for r in statements(gw, "pat") if "prompt_log" in r.statement]
        return found if len(found) == 5 else []

    records = eventually(logged)
    assert [(r.prompt_id, r.prompt_source) for r in records] == [
        ("jwt-prompt", "jwt"),
        ("p-123", "comment"),
        ("p-456", "comment"),
        ("p-456", "comment"),
        ("jwt-prompt", "jwt"),
    ]


def writer_process(gw: Gateway) -> int:
    """The pid of the gateway's audit writer process (its child running pgguard.audit.daemon)."""
    assert gw.proc is not None
    pid = gw.proc.pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"pgguard.audit.daemon" in cmdline:
                return int(child)
        time.sleep(0.05)
    raise AssertionError("no audit writer process")


def gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_the_writer_process_never_outlives_its_gateway(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    gw = audited(make_gateway, tmp_path / "a")
    writer = writer_process(gw)
    gw.stop()
    assert gone(writer), "the audit writer outlived a SIGTERM'd gateway"
    crashed = audited(make_gateway, tmp_path / "b")
    writer = writer_process(crashed)
    assert crashed.proc is not None
    os.kill(crashed.proc.pid, signal.SIGKILL)
    crashed.proc.wait(10)
    assert gone(writer), "the audit writer outlived a killed gateway"


def test_a_killed_writer_process_is_replaced_and_nothing_acknowledged_is_lost(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    gw = audited(make_gateway, tmp_path)
    acknowledged: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                with psycopg.connect(gw.dsn(f"w{n}"), autocommit=True) as conn:
                    while not stop.is_set():
                        text = f"select {n * 100000 + i}"
                        i += 1
                        conn.execute(text.encode())
                        acknowledged.append(text)
            except psycopg.Error as exc:
                failures.append(str(exc))
                time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    first = writer_process(gw)
    os.kill(first, signal.SIGKILL)
    before = len(acknowledged)
    time.sleep(4.0)
    stop.set()
    for t in threads:
        t.join(15)
    assert failures and all("audit" in f for f in failures), failures[:3]
    assert len(acknowledged) > before + 20, "statements did not succeed again"
    assert writer_process(gw) != first
    gw.stop()
    stored = {r.statement for r in records(gw, event="statement")}
    missing = [text for text in acknowledged if text not in stored]
    assert missing == [], f"{len(missing)} acknowledged statements have no record"
    verify = subprocess.run(
        [PGGUARD, "audit", "verify", "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout


def test_strict_mode_holds_a_large_result_whole(make_gateway: MakeGateway, tmp_path: Path) -> None:
    """A large result through strict mode arrives whole and in order (its completion held
    until its record is durable, back-pressure intact), and small ones after it too."""
    gw = audited(make_gateway, tmp_path)
    with psycopg.connect(gw.dsn("big"), autocommit=True) as conn:
        rows = conn.execute(
            "select g, repeat('x', 100) from generate_series(1, 50000) g"
        ).fetchall()
        assert len(rows) == 50000 and rows[-1] == (50000, "x" * 100)
        for i in range(20):
            assert conn.execute(f"select {i}".encode()).fetchone() == (i,)
    got = statements(gw, "big")
    assert got[0].rows == 50000 and len(got) == 21


def test_comment_prompt_ids_reach_triggers_through_the_extended_protocol(
    make_gateway: MakeGateway, tmp_path: Path, pg: Any
) -> None:
    """The same through Parse/Bind/Execute: parameters, a prepared statement run again under
    another prompt, a pipeline of several statements in one batch, and one that fails."""
    prompt_log_table(pg, "prompt_log_x")
    gw = allowing(make_gateway, tmp_path)
    insert = "/* prompt_id='{}' */ insert into prompt_log_x(note) values (%s)"
    with psycopg.connect(gw.dsn("ext", claims={"prompt_id": "jwt-x"}), autocommit=True) as conn:
        conn.execute("insert into prompt_log_x(note) values (%s)", ("plain",))
        conn.execute(insert.format("e-1"), ("one",))
        conn.execute(insert.format("e-2"), ("two",), prepare=True)
        conn.execute(insert.format("e-2"), ("two again",), prepare=True)
        conn.execute(insert.format("e-1"), ("one again",))
        # One batch (one Sync): each statement gets its own prompt id, tagged or not.
        with conn.pipeline():
            conn.execute(insert.format("e-3"), ("three",))
            conn.execute(insert.format("e-4"), ("four",))
            conn.execute("insert into prompt_log_x(note) values (%s)", ("after",))
        # A batch that fails rolls back the prompt id set within it: the next statement with
        # that prompt id sets it again.
        with pytest.raises(errors.UniqueViolation), conn.pipeline():
            conn.execute("insert into prompt_log_x(note) values (%s)", ("pre",))
            conn.execute(insert.format("e-5"), ("five",))
            conn.execute(
                "/* prompt_id='e-5' */ insert into prompt_log_x(id, note) values (1, %s)",
                ("dup",),
            )
        conn.execute(insert.format("e-5"), ("six",))
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as admin:
        rows = admin.execute("select note, prompt from public.prompt_log_x order by id").fetchall()
    assert rows == [
        ("plain", "jwt-x"),
        ("one", "e-1"),
        ("two", "e-2"),
        ("two again", "e-2"),
        ("one again", "e-1"),
        ("three", "e-3"),
        ("four", "e-4"),
        ("after", "jwt-x"),
        ("six", "e-5"),
    ]

    def logged() -> list[Any]:
        found = [r for r in statements(gw, "ext") if "prompt_log_x" in r.statement]
        return found if len(found) == 12 else []

    records = eventually(logged)
    assert [r.prompt_id for r in records] == [
        *("jwt-x", "e-1", "e-2", "e-2", "e-1", "e-3", "e-4", "jwt-x"),
        *("jwt-x", "e-5", "e-5", "e-5"),
    ]


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_prompt_ids_in_a_failed_transaction_never_block_its_rollback(
    make_gateway: MakeGateway, tmp_path: Path, protocol: str
) -> None:
    """In a failed transaction block nothing of pgguard's own can run (the server refuses it
    up to the block's end): commented statements fail as they would, and ROLLBACK ends the
    block (a set_config slipped in before it would fail it, or, before a simple Query, leave
    the server waiting for a Sync)."""
    gw = allowing(make_gateway, tmp_path)
    cursor_factory = psycopg.ClientCursor if protocol == "simple" else psycopg.Cursor
    with psycopg.connect(
        gw.dsn("fail", claims={"prompt_id": "jwt-f"}),
        autocommit=True,
        cursor_factory=cursor_factory,
        connect_timeout=5,
        options="-c statement_timeout=10000",
    ) as conn:
        conn.execute("begin")
        with pytest.raises(errors.DivisionByZero):
            conn.execute("/* prompt_id='f-1' */ select 1/0")
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("/* prompt_id='f-2' */ select 1")
        conn.execute("rollback")
        assert conn.execute("/* prompt_id='f-3' */ select 1").fetchone() == (1,)
        row = conn.execute("select current_setting('pgguard.prompt_id', true)").fetchone()
        assert row == ("jwt-f",)  # the session's own again, after the commented statement
    logged = eventually(lambda: [r for r in statements(gw, "fail") if "1/0" in r.statement])
    assert [(r.prompt_id, r.sqlstate) for r in logged] == [("f-1", "22012")]


def test_prompt_ids_through_asyncpg_named_prepared_statements(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    """asyncpg prepares every statement under a name (Parse/Describe/Sync, then Bind/Execute/
    Sync): each execution still runs under its own comment's prompt id, a prepared statement
    run again after an uncommented one too."""
    import asyncio

    import asyncpg

    gw = allowing(make_gateway, tmp_path)
    current = "select current_setting('pgguard.prompt_id', true)"

    async def session() -> list[Any]:
        token = gw.token("apg", prompt_id="jwt-a")
        conn = await asyncpg.connect(
            host=gw.host, port=gw.port, user="apg", password=token, database="app", ssl=False
        )
        try:
            seen = [await conn.fetchval(f"/* prompt_id='a-1' */ {current}")]
            seen.append(await conn.fetchval(current))
            with_param = f"/* prompt_id='a-2' */ {current} where $1::int = 1"
            seen.append(await conn.fetchval(with_param, 1))
            prepared = await conn.prepare(f"/* prompt_id='a-3' */ {current}")
            seen.append(await prepared.fetchval())
            seen.append(await conn.fetchval(current))
            seen.append(await prepared.fetchval())
            return seen
        finally:
            await conn.close()

    assert asyncio.run(session()) == ["a-1", "jwt-a", "a-2", "a-3", "jwt-a", "a-3"]


def test_a_rolled_back_prompt_id_is_set_again(
    make_gateway: MakeGateway, tmp_path: Path, pg: Any
) -> None:
    """A ROLLBACK undoes the set_config pgguard ran inside the block: the next statement
    with that prompt id sets it again instead of trusting it is still there."""
    prompt_log_table(pg, "prompt_log_r")
    gw = allowing(make_gateway, tmp_path)
    tagged = "/* prompt_id='r-1' */ insert into prompt_log_r(note) values (%s)"
    with psycopg.connect(gw.dsn("rb", claims={"prompt_id": "jwt-r"}), autocommit=True) as conn:
        conn.execute("begin")
        conn.execute(tagged, ("undone",))
        conn.execute("/* prompt_id='r-1' */ rollback")
        conn.execute(tagged, ("kept",))
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as admin:
        rows = admin.execute("select note, prompt from public.prompt_log_r order by id").fetchall()
    assert rows == [("kept", "r-1")]


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 4 MB filesystem of its own (tmpfs), to be filled up; needs root (CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk``: a file written until the disk refuses."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass
    return filler


def test_strict_mode_on_a_full_disk_refuses_then_recovers_losing_nothing(
    make_gateway: MakeGateway, small_disk: Path
) -> None:
    url = f"sqlite:///{small_disk / 'audit.db'}"
    gw = make_gateway(audit={"url": url, "mode": "strict", "strict_timeout": "5s"})
    acknowledged: list[str] = []
    with psycopg.connect(gw.dsn("disk"), autocommit=True) as conn:
        for i in range(20):
            conn.execute(f"select {i}".encode())
            acknowledged.append(f"select {i}")
    filler = fill(small_disk)
    refused: psycopg.Error | None = None
    with psycopg.connect(gw.dsn("disk"), autocommit=True) as conn:
        # SQLite's WAL may hold a little room already: a few commits can still go through.
        for i in range(100, 2100):
            try:
                conn.execute(f"select {i}".encode())
            except psycopg.Error as exc:
                refused = exc
                break
            acknowledged.append(f"select {i}")
    assert refused is not None, "a full disk never stopped a strict statement"
    assert refused.sqlstate == "58030", refused
    assert "pgguard: audit" in str(refused)
    assert "disk is full" in gw.read_log()  # the log says why
    # While the disk stays full, statements are refused, clearly, not left hanging.
    started = time.monotonic()
    with (
        pytest.raises(psycopg.Error) as again,
        psycopg.connect(gw.dsn("disk"), autocommit=True) as conn,
    ):
        conn.execute(b"select 'while full'")
    assert "audit" in str(again.value)
    assert time.monotonic() - started < 15
    # Room again: sessions work, and every statement a client saw succeed has its record.
    filler.unlink()
    works_again(gw, "disk", b"select 'after'", timeout=30)
    stored = [r.statement for r in statements(gw, "disk")]
    missing = [text for text in acknowledged if text not in stored]
    assert missing == [], f"{len(missing)} acknowledged statements have no record"
    assert "select 'after'" in stored
    verified = subprocess.run(
        [PGGUARD, "audit", "verify", "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_buffered_mode_keeps_records_through_a_full_disk(
    make_gateway: MakeGateway, small_disk: Path
) -> None:
    gw = make_gateway(audit={"url": f"sqlite:///{small_disk / 'audit.db'}", "mode": "buffered"})
    with psycopg.connect(gw.dsn("spill"), autocommit=True) as conn:
        conn.execute(b"select 'before'")
        assert eventually(lambda: statements(gw, "spill"))
        filler = fill(small_disk)
        # Buffered mode never refuses a statement: the records wait in the writer's queue.
        for i in range(300):
            conn.execute(f"select {i}".encode())
        assert eventually(lambda: "disk is full" in gw.read_log(), timeout=10)
        filler.unlink()
        texts = eventually(
            lambda: (
                found if len(found := [r.statement for r in statements(gw, "spill")]) > 300 else []
            ),
            timeout=30,
        )
    assert texts[0] == "select 'before'"
    assert texts[1:] == [f"select {i}" for i in range(300)]


def test_readyz_says_the_audit_is_failing_while_its_writer_is_replaced(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    gw = audited(make_gateway, tmp_path)
    assert readyz(gw)[0] == 200
    os.kill(writer_process(gw), signal.SIGKILL)
    seen: list[tuple[int, dict[str, Any]]] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        seen.append(readyz(gw))
        if seen[-1][0] == 200 and any(status == 503 for status, _ in seen):
            break
        time.sleep(0.05)
    unready = [body for status, body in seen if status == 503]
    assert unready, "the dead writer never showed in /readyz"
    assert unready[0]["failed"] == ["audit"]
    assert unready[0]["checks"]["audit"].startswith("audit store failing")
    assert seen[-1][0] == 200, "the replaced writer never made the gateway ready again"
    assert seen[-1][1]["checks"]["audit"] == "ok"
    with psycopg.connect(gw.dsn("ready"), autocommit=True) as conn:
        conn.execute(b"select 'after the writer came back'")
    assert [r.statement for r in statements(gw, "ready")] == ["select 'after the writer came back'"]


def test_an_extended_protocol_copy_leaves_the_session_in_step(
    make_gateway: MakeGateway, tmp_path: Path, pg: Any
) -> None:
    """libpq's way (PQexecParams): the Sync sent with the COPY's Execute reaches the server in
    copy-in mode, which ignores it; the Sync after CopyDone gets the one ReadyForQuery."""
    from tests.support import rawpg

    prompt_log_table(pg, "copy_log")
    gw = allowing(make_gateway, tmp_path)
    with rawpg.connect("127.0.0.1", gw.port, "copier", "app", gw.token("copier")) as raw:
        raw.sock.settimeout(10)
        raw.parse("", "COPY public.copy_log (note) FROM STDIN")
        raw.bind("", "", [])
        raw.describe("P", "")
        raw.execute("", 0)
        raw.sync()
        kinds = [k for k, _ in raw.read_messages(4)]
        assert kinds == [b"1", b"2", b"n", b"G"]
        raw.send(b"d", b"one\ntwo\n")
        raw.send(b"c")
        raw.sync()
        assert [k for k, _ in raw.read_until_ready()] == [b"C", b"Z"]
        # pgguard's own query (setting the prompt id) must not wait for a reply that never
        # comes: the statement runs, and its trigger sees the prompt id.
        result = raw.query(
            "/* prompt_id='after-copy' */ insert into public.copy_log(note) values ('x')"
        )
        assert result.error is None, result.error
        result = raw.query("select note, prompt from public.copy_log order by id")
    assert [(note, prompt or b"") for note, prompt in result.rows[0]] == [
        (b"one", b""),
        (b"two", b""),
        (b"x", b"after-copy"),
    ]
    # Each statement's record holds its own outcome (none is pushed to a later ReadyForQuery).
    recorded = [
        (r.statement, r.command, r.rows, r.extra.get("executed", True))
        for r in statements(gw, "copier")
    ]
    assert recorded == [
        ("COPY public.copy_log (note) FROM STDIN", "COPY", 2, True),
        (
            "/* prompt_id='after-copy' */ insert into public.copy_log(note) values ('x')",
            "INSERT",
            1,
            True,
        ),
        ("select note, prompt from public.copy_log order by id", "SELECT", 3, True),
    ]


def test_refusals_are_recorded_as_the_relay_made_them(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    """A refused multi-statement Query: none of it ran, each record says so and names the
    rule; a statement pgguard cannot analyse is refused by ``parser``; a server error that
    reads like a refusal is the server's."""
    from tests.support import rawpg

    policy = tmp_path / "no-deletes.yaml"
    policy.write_text(
        "version: 1\ndefaults: {action: allow}\nrules:\n"
        "  - name: no-deletes\n    match: {commands: [DELETE]}\n    action: deny\n"
        "    message: deletes are not allowed\n"
    )
    gw = audited(make_gateway, tmp_path, policies=[str(policy)])
    with rawpg.connect("127.0.0.1", gw.port, "refused", "app", gw.token("refused")) as raw:
        result = raw.query("select 'm1'; delete from public.items; select 'm3'")
        assert result.error is not None and result.error.sqlstate == "42501"
        result = raw.query("selec 1")
        assert result.error is not None and "pgguard: parser" in result.error.message
        result = raw.query(
            "do $$ begin raise exception 'pgguard: admin: refused' using errcode = '42501'; end $$"
        )
        assert result.error is not None
    recorded = [
        (r.statement, r.decision, r.rule, r.sqlstate, r.extra.get("executed", True))
        for r in statements(gw, "refused")
    ]
    assert recorded[:4] == [
        ("select 'm1'", "deny", "no-deletes", "42501", False),
        ("delete from public.items", "deny", "no-deletes", "42501", False),
        ("select 'm3'", "deny", "no-deletes", "42501", False),
        ("selec 1", "deny", "parser", "42601", False),
    ]
    assert recorded[4][1:4] == ("allow", None, "42501")
    transcript = subprocess.run(
        [PGGUARD, "sessions", "show", statements(gw, "refused")[0].session_id or "",
         "--config", str(gw.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert transcript.returncode == 0, transcript.stderr
    after_delete = transcript.stdout.split("=> delete from public.items", 1)[1].split("=>")[0]
    assert "DELETE" not in after_delete  # never shown as if it ran
    assert "deletes are not allowed" in after_delete


def test_the_recorded_prompt_id_is_the_one_the_server_has(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    """However the client changes pgguard.prompt_id (quoting, comments, set_config, LOCAL,
    a rolled-back block, RESET ALL, DISCARD ALL), the record of the next statement carries
    the value the server then has."""
    gw = audited(make_gateway, tmp_path)
    changes = [
        "SET pgguard.prompt_id = unquoted_p",
        "/* note */ SET pgguard.prompt_id = 'after-comment'",
        "SET \"pgguard\".prompt_id = 'quoted-name'",
        "select set_config('pgguard.prompt_id', 'via-set-config', false)",
        "BEGIN; SET pgguard.prompt_id = 'rolled-back'; ROLLBACK",
        "BEGIN; SET LOCAL pgguard.prompt_id = 'local-only'; COMMIT",
        "RESET ALL",
        "SET pgguard.prompt_id = 'before-discard'",
        "DISCARD ALL",
    ]
    seen: list[str] = []
    with psycopg.connect(gw.dsn("pia", claims={"prompt_id": "tok"}), autocommit=True) as conn:
        for change in changes:
            conn.execute(change.encode())
            row = conn.execute(b"select current_setting('pgguard.prompt_id', true)").fetchone()
            assert row is not None
            seen.append(row[0])
    asked = [
        r for r in statements(gw, "pia") if r.statement and r.statement.startswith("select curr")
    ]
    assert [r.prompt_id for r in asked] == seen
    assert seen[:4] == ["unquoted_p", "after-comment", "quoted-name", "via-set-config"]
    assert seen[4:] == ["via-set-config", "via-set-config", "tok", "before-discard", "tok"]


@pytest.mark.parametrize("mode", ["strict", "buffered"])
def test_a_client_that_leaves_mid_statement_leaves_a_true_record(
    make_gateway: MakeGateway, tmp_path: Path, pg: Any, mode: str
) -> None:
    """Closing the socket must not be a way to run a statement without a trace: pgguard
    cancels what is running, reads how it ended, and records that."""
    from tests.support import rawpg

    table = f"leave_{mode}"
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as admin:
        admin.execute(f"drop table if exists public.{table}")
        admin.execute(f"create table public.{table} (v text)")
        admin.execute(f"grant all on public.{table} to public")
    gw = audited(make_gateway, tmp_path, mode=mode)
    sql = {
        "write": f"insert into public.{table} select 'slow' from pg_sleep(0.5)",
        "read": "select g, repeat('x', 200) from generate_series(1, 3000000) g",
    }
    for what, text in sql.items():
        user = f"leaver_{what}"
        raw = rawpg.connect("127.0.0.1", gw.port, user, "app", gw.token(user))
        raw.send(b"Q", text.encode() + b"\x00")
        if what == "read":
            raw.read_message()  # the result has started
        raw.sock.close()
    for what, text in sql.items():
        [record] = eventually(lambda w=what: statements(gw, f"leaver_{w}"), timeout=20)
        assert record.statement == text
        if what == "write":
            with psycopg.connect(pg.superuser_app_dsn()) as admin:
                row = admin.execute(f"select count(*) from public.{table}").fetchone()
            committed = row is not None and row[0] == 1
            # Either it ran (and says so) or the cancel stopped it (and says so).
            assert (
                (record.command, record.rows) == ("INSERT", 1)
                if committed
                else (record.sqlstate == "57014")
            )
        else:
            assert record.sqlstate == "57014"  # cancelled, not left running to nowhere
    ends = eventually(lambda: records(gw, event="session_end"), timeout=20)
    assert len(ends) == 2


def test_statements_in_a_single_byte_client_encoding(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    """A LATIN1 client's statements are judged and recorded with their own letters; bytes that
    are not valid in the client's encoding get the server's error, and the session goes on."""
    from tests.support import rawpg

    policy = tmp_path / "rules.yaml"  # a rule, so that every statement is analysed
    policy.write_text(
        "version: 1\ndefaults: {action: allow}\nrules:\n"
        "  - name: no-deletes\n    match: {commands: [DELETE]}\n    action: deny\n"
    )
    gw = audited(make_gateway, tmp_path, policies=[str(policy)])
    with psycopg.connect(gw.dsn("latin"), autocommit=True) as conn:
        conn.execute("set client_encoding to 'LATIN1'")
        assert conn.execute("select 'café' as word").fetchone() == ("café",)
        cur = conn.cursor()
        assert cur.execute("select %s::text || 'é'", ("naïve",)).fetchone() == ("naïveé",)
    # The encoding asked for at login (reported in the server's greeting) counts too.
    with psycopg.connect(gw.dsn("latin", client_encoding="LATIN1"), autocommit=True) as conn:
        assert conn.execute("select 'über' as word").fetchone() == ("über",)
    with rawpg.connect("127.0.0.1", gw.port, "bytes", "app", gw.token("bytes")) as raw:
        raw.send(b"Q", b"select 'caf\xff'\x00")
        result = raw.read_until_ready()
        kinds = [k for k, _ in result]
        assert kinds == [b"E", b"Z"]
        assert rawpg.parse_fields(result[0][1])["C"] == "22021"  # as the server would say
        assert raw.query("select 1").rows == [[[b"1"]]]
    texts = [r.statement for r in statements(gw, "latin")]
    assert "select 'café' as word" in texts and "select 'über' as word" in texts
    recorded = statements(gw, "bytes")
    assert [(r.statement, r.sqlstate) for r in recorded] == [
        ("select 'caf\xff'", "22021"),
        ("select 1", None),
    ]


def test_a_portal_fetched_in_pieces_is_recorded_piece_by_piece(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    """Executes with a row limit (asyncpg's fetchrow, cursors): each piece's record says what
    ran and how many rows the client got; one stopped at its limit says so."""
    from tests.support import rawpg

    gw = allowing(make_gateway, tmp_path)
    with rawpg.connect("127.0.0.1", gw.port, "pieces", "app", gw.token("pieces")) as raw:
        raw.query("begin")
        raw.parse("", "select g from generate_series(1, 100) g")
        raw.bind("p", "", [])
        raw.describe("P", "p")
        for limit in (30, 30, 0):
            raw.execute("p", limit)
        raw.sync()
        kinds = [k for k, _ in raw.read_until_ready()]
        assert kinds.count(b"D") == 100 and kinds.count(b"s") == 2
        raw.query("commit")
    pieces = [r for r in statements(gw, "pieces") if r.protocol == "extended"]
    assert [(r.command, r.rows, r.extra.get("suspended", False)) for r in pieces] == [
        ("SELECT", 30, True),
        ("SELECT", 30, True),
        ("SELECT", 40, False),
    ]
    assert [len(r.extra["preview"]["rows"]) for r in pieces[:1]] == [30]


def test_deeply_nested_comments_are_refused_without_stalling_others(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    gw = audited(make_gateway, tmp_path)
    deep = "/*" * 35_000 + "*/" * 35_000 + " select 1"
    with (
        psycopg.connect(gw.dsn("nester"), autocommit=True) as conn,
        psycopg.connect(gw.dsn("bystander"), autocommit=True) as other,
    ):
        with pytest.raises(psycopg.Error) as info:
            conn.execute(deep.encode())
        assert info.value.sqlstate == "54001" and "nested" in str(info.value)
        assert other.execute(b"select 2").fetchone() == (2,)
    [record] = statements(gw, "nester")
    assert (record.decision, record.rule, record.sqlstate) == ("deny", "parser", "54001")


def test_a_multibyte_client_encoding_is_read_as_such(
    make_gateway: MakeGateway, tmp_path: Path, pg: Any
) -> None:
    """EUC_JP: the guard reads the client's bytes in its encoding, so a rule naming a table
    in Japanese applies (read as anything else, the name would not match: a rule bypassed)."""
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as admin:
        admin.execute('create table if not exists public."注文" (id int)')
        admin.execute('grant all on public."注文" to public')
    policy = tmp_path / "orders.yaml"
    policy.write_text(
        "version: 1\ndefaults: {action: allow}\nrules:\n"
        "  - name: no-orders\n    match: {tables: [public.注文]}\n    action: deny\n",
        encoding="utf-8",
    )
    gw = audited(make_gateway, tmp_path, policies=[str(policy)])
    with psycopg.connect(gw.dsn("eucjp"), autocommit=True) as conn:
        conn.execute("set client_encoding to 'EUC_JP'")
        assert conn.execute("select '日本' as word").fetchone() == ("日本",)
        with pytest.raises(psycopg.Error) as info:
            conn.execute('select * from public."注文"')
        assert "no-orders" in str(info.value)
    recorded = [(r.statement, r.decision) for r in statements(gw, "eucjp")]
    assert ("select '日本' as word", "allow") in recorded
    assert ('select * from public."注文"', "deny") in recorded
