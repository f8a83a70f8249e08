"""pgguard.metrics: the SPEC §7 set (names, types, labels), bounded labels, the fold from the
gateway's plain counters, and prometheus-client's multiprocess mode across processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from pgguard.identity import TOKEN_ERROR_REASONS
from pgguard.metrics import (
    ALL_METRICS,
    AUTH_FAILURE_REASONS,
    CONNECTION_RESULTS,
    DURATION_BUCKETS,
    EXTRA_METRICS,
    MAX_MASK_LABELS,
    MULTIPROC_ENV,
    SPEC_METRICS,
    Metrics,
    MetricsCollector,
    Tally,
    observe_many,
    worker_exited,
)

ROOT = Path(__file__).resolve().parents[2]

# SPEC §7, verbatim: name → (type, label names).
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "pgguard_client_connections": ("gauge", ()),
    "pgguard_connections_total": ("counter", ("result",)),
    "pgguard_auth_failures_total": ("counter", ("reason",)),
    "pgguard_statements_total": ("counter", ("class", "decision")),
    "pgguard_statement_duration_seconds": ("histogram", ()),
    "pgguard_masked_values_total": ("counter", ("column",)),
    "pgguard_approvals_pending": ("gauge", ()),
    "pgguard_audit_queue_depth": ("gauge", ()),
    "pgguard_audit_write_errors_total": ("counter", ()),
    "pgguard_upstream_errors_total": ("counter", ()),
    "pgguard_bytes_total": ("counter", ("direction",)),
}

# Beyond SPEC §7.
EXTRA: dict[str, tuple[str, tuple[str, ...]]] = {
    "pgguard_policy_reload_failed": ("gauge", ()),
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class FakeAudit:
    depth: int = 0
    errors: int = 0


@dataclass
class FakeGateway:
    tally: Tally = field(default_factory=Tally)
    stats: dict[str, int] = field(default_factory=lambda: {"upstream_errors": 0})
    sessions: set[object] = field(default_factory=set)
    audit: FakeAudit | None = None
    policy_error: str | None = None


@pytest.fixture(autouse=True)
def _single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)


def parse(text: bytes | str) -> Samples:
    out: Samples = {}
    raw = text.decode() if isinstance(text, bytes) else text
    for family in text_string_to_metric_families(raw):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def exposed_name(name: str, kind: str) -> str:
    """The family name the text format gives (counters lose ``_total``)."""
    return name.removesuffix("_total") if kind == "counter" else name


# --------------------------------------------------------------------------- the SPEC set


def test_spec_metrics_are_the_spec_set() -> None:
    got = {m.name: (m.kind, m.labels) for m in SPEC_METRICS}
    assert got == EXPECTED
    assert {m.name: (m.kind, m.labels) for m in EXTRA_METRICS} == EXTRA
    assert ALL_METRICS == SPEC_METRICS + EXTRA_METRICS


def test_spec_metrics_match_the_spec_text() -> None:
    spec = ROOT.parent / "shared" / "SPEC.md"
    if not spec.exists():
        pytest.skip("SPEC.md is not next to the checkout")
    text = spec.read_text()
    section = text[text.index("## 7. Operations") : text.index("## 8.")]
    metrics = section[section.index("- Metrics") : section.index("- Graceful")]
    found = {
        name: tuple(labels.split(",")) if labels else ()
        for name, labels in re.findall(r"`(pgguard_[a-z_]+)(?:\{([a-z_,]+)\})?`", metrics)
    }
    assert found == {name: labels for name, (_, labels) in EXPECTED.items()}


def test_exposition_is_exactly_the_spec_set_and_the_extras() -> None:
    gateway = FakeGateway(audit=FakeAudit(depth=3, errors=1))
    tally = gateway.tally
    tally.connection("accepted")
    tally.auth_failure("expired")
    tally.statement("read", "allow", 2.0)
    tally.masked_values({"public.customers.email": 2})
    tally.bytes_client_to_server = 10
    collector = MetricsCollector(gateway, Metrics())
    families = {f.name: f for f in text_string_to_metric_families(collector.exposition().decode())}
    every = {**EXPECTED, **EXTRA}
    assert {name: f.type for name, f in families.items()} == {
        exposed_name(name, kind): kind for name, (kind, _) in every.items()
    }
    for name, (kind, labels) in every.items():
        family = families[exposed_name(name, kind)]
        assert family.samples, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == set(labels), (name, sample)


def test_closed_label_sets_start_at_zero() -> None:
    samples = parse(MetricsCollector(FakeGateway(), Metrics()).exposition())
    for result in CONNECTION_RESULTS:
        assert ("pgguard_connections_total", frozenset({("result", result)})) in samples
    for reason in TOKEN_ERROR_REASONS:
        assert ("pgguard_auth_failures_total", frozenset({("reason", reason)})) in samples
    for direction in ("client_to_server", "server_to_client"):
        assert ("pgguard_bytes_total", frozenset({("direction", direction)})) in samples
    assert {"tls_required", "user_mismatch", "database", "too_large"} <= set(AUTH_FAILURE_REASONS)
    assert not any(k[0].endswith("_created") for k in samples)


# --------------------------------------------------------------------------- the fold


def test_fold_moves_the_tally_into_the_metrics_once() -> None:
    gateway = FakeGateway(audit=FakeAudit(depth=7, errors=2))
    collector = MetricsCollector(gateway, Metrics())
    tally = gateway.tally
    for _ in range(3):
        tally.connection("accepted")
    tally.connection("refused_limit")
    tally.auth_failure("signature")
    tally.auth_failure("tls_required")
    tally.statement("write", "deny", 12.5)
    tally.statement("read", "allow", 0.5)
    tally.statement("read", "allow", None)
    tally.masked_values({"*.*.email": 4, "public.*.ssn": 0})
    tally.bytes_client_to_server += 100
    tally.bytes_server_to_client += 5000
    tally.approvals_pending = 2
    gateway.stats["upstream_errors"] = 1
    gateway.sessions.update((object(), object()))

    collector.fold()
    collector.fold()  # nothing new: nothing moves
    s = parse(collector.metrics.exposition())
    assert value(s, "pgguard_connections_total", result="accepted") == 3
    assert value(s, "pgguard_connections_total", result="refused_limit") == 1
    assert value(s, "pgguard_auth_failures_total", reason="signature") == 1
    assert value(s, "pgguard_auth_failures_total", reason="tls_required") == 1
    assert value(s, "pgguard_statements_total", **{"class": "write", "decision": "deny"}) == 1
    assert value(s, "pgguard_statements_total", **{"class": "read", "decision": "allow"}) == 2
    assert value(s, "pgguard_statement_duration_seconds_count") == 2
    assert value(s, "pgguard_statement_duration_seconds_sum") == pytest.approx(0.013)
    assert value(s, "pgguard_statement_duration_seconds_bucket", le="0.001") == 1
    assert value(s, "pgguard_statement_duration_seconds_bucket", le="0.025") == 2
    assert value(s, "pgguard_masked_values_total", column="*.*.email") == 4
    assert ("pgguard_masked_values_total", frozenset({("column", "public.*.ssn")})) not in s
    assert value(s, "pgguard_bytes_total", direction="client_to_server") == 100
    assert value(s, "pgguard_bytes_total", direction="server_to_client") == 5000
    assert value(s, "pgguard_upstream_errors_total") == 1
    assert value(s, "pgguard_audit_write_errors_total") == 2
    assert value(s, "pgguard_audit_queue_depth") == 7
    assert value(s, "pgguard_client_connections") == 2
    assert value(s, "pgguard_approvals_pending") == 2
    assert value(s, "pgguard_policy_reload_failed") == 0
    assert tally.connections == {} and not any(tally.duration_counts)

    # More traffic: only the difference is added; gauges follow the state.
    tally.bytes_client_to_server += 50
    tally.connection("accepted")
    gateway.stats["upstream_errors"] = 3
    assert gateway.audit is not None
    gateway.audit.errors = 5
    gateway.audit.depth = 0
    gateway.sessions.clear()
    gateway.policy_error = "policy.yaml:2: unknown action 'explode'"
    s = parse(collector.exposition())
    assert value(s, "pgguard_bytes_total", direction="client_to_server") == 150
    assert value(s, "pgguard_connections_total", result="accepted") == 4
    assert value(s, "pgguard_upstream_errors_total") == 3
    assert value(s, "pgguard_audit_write_errors_total") == 5
    assert value(s, "pgguard_audit_queue_depth") == 0
    assert value(s, "pgguard_client_connections") == 0
    assert value(s, "pgguard_policy_reload_failed") == 1
    gateway.policy_error = None  # a good reload
    assert value(parse(collector.exposition()), "pgguard_policy_reload_failed") == 0


def test_a_new_audit_writer_counts_from_zero() -> None:
    gateway = FakeGateway(audit=FakeAudit(errors=4))
    collector = MetricsCollector(gateway, Metrics())
    collector.fold()
    gateway.audit = FakeAudit(errors=1)
    collector.fold()
    gateway.audit = None
    collector.fold()
    s = parse(collector.metrics.exposition())
    assert value(s, "pgguard_audit_write_errors_total") == 5
    assert value(s, "pgguard_audit_queue_depth") == 0


def test_labels_are_bounded() -> None:
    tally = Tally()
    tally.auth_failure("alice@example.com")  # never a label of its own
    tally.connection("something-else")
    tally.statement("select * from secrets", "maybe", 1.0)
    tally.statement(None, None, None)
    assert tally.auth_failures == {"other": 1}
    assert tally.connections == {"aborted": 1}
    assert tally.statements == {("unknown", "unknown"): 2}
    tally.masked_values({f"s.t.c{i}": 1 for i in range(MAX_MASK_LABELS + 10)})
    assert len(tally.masked) == MAX_MASK_LABELS + 1
    assert tally.masked["other"] == 10
    tally.masked_values({"s.t.c0": 2, "brand.new.column": 1})
    assert tally.masked["s.t.c0"] == 3
    assert tally.masked["other"] == 11


def test_durations_are_kept_as_the_histogram_keeps_them() -> None:
    tally = Tally()
    for ms in (0.5, 1.0, 1.0001, 2500.0, 10_000_000.0, None, -3.0):
        tally.statement("read", "allow", ms)
    assert tally.statements[("read", "allow")] == 7
    counts = tally.duration_counts
    # le 0.001 holds 0.5 ms, exactly 1 ms and the negative one (as 0); 1.0001 ms goes to le
    # 0.0025; 2.5 s to le 2.5; 10,000 s to +Inf.
    assert counts[0] == 3 and counts[1] == 1 and counts[DURATION_BUCKETS.index(2.5)] == 1
    assert counts[-1] == 1 and sum(counts) == 6
    assert tally.duration_sum == pytest.approx((0.5 + 1.0 + 1.0001 + 2500.0 + 10_000_000.0) / 1000)


def test_observe_many_matches_observe() -> None:
    one, many = (
        Histogram("h_seconds", "h", buckets=DURATION_BUCKETS, registry=CollectorRegistry())
        for _ in range(2)
    )
    values = [0.0, 0.0004, 0.001, 0.0011, 0.3, 7.0, 1000.0]
    tally = Tally()
    for v in values:
        one.observe(v)
        tally.statement(None, None, v * 1000)
    observe_many(many, tally.duration_counts, tally.duration_sum)

    def samples(h: Histogram) -> list[tuple[str, dict[str, str], float]]:
        return [(x.name, x.labels, round(x.value, 9)) for m in h.collect() for x in m.samples]

    assert samples(many) == samples(one)


def test_tally_has_no_instance_dict() -> None:
    # The relay bumps it per message: slots keep the attribute access cheap.
    assert not hasattr(Tally(), "__dict__")


# --------------------------------------------------------------------------- several workers

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from pgguard.metrics import Metrics, MetricsCollector, Tally

    class Gw:
        def __init__(self):
            self.tally = Tally()
            self.stats = {"upstream_errors": int(sys.argv[2])}
            self.sessions = set(range(int(sys.argv[1])))
            self.audit = None
            self.policy_error = "broken" if len(sys.argv) > 3 else None

    gw = Gw()
    n = int(sys.argv[1])
    for _ in range(n):
        gw.tally.connection("accepted")
    gw.tally.auth_failure("expired")
    gw.tally.statement("read", "allow", 1.0)
    gw.tally.masked_values({"public.customers.email": n})
    gw.tally.bytes_client_to_server += 1000 * n
    collector = MetricsCollector(gw, Metrics())
    text = collector.exposition().decode()
    print(json.dumps({"pid": os.getpid(), "text": text}))
    """
)


