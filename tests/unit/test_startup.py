"""Startup parameters a client may pass upstream, and the identity pgguard adds."""

from __future__ import annotations

import pytest

from pgguard.protocol.startup import (
    StartupRefused,
    build_upstream_startup,
    parse_options,
    split_options,
)


def build(params: list[tuple[str, str]], role: str | None = None) -> dict[str, str]:
    result = build_upstream_startup(
        params,
        upstream_user="pgguard",
        database="app",
        identity_settings={"pgguard.user": "alice", "pgguard.groups": "dev"},
        role=role,
    )
    return dict(result.params)


def test_split_options_honours_backslash_escapes() -> None:
    assert split_options(r"-c a=b\ c  -c d=e\\f") == ["-c", "a=b c", "-c", r"d=e\f"]
    assert split_options("   ") == []


def test_parse_options_forms() -> None:
    assert parse_options("-c search_path=x --statement-timeout=5 -cwork_mem=64kB") == [
        ("search_path", "x"),
        ("statement_timeout", "5"),
        ("work_mem", "64kB"),
    ]


@pytest.mark.parametrize("options", ["-d 5", "-c", "-c novalue", "-P"])
def test_parse_options_refuses_other_switches(options: str) -> None:
    with pytest.raises(StartupRefused):
        parse_options(options)


def test_identity_and_user_come_from_pgguard() -> None:
    params = build([("user", "alice"), ("database", "other"), ("application_name", "psql")])
    assert params["user"] == "pgguard"
    assert params["database"] == "app"
    assert params["application_name"] == "psql"
    assert params["pgguard.user"] == "alice"
    assert params["pgguard.groups"] == "dev"
    assert "role" not in params


def test_role_map_role_is_added() -> None:
    assert build([("user", "alice")], role="analyst")["role"] == "analyst"


@pytest.mark.parametrize(
    "params",
    [
        [("role", "postgres")],
        [("options", "-c role=postgres")],
        [("options", "-c session_authorization=postgres")],
        [("options", "--session-authorization=postgres")],
        [("pgguard.user", "mallory")],
        [("options", "-c pgguard.groups=dba")],
        [("options", "-c PGGUARD.USER=mallory")],
        [("replication", "database")],
    ],
)
def test_client_cannot_choose_identity_or_role(params: list[tuple[str, str]]) -> None:
    with pytest.raises(StartupRefused):
        build(params)


def test_prompt_id_from_options_is_taken_not_forwarded() -> None:
    result = build_upstream_startup(
        [("options", r"-c pgguard.prompt_id=p\ 42 -c search_path=s")],
        upstream_user="pgguard",
        database="app",
        identity_settings={},
        role=None,
    )
    assert result.prompt_id == "p 42"
    assert dict(result.params)["options"] == "-c search_path=s"


def test_option_values_are_re_escaped() -> None:
    params = build([("options", r"-c application_name=a\ b")])
    assert params["options"] == r"-c application_name=a\ b"
    assert parse_options(params["options"]) == [("application_name", "a b")]
