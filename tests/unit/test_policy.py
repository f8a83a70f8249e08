"""Unit tests for the policy model, loader and decision engine (SPEC §3, masks of §4). Pure."""

from __future__ import annotations

import contextlib
import fnmatch
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgguard.identity.model import Identity
from pgguard.policy.analysis import analyse, prepared_statement
from pgguard.policy.catalog import CatalogSnapshot
from pgguard.policy.engine import (
    NO_LIMITS,
    Decision,
    Limits,
    Principal,
    decide,
    decide_many,
    explain_text,
    limits_for,
    mask_for_column,
    masks_for,
)
from pgguard.policy.facts import RelationInfo, StatementClass, StatementFacts
from pgguard.policy.loader import (
    check_policy,
    check_policy_files,
    load_policy,
    parse_policy,
)
from pgguard.policy.model import (
    GlobSet,
    MaskRule,
    Policy,
    PolicyError,
    PolicyProblem,
    Rule,
    parse_duration,
    parse_mask_function,
)

ROOT = Path(__file__).resolve().parents[2]

SPEC_EXAMPLE = """
version: 1
rules:                      # deny wins over require_approval wins over allow
  - name: ai-read-only
    when: {groups: [ai-agents]}          # users:, groups:, databases:, agents:
    match: {classes: [write, ddl, role, function, admin]}
    action: deny                         # allow | deny | require_approval | audit_only
    message: AI agents have read-only access
  - name: no-unbounded-delete
    match: {commands: [DELETE, UPDATE], without_where: true}
    action: deny
  - name: orders-writes-need-approval
    when: {groups: [developers]}
    match: {classes: [write], tables: [public.orders]}
    action: require_approval
    approvers: [dba]
  - name: no-secrets
    match: {tables: ["vault.*"]}
    action: deny
masks:
  - column: public.customers.email      # schema.table.column, globs allowed
    function: partial_email
  - column: "public.*.ssn"
    function: keep_last(4)
  - column: public.customers.salary
    function: generalize(1000)
    exempt: {groups: [dba, hr]}
defaults: {action: allow}
limits:                                  # per identity group ceilings
  - when: {groups: [ai-agents]}
    max_rows: 1000                       # rows returned per statement, then error or truncation
    statement_timeout: 30s
"""


# --------------------------------------------------------------------------------------------
# Helpers


def ident(user: str = "alice", groups: Sequence[str] = (), agent: str | None = None) -> Identity:
    return Identity(
        user=user,
        email=None,
        groups=tuple(groups),
        agent=agent,
        prompt_id=None,
        jti=None,
        issued_at=0.0,
        expires_at=0.0,
        claims={},
    )


def facts(
    command: str = "SELECT",
    classes: Sequence[StatementClass] = ("read",),
    *,
    tables: Sequence[str] = (),
    functions: Sequence[str] = (),
    columns: Sequence[str] = (),
    without_where: bool = False,
    sql: str | None = None,
    notes: Sequence[str] = (),
    commands: Sequence[str] = (),
    settings: Sequence[str] = (),
) -> StatementFacts:
    return StatementFacts(
        sql=sql or f"{command.lower()} …",
        command=command,
        classes=frozenset(classes),
        tables=tuple(tables),
        columns=tuple(columns),
        functions=tuple(functions),
        without_where=without_where,
        commands=tuple(commands),
        settings=tuple(settings),
        notes=tuple(notes),
    )


def policy(text: str) -> Policy:
    return parse_policy(textwrap.dedent(text))


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(text: str, tmp_path: Path, name: str = "p.yaml") -> list[PolicyProblem]:
    write(tmp_path, name, text)
    result = check_policy_files([name], tmp_path)
    assert result.policy is None
    return list(result.errors)


def warnings_of(text: str) -> list[PolicyProblem]:
    return list(policy(text).warnings)


def find(problems: Sequence[PolicyProblem], location: str) -> PolicyProblem:
    hits = [p for p in problems if p.location == location]
    assert hits, f"no problem at {location!r} in {[str(p) for p in problems]}"
    return hits[0]


def rules_yaml(*rules: str, defaults: str = "allow") -> str:
    body = "\n".join(textwrap.indent(textwrap.dedent(r).strip(), "  ") for r in rules)
    return f"version: 1\ndefaults: {{action: {defaults}}}\nrules:\n{body}\n"


# --------------------------------------------------------------------------------------------
# Loading valid files


def test_spec_example_loads_without_warnings() -> None:
    p = policy(SPEC_EXAMPLE)
    assert p.warnings == ()
    assert [r.name for r in p.rules] == [
        "ai-read-only",
        "no-unbounded-delete",
        "orders-writes-need-approval",
        "no-secrets",
    ]
    assert p.rules[1].match.commands == ("DELETE", "UPDATE")
    assert p.rules[2].approvers == ("dba",)
    assert [str(m.function) for m in p.masks] == [
        "partial_email",
        "keep_last(4)",
        "generalize(1000)",
    ]
    assert p.masks[2].exempt.groups == ("dba", "hr")
    assert p.defaults.action == "allow"
    assert p.limits[0].max_rows == 1000
    assert p.limits[0].statement_timeout == 30.0


def test_demo_policy_loads_clean() -> None:
    result = check_policy_files(["policies/demo.yaml"], ROOT)
    assert result.ok, [str(e) for e in result.errors]
    assert result.warnings == ()
    assert result.policy is not None
    assert result.policy.warnings == ()


def test_demo_policy_decisions() -> None:
    p = load_policy(["policies/demo.yaml"], ROOT)
    agent = ident("cursor-agent", ["ai-agents"], agent="cursor")
    dba = ident("dana", ["dba"])
    dev = ident("dev", ["developers"])

    insert = facts("INSERT", ["write"], tables=["public.customers"])
    d = decide(p, agent, "demo", insert)
    assert (d.action, d.rule) == ("deny", "ai-read-only")
    assert d.error_text() == "pgguard: ai-read-only: AI agents have read-only access"
    assert decide(p, agent, "demo", facts(tables=["public.customers"])).allowed

    vault = facts(tables=["vault.api_keys"])
    assert decide(p, agent, "demo", vault).rule == "no-secrets"
    assert decide(p, dev, "demo", vault).action == "deny"
    assert decide(p, dba, "demo", vault).allowed

    update = facts("UPDATE", ["write"], tables=["public.orders"])
    d = decide(p, dev, "demo", update)
    assert (d.action, d.rule, d.approvers) == (
        "require_approval",
        "orders-writes-need-approval",
        ("dba",),
    )
    assert decide(p, dba, "demo", update).allowed

    unbounded = facts("DELETE", ["write"], tables=["public.orders"], without_where=True)
    assert decide(p, dba, "demo", unbounded).rule == "no-unbounded-delete"
    d = decide(p, dev, "demo", unbounded)
    assert d.action == "deny"
    assert d.matched == ("no-unbounded-delete", "orders-writes-need-approval")

    agent_masks = {m.column: str(m.function) for m in masks_for(p, agent)}
    assert agent_masks == {
        "public.customers.email": "partial_email",
        "*.*.ssn": "keep_last(4)",
        "public.customers.salary": "generalize(1000)",
        "vault.api_keys.secret": "redact",
    }
    assert masks_for(p, dba) == ()  # the DBA sees clear values

    assert limits_for(p, agent, "demo") == Limits(
        max_rows=1000, statement_timeout=30.0, read_only=True, on_max_rows="error"
    )
    assert limits_for(p, dba, "demo") == NO_LIMITS


