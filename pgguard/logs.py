"""Logging set-up: JSON lines for machines, a compact line for terminals. Never secrets."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Fields that callers pass with ``extra=`` and that both formats show.
CONTEXT_FIELDS = ("session_id", "user", "database", "worker")
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
# Characters a client could use to forge log lines or drive a terminal (a user name sent at
# startup is logged before it is authenticated): shown escaped in text lines.
_UNSAFE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | {
    c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
}


def _safe(text: str) -> str:
    return text.translate(_UNSAFE)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        context = " ".join(
            f"{k}={_safe(str(record.__dict__[k]))}"
            for k in CONTEXT_FIELDS
            if record.__dict__.get(k) not in (None, "")  # worker 0 is a worker too
        )
        line = f"{stamp} {record.levelname:<7} {_safe(record.getMessage())}"
        if context:
            line += f"  [{context}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
