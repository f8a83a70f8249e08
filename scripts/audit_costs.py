"""What one audit record costs to seal and store on this machine, and what one commit costs.

    .venv/bin/python scripts/audit_costs.py [--dir DIR] [--records N]

The audit writer process seals each statement record (canonical JSON, SHA-256) and stores it
in the SQL store's table (34 columns, 7 indexes), one transaction per group commit. This
measures those two costs apart from the gateway, on a quiet machine: the CPU and wall time
per record when commits are large (buffered mode: up to 500 records), and per commit when
they are small (strict mode: a commit holds the statements that arrived during the previous
one, a few at -c 8), with ``audit.sync`` full and normal; and the disk's fsync latency.
Add the relay's and the record builder's share (docs/benchmarks.md) for the whole cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from pgguard.audit.chain import ChainState
from pgguard.audit.records import AuditRecord, PlainExtra
from pgguard.audit.store import SqlStore


def sample_record(i: int) -> AuditRecord:
    """A typical pgbench -S statement record, as the writer builds it."""
    return AuditRecord(
        event="statement",
        ts=time.time(),
        session_id="9c41e07d2b6a5f38",
        user="alice",
        email="alice@example.com",
        groups=("developers",),
        agent="cursor",
        client_addr="127.0.0.1:51234",
        application_name="pgbench",
        database="bench",
        upstream_role="app",
        prompt_id="5f0c8a7e-3d1b-4c2a-9e6f-0123456789ab",
        prompt_source="jwt",
        protocol="simple",
        statement=f"SELECT abalance FROM pgbench_accounts WHERE aid = {i % 100000};",
        fingerprint="348bee4e67e86ca6",
        class_="read",
        command="SELECT",
        objects=("public.pgbench_accounts",),
        decision="allow",
        rows=1,
        duration_ms=0.21,
        extra=PlainExtra(
            preview={
                "statement": "",
                "columns": ["abalance"],
                "rows": [["0"]],
                "truncated": False,
                "row_count": 1,
                "command_tag": "SELECT 1",
                "error": None,
                "dropped_bytes": 0,
            }
        ),
    )


def cpu() -> float:
    return time.process_time()


def seal_cost(n: int) -> float:
    """CPU µs per record to seal (in place, as the writer process does)."""
    chain = ChainState("costs")
    records = [sample_record(i) for i in range(n)]
    start = cpu()
    for record in records:
        chain.next(record, True)
    return (cpu() - start) * 1e6 / n


def store_costs(directory: Path, sync: str, batch: int, commits: int) -> tuple[float, float]:
    """(CPU µs, wall µs) per commit of ``batch`` sealed records, medians of 5 runs."""
    db = directory / f"costs-{sync}-{batch}.db"
    store = SqlStore(f"sqlite:///{db}", fsync=sync == "full")
    chain = ChainState(f"costs-{sync}-{batch}")
    cpus: list[float] = []
    walls: list[float] = []
    try:
        for _ in range(5):
            batches = [
                [chain.next(sample_record(i), True) for i in range(batch)] for _ in range(commits)
            ]
            c0, w0 = cpu(), time.perf_counter()
            for records in batches:
                store.append(records)
            cpus.append((cpu() - c0) * 1e6 / commits)
            walls.append((time.perf_counter() - w0) * 1e6 / commits)
    finally:
        store.close()
    return statistics.median(cpus), statistics.median(walls)


def fsync_latency(directory: Path, n: int = 200) -> float:
    """Median µs of a 4 KiB append and fdatasync."""
    path = directory / "fsync.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times: list[float] = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            t = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, help="where the SQLite files go (default: a temp dir)")
    parser.add_argument("--records", type=int, default=20000, help="records for the seal cost")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgguard-costs-", dir=args.dir) as tmp:
        directory = Path(tmp)
        print(f"sealing: {seal_cost(args.records):.1f} µs CPU per record")
        print(f"fsync of a 4 KiB append: {fsync_latency(directory):.0f} µs (median)")
        print(
            "| audit.sync | records per commit | CPU µs per commit | wall µs per commit "
            "| CPU µs per record |"
        )
        print("| --- | ---: | ---: | ---: | ---: |")
        for sync in ("full", "normal"):
            for batch, commits in ((1, 300), (4, 300), (8, 200), (500, 4)):
                cpu_us, wall_us = store_costs(directory, sync, batch, commits)
                print(
                    f"| {sync} | {batch} | {cpu_us:,.0f} | {wall_us:,.0f} | {cpu_us / batch:,.1f} |"
                )


if __name__ == "__main__":
    main()