def test_files_merge_in_path_order(tmp_path: Path) -> None:
    write(
        tmp_path,
        "policies/b.yaml",
        """
        version: 1
        rules:
          - {name: b-rule, action: deny, match: {classes: [admin]}}
        masks:
          - {column: public.t.b, function: redact}
        limits:
          - {when: {groups: [g]}, max_rows: 5}
        """,
    )
    write(
        tmp_path,
        "policies/a.yaml",
        """
        version: 1
        defaults: {action: deny}
        rules:
          - {name: a-rule, action: allow, match: {classes: [read]}}
        masks:
          - {column: public.t.a, function: nullify}
        limits:
          - {when: {groups: [g]}, statement_timeout: 5m}
        """,
    )
    write(tmp_path, "policies/notes.txt", "not a policy")
    p = load_policy(["policies/*.yaml"], tmp_path)
    assert [r.name for r in p.rules] == ["a-rule", "b-rule"]
    assert [m.column for m in p.masks] == ["public.t.a", "public.t.b"]
    assert [(lim.max_rows, lim.statement_timeout) for lim in p.limits] == [(None, 300.0), (5, None)]
    assert p.defaults.action == "deny"
    assert p.sources == ("policies/a.yaml", "policies/b.yaml")
    absolute = load_policy([str(tmp_path / "policies" / "*.yaml")])
    assert absolute.sources == (
        str(tmp_path / "policies" / "a.yaml"),
        str(tmp_path / "policies" / "b.yaml"),
    )


def test_patterns_dedupe_and_directories(tmp_path: Path) -> None:
    write(tmp_path, "pol/one.yaml", "version: 1\nrules: [{name: one, action: deny}]\n")
    write(tmp_path, "pol/two.yml", "version: 1\nrules: [{name: two, action: deny}]\n")
    p = load_policy(["pol", "pol/*.yaml", str(tmp_path / "pol" / "one.yaml")], tmp_path)
    assert [r.name for r in p.rules] == ["one", "two"]


def test_single_strings_are_lists_and_empty_sections_are_empty() -> None:
    p = policy(
        """
        version: 1
        rules:
          - name: r
            when: {groups: dba, users: "a*"}
            match: {classes: write, commands: "create   table", tables: public.t}
            action: require_approval
            approvers: dba
        masks:
        limits:
        """
    )
    rule = p.rules[0]
    assert rule.when.groups == ("dba",)
    assert rule.match.classes == ("write",)
    assert rule.match.commands == ("CREATE TABLE",)
    assert rule.approvers == ("dba",)
    assert p.masks == () and p.limits == ()


def test_no_files_matched_gives_allow_all_with_warning(tmp_path: Path) -> None:
    result = check_policy_files(["policies/*.yaml"], tmp_path)
    assert result.ok
    assert result.policy is not None
    assert result.policy.rules == ()
    assert result.policy.defaults.action == "allow"
    assert len(result.warnings) == 1
    assert "no policy file matches" in result.warnings[0].message
    assert result.warnings[0].severity == "warning"
    assert decide(result.policy, ident(), "db", facts("DROP TABLE", ["ddl"])).allowed


def test_missing_literal_file_is_an_error(tmp_path: Path) -> None:
    result = check_policy_files(["policies/demo.yaml"], tmp_path)
    assert not result.ok
    assert result.errors[0].message == "no such policy file"
    with pytest.raises(PolicyError):
        load_policy(["policies/demo.yaml"], tmp_path)


# --------------------------------------------------------------------------------------------
# Loading invalid files


def test_every_error_is_reported_at_once_with_file_rule_field_and_line(tmp_path: Path) -> None:
    text = """\
    version: 1
    rules:
      - name: good
        action: deny
      - name: Bad Name
        when: {groups: [ai-agents], teams: [x]}
        match: {classes: [write, bogus], without_where: maybe}
        action: deny
        approvers: [dba]
      - name: needs-approvers
        action: require_approval
      - name: no-action
    masks:
      - column: public.customers.email
        function: keep_last(4, 5)
    limits:
      - max_rows: 0
        statement_timeout: 30 parsecs
        on_max_rows: explode
    """
    problems = errors_of(text, tmp_path)
    assert all(p.file.endswith("p.yaml") and p.severity == "error" for p in problems)

    p = find(problems, "rules[1](Bad Name).name")
    assert p.line == 5 and "not a valid rule name" in p.message
    p = find(problems, "rules[1](Bad Name).when.teams")
    assert p.line == 6
    assert "unknown key 'teams'" in p.message and "users, groups, databases, agents" in p.message
    p = find(problems, "rules[1](Bad Name).match.classes[1]")
    assert p.line == 7 and "'bogus'" in p.message
    assert find(problems, "rules[1](Bad Name).match.without_where").line == 7
    p = find(problems, "rules[1](Bad Name).approvers")
    assert p.line == 9 and "only allowed with action require_approval" in p.message
    p = find(problems, "rules[2](needs-approvers).approvers")
    assert "required for action require_approval" in p.message
    assert find(problems, "rules[3](no-action).action").message == "required"
    p = find(problems, "masks[0](public.customers.email).function")
    assert p.line == 15 and "keep_last takes 1 argument, got 2" in p.message
    assert find(problems, "limits[0].max_rows").line == 17
    assert "duration" in find(problems, "limits[0].statement_timeout").message
    assert "'explode'" in find(problems, "limits[0].on_max_rows").message
    assert len(problems) == 11
    assert not any(p.location.startswith("rules[0]") for p in problems)


def test_check_result_report_and_json(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "version: 1\nrules: [{name: x, when: {users: []}, action: deny}]\n")
    result = check_policy_files(["*.yaml"], tmp_path)
    report = result.report()
    assert report.startswith("warning: a.yaml:2: rules[0](x).when.users: empty list")
    assert (
        "policy OK: 1 file, 1 rule(s), 0 mask(s), 0 limit(s), default allow, 1 warning(s)" in report
    )
    assert result.to_dict()["warnings"][0]["line"] == 2
    write(tmp_path, "b.yaml", "version: 2\n")
    result = check_policy_files(["*.yaml"], tmp_path)
    assert result.report().startswith("error: b.yaml:1: version: Input should be 1 (got 2)\n")
    assert "policy invalid: 1 error(s), 1 warning(s) in 2 files" in result.report()
    assert result.to_dict()["ok"] is False


