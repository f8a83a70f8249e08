"""The guard-rule engine: (policy, identity, database, statement facts) → decision. Pure.

A rule's ``commands`` match when any tag in ``StatementFacts.commands`` does (the outer command
and every statement it runs: a DELETE in a CTE, under EXPLAIN ANALYZE, in a PREPARE, …).

Precedence (SPEC §3): deny wins over require_approval wins over allow. ``audit_only`` rules are
a dry run: they are reported in ``Decision.audit_only_rules`` (and ``matched``) and never change
the action. When no enforcing rule matches, ``defaults.action`` applies with rule ``default``.

Speed: patterns are compiled once per policy; the rules whose ``when`` matches an identity are
computed once per (user, groups, agent, database), and the decision for a given set of matching
rules is built once, so ``decide`` costs one pass over the rules that apply to the identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from pgguard.policy.facts import CLASS_DANGER, StatementFacts
from pgguard.policy.model import GlobSet, LimitRule, MaskRule, OnMaxRows, Policy, Rule

DEFAULT_RULE: Final = "default"
_CACHE_LIMIT: Final = 4096

Verdict = Literal["allow", "deny", "require_approval"]
SEVERITY: Final[dict[str, int]] = {"allow": 0, "require_approval": 1, "deny": 2}


class IdentityLike(Protocol):
    """What the engine needs of an identity (``pgguard.identity.model.Identity`` fits)."""

    @property
    def user(self) -> str: ...

    @property
    def groups(self) -> Sequence[str]: ...

    @property
    def agent(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Principal:
    """An identity without a token, for ``pgguard policy explain --as USER --groups G``."""

    user: str
    groups: tuple[str, ...] = ()
    agent: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one statement (or, from ``decide_many``, on a multi-statement string)."""

    action: Verdict
    rule: str  # the deciding rule, or "default"
    message: str = ""  # for refusals; the relay sends "pgguard: <rule>: <message>"
    approvers: tuple[str, ...] = ()  # groups that may approve (require_approval)
    matched: tuple[str, ...] = ()  # every matched rule, in policy order (audit_only included)
    audit_only_rules: tuple[str, ...] = ()  # matched audit_only rules: logged, not enforced
    statements: tuple[Decision, ...] = ()  # per-statement decisions (decide_many only)

    @property
    def allowed(self) -> bool:
        return self.action == "allow"

    @property
    def severity(self) -> int:
        return SEVERITY[self.action]

    def error_text(self) -> str:
        """The ErrorResponse message for a refusal: ``pgguard: <rule>: <message>``."""
        return f"pgguard: {self.rule}: {self.message}"


@dataclass(frozen=True, slots=True)
class Limits:
    """The ceilings in force for one identity on one database."""

    max_rows: int | None = None
    statement_timeout: float | None = None  # seconds
    read_only: bool = False
    on_max_rows: OnMaxRows = "error"

    @property
    def statement_timeout_ms(self) -> int | None:
        """For ``SET statement_timeout`` (milliseconds, rounded up, at least 1)."""
        if self.statement_timeout is None:
            return None
        return max(1, math.ceil(self.statement_timeout * 1000))

    @property
    def unlimited(self) -> bool:
        return self.max_rows is None and self.statement_timeout is None and not self.read_only


NO_LIMITS: Final = Limits()

# --------------------------------------------------------------------------------------------
# Compiled form


class _CompiledRule:
    __slots__ = (
        "action",
        "approvers",
        "classes",
        "commands",
        "functions",
        "index",
        "message",
        "name",
        "rule",
        "tables",
        "without_where",
    )

    def __init__(self, index: int, rule: Rule) -> None:
        self.index = index
        self.rule = rule
        self.name = rule.name
        self.action = rule.action
        self.message = rule.effective_message
        self.approvers = tuple(rule.approvers or ())
        classes, commands, tables, functions, without_where = rule.match.compiled
        self.classes: frozenset[str] | None = classes
        self.commands: frozenset[str] | None = commands
        self.tables: GlobSet | None = tables
        self.functions: GlobSet | None = functions
        self.without_where: bool | None = without_where


