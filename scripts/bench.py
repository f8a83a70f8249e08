#!/usr/bin/env python3
"""Benchmark pgguard against direct PostgreSQL and pgbouncer; write docs/benchmarks.md.

One private PostgreSQL cluster (``pgguard.embedded.EmbeddedPostgres``) holds a
``pgbench -i -s 10`` database. Four targets serve it:

* ``direct``: PostgreSQL itself, as the ``pgguard`` role with its SCRAM password;
* ``pgguard``: ``pgguard serve`` in a subprocess, logged into with a minted JWT;
* ``floor``: ``scripts/bench_forwarder.py``, the smallest TCP forwarder in Python (uvloop,
  asyncio Protocols, no parsing), logged into with the upstream password: what Python itself
  costs for a pass-through, the bound under pgguard's;
* ``pgbouncer``: pgbouncer in session pooling (installed with apt-get when missing).

``pgbench -S`` runs for every (mode, clients) cell against every target, in alternating
order, ``--rounds`` times; the report quotes median TPS and ratios, the proxies' CPU time per
transaction, what separates pgguard from floor and floor from pgbouncer, and the memory of
pgguard and pgbouncer with 1,000 idle authenticated connections.

Guard rules: a second ``pgguard serve`` (target ``guard``) runs with a policy this script
writes (``GUARD_POLICY``, modelled on SPEC §3) and is logged into as a member of
``ai-agents``, so every statement is judged. ``pgbench -S`` (simple, extended) and two
distinct-statement workloads (custom pgbench scripts, simple mode) run through it and through
the policy-less ``pgguard``, alternating; the report quotes guard/pass-through ratios.

Audit trail: four more ``pgguard serve`` instances like ``pgguard`` but with the audit on
(``AUDIT_TARGETS``: buffered and strict into a SQLite file in the temp dir, strict into the
database ``pgguard_audit`` of the same cluster, and strict into a SQLite file with
``audit.sync: normal``). ``pgbench -S`` (simple, extended) runs
through ``pgguard`` (audit off, the baseline) and each of them, alternating; after every
audited run the script counts the statement records the run added to the store and checks
that there are at least as many as the transactions pgbench reported.

Masking: one more ``pgguard serve`` (target ``masking``) runs with a policy this script writes
(``MASK_POLICY``) masking three columns of a 10,000-row table (``MASK_TABLE``, created as the
superuser before it starts) and is logged into as a member of ``developers``, who is not
exempt. psycopg 3, in this process, fetches the whole table's three masked columns and three
clean ones, in text and binary formats, through ``masking`` and directly, alternating: rows
per second, masked/clean through ``masking``. A pgbench script selecting only the clean
columns by id runs through ``pgguard`` and ``masking`` in every mode: TPS, masking/pgguard.

Usage::

    make bench                                # = scripts/bench.py --output docs/benchmarks.md
    make bench BENCH_ARGS="--workers 2"       # extra flags pass through
    .venv/bin/python scripts/bench.py --quick # smoke run (3 s, 1 round), report on stdout only
    .venv/bin/python scripts/bench.py --duration 20 --rounds 3 --clients 1,8,32 --modes prepared

Flags: --duration S (10), --rounds N (2), --workers N (1), --output FILE, --clients "1,8",
--modes "simple,extended,prepared", --skip-pgbouncer, --skip-pgguard, --skip-floor, --skip-guard
(no guard-rules measurements), --skip-audit (no audit-trail measurements), --skip-masking (no
masking measurements), --idle-connections N (1000; 0 skips the memory test), --quick.

Everything started here is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import os
import platform
import pwd
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pgguard.embedded import EmbeddedPostgres, free_port

ROOT = Path(__file__).resolve().parent.parent
SCALE = 10
DBNAME = "bench"
UPSTREAM_ROLE = "pgguard"
BENCH_SUB = "bench-user"
TARGETS = ("direct", "pgguard", "floor", "pgbouncer")
MODES = ("simple", "extended", "prepared")
# Guard rules: the identity pgbench logs in with, and the modes of the pgbench -S comparison.
GUARD_SUB = "bench-agent"
GUARD_GROUPS = ("ai-agents",)
GUARD_MODES = ("simple", "extended")
GUARD_DISTINCT_CLIENTS = 8
# Modelled on the SPEC §3 example (and policies/demo.yaml), without masks and without
# max_rows, so pgbench's results are neither rewritten nor capped. The limits entry pins
# statement_timeout and default_transaction_read_only upstream; pgbench -S only reads.
GUARD_POLICY = """\
version: 1
rules:
  - name: ai-read-only
    when: {groups: [ai-agents]}
    match: {classes: [write, ddl, role, function, admin]}
    action: deny
    message: AI agents have read-only access
  - name: no-unbounded-delete
    match: {commands: [DELETE, UPDATE], without_where: true}
    action: deny
    message: DELETE and UPDATE need a WHERE clause
  - name: orders-writes-need-approval
    when: {groups: [developers]}
    match: {classes: [write], tables: [public.orders]}
    action: require_approval
    approvers: [dba]
    message: writes to public.orders need a DBA's approval
  - name: no-secrets
    when: {groups: [ai-agents, developers, analysts]}
    match: {tables: ["vault.*"]}
    action: deny
    message: vault.* is for DBAs only
defaults: {action: allow}
limits:
  - when: {groups: [ai-agents]}
    statement_timeout: 30s
    read_only: true
"""
# Distinct-statement workloads: (label, pgbench script). pgbench substitutes :n textually
# only with -M simple; with -M extended every :var becomes a $n parameter (the alias t:n turns
# into t$1 and the statement text never changes), so these run in simple mode only.
GUARD_WORKLOADS = (
    (
        "1,000 shapes",
        "\\set aid random(1, 100000 * :scale)\n"
        "\\set n random(1, 1000)\n"
        "SELECT abalance FROM pgbench_accounts t:n WHERE t:n.aid = :aid;\n",
    ),
    (
        "every statement new",
        "\\set aid random(1, 100000 * :scale)\n"
        "SELECT abalance FROM pgbench_accounts t:aid WHERE t:aid.aid = :aid;\n",
    ),
)
# Audit trail: (target, audit.mode, store, audit.sync) for each audited pgguard; the baseline
# is pgguard. Issue 5's targets apply to the default audit.sync (full); the sync=normal target
# shows how much of strict mode's cost is the disk flush per group commit.
AUDIT_TARGETS = (
    ("audit-buffered-sqlite", "buffered", "sqlite", "full"),
    ("audit-strict-sqlite", "strict", "sqlite", "full"),
    ("audit-strict-pg", "strict", "postgresql", "full"),
    ("audit-strict-sqlite-normal", "strict", "sqlite", "normal"),
)
AUDIT_MODES = ("simple", "extended")
AUDIT_DB = "pgguard_audit"
# Issue 5's targets: (audit mode, least ratio to pgguard with the audit off, clients or None
# for every client count).
AUDIT_GOALS = {"buffered": (0.9, None), "strict": (0.6, 8)}
AUDIT_QUIET_S = 1.0  # the store has caught up once its count has not moved for this long
AUDIT_CATCH_UP_TIMEOUT_S = 120.0
# Masking (issue 4): a table with three masked columns (MASK_TABLE_SQL), a policy that masks
# them for everyone outside dba (MASK_POLICY), and the identity of the ``masking`` target, in
# developers, so the masks apply to it.
MASK_SUB = "bench-developer"
MASK_GROUPS = ("developers",)
MASK_TABLE = "bench_masked"
MASK_ROWS = 10_000  # rows per fetch: one window of ids
# pgguard remembers the masked results of short values, per mask and format (65,536 of them
# when this was written): a fetch repeating one window measures that memo's hits. The table
# holds MASK_WINDOWS windows so the "new values" fetches can move to a window the memo has
# not seen (or has forgotten) every time.
MASK_WINDOWS = 20
MASK_TABLE_ROWS = MASK_ROWS * MASK_WINDOWS
MASK_SECRET_ENV = "PGGUARD_MASKING_SECRET"
# Realistic-looking values; ``quota`` is the clean twin of ``salary`` (same type and range),
# and ``name`` and ``city`` are clean texts of about the widths of ``email`` and ``ssn``.
MASK_TABLE_SQL = f"""\
CREATE TABLE {MASK_TABLE} (
    id int PRIMARY KEY,
    name text NOT NULL,
    city text NOT NULL,
    note text NOT NULL,
    email text NOT NULL,
    ssn text NOT NULL,
    salary numeric(10,2) NOT NULL,
    quota numeric(10,2) NOT NULL
);
INSERT INTO {MASK_TABLE}
SELECT i,
       (ARRAY['Alice','Bruno','Chiara','Dmitri','Elena','Farid','Grace','Hiroshi','Ines',
              'Jamal','Kofi'])[1 + i % 11]
         || ' ' || chr(65 + (i * 7) % 26) || '. '
         || (ARRAY['Anderson','Bianchi','Chen','Dubois','Evans','Fischer','Garcia','Haddad',
                   'Ivanova','Jensen','Kowalski','Lindqvist','Moreau'])[1 + i % 13],
       (ARRAY['Springfield, US','Lyon, France','Osaka, Japan','Porto Alegre, Brazil',
              'Gdansk, Poland','Nairobi, Kenya','Vancouver, Canada','Leeds, UK',
              'Tucson, US'])[1 + i % 9],
       'customer since ' || (2000 + i % 24) || ', tier ' || (1 + i % 4),
       'user' || i || '@example.com',
       lpad(((i::bigint * 7919) % 899 + 100)::text, 3, '0') || '-'
         || lpad(((i::bigint * 104729) % 90 + 10)::text, 2, '0') || '-'
         || lpad(((i::bigint * 15485863) % 10000)::text, 4, '0'),
       round(30000 + (i::bigint * 7907) % 170000 + (i % 100) / 100.0, 2),
       round(30000 + (i::bigint * 4799) % 170000 + (i % 97) / 100.0, 2)
FROM generate_series(1, {MASK_TABLE_ROWS}) AS i;
ALTER TABLE {MASK_TABLE} OWNER TO {UPSTREAM_ROLE};
VACUUM ANALYZE {MASK_TABLE};
"""
MASK_POLICY = f"""\
version: 1
masks:
  - column: public.{MASK_TABLE}.email
    function: partial_email
    exempt: {{groups: [dba]}}
  - column: public.{MASK_TABLE}.ssn
    function: keep_last(4)
    exempt: {{groups: [dba]}}
  - column: public.{MASK_TABLE}.salary
    function: generalize(1000)
    exempt: {{groups: [dba]}}
defaults: {{action: allow}}
"""
# The fetch comparison: the queries (one window of MASK_ROWS ids, bound as parameters), and
# the runs of each format, alternating: (values, query, target). "repeated" fetches window 1
# every time; "new" moves to the next of windows 2 to MASK_WINDOWS every time.
MASK_QUERIES = {
    "masked": f"SELECT email, ssn, salary FROM {MASK_TABLE} WHERE id BETWEEN %s AND %s",
    "clean": f"SELECT name, city, quota FROM {MASK_TABLE} WHERE id BETWEEN %s AND %s",
}
MASK_FETCH_RUNS = (
    ("repeated", "masked", "masking"),
    ("repeated", "masked", "direct"),
    ("repeated", "clean", "masking"),
    ("repeated", "clean", "direct"),
    ("new", "masked", "masking"),
    ("new", "clean", "masking"),
)
MASK_FORMATS = ("text", "binary")
MASK_FETCH_GOAL = 0.5  # masked/clean rows per second through the masking target
# The select-only comparison: the masked table, its clean columns only, by primary key.
MASK_SELECT_LABEL = "clean columns by id"
MASK_SELECT_SCRIPT = (
    f"\\set id random(1, {MASK_TABLE_ROWS})\nSELECT name, city FROM {MASK_TABLE} WHERE id = :id;\n"
)
MASK_SELECT_MODES = ("simple", "extended", "prepared")
MASK_SELECT_GOAL = 0.95  # masking/pgguard TPS
CLK_TCK = os.sysconf("SC_CLK_TCK")

TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
TXN_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc helpers


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (index 0 is the state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if Path(f"/proc/{pid}").exists():
            tree.append(pid)
            todo.extend(parents.get(pid, []))
    return tree


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime (plus reaped children's) of ``pids``, in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def thread_cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the live threads of ``pids`` other than each one's main thread (the
    event loop's), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            tids = [t for t in os.listdir(f"/proc/{pid}/task") if t != str(pid)]
        except OSError:
            continue
        for tid in tids:
            try:
                raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2 :].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def side_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds spent off the event loops: whole audit writer processes (``python -m
    pgguard.audit.daemon``), and the other threads of every other process."""
    writers: list[int] = []
    others: list[int] = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        (writers if b"pgguard.audit.daemon" in cmdline else others).append(pid)
    return cpu_seconds(writers) + thread_cpu_seconds(others)


def _status_kib(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pids: Sequence[int]) -> int:
    return sum(_status_kib(f"/proc/{pid}/status", "VmRSS") for pid in pids)


def pss_kib(pids: Sequence[int]) -> int:
    return sum(_status_kib(f"/proc/{pid}/smaps_rollup", "Pss") for pid in pids)