@pytest.fixture
def multiproc_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "multiproc"
    path.mkdir()
    yield path


def run_worker(
    path: Path, connections: int, upstream_errors: int, *, reload_failed: bool = False
) -> tuple[int, Samples]:
    env = {**os.environ, MULTIPROC_ENV: str(path), "PYTHONPATH": str(ROOT)}
    extra = ["reload-failed"] if reload_failed else []
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(connections), str(upstream_errors), *extra],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return int(data["pid"]), parse(data["text"])


def read_dir(path: Path) -> Samples:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))
    return parse(generate_latest(registry))


def test_multiprocess_mode_reports_totals_across_processes(multiproc_dir: Path) -> None:
    pid1, first = run_worker(multiproc_dir, 3, 1, reload_failed=True)
    assert value(first, "pgguard_connections_total", result="accepted") == 3
    assert value(first, "pgguard_policy_reload_failed") == 1
    pid2, second = run_worker(multiproc_dir, 5, 2)
    # The second process's /metrics counts both.
    assert value(second, "pgguard_connections_total", result="accepted") == 8
    assert value(second, "pgguard_auth_failures_total", reason="expired") == 2
    assert value(second, "pgguard_statements_total", **{"class": "read", "decision": "allow"}) == 2
    assert value(second, "pgguard_statement_duration_seconds_count") == 2
    assert value(second, "pgguard_bytes_total", direction="client_to_server") == 8000
    assert value(second, "pgguard_upstream_errors_total") == 3
    assert value(second, "pgguard_client_connections") == 8  # livesum
    assert value(second, "pgguard_masked_values_total", column="public.customers.email") == 8
    # livemax: 1 while any live worker's last reload failed (not a count of workers).
    assert value(second, "pgguard_policy_reload_failed") == 1
    # Every metric, with its type, in multiprocess mode too.
    families = {f.name: f.type for f in text_string_to_metric_families(_text(multiproc_dir))}
    every = {**EXPECTED, **EXTRA}
    assert families == {exposed_name(n, kind): kind for n, (kind, _) in every.items()}

    # A worker that exited no longer counts in the live gauges; counters keep its share.
    worker_exited(pid1)  # no directory in this process's environment: a no-op
    assert value(read_dir(multiproc_dir), "pgguard_client_connections") == 8
    os.environ[MULTIPROC_ENV] = str(multiproc_dir)
    try:
        worker_exited(pid1)
    finally:
        del os.environ[MULTIPROC_ENV]
    after = read_dir(multiproc_dir)
    assert value(after, "pgguard_client_connections") == 5
    assert value(after, "pgguard_connections_total", result="accepted") == 8
    assert value(after, "pgguard_policy_reload_failed") == 0  # only the dead worker's failed
    assert pid1 != pid2

    # A replacement (a new process) adds its counts to those of the worker it replaced.
    _, third = run_worker(multiproc_dir, 2, 0)
    assert value(third, "pgguard_connections_total", result="accepted") == 10
    assert value(third, "pgguard_client_connections") == 7


def _text(path: Path) -> str:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))
    return generate_latest(registry).decode()


def test_start_multiprocess_uses_a_fresh_directory_removed_at_exit() -> None:
    code = textwrap.dedent(
        """
        import os
        from pgguard.metrics import MULTIPROC_ENV, start_multiprocess
        path = start_multiprocess()
        assert os.environ[MULTIPROC_ENV] == path and os.path.isdir(path)
        assert os.listdir(path) == []
        pid = os.fork()
        if pid == 0:
            os._exit(0)  # a worker leaving: the directory stays
        os.waitpid(pid, 0)
        assert os.path.isdir(path)
        print(path)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path.name.startswith("pgguard-metrics-")
    assert not path.exists()
