"""`pgguard demo` (what `make run` starts): the printed psql command works; Ctrl-C cleans up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def test_demo_prints_a_working_psql_command_and_cleans_up() -> None:
    script = Path(sys.executable).parent / "pgguard"
    proc = subprocess.Popen(
        [str(script), "demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        output = "".join(lines)
        commands = re.findall(r"^\s+(PGPASSWORD='[^']+' psql '[^']+')$", output, re.MULTILINE)
        assert len(commands) == 3, output
        agent, dba, developer = commands
        config = re.search(r"config:\s+(\S+)", output)
        assert config is not None
        workdir = Path(config.group(1)).parent
        assert workdir.exists()
        result = subprocess.run(
            commands[0] + " -XAt -c 'select count(*) from customers'",
            shell=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "4"
        assert '"mcpServers"' in output
        check_three_things(output, agent, dba, developer, config.group(1))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("demo did not stop on Ctrl-C")
    assert proc.returncode == 0, rest
    assert "cleaned up" in rest
    assert not workdir.exists()


def psql(command: str, sql: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        f'{command} -XAt -v ON_ERROR_STOP=1 -c "{sql}"',
        shell=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_three_things(output: str, agent: str, dba: str, developer: str, config: str) -> None:
    """What the demo says to try works: a masked select, a refused write, a held statement
    approved with the printed CLI command; and the printed URLs answer."""
    import json
    import threading
    import urllib.request

    masked = psql(agent, "select email from customers order by id limit 1")
    clear = psql(dba, "select email from customers order by id limit 1")
    assert masked.returncode == 0 and clear.returncode == 0, masked.stderr + clear.stderr
    assert "****" in masked.stdout and "****" not in clear.stdout
    refused = psql(agent, "delete from customers where id = 1")
    assert refused.returncode != 0 and "ai-read-only" in refused.stderr

    metrics = re.search(r"Metrics:\s+(\S+)", output)
    page = re.search(r"Approvals page:\s+(\S+)", output)
    assert metrics is not None and page is not None
    with urllib.request.urlopen(metrics.group(1), timeout=10) as response:
        assert b"pgguard_masked_values_total" in response.read()
    with urllib.request.urlopen(page.group(1), timeout=10) as response:
        assert response.status == 200

    held: dict[str, subprocess.CompletedProcess[str]] = {}
    thread = threading.Thread(
        target=lambda: held.update(
            done=psql(developer, "update orders set status = 'void' where id = 1", timeout=60)
        )
    )
    thread.start()
    dba_token = re.search(r"PGGUARD_TOKEN='([^']+)'", output)
    assert dba_token is not None
    env = {**os.environ, "PGGUARD_TOKEN": dba_token.group(1)}
    pgguard = str(Path(sys.executable).parent / "pgguard")
    deadline = time.monotonic() + 20
    pending: list[dict[str, object]] = []
    while not pending and time.monotonic() < deadline:
        listing = subprocess.run(
            [pgguard, "approvals", "list", "--json", "--config", config],
            capture_output=True, text=True, env=env, timeout=30,
        )  # fmt: skip
        listed = [json.loads(line) for line in listing.stdout.splitlines() if line.strip()]
        pending = [r for r in listed if r["status"] == "pending"]
        time.sleep(0.2)
    assert pending, "the developer's update was not held"
    approve = subprocess.run(
        [pgguard, "approvals", "approve", str(pending[0]["id"]), "--config", config],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert approve.returncode == 0, approve.stdout + approve.stderr
    thread.join(30)
    assert "done" in held and held["done"].returncode == 0, held
    assert psql(dba, "select status from orders where id = 1").stdout.strip() == "void"
