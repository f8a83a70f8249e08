"""What analysis knows about one statement, and the catalog it resolves names against. Pure.

These types are the contract between the analyser (pglast → facts), the policy engine
(facts + identity + policy → decision) and the relay (which feeds the catalog and the
session's search_path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

StatementClass = Literal[
    "read", "write", "ddl", "role", "function", "session", "transaction", "copy", "admin"
]

# Most dangerous first: when analysis cannot tell, a statement takes the most dangerous class
# it could be. The policy engine matches a rule's `classes` against every class in
# `StatementFacts.classes`, so a write hidden in a CTE matches `write` even though the
# statement is a SELECT.
CLASS_DANGER: tuple[StatementClass, ...] = (
    "admin",
    "role",
    "function",
    "ddl",
    "copy",
    "write",
    "session",
    "read",
    "transaction",
)


@dataclass(frozen=True, slots=True)
class RelationInfo:
    """One pg_class entry the analyser can resolve to."""

    oid: int
    schema: str
    name: str
    kind: str  # pg_class.relkind: r table, v view, m matview, p partitioned, f foreign, S seq…
    columns: tuple[str, ...] = ()
    # For views: the relations the view reads (schema.name), so a rule on a base table also
    # applies through the view.
    depends_on: tuple[str, ...] = ()
    # Per column of ``columns``: its attribute number and (type oid, typmod).
    attnums: tuple[int, ...] = ()
    column_types: tuple[tuple[int, int], ...] = ()
    # Views and materialized views: the defining query (pg_get_viewdef), whose names resolve
    # along the catalog's ``definition_search_path``.
    definition: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def column_type(self, column: str) -> tuple[int, int] | None:
        """(type oid, typmod) of ``column``, when the catalog has it."""
        try:
            i = self.columns.index(column)
        except ValueError:
            return None
        return self.column_types[i] if i < len(self.column_types) else None


@dataclass(frozen=True, slots=True)
class FunctionInfo:
    """One pg_proc entry."""

    oid: int
    schema: str
    name: str
    volatility: Literal["i", "s", "v"]  # pg_proc.provolatile
    kind: Literal["f", "p", "a", "w"] = "f"  # function, procedure, aggregate, window
    builtin: bool = False  # oid < 16384 (FirstNormalObjectId): shipped with PostgreSQL
    security_definer: bool = False
    language: str = "internal"
    returns_set: bool = False
    # Non-built-in SQL-language functions: the body's SQL text, and the search_path the
    # function sets for itself (proconfig), if any.
    body: str | None = None
    body_search_path: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


class Catalog(Protocol):
    """Name resolution against the live catalog, the way PostgreSQL does it."""

    def relation(
        self, schema: str | None, name: str, search_path: Sequence[str]
    ) -> RelationInfo | None:
        """The relation ``schema.name`` (or the first match of ``name`` along ``search_path``,
        which already has pg_catalog and pg_temp where PostgreSQL puts them)."""
        ...

    def functions(
        self, schema: str | None, name: str, search_path: Sequence[str]
    ) -> Sequence[FunctionInfo]:
        """Every candidate ``schema.name`` function (overloads included) visible along
        ``search_path``; empty when unknown."""
        ...


@dataclass(frozen=True, slots=True)
class StatementFacts:
    """The analysis of one statement (a multi-statement string gives one per statement)."""

    sql: str  # this statement's text alone
    command: str  # the command tag PostgreSQL would report: SELECT, INSERT, CREATE TABLE, …
    classes: frozenset[StatementClass]  # every class the statement belongs to
    tables: tuple[str, ...] = ()  # schema.name of every relation it touches (views expanded)
    written_tables: tuple[str, ...] = ()  # schema.name of relations it writes
    columns: tuple[str, ...] = ()  # schema.table.column referenced, where resolvable
    functions: tuple[str, ...] = ()  # schema.name of functions it calls
    without_where: bool = False  # an UPDATE/DELETE with no WHERE clause (or WHERE true)
    # Every command tag the statement runs: ``command`` first, then each statement it runs
    # inside it, once each in the order found: INSERT / UPDATE / DELETE / MERGE in CTEs at any
    # depth, the statement under EXPLAIN ANALYZE, the inner statement of PREPARE and of an
    # EXECUTE with known facts, the query of CREATE TABLE AS / CREATE MATERIALIZED VIEW /
    # COPY (query) / DECLARE CURSOR, the elements of CREATE SCHEMA. Statements that do not run
    # now (plain EXPLAIN, view / rule / function bodies, WITH NO DATA) are not listed. Empty
    # only for facts built by hand: read it through :attr:`all_commands`.
    commands: tuple[str, ...] = ()
    # Lower-cased names of the run-time settings the statement changes: SET / RESET name,
    # set_config() with a constant name, SET TRANSACTION and BEGIN / START TRANSACTION options
    # (transaction_isolation, transaction_read_only, transaction_deferrable), SET SESSION
    # CHARACTERISTICS (default_transaction_*), and "all" for RESET ALL / DISCARD ALL.
    settings: tuple[str, ...] = ()
    # search_path effect of a SET/RESET search_path statement (None: no change).
    sets_search_path: tuple[str, ...] | None = None
    search_path_is_local: bool = False  # SET LOCAL / set_config(..., true)
    # Why a class was assumed rather than proven (fail-closed notes, shown by `explain`).
    notes: tuple[str, ...] = field(default=())

    @property
    def all_commands(self) -> tuple[str, ...]:
        """``commands``, or just ``(command,)`` when it is empty."""
        return self.commands or (self.command,)

    @property
    def statement_class(self) -> StatementClass:
        """The most dangerous of ``classes``."""
        for cls in CLASS_DANGER:
            if cls in self.classes:
                return cls
        return "read"