def test_policy_error_lists_problems(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", "version: 1\nrules:\n  - {name: x, action: nope}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(["p.yaml"], tmp_path)
    err = info.value
    assert len(err.problems) == 1
    problem = err.problems[0]
    assert (problem.location, problem.line) == ("rules[0](x).action", 3)
    assert str(problem).endswith("p.yaml:3: rules[0](x).action: " + problem.message)
    assert "1 error in policy" in str(err)
    assert "rules[0](x).action" in str(err)


def test_yaml_syntax_error_has_a_line_number(tmp_path: Path) -> None:
    text = "version: 1\nrules:\n  - name: x\n    action: deny\n   match: {}\n"
    (problem,) = errors_of(text, tmp_path)
    assert problem.line == 5
    assert "YAML syntax error at line 5" in problem.message


def test_yaml_syntax_error_in_one_file_and_errors_in_another(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "version: 1\nrules: [\n")
    write(tmp_path, "b.yaml", "version: 3\n")
    result = check_policy_files(["*.yaml"], tmp_path)
    assert [Path(e.file).name for e in result.errors] == ["a.yaml", "b.yaml"]
    assert "YAML syntax error" in result.errors[0].message
    assert result.errors[0].line is not None
    assert result.errors[1].location == "version"


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    text = "version: 1\nrules:\n  - name: x\n    action: allow\n    action: deny\n"
    (problem,) = errors_of(text, tmp_path)
    assert problem.line == 5 and "duplicate key 'action'" in problem.message


@pytest.mark.parametrize(
    ("text", "location", "fragment"),
    [
        ("rules: []\n", "version", "required"),
        ("version: 2\n", "version", "Input should be 1"),
        ("version: '1'\n", "version", "Input should be 1"),
        ("- version: 1\n", "", "must be a mapping"),
        ("", "", "empty policy file"),
        ("version: 1\nextra: 1\n", "extra", "allowed: version, rules, masks, defaults, limits"),
        ("version: 1\ndefaults: {action: audit_only}\n", "defaults.action", "'allow' or 'deny'"),
        ("version: 1\nrules: {name: x}\n", "rules", "valid tuple"),
        (
            "version: 1\nrules: [{name: x, action: deny, match: {tables: []  , x: 1}}]\n",
            "rules[0](x).match.x",
            "unknown key",
        ),
        ("version: 1\nmasks: [{column: a.b.c}]\n", "masks[0](a.b.c).function", "required"),
        (
            "version: 1\nmasks: [{column: a.b.c, function: redact, exempt: {roles: [x]}}]\n",
            "masks[0](a.b.c).exempt.roles",
            "allowed: users, groups",
        ),
        ("version: 1\nlimits: [{max_rows: 1.5}]\n", "limits[0].max_rows", "valid integer"),
        (
            "version: 1\nlimits: [{max_rows: 10, read_only: 'yes'}]\n",
            "limits[0].read_only",
            "valid boolean",
        ),
        (
            "version: 1\nrules: [{name: x, action: deny, when: {groups: [1]}}]\n",
            "rules[0](x).when.groups[0]",
            "valid string",
        ),
        (
            "version: 1\nrules: [{name: x, action: deny, when: {groups: ['']}}]\n",
            "rules[0](x).when.groups[0]",
            "at least 1 character",
        ),
    ],
)
def test_invalid_documents(tmp_path: Path, text: str, location: str, fragment: str) -> None:
    problems = errors_of(text, tmp_path)
    assert fragment in find(problems, location).message


@pytest.mark.parametrize("name", ["Upper", "has space", "", "ünï", "a/b"])
def test_bad_rule_names(tmp_path: Path, name: str) -> None:
    problems = errors_of(f"version: 1\nrules: [{{name: '{name}', action: deny}}]\n", tmp_path)
    assert any(p.location.endswith(".name") for p in problems)


@pytest.mark.parametrize("name", ["a", "no-secrets", "team_x.rule-1", "0"])
def test_good_rule_names(name: str) -> None:
    assert policy(f"version: 1\nrules: [{{name: '{name}', action: deny}}]\n").rules[0].name == name


def test_duplicate_rule_names_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "version: 1\nrules:\n  - {name: same, action: deny}\n")
    write(
        tmp_path,
        "b.yaml",
        "version: 1\nrules:\n  - {name: other, action: deny}\n  - {name: same, action: allow}\n",
    )
    result = check_policy_files(["*.yaml"], tmp_path)
    (problem,) = result.errors
    assert Path(problem.file).name == "b.yaml"
    assert problem.location == "rules[1](same).name"
    assert problem.line == 4
    assert "duplicate rule name 'same'" in problem.message and "a.yaml:3" in problem.message


def test_defaults_may_be_set_by_one_file_only(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "version: 1\ndefaults: {action: deny}\n")
    write(tmp_path, "b.yaml", "version: 1\ndefaults: {action: deny}\n")
    (problem,) = check_policy_files(["*.yaml"], tmp_path).errors
    assert Path(problem.file).name == "b.yaml"
    assert problem.location == "defaults" and "a.yaml" in problem.message


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_bytes(b"version: 1\n\xff\xfe\n")
    (problem,) = check_policy_files(["p.yaml"], tmp_path).errors
    assert "not UTF-8" in problem.message


def test_policy_rejects_duplicate_names_when_built_in_code() -> None:
    rule = Rule(name="x", action="deny")
    with pytest.raises(ValueError, match="duplicate rule name"):
        Policy(rules=(rule, rule))


# --------------------------------------------------------------------------------------------
# Warnings


def test_warnings_for_rules_that_can_never_match() -> None:
    warnings = warnings_of(
        """
        version: 1
        rules:
          - {name: no-groups, when: {groups: []}, action: deny}
          - {name: no-classes, match: {classes: []}, action: deny}
          - {name: typo, match: {commands: [DELET]}, action: deny}
          - name: wrong-class
            match: {classes: [write], commands: [COMMIT]}
            action: deny
          - name: where-vacuum
            match: {commands: [VACUUM, COMMIT], without_where: true}
            action: deny
          - name: deep
            match: {tables: [db.public.orders]}
            action: deny
          - name: alias-ok
            match: {commands: [truncate], classes: [write]}
            action: deny
        """
    )
    by_location = {w.location: w for w in warnings}
    assert "can never match" in by_location["rules[0](no-groups).when.groups"].message
    assert "can never match" in by_location["rules[1](no-classes).match.classes"].message
    typo = by_location["rules[2](typo).match.commands[0]"]
    assert "not a PostgreSQL command tag (did you mean DELETE?)" in typo.message
    assert "never of class write" in by_location["rules[3](wrong-class).match.commands[0]"].message
    assert "UPDATE and DELETE" in by_location["rules[4](where-vacuum).match.without_where"].message
    assert "more than 2" in by_location["rules[5](deep).match.tables[0]"].message
    assert not any("alias-ok" in w.location for w in warnings)
    assert all(w.severity == "warning" and w.line is not None for w in warnings)


def test_nested_commands_count_for_never_match_warnings() -> None:
    """A command can run inside another statement (a DELETE in a CTE, under EXPLAIN ANALYZE, in
    CREATE TABLE AS, …), so it can come with its host's classes and ``without_where``."""
    warnings = warnings_of(
        rules_yaml(
            # WITH d AS (DELETE …) INSERT …: INSERT with an unbounded DELETE
            "- {name: a, match: {commands: [INSERT], without_where: true}, action: deny}",
            "- {name: b, match: {commands: [SELECT, EXPLAIN], without_where: true}, action: deny}",
            "- {name: c, match: {commands: [PREPARE, COPY], without_where: true}, action: deny}",
            "- {name: d, match: {commands: [TRUNCATE], without_where: true}, action: deny}",
            # CREATE TABLE x AS WITH d AS (DELETE …) SELECT …: a DELETE in a ddl statement
            "- {name: e, match: {commands: [DELETE], classes: [ddl]}, action: deny}",
            # CREATE SCHEMA s CREATE TABLE …
            "- {name: f, match: {commands: [CREATE TABLE], classes: [ddl]}, action: deny}",
            "- {name: g, match: {commands: [DROP OWNED], classes: [write]}, action: deny}",
            "- {name: h, match: {commands: [COMMIT], classes: [write]}, action: deny}",
        )
    )
    assert [w.location for w in warnings] == [
        "rules[7](h).match.commands[0]",
        "rules[7](h).match.commands",
    ]


