"""The session guard: identity guard + analysis + decision, and its caches."""

from __future__ import annotations

import time

import pytest

from pgguard.identity import Identity
from pgguard.policy.catalog import CatalogSnapshot
from pgguard.policy.facts import FunctionInfo, RelationInfo
from pgguard.policy.guard import GuardState, SessionGuard, policy_in_force
from pgguard.policy.loader import parse_policy

POLICY = """
version: 1
rules:
  - name: ai-read-only
    when: {groups: [ai-agents]}
    match: {classes: [write, ddl, role, function, admin]}
    action: deny
  - name: no-secrets
    match: {tables: ["vault.*"]}
    action: deny
limits:
  - when: {groups: [ai-agents]}
    read_only: true
    statement_timeout: 10s
"""

CATALOG = CatalogSnapshot(
    relations=[
        RelationInfo(1, "public", "accounts", "r", ("aid", "abalance")),
        RelationInfo(2, "vault", "accounts", "r", ("aid", "secret")),
    ],
    functions=[FunctionInfo(3, "pg_catalog", "count", "i", "a", builtin=True)],
)


def agent(groups: tuple[str, ...] = ("ai-agents",)) -> Identity:
    now = time.time()
    return Identity("bot", None, groups, "cursor", None, None, now, now + 600, {})


@pytest.fixture
def state() -> GuardState:
    st = GuardState(policy_in_force(parse_policy(POLICY)))
    st.set_catalog("app", CATALOG)
    return st


def guard(state: GuardState, path: tuple[str, ...] = ("pg_catalog", "public")) -> SessionGuard:
    return SessionGuard(state, agent(), "app", role_mapped=False, search_path=path)


def test_reads_pass_and_writes_are_refused(state: GuardState) -> None:
    g = guard(state)
    assert g("select abalance from accounts where aid = 1") is None
    refusal = g("delete from accounts where aid = 1")
    assert refusal is not None and refusal.rule == "ai-read-only"


def test_plain_reads_with_other_literals_reuse_the_judgement(state: GuardState) -> None:
    g = guard(state)
    first = g.judge("select abalance from accounts where aid = 1")
    again = g.judge("select abalance from accounts where aid = 987654")
    assert again is first
    # A different shape is judged on its own.
    assert g.judge("select abalance from accounts where aid = 1 limit 5") is not first


def test_literal_free_key_never_serves_a_refusal_or_a_string(state: GuardState) -> None:
    g = guard(state)
    assert g("select secret from vault.accounts where aid = 1") is not None
    assert g("select secret from vault.accounts where aid = 2") is not None
    assert g("select abalance from accounts where aid = '1'") is None  # strings: full path


def test_search_path_decides_what_a_name_means(state: GuardState) -> None:
    g = guard(state, ("pg_catalog", "vault", "public"))
    refusal = g("select count(*) from accounts")
    assert refusal is not None and refusal.rule == "no-secrets"
    public = guard(state)
    assert public("select count(*) from accounts") is None


def test_pending_search_path_change_is_judged_fail_closed(state: GuardState) -> None:
    g = guard(state)
    assert g("select count(*) from accounts") is None
    assert g("set search_path = vault, public") is None  # a session setting: allowed
    # Until the server confirms, both the old and the new path count.
    refusal = g("select count(*) from accounts")
    assert refusal is not None and refusal.rule == "no-secrets"
    g.search_path_confirmed("public")
    assert g("select count(*) from accounts") is None


def test_policy_change_invalidates_cached_judgements(state: GuardState) -> None:
    g = guard(state)
    assert g("select abalance from accounts where aid = 1") is None
    state.set_policy(
        parse_policy(
            "version: 1\nrules:\n  - name: no-accounts\n    match: {tables: [public.accounts]}\n"
            "    action: deny\n"
        )
    )
    refusal = g("select abalance from accounts where aid = 2")
    assert refusal is not None and refusal.rule == "no-accounts"


