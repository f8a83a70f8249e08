"""psql against both targets: the same commands, the same output."""

from __future__ import annotations

import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

from tests.support.pgcluster import PgServer
from tests.support.schema import ITEMS, item_psql_row

from .conftest import Endpoint


def _psql_bin(pg: PgServer) -> str:
    found = shutil.which("psql") or pg.bin("psql")
    return found


def psql(
    pg: PgServer,
    ep: Endpoint,
    *args: str,
    stdin: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    cmd = [_psql_bin(pg), "-X", "-v", "ON_ERROR_STOP=1", "-At", *args]
    proc = subprocess.run(
        cmd,
        input=stdin,
        capture_output=True,
        text=True,
        env=ep.env(),
        cwd=cwd,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"psql failed ({proc.returncode}):\n{proc.stderr}"
    return proc


def test_select(pg: PgServer, endpoint: Endpoint) -> None:
    out = psql(
        pg, endpoint, "-c", "SELECT id, name, price, created, data, blob FROM items ORDER BY id"
    )
    assert out.stdout.splitlines() == [item_psql_row(it) for it in ITEMS]
    assert out.stderr == ""


def test_select_aggregate_and_params(pg: PgServer, endpoint: Endpoint) -> None:
    out = psql(
        pg,
        endpoint,
        "-c",
        "SELECT count(*), sum(price), min(name), max(created) FROM items",
        "-c",
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM items WHERE id <= 5",
    )
    total = sum(it.price for it in ITEMS)
    assert out.stdout.splitlines() == [
        f"100|{total}|item-001|2024-01-05 04:01:40.1234+00",
        "1,2,3,4,5",
    ]


def test_multi_statement_string(pg: PgServer, endpoint: Endpoint) -> None:
    out = psql(
        pg,
        endpoint,
        "-c",
        "SELECT 1 AS a; SELECT 'two'; VALUES (3), (4); CREATE TEMP TABLE tt (x int); "
        "INSERT INTO tt SELECT generate_series(1, 5); SELECT sum(x) FROM tt",
    )
    assert out.stdout.splitlines() == ["1", "two", "3", "4", "CREATE TABLE", "INSERT 0 5", "15"]


def test_multi_statement_error_stops(pg: PgServer, endpoint: Endpoint) -> None:
    proc = subprocess.run(
        [
            _psql_bin(pg),
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-c",
            "SELECT 1; SELECT 1/0; SELECT 3",
        ],
        capture_output=True,
        text=True,
        env=endpoint.env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == ["1"]
    assert "ERROR:  division by zero" in proc.stderr


CSV_IN = (
    '1,plain,1.50\n2,"with, comma",2.00\n3,"with ""quotes""",\n'
    '4,"multi\nline",4.25\n5,ünïcødé ✓,5.00\n6,,0.00\n'
)


def test_copy_in_and_out(pg: PgServer, endpoint: Endpoint, table: str, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text(CSV_IN)
    bulk = "".join(f"{i}\tbulk-{i}\t{i}.{i % 100:02d}\n" for i in range(100, 5100))
    (tmp_path / "bulk.tsv").write_text(bulk)
    script = "\n".join(
        [
            f"CREATE TABLE {table} (id int PRIMARY KEY, name text, amount numeric(10,2));",
            f"\\copy {table} FROM 'in.csv' WITH (FORMAT csv)",
            f"\\copy {table} FROM 'bulk.tsv'",
            f"\\copy (SELECT * FROM {table} WHERE id < 100 ORDER BY id) TO 'out.csv' CSV",
            f"\\copy (SELECT * FROM {table} WHERE id >= 100 ORDER BY id) TO 'out.tsv'",
            f"SELECT count(*), sum(amount) FROM {table};",
            f"\\copy (SELECT id, name FROM {table} WHERE id IN (2, 3, 6) ORDER BY id) TO STDOUT",
        ]
    )
    out = psql(pg, endpoint, "-f", "-", stdin=script + "\n", cwd=tmp_path)
    assert (tmp_path / "out.csv").read_text() == CSV_IN
    assert (tmp_path / "out.tsv").read_text() == bulk
    total = sum(Decimal(f"{i}.{i % 100:02d}") for i in range(100, 5100)) + Decimal("12.75")
    lines = out.stdout.splitlines()
    assert lines[0] == "CREATE TABLE"
    assert lines[1:5] == ["COPY 6", "COPY 5000", "COPY 6", "COPY 5000"]
    assert lines[5] == f"5006|{total}"
    assert lines[6:] == ["2\twith, comma", '3\twith "quotes"', "6\t\\N"]


def test_notice_from_do_block(pg: PgServer, endpoint: Endpoint) -> None:
    out = psql(
        pg,
        endpoint,
        "-c",
        "DO $$BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END$$",
        "-c",
        "SELECT 'after'",
    )
    assert out.stdout.splitlines() == ["DO", "after"]
    assert out.stderr.splitlines() == ["NOTICE:  hello 42", "WARNING:  careful"]


def test_listen_notify(pg: PgServer, endpoint: Endpoint) -> None:
    channel = f"ch_{endpoint.target}"
    script = f"LISTEN {channel};\nNOTIFY {channel}, 'hi there';\nSELECT pg_backend_pid();\n"
    out = psql(pg, endpoint, "-f", "-", stdin=script)
    lines = out.stdout.splitlines()
    assert lines[:2] == ["LISTEN", "NOTIFY"]
    m = re.fullmatch(
        rf'Asynchronous notification "{channel}" with payload "hi there" '
        r"received from server process with PID (\d+)\.",
        lines[2],
    )
    assert m, lines
    # The PID in the notification is the server's (the same session notified itself).
    assert lines[3] == m.group(1)
    assert len(lines) == 4