def test_warning_for_rule_shadowed_by_a_stronger_rule() -> None:
    warnings = warnings_of(
        rules_yaml(
            """
            - name: no-writes
              when: {groups: [ai-*]}
              match: {classes: [write, ddl]}
              action: deny
            """,
            """
            - name: orders-approval
              when: {groups: [ai-agents]}
              match: {classes: [write], tables: [public.orders]}
              action: require_approval
              approvers: [dba]
            """,
            """
            - name: narrower-deny
              match: {classes: [write], tables: [public.orders]}
              action: deny
            """,
            """
            - name: dev-approval
              when: {groups: [developers]}
              match: {classes: [write]}
              action: require_approval
              approvers: [dba]
            """,
            """
            - name: audit
              when: {groups: [ai-agents]}
              match: {classes: [write]}
              action: audit_only
            """,
        )
    )
    shadowed = [w for w in warnings if "never decides" in w.message]
    assert [w.location for w in shadowed] == ["rules[1](orders-approval)"]
    assert "'no-writes'" in shadowed[0].message


def test_earlier_deny_shadows_a_later_narrower_deny() -> None:
    warnings = warnings_of(
        rules_yaml(
            "- {name: all-vault, match: {tables: ['vault.*']}, action: deny}",
            "- {name: keys, match: {tables: [vault.api_keys]}, action: deny}",
        )
    )
    assert [w.location for w in warnings] == ["rules[1](keys)"]
    warnings = warnings_of(
        rules_yaml(
            "- {name: keys, match: {tables: [vault.api_keys]}, action: deny}",
            "- {name: all-vault, match: {tables: ['vault.*']}, action: deny}",
        )
    )
    assert warnings == []


def test_mask_and_limit_warnings() -> None:
    warnings = warnings_of(
        """
        version: 1
        masks:
          - {column: public.customers.email, function: redact}
          - {column: customers.email, function: nullify}
          - {column: ssn, function: keep_last(4)}
          - {column: a.b.c.d, function: redact}
          - {column: public..x, function: redact}
        limits:
          - {when: {groups: [x]}}
          - {when: {groups: []}, max_rows: 3}
          - {statement_timeout: 5, on_max_rows: truncate}
        """
    )
    messages = {(w.location, w.message) for w in warnings}
    locations = [w.location for w in warnings]
    assert "masks[1](customers.email).column" in locations
    assert any("read as '*.customers.email'" in m for _, m in messages)
    assert any("read as '*.*.ssn'" in m for _, m in messages)
    assert any("more than 3" in m for loc, m in messages if loc.startswith("masks[3]"))
    assert any("empty name part" in m for loc, m in messages if loc.startswith("masks[4]"))
    assert "limits[0]" in locations and "limits[1].when.groups" in locations
    assert "limits[2].on_max_rows" in locations
    duplicate = policy(
        """
        version: 1
        masks:
          - {column: public.t.c, function: redact}
          - {column: public.t.c, function: nullify, exempt: {groups: [x]}}
        """
    ).warnings
    assert len(duplicate) == 1 and "another mask for the same column" in duplicate[0].message


def test_check_policy_on_a_policy_built_in_code() -> None:
    p = Policy(rules=(Rule.model_validate({"name": "x", "action": "deny", "when": {"users": []}}),))
    (warning,) = check_policy(p)
    assert warning.file == "<policy>" and warning.location == "rules[0](x).when.users"


def test_warnings_do_not_block_loading_and_survive_errors(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "version: 1\nrules: [{name: x, when: {users: []}, action: deny}]\n")
    write(tmp_path, "b.yaml", "version: 1\nrules: [{name: y, action: bogus}]\n")
    result = check_policy_files(["*.yaml"], tmp_path)
    assert len(result.errors) == 1 and len(result.warnings) == 1
    with pytest.raises(PolicyError) as info:
        load_policy(["*.yaml"], tmp_path)
    assert len(info.value.warnings) == 1


# --------------------------------------------------------------------------------------------
# Decisions


@pytest.mark.parametrize(
    ("actions", "expected_action", "expected_rule"),
    [
        (["allow", "require_approval", "deny"], "deny", "r2"),
        (["deny", "require_approval", "allow"], "deny", "r0"),
        (["allow", "require_approval"], "require_approval", "r1"),
        (["require_approval", "allow"], "require_approval", "r0"),
        (["allow", "allow"], "allow", "r0"),
        (["deny", "deny"], "deny", "r0"),
        (["audit_only"], "allow", "default"),
        (["audit_only", "allow"], "allow", "r1"),
        ([], "allow", "default"),
    ],
)
def test_precedence(actions: list[str], expected_action: str, expected_rule: str) -> None:
    rules = []
    for i, action in enumerate(actions):
        extra = ", approvers: [dba]" if action == "require_approval" else ""
        rules.append(f"- {{name: r{i}, action: {action}{extra}}}")
    p = policy(rules_yaml(*rules) if rules else "version: 1\n")
    d = decide(p, ident(), "db", facts())
    assert (d.action, d.rule) == (expected_action, expected_rule)
    assert d.matched == tuple(f"r{i}" for i in range(len(actions)))
    if expected_action == "require_approval":
        assert d.approvers == ("dba",)
    else:
        assert d.approvers == ()


def test_default_deny() -> None:
    p = policy(
        rules_yaml("- {name: reads, match: {classes: [read]}, action: allow}", defaults="deny")
    )
    assert decide(p, ident(), "db", facts()).rule == "reads"
    d = decide(p, ident(), "db", facts("INSERT", ["write"]))
    assert (d.action, d.rule) == ("deny", "default")
    assert d.error_text() == (
        "pgguard: default: no rule allows this statement and the policy default is deny"
    )


def test_audit_only_is_a_dry_run() -> None:
    p = policy(
        rules_yaml(
            "- {name: watch-writes, match: {classes: [write]}, action: audit_only}",
            "- {name: watch-orders, match: {tables: [orders]}, action: audit_only}",
            "- {name: no-ddl, match: {classes: [ddl]}, action: deny}",
        )
    )
    d = decide(p, ident(), "db", facts("INSERT", ["write"], tables=["public.orders"]))
    assert (d.action, d.rule, d.message) == ("allow", "default", "")
    assert d.audit_only_rules == ("watch-writes", "watch-orders")
    assert d.matched == ("watch-writes", "watch-orders")
    d = decide(p, ident(), "db", facts("CREATE TABLE AS", ["ddl", "write"]))
    assert (d.action, d.rule) == ("deny", "no-ddl")
    assert d.audit_only_rules == ("watch-writes",)
    assert d.matched == ("watch-writes", "no-ddl")
    p = policy(rules_yaml("- {name: watch, action: audit_only}", defaults="deny"))
    d = decide(p, ident(), "db", facts())
    assert (d.action, d.rule, d.audit_only_rules) == ("deny", "default", ("watch",))