# --------------------------------------------------------------------------- processes


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Service:
    """A subprocess in its own session, stopped with SIGTERM then SIGKILL to its group."""

    name: str
    proc: subprocess.Popen[bytes]
    log_file: Path
    pid_filter: Callable[[int], bool] = lambda _pid: True

    def pids(self) -> list[int]:
        return [p for p in process_tree(self.proc.pid) if self.pid_filter(p)]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # A worker that outlived its parent is still in the group.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        log(f"{self.name} stopped")

    def wait_listening(self, host: str, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(
                    f"{self.name} exited with status {self.proc.returncode}:\n"
                    + _tail(self.log_file)
                )
            if _port_open(host, port):
                return
            time.sleep(0.1)
        raise BenchError(f"{self.name} did not listen on {host}:{port}:\n" + _tail(self.log_file))


def spawn(
    name: str, argv: list[str], env: dict[str, str], log_file: Path
) -> subprocess.Popen[bytes]:
    with open(log_file, "ab") as out:
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
        )


@dataclass
class Target:
    name: str
    host: str
    port: int
    user: str
    password: str
    service: Service | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGPASSWORD=self.password, PGSSLMODE="disable", PGGSSENCMODE="disable")
        return env


# --------------------------------------------------------------------------- setup


def run_checked(argv: list[str], what: str, **kwargs: Any) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise BenchError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return str(proc.stdout)


def find_tool(pg: EmbeddedPostgres, name: str) -> str:
    candidate = pg.bindir / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} not found (install postgresql-client / postgresql-contrib)")
    return found


def start_postgres(stack: ExitStack) -> tuple[EmbeddedPostgres, str]:
    password = secrets.token_urlsafe(18)
    pg = EmbeddedPostgres(
        extra_conf={
            "max_connections": "1200",
            "shared_buffers": "256MB",  # the scale-10 data set (~160 MB) stays in memory
            "log_min_messages": "warning",
        }
    )
    log(f"starting PostgreSQL from {pg.bindir}")
    stack.callback(pg.stop, "immediate")
    pg.start()
    pg.psql(
        f"SET password_encryption = 'scram-sha-256';\n"
        f"CREATE ROLE {UPSTREAM_ROLE} LOGIN SUPERUSER PASSWORD '{password}';\n"
        f"CREATE DATABASE {DBNAME} OWNER {UPSTREAM_ROLE};\n"
    )
    direct = Target("direct", pg.host, pg.port, UPSTREAM_ROLE, password)
    log(f"pgbench -i -s {SCALE} {DBNAME}")
    run_checked(
        [
            find_tool(pg, "pgbench"),
            "-i",
            "-s",
            str(SCALE),
            "-q",
            "-h",
            pg.host,
            "-p",
            str(pg.port),
            "-U",
            UPSTREAM_ROLE,
            DBNAME,
        ],
        "pgbench -i",
        env=direct.env(),
    )
    pg.psql("VACUUM ANALYZE;", dbname=DBNAME)
    return pg, password


