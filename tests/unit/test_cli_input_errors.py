"""Bad input to the audit-reading commands (``pgguard audit search | tail | verify``,
``pgguard sessions list | show``): a clear one-line error and a non-zero exit status (2 for
usage and configuration errors), never a traceback, never a password."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pgguard.audit.chain import ChainState
from pgguard.audit.records import AuditRecord
from pgguard.audit.store import SqlStore
from pgguard.cli import main

SECRET = "s3cr3t-pw-9137"
NOW = time.time()

READERS: list[list[str]] = [
    ["audit", "search"],
    ["audit", "verify"],
    ["audit", "tail", "--no-follow"],
    ["sessions", "list"],
    ["sessions", "show", "s0"],
]


def records(statements: int = 6, sessions: int = 2) -> list[AuditRecord]:
    state = ChainState("inst-a")
    out = [
        state.next(
            AuditRecord(event="session_start", ts=NOW - 600 + k, user="alice", session_id=f"s{k}")
        )
        for k in range(sessions)
    ]
    out += [
        state.next(
            AuditRecord(
                event="statement",
                ts=NOW - 300 + k,
                session_id="s0",
                user="alice",
                statement=f"SELECT {k}",
                decision="deny" if k % 2 else "allow",
            )
        )
        for k in range(statements)
    ]
    return out


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A configuration whose audit store (SQLite) holds 2 sessions and 6 statements."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    with SqlStore(url) as store:
        store.append(records())
    return config_for(tmp_path, url)


def config_for(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "pgguard.yaml"
    path.write_text(json.dumps({"audit": {"url": url}}))  # JSON is YAML
    return path


def run(args: list[str], config: Path | None = None, **env: str) -> Result:
    """The command in-process, with ``--config`` after its name and no PGGUARD_ variables
    from the environment but ``env``."""
    argv = [*args[:2], "--config", str(config), *args[2:]] if config is not None else list(args)
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("PGGUARD_")}
    clean.update(env)
    return CliRunner().invoke(main, argv, env=clean)


def assert_clean_error(result: Result, code: int, *needles: str) -> None:
    """Exit ``code``, a message holding every needle, no traceback, no password."""
    assert result.exit_code == code, (result.exit_code, result.output)
    # click exits through SystemExit; anything else would have been a traceback
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    assert SECRET not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def stderr_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# -- --decision / --event ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("--decision", "denied", "'approval_expired'"),
        ("--decision", "bogus", "'audit_only'"),
        ("--event", "bogus", "'session_start'"),
        ("--event", "statements", "'auth_failure'"),
    ],
)
def test_an_unknown_decision_or_event_is_a_usage_error_naming_the_values(
    config: Path, option: str, value: str, allowed: str
) -> None:
    result = run(["audit", "search", option, value], config)
    assert_clean_error(result, 2, f"Invalid value for '{option}'", repr(value), allowed)
    assert "(0 records)" not in result.output


@pytest.mark.parametrize("value", ["deny", "DENY", "Deny"])
def test_a_decision_is_taken_in_any_case(config: Path, value: str) -> None:
    result = run(["audit", "search", "--decision", value, "--json"], config)
    assert result.exit_code == 0, result.output
    decisions = [json.loads(line)["decision"] for line in result.stdout.splitlines()]
    assert decisions == ["deny", "deny", "deny"]


def test_an_event_is_taken_in_any_case(config: Path) -> None:
    result = run(["audit", "search", "--event", "Session_Start", "--json"], config)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["event"] for line in result.stdout.splitlines()] == [
        "session_start",
        "session_start",
    ]


# -- --since / --until ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["audit", "search", "--since", "nonsense"],
        ["audit", "search", "--until", "nonsense"],
        ["sessions", "list", "--since", "nonsense"],
        ["sessions", "list", "--since", "2024-13-45"],
    ],
)
def test_a_bad_time_is_the_same_usage_error_everywhere(config: Path, args: list[str]) -> None:
    result = run(args, config)
    assert_clean_error(result, 2, f"Invalid value for '{args[2]}'", "not a time", "1h")


def test_since_later_than_until_is_a_usage_error(config: Path) -> None:
    result = run(["audit", "search", "--since", "1m", "--until", "1h"], config)
    assert_clean_error(result, 2, "--since", "is later than --until")
    ok = run(["audit", "search", "--since", "1h", "--until", "1m", "--json"], config)
    assert ok.exit_code == 0, ok.output
    assert len(ok.stdout.splitlines()) == 8


def test_good_times_still_filter(config: Path) -> None:
    result = run(["sessions", "list", "--since", "20m", "--json"], config)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2
    result = run(["sessions", "list", "--since", "1m", "--json"], config)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""


# -- --limit / --last ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["audit", "search", "--limit", "-1"], "--limit"),
        (["audit", "search", "--limit", "0"], "--limit"),
        (["sessions", "list", "--limit", "-5"], "--limit"),
        (["audit", "tail", "--no-follow", "--last", "-5"], "--last"),
    ],
)
def test_a_negative_or_zero_count_is_a_usage_error(
    config: Path, args: list[str], option: str
) -> None:
    assert_clean_error(run(args, config), 2, f"Invalid value for '{option}'", "range")


def test_tail_last_zero_still_means_no_backlog(config: Path) -> None:
    result = run(["audit", "tail", "--no-follow", "--last", "0"], config)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    result = run(["audit", "tail", "--no-follow", "--last", "3", "--json"], config)
    assert [json.loads(line)["statement"] for line in result.stdout.splitlines()] == [
        "SELECT 3",
        "SELECT 4",
        "SELECT 5",
    ]


# -- "more match" --------------------------------------------------------------------------


def test_search_says_when_its_limit_cut_the_list(config: Path) -> None:
    cut = run(["audit", "search", "--limit", "3"], config)
    assert cut.exit_code == 0, cut.output
    assert "(3 records; more match: use --limit)" in cut.stdout
    assert "SELECT 5" in cut.stdout and "SELECT 2" not in cut.stdout  # the newest ones
    whole = run(["audit", "search", "--limit", "8"], config)
    assert "(8 records)" in whole.stdout and "more match" not in whole.output
    default = run(["audit", "search"], config)  # 8 records, default limit 100
    assert "(8 records)" in default.stdout and "more match" not in default.output


def test_search_json_keeps_stdout_records_only_when_cut(config: Path) -> None:
    result = run(["audit", "search", "--limit", "2", "--json"], config)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [json.loads(line)["statement"] for line in lines] == ["SELECT 4", "SELECT 5"]
    assert "more records match" in result.stderr


def test_sessions_list_says_when_its_limit_cut_the_list(config: Path) -> None:
    cut = run(["sessions", "list", "--limit", "1"], config)
    assert cut.exit_code == 0, cut.output
    assert "(1 session; more match: use --limit)" in cut.stdout
    assert "s1" in cut.stdout and "s0 " not in cut.stdout  # newest first
    whole = run(["sessions", "list"], config)
    assert "(2 sessions)" in whole.stdout and "more match" not in whole.output


# -- verify --jsonl ------------------------------------------------------------------------


def test_verify_a_missing_jsonl_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    assert_clean_error(
        run(["audit", "verify", "--jsonl", str(missing)]), 2, "--jsonl", "does not exist"
    )


def test_verify_a_directory_as_jsonl(tmp_path: Path) -> None:
    assert_clean_error(
        run(["audit", "verify", "--jsonl", str(tmp_path)]), 2, "--jsonl", "is a directory"
    )


def test_verify_a_good_jsonl_file_still_works(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(r.to_json_line() + "\n" for r in records()))
    result = run(["audit", "verify", "--jsonl", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("OK: ")


# -- store URLs ----------------------------------------------------------------------------

UNREACHABLE = f"postgresql+psycopg://auditor:{SECRET}@127.0.0.1:1/audit"


@pytest.mark.parametrize("args", READERS, ids=lambda a: " ".join(a[:2]))
@pytest.mark.parametrize(
    ("url", "needles"),
    [
        (UNREACHABLE, ["postgresql+psycopg://auditor:***@127.0.0.1:1/audit", "port 1"]),
        ("notaurl", ["audit.url is not a database URL"]),
        (f"mysql://auditor:{SECRET}@127.0.0.1/audit", ["mysql://auditor:***@", "unsupported"]),
        (
            f"postgresql+psycopg2://auditor:{SECRET}@127.0.0.1:1/audit",
            ["driver is not installed"],
        ),
        (f"postgresql+nodriver://auditor:{SECRET}@127.0.0.1:1/audit", ["auditor:***@"]),
    ],
    ids=["unreachable", "not-a-url", "mysql", "missing-driver", "unknown-driver"],
)
def test_an_unusable_store_url_is_one_line_without_the_password(
    tmp_path: Path, args: list[str], url: str, needles: list[str]
) -> None:
    if "psycopg2" in url and importlib.util.find_spec("psycopg2") is not None:
        pytest.skip("psycopg2 is installed here")  # pragma: no cover - depends on the machine
    result = run(args, config_for(tmp_path, url))
    assert_clean_error(result, 2, "cannot read the audit store", *needles)
    assert len(stderr_lines(result)) == 1, result.stderr


@pytest.mark.parametrize("args", READERS[:2], ids=lambda a: " ".join(a[:2]))
def test_a_url_from_the_environment_is_checked_the_same(tmp_path: Path, args: list[str]) -> None:
    result = run(args, PGGUARD_AUDIT__URL="notaurl")
    assert_clean_error(result, 2, "audit.url is not a database URL")
    result = run(args, PGGUARD_AUDIT__URL=UNREACHABLE)
    assert_clean_error(result, 2, "cannot read the audit store", "auditor:***@")


@pytest.mark.parametrize("args", READERS, ids=lambda a: " ".join(a[:2]))
def test_a_missing_sqlite_file_is_an_error_and_is_not_created(
    tmp_path: Path, args: list[str]
) -> None:
    db = tmp_path / "missing.db"
    result = run(args, config_for(tmp_path, f"sqlite:///{db}"))
    assert_clean_error(result, 2, "cannot read the audit store", "no such file", str(db))
    assert not db.exists()
    assert not list(tmp_path.glob("missing.db*"))


def test_sqlite_errors_keep_their_one_line_messages(tmp_path: Path) -> None:
    no_dir = tmp_path / "nowhere" / "audit.db"
    result = run(["audit", "search"], config_for(tmp_path, f"sqlite:///{no_dir}"))
    assert_clean_error(result, 2, "cannot read the audit store", str(no_dir))
    empty_schema = tmp_path / "noschema.db"
    empty_schema.touch()
    result = run(["sessions", "list"], config_for(tmp_path, f"sqlite:///{empty_schema}"))
    assert_clean_error(result, 2, "no pgguard audit schema")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database file at all" * 100)
    result = run(["audit", "verify"], config_for(tmp_path, f"sqlite:///{garbage}"))
    assert_clean_error(result, 2, "cannot read the audit store", "not a database")
    result = run(["audit", "search"], config_for(tmp_path, f"sqlite:///{tmp_path}"))
    assert_clean_error(result, 2, "is a directory")


def test_no_audit_url_is_still_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "pgguard.yaml"
    path.write_text('{"audit": {"url": null}}')
    assert_clean_error(run(["audit", "search"], path), 2, "audit.url is not configured")


def test_the_default_store_is_not_created_by_a_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pgguard.yaml").write_text("{}")  # audit.url: the default SQLite file
    result = run(["sessions", "list"], tmp_path / "pgguard.yaml")
    assert_clean_error(result, 2, "no such file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgguard.yaml"]


@pytest.fixture
def failing_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The store opens, then every read fails as a lost PostgreSQL connection would."""
    from sqlalchemy.exc import OperationalError

    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise OperationalError(
            "SELECT …", {}, Exception("server closed the connection\nunexpectedly")
        )

    for name in ("search", "last", "max_position", "chain"):
        monkeypatch.setattr(SqlStore, name, fail)
    yield