def test_limits_pin_settings_and_read_only(state: GuardState) -> None:
    g = guard(state)
    assert g.limits is not None and g.limits.read_only
    for sql in ("set statement_timeout = 0", "begin read write", "set transaction read write"):
        refusal = g(sql)
        assert refusal is not None and refusal.rule == "limits", sql
    assert g("reset statement_timeout") is None


def test_unparsable_sql_is_refused_with_the_parser_message(state: GuardState) -> None:
    refusal = guard(state)("selec 1 from")
    assert refusal is not None and refusal.sqlstate == "42601"


def test_no_policy_means_identity_guard_only() -> None:
    g = SessionGuard(GuardState(None), agent(), "app", role_mapped=False)
    assert g("delete from anything") is None
    assert g("set role postgres") is not None


WATCH_POLICY = """
version: 1
rules:
  - name: watch-accounts
    match: {tables: [public.accounts]}
    action: audit_only
  - name: no-secrets
    match: {tables: ["vault.*"]}
    action: deny
"""


def test_statement_kinds_for_the_metrics_come_from_the_judgement() -> None:
    st = GuardState(policy_in_force(parse_policy(WATCH_POLICY)))
    st.set_catalog("app", CATALOG)
    g = guard(st)
    sql = "select abalance from accounts where aid = 1"
    assert g(sql) is None
    assert g.statement_kinds(sql) == (("read", True),)
    # Every statement of a multi-statement string, each with its own audit_only rules.
    three = "select 1; delete from accounts; select secret from vault.accounts"
    assert g(three) is not None
    assert g.statement_kinds(three) == (("read", False), ("write", True), ("read", False))


def test_statement_kinds_without_a_policy_analyse_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    st = GuardState(None)
    g = SessionGuard(st, agent(), "app", role_mapped=False)
    monkeypatch.setattr(st, "analyse", lambda *args: pytest.fail("analysed"))
    assert g.statement_kinds("select 1") is None


def test_describe_reuses_the_answer_for_plain_reads_that_differ_in_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    st = GuardState(policy_in_force(parse_policy(WATCH_POLICY)))
    st.set_catalog("app", CATALOG)
    g = guard(st)
    facts, audit_only = g.describe("select abalance from accounts where aid = 1")
    assert facts is not None and facts.tables == ("public.accounts",)
    assert audit_only == ("watch-accounts",)
    monkeypatch.setattr(st, "analyse", lambda *args: pytest.fail("analysed again"))
    assert g.describe("select abalance from accounts where aid = 99") == (facts, audit_only)
    monkeypatch.undo()
    # A new search_path or catalog means a new answer.
    g.search_path_confirmed("vault")
    facts, _ = g.describe("select secret from accounts where aid = 1")
    assert facts is not None and facts.tables == ("vault.accounts",)
    st.set_catalog("app", CatalogSnapshot(relations=[], functions=[]))
    facts, _ = g.describe("select secret from accounts where aid = 2")
    assert facts is not None and "not in the catalog" in " ".join(facts.notes)
    # A write's answer may depend on its literals: never shared.
    calls: list[str] = []
    real = st.analyse
    monkeypatch.setattr(st, "analyse", lambda *a: calls.append(a[-1]) or real(*a))
    g.describe("delete from accounts where aid = 1")
    g.describe("delete from accounts where aid = 2")
    assert len(calls) == 2


def test_comments_nested_too_deep_are_refused_before_any_parser() -> None:
    g = SessionGuard(GuardState(None), agent(), "app", role_mapped=False)
    deep = "/*" * 35_000 + "*/" * 35_000 + " select 1"
    refusal = g(deep)
    assert refusal is not None and refusal.rule == "parser" and refusal.sqlstate == "54001"
    assert g.describe(deep) == (None, ())
    assert g("/*" * 50 + "*/" * 50 + " select 1") is None  # nesting is allowed
