"""Text log lines cannot be forged or used to drive a terminal by what a client sends."""

from __future__ import annotations

import json
import logging

from pgguard.logs import JsonFormatter, TextFormatter


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("pgguard", logging.WARNING, "", 0, message, args, None)
    r.__dict__.update(extra)
    return r


def test_a_client_chosen_name_stays_on_its_line() -> None:
    hostile = "evil\n14:00:00 ERROR forged line\x1b[2J\u202e"
    line = TextFormatter().format(
        record("authentication failed: %s", hostile, user=hostile, session_id="s1")
    )
    assert "\n" not in line and "\x1b" not in line and "\u202e" not in line
    assert line.count("forged line") == 2  # still there to read, escaped
    assert "evil\\x0a14:00:00" in line


def test_json_lines_keep_the_value_exactly() -> None:
    hostile = "evil\nname\x1b"
    line = JsonFormatter().format(record("authentication failed", user=hostile))
    assert "\n" not in line
    assert json.loads(line)["user"] == hostile