@pytest.mark.parametrize("args", READERS, ids=lambda a: " ".join(a[:2]))
def test_a_store_failing_while_read_is_one_line(
    tmp_path: Path, args: list[str], failing_reads: None
) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    with SqlStore(url) as store:
        store.append(records())
    result = run(args, config_for(tmp_path, url))
    assert_clean_error(
        result, 2, "cannot read the audit store", "server closed the connection unexpectedly"
    )
    assert len(stderr_lines(result)) == 1, result.stderr


def test_a_driver_message_never_shows_the_password() -> None:
    from pgguard.cli import _one_line

    assert _one_line(f"auth failed\n\tfor {SECRET}!", SECRET) == "auth failed for ***!"


@pytest.mark.parametrize(
    "args",
    [["approvals", "list"], ["approvals", "windows"]],
)
def test_approval_commands_give_one_line_for_a_store_they_cannot_reach(
    args: list[str], tmp_path: Path
) -> None:
    config = tmp_path / "pgguard.yaml"
    config.write_text("audit:\n  url: postgresql+psycopg://pgguard:s3cret-pw@127.0.0.1:1/audit\n")
    result = CliRunner().invoke(main, [*args, "--config", str(config)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "s3cret-pw" not in result.output
    assert "cannot read the audit store" in result.output


# -- verify --anchor -------------------------------------------------------------------------


def test_verify_prints_anchors_that_catch_a_cut_off_tail_next_time(
    config: Path, tmp_path: Path
) -> None:
    first = run(["audit", "verify"], config)
    assert first.exit_code == 0, first.output
    [hint] = [line for line in first.output.splitlines() if "next time:" in line]
    anchor = hint.split("--anchor ", 1)[1].strip()
    assert anchor.startswith("inst-a=8:") and len(anchor.split(":", 1)[1]) == 64
    assert run(["audit", "verify", "--anchor", anchor], config).exit_code == 0
    # The newest record deleted: a shorter chain is still a valid chain, but not the one seen.
    import sqlite3

    db = sqlite3.connect(tmp_path / "audit.db")
    db.execute("delete from audit_records where seq = 8")
    db.commit()
    db.close()
    assert run(["audit", "verify"], config).exit_code == 0
    cut = run(["audit", "verify", "--anchor", anchor], config)
    assert cut.exit_code == 1 and "deleted" in cut.output, cut.output


@pytest.mark.parametrize("value", ["inst-a", "inst-a=8", "inst-a=x:" + "0" * 64, "inst-a=8:abc"])
def test_a_malformed_anchor_is_a_usage_error(config: Path, value: str) -> None:
    assert_clean_error(run(["audit", "verify", "--anchor", value], config), 2, "--anchor")