@pytest.mark.parametrize(
    ("when", "identity", "database", "hit"),
    [
        ("{users: [alice]}", ident("alice"), "db", True),
        ("{users: [alice]}", ident("bob"), "db", False),
        ("{users: ['svc-*']}", ident("svc-etl"), "db", True),
        ("{users: ['svc-*']}", ident("svc"), "db", False),
        ("{groups: [a, b]}", ident(groups=["x", "b"]), "db", True),
        ("{groups: [a, b]}", ident(groups=["x"]), "db", False),
        ("{groups: [a]}", ident(groups=[]), "db", False),
        ("{groups: ['team-?']}", ident(groups=["team-1"]), "db", True),
        ("{databases: [prod*]}", ident(), "prod_eu", True),
        ("{databases: [prod*]}", ident(), "staging", False),
        ("{agents: [cursor]}", ident(agent="cursor"), "db", True),
        ("{agents: ['*']}", ident(agent=None), "db", False),
        ("{agents: ['*']}", ident(agent="claude"), "db", True),
        ("{users: [alice], groups: [dev]}", ident("alice", ["dev"]), "db", True),
        ("{users: [alice], groups: [dev]}", ident("alice", ["ops"]), "db", False),
        ("{users: [alice], databases: [x]}", ident("alice"), "y", False),
        ("{}", ident(), "db", True),
        ("{users: [Alice]}", ident("alice"), "db", False),
    ],
)
def test_when(when: str, identity: Identity, database: str, hit: bool) -> None:
    p = policy(rules_yaml(f"- {{name: r, when: {when}, action: deny}}"))
    assert (decide(p, identity, database, facts()).rule == "r") is hit


@pytest.mark.parametrize(
    ("match", "statement", "hit"),
    [
        ("{classes: [write]}", facts("INSERT", ["write"]), True),
        ("{classes: [write]}", facts("SELECT", ["read", "write"]), True),  # writing CTE
        ("{classes: [write, ddl]}", facts("SELECT", ["read"]), False),
        ("{commands: [delete]}", facts("DELETE", ["write"]), True),
        ("{commands: [DELETE]}", facts("delete", ["write"]), True),
        ("{commands: [CREATE TABLE]}", facts("CREATE TABLE", ["ddl"]), True),
        ("{commands: [CREATE TABLE]}", facts("CREATE TABLE AS", ["ddl"]), False),
        ("{commands: [TRUNCATE]}", facts("TRUNCATE TABLE", ["write"]), True),
        ("{commands: [TRUNCATE]}", facts("TRUNCATE", ["write"]), True),
        # any command the statement runs matches, the outer one or a nested one
        (
            "{commands: [DELETE]}",
            facts("SELECT", ["read", "write"], commands=["SELECT", "DELETE"]),
            True,
        ),
        (
            "{commands: [SELECT]}",
            facts("SELECT", ["read", "write"], commands=["SELECT", "DELETE"]),
            True,
        ),
        (
            "{commands: [INSERT]}",
            facts("SELECT", ["read", "write"], commands=["SELECT", "DELETE"]),
            False,
        ),
        (
            "{commands: [delete]}",
            facts("EXPLAIN", ["read", "write"], commands=["explain", "delete"]),
            True,
        ),
        (
            "{commands: [DELETE, UPDATE], without_where: true}",
            facts(
                "PREPARE", ["session", "write"], commands=["PREPARE", "DELETE"], without_where=True
            ),
            True,
        ),
        (
            "{commands: [DELETE, UPDATE], without_where: true}",
            facts("SELECT", ["read", "write"], commands=["SELECT", "DELETE"]),
            False,
        ),
        ("{commands: [UPDATE], without_where: true}", facts("UPDATE", ["write"]), False),
        (
            "{commands: [UPDATE], without_where: true}",
            facts("UPDATE", ["write"], without_where=True),
            True,
        ),
        ("{without_where: false}", facts("UPDATE", ["write"], without_where=True), False),
        ("{without_where: false}", facts("UPDATE", ["write"]), True),
        ("{tables: ['vault.*']}", facts(tables=["public.t", "vault.api_keys"]), True),
        ("{tables: ['vault.*']}", facts(tables=["vaults.x"]), False),
        ("{tables: ['vault.*']}", facts(tables=[]), False),
        ("{tables: [orders]}", facts(tables=["sales.orders"]), True),
        ("{tables: [orders]}", facts(tables=["sales.orders_old"]), False),
        ("{tables: [public.orders]}", facts(tables=["public.orders"]), True),
        ("{tables: [public.orders]}", facts(tables=["other.orders"]), False),
        ("{tables: ['public.ord*']}", facts(tables=["public.orders"]), True),
        ("{tables: ['pub*']}", facts(tables=["public.orders"]), False),  # no dot crossing
        ("{tables: ['*']}", facts(tables=["public.orders"]), True),
        ("{tables: ['public.[ot]*']}", facts(tables=["public.orders"]), True),
        ("{tables: ['public.[!o]*']}", facts(tables=["public.orders"]), False),
        ("{tables: ['vault.*']}", facts(tables=["api_keys"]), True),  # unknown schema
        ("{tables: [public.orders]}", facts(tables=["orders"]), True),  # unknown schema
        ("{tables: [public.orders]}", facts(tables=["Public.Orders"]), False),
        ("{functions: [pg_read_file]}", facts(functions=["pg_catalog.pg_read_file"]), True),
        ("{functions: ['dblink*']}", facts(functions=["public.dblink_exec"]), True),
        ("{functions: ['pg_catalog.*']}", facts(functions=["public.f"]), False),
        (
            "{classes: [write], tables: [public.orders]}",
            facts("INSERT", ["write"], tables=["public.customers"]),
            False,
        ),
        (
            "{classes: [write], tables: [public.orders], commands: [INSERT]}",
            facts("INSERT", ["write"], tables=["public.orders"]),
            True,
        ),
        ("{}", facts("VACUUM", ["admin"]), True),
    ],
)
def test_match(match: str, statement: StatementFacts, hit: bool) -> None:
    p = policy(rules_yaml(f"- {{name: r, match: {match}, action: deny}}"))
    assert (decide(p, ident(), "db", statement).rule == "r") is hit
    assert p.rules[0].match.matches(statement) is hit


def test_default_messages_are_derived_from_the_rule() -> None:
    p = policy(
        rules_yaml(
            "- {name: a, match: {commands: [DELETE, UPDATE], without_where: true}, action: deny}",
            "- {name: b, match: {tables: ['vault.*']}, action: deny}",
            "- {name: c, match: {classes: [write, ddl]}, action: deny}",
            "- {name: d, match: {classes: [write], tables: [public.orders]}, action: "
            "require_approval, approvers: [dba, sre]}",
            "- {name: e, action: deny}",
            "- {name: f, match: {functions: ['dblink*']}, action: deny}",
        )
    )
    assert [r.effective_message for r in p.rules] == [
        "DELETE or UPDATE without a WHERE clause is not allowed",
        "access to vault.* is not allowed",
        "a write or ddl statement is not allowed",
        "a write statement on public.orders needs approval from dba, sre",
        "this statement is not allowed",
        "access calling dblink* is not allowed",
    ]


def test_identity_like_objects() -> None:
    p = policy(rules_yaml("- {name: r, when: {groups: [dba]}, action: deny}"))

    class Custom:
        user = "x"
        groups = ["dba"]  # a list works too
        agent = None

    assert decide(p, Custom(), "db", facts()).rule == "r"
    assert decide(p, Principal("x", ("dba",)), "db", facts()).rule == "r"
    assert decide(p, Principal("x"), "db", facts()).rule == "default"


