"""Per-session masking plans, cached. Pure (no I/O).

:class:`LineageCache` is shared by the sessions of a process: lineage depends on the text,
the database's catalog snapshot and the search_path, not on who asks. :class:`SessionPlanner`
turns lineage into the plans of one identity (its masks under the policy in force) and
remembers them per text until the guard's epoch moves (policy reload, catalog refresh).
"""

from __future__ import annotations

from collections.abc import Callable

from pgguard.masking.lineage import StatementLineage, lineage
from pgguard.masking.plan import (
    OPAQUE_MASK,
    OPAQUE_RESULT,
    ColumnMask,
    StatementPlan,
    plan_statement,
)
from pgguard.policy.analysis import AnalysisError
from pgguard.policy.engine import mask_for_column, masks_for
from pgguard.policy.guard import GuardState, SessionGuard, literal_free
from pgguard.policy.identity_guard import Refusal
from pgguard.policy.model import MaskRule

__all__ = ["LineageCache", "SessionPlanner"]

_CACHE_SIZE = 20_000


class LineageCache:
    """Lineage per (database, search_path, catalog version, text); process-wide."""

    def __init__(self, state: GuardState) -> None:
        self.state = state
        self._cache: dict[tuple[object, ...], tuple[StatementLineage, ...] | None] = {}

    def get(
        self, database: str, search_path: tuple[str, ...], sql: str
    ) -> tuple[StatementLineage, ...] | None:
        """The statements' lineage; None when the text cannot be analysed."""
        version = self.state.catalog_versions.get(database, 0)
        key_text = literal_free(sql) or sql
        key = (database, search_path, version, key_text)
        if key in self._cache:
            return self._cache[key]
        try:
            found: tuple[StatementLineage, ...] | None = lineage(
                sql, self.state.catalog(database), search_path
            )
        except AnalysisError:
            found = None
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = found
        return found


_OPAQUE_PLAN = StatementPlan(result=OPAQUE_RESULT, returns_rows=True, scrub_errors=True)


class SessionPlanner:
    """The masking plans of one session's statements."""

    def __init__(self, cache: LineageCache, guard: SessionGuard) -> None:
        self.cache = cache
        self.guard = guard
        self._plans: dict[object, tuple[StatementPlan, ...]] = {}
        self._path = guard.search_path  # plans under it are keyed by the text alone
        self._epoch = -1
        self._masks: tuple[MaskRule, ...] = ()
        self._origins: dict[tuple[int, int], ColumnMask | None] = {}
        self.on_stale: Callable[[], None] | None = None  # the catalog looks out of date

    @property
    def masks(self) -> tuple[MaskRule, ...]:
        self._check_epoch()
        return self._masks

    def _check_epoch(self) -> None:
        state = self.guard.state
        if self._epoch != state.epoch[0]:
            self._epoch = state.epoch[0]
            self._plans.clear()
            self._path = self.guard.search_path
            self._origins.clear()
            policy = state.policy
            self._masks = masks_for(policy, self.guard.identity) if policy is not None else ()

    def __call__(self, sql: str) -> tuple[StatementPlan, ...]:
        self._check_epoch()
        if not self._masks:
            return ()
        guard = self.guard
        if guard.pending_paths:
            key: object = (sql, guard.search_path, *guard.pending_paths)
        else:
            key = sql if guard.search_path is self._path else (sql, guard.search_path)
        plans = self._plans.get(key)
        if plans is not None:
            return plans
        # A new text: one that differs from a known one only in numbers has its plans.
        shape: tuple[str, tuple[str, ...]] | None = None
        free = None if guard.pending_paths else literal_free(sql)
        if free is not None:
            shape = (free, guard.search_path)
            plans = self._plans.get(shape)
        if plans is None:
            plans = self._plan(sql)
        if len(self._plans) >= 4096:
            self._plans.clear()
        self._plans[key] = plans
        if shape is not None:
            self._plans[shape] = plans
        return plans

    def _plan(self, sql: str) -> tuple[StatementPlan, ...]:
        guard = self.guard
        catalog = guard.state.catalog(guard.database)
        paths = dict.fromkeys((guard.search_path, *guard.pending_paths))
        candidates: list[tuple[StatementPlan, ...]] = []
        for path in paths:
            found = self.cache.get(guard.database, path, sql)
            if found is None:
                # Cannot be analysed (the guard refuses it anyway): mask everything.
                return (_OPAQUE_PLAN,)
            candidates.append(tuple(plan_statement(s, self._masks, catalog) for s in found))
        first = candidates[0]
        if all(c == first for c in candidates[1:]):
            return first
        # The search_path is changing and the plans differ: mask every result, refuse what
        # any candidate refuses.
        merged: list[StatementPlan] = []
        for i, plan in enumerate(first):
            refusal = next((c[i].refusal for c in candidates if i < len(c) and c[i].refusal), None)
            merged.append(
                StatementPlan(
                    result=OPAQUE_RESULT,
                    returns_rows=True,
                    reference=plan.reference,
                    declares=plan.declares,
                    copy=plan.copy,
                    refusal=refusal,
                    scrub_errors=True,
                )
            )
        return tuple(merged)

    def refusal(self, sql: str) -> Refusal | None:
        """The masking refusal of the first statement of ``sql`` that has one."""
        for plan in self(sql):
            if plan.refusal is not None:
                return plan.refusal
        return None

    def origin(self, table_oid: int, attnum: int) -> ColumnMask | None:
        """The mask of the column a RowDescription names as a field's origin."""
        self._check_epoch()
        key = (table_oid, attnum)
        if key in self._origins:
            return self._origins[key]
        found: ColumnMask | None = None
        info = self.guard.state.catalog(self.guard.database).relation_by_oid(table_oid)
        if info is None or attnum not in info.attnums:
            # A relation or column the catalog does not know: created since it was loaded
            # (or a temporary one). Masked until a fresh catalog says otherwise.
            found = OPAQUE_MASK
            if self._masks and self.on_stale is not None:
                self.on_stale()
        else:
            column = info.columns[info.attnums.index(attnum)]
            rule = mask_for_column(self._masks, info.schema, info.name, column)
            if rule is not None:
                source = f"{info.schema}.{info.name}.{column}"
                found = ColumnMask(rule.function, rule.column, (source,))
        self._origins[key] = found
        return found