def pgguard_executable() -> str:
    for candidate in (Path(sys.executable).parent / "pgguard", ROOT / ".venv" / "bin" / "pgguard"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("pgguard")
    if found is None:
        raise BenchError("the pgguard command is not installed (make venv)")
    return found


def start_pgguard(
    stack: ExitStack,
    workdir: Path,
    pg: EmbeddedPostgres,
    upstream_password: str,
    workers: int,
    *,
    name: str = "pgguard",
    policy: Path | None = None,
    sub: str = BENCH_SUB,
    groups: Sequence[str] = ("bench",),
    audit: dict[str, Any] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Target:
    """``pgguard serve`` as target ``name``: no policy, or the policy file ``policy``; the
    audit off, or configured by ``audit`` (the config file's ``audit`` section); ``extra_env``
    added to its environment (such as PGGUARD_MASKING_SECRET)."""
    from pgguard.identity import mint_token

    jwt_secret = secrets.token_urlsafe(32)
    port, admin_port = free_port(), free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "upstream": {
            "host": pg.host,
            "port": pg.port,
            "user": UPSTREAM_ROLE,
            "password_env": "PGGUARD_UPSTREAM_PASSWORD",
            "sslmode": "disable",
        },
        "identity": {"algorithms": ["HS256"], "secret_env": "PGGUARD_JWT_SECRET"},
        "policies": [str(policy)] if policy is not None else [],
        "audit": dict(audit) if audit is not None else {"url": None},
        "limits": {"max_connections": 2000, "drain_timeout": "2s"},
        "log": {"level": "warning"},
    }
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGGUARD_")}
    env.update(PGGUARD_JWT_SECRET=jwt_secret, PGGUARD_UPSTREAM_PASSWORD=upstream_password)
    env.update(extra_env or {})
    argv = [pgguard_executable(), "serve", "--config", str(config_path), "--workers", str(workers)]
    log(f"starting {shlex.join(argv)}")
    log_file = workdir / f"{name}.log"
    service = Service(name, spawn(name, argv, env, log_file), log_file)
    stack.callback(service.stop)
    service.wait_listening("127.0.0.1", port)
    token = mint_token(jwt_secret, sub, groups=list(groups), ttl=3600)
    return Target(name, "127.0.0.1", port, sub, token, service)


def start_floor(
    stack: ExitStack, workdir: Path, pg: EmbeddedPostgres, upstream_password: str
) -> Target:
    """``scripts/bench_forwarder.py`` as target ``floor``: bytes forwarded to PostgreSQL.

    It authenticates nothing, so pgbench logs in with the upstream role and its password.
    """
    port = free_port()
    argv = [
        sys.executable,
        str(ROOT / "scripts" / "bench_forwarder.py"),
        "--listen-port",
        str(port),
        "--upstream-host",
        pg.host,
        "--upstream-port",
        str(pg.port),
    ]
    log(f"starting {shlex.join(argv)}")
    log_file = workdir / "floor.log"
    service = Service("floor", spawn("floor", argv, dict(os.environ), log_file), log_file)
    stack.callback(service.stop)
    service.wait_listening("127.0.0.1", port)
    return Target("floor", "127.0.0.1", port, UPSTREAM_ROLE, upstream_password, service)


def ensure_pgbouncer() -> tuple[str | None, str]:
    """The pgbouncer binary, installing it with apt-get as root; else (None, why not)."""

    def find() -> str | None:
        return shutil.which("pgbouncer") or (
            "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
        )

    found = find()
    if found:
        return found, ""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None, "pgbouncer is not installed and cannot be installed (not root or no apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "pgbouncer"]
    log("installing pgbouncer: " + shlex.join(install))
    proc = subprocess.run(install, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        proc = subprocess.run(install, capture_output=True, text=True, env=env)
    found = find()
    if found:
        return found, ""
    return None, "pgbouncer could not be installed: " + proc.stderr.strip()[-300:]


def start_pgbouncer(
    stack: ExitStack, exe: str, pg: EmbeddedPostgres, password: str, idle_connections: int
) -> Target:
    run_as = "postgres" if os.geteuid() == 0 else None
    workdir = Path(tempfile.mkdtemp(prefix="pgguard-bench-pgbouncer-"))
    stack.callback(shutil.rmtree, workdir, True)
    workdir.chmod(0o755)
    port = free_port()
    (workdir / "userlist.txt").write_text(f'"{UPSTREAM_ROLE}" "{password}"\n')
    ini = f"""\
[databases]
{DBNAME} = host={pg.host} port={pg.port} dbname={DBNAME}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {workdir / "userlist.txt"}
pool_mode = session
; session pooling: every client holds a server connection, so the pool must fit the
; idle-connection test as well as pgbench -c 8
default_pool_size = {idle_connections + 50}
max_client_conn = 2000
max_db_connections = 0
server_tls_sslmode = disable
logfile = {workdir / "pgbouncer.log"}
pidfile = {workdir / "pgbouncer.pid"}
log_connections = 0
log_disconnections = 0
ignore_startup_parameters = extra_float_digits
"""
    (workdir / "pgbouncer.ini").write_text(ini)
    if run_as is not None:
        info = pwd.getpwnam(run_as)
        for path in (workdir, *workdir.iterdir()):
            os.chown(path, info.pw_uid, info.pw_gid)
        (workdir / "userlist.txt").chmod(0o600)
    argv = [exe, str(workdir / "pgbouncer.ini")]
    if run_as is not None:
        # runuser's PAM session resets the open-files limit (often to 1024): raise it again,
        # pgbouncer needs two descriptors per idle test connection in session pooling.
        want = idle_connections * 2 + 500
        raise_limit = f'ulimit -n {want} 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$@"'
        argv = ["runuser", "-u", run_as, "--", "sh", "-c", raise_limit, "sh", *argv]
    log(f"starting {shlex.join(argv)}")
    log_file = workdir / "stdout.log"
    service = Service(
        "pgbouncer",
        spawn("pgbouncer", argv, dict(os.environ), log_file),
        workdir / "pgbouncer.log",
        pid_filter=lambda pid: comm(pid) == "pgbouncer",
    )
    stack.callback(service.stop)
    service.wait_listening("127.0.0.1", port)
    return Target("pgbouncer", "127.0.0.1", port, UPSTREAM_ROLE, password, service)


def psql_command(psql: str, target: Target, sql: str) -> subprocess.CompletedProcess[str]:
    """``sql`` run by psql through ``target`` (unaligned, tuples only, stops on error)."""
    return subprocess.run(
        [
            psql,
            "-X",
            "-At",
            "-h",
            target.host,
            "-p",
            str(target.port),
            "-U",
            target.user,
            "-d",
            DBNAME,
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        env=target.env(),
        timeout=30,
    )


def check_connects(psql: str, target: Target) -> str | None:
    """None when ``select 1`` works through ``target``, else the error."""
    proc = psql_command(psql, target, "select 1")
    if proc.returncode == 0 and proc.stdout.strip() == "1":
        return None
    return (proc.stderr or proc.stdout).strip() or f"psql exited {proc.returncode}"


# --------------------------------------------------------------------------- pgbench matrix


@dataclass
class Run:
    tps: float | None
    transactions: int | None
    cpu_us_per_tx: float | None
    error: str | None = None


@dataclass
class Cell:
    mode: str
    clients: int
    runs: dict[str, list[Run]] = field(default_factory=dict)
    workload: str = "-S"  # a label: -S, or a custom script's
    script: Path | None = None  # a custom pgbench script (-f) instead of -S

    def tps(self, target: str) -> float | None:
        values = [r.tps for r in self.runs.get(target, []) if r.tps is not None]
        return statistics.median(values) if values else None

    def cpu(self, target: str) -> float | None:
        values = [r.cpu_us_per_tx for r in self.runs.get(target, []) if r.cpu_us_per_tx]
        return statistics.median(values) if values else None


def jobs_for(clients: int) -> int:
    return 1 if clients <= 1 else 2


def pgbench_argv(
    pgbench: str,
    target: Target,
    mode: str,
    clients: int,
    duration: int,
    script: Path | None = None,
) -> list[str]:
    # -D scale: a custom script's :scale is 1 unless given (pgbench reads it from
    # pgbench_branches for its built-in scripts only).
    workload = ["-S"] if script is None else ["-f", str(script), "-D", f"scale={SCALE}"]
    return [
        pgbench,
        "-n",
        *workload,
        "-M",
        mode,
        "-c",
        str(clients),
        "-j",
        str(jobs_for(clients)),
        "-T",
        str(duration),
        "-h",
        target.host,
        "-p",
        str(target.port),
        "-U",
        target.user,
        DBNAME,
    ]


def run_pgbench(
    pgbench: str,
    target: Target,
    mode: str,
    clients: int,
    duration: int,
    script: Path | None = None,
) -> Run:
    argv = pgbench_argv(pgbench, target, mode, clients, duration, script)
    pids = target.service.pids() if target.service is not None else []
    cpu_before = cpu_seconds(pids)
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=target.env(), timeout=duration + 120
        )
    except subprocess.TimeoutExpired:
        return Run(None, None, None, "pgbench timed out")
    cpu_used = cpu_seconds(pids) - cpu_before
    tps, txn = TPS_RE.search(proc.stdout), TXN_RE.search(proc.stdout)
    if proc.returncode != 0 or tps is None or txn is None:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        return Run(None, None, None, f"exit {proc.returncode}: " + " | ".join(detail))
    transactions = int(txn.group(1))
    cpu_us = cpu_used * 1e6 / transactions if pids and transactions else None
    return Run(float(tps.group(1)), transactions, cpu_us)


def run_matrix(
    pgbench: str,
    targets: list[Target],
    modes: list[str],
    clients_list: list[int],
    duration: int,
    rounds: int,
) -> list[Cell]:
    cells = []
    for mode in modes:
        for clients in clients_list:
            cell = Cell(mode, clients)
            run_cell(pgbench, targets, cell, duration, rounds)
            cells.append(cell)
    return cells


def run_cell(
    pgbench: str,
    targets: list[Target],
    cell: Cell,
    duration: int,
    rounds: int,
    after: Callable[[Cell, Target, Run], None] | None = None,
) -> None:
    """``rounds`` runs of ``cell`` against each of ``targets``, alternating, into cell.runs;
    ``after(cell, target, run)`` is called after each run, before the next starts."""
    for target in targets:
        cell.runs.setdefault(target.name, [])
    what = f"-M {cell.mode} -c {cell.clients}"
    if cell.script is not None:
        what = f"{cell.workload} {what}"
    for round_no in range(1, rounds + 1):
        for target in targets:
            run = run_pgbench(pgbench, target, cell.mode, cell.clients, duration, cell.script)
            cell.runs[target.name].append(run)
            shown = f"{run.tps:,.0f} tps" if run.tps is not None else f"FAILED {run.error}"
            if run.cpu_us_per_tx is not None:
                shown += f", {run.cpu_us_per_tx:.1f} µs CPU/tx"
            log(f"{what} round {round_no} {target.name}: {shown}")
            if after is not None:
                after(cell, target, run)


# --------------------------------------------------------------------------- guard rules


@dataclass
class GuardResult:
    policy: str  # the policy file's text
    warnings: list[str] = field(default_factory=list)  # from pgguard policy check
    checks: list[str] = field(default_factory=list)  # what was verified before measuring
    cells: list[Cell] = field(default_factory=list)  # pgbench -S, pgguard vs guard
    distinct: list[Cell] = field(default_factory=list)  # custom scripts, pgguard vs guard
    problems: list[str] = field(default_factory=list)  # failed checks and runs, with log tails


def check_guard_policy(policy_path: Path) -> list[str]:
    """``pgguard policy check`` on the policy file: its warnings; a BenchError on errors."""
    import json

    proc = subprocess.run(
        [pgguard_executable(), "policy", "check", "--json", str(policy_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        result = None
    if proc.returncode != 0 or not isinstance(result, dict) or not result.get("ok"):
        detail = result.get("errors") if isinstance(result, dict) else None
        raise BenchError(
            f"pgguard policy check {policy_path} failed ({proc.returncode}): "
            + (json.dumps(detail) if detail else (proc.stderr or proc.stdout).strip()[-2000:])
        )
    return [str(w) for w in result.get("warnings", [])]


def start_guard(
    stack: ExitStack, workdir: Path, pg: EmbeddedPostgres, upstream_password: str, workers: int
) -> tuple[Target, GuardResult]:
    """The ``guard`` target: pgguard with GUARD_POLICY, logged into as an ai-agents member."""
    policy_path = workdir / "guard-policy.yaml"
    policy_path.write_text(GUARD_POLICY)
    result = GuardResult(GUARD_POLICY, warnings=check_guard_policy(policy_path))
    for warning in result.warnings:
        log(f"guard policy warning: {warning}")
    target = start_pgguard(
        stack,
        workdir,
        pg,
        upstream_password,
        workers,
        name="guard",
        policy=policy_path,
        sub=GUARD_SUB,
        groups=GUARD_GROUPS,
    )
    return target, result


def guard_log_tail(target: Target, lines: int = 20) -> str:
    return _tail(target.service.log_file, lines) if target.service else "(no log)"


def verify_guard(psql: str, guard: Target, result: GuardResult) -> None:
    """Check that the policy is in force for the bench identity before measuring it.

    A failed check is a problem in the report, not an error: the numbers are still
    produced, but they do not measure what they claim to.
    """
    problem = check_connects(psql, guard)
    if problem is not None:
        raise BenchError(
            f"cannot run select 1 through the guard (policy, {GUARD_SUB} in "
            f"{', '.join(GUARD_GROUPS)}): {problem}\n" + guard_log_tail(guard)
        )

    def expect(what: str, sql: str, ok: Callable[[int, str, str], bool]) -> None:
        proc = psql_command(psql, guard, sql)
        out, err = proc.stdout.strip(), proc.stderr.strip()
        shown = (err or out).replace("\n", " ")[:200]
        if ok(proc.returncode, out, err):
            result.checks.append(f"{what}: `{sql}` → {shown or 'ok'}")
        else:
            result.problems.append(
                f"check failed, {what}: `{sql}` → exit {proc.returncode}: {shown}"
            )

    expect(
        "a write is refused by ai-read-only",
        "UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = 1",
        lambda rc, _out, err: rc != 0 and "ai-read-only" in err,
    )
    expect(
        "vault.* is refused by no-secrets (the schema need not exist)",
        "SELECT * FROM vault.api_keys",
        lambda rc, _out, err: rc != 0 and "no-secrets" in err,
    )
    expect(
        "limits pin the read-only clamp",
        "SHOW default_transaction_read_only",
        lambda rc, out, _err: rc == 0 and out == "on",
    )
    expect(
        "limits pin statement_timeout",
        "SHOW statement_timeout",
        lambda rc, out, _err: rc == 0 and out == "30s",
    )
    expect(
        "the distinct-statement shape is allowed",
        "SELECT abalance FROM pgbench_accounts t7 WHERE t7.aid = 1",
        lambda rc, out, _err: rc == 0 and out.lstrip("-").isdigit(),
    )
    if result.problems:
        for p in result.problems:
            log(p)
        result.problems.append("guard log tail:\n" + guard_log_tail(guard))


def note_failures(cell: Cell, targets: list[Target], problems: list[str]) -> None:
    """Failed runs of ``cell`` become problems, with the failing target's log tail."""
    for target in targets:
        failed = [r for r in cell.runs.get(target.name, []) if r.error]
        if failed:
            what = f"{cell.workload} -M {cell.mode} -c {cell.clients} through {target.name}"
            problems.append(
                f"{len(failed)} run(s) of {what} failed: {failed[0].error}\n"
                f"{target.name} log tail:\n{guard_log_tail(target)}"
            )
            log(problems[-1])


def run_guard(
    pgbench: str,
    plain: Target,
    guard: Target,
    result: GuardResult,
    workdir: Path,
    clients_list: list[int],
    duration: int,
    rounds: int,
) -> None:
    """pgbench -S and the distinct-statement scripts through ``plain`` and ``guard``."""
    targets = [plain, guard]
    for mode in GUARD_MODES:
        for clients in clients_list:
            cell = Cell(mode, clients)
            run_cell(pgbench, targets, cell, duration, rounds)
            note_failures(cell, targets, result.problems)
            result.cells.append(cell)
    script_dir = workdir / "guard-scripts"
    script_dir.mkdir(exist_ok=True)
    for index, (label, text) in enumerate(GUARD_WORKLOADS):
        script = script_dir / f"workload-{index}.sql"
        script.write_text(text)
        cell = Cell("simple", GUARD_DISTINCT_CLIENTS, workload=label, script=script)
        run_cell(pgbench, targets, cell, duration, rounds)
        note_failures(cell, targets, result.problems)
        result.distinct.append(cell)


# --------------------------------------------------------------------------- masking


@dataclass
class FetchRun:
    """One timed loop of ``execute`` + ``fetchall`` of a 10,000-row query."""

    rows_per_s: float | None
    queries: int = 0
    ms_per_query: float | None = None
    gateway_cpu_ms: float | None = None  # pgguard's CPU per query (None: not through pgguard)
    client_cpu_ms: float | None = None  # this process's CPU per query (psycopg decoding rows)
    error: str | None = None


@dataclass
class MaskingResult:
    policy: str  # the policy file's text
    warnings: list[str] = field(default_factory=list)  # from pgguard policy check
    checks: list[str] = field(default_factory=list)  # what was verified before measuring
    widths: list[str] = field(default_factory=list)  # average value widths of the columns
    # (format, values, query, target name) → runs, in run order
    fetch: dict[tuple[str, str, str, str], list[FetchRun]] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)  # select-only, pgguard vs masking
    problems: list[str] = field(default_factory=list)
    load: list[str] = field(default_factory=list)  # load averages around the measurements

    def median(self, key: tuple[str, str, str, str], attr: str = "rows_per_s") -> float | None:
        values = [getattr(r, attr) for r in self.fetch.get(key, [])]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None


def start_masking(
    stack: ExitStack, workdir: Path, pg: EmbeddedPostgres, upstream_password: str, workers: int
) -> tuple[Target, MaskingResult]:
    """The ``masking`` target: pgguard with MASK_POLICY, logged into as a developers member,
    started once MASK_TABLE exists (created here as the superuser)."""
    log(f"creating {MASK_TABLE} ({MASK_TABLE_ROWS:,} rows)")
    pg.psql(MASK_TABLE_SQL, dbname=DBNAME)
    policy_path = workdir / "masking-policy.yaml"
    policy_path.write_text(MASK_POLICY)
    result = MaskingResult(MASK_POLICY, warnings=check_guard_policy(policy_path))
    for warning in result.warnings:
        log(f"masking policy warning: {warning}")
    widths = pg.psql(
        "SELECT concat_ws(' ', avg(octet_length(email))::numeric(5,1), "
        "avg(octet_length(ssn))::numeric(5,1), avg(octet_length(salary::text))::numeric(5,1), "
        "avg(octet_length(name))::numeric(5,1), avg(octet_length(city))::numeric(5,1), "
        f"avg(octet_length(quota::text))::numeric(5,1)) FROM {MASK_TABLE}",
        dbname=DBNAME,
    ).split()
    if len(widths) == 6:
        names = ("email", "ssn", "salary", "name", "city", "quota")
        result.widths = [f"{n} {w} B" for n, w in zip(names, widths, strict=True)]
    target = start_pgguard(
        stack,
        workdir,
        pg,
        upstream_password,
        workers,
        name="masking",
        policy=policy_path,
        sub=MASK_SUB,
        groups=MASK_GROUPS,
        extra_env={MASK_SECRET_ENV: secrets.token_urlsafe(32)},
    )
    return target, result


def verify_masking(psql: str, masking: Target, direct: Target, result: MaskingResult) -> None:
    """Check with psql that the masks are in force for the bench identity, and that clean
    columns pass unchanged, before measuring (a failed check is a problem in the report)."""
    problem = check_connects(psql, masking)
    if problem is not None:
        raise BenchError(
            f"cannot run select 1 through masking (policy, {MASK_SUB} in "
            f"{', '.join(MASK_GROUPS)}): {problem}\n" + guard_log_tail(masking)
        )

    def query(target: Target, sql: str) -> tuple[int, str]:
        proc = psql_command(psql, target, sql)
        out = proc.stdout.strip() if proc.returncode == 0 else proc.stderr.strip()
        return proc.returncode, out.replace("\n", " ")[:200]

    def expect(what: str, sql: str, ok: Callable[[str, str], bool]) -> None:
        rc_m, masked = query(masking, sql)
        rc_d, clear = query(direct, sql)
        shown = f"`{sql}` → masking: {masked!r}, direct: {clear!r}"
        if rc_m == 0 and rc_d == 0 and ok(masked, clear):
            result.checks.append(f"{what}: {shown}")
        else:
            result.problems.append(f"check failed, {what}: {shown}")

    table_ = MASK_TABLE
    expect(
        "email is masked (partial_email) through masking, clear directly",
        f"SELECT email FROM {table_} WHERE id = 1",
        lambda m, d: "****" in m and d == "user1@example.com",
    )
    expect(
        "ssn keeps its last 4 characters only (keep_last(4))",
        f"SELECT ssn FROM {table_} WHERE id = 1",
        lambda m, d: m != d and m[-4:] == d[-4:] and "*" in m,
    )
    expect(
        "salary is generalized to a multiple of 1000",
        f"SELECT salary FROM {table_} WHERE id = 1",
        lambda m, d: m != d and _decimal_or_none(m) is not None and _decimal_or_none(m) % 1000 == 0,
    )
    expect(
        "clean columns are the same through masking and directly",
        f"SELECT name, city, quota FROM {table_} WHERE id = 1",
        lambda m, d: m == d and m != "",
    )
    if result.problems:
        for p in result.problems:
            log(p)
        result.problems.append("masking log tail:\n" + guard_log_tail(masking))


def _decimal_or_none(text: str) -> Any:
    from decimal import Decimal, InvalidOperation

    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def _connect(target: Target) -> Any:
    import psycopg

    # prepare_threshold None: never prepared, so every execute is Parse/Bind/Execute of the
    # unnamed statement, the same for every run.
    return psycopg.connect(
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password,
        dbname=DBNAME,
        sslmode="disable",
        gssencmode="disable",
        autocommit=True,
        prepare_threshold=None,
        connect_timeout=30,
    )


def check_full_results(conns: dict[str, Any], result: MaskingResult) -> None:
    """Every row of both queries, in both formats, through masking against directly: the
    masked columns are masked in every row, the clean ones identical (a failed check is a
    problem in the report)."""
    where = f"WHERE id BETWEEN 1 AND {MASK_ROWS} ORDER BY id"
    masked_sql = f"SELECT id, email, ssn, salary FROM {MASK_TABLE} {where}"
    clean_sql = f"SELECT id, name, city, quota FROM {MASK_TABLE} {where}"
    for fmt in MASK_FORMATS:
        binary = fmt == "binary"
        try:
            got = {}
            for name in ("masking", "direct"):
                for label, sql in (("masked", masked_sql), ("clean", clean_sql)):
                    with conns[name].cursor(binary=binary) as cur:
                        cur.execute(sql)
                        got[name, label] = cur.fetchall()
        except Exception as exc:
            result.problems.append(f"check failed, every row in {fmt} format: {exc!r}")
            continue
        masked, clear = got["masking", "masked"], got["direct", "masked"]
        bad = [
            (m, c)
            for m, c in zip(masked, clear, strict=False)
            if not (
                m[0] == c[0]
                and "****" in m[1]
                and m[1] != c[1]
                and m[2] != c[2]
                and m[2][-4:] == c[2][-4:]
                and m[3] % 1000 == 0
                and m[3] <= c[3] < m[3] + 1000
            )
        ]
        if len(masked) != MASK_ROWS or len(clear) != MASK_ROWS or bad:
            first = f"; first bad row: masking {bad[0][0]!r}, direct {bad[0][1]!r}" if bad else ""
            result.problems.append(
                f"check failed, masked columns in {fmt} format: {len(masked)} rows through "
                f"masking, {len(clear)} directly, {len(bad)} row(s) not masked as the policy "
                f"says{first}"
            )
        else:
            m, c = masked[0], clear[0]
            result.checks.append(
                f"{fmt} format, psycopg: all {MASK_ROWS:,} rows of email, ssn, salary are "
                f"masked through masking (id 1: {m[1]!r}, {m[2]!r}, {m[3]} against "
                f"{c[1]!r}, {c[2]!r}, {c[3]} directly)"
            )
        if got["masking", "clean"] == got["direct", "clean"] and got["direct", "clean"]:
            result.checks.append(
                f"{fmt} format, psycopg: all {MASK_ROWS:,} rows of name, city, quota are "
                "identical through masking and directly"
            )
        else:
            result.problems.append(
                f"check failed, clean columns in {fmt} format differ through masking and directly"
            )


def window(lo: int) -> tuple[int, int]:
    """The query parameters of the window of MASK_ROWS ids starting at ``lo``."""
    return lo, lo + MASK_ROWS - 1


def fetch_run(
    conn: Any,
    binary: bool,
    sql: str,
    seconds: float,
    pids: list[int],
    windows: Iterator[int],
    warm: bool = False,
) -> FetchRun:
    """``sql`` executed and fetched (fetchall) over and over for ``seconds``, each time for the
    next window start of ``windows``; with ``warm``, after one untimed execution."""
    rows = queries = 0
    try:
        with conn.cursor(binary=binary) as cur:
            if warm:
                cur.execute(sql, window(next(windows)))
                cur.fetchall()
            cpu_before, client_before = cpu_seconds(pids), time.process_time()
            start = time.perf_counter()
            deadline = start + seconds
            while True:
                cur.execute(sql, window(next(windows)))
                got = len(cur.fetchall())
                if got != MASK_ROWS:
                    return FetchRun(None, queries, error=f"{got} rows, not {MASK_ROWS}")
                rows, queries = rows + got, queries + 1
                if time.perf_counter() >= deadline:
                    break
    except Exception as exc:
        return FetchRun(None, queries, error=repr(exc)[:300])
    elapsed = time.perf_counter() - start
    gateway = (cpu_seconds(pids) - cpu_before) * 1e3 / queries if pids else None
    client = (time.process_time() - client_before) * 1e3 / queries
    return FetchRun(rows / elapsed, queries, elapsed * 1e3 / queries, gateway, client)


def run_masking_fetch(
    masking: Target, direct: Target, result: MaskingResult, duration: int, rounds: int
) -> None:
    """The 10,000-row fetches: MASK_FETCH_RUNS in each format, alternating, ``rounds`` times."""
    targets = {"masking": masking, "direct": direct}
    conns: dict[str, Any] = {}
    # "new": windows 2..MASK_WINDOWS in turn, carried on across rounds; "repeated": window 1.
    new_starts = [1 + MASK_ROWS * k for k in range(1, MASK_WINDOWS)]
    windows = {
        (fmt, query): itertools.cycle(new_starts) for fmt in MASK_FORMATS for query in MASK_QUERIES
    }
    repeated = itertools.repeat(1)
    try:
        for name, target in targets.items():
            try:
                conns[name] = _connect(target)
            except Exception as exc:
                result.problems.append(
                    f"cannot connect to {name} with psycopg: {exc!r}\n" + guard_log_tail(target)
                )
                log(result.problems[-1])
                return
        check_full_results(conns, result)
        for round_no in range(1, rounds + 1):
            for fmt in MASK_FORMATS:
                for values, query, name in MASK_FETCH_RUNS:
                    target = targets[name]
                    pids = target.service.pids() if target.service is not None else []
                    run = fetch_run(
                        conns[name],
                        fmt == "binary",
                        MASK_QUERIES[query],
                        duration,
                        pids,
                        repeated if values == "repeated" else windows[fmt, query],
                        warm=values == "repeated",
                    )
                    result.fetch.setdefault((fmt, values, query, name), []).append(run)
                    what = f"fetch {fmt} {values} values {query} round {round_no} {name}"
                    if run.rows_per_s is None:
                        result.problems.append(
                            f"{what} failed: {run.error}\n" + guard_log_tail(target)
                        )
                        log(result.problems[-1])
                        with suppress(Exception):
                            conns[name].close()
                        with suppress(Exception):
                            conns[name] = _connect(target)
                        continue
                    shown = f"{run.rows_per_s:,.0f} rows/s, {run.ms_per_query:.1f} ms/query"
                    if run.gateway_cpu_ms is not None:
                        shown += f", pgguard CPU {run.gateway_cpu_ms:.1f} ms/query"
                    log(f"{what}: {shown}")
    finally:
        for conn in conns.values():
            with suppress(Exception):
                conn.close()


def run_masking_select(
    pgbench: str,
    plain: Target,
    masking: Target,
    result: MaskingResult,
    workdir: Path,
    clients_list: list[int],
    duration: int,
    rounds: int,
) -> None:
    """The select-only script (clean columns of the masked table) through ``plain`` and
    ``masking``, alternating, per mode and client count."""
    script = workdir / "masking-select.sql"
    script.write_text(MASK_SELECT_SCRIPT)
    targets = [plain, masking]
    log("warming up pgguard and masking (select-only script, -M simple, 2 s each)")
    for target in targets:
        run_pgbench(pgbench, target, "simple", max(clients_list), 2, script)
    for mode in MASK_SELECT_MODES:
        for clients in clients_list:
            cell = Cell(mode, clients, workload=MASK_SELECT_LABEL, script=script)
            run_cell(pgbench, targets, cell, duration, rounds)
            note_failures(cell, targets, result.problems)
            result.cells.append(cell)


# --------------------------------------------------------------------------- audit trail


class AuditReader:
    """Reads one audit store (the SQLite file, or the PostgreSQL database) from outside pgguard.

    A store pgguard has not created yet reads as empty.
    """

    COUNT_SQL = "SELECT count(*) FROM audit_records WHERE event = 'statement'"
    LAST_SQL = (
        "SELECT username, statement FROM audit_records WHERE event = 'statement' "
        "ORDER BY id DESC LIMIT 1"
    )

    def __init__(self, sqlite_path: Path | None = None, pg_dsn: dict[str, Any] | None = None):
        self.sqlite_path = sqlite_path
        self.pg_dsn = pg_dsn
        self._pg: Any = None

    def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        if self.sqlite_path is not None:
            if not self.sqlite_path.exists():
                return []
            con = sqlite3.connect(self.sqlite_path, timeout=30)
            try:
                return list(con.execute(sql).fetchall())
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise
            finally:
                con.close()
        import psycopg

        assert self.pg_dsn is not None
        if self._pg is None or self._pg.closed:
            self._pg = psycopg.connect(**self.pg_dsn, autocommit=True, connect_timeout=10)
        try:
            return list(self._pg.execute(sql).fetchall())
        except psycopg.errors.UndefinedTable:
            return []

    def statements(self) -> int:
        """Statement records in the store (session, auth and reload records left out)."""
        rows = self.fetch(self.COUNT_SQL)
        return int(rows[0][0]) if rows else 0

    def last_statement(self) -> tuple[Any, ...] | None:
        """(username, statement) of the newest statement record."""
        rows = self.fetch(self.LAST_SQL)
        return rows[0] if rows else None

    def close(self) -> None:
        if self._pg is not None:
            with suppress(Exception):
                self._pg.close()
            self._pg = None


@dataclass
class AuditTarget:
    """An audited pgguard: the target, its audit mode and store, and how to read the store."""

    target: Target
    mode: str  # strict | buffered
    store: str  # sqlite | postgresql
    url_shown: str  # audit.url, password hidden, temp dir as $TMP
    reader: AuditReader
    sync: str = "full"  # audit.sync
    count: int = 0  # statement records in the store after the last catch-up
    thread_cpu: float = 0.0  # CPU seconds off pgguard's event loops, at the last catch-up

    def snapshot(self) -> None:
        """Take the store's count and the threads' CPU as the next run's starting point."""
        self.count, _ = catch_up(self.reader, 0)
        pids = self.target.service.pids() if self.target.service is not None else []
        self.thread_cpu = side_cpu_seconds(pids)


@dataclass
class AuditCount:
    """The statement records one pgbench run through an audited target added to its store."""

    target: str
    audit_mode: str
    mode: str
    clients: int
    round_no: int
    transactions: int | None  # as pgbench reported them (None: the run failed)
    at_exit: int | None  # added records, counted as soon as pgbench exited
    settled: int | None  # added records, once the store stopped growing
    catch_up_s: float | None  # from pgbench's exit to the store's last change
    thread_us_per_tx: float | None = None  # CPU of threads other than the event loop's
    error: str | None = None

    def ok(self) -> bool | None:
        """Records ≥ transactions (at pgbench's exit in strict mode: the results the client
        saw were released only once durable); None when there is nothing to compare."""
        if self.transactions is None or self.at_exit is None or self.settled is None:
            return None
        if self.audit_mode == "strict" and self.at_exit < self.transactions:
            return False
        return self.settled >= self.transactions


@dataclass
class AuditResult:
    targets: list[AuditTarget] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)  # store facts (file system, fsync)
    checks: list[str] = field(default_factory=list)  # what was verified before measuring
    cells: list[Cell] = field(default_factory=list)  # pgbench -S, pgguard vs audited targets
    counts: list[AuditCount] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def fs_type(path: Path) -> str:
    """The file system ``path`` is on, from /proc/mounts: "type (mounted on /x)"."""
    resolved = str(path.resolve())
    best, kind = "", "unknown"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, parts[2]
    return f"{kind} (mounted on {best})" if best else kind


def catch_up(reader: AuditReader, expect: int) -> tuple[int, float]:
    """Wait for the store to stop growing: its statement count, and the seconds from the
    call to the last change seen. Done when the count has not moved for AUDIT_QUIET_S and
    has reached ``expect``, or has not moved for 5 x AUDIT_QUIET_S, or after the timeout."""
    start = time.monotonic()
    last, changed = reader.statements(), start
    while True:
        now = time.monotonic()
        quiet = now - changed
        if (
            (quiet >= AUDIT_QUIET_S and last >= expect)
            or quiet >= 5 * AUDIT_QUIET_S
            or now - start >= AUDIT_CATCH_UP_TIMEOUT_S
        ):
            return last, changed - start
        time.sleep(0.1)
        count = reader.statements()
        if count != last:
            last, changed = count, time.monotonic()


def start_audit(
    stack: ExitStack,
    workdir: Path,
    pg: EmbeddedPostgres,
    psql: str,
    upstream_password: str,
    workers: int,
) -> AuditResult:
    """The audited pgguard targets (AUDIT_TARGETS), each checked to record a ``select 1``.

    A target that does not start or does not record is a problem in the report and is left
    out; the others are measured.
    """
    from urllib.parse import quote

    result = AuditResult()
    result.setup.append(f"the bench temp dir (SQLite files) is on {fs_type(workdir)}")
    if any(store == "postgresql" for _, _, store, _ in AUDIT_TARGETS):
        try:
            pg.psql(f"CREATE DATABASE {AUDIT_DB} OWNER {UPSTREAM_ROLE};")
            fsync = pg.psql("SHOW fsync").strip()
            sync = pg.psql("SHOW synchronous_commit").strip()
            result.setup.append(
                f"the cluster runs fsync={fsync}, synchronous_commit={sync} (the store sets "
                "synchronous_commit on in its own sessions)"
            )
        except Exception as exc:
            result.problems.append(f"cannot create the database {AUDIT_DB}: {exc}")
    for name, mode, store, sync in AUDIT_TARGETS:
        if store == "sqlite":
            path = workdir / f"{name}.db"
            url, shown = f"sqlite:///{path}", f"sqlite:///$TMP/{path.name}"
            reader = AuditReader(sqlite_path=path)
        else:
            if any(AUDIT_DB in p for p in result.problems):
                continue
            netloc = f"{pg.host}:{pg.port}/{AUDIT_DB}?sslmode=disable"
            url = f"postgresql+psycopg://{UPSTREAM_ROLE}:{quote(upstream_password, safe='')}"
            url += f"@{netloc}"
            shown = f"postgresql+psycopg://{UPSTREAM_ROLE}:***@{netloc}"
            reader = AuditReader(
                pg_dsn={
                    "host": pg.host,
                    "port": pg.port,
                    "user": UPSTREAM_ROLE,
                    "password": upstream_password,
                    "dbname": AUDIT_DB,
                    "sslmode": "disable",
                }
            )
            stack.callback(reader.close)
        try:
            target = start_pgguard(
                stack,
                workdir,
                pg,
                upstream_password,
                workers,
                name=name,
                audit={"url": url, "jsonl": None, "mode": mode, "sync": sync},
            )
        except BenchError as exc:
            result.problems.append(f"{name} did not start: {exc}")
            log(result.problems[-1])
            continue
        audited = AuditTarget(target, mode, store, shown, reader, sync)
        problem = check_connects(psql, target)
        if problem is None:
            try:
                audited.count, _ = catch_up(reader, 1)
                last = reader.last_statement()
            except Exception as exc:
                problem = f"cannot read its store: {exc!r}"
            else:
                if audited.count < 1 or last is None:
                    problem = "no statement record in its store after a select 1"
                elif tuple(last) != (BENCH_SUB, "select 1"):
                    problem = f"its newest statement record is {tuple(last)!r}, not a select 1"
        if problem is not None:
            result.problems.append(
                f"{name} left out: {problem}\n{name} log tail:\n{guard_log_tail(target)}"
            )
            log(result.problems[-1])
            continue
        result.checks.append(
            f"{name}: `select 1` through it is in its store as a statement record of "
            f"{BENCH_SUB} ({audited.count} statement record(s) before measuring)"
        )
        result.targets.append(audited)
    return result


def audit_after(result: AuditResult) -> Callable[[Cell, Target, Run], None]:
    """The run_cell hook: after a run through an audited target, wait for its store to catch
    up, count the statement records the run added, check them against pgbench's transactions,
    and charge the pgguard CPU spent catching up to the run's CPU per transaction."""
    audited = {a.target.name: a for a in result.targets}

    def after(cell: Cell, target: Target, run: Run) -> None:
        at = audited.get(target.name)
        if at is None:
            return  # the baseline
        round_no = len(cell.runs.get(target.name, []))
        pids = target.service.pids() if target.service is not None else []
        cpu_before = cpu_seconds(pids)
        before = at.count
        count = AuditCount(
            target.name,
            at.mode,
            cell.mode,
            cell.clients,
            round_no,
            run.transactions,
            None,
            None,
            None,
        )
        try:
            count.at_exit = at.reader.statements() - before
            total, count.catch_up_s = catch_up(at.reader, before + (run.transactions or 0))
        except Exception as exc:
            count.error = f"cannot count the store's records: {exc!r}"
            result.counts.append(count)
            result.problems.append(f"{target.name} -M {cell.mode} -c {cell.clients}: {count.error}")
            log(result.problems[-1])
            return
        count.settled = total - before
        at.count = total
        cpu_extra = cpu_seconds(pids) - cpu_before
        if run.transactions and run.cpu_us_per_tx is not None:
            run.cpu_us_per_tx += cpu_extra * 1e6 / run.transactions
        # The target was idle since its last catch-up: its threads' CPU since then is this run's.
        threads = side_cpu_seconds(pids)
        if run.transactions:
            count.thread_us_per_tx = (threads - at.thread_cpu) * 1e6 / run.transactions
        at.thread_cpu = threads
        result.counts.append(count)
        txns = f"{run.transactions:,}" if run.transactions is not None else "n/a"
        log(
            f"{target.name}: {count.at_exit:,} statement records at pgbench's exit, "
            f"{count.settled:,} after {count.catch_up_s:.1f} s; {txns} transactions"
            + (f"; CPU incl. catch-up {run.cpu_us_per_tx:.1f} µs/tx" if run.cpu_us_per_tx else "")
        )
        if count.ok() is False:
            what = (
                f"{target.name} ({at.mode}) -M {cell.mode} -c {cell.clients} round {round_no}: "
                f"pgbench reported {run.transactions:,} transactions; the store had "
                f"{count.at_exit:,} statement records of the run when pgbench exited and "
                f"{count.settled:,} once it stopped growing"
            )
            if at.mode == "strict" and count.at_exit < (run.transactions or 0):
                what = (
                    f"BUG (strict mode released results before their records were durable): {what}"
                )
            else:
                what = f"records lost: {what} (a full buffered queue drops records)"
            result.problems.append(f"{what}\n{target.name} log tail:\n{guard_log_tail(target)}")
            log(result.problems[-1])

    return after


def run_audit(
    pgbench: str,
    plain: Target,
    result: AuditResult,
    clients_list: list[int],
    duration: int,
    rounds: int,
) -> None:
    """pgbench -S through ``plain`` (audit off) and every audited target, alternating."""
    targets = [plain, *(a.target for a in result.targets)]
    after = audit_after(result)
    warm = max(clients_list)
    log(f"warming up pgguard and the audited targets (-M simple -c {warm}, 2 s each)")
    for target in targets:
        run_pgbench(pgbench, target, "simple", warm, 2)
    for audited in result.targets:
        try:
            audited.snapshot()
        except Exception as exc:  # the first run's count reports it
            log(f"{audited.target.name}: cannot read its store after the warm-up: {exc!r}")
    for mode in AUDIT_MODES:
        for clients in clients_list:
            cell = Cell(mode, clients)
            run_cell(pgbench, targets, cell, duration, rounds, after)
            note_failures(cell, targets, result.problems)
            result.cells.append(cell)


# --------------------------------------------------------------------------- idle connections


@dataclass
class Memory:
    target: str
    processes: int
    connections: int
    rss_before_kib: int
    rss_after_kib: int
    pss_before_kib: int
    pss_after_kib: int
    error: str | None = None

    @property
    def per_connection_kib(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / max(self.connections, 1)


async def _hold_idle(target: Target, count: int, concurrency: int = 64) -> Memory:
    import asyncpg

    assert target.service is not None
    pids = target.service.pids()
    rss_before, pss_before = rss_kib(pids), pss_kib(pids)
    connections: list[Any] = []
    ready: list[Any] = []  # authenticated and ran select 1
    errors: list[BaseException] = []
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            try:
                conn = await asyncpg.connect(
                    host=target.host,
                    port=target.port,
                    user=target.user,
                    password=target.password,
                    database=DBNAME,
                    ssl=False,
                    timeout=60,
                    statement_cache_size=0,
                )
            except Exception as exc:
                errors.append(exc)
                return
            connections.append(conn)
            try:
                await conn.fetchval("select 1", timeout=30)
                ready.append(conn)
            except Exception as exc:
                errors.append(exc)

    try:
        try:
            await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 300)
        except TimeoutError:
            errors.append(TimeoutError("opening the connections took over 300 s"))
        await asyncio.sleep(2.0)  # let the proxy settle (buffers, GC)
        pids = target.service.pids()
        return Memory(
            target.name,
            len(pids),
            len(ready),
            rss_before,
            rss_kib(pids),
            pss_before,
            pss_kib(pids),
            f"{len(errors)} of {count} failed: {errors[0]!r}" if errors else None,
        )
    finally:

        async def close(conn: Any) -> None:
            try:
                await asyncio.wait_for(conn.close(), 10)
            except Exception:
                conn.terminate()

        await asyncio.gather(*(close(c) for c in connections))


def measure_idle(target: Target, count: int) -> Memory:
    log(f"opening {count} idle connections through {target.name}")
    memory = asyncio.run(_hold_idle(target, count))
    log(
        f"{target.name}: RSS {memory.rss_before_kib / 1024:.1f} → "
        f"{memory.rss_after_kib / 1024:.1f} MiB, {memory.per_connection_kib:.1f} KiB/connection"
        + (f" ({memory.error})" if memory.error else "")
    )
    return memory


def wait_backends_gone(pg: EmbeddedPostgres, below: int = 60, timeout: float = 60.0) -> None:
    """Wait for a previous test's upstream backends to exit (max_connections is 1200)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = pg.psql(
            "select count(*) from pg_stat_activity where backend_type = 'client backend'",
            check=False,
        )
        if out.strip().isdigit() and int(out.strip()) < below:
            return
        time.sleep(0.5)
    log(f"warning: still {out.strip()} client backends after {timeout:.0f} s")


# --------------------------------------------------------------------------- report


@dataclass
class Context:
    args: argparse.Namespace
    command: str
    started: dt.datetime
    machine: dict[str, str]
    targets: list[str]
    notes: list[str]
    cells: list[Cell] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)
    guard: GuardResult | None = None
    guard_skipped: str = ""  # why the guard-rules measurements were not made
    audit: AuditResult | None = None
    audit_skipped: str = ""  # why the audit-trail measurements were not made
    masking: MaskingResult | None = None
    masking_skipped: str = ""  # why the masking measurements were not made


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    out = (proc.stdout or proc.stderr).strip().splitlines()
    return out[0] if out else "unknown"


def loadavg() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def pgguard_revision() -> str:
    """The git commit of the checkout, and whether pgguard/ has uncommitted changes."""
    head = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if head == "unknown" or " " in head:
        return "unknown (not a git checkout)"
    try:
        proc = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "pgguard"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return head
    return head + (" + uncommitted changes in pgguard/" if proc.stdout.strip() else "")


def machine_info(pg: EmbeddedPostgres, pgbouncer: str | None) -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pg_version = pg.psql("show server_version").strip() or "unknown"
    try:
        pgguard_version = metadata.version("pgguard")
    except metadata.PackageNotFoundError:
        pgguard_version = "unknown"
    return {
        "CPUs (nproc)": str(os.cpu_count()),
        "CPU model": model,
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "PostgreSQL": pg_version,
        "pgbench": _first_line([find_tool(pg, "pgbench"), "--version"]),
        "pgbouncer": _first_line([pgbouncer, "--version"]) if pgbouncer else "not run",
        "pgguard": pgguard_version,
        "pgguard revision": pgguard_revision(),
    }


def fmt_tps(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "n/a"


def fmt_ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}" if num is not None and den else "n/a"


def fmt_us(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "n/a"


def table(header: list[str], rows: list[list[str]], text_columns: int = 2) -> str:
    """A Markdown table: the first ``text_columns`` left-aligned, the numbers right-aligned."""
    rule = ["---" if i < text_columns else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def section_header(ctx: Context) -> str:
    a = ctx.args
    lines = [
        "# pgguard benchmarks",
        "",
        f"Generated {ctx.started:%Y-%m-%d %H:%M} UTC by `scripts/bench.py`"
        " (regenerate with `make bench`).",
        "",
        "## Setup",
        "",
        f"- Command: `{ctx.command}`",
        f"- Matrix: pgbench -n -S, modes {', '.join(a.modes)}, clients "
        f"{', '.join(map(str, a.clients))} (-j 1 for one client, else -j 2), "
        f"-T {a.duration} s, {a.rounds} round(s) per target, alternating "
        f"{' → '.join(ctx.targets)}; medians quoted.",
        f"- Data: `pgbench -i -s {SCALE}` in a private cluster (fsync off, "
        "synchronous_commit off, shared_buffers 256MB, max_connections 1200).",
        f"- pgguard: `pgguard serve --workers {a.workers}`, no policies, audit off, log level "
        "warning, plaintext on loopback, upstream sslmode disable; clients log in with a "
        "minted HS256 JWT as the password.",
        "- pgbouncer: pool_mode session (pgguard holds one upstream session per client too), "
        "SCRAM auth, plaintext, connection logging off.",
        "- direct: PostgreSQL itself over TCP on loopback, SCRAM auth.",
        "- floor: `scripts/bench_forwarder.py`, the smallest TCP forwarder in Python (uvloop, "
        "asyncio Protocols, one process): it connects upstream on accept and writes the bytes "
        "each side sends to the other, with TCP_NODELAY both ways and no framing, parsing or "
        "back-pressure. It authenticates nothing: pgbench logs in through it to PostgreSQL "
        "with the upstream role's SCRAM password."
        if "floor" in ctx.targets
        else "- floor: not run (--skip-floor).",
        "- guard: a second `pgguard serve` like pgguard but with a policy, logged into as a "
        "member of ai-agents (see Guard rules)."
        if ctx.guard is not None
        else f"- guard: not run ({ctx.guard_skipped}).",
        "- audit-*: more `pgguard serve` instances like pgguard but with the audit trail on "
        "(see Audit trail)."
        if ctx.audit is not None
        else f"- audit-*: not run ({ctx.audit_skipped}).",
        "- masking: another `pgguard serve` like pgguard but with a masking policy, logged "
        "into as a member of developers (see Masking)."
        if ctx.masking is not None
        else f"- masking: not run ({ctx.masking_skipped}).",
        "",
        "Machine:",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in ctx.machine.items()]
    if ctx.notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {note}" for note in ctx.notes]
    return "\n".join(lines)


def section_how_to_read(ctx: Context) -> str:
    return "\n".join(
        [
            "## How to read this",
            "",
            f"This runs on a shared {ctx.machine['CPUs (nproc)']}-core machine: pgbench, "
            "PostgreSQL and the proxy all compete for the same cores, so absolute TPS are "
            "low and noisy and a proxy's cost shows up partly as CPU taken from PostgreSQL "
            "and pgbench; other work on the machine (see the load averages above) adds noise. "
            "Quote the medians and the ratios, not single runs, and compare "
            "runs made on the same machine only. `pgguard/direct` is the share of direct "
            "throughput left with pgguard in the path; `pgguard/pgbouncer` compares it with "
            "a mature C proxy doing the same session-per-client relaying. `floor` is a Python "
            "forwarder on uvloop that only moves bytes: `pgguard/floor` is the share of that "
            "best case Python pass-through left after pgguard's protocol work, "
            "`floor/pgbouncer` what Python and uvloop cost against C before any protocol "
            "work. CPU µs/tx is the "
            "proxy's own user+system CPU time (all its processes) during the run divided by "
            "the transactions pgbench completed; it includes the connection setup of the "
            "run's few clients. `-M simple` sends one Query message per transaction, "
            "`extended` Parse/Bind/Execute each time, `prepared` Bind/Execute of a prepared "
            "statement.",
        ]
    )


def section_passthrough(ctx: Context) -> str:
    header = [
        "mode",
        "clients",
        "direct TPS",
        "pgguard TPS",
        "floor TPS",
        "pgbouncer TPS",
        "pgguard/direct",
        "pgguard/pgbouncer",
        "pgbouncer/direct",
        "pgguard/floor",
        "floor/pgbouncer",
        "pgguard CPU µs/tx",
        "floor CPU µs/tx",
        "pgbouncer CPU µs/tx",
    ]
    rows = []
    for cell in ctx.cells:
        d, g, b = cell.tps("direct"), cell.tps("pgguard"), cell.tps("pgbouncer")
        f = cell.tps("floor")
        rows.append(
            [
                cell.mode,
                str(cell.clients),
                fmt_tps(d),
                fmt_tps(g),
                fmt_tps(f),
                fmt_tps(b),
                fmt_ratio(g, d),
                fmt_ratio(g, b),
                fmt_ratio(b, d),
                fmt_ratio(g, f),
                fmt_ratio(f, b),
                fmt_us(cell.cpu("pgguard")),
                fmt_us(cell.cpu("floor")),
                fmt_us(cell.cpu("pgbouncer")),
            ]
        )
    raw_rows = []
    failures = []
    for cell in ctx.cells:
        for target, runs in cell.runs.items():
            raw_rows.append(
                [
                    cell.mode,
                    str(cell.clients),
                    target,
                    ", ".join(fmt_tps(r.tps) if r.tps is not None else "failed" for r in runs),
                ]
            )
            failures += [
                f"-M {cell.mode} -c {cell.clients} {target}: {r.error}" for r in runs if r.error
            ]
    lines = [
        "## Pass-through (pgbench -S)",
        "",
        "Median TPS (without initial connection time) per cell and target; ratios of the "
        "medians; proxy CPU time per transaction (median).",
        "",
        table(header, rows),
        "",
        "<details><summary>Every run (TPS, in run order)</summary>",
        "",
        table(["mode", "clients", "target", "TPS per round"], raw_rows, text_columns=3),
        "",
        "</details>",
    ]
    if failures:
        lines += ["", "Failed runs:", ""] + [f"- {f}" for f in failures]
    return "\n".join(lines)


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _span(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """``lo`` or ``lo to hi`` (as formatted) of ``values``."""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo} to {hi}"


def _cores(cell: Cell, target: str) -> float | None:
    """Cores kept busy by ``target``: median TPS x median CPU seconds per transaction."""
    tps, cpu = cell.tps(target), cell.cpu(target)
    return tps * cpu / 1e6 if tps is not None and cpu is not None else None


def section_bounds(ctx: Context) -> str:
    lines = ["## What bounds the pass-through", ""]
    if "floor" not in ctx.targets:
        return "\n".join([*lines, "Not measured: floor was not run (--skip-floor)."])
    clients = 8 if 8 in ctx.args.clients else max(ctx.args.clients)
    cells = [c for c in ctx.cells if c.clients == clients]
    ncpu = ctx.machine.get("CPUs (nproc)", "?")
    rows, framing, python_vs_c, shares = [], [], [], []
    for cell in cells:
        g, f, b = cell.cpu("pgguard"), cell.cpu("floor"), cell.cpu("pgbouncer")
        g_f, f_b, g_b = _diff(g, f), _diff(f, b), _diff(g, b)
        if g_f is not None:
            framing.append(g_f)
        if f_b is not None:
            python_vs_c.append(f_b)
        if g_f is not None and g_b is not None and g_b > 0:
            shares.append(100 * g_f / g_b)
        cores = [_cores(cell, t) for t in ("pgguard", "floor", "pgbouncer")]
        rows.append(
            [
                cell.mode,
                fmt_us(g),
                fmt_us(f),
                fmt_us(b),
                f"{g_f:+.1f}" if g_f is not None else "n/a",
                f"{f_b:+.1f}" if f_b is not None else "n/a",
                fmt_ratio(cell.tps("pgguard"), cell.tps("floor")),
                fmt_ratio(cell.tps("floor"), cell.tps("pgbouncer")),
                " / ".join(f"{c:.2f}" if c is not None else "n/a" for c in cores),
            ]
        )
    lines += [
        f"CPU µs per transaction at `-c {clients}` (medians of this run), split in two: "
        "`pgguard - floor` is what pgguard's framing and state tracking cost in Python per "
        "transaction; `floor - pgbouncer` is what Python and uvloop callbacks and syscalls "
        "cost against C for the same relaying (pgbouncer's figure includes its own walk of "
        "the message headers, floor's includes no protocol work at all). "
        "Cores busy is median TPS x median CPU per transaction.",
        "",
        table(
            [
                "mode",
                "pgguard CPU µs/tx",
                "floor CPU µs/tx",
                "pgbouncer CPU µs/tx",
                "pgguard - floor µs/tx",
                "floor - pgbouncer µs/tx",
                "pgguard/floor TPS",
                "floor/pgbouncer TPS",
                "cores busy: pgguard / floor / pgbouncer",
            ],
            rows,
            text_columns=1,
        ),
        "",
    ]
    summary = []
    if framing:
        summary.append(
            f"Across the modes at `-c {clients}`, pgguard - floor is {_span(framing)} µs/tx"
        )
    if python_vs_c:
        summary.append(f"floor - pgbouncer is {_span(python_vs_c)} µs/tx")
    if summary:
        text = " and ".join(summary) + "."
        if shares:
            text += (
                f" pgguard - floor is {_span(shares, '{:.0f}')}% of pgguard - pgbouncer; the "
                "rest is floor's own distance from C."
            )
        busy = {
            t: [c for c in (_cores(cell, t) for cell in cells) if c is not None]
            for t in ("pgguard", "floor", "pgbouncer")
        }
        shown = [f"{t} {_span(v, '{:.2f}')}" for t, v in busy.items() if v]
        if shown:
            text += f" Cores busy out of {ncpu}: " + ", ".join(shown) + "."
        if clients != 8:
            text += f" (`-c 8` was not in this run's --clients; `-c {clients}` is shown.)"
        lines += [text, ""]
    lines.append(
        "`floor` reads none of the bytes it moves. pgguard cannot: to track statement "
        "boundaries (Query; Parse/Bind/Execute up to Sync), ReadyForQuery and its "
        "transaction status, ErrorResponse, and row counts when a max_rows limit applies, it "
        "walks the header (type byte and length) of every message in both directions, and "
        "cuts out and decodes the few types that carry state, in Python. pgbouncer walks "
        "every message header too (it needs ReadyForQuery to know when a server connection "
        "is idle), in C. pgguard's relay is built like floor (uvloop, asyncio Protocols, one "
        "write per chunk received), so floor's CPU per transaction is what pgguard's "
        "pass-through would cost if everything it does beyond moving bytes cost nothing. "
        f"pgbench, PostgreSQL and the proxy share {ncpu} cores here, so CPU the proxy spends "
        "per transaction is taken from PostgreSQL and pgbench: proxy CPU per transaction "
        "directly lowers TPS."
    )
    return "\n".join(lines)


def section_memory(ctx: Context) -> str:
    count = ctx.args.idle_connections
    lines = [f"## Memory: {count:,} idle authenticated connections", ""]
    if not ctx.memory:
        return "\n".join([*lines, "Not measured."])
    lines += [
        f"Each proxy gets {count:,} connections (asyncpg, 64 at a time), each authenticated "
        "and having run `select 1` once, then held idle for 2 s. RSS is VmRSS from "
        "/proc/<pid>/status summed over the proxy's processes (with --workers: the serve "
        "process and its workers); PSS (smaps_rollup) counts pages shared between forked "
        "workers once. Per connection = (RSS after - RSS before) / connections; it includes "
        "the proxy's upstream connection for each client.",
        "",
    ]
    rows = []
    for m in ctx.memory:
        rows.append(
            [
                m.target,
                str(m.processes),
                f"{m.connections:,}",
                f"{m.rss_before_kib / 1024:.1f}",
                f"{m.rss_after_kib / 1024:.1f}",
                f"{(m.rss_after_kib - m.rss_before_kib) / 1024:.1f}",
                f"{m.per_connection_kib:.1f}",
                f"{m.pss_after_kib / 1024:.1f}",
            ]
        )
    lines.append(
        table(
            [
                "proxy",
                "processes",
                "connections",
                "RSS before (MiB)",
                "RSS with connections (MiB)",
                "delta (MiB)",
                "per connection (KiB)",
                "PSS with connections (MiB)",
            ],
            rows,
            text_columns=1,
        )
    )
    errors = [f"- {m.target}: {m.error}" for m in ctx.memory if m.error]
    if errors:
        lines += ["", "Errors:", "", *errors]
    return "\n".join(lines)


def _guard_rows(cells: list[Cell], first: Callable[[Cell], list[str]]) -> list[list[str]]:
    rows = []
    for cell in cells:
        p, g = cell.tps("pgguard"), cell.tps("guard")
        pc, gc = cell.cpu("pgguard"), cell.cpu("guard")
        rows.append(
            [
                *first(cell),
                fmt_tps(p),
                fmt_tps(g),
                fmt_ratio(g, p),
                fmt_us(pc),
                fmt_us(gc),
                f"{gc - pc:+.1f}" if pc is not None and gc is not None else "n/a",
            ]
        )
    return rows


GUARD_COLUMNS = [
    "pgguard TPS",
    "guard TPS",
    "guard/pgguard",
    "pgguard CPU µs/tx",
    "guard CPU µs/tx",
    "guard CPU extra µs/tx",
]


def section_guard(ctx: Context) -> str:
    lines = ["## Guard rules (pgbench -S, and distinct statements)", ""]
    result = ctx.guard
    if result is None:
        return "\n".join([*lines, f"Not measured: {ctx.guard_skipped}."])
    a = ctx.args
    lines += [
        "`guard` is a second `pgguard serve` (same flags as `pgguard`) with the policy below: "
        "the four rules of the SPEC §3 example and a limits entry for ai-agents "
        "(statement_timeout 30s, read-only clamp; no max_rows and no masks, so results are "
        "neither capped nor rewritten). pgbench logs in with a token for "
        f"`{GUARD_SUB}`, groups {', '.join(GUARD_GROUPS)}, so every statement is judged. "
        "`pgguard` is the policy-less pass-through target of the tables above (with no "
        "policy nothing is analysed). The guard parses each statement text it has not seen "
        "with pglast, analyses it (classes, tables and functions resolved against the "
        "catalog and the search_path), decides, and caches the facts by exact text and, for "
        "plain reads, by pglast fingerprint, so reads that differ only in their literals are "
        "analysed once; each session also remembers its verdict per text. Runs alternate "
        f"pgguard → guard, {a.rounds} round(s) of {a.duration} s; medians quoted. "
        "`guard CPU extra µs/tx` is the guard's CPU per transaction minus pgguard's: the "
        "cost of judging. Target (issue 3): guard/pgguard ≥ 0.9 for pgbench -S, simple "
        "and extended.",
        "",
        "### pgbench -S",
        "",
        table(
            ["mode", "clients", *GUARD_COLUMNS],
            _guard_rows(result.cells, lambda c: [c.mode, str(c.clients)]),
        ),
        "",
        "### Distinct statements",
        "",
        "Custom pgbench scripts (`-f`, `-M simple`, "
        f"`-c {GUARD_DISTINCT_CLIENTS} -j {jobs_for(GUARD_DISTINCT_CLIENTS)}`), the same "
        "script through both targets:",
        "",
        "- **1,000 shapes**: `SELECT abalance FROM pgbench_accounts t:n WHERE t:n.aid = :aid` "
        "with `n` random from 1 to 1,000: the alias gives 1,000 statement shapes (1,000 pglast "
        "fingerprints), and the literal makes nearly every text new, so the text cache "
        "misses and the fingerprint cache answers once each shape has been seen.",
        "- **every statement new**: the alias is `t:aid` (`aid` random from 1 to "
        f"{100000 * SCALE:,}), so nearly every statement has a shape never seen before and is "
        "parsed and analysed from scratch: the worst case.",
        "",
        "Extended mode is not measured here: with `-M extended` pgbench turns every `:var` "
        "into a `$n` parameter at script load (the alias `t:n` becomes `t$1`), so the "
        "statement text never changes and there is nothing distinct to measure (pgbench "
        "allows at most 128 scripts, too few for 1,000 shapes).",
        "",
        table(
            ["workload", "mode", "clients", *GUARD_COLUMNS],
            _guard_rows(result.distinct, lambda c: [c.workload, c.mode, str(c.clients)]),
            text_columns=3,
        ),
    ]
    raw_rows = []
    for cell in result.cells + result.distinct:
        for target, runs in cell.runs.items():
            raw_rows.append(
                [
                    cell.workload,
                    cell.mode,
                    str(cell.clients),
                    target,
                    ", ".join(fmt_tps(r.tps) if r.tps is not None else "failed" for r in runs),
                ]
            )
    lines += [
        "",
        "Checked through `guard` before measuring:",
        "",
        *[f"- {check}" for check in result.checks],
    ]
    if result.warnings:
        lines += ["", "`pgguard policy check` warnings:", ""]
        lines += [f"- {w}" for w in result.warnings]
    if result.problems:
        lines += ["", "Problems:", ""]
        for problem in result.problems:
            head, _, tail = problem.partition("\n")
            lines.append(f"- {head}")
            if tail:
                lines += ["", "  ```", *[f"  {line}" for line in tail.splitlines()], "  ```"]
    lines += [
        "",
        "<details><summary>Every run (TPS, in run order) and the policy</summary>",
        "",
        table(["workload", "mode", "clients", "target", "TPS per round"], raw_rows, 4),
        "",
        "```yaml",
        result.policy.rstrip(),
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines)


def _audit_goal(audit_mode: str, clients: int) -> float | None:
    """Issue 5's least audited/pgguard ratio for this mode at ``clients``, else None."""
    least, at = AUDIT_GOALS.get(audit_mode, (None, None))
    return least if least is not None and (at is None or at == clients) else None


def _problem_lines(problems: list[str]) -> list[str]:
    lines = []
    for problem in problems:
        head, _, tail = problem.partition("\n")
        lines.append(f"- {head}")
        if tail:
            lines += ["", "  ```", *[f"  {line}" for line in tail.splitlines()], "  ```"]
    return lines


def section_audit(ctx: Context) -> str:
    lines = ["## Audit trail (pgbench -S with the audit on)", ""]
    result = ctx.audit
    if result is None:
        return "\n".join([*lines, f"Not measured: {ctx.audit_skipped}."])
    a = ctx.args
    order = " → ".join(["pgguard", *(t.target.name for t in result.targets)])
    lines += [
        "`audit-*` are more `pgguard serve` instances, each like `pgguard` (same flags, "
        "identity, no policy) but with the audit trail on, configured as below; session "
        "recording is at its defaults (recording.max_rows 50, max_bytes 65536), as whenever "
        "the audit is on. In `strict` mode a statement's result is held until its record is "
        "committed (group commit: each gateway process's audit writer process commits what "
        "arrived during its previous commit in one transaction); in `buffered` mode records "
        "go to a bounded queue and are written behind (a commit per 100 ms or 500 records). "
        "After a 2 s warm-up through each target, pgbench -S runs through each, "
        f"alternating {order}, {a.rounds} round(s) of {a.duration} s per cell; medians "
        "quoted. The ratio is to `pgguard` with the audit off in the same alternation, not "
        "to the Pass-through table's runs. CPU µs/tx is pgguard's own (all its processes, "
        "the audit writer process included) from pgbench's start until the store stopped "
        "growing after the run, so a backlog written after pgbench exits is charged to the "
        "run. `of which writer process` is the part spent off the event loop: in the audit "
        "writer process (building records, sealing, hashing, the store's driver) and any "
        "other thread; the rest, on the event loop's thread, is the relay's share (following "
        "statements, session recording, handing events over). The PostgreSQL store's backend "
        "burns "
        "PostgreSQL's CPU, which is not counted here but is taken from the same cores as "
        "pgbench's and the benchmark's backends. Targets (issue 5): buffered ≥ 0.9 x "
        "pgguard, strict ≥ 0.6 x pgguard at `-c 8`, with the default `audit.sync: full`; "
        "the `audit.sync: normal` target (no disk flush per commit: survives pgguard being "
        "killed, not a power cut) is there to show what strict mode's flush costs.",
        "",
        table(
            ["target", "audit.mode", "audit.sync", "audit.url"],
            [[t.target.name, t.mode, t.sync, f"`{t.url_shown}`"] for t in result.targets],
            text_columns=4,
        ),
    ]
    if result.setup:
        lines += ["", "Stores:", "", *[f"- {fact}" for fact in result.setup]]
    if not result.targets:
        lines += ["", "No audited target could be measured."]
        if result.problems:
            lines += ["", "Problems:", "", *_problem_lines(result.problems)]
        return "\n".join(lines)

    rows, goals = [], []
    for cell in result.cells:
        p, pc = cell.tps("pgguard"), cell.cpu("pgguard")
        for at in result.targets:
            name = at.target.name
            t, tc = cell.tps(name), cell.cpu(name)
            threads = [
                c.thread_us_per_tx
                for c in result.counts
                if c.target == name
                and c.mode == cell.mode
                and c.clients == cell.clients
                and c.thread_us_per_tx is not None
            ]
            goal = _audit_goal(at.mode, cell.clients) if at.sync == "full" else None
            if goal is None:
                verdict = "—"
            elif t is None or not p:
                verdict = f"≥ {goal:.1f}: n/a"
            else:
                met = t / p >= goal
                verdict = f"≥ {goal:.1f}: {'met' if met else '**missed**'}"
                goals.append((at, cell, t / p, goal, met))
            rows.append(
                [
                    cell.mode,
                    str(cell.clients),
                    name,
                    fmt_tps(t),
                    fmt_tps(p),
                    fmt_ratio(t, p),
                    verdict,
                    fmt_us(tc),
                    fmt_us(statistics.median(threads) if threads else None),
                    fmt_us(pc),
                    f"{tc - pc:+.1f}" if tc is not None and pc is not None else "n/a",
                ]
            )
    lines += [
        "",
        table(
            [
                "mode",
                "clients",
                "target",
                "TPS",
                "pgguard TPS (audit off)",
                "ratio to pgguard",
                "issue 5 target",
                "CPU µs/tx",
                "of which writer process",
                "pgguard CPU µs/tx",
                "audit CPU extra µs/tx",
            ],
            rows,
            text_columns=3,
        ),
        "",
    ]
    summary = []
    for at in result.targets:
        mine = [g for g in goals if g[0] is at]
        if not mine:
            continue
        goal, where = mine[0][3], AUDIT_GOALS[at.mode][1]
        missed = [f"{c.mode} -c {c.clients} ({r:.2f})" for _, c, r, _, ok in mine if not ok]
        span = _span([r for _, _, r, _, _ in mine], "{:.2f}")
        scope = f"at -c {where}" if where is not None else "in every cell"
        text = f"{at.target.name}: ≥ {goal:.1f} x pgguard {scope}: ratio {span}; "
        text += (
            f"met in all {len(mine)} cell(s)"
            if not missed
            else f"missed in {len(missed)} of {len(mine)}: " + ", ".join(missed)
        )
        summary.append(text + ".")
    if summary:
        lines += ["Against issue 5's targets (ratios of the medians):", ""]
        lines += [f"- {s}" for s in summary] + [""]

    count_rows = []
    for c in result.counts:
        ok = c.ok()
        count_rows.append(
            [
                c.mode,
                str(c.clients),
                str(c.round_no),
                c.target,
                f"{c.transactions:,}" if c.transactions is not None else "n/a",
                f"{c.at_exit:,}" if c.at_exit is not None else "n/a",
                f"{c.settled:,}" if c.settled is not None else "n/a",
                f"{c.catch_up_s:.1f}" if c.catch_up_s is not None else "n/a",
                "n/a" if ok is None else ("ok" if ok else "**SHORT**"),
            ]
        )
    checked = [c.ok() for c in result.counts]
    passed = sum(1 for ok in checked if ok)
    failed = sum(1 for ok in checked if ok is False)
    lines += [
        "### Statement records against transactions",
        "",
        "After every run through an audited target the script counts the `statement` "
        "records the run added to the store (session, auth and reload records left out): as "
        "soon as pgbench exited, and again once the count had not moved for "
        f"{AUDIT_QUIET_S:.0f} s (caught up: seconds from pgbench's exit to the last change "
        "seen). Each pgbench -S transaction is one statement, and pgbench's setup queries add "
        "a few, so records ≥ transactions is expected. In strict mode the count at pgbench's "
        "exit must already reach it (pgbench saw each of those results, so each record was "
        "durable before): a shortfall there is a bug. In buffered mode the count after "
        "catch-up must.",
        "",
        table(
            [
                "mode",
                "clients",
                "round",
                "target",
                "transactions (pgbench)",
                "records at pgbench exit",
                "records after catch-up",
                "caught up after (s)",
                "records ≥ transactions",
            ],
            count_rows,
            text_columns=4,
        ),
        "",
        f"{passed} of {len(checked)} audited run(s) passed the check"
        + (f"; **{failed} failed** (see Problems)." if failed else "."),
        "",
        "Checked through each audited target before measuring:",
        "",
        *[f"- {check}" for check in result.checks],
    ]
    if result.problems:
        lines += ["", "Problems:", "", *_problem_lines(result.problems)]
    raw_rows = []
    for cell in result.cells:
        for target, runs in cell.runs.items():
            raw_rows.append(
                [
                    cell.mode,
                    str(cell.clients),
                    target,
                    ", ".join(fmt_tps(r.tps) if r.tps is not None else "failed" for r in runs),
                ]
            )
    lines += [
        "",
        "<details><summary>Every run (TPS, in run order)</summary>",
        "",
        table(["mode", "clients", "target", "TPS per round"], raw_rows, text_columns=3),
        "",
        "</details>",
    ]
    return "\n".join(lines)


def _verdict(value: float | None, goal: float) -> tuple[str, bool | None]:
    """``≥ goal: met`` / ``**missed**`` / ``n/a``, and whether it was met (None: n/a)."""
    if value is None:
        return f"≥ {goal}: n/a", None
    met = value >= goal
    return f"≥ {goal}: {'met' if met else '**missed**'}", met


def _per_round(runs: list[FetchRun]) -> str:
    return ", ".join(fmt_tps(r.rows_per_s) if r.rows_per_s is not None else "failed" for r in runs)


def _ms(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "n/a"


def section_masking(ctx: Context) -> str:
    lines = ["## Masking (issue 4)", ""]
    result = ctx.masking
    if result is None:
        return "\n".join([*lines, f"Not measured: {ctx.masking_skipped}."])
    a = ctx.args
    import psycopg

    def shown(sql: str) -> str:
        return sql.replace("%s", "$1", 1).replace("%s", "$2", 1)

    lines += [
        "`masking` is one more `pgguard serve` (same flags as `pgguard`) with the policy below: "
        f"three masks on `public.{MASK_TABLE}` (email `partial_email`, ssn `keep_last(4)`, "
        "salary `generalize(1000)`), each exempting dba only, and no rules. Clients log in "
        f"with a token for `{MASK_SUB}`, groups {', '.join(MASK_GROUPS)}, so the masks apply "
        f"to them ({MASK_SECRET_ENV} is set, though none of these masks is keyed). "
        f"`{MASK_TABLE}` has {MASK_TABLE_ROWS:,} rows of made-up people (emails like "
        "`user1234@example.com`, SSNs like `123-45-6789`, salaries 30,000 to 200,000 in "
        "numeric(10,2)); `quota` is a clean numeric(10,2) twin of salary, and `name` and "
        "`city` are clean texts of about the widths of email and ssn"
        + (f" (average widths: {', '.join(result.widths)})" if result.widths else "")
        + ". `pgguard` is the policy-less pass-through target of the tables above. "
        "Targets (issue 4): a 10,000-row select of three masked columns at ≥ "
        f"{MASK_FETCH_GOAL} x the rows per second of the same select of three clean columns "
        "through pgguard, in text and binary formats; a select-only workload on a table "
        f"with masks, not selecting the masked columns, at ≥ {MASK_SELECT_GOAL} x "
        "pass-through. The caveat of How to read this holds here too: on this shared "
        f"{ctx.machine.get('CPUs (nproc)', '?')}-core machine the client, PostgreSQL and "
        "pgguard compete for the same cores, so quote the medians and ratios, not single runs"
        + (f" (load averages 1/5/15 min: {'; '.join(result.load)})" if result.load else "")
        + ".",
        "",
        "### 10,000-row selects, masked and clean columns (psycopg 3)",
        "",
        f"One process, psycopg {psycopg.__version__} ({psycopg.pq.__impl__} implementation), "
        "one autocommit connection per target, statements never prepared "
        "(`prepare_threshold=None`: Parse/Bind/Execute of the unnamed statement each time); "
        "text format with `cur.execute(q, window); cur.fetchall()`, binary with "
        f"`conn.cursor(binary=True)`. Masked: `{shown(MASK_QUERIES['masked'])}`; clean: "
        f"`{shown(MASK_QUERIES['clean'])}`, each window {MASK_ROWS:,} ids. pgguard remembers "
        "the masked results of short values (per mask and format, a bounded number), so the "
        "same select repeated measures that memo's hits: **repeated values** fetches window "
        f"1 (ids 1 to {MASK_ROWS:,}) every time, after one untimed fetch; **new values** "
        f"moves to the next of windows 2 to {MASK_WINDOWS} every time, "
        f"{(MASK_WINDOWS - 1) * MASK_ROWS:,} distinct values per column before a window "
        "comes round again, more than the memo keeps: every masked value is computed, the "
        "worst case and what a table larger than the memo costs. Each run repeats its "
        f"fetch for {a.duration} s; rows/s is rows fetched / wall time. Runs alternate, in "
        "each format: "
        + ", ".join(f"{v} {q} through {t}" for v, q, t in MASK_FETCH_RUNS)
        + f"; {a.rounds} round(s), medians quoted. `direct` is PostgreSQL itself, for "
        "context (the same selects, unmasked). pgguard CPU is the masking target's "
        "user+system CPU per fetch; client CPU is this process's (psycopg turning 10,000 "
        "rows into Python objects), which competes for the same cores.",
        "",
    ]
    rows = []
    fetch_goals: list[tuple[str, float | None, bool | None]] = []
    for fmt in MASK_FORMATS:
        clean_d = result.median((fmt, "repeated", "clean", "direct"))
        for values in ("repeated", "new"):
            masked = result.median((fmt, values, "masked", "masking"))
            clean = result.median((fmt, values, "clean", "masking"))
            ratio = masked / clean if masked is not None and clean else None
            verdict, met = _verdict(ratio, MASK_FETCH_GOAL)
            fetch_goals.append((f"{fmt}, {values} values", ratio, met))
            rows.append(
                [
                    fmt,
                    values,
                    fmt_tps(masked),
                    fmt_tps(clean),
                    fmt_ratio(masked, clean),
                    verdict,
                    _ms(result.median((fmt, values, "masked", "masking"), "gateway_cpu_ms")),
                    _ms(result.median((fmt, values, "clean", "masking"), "gateway_cpu_ms")),
                    fmt_tps(clean_d),
                    fmt_ratio(clean, clean_d),
                ]
            )
    lines += [
        table(
            [
                "format",
                "values",
                "masked rows/s",
                "clean rows/s",
                "masked/clean",
                "issue 4 target",
                "pgguard CPU ms/fetch, masked",
                "pgguard CPU ms/fetch, clean",
                "clean rows/s direct (repeated)",
                "clean masking/direct",
            ],
            rows,
        ),
        "",
    ]
    detail = []
    for fmt in MASK_FORMATS:
        for values, query, name in MASK_FETCH_RUNS:
            key = (fmt, values, query, name)
            runs = result.fetch.get(key, [])
            detail.append(
                [
                    fmt,
                    values,
                    query,
                    name,
                    fmt_tps(result.median(key)),
                    _ms(result.median(key, "ms_per_query")),
                    _ms(result.median(key, "gateway_cpu_ms")),
                    _ms(result.median(key, "client_cpu_ms")),
                    str(sum(r.queries for r in runs)),
                    _per_round(runs),
                ]
            )
    lines += [
        "Every fetch run (medians over the rounds; rows/s per round in run order):",
        "",
        table(
            [
                "format",
                "values",
                "columns",
                "target",
                "rows/s",
                "ms/fetch",
                "pgguard CPU ms/fetch",
                "client CPU ms/fetch",
                "fetches (all rounds)",
                "rows/s per round",
            ],
            detail,
            text_columns=4,
        ),
        "",
        "### Select-only on the masked table, clean columns (pgbench)",
        "",
        f"A custom pgbench script (`-f`, {', '.join(MASK_SELECT_MODES)} modes, clients "
        f"{', '.join(map(str, a.clients))}, -j 1 for one client, else -j 2): "
        f"`\\set id random(1, {MASK_TABLE_ROWS})` then "
        f"`SELECT name, city FROM {MASK_TABLE} WHERE id = :id`. The statement reads a table "
        "with masks but none of its masked columns: `masking` plans it (the result's "
        "columns are clean) and relays the rows unchanged. After a 2 s warm-up through "
        f"each, runs alternate pgguard → masking, {a.rounds} round(s) of {a.duration} s; "
        "medians quoted. `masking CPU extra µs/tx` is masking's CPU per transaction minus "
        "pgguard's.",
        "",
    ]
    select_rows = []
    select_goals: list[tuple[Cell, float | None, bool | None]] = []
    for cell in result.cells:
        p, m = cell.tps("pgguard"), cell.tps("masking")
        pc, mc = cell.cpu("pgguard"), cell.cpu("masking")
        ratio = m / p if m is not None and p else None
        verdict, met = _verdict(ratio, MASK_SELECT_GOAL)
        select_goals.append((cell, ratio, met))
        select_rows.append(
            [
                cell.mode,
                str(cell.clients),
                fmt_tps(p),
                fmt_tps(m),
                fmt_ratio(m, p),
                verdict,
                fmt_us(pc),
                fmt_us(mc),
                f"{mc - pc:+.1f}" if pc is not None and mc is not None else "n/a",
            ]
        )
    lines += [
        table(
            [
                "mode",
                "clients",
                "pgguard TPS",
                "masking TPS",
                "masking/pgguard",
                "issue 4 target",
                "pgguard CPU µs/tx",
                "masking CPU µs/tx",
                "masking CPU extra µs/tx",
            ],
            select_rows,
        ),
        "",
    ]
    summary = []
    measured = [(f, r, ok) for f, r, ok in fetch_goals if ok is not None]
    if measured:
        missed = [f"{f} ({r:.2f})" for f, r, ok in measured if not ok and r is not None]
        span = _span([r for _, r, _ in measured if r is not None], "{:.2f}")
        summary.append(
            f"10,000-row select, masked/clean ≥ {MASK_FETCH_GOAL}: ratio {span}; "
            + (
                f"met in all {len(measured)} (format, values) pair(s)"
                if not missed
                else f"missed in {len(missed)} of {len(measured)}: " + ", ".join(missed)
            )
            + "."
        )
    measured_s = [(c, r, ok) for c, r, ok in select_goals if ok is not None]
    if measured_s:
        missed = [f"{c.mode} -c {c.clients} ({r:.2f})" for c, r, ok in measured_s if not ok and r]
        span = _span([r for _, r, _ in measured_s if r is not None], "{:.2f}")
        summary.append(
            f"select-only of clean columns, masking/pgguard ≥ {MASK_SELECT_GOAL}: ratio {span}; "
            + (
                f"met in all {len(measured_s)} cell(s)"
                if not missed
                else f"missed in {len(missed)} of {len(measured_s)}: " + ", ".join(missed)
            )
            + "."
        )
    if summary:
        lines += ["Against issue 4's targets (ratios of the medians):", ""]
        lines += [f"- {s}" for s in summary] + [""]
    lines += [
        "Checked through `masking` and directly before measuring:",
        "",
        *[f"- {check}" for check in result.checks],
    ]
    if result.warnings:
        lines += ["", "`pgguard policy check` warnings:", ""]
        lines += [f"- {w}" for w in result.warnings]
    if result.problems:
        lines += ["", "Problems:", "", *_problem_lines(result.problems)]
    raw_rows = []
    for cell in result.cells:
        for target, pgbench_runs in cell.runs.items():
            raw_rows.append(
                [
                    cell.mode,
                    str(cell.clients),
                    target,
                    ", ".join(
                        fmt_tps(r.tps) if r.tps is not None else "failed" for r in pgbench_runs
                    ),
                ]
            )
    lines += [
        "",
        "<details><summary>Every select-only run (TPS, in run order) and the policy</summary>",
        "",
        table(["mode", "clients", "target", "TPS per round"], raw_rows, text_columns=3),
        "",
        "```yaml",
        result.policy.rstrip(),
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines)


# Sections in document order; a later benchmark appends its own function here.
SECTIONS: list[Callable[[Context], str]] = [
    section_header,
    section_how_to_read,
    section_passthrough,
    section_bounds,
    section_guard,
    section_audit,
    section_masking,
    section_memory,
]


def render(ctx: Context) -> str:
    return "\n\n".join(section(ctx) for section in SECTIONS) + "\n"


# --------------------------------------------------------------------------- main


def _csv_ints(value: str) -> list[int]:
    try:
        items = [int(x) for x in value.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {value!r}") from exc
    if not items or any(i < 1 for i in items):
        raise argparse.ArgumentTypeError("client counts must be positive")
    return items


def _csv_modes(value: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if x not in MODES]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {value!r}")
    return items


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark pgguard against direct PostgreSQL and pgbouncer (pgbench -S).",
    )
    parser.add_argument("--duration", type=int, default=None, help="pgbench -T seconds (10)")
    parser.add_argument("--rounds", type=int, default=None, help="runs per cell and target (2)")
    parser.add_argument("--workers", type=int, default=1, help="pgguard serve --workers (1)")
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown report")
    parser.add_argument("--skip-pgbouncer", action="store_true", help="leave pgbouncer out")
    parser.add_argument(
        "--skip-pgguard", action="store_true", help="leave pgguard out (tests the harness)"
    )
    parser.add_argument(
        "--skip-floor",
        action="store_true",
        help="leave out floor, the minimal Python forwarder (scripts/bench_forwarder.py)",
    )
    parser.add_argument(
        "--skip-guard",
        action="store_true",
        help="leave out the guard-rules measurements (pgguard with a policy)",
    )
    parser.add_argument(
        "--skip-audit",
        action="store_true",
        help="leave out the audit-trail measurements (pgguard with the audit on)",
    )
    parser.add_argument(
        "--skip-masking",
        action="store_true",
        help="leave out the masking measurements (pgguard with masks)",
    )
    parser.add_argument("--clients", type=_csv_ints, default=[1, 8], help='e.g. "1,8" (default)')
    parser.add_argument(
        "--modes",
        type=_csv_modes,
        default=list(MODES),
        help='pgbench -M modes, default "simple,extended,prepared"',
    )
    parser.add_argument(
        "--idle-connections", type=int, default=1000, help="connections for the memory test"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --duration 3 --rounds 1 (guard rules, audit trail, masking and "
        "floor included, unless --skip-guard / --skip-audit / --skip-masking / --skip-floor)",
    )
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.duration < 1 or args.rounds < 1 or args.workers < 1 or args.idle_connections < 0:
        parser.error("--duration, --rounds and --workers must be positive")
    return args


def command_line(argv: Sequence[str]) -> str:
    exe = Path(sys.executable)
    with suppress(ValueError):
        exe = exe.relative_to(Path.cwd())
    script = Path(sys.argv[0])
    with suppress(ValueError):
        script = script.resolve().relative_to(Path.cwd())
    return shlex.join([str(exe), str(script), *argv])


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every finally block runs."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # SIGINT too: a shell starts background jobs with it ignored, and `kill -INT` should work.
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, interrupt) for s in handled}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(args: argparse.Namespace, command: str) -> Context:
    started = dt.datetime.now(dt.UTC)
    load_at_start = loadavg()
    notes: list[str] = []
    raise_fd_limit()
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="pgguard-bench-"))
        stack.callback(shutil.rmtree, workdir, True)
        pg, password = start_postgres(stack)
        pgbench, psql = find_tool(pg, "pgbench"), find_tool(pg, "psql")
        direct = Target("direct", pg.host, pg.port, UPSTREAM_ROLE, password)
        targets = [direct]

        if not args.skip_pgguard:
            guard = start_pgguard(stack, workdir, pg, password, args.workers)
            problem = check_connects(psql, guard)
            if problem is not None:
                raise BenchError(
                    f"cannot run select 1 through pgguard: {problem}\n"
                    + _tail(guard.service.log_file if guard.service else workdir / "x")
                )
            targets.append(guard)
        else:
            notes.append("pgguard was skipped (--skip-pgguard).")

        if args.skip_floor:
            notes.append("floor was skipped (--skip-floor).")
        else:
            floor = start_floor(stack, workdir, pg, password)
            problem = check_connects(psql, floor)
            if problem is not None:
                raise BenchError(
                    f"cannot run select 1 through floor: {problem}\n"
                    + _tail(floor.service.log_file if floor.service else workdir / "x")
                )
            targets.append(floor)

        guard_target: Target | None = None
        guard_result: GuardResult | None = None
        guard_skipped = ""
        if args.skip_guard:
            guard_skipped = "--skip-guard"
        elif args.skip_pgguard:
            guard_skipped = "--skip-pgguard: the guard is compared with pgguard"
        else:
            guard_target, guard_result = start_guard(stack, workdir, pg, password, args.workers)
            verify_guard(psql, guard_target, guard_result)

        masking_target: Target | None = None
        masking_result: MaskingResult | None = None
        masking_skipped = ""
        if args.skip_masking:
            masking_skipped = "--skip-masking"
        elif args.skip_pgguard:
            masking_skipped = "--skip-pgguard: the masking target is compared with pgguard"
        else:
            masking_target, masking_result = start_masking(
                stack, workdir, pg, password, args.workers
            )
            verify_masking(psql, masking_target, direct, masking_result)

        pgbouncer_exe: str | None = None
        if args.skip_pgbouncer:
            notes.append("pgbouncer was skipped (--skip-pgbouncer).")
        else:
            pgbouncer_exe, why = ensure_pgbouncer()
            if pgbouncer_exe is None:
                notes.append(f"pgbouncer column skipped: {why}")
                log(why)
            else:
                bouncer = start_pgbouncer(stack, pgbouncer_exe, pg, password, args.idle_connections)
                problem = check_connects(psql, bouncer)
                if problem is not None:
                    raise BenchError(
                        f"cannot run select 1 through pgbouncer: {problem}\n"
                        + _tail(bouncer.service.log_file if bouncer.service else workdir / "x")
                    )
                targets.append(bouncer)

        ctx = Context(
            args=args,
            command=command,
            started=started,
            machine=machine_info(pg, pgbouncer_exe),
            targets=[t.name for t in targets],
            notes=notes,
            guard_skipped=guard_skipped,
            masking_skipped=masking_skipped,
        )
        ctx.machine["load average 1/5/15 min, at start"] = load_at_start
        log("warming up (direct, 3 s)")
        run_pgbench(pgbench, direct, "simple", max(args.clients), 3)
        ctx.cells = run_matrix(
            pgbench, targets, args.modes, args.clients, args.duration, args.rounds
        )
        if guard_target is not None and guard_result is not None:
            wait_backends_gone(pg)
            run_guard(
                pgbench,
                next(t for t in targets if t.name == "pgguard"),
                guard_target,
                guard_result,
                workdir,
                args.clients,
                args.duration,
                args.rounds,
            )
            ctx.guard = guard_result
        if masking_target is not None and masking_result is not None:
            wait_backends_gone(pg)
            masking_result.load.append(f"{loadavg()} (before)")
            run_masking_fetch(masking_target, direct, masking_result, args.duration, args.rounds)
            wait_backends_gone(pg)
            run_masking_select(
                pgbench,
                next(t for t in targets if t.name == "pgguard"),
                masking_target,
                masking_result,
                workdir,
                args.clients,
                args.duration,
                args.rounds,
            )
            masking_result.load.append(f"{loadavg()} (after)")
            ctx.masking = masking_result
        if args.skip_audit:
            ctx.audit_skipped = "--skip-audit"
        elif args.skip_pgguard:
            ctx.audit_skipped = "--skip-pgguard: the audited targets are compared with pgguard"
        else:
            wait_backends_gone(pg)
            audit_result = start_audit(stack, workdir, pg, psql, password, args.workers)
            if audit_result.targets:
                run_audit(
                    pgbench,
                    next(t for t in targets if t.name == "pgguard"),
                    audit_result,
                    args.clients,
                    args.duration,
                    args.rounds,
                )
            ctx.audit = audit_result
        if args.idle_connections:
            for target in targets:
                # floor stands for no proxy at all; its memory is not the question here.
                if target.service is not None and target.name != "floor":
                    wait_backends_gone(pg)
                    ctx.memory.append(measure_idle(target, args.idle_connections))
        ctx.machine["load average 1/5/15 min, at end"] = loadavg()
        return ctx


def main(argv: Sequence[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    try:
        with signals_as_interrupt():
            ctx = run(args, command_line(raw_argv))
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    report = render(ctx)
    print(report)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
        log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