_Key = tuple[str, tuple[str, ...], str | None, str]


class _Compiled:
    def __init__(self, policy: Policy) -> None:
        self.owner_id = id(policy)
        self.policy = policy
        self.rules = tuple(_CompiledRule(i, r) for i, r in enumerate(policy.rules))
        default_action: Verdict = policy.defaults.action
        self.default = Decision(
            action=default_action,
            rule=DEFAULT_RULE,
            message=""
            if default_action == "allow"
            else "no rule allows this statement and the policy default is deny",
        )
        self.when_cache: dict[_Key, tuple[_CompiledRule, ...]] = {}
        self.decision_cache: dict[tuple[int, ...], Decision] = {}
        self.limits_cache: dict[_Key, Limits] = {}
        self.masks_cache: dict[tuple[str, tuple[str, ...]], tuple[MaskRule, ...]] = {}

    def rules_for(self, key: _Key) -> tuple[_CompiledRule, ...]:
        user, groups, agent, database = key
        found = tuple(r for r in self.rules if r.rule.when.matches(user, groups, agent, database))
        if len(self.when_cache) >= _CACHE_LIMIT:
            self.when_cache.clear()
        self.when_cache[key] = found
        return found

    def decision_for(self, hits: tuple[int, ...]) -> Decision:
        rules = [self.rules[i] for i in hits]
        audit = tuple(r.name for r in rules if r.action == "audit_only")
        deciding: _CompiledRule | None = None
        for action in ("deny", "require_approval", "allow"):
            deciding = next((r for r in rules if r.action == action), None)
            if deciding is not None:
                break
        matched = tuple(r.name for r in rules)
        if deciding is None:  # only audit_only rules matched
            base = self.default
            decision = Decision(
                action=base.action,
                rule=base.rule,
                message=base.message,
                matched=matched,
                audit_only_rules=audit,
            )
        else:
            verdict: Verdict = deciding.action  # type: ignore[assignment]
            decision = Decision(
                action=verdict,
                rule=deciding.name,
                message="" if verdict == "allow" else deciding.message,
                approvers=deciding.approvers if verdict == "require_approval" else (),
                matched=matched,
                audit_only_rules=audit,
            )
        if len(self.decision_cache) >= _CACHE_LIMIT:
            self.decision_cache.clear()
        self.decision_cache[hits] = decision
        return decision


def compile_policy(policy: Policy) -> None:
    """Compile ``policy`` now rather than on its first use (the loader calls this)."""
    _compiled(policy)


def _compiled(policy: Policy) -> _Compiled:
    runtime = policy.runtime
    compiled: _Compiled | None = runtime.get("engine")
    if compiled is None or compiled.owner_id != id(policy):
        compiled = _Compiled(policy)
        # A model_copy() shares the runtime dict with its original: give this one its own.
        policy.__dict__["runtime"] = {"engine": compiled}
    return compiled


def _key(identity: IdentityLike, database: str) -> _Key:
    return (identity.user, tuple(identity.groups), identity.agent, database)


# --------------------------------------------------------------------------------------------
# Decisions


def decide(
    policy: Policy, identity: IdentityLike, database: str, facts: StatementFacts
) -> Decision:
    """The decision on one statement."""
    compiled = _compiled(policy)
    key = (identity.user, tuple(identity.groups), identity.agent, database)
    rules = compiled.when_cache.get(key)
    if rules is None:
        rules = compiled.rules_for(key)
    if not rules:
        return compiled.default
    classes = facts.classes
    commands: tuple[str, ...] | None = None
    hits: list[int] = []
    for r in rules:
        if r.classes is not None and r.classes.isdisjoint(classes):
            continue
        if r.commands is not None:
            if commands is None:
                commands = tuple(c.upper() for c in facts.all_commands)
            if r.commands.isdisjoint(commands):
                continue
        if r.without_where is not None and facts.without_where != r.without_where:
            continue
        if r.tables is not None and not r.tables.match_any(facts.tables):
            continue
        if r.functions is not None and not r.functions.match_any(facts.functions):
            continue
        hits.append(r.index)
    if not hits:
        return compiled.default
    found = tuple(hits)
    decision = compiled.decision_cache.get(found)
    return decision if decision is not None else compiled.decision_for(found)


def _unique(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def decide_many(
    policy: Policy,
    identity: IdentityLike,
    database: str,
    facts_list: Sequence[StatementFacts],
) -> Decision:
    """The decision on a multi-statement string: the most severe statement decision wins (a
    deny of any statement denies the whole string). ``statements`` holds each statement's
    decision. When statements need approval from different groups and no group may approve
    all of them, the string is denied (send the statements one at a time).

    An empty list (an empty query string) is allowed: there is nothing to run."""
    if not facts_list:
        return Decision(action="allow", rule=DEFAULT_RULE)
    parts = tuple(decide(policy, identity, database, f) for f in facts_list)
    if len(parts) == 1:
        return parts[0]
    worst = max(parts, key=lambda d: d.severity)  # first of the most severe
    matched = _unique([n for d in parts for n in d.matched])
    audit = _unique([n for d in parts for n in d.audit_only_rules])
    action, rule, message, approvers = worst.action, worst.rule, worst.message, worst.approvers
    if action == "require_approval":
        holds = [d for d in parts if d.action == "require_approval"]
        common = set(holds[0].approvers)
        for d in holds[1:]:
            common &= set(d.approvers)
        if common:
            approvers = tuple(g for g in holds[0].approvers if g in common)
        else:
            groups = "; ".join(dict.fromkeys(", ".join(d.approvers) for d in holds))
            action = "deny"
            message = (
                f"the statements need approval from different groups ({groups}); "
                "send them one at a time"
            )
            approvers = ()
    return Decision(
        action=action,
        rule=rule,
        message=message,
        approvers=approvers,
        matched=matched,
        audit_only_rules=audit,
        statements=parts,
    )


# --------------------------------------------------------------------------------------------
# Limits and masks


def _combine_limits(entries: Sequence[LimitRule]) -> Limits:
    if not entries:
        return NO_LIMITS
    rows = [e.max_rows for e in entries if e.max_rows is not None]
    timeouts = [e.statement_timeout for e in entries if e.statement_timeout is not None]
    max_rows = min(rows) if rows else None
    on_max_rows: OnMaxRows = "error"
    if max_rows is not None:
        modes = {e.on_max_rows for e in entries if e.max_rows == max_rows}
        on_max_rows = "truncate" if modes == {"truncate"} else "error"
    return Limits(
        max_rows=max_rows,
        statement_timeout=min(timeouts) if timeouts else None,
        read_only=any(e.read_only for e in entries),
        on_max_rows=on_max_rows,
    )


def limits_for(policy: Policy, identity: IdentityLike, database: str) -> Limits:
    """Every matching ``limits`` entry combined, the strictest winning: the smallest
    ``max_rows`` (with its ``on_max_rows``; "error" if entries with that value disagree), the
    smallest ``statement_timeout``, and ``read_only`` if any entry says so."""
    compiled = _compiled(policy)
    key = _key(identity, database)
    found = compiled.limits_cache.get(key)
    if found is None:
        user, groups, agent, _ = key
        entries = [e for e in policy.limits if e.when.matches(user, groups, agent, database)]
        found = _combine_limits(entries)
        if len(compiled.limits_cache) >= _CACHE_LIMIT:
            compiled.limits_cache.clear()
        compiled.limits_cache[key] = found
    return found


def masks_for(policy: Policy, identity: IdentityLike) -> tuple[MaskRule, ...]:
    """The masks that apply to ``identity`` (those it is exempt from left out), in policy
    order. When several masks match one column, the first one applies."""
    compiled = _compiled(policy)
    key = (identity.user, tuple(identity.groups))
    found = compiled.masks_cache.get(key)
    if found is None:
        found = tuple(m for m in policy.masks if not m.exempts(key[0], key[1]))
        if len(compiled.masks_cache) >= _CACHE_LIMIT:
            compiled.masks_cache.clear()
        compiled.masks_cache[key] = found
    return found


def mask_for_column(
    masks: Sequence[MaskRule], schema: str, table: str, column: str
) -> MaskRule | None:
    """The mask (from ``masks_for``) that applies to ``schema.table.column``, or None."""
    for mask in masks:
        if mask.column_matches(schema, table, column):
            return mask
    return None


# --------------------------------------------------------------------------------------------
# Explain


def _one_line(sql: str, limit: int = 200) -> str:
    text = " ".join(sql.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listing(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values) if values else "-"


def explain_text(
    decision: Decision,
    facts_list: Sequence[StatementFacts],
    masks: Sequence[tuple[str, str]] = (),
    *,
    limits: Limits | None = None,
) -> str:
    """What ``pgguard policy explain`` prints: the decision, the matched rules, each
    statement's class, command and objects, the masked columns (``(column, function)`` pairs)
    and, when given, the limits in force."""
    lines = [f"decision: {decision.action}", f"rule: {decision.rule}"]
    if decision.action != "allow":
        lines.append(f"message: {decision.error_text()}")
    if decision.approvers:
        lines.append(f"approvers: {', '.join(decision.approvers)}")
    lines.append(f"matched rules: {_listing(decision.matched)}")
    if decision.audit_only_rules:
        lines.append(
            f"audit-only rules (dry run, not enforced): {', '.join(decision.audit_only_rules)}"
        )
    per = decision.statements if len(decision.statements) == len(facts_list) else ()
    for i, facts in enumerate(facts_list, 1):
        lines.append("")
        lines.append(f"statement {i}: {_one_line(facts.sql)}")
        if per:
            d = per[i - 1]
            extra = f" ({', '.join(d.matched)})" if d.matched else ""
            lines.append(f"  decision: {d.action} by {d.rule}{extra}")
        classes = [c for c in CLASS_DANGER if c in facts.classes]
        shown = facts.statement_class
        if len(classes) > 1:
            lines.append(f"  class: {shown} (all: {', '.join(classes)})")
        else:
            lines.append(f"  class: {shown}")
        lines.append(f"  command: {facts.command}")
        nested = [c for c in facts.all_commands if c != facts.command]
        if nested:
            lines.append(f"  also runs: {', '.join(nested)}")
        lines.append(f"  tables: {_listing(facts.tables)}")
        if facts.written_tables:
            lines.append(f"  written tables: {_listing(facts.written_tables)}")
        lines.append(f"  columns: {_listing(facts.columns)}")
        lines.append(f"  functions: {_listing(facts.functions)}")
        if facts.without_where:
            lines.append("  without WHERE: yes")
        if facts.settings:
            lines.append(f"  changes settings: {', '.join(facts.settings)}")
        for note in facts.notes:
            lines.append(f"  note: {note}")
    lines.append("")
    if masks:
        lines.append("masked columns:")
        width = max(len(c) for c, _ in masks)
        for column, function in masks:
            lines.append(f"  {column.ljust(width)}  {function}")
    else:
        lines.append("masked columns: none")
    if limits is not None and not limits.unlimited:
        parts = []
        if limits.max_rows is not None:
            parts.append(f"max_rows {limits.max_rows} ({limits.on_max_rows})")
        if limits.statement_timeout is not None:
            parts.append(f"statement_timeout {limits.statement_timeout:g}s")
        if limits.read_only:
            parts.append("read-only")
        lines.append(f"limits: {', '.join(parts)}")
    return "\n".join(lines) + "\n"
