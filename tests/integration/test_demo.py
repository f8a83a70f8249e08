"""`pgguard demo` (what `make run` starts): the printed psql command works; Ctrl-C cleans up."""

from __future__ import annotations

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
        assert len(commands) == 2, output
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