def test_model_copy_does_not_reuse_a_stale_compiled_form() -> None:
    p = policy(rules_yaml("- {name: r, when: {groups: [a]}, action: deny}"))
    assert decide(p, ident(groups=["a"]), "db", facts()).action == "deny"
    q = p.model_copy(update={"rules": (Rule(name="s", action="allow"),)})
    assert decide(q, ident(), "db", facts()).rule == "s"
    assert decide(p, ident(groups=["a"]), "db", facts()).rule == "r"
    when = p.rules[0].when
    assert when.matches("u", ["a"], None, "db")
    other = when.model_copy(update={"groups": ("b",)})
    assert other.matches("u", ["b"], None, "db")
    assert not other.matches("u", ["a"], None, "db")


# --------------------------------------------------------------------------------------------
# Multi-statement strings


MULTI = rules_yaml(
    "- {name: no-ddl, match: {classes: [ddl]}, action: deny}",
    "- {name: orders, match: {tables: [public.orders], classes: [write]}, "
    "action: require_approval, approvers: [dba, sre]}",
    "- {name: payments, match: {tables: [public.payments], classes: [write]}, "
    "action: require_approval, approvers: [finance, sre]}",
    "- {name: refunds, match: {tables: [public.refunds], classes: [write]}, "
    "action: require_approval, approvers: [finance]}",
    "- {name: watch, match: {classes: [read]}, action: audit_only}",
)


def test_decide_many_a_deny_denies_all() -> None:
    p = policy(MULTI)
    parts = [
        facts(tables=["public.t"]),
        facts("INSERT", ["write"], tables=["public.orders"]),
        facts("DROP TABLE", ["ddl"], tables=["public.t"]),
    ]
    d = decide_many(p, ident(), "db", parts)
    assert (d.action, d.rule) == ("deny", "no-ddl")
    assert d.matched == ("watch", "orders", "no-ddl")
    assert d.audit_only_rules == ("watch",)
    assert [s.action for s in d.statements] == ["allow", "require_approval", "deny"]


def test_decide_many_approvals() -> None:
    p = policy(MULTI)
    orders = facts("INSERT", ["write"], tables=["public.orders"])
    payments = facts("UPDATE", ["write"], tables=["public.payments"])
    refunds = facts("UPDATE", ["write"], tables=["public.refunds"])
    d = decide_many(p, ident(), "db", [facts(), orders, payments])
    assert (d.action, d.rule, d.approvers) == ("require_approval", "orders", ("sre",))
    d = decide_many(p, ident(), "db", [orders, refunds])
    assert (d.action, d.rule) == ("deny", "orders")
    assert "different groups (dba, sre; finance)" in d.message


def test_decide_many_single_and_empty() -> None:
    p = policy(MULTI)
    one = facts("DROP TABLE", ["ddl"])
    assert decide_many(p, ident(), "db", [one]) == decide(p, ident(), "db", one)
    empty = decide_many(p, ident(), "db", [])
    assert (empty.action, empty.rule) == ("allow", "default")
    d = decide_many(p, ident(), "db", [facts(), facts()])
    assert (d.action, d.matched, len(d.statements)) == ("allow", ("watch",), 2)


# --------------------------------------------------------------------------------------------
# Limits


