"""Resident memory of a process tree (Linux /proc), sampled in the background."""

from __future__ import annotations

import threading
from pathlib import Path


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return out


def child_pids(pid: int) -> set[int]:
    """The direct children of ``pid`` (a serving parent's workers)."""
    return set(_children(pid))


def tree_pids(pid: int) -> list[int]:
    pids = [pid]
    i = 0
    while i < len(pids):
        pids.extend(c for c in _children(pids[i]) if c not in pids)
        i += 1
    return pids


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss_bytes(pid: int) -> int:
    """Current resident set size of ``pid`` and its descendants, in bytes."""
    return sum(_status_kib(p, "VmRSS") for p in tree_pids(pid)) * 1024


class RssSampler:
    """Samples ``tree_rss_bytes(pid)`` every ``interval`` seconds; ``peak`` is the maximum."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = tree_rss_bytes(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, tree_rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline
