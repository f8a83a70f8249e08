"""Guard rules applied to a session: identity guard, analysis, policy decision. Pure.

``GuardState`` is shared by every session of a process: the policy in force, one catalog
snapshot per database, and the analysis cache. ``SessionGuard`` judges one session's
statements; the relay calls it for every Query and Parse it has not judged before.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pglast import parser

from pgguard.audit.text import COMMENT_NESTING_MAX, nested_too_deep
from pgguard.identity import Identity
from pgguard.policy.analysis import AnalysisError, analyse, prepared_statement
from pgguard.policy.catalog import CatalogSnapshot, effective_search_path
from pgguard.policy.engine import Decision, Limits, decide_many, limits_for
from pgguard.policy.facts import StatementFacts
from pgguard.policy.identity_guard import Hold, Refusal, check_identity
from pgguard.policy.model import Policy

log = logging.getLogger("pgguard.guard")

_CACHE_SIZE = 20_000
_EMPTY_CATALOG = CatalogSnapshot((), ())
# Settings pinned by limits: clients may not change them once pgguard has set them.
TIMEOUT_SETTINGS = frozenset({"statement_timeout"})
READ_ONLY_SETTINGS = frozenset({"default_transaction_read_only", "transaction_read_only"})
# Commands whose analysis does not depend on literal values, so one analysis serves every
# statement with the same fingerprint (pgbench -S and ORMs send a new literal each time).
_SHAPE_CACHEABLE = frozenset({"SELECT"})
# Texts made only of these characters cannot hold a string, a quoted identifier, a
# dollar-quote, a cast or a parameter; two of them that differ only in their numeric
# literals tokenize the same but for those constants, so a plain read judged once is judged
# for all of them. This spares the fingerprint (the dominant cost) on e.g. pgbench -S.
_PLAIN_TEXT = re.compile(r"[\w\s,.*=()<>+\-/;]*\Z", re.ASCII)
_NUMBER = re.compile(r"\b\d+(?:\.\d*)?(?:[eE][-+]?\d+)?\b", re.ASCII)


TOO_DEEP = Refusal(
    "parser",
    f"statement could not be analysed: comments nested more than {COMMENT_NESTING_MAX} deep",
    "54001",
)


def literal_free(sql: str) -> str | None:
    """``sql`` with its numbers replaced by ``?`` when it holds no string, quoted name, cast or
    parameter (then two texts with the same key differ only in numbers, which change neither
    the analysis nor the lineage); None otherwise."""
    return _NUMBER.sub("?", sql) if _PLAIN_TEXT.match(sql) else None


@dataclass(frozen=True, slots=True)
class Judgement:
    """What the guard decided for one Query/Parse, for the relay and the audit trail."""

    facts: tuple[StatementFacts, ...]
    decision: Decision | None
    refusal: Refusal | None


class GuardState:
    """Process-wide guard state. ``epoch`` changes whenever cached verdicts may be stale."""

    def __init__(
        self, policy: Policy | None, allowed_functions: frozenset[str] = frozenset()
    ) -> None:
        self.policy = policy
        self.allowed_functions = allowed_functions
        self.epoch = [0]  # a mutable cell the relay compares against its verdict cache
        self.catalogs: dict[str, CatalogSnapshot] = {}
        self.catalog_versions: dict[str, int] = {}
        # Two caches, so that a stream of new texts cannot flush the shapes.
        self._exact: dict[tuple[object, ...], tuple[StatementFacts, ...]] = {}
        self._shapes: dict[tuple[object, ...], tuple[StatementFacts, ...]] = {}

    def _bump(self) -> None:
        self.epoch[0] += 1
        self._exact.clear()
        self._shapes.clear()

    def set_policy(self, policy: Policy | None) -> None:
        self.policy = policy
        self._bump()

    def set_catalog(self, database: str, snapshot: CatalogSnapshot) -> None:
        self.catalogs[database] = snapshot
        self.catalog_versions[database] = self.catalog_versions.get(database, 0) + 1
        self._bump()

    def catalog(self, database: str) -> CatalogSnapshot:
        return self.catalogs.get(database, _EMPTY_CATALOG)

    def analyse(
        self, database: str, search_path: tuple[str, ...], current_user: str, sql: str
    ) -> tuple[StatementFacts, ...]:
        """Facts for ``sql``: cached by fingerprint for plain reads (whose facts cannot depend
        on a literal), else by exact text. A fingerprint hit returns the facts of the first
        statement of that shape, so ``facts.sql`` may hold another literal."""
        context = (database, search_path, current_user, self.catalog_versions.get(database, 0))
        key = (context, sql)
        hit = self._exact.get(key)
        if hit is not None:
            return hit
        try:
            fingerprint: str | None = parser.fingerprint(sql)
        except parser.ParseError:
            fingerprint = None
        if fingerprint is not None:
            shaped = self._shapes.get((context, fingerprint))
            if shaped is not None:
                return shaped
        facts = tuple(
            analyse(
                sql,
                self.catalog(database),
                search_path,
                self.allowed_functions,
                current_user=current_user,
            )
        )
        if fingerprint is not None and _shape_cacheable(facts):
            _bounded_store(self._shapes, (context, fingerprint), facts)
        else:
            _bounded_store(self._exact, key, facts)
        return facts


def _bounded_store(
    cache: dict[tuple[object, ...], tuple[StatementFacts, ...]],
    key: tuple[object, ...],
    facts: tuple[StatementFacts, ...],
) -> None:
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = facts


def policy_in_force(policy: Policy | None) -> Policy | None:
    """None when the policy cannot refuse, limit or mask anything (then nothing is analysed)."""
    if policy is None:
        return None
    if policy.rules or policy.masks or policy.limits or policy.defaults.action != "allow":
        return policy
    return None


def _shape_cacheable(facts: tuple[StatementFacts, ...]) -> bool:
    """Only plain reads: their facts cannot depend on a literal (a constant WHERE in a
    data-modifying CTE, a set_config name, a COPY file name all can)."""
    if len(facts) != 1:
        return False
    f = facts[0]
    if f.command not in _SHAPE_CACHEABLE or not f.classes <= {"read"}:
        return False
    if f.sets_search_path is not None or f.without_where:
        return False
    return not any(name.endswith("set_config") for name in f.functions)


class SessionGuard:
    """Judges the statements of one session against the policy in force."""

    def __init__(
        self,
        state: GuardState,
        identity: Identity,
        database: str,
        *,
        role_mapped: bool,
        search_path: tuple[str, ...] = ("pg_catalog", "public"),
        current_user: str = "",
    ) -> None:
        self.state = state
        self.identity = identity
        self.database = database
        self.role_mapped = role_mapped
        self.search_path = search_path
        self.default_search_path = search_path
        self.pending_paths: list[tuple[str, ...]] = []
        self._decided: dict[int, tuple[tuple[StatementFacts, ...], Decision]] = {}
        self._decided_epoch = state.epoch[0]
        self._plain: dict[str, Judgement] = {}  # judgements of plain reads, by literal-free text
        # describe() results of plain reads, by literal-free text (cleared with _plain)
        self._described: dict[str, tuple[StatementFacts | None, tuple[str, ...]]] = {}
        # SQL-level PREPAREs of this session, so that EXECUTE is judged as what it runs.
        self.prepared: dict[str, StatementFacts] = {}
        self.current_user = current_user
        self.limits: Limits | None = None
        self.pinned: frozenset[str] = frozenset()
        self.read_only = False
        self.on_limits: Callable[[SessionGuard], None] | None = None  # set by the session
        self.apply_limits()
        # Set by the session: called when a judged statement may change the search_path or
        # the catalog (after it runs, the session asks the server and refreshes).
        self.on_search_path_change: Callable[[], None] | None = None
        self.on_schema_change: Callable[[], None] | None = None
        self.on_judgement: Callable[[str, Judgement], None] | None = None

    def apply_limits(self) -> None:
        policy = self.state.policy
        if policy is None:
            return
        self.limits = limits_for(policy, self.identity, self.database)
        pinned: set[str] = set()
        if self.limits.statement_timeout is not None:
            pinned |= TIMEOUT_SETTINGS
        if self.limits.read_only:
            pinned |= READ_ONLY_SETTINGS
        self.pinned = frozenset(pinned)
        self.read_only = self.limits.read_only
        if self.on_limits is not None:
            self.on_limits(self)

    def __call__(self, sql: str) -> Refusal | None:
        judgement = self.judge(sql)
        if self.on_judgement is not None:
            self.on_judgement(sql, judgement)
        return judgement.refusal

    def _check_epoch(self) -> None:
        """Forget what the session remembered if the policy or a catalog changed since."""
        if self._decided_epoch != self.state.epoch[0]:
            self._decided.clear()
            self._plain.clear()
            self._described.clear()
            self._decided_epoch = self.state.epoch[0]

    def judge(self, sql: str) -> Judgement:
        if nested_too_deep(sql):
            return Judgement((), None, TOO_DEEP)  # before any parser sees it
        self._check_epoch()
        plain_key = None
        if not self.pending_paths:
            plain_key = literal_free(sql)
        if plain_key is not None:
            known = self._plain.get(plain_key)
            if known is not None:
                return known
        judgement = self._judge(sql)
        if (
            plain_key is not None
            and judgement.refusal is None
            and _shape_cacheable(judgement.facts)
        ):
            if len(self._plain) >= 4096:
                self._plain.clear()
            self._plain[plain_key] = judgement
        return judgement

    def _judge(self, sql: str) -> Judgement:
        refusal = check_identity(sql, self.role_mapped, self.pinned, self.read_only)
        if refusal is not None:
            return Judgement((), None, refusal)
        policy = self.state.policy
        if policy is None:
            return Judgement((), None, None)
        try:
            # Until the server confirms a search_path change, judge under every path the
            # session may have (fail closed: the most severe decision wins).
            candidates = [self.search_path, *self.pending_paths]
            judged = [self._analyse(path, sql) for path in dict.fromkeys(candidates)]
        except AnalysisError as exc:
            return Judgement(
                (), None, Refusal("parser", f"statement could not be analysed: {exc}", "42601")
            )
        decisions = [self._decide(policy, f) for f in judged]
        decision = max(decisions, key=lambda d: d.severity)
        facts = judged[decisions.index(decision)]
        if decision.audit_only_rules:
            log.info(
                "audit_only rules matched: %s",
                ", ".join(decision.audit_only_rules),
                extra={"user": self.identity.user},
            )
        refusal = _refusal(decision)
        if refusal is None:
            self._note_effects(facts)
        return Judgement(facts, decision, refusal)

    def _decide(self, policy: Policy, facts: tuple[StatementFacts, ...]) -> Decision:
        """decide_many, remembered per facts object (cached facts are shared objects)."""
        entry = self._decided.get(id(facts))
        if entry is not None and entry[0] is facts:
            return entry[1]
        decision = decide_many(policy, self.identity, self.database, facts)
        if len(self._decided) >= 4096:
            self._decided.clear()
        self._decided[id(facts)] = (facts, decision)
        return decision

    def _analyse(self, path: tuple[str, ...], sql: str) -> tuple[StatementFacts, ...]:
        if self.prepared and "execute" in sql.lower():
            # EXECUTE of a statement this session PREPAREd: judged as that statement.
            return tuple(
                analyse(
                    sql,
                    self.state.catalog(self.database),
                    path,
                    self.state.allowed_functions,
                    prepared=self.prepared,
                    current_user=self.current_user,
                )
            )
        return self.state.analyse(self.database, path, self.current_user, sql)

    def describe(self, sql: str) -> tuple[StatementFacts | None, tuple[str, ...]]:
        """Facts of one statement's text and the audit_only rules it matches, for its audit
        record (from the caches when the statement was judged). Plain reads that differ only
        in numbers share one answer (no fingerprint per statement)."""
        if nested_too_deep(sql):
            return None, ()
        key = None
        if not self.pending_paths:
            self._check_epoch()
            key = literal_free(sql)
            if key is not None:
                known = self._described.get(key)
                if known is not None:
                    return known
        try:
            facts = self.state.analyse(self.database, self.search_path, self.current_user, sql)
        except AnalysisError:
            return None, ()
        if not facts:
            return None, ()
        audit_only: tuple[str, ...] = ()
        if self.state.policy is not None:
            audit_only = self._decide(self.state.policy, facts).audit_only_rules
        described = (facts[0], audit_only)
        if key is not None and _shape_cacheable(facts):
            if len(self._described) >= 4096:
                self._described.clear()
            self._described[key] = described
        return described

    def statement_kinds(self, sql: str) -> tuple[tuple[str, bool], ...] | None:
        """Each statement's class and whether an audit_only rule matched it, for the
        statement metrics, from the caches its judgement filled; None when no policy is in
        force (nothing was analysed, and the metrics must not pay for an analysis)."""
        policy = self.state.policy
        if policy is None:
            return None
        known = None
        if not self.pending_paths:
            key = literal_free(sql)
            known = self._plain.get(key) if key is not None else None
        if known is not None and known.decision is not None:
            facts, decision = known.facts, known.decision
        else:
            try:
                facts = self._analyse(self.search_path, sql)
            except AnalysisError:
                return None
            decision = self._decide(policy, facts)
        per_statement = decision.statements or (decision,)
        return tuple(
            (f.statement_class, bool(d.audit_only_rules))
            for f, d in zip(facts, per_statement, strict=False)
        )

    def search_path_confirmed(self, setting: str, in_transaction: bool = False) -> None:
        """The server reports the session's search_path: judge with it from now on. Inside a
        transaction block a rollback could still restore the previous path, so that one
        stays a candidate until the block ends."""
        previous = self.search_path
        self.search_path = effective_search_path(setting, self.current_user)
        self._plain.clear()
        self._described.clear()
        self.pending_paths = [previous] if in_transaction and previous != self.search_path else []

    def _note_effects(self, facts: Sequence[StatementFacts]) -> None:
        for f in facts:
            if f.command == "PREPARE":
                found = prepared_statement(
                    f.sql,
                    self.state.catalog(self.database),
                    self.search_path,
                    self.state.allowed_functions,
                )
                if found is not None:
                    self.prepared[found[0]] = found[1]
            if f.sets_search_path is not None:
                if f.sets_search_path:
                    path = effective_search_path(f.sets_search_path, self.current_user)
                    self.pending_paths.append(path)
                else:
                    self.pending_paths.append(self.default_search_path)
                if self.on_search_path_change is not None:
                    self.on_search_path_change()
            if {"ddl", "role"} & f.classes and self.on_schema_change is not None:
                self.on_schema_change()


def _refusal(decision: Decision) -> Refusal | None:
    if decision.action == "allow":
        return None
    if decision.action == "require_approval":
        approvers = ", ".join(decision.approvers) or "an approver"
        # Refused with this text where statements cannot be held (no approvals store).
        return Hold(
            decision.rule,
            f"{decision.message} (needs approval by {approvers}; no approvals store is "
            "configured, so it cannot wait for one)",
            approvers=tuple(decision.approvers),
        )
    return Refusal(decision.rule, decision.message)