def test_limits_combine_strictest() -> None:
    p = policy(
        """
        version: 1
        limits:
          - {when: {groups: [ai-agents]}, max_rows: 1000, statement_timeout: 30s}
          - {when: {groups: [contractors]}, max_rows: 100, on_max_rows: truncate, read_only: true}
          - {when: {databases: [prod]}, statement_timeout: 500ms}
          - {when: {users: [bob]}, max_rows: 100, on_max_rows: error}
          - {when: {users: [carol]}, max_rows: 100, on_max_rows: truncate}
        """
    )
    assert limits_for(p, ident(groups=["ai-agents"]), "dev") == Limits(1000, 30.0, False, "error")
    both = limits_for(p, ident(groups=["ai-agents", "contractors"]), "prod")
    assert both == Limits(
        max_rows=100, statement_timeout=0.5, read_only=True, on_max_rows="truncate"
    )
    assert both.statement_timeout_ms == 500
    bob = limits_for(p, ident("bob", ["contractors"]), "dev")
    assert (bob.max_rows, bob.on_max_rows) == (100, "error")
    carol = limits_for(p, ident("carol", ["contractors"]), "dev")
    assert (carol.max_rows, carol.on_max_rows) == (100, "truncate")
    nobody = limits_for(p, ident("dave"), "dev")
    assert nobody == NO_LIMITS and nobody.unlimited and nobody.statement_timeout_ms is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("2 min", 120.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        (" 10 S ", 10.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [0, -1, "0s", "", "soon", "5 parsecs", "5m garbage", True, [1]])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


# --------------------------------------------------------------------------------------------
# Masks


@pytest.mark.parametrize(
    ("spec", "name", "args"),
    [
        ("nullify", "nullify", ()),
        ("nullify()", "nullify", ()),
        ("redact", "redact", ()),
        ("partial_email", "partial_email", ()),
        ("keep_last(4)", "keep_last", (4,)),
        (" keep_last ( 4 ) ", "keep_last", (4,)),
        ("generalize(1000)", "generalize", (1000,)),
        ("generalize(0.5)", "generalize", (0.5,)),
        ("generalize(month)", "generalize", ("month",)),
        ("generalize('YEAR')", "generalize", ("year",)),
        ("partial(2, '*', 2)", "partial", (2, "*", 2)),
        ('partial(0, "x", 0)', "partial", (0, "x", 0)),
        ("regex_redact('\\d', '#')", "regex_redact", ("\\d", "#")),
        ("regex_redact('it''s', \"\")", "regex_redact", ("it's", "")),
        ("json_mask(['$.a', '$.b.c'])", "json_mask", (("$.a", "$.b.c"),)),
        ("json_mask('$.items[*].id')", "json_mask", (("$.items[*].id",),)),
        ("json_mask([\"$['odd key']\", '$[0]'])", "json_mask", (("$['odd key']", "$[0]"),)),
        ("constant('x')", "constant", ("x",)),
        ("constant(0)", "constant", (0,)),
        ("constant(-1.5)", "constant", (-1.5,)),
        ("hash(8)", "hash", (8,)),
        ("pseudo(name)", "pseudo", ("name",)),
        ("pseudo('email')", "pseudo", ("email",)),
        ("noise(0.1)", "noise", (0.1,)),
        ("noise(1)", "noise", (1.0,)),
    ],
)
def test_mask_functions_parse(spec: str, name: str, args: tuple[object, ...]) -> None:
    function = parse_mask_function(spec)
    assert (function.name, function.args) == (name, args)
    assert str(function) == spec.strip()


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("keep_last(4, 5)", "keep_last takes 1 argument, got 2"),
        ("keep_last", "keep_last takes 1 argument, got 0"),
        ("keep_last('4')", "integer"),
        ("keep_last(-1)", "integer >= 0"),
        ("keep_last(1.5)", "integer"),
        ("nullify(1)", "takes no arguments"),
        ("partial(2, 3, 2)", "pad must be a quoted string"),
        ("partial(2, '*')", "takes 3 arguments"),
        ("frobnicate(1)", "unknown mask function 'frobnicate'"),
        ("keep_lst(4)", "did you mean keep_last?"),
        ("regex_redact('[', '#')", "invalid regular expression"),
        ("regex_redact('(a', '#')", "invalid regular expression"),
        ("regex_redact('a')", "takes 2 arguments"),
        ("json_mask(['$.a', 'b'])", "'b' is not a JSON path"),
        ("json_mask(['a.b'])", "not a JSON path"),
        ("json_mask(['$'])", "not a JSON path"),
        ("json_mask([])", "at least one JSON path"),
        ("json_mask([1])", "not a JSON path"),
        ("hash(0)", "from 1 to 64"),
        ("hash(65)", "from 1 to 64"),
        ("pseudo(ssn)", "pseudo: kind must be one of"),
        ("generalize(0)", "step must be > 0"),
        ("generalize(fortnight)", "expected a number > 0 or a unit"),
        ("noise(0)", "0 < ratio <= 1"),
        ("noise(1.5)", "0 < ratio <= 1"),
        ("noise('x')", "0 < ratio <= 1"),
        ("constant(['a'])", "not a list"),
        ("keep_last(4", "expected ',' or ')'"),
        ("keep_last(4))", "unexpected ')'"),
        ("keep_last 4", "unexpected 4"),
        ("regex_redact('abc)", "unterminated string"),
        ("keep_last(4; 5)", "unexpected character ';'"),
        ("", "must not be empty"),
        ("(4)", "expected a function name"),
        ("__import__('os')", "unknown mask function"),
    ],
)
def test_bad_mask_functions(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_mask_function(spec)
    assert fragment in str(info.value)


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_mask_parser_only_raises_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_mask_function(text)


def test_mask_function_params_and_types() -> None:
    assert parse_mask_function("partial(2, '*', 3)").params == {
        "prefix": 2,
        "pad": "*",
        "suffix": 3,
    }
    assert parse_mask_function("regex_redact('a', 'b')").params == {
        "pattern": "a",
        "replacement": "b",
    }
    assert parse_mask_function("generalize(10)").type_categories == frozenset({"number"})
    assert parse_mask_function("generalize(month)").type_categories == frozenset({"date"})
    assert parse_mask_function("json_mask('$.a')").type_categories == frozenset({"json"})
    assert parse_mask_function("redact").type_categories == frozenset({"any"})
    assert parse_mask_function("partial_email").type_categories == frozenset({"text"})


def test_mask_rule_dumps_its_function_as_text() -> None:
    p = policy(SPEC_EXAMPLE)
    dumped = p.masks[1].model_dump()
    assert dumped["function"] == "keep_last(4)"
    assert MaskRule.model_validate(dumped) == p.masks[1]


def test_masks_exemption_and_column_matching() -> None:
    p = policy(
        """
        version: 1
        masks:
          - {column: public.customers.email, function: partial_email}
          - column: "public.*.ssn"
            function: keep_last(4)
            exempt: {users: ["auditor-*"]}
          - column: public.customers.salary
            function: generalize(1000)
            exempt: {groups: [dba, hr]}
          - {column: "*.*.salary", function: nullify}
        """
    )
    everyone = masks_for(p, ident("bob", ["dev"]))
    assert len(everyone) == 4
    hr = masks_for(p, ident("hana", ["hr"]))
    assert [str(m.function) for m in hr] == ["partial_email", "keep_last(4)", "nullify"]
    auditor = masks_for(p, ident("auditor-1", ["dev"]))
    assert [str(m.function) for m in auditor] == ["partial_email", "generalize(1000)", "nullify"]

    email = p.masks[0]
    assert email.column_matches("public", "customers", "email")
    assert not email.column_matches("public", "customers", "name")
    assert not email.column_matches("other", "customers", "email")
    ssn = p.masks[1]
    assert ssn.column_matches("public", "employees", "ssn")
    assert not ssn.column_matches("hr", "employees", "ssn")

    def function_for(masks: Sequence[MaskRule], column: str) -> str | None:
        mask = mask_for_column(masks, *column.split("."))
        return None if mask is None else str(mask.function)

    assert function_for(everyone, "public.customers.salary") == "generalize(1000)"
    assert function_for(hr, "public.customers.salary") == "nullify"
    assert function_for(everyone, "public.customers.city") is None


def test_mask_errors_through_the_loader(tmp_path: Path) -> None:
    problems = errors_of(
        """\
        version: 1
        masks:
          - {column: a.b.c, function: "keep_last(4, 5)"}
          - {column: a.b.d, function: "frobnicate"}
          - {column: a.b.e, function: "regex_redact('[', '#')"}
          - {column: a.b.f, function: "json_mask(['nope'])"}
          - {column: a.b.g, function: 42}
          - {column: a.b.h, function: {name: redact}}
        """,
        tmp_path,
    )
    assert [(p.location, p.line) for p in problems] == [
        ("masks[0](a.b.c).function", 3),
        ("masks[1](a.b.d).function", 4),
        ("masks[2](a.b.e).function", 5),
        ("masks[3](a.b.f).function", 6),
        ("masks[4](a.b.g).function", 7),
        ("masks[5](a.b.h).function", 8),
    ]
    assert "must be a string" in problems[4].message


# --------------------------------------------------------------------------------------------
# Globs


@given(
    pattern=st.text(alphabet="ab*?-", min_size=1, max_size=6),
    value=st.text(alphabet="ab-", max_size=6),
)
@settings(max_examples=500, deadline=None)
def test_name_globs_agree_with_fnmatch(pattern: str, value: str) -> None:
    assert GlobSet([pattern]).match(value) == fnmatch.fnmatchcase(value, pattern)


@given(
    schema=st.text(alphabet="ab*?", min_size=1, max_size=4),
    name=st.text(alphabet="ab*?", min_size=1, max_size=4),
    value_schema=st.text(alphabet="ab", min_size=1, max_size=4),
    value_name=st.text(alphabet="ab", min_size=1, max_size=4),
)
@settings(max_examples=500, deadline=None)
def test_relation_globs_match_part_by_part(
    schema: str, name: str, value_schema: str, value_name: str
) -> None:
    expected = fnmatch.fnmatchcase(value_schema, schema) and fnmatch.fnmatchcase(value_name, name)
    globs = GlobSet([f"{schema}.{name}"], "relation")
    assert globs.match(f"{value_schema}.{value_name}") == expected


def test_glob_covers() -> None:
    globs = GlobSet(["vault.*", "public.orders"], "relation")
    assert globs.covers("vault.api_keys")
    assert globs.covers("public.orders")
    assert globs.covers("vault.*")
    assert not globs.covers("public.*")
    assert not globs.covers("orders")  # any schema: wider than public.orders
    assert GlobSet(["orders"], "relation").covers("public.orders")
    assert GlobSet(["*"], "relation").covers("x*.y*")


# --------------------------------------------------------------------------------------------
# Explain


def test_explain_text_single_statement() -> None:
    p = policy(SPEC_EXAMPLE)
    statement = facts(
        "DELETE",
        ["write", "read"],
        tables=["public.orders"],
        columns=["public.orders.id"],
        functions=["pg_catalog.now"],
        without_where=True,
        sql="DELETE   FROM orders\n",
        notes=["assumed write: volatile function"],
    )
    d = decide(p, ident("dev", ["developers"]), "demo", statement)
    text = explain_text(
        d,
        [statement],
        [("public.customers.email", "partial_email"), ("public.customers.ssn", "keep_last(4)")],
        limits=Limits(max_rows=1000, statement_timeout=30.0),
    )
    assert "decision: deny\n" in text
    assert "rule: no-unbounded-delete\n" in text
    assert "message: pgguard: no-unbounded-delete: DELETE or UPDATE without a WHERE clause" in text
    assert "matched rules: no-unbounded-delete, orders-writes-need-approval\n" in text
    assert "statement 1: DELETE FROM orders\n" in text
    assert "  class: write (all: write, read)\n" in text
    assert "  command: DELETE\n" in text
    assert "  tables: public.orders\n" in text
    assert "  columns: public.orders.id\n" in text
    assert "  functions: pg_catalog.now\n" in text
    assert "  without WHERE: yes\n" in text
    assert "  note: assumed write: volatile function\n" in text
    assert "masked columns:\n  public.customers.email  partial_email\n" in text
    assert "  public.customers.ssn    keep_last(4)\n" in text
    assert "limits: max_rows 1000 (error), statement_timeout 30s\n" in text


def test_explain_text_multi_statement_and_audit() -> None:
    p = policy(MULTI)
    parts = [facts(tables=["public.t"], sql="select 1"), facts("VACUUM", ["admin"], sql="vacuum")]
    d = decide_many(p, ident(), "db", parts)
    text = explain_text(d, parts, [])
    assert text.startswith("decision: allow\nrule: default\n")
    assert "message:" not in text
    assert "matched rules: watch\n" in text
    assert "audit-only rules (dry run, not enforced): watch\n" in text
    assert "statement 1: select 1\n  decision: allow by default (watch)\n" in text
    assert "statement 2: vacuum\n  decision: allow by default\n  class: admin\n" in text
    assert "  tables: -\n" in text
    assert "masked columns: none\n" in text
    assert "limits:" not in text


def test_explain_text_nested_commands_and_settings() -> None:
    p = policy(SPEC_EXAMPLE)
    statement = facts(
        "EXPLAIN",
        ["read", "write", "session"],
        commands=["EXPLAIN", "SELECT", "DELETE"],
        settings=["work_mem"],
        without_where=True,
    )
    text = explain_text(decide(p, ident(), "demo", statement), [statement])
    assert "rule: no-unbounded-delete\n" in text
    assert "  command: EXPLAIN\n  also runs: SELECT, DELETE\n" in text
    assert "  changes settings: work_mem\n" in text
    plain = explain_text(decide(p, ident(), "demo", facts()), [facts()])
    assert "also runs" not in plain
    assert "changes settings" not in plain


def test_explain_text_approval() -> None:
    p = policy(SPEC_EXAMPLE)
    statement = facts("UPDATE", ["write"], tables=["public.orders"])
    d = decide(p, ident(groups=["developers"]), "demo", statement)
    text = explain_text(d, [statement])
    assert "decision: require_approval\n" in text
    assert "approvers: dba\n" in text


# --------------------------------------------------------------------------------------------
# Speed


def test_decide_is_fast() -> None:
    rules = [
        f"- {{name: r{i}, when: {{groups: [g{i}, 'team-*']}}, "
        f"match: {{classes: [write], tables: ['s{i}.*', public.t{i}]}}, action: deny}}"
        for i in range(16)
    ]
    p = policy(rules_yaml(*rules, *MULTI.split("rules:\n")[1].splitlines()[:4]))
    assert len(p.rules) == 20
    who = ident("alice", ["developers", "team-x"], agent="cursor")
    statements = [
        facts(tables=["public.orders", "public.customers"]),
        facts("UPDATE", ["write"], tables=["public.orders"]),
    ]
    for statement in statements:
        decide(p, who, "demo", statement)
        n = 2000
        start = time.perf_counter()
        for _ in range(n):
            decide(p, who, "demo", statement)
        per_call = (time.perf_counter() - start) / n
        assert per_call < 100e-6, f"decide() took {per_call * 1e6:.1f} µs"


def test_decision_is_frozen() -> None:
    d = Decision(action="allow", rule="default")
    with pytest.raises(AttributeError):
        d.action = "deny"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Nested statements, end to end (analyser + engine)

_ORDERS_CATALOG = CatalogSnapshot(
    [RelationInfo(20002, "public", "orders", "r", ("id", "customer_id", "total", "status"))], []
)
_PATH = ("pg_catalog", "public")


def _verdict(sql: str, prepared: dict[str, StatementFacts] | None = None) -> Decision:
    p = policy(SPEC_EXAMPLE)
    statements = analyse(sql, _ORDERS_CATALOG, _PATH, prepared=prepared)
    return decide_many(p, ident("bob"), "demo", statements)


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM orders",
        "UPDATE orders SET total = 0",
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
        "WITH u AS (UPDATE orders SET total = 0 RETURNING *) SELECT count(*) FROM u",
        "SELECT * FROM (WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d) s",
        "EXPLAIN ANALYZE DELETE FROM orders",
        "EXPLAIN (ANALYZE, BUFFERS) UPDATE orders SET status = 'x'",
        "PREPARE p AS DELETE FROM orders",
        "PREPARE p AS DELETE FROM orders WHERE true",
        "COPY (DELETE FROM orders RETURNING *) TO STDOUT",
        "COPY (WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d) TO STDOUT",
        "CREATE TABLE x AS WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
        "DECLARE c CURSOR FOR WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
    ],
)
def test_no_unbounded_delete_catches_nested_statements(sql: str) -> None:
    d = _verdict(sql)
    assert (d.action, d.rule) == ("deny", "no-unbounded-delete"), sql
    assert d.error_text() == (
        "pgguard: no-unbounded-delete: DELETE or UPDATE without a WHERE clause is not allowed"
    )


def test_no_unbounded_delete_catches_execute_of_a_known_prepared_statement() -> None:
    # PREPARE and EXECUTE sent separately: the relay keeps the inner facts
    found = prepared_statement("PREPARE p AS DELETE FROM orders", _ORDERS_CATALOG, _PATH)
    assert found is not None
    name, inner = found
    d = _verdict("EXECUTE p", prepared={name: inner})
    assert (d.action, d.rule) == ("deny", "no-unbounded-delete")
    d = _verdict("EXPLAIN ANALYZE EXECUTE p", prepared={name: inner})
    assert (d.action, d.rule) == ("deny", "no-unbounded-delete")
    # and in one string
    d = _verdict("PREPARE q AS UPDATE orders SET total = 0; EXECUTE q")
    assert (d.action, d.rule) == ("deny", "no-unbounded-delete")


@pytest.mark.parametrize(
    "sql",
    [
        "WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT 1",
        "WITH u AS (UPDATE orders SET total = 0 WHERE id = $1 RETURNING *) SELECT * FROM u",
        "DELETE FROM orders WHERE id = 1",
        "EXPLAIN DELETE FROM orders",  # plain EXPLAIN does not run it
        "EXPLAIN (ANALYZE false) DELETE FROM orders",
        "EXPLAIN ANALYZE DELETE FROM orders WHERE id = 1",
        "PREPARE p AS DELETE FROM orders WHERE id = $1",
        "COPY (DELETE FROM orders WHERE status = 'x' RETURNING *) TO STDOUT",
        "CREATE TABLE x AS SELECT * FROM orders",
        "SELECT * FROM orders",
    ],
)
def test_no_unbounded_delete_allows_bounded_nested_statements(sql: str) -> None:
    d = _verdict(sql)
    assert d.allowed, (sql, d)
    assert "no-unbounded-delete" not in d.matched
