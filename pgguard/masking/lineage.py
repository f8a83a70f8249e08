"""Column lineage: SQL text + catalog snapshot → where every result value comes from. Pure.

:func:`lineage` tells, for each statement of a string, which source columns (``schema.
relation.column`` of tables, views and materialized views) every result column derives from,
which values the statement writes into which table columns, and what it references at all.
Masking is planned from it, so the analysis is **sound: it fails closed**. Whatever it cannot
see through is marked ``opaque`` (and an opaque column is always masked); a value read from a
column is never reported as coming from nothing.

Parsing is PostgreSQL's own grammar (pglast, read as JSON and walked as plain dicts, like
:mod:`pgguard.policy.analysis`). Names resolve against a
:class:`~pgguard.policy.catalog.CatalogSnapshot` along the session's effective
``search_path`` (view definitions along :attr:`CatalogSnapshot.definition_search_path`).

Rules:

* A column of a table (partitioned and foreign tables included) is its own source, ``direct``.
  System columns and sequences are CLEAN. A relation missing from the catalog has unknown
  columns: every reference to it is OPAQUE.
* Views and materialized views: their definition is analysed (recursively, cached per catalog
  object); view column *i* is definition column *i* plus the view column itself. A cycle, too
  deep a nesting or a missing / unparsable definition makes the columns OPAQUE. Statistics
  hold copies of column values: ``pg_statistic.stavalues1..5`` and every column of
  ``pg_statistic_ext_data`` are OPAQUE (``pg_stats`` & co. follow as views over them).
* ``direct`` means "is one source value, unchanged": a plain column reference through aliases,
  subqueries, CTEs, views, set operations whose branches are all direct. Any expression,
  operator, cast, function, aggregate, CASE or constructor gives the union of its inputs,
  not direct. Constants and parameters are CLEAN. ``EXISTS`` and ``count()`` are CLEAN.
* Functions: built-ins give the union of their arguments; built-ins that run SQL text or read
  whole relations by name (``query_to_xml``, ``table_to_xml``, ``ts_stat``, ``dblink*``, …),
  functions missing from the catalog, and non-SQL user functions (plpgsql, C, …) are OPAQUE;
  the executed unseen ones are listed in ``opaque_calls``. A user SQL function's body is
  analysed: its result is the union of its arguments and every output of its body, its
  writes are collected (tainted with the arguments). Every overload candidate counts.
* Writes: INSERT / UPDATE / MERGE / ON CONFLICT assignments, CREATE TABLE AS, SELECT INTO,
  CREATE MATERIALIZED VIEW, REFRESH, column defaults and generated / USING expressions of
  CREATE / ALTER TABLE, wherever they run (data-modifying CTEs, EXPLAIN ANALYZE, PREPARE,
  function bodies). A write into a view also flows into the base columns it is direct over.
* RETURNING sees the stored row: a written column is the merge of the target column and the
  value written into it.
* Statements the analyser does not know return OPAQUE rows.
* When the number of result columns cannot be known (``SELECT *`` over a relation with
  unknown columns, ``(composite).*``), ``columns`` is the known prefix (or None) and ``rest``
  the union of everything after it. A caller that sees more columns than the analyser
  described for a fully known result should treat the extra ones as opaque (the catalog
  may be stale).

Not visible (and so not modelled): triggers, rules, column defaults already in the catalog,
and user-defined operators (an operator is the union of its operands unless it is
schema-qualified outside ``pg_catalog``, which is OPAQUE).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from pgguard.policy.analysis import (
    _TYPED,
    AnalysisError,
    _deep,
    _explain_analyze,
    _parse,
    _wrapped,
    column_ref_names,
)
from pgguard.policy.catalog import CatalogSnapshot, effective_search_path
from pgguard.policy.facts import FunctionInfo, RelationInfo

__all__ = [
    "CLEAN",
    "OPAQUE",
    "AnalysisError",
    "ColumnLineage",
    "CopyOptions",
    "StatementLineage",
    "WriteFlow",
    "lineage",
]

Node = dict[str, Any]


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True, slots=True)
class ColumnLineage:
    """Where one value comes from."""

    # "schema.relation.column" of every table / view / matview column the value derives from
    sources: frozenset[str] = frozenset()
    # True only when the value IS one source value, unchanged
    direct: bool = False
    # derives (possibly) from something the analyser cannot see through: always masked
    opaque: bool = False


CLEAN = ColumnLineage()
OPAQUE = ColumnLineage(opaque=True)


@dataclass(frozen=True, slots=True)
class WriteFlow:
    """A value written into a table column."""

    target: str  # "schema.table.column" ("schema.table.*" when the columns are unknown)
    lineage: ColumnLineage


@dataclass(frozen=True, slots=True)
class CopyOptions:
    """The output format of COPY … TO STDOUT."""

    format: str = "text"  # "text" | "csv" | "binary"
    delimiter: str | None = None
    null: str | None = None
    quote: str | None = None
    escape: str | None = None
    header: bool = False


@dataclass(frozen=True, slots=True)
class StatementLineage:
    """The lineage of one statement.

    ``columns`` gives the first ``len(columns)`` result columns; ``rest`` covers every result
    column beyond them (all of them when ``columns`` is None). When the analyser cannot tell
    how many columns there are, ``columns`` is a known prefix (or None) and ``rest`` holds
    the union of everything after it.

    ``reference`` (FETCH / EXECUTE): the rows are the named object's, which the session
    resolves (and must treat as opaque when it does not know the object); ``rest`` then holds
    what this statement adds to every column of it (EXECUTE's parameter values, which the
    PREPARE analysis saw as CLEAN ``$n``).
    """

    returns_rows: bool
    columns: tuple[ColumnLineage, ...] | None = None
    rest: ColumnLineage = CLEAN
    reference: tuple[str, str] | None = None  # ("cursor", name) FETCH, ("prepared", name) EXECUTE
    declares: tuple[str, str] | None = None  # ("cursor", name) DECLARE, ("prepared", name) PREPARE
    copy: CopyOptions | None = None  # COPY … TO STDOUT
    copy_relation: str | None = None  # COPY table TO STDOUT: "schema.table"
    writes: tuple[WriteFlow, ...] = ()
    reads: frozenset[str] = frozenset()  # every source column referenced anywhere
    reads_opaque: bool = False  # something opaque is referenced anywhere
    opaque_calls: tuple[str, ...] = ()  # executed unseen code: "schema.name", "DO"
    renames: tuple[str, ...] = ()  # "schema.table" / "schema.table.column" renamed or moved


# --------------------------------------------------------------------------- lineage algebra


def _union(parts: Iterable[ColumnLineage]) -> ColumnLineage:
    """A value computed from all of ``parts``: never direct."""
    sources: set[str] | None = None
    opaque = False
    for part in parts:
        if part.sources:
            if sources is None:
                sources = set(part.sources)
            else:
                sources.update(part.sources)
        if part.opaque:
            opaque = True
    if sources is None:
        return OPAQUE if opaque else CLEAN
    return ColumnLineage(frozenset(sources), False, opaque)


def _union2(a: ColumnLineage, b: ColumnLineage) -> ColumnLineage:
    """``_union((a, b))``, without building sets when one side is CLEAN."""
    if b is CLEAN:
        return _indirect(a)
    if a is CLEAN:
        return _indirect(b)
    return _union((a, b))


def _merge(a: ColumnLineage, b: ColumnLineage) -> ColumnLineage:
    """A value that is either ``a`` or ``b`` (set operations, USING columns, stored rows):
    direct when both are."""
    if a is b or a == b:
        return a
    return ColumnLineage(a.sources | b.sources, a.direct and b.direct, a.opaque or b.opaque)


_INDIRECT: dict[ColumnLineage, ColumnLineage] = {}


def _indirect(lin: ColumnLineage) -> ColumnLineage:
    """The same sources, not direct (memoised: base columns recur in every statement)."""
    if not lin.direct:
        return lin
    found = _INDIRECT.get(lin)
    if found is None:
        if len(_INDIRECT) > 4096:
            _INDIRECT.clear()
        found = _INDIRECT[lin] = ColumnLineage(lin.sources, False, lin.opaque)
    return found


class _Rel(NamedTuple):
    """The columns of a FROM item or a query result.

    ``names`` None: the columns are not exactly known; ``cols`` is then a known prefix and
    ``rest`` the lineage of any column after it (and of any column looked up by name)."""

    names: tuple[str, ...] | None
    cols: tuple[ColumnLineage, ...]
    rest: ColumnLineage = CLEAN
    system: bool = False  # a stored relation: system columns (ctid, xmin, …) exist

    def at(self, i: int) -> ColumnLineage | None:
        if i < len(self.cols):
            return self.cols[i]
        return self.rest if self.names is None else None

    def whole(self) -> ColumnLineage:
        """The whole row as one value (``t``, ``t.*``, ``row_to_json(t)``)."""
        if self.names is None:
            return _union((*self.cols, self.rest))
        return _union(self.cols)

    def renamed(self, colnames: Sequence[str]) -> _Rel:
        """Alias column list: renames the first columns positionally."""
        if not colnames or self.names is None:
            return self
        k = min(len(colnames), len(self.names))
        return _Rel((*colnames[:k], *self.names[k:]), self.cols, self.rest, self.system)


_UNKNOWN_REL = _Rel(None, (), OPAQUE)
_EMPTY_REL = _Rel((), ())


def _concat(parts: Sequence[_Rel]) -> _Rel:
    """Columns of ``parts`` side by side (ROWS FROM, join without merged columns)."""
    names: list[str] = []
    cols: list[ColumnLineage] = []
    tail: list[ColumnLineage] | None = None
    for part in parts:
        if tail is not None:
            tail.append(part.whole())
            continue
        cols.extend(part.cols)
        if part.names is None:
            tail = [part.rest]
        else:
            names.extend(part.names)
    if tail is not None:
        return _Rel(None, tuple(cols), _union(tail))
    return _Rel(tuple(names), tuple(cols))


def _setop(left: _Rel, right: _Rel) -> _Rel:
    """UNION / INTERSECT / EXCEPT, and one step of a recursive CTE: positional merge."""
    if left.names is not None and right.names is not None and len(left.cols) == len(right.cols):
        return _Rel(left.names, tuple(map(_merge, left.cols, right.cols)))
    if left.names is not None or right.names is not None:
        width = len(left.cols) if left.names is not None else len(right.cols)
        cols = tuple(_merge(left.at(i) or OPAQUE, right.at(i) or OPAQUE) for i in range(width))
        names = left.names if left.names is not None and len(left.names) == width else None
        return _Rel(names, cols)
    n = min(len(left.cols), len(right.cols))
    cols = tuple(_merge(left.cols[i], right.cols[i]) for i in range(n))
    return _Rel(None, cols, _union((*left.cols[n:], *right.cols[n:], left.rest, right.rest)))


# --------------------------------------------------------------------------- scopes


class _Item:
    """One entry of a FROM namespace (PostgreSQL's ParseNamespaceItem)."""

    __slots__ = ("cols_visible", "name", "rel", "rel_visible", "relation")

    def __init__(
        self,
        name: str | None,
        rel: _Rel,
        relation: RelationInfo | None = None,
        rel_visible: bool = True,
        cols_visible: bool = True,
    ) -> None:
        self.name = name  # reference name: alias, or the relation / CTE name
        self.rel = rel
        self.relation = relation  # unaliased catalog relation: matches "schema.name.col"
        self.rel_visible = rel_visible  # usable as a qualifier
        self.cols_visible = cols_visible  # its columns match unqualified names and "*"


class _Scope:
    """One query level: its CTEs and FROM items; ``parent`` is the enclosing level."""

    __slots__ = ("ctes", "items", "parent")

    def __init__(self, parent: _Scope | None, ctes: dict[str, _Rel] | None = None) -> None:
        self.parent = parent
        self.items: list[_Item] = []
        self.ctes = ctes

    def cte(self, name: str) -> _Rel | None:
        scope: _Scope | None = self
        while scope is not None:
            if scope.ctes is not None:
                found = scope.ctes.get(name)
                if found is not None:
                    return found
            scope = scope.parent
        return None


class _Target:
    """The target table of INSERT / UPDATE / DELETE / MERGE / ALTER TABLE."""

    __slots__ = ("aliased", "info", "name", "qualified", "rel")

    def __init__(
        self,
        name: str,
        info: RelationInfo | None,
        qualified: str,
        rel: _Rel,
        aliased: bool = False,
    ) -> None:
        self.name = name  # reference name (alias or table name)
        self.info = info
        self.qualified = qualified
        self.rel = rel
        self.aliased = aliased

    def item(self, rel: _Rel | None = None) -> _Item:
        relation = None if self.aliased else self.info
        return _Item(self.name, self.rel if rel is None else rel, relation)


class _Shape(NamedTuple):
    """What a statement returns (reads, writes, … are kept by the analyser)."""

    returns_rows: bool
    columns: tuple[ColumnLineage, ...] | None = None
    rest: ColumnLineage = CLEAN
    reference: tuple[str, str] | None = None
    declares: tuple[str, str] | None = None
    copy: CopyOptions | None = None
    copy_relation: str | None = None


_NO_ROWS = _Shape(False)
_UNKNOWN_ROWS = _Shape(True, None, OPAQUE)


def _shape(rel: _Rel, **kwargs: Any) -> _Shape:
    if rel.names is not None:
        return _Shape(True, rel.cols, CLEAN, **kwargs)
    return _Shape(True, rel.cols or None, rel.rest, **kwargs)


class _Summary(NamedTuple):
    """An analysed view definition or SQL function body."""

    rel: _Rel  # output columns (views: named; functions: positional, names unknown)
    out: ColumnLineage  # union of every output (functions)
    reads: frozenset[str]
    reads_opaque: bool
    calls: tuple[str, ...]
    writes: tuple[WriteFlow, ...]
    renames: tuple[str, ...]


class _Cache:
    """Per-catalog results reused by every statement."""

    __slots__ = ("bodies", "tables", "views")

    def __init__(self) -> None:
        self.tables: dict[int, _Rel] = {}
        self.views: dict[int, _Summary] = {}
        self.bodies: dict[tuple[int, tuple[str, ...]], _Summary] = {}


_K = TypeVar("_K")
_CACHES: weakref.WeakKeyDictionary[CatalogSnapshot, _Cache] = weakref.WeakKeyDictionary()


def _cache_for(catalog: CatalogSnapshot) -> _Cache:
    try:
        cache = _CACHES.get(catalog)
        if cache is None:
            cache = _CACHES[catalog] = _Cache()
    except TypeError:  # not weak-referenceable: cache for this call only
        cache = _Cache()
    return cache


# --------------------------------------------------------------------------- constants

_MAX_DEPTH = 24  # nested views / function bodies
_MAX_ITERATIONS = 32  # recursive CTE fixpoint
_MAX_QUERY_BLOCKS = 5000  # SELECT blocks analysed for one statement (fixpoints included)
_SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"})
_TABLE_KINDS = frozenset({"r", "p", "f"})
_VIEW_KINDS = frozenset({"v", "m"})
# Statistics keep copies of column values (None: every column).
_STATISTICS: dict[tuple[str, str], frozenset[str] | None] = {
    ("pg_catalog", "pg_statistic"): frozenset(f"stavalues{i}" for i in range(1, 6)),
    ("pg_catalog", "pg_statistic_ext_data"): None,
}
# Built-ins that run SQL text or read relations / files by name: what they return is unseen.
_SQL_TEXT_FUNCTIONS = frozenset({"ts_stat", "ts_rewrite", "pg_read_file", "pg_read_binary_file"})
_SQL_TEXT_PREFIXES = (
    "query_to_xml",
    "cursor_to_xml",
    "table_to_xml",
    "schema_to_xml",
    "database_to_xml",
    "dblink",
)
_RENAMED_KINDS = frozenset(
    {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE"}
)

# Statements that return no rows and move no values (transaction control, settings, DDL,
# utilities). Anything neither here nor handled is unknown: opaque rows.
_UTILITY = frozenset(
    {
        "TransactionStmt",
        "VariableSetStmt",
        "DiscardStmt",
        "ListenStmt",
        "UnlistenStmt",
        "NotifyStmt",
        "DeallocateStmt",
        "ClosePortalStmt",
        "ConstraintsSetStmt",
        "LockStmt",
        "TruncateStmt",
        "VacuumStmt",
        "ClusterStmt",
        "ReindexStmt",
        "CheckPointStmt",
        "AlterSystemStmt",
        "LoadStmt",
        "CreatedbStmt",
        "DropdbStmt",
        "AlterDatabaseStmt",
        "AlterDatabaseSetStmt",
        "AlterDatabaseRefreshCollStmt",
        "CreateTableSpaceStmt",
        "DropTableSpaceStmt",
        "AlterTableSpaceOptionsStmt",
        "AlterTableMoveAllStmt",
        "CreateExtensionStmt",
        "AlterExtensionStmt",
        "AlterExtensionContentsStmt",
        "CreateEventTrigStmt",
        "AlterEventTrigStmt",
        "CreatePLangStmt",
        "CreateFdwStmt",
        "AlterFdwStmt",
        "CreateSubscriptionStmt",
        "AlterSubscriptionStmt",
        "DropSubscriptionStmt",
        "CreateAmStmt",
        "GrantStmt",
        "GrantRoleStmt",
        "CreateRoleStmt",
        "AlterRoleStmt",
        "AlterRoleSetStmt",
        "DropRoleStmt",
        "AlterDefaultPrivilegesStmt",
        "ReassignOwnedStmt",
        "DropOwnedStmt",
        "SecLabelStmt",
        "AlterOwnerStmt",
        "CreateUserMappingStmt",
        "AlterUserMappingStmt",
        "DropUserMappingStmt",
        "CreateForeignTableStmt",
        "ViewStmt",
        "IndexStmt",
        "DropStmt",
        "AlterObjectDependsStmt",
        "CommentStmt",
        "DefineStmt",
        "CreateSchemaStmt",
        "CreateFunctionStmt",
        "AlterFunctionStmt",
        "CreateTrigStmt",
        "RuleStmt",
        "CreatePolicyStmt",
        "AlterPolicyStmt",
        "CreateStatsStmt",
        "AlterStatsStmt",
        "CreateSeqStmt",
        "AlterSeqStmt",
        "CompositeTypeStmt",
        "CreateEnumStmt",
        "CreateRangeStmt",
        "AlterEnumStmt",
        "AlterTypeStmt",
        "CreateDomainStmt",
        "AlterDomainStmt",
        "CreateCastStmt",
        "CreateConversionStmt",
        "CreateOpClassStmt",
        "CreateOpFamilyStmt",
        "AlterOpFamilyStmt",
        "AlterOperatorStmt",
        "CreateTransformStmt",
        "AlterCollationStmt",
        "AlterTSDictionaryStmt",
        "AlterTSConfigurationStmt",
        "CreateForeignServerStmt",
        "AlterForeignServerStmt",
        "ImportForeignSchemaStmt",
        "CreatePublicationStmt",
        "AlterPublicationStmt",
    }
)


# --------------------------------------------------------------------------- small helpers


def _sval(node: Any) -> str:
    s = node.get("String") if type(node) is dict else None
    return str(s.get("sval", "")) if s is not None else ""


def _snames(items: Iterable[Any] | None) -> list[str]:
    return [_sval(item) for item in items or ()]


def _alias(rel: _Rel, alias: Node | None, default: str | None) -> tuple[str | None, _Rel]:
    """Apply ``AS name (col, …)``."""
    if not alias:
        return default, rel
    return alias.get("aliasname") or default, rel.renamed(_snames(alias.get("colnames")))


_SVF_NAMES = {
    "SVFOP_CURRENT_DATE": "current_date",
    "SVFOP_CURRENT_TIME": "current_time",
    "SVFOP_CURRENT_TIME_N": "current_time",
    "SVFOP_CURRENT_TIMESTAMP": "current_timestamp",
    "SVFOP_CURRENT_TIMESTAMP_N": "current_timestamp",
    "SVFOP_LOCALTIME": "localtime",
    "SVFOP_LOCALTIME_N": "localtime",
    "SVFOP_LOCALTIMESTAMP": "localtimestamp",
    "SVFOP_LOCALTIMESTAMP_N": "localtimestamp",
    "SVFOP_CURRENT_ROLE": "current_role",
    "SVFOP_CURRENT_USER": "current_user",
    "SVFOP_USER": "user",
    "SVFOP_SESSION_USER": "session_user",
    "SVFOP_CURRENT_CATALOG": "current_catalog",
    "SVFOP_CURRENT_SCHEMA": "current_schema",
}
_XML_NAMES = {
    "IS_XMLCONCAT": "xmlconcat",
    "IS_XMLELEMENT": "xmlelement",
    "IS_XMLFOREST": "xmlforest",
    "IS_XMLPARSE": "xmlparse",
    "IS_XMLPI": "xmlpi",
    "IS_XMLROOT": "xmlroot",
    "IS_XMLSERIALIZE": "xmlserialize",
}
_JSON_FUNC_NAMES = {
    "JSON_EXISTS_OP": "json_exists",
    "JSON_QUERY_OP": "json_query",
    "JSON_VALUE_OP": "json_value",
}
_FIXED_NAMES = {
    "A_ArrayExpr": "array",
    "RowExpr": "row",
    "CoalesceExpr": "coalesce",
    "GroupingFunc": "grouping",
    "MergeSupportFunc": "merge_action",
    "XmlSerialize": "xmlserialize",
    "JsonParseExpr": "json",
    "JsonScalarExpr": "json_scalar",
    "JsonSerializeExpr": "json_serialize",
    "JsonObjectConstructor": "json_object",
    "JsonArrayConstructor": "json_array",
    "JsonArrayQueryConstructor": "json_array",
    "JsonObjectAgg": "json_objectagg",
    "JsonArrayAgg": "json_arrayagg",
}


def _figure(node: Any) -> tuple[str, int]:
    """PostgreSQL's FigureColname: the output name of an unnamed target, and how sure."""
    wrapped = _wrapped(node)
    if wrapped is None:
        return "?column?", 0
    kind, body = wrapped
    if kind == "ColumnRef":
        last = ""
        for item in body.get("fields") or ():
            last = _sval(item) or last  # the last name, ignoring "*"
        return (last, 2) if last else ("?column?", 0)
    if kind == "A_Indirection":
        last = ""
        for item in body.get("indirection") or ():
            last = _sval(item) or last
        return (last, 2) if last else _figure(body.get("arg"))
    if kind == "FuncCall":
        names = _snames(body.get("funcname"))
        return (names[-1], 2) if names else ("?column?", 0)
    if kind == "A_Expr":
        return ("nullif", 2) if body.get("kind") == "AEXPR_NULLIF" else ("?column?", 0)
    if kind == "TypeCast":
        name, strength = _figure(body.get("arg"))
        if strength <= 1:
            typenames = _snames((body.get("typeName") or {}).get("names"))
            if typenames:
                return typenames[-1], 1
        return name, strength
    if kind == "CollateClause":
        return _figure(body.get("arg"))
    if kind == "SubLink":
        link = body.get("subLinkType")
        if link == "EXISTS_SUBLINK":
            return "exists", 2
        if link == "ARRAY_SUBLINK":
            return "array", 2
        if link in ("EXPR_SUBLINK", "MULTIEXPR_SUBLINK"):
            return _first_output_name(body.get("subselect")), 2
        return "?column?", 0
    if kind == "CaseExpr":
        name, strength = _figure(body.get("defresult"))
        return ("case", 1) if strength <= 1 else (name, strength)
    if kind == "MinMaxExpr":
        return ("greatest" if body.get("op") == "IS_GREATEST" else "least"), 2
    if kind == "SQLValueFunction":
        svf = _SVF_NAMES.get(str(body.get("op")))
        return (svf, 2) if svf else ("?column?", 0)
    if kind == "XmlExpr":
        xml = _XML_NAMES.get(str(body.get("op")))
        return (xml, 2) if xml else ("?column?", 0)
    if kind == "JsonFuncExpr":
        fn = _JSON_FUNC_NAMES.get(str(body.get("op")))
        return (fn, 2) if fn else ("?column?", 0)
    fixed = _FIXED_NAMES.get(kind)
    return (fixed, 2) if fixed else ("?column?", 0)


def _expands(val: Any) -> bool:
    """``(expr).*`` in a target list: expands into every field of a composite value."""
    ind = val.get("A_Indirection") if type(val) is dict else None
    if ind is None:
        return False
    indirection: list[Any] = ind.get("indirection") or []
    return bool(indirection) and "A_Star" in indirection[-1]


def _first_output_name(select: Any) -> str:
    wrapped = _wrapped(select)
    if wrapped is None or wrapped[0] != "SelectStmt":
        return "?column?"
    body = wrapped[1]
    while body.get("op", "SETOP_NONE") != "SETOP_NONE" and body.get("larg"):
        body = body["larg"]
    if body.get("valuesLists"):
        return "column1"
    targets = body.get("targetList") or ()
    if not targets:
        return "?column?"
    rt = targets[0].get("ResTarget", {})
    return str(rt.get("name") or _figure(rt.get("val"))[0])


def _copy_options(options: Iterable[Any]) -> CopyOptions:
    fmt = "text"
    text: dict[str, str | None] = {"delimiter": None, "null": None, "quote": None, "escape": None}
    header = False
    for item in options:
        elem = item.get("DefElem") if type(item) is dict else None
        if not elem:
            continue
        name = str(elem.get("defname", "")).lower()
        arg = _wrapped(elem.get("arg"))
        value: object = None
        if arg is not None:
            kind, inner = arg
            if kind == "String":
                value = str(inner.get("sval", ""))
            elif kind == "Boolean":
                value = bool(inner.get("boolval", False))
            elif kind == "Integer":
                value = int(inner.get("ival", 0))
        if name == "format" and value is not None:
            fmt = str(value).lower()
        elif name in text and value is not None:
            text[name] = str(value)
        elif name == "header":
            if value is None or isinstance(value, bool):
                header = value is None or value
            elif isinstance(value, int):
                header = value != 0
            else:
                header = str(value).lower() not in ("false", "off", "0", "f", "n", "no")
    return CopyOptions(fmt, text["delimiter"], text["null"], text["quote"], text["escape"], header)


# --------------------------------------------------------------------------- the analyser

_CUT = object()  # a body not analysed because of recursion / depth


class _Analyser:
    """Walks one statement (or one view definition / function body) and keeps what it
    reads, writes and calls."""

    __slots__ = (
        "active",
        "budget",
        "cache",
        "calls",
        "catalog",
        "cuts",
        "depth",
        "in_body",
        "path",
        "reads",
        "reads_opaque",
        "renames",
        "writes",
    )

    def __init__(
        self,
        catalog: CatalogSnapshot,
        path: tuple[str, ...],
        cache: _Cache,
        active: frozenset[tuple[str, int]] = frozenset(),
        depth: int = 0,
        in_body: bool = False,
        budget: list[int] | None = None,
    ) -> None:
        self.catalog = catalog
        self.path = path
        self.cache = cache
        self.active = active  # views / functions being expanded (cycle guard)
        self.depth = depth
        self.in_body = in_body  # a SQL function body: unresolved names are its parameters
        self.reads: set[str] = set()
        self.reads_opaque = False
        self.calls: dict[str, None] = {}
        self.writes: list[WriteFlow] = []
        self.renames: dict[str, None] = {}
        # active objects (or "depth") that cut this analysis short: results depending on
        # them are not cached
        self.cuts: set[tuple[str, int]] = set()
        # query blocks left to analyse, shared with nested analysers: nested recursive CTEs
        # iterate inside each other, and a hostile statement must not make that explode
        self.budget = [_MAX_QUERY_BLOCKS] if budget is None else budget

    # ---- bookkeeping

    def read(self, lin: ColumnLineage) -> None:
        if lin.sources:
            self.reads.update(lin.sources)
        if lin.opaque:
            self.reads_opaque = True

    def opaque_call(self, qualified: str) -> None:
        self.calls[qualified] = None
        self.reads_opaque = True

    def absorb(self, summary: _Summary, taint: ColumnLineage) -> None:
        """Take over what a view / function body reads, calls and writes."""
        self.reads.update(summary.reads)
        if summary.reads_opaque:
            self.reads_opaque = True
        for call in summary.calls:
            self.calls[call] = None
        for flow in summary.writes:
            if taint is not CLEAN:
                flow = WriteFlow(flow.target, _union((flow.lineage, taint)))
            self.writes.append(flow)
        for name in summary.renames:
            self.renames[name] = None

    def creation_schema(self, temporary: bool) -> str:
        if temporary:
            return "pg_temp"
        for schema in self.path:
            if schema != "pg_catalog" and not schema.startswith("pg_temp"):
                return schema
        return "?"

    def qualify(self, rv: Node) -> str:
        """The qualified name of an existing relation (written name when unknown)."""
        schema = rv.get("schemaname")
        name = str(rv.get("relname", ""))
        info = self.catalog.relation(schema, name, self.path)
        if info is not None:
            return info.qualified
        return f"{schema or self.creation_schema(False)}.{name}"

    # ---- relations

    def relation_rel(self, info: RelationInfo) -> _Rel:
        if info.kind in _VIEW_KINDS:
            summary = self.view(info)
            self.absorb(summary, CLEAN)
            return summary.rel
        rel = self.cache.tables.get(info.oid)
        if rel is None:
            rel = self.cache.tables[info.oid] = _table_rel(info)
        return rel

    def _summarise(
        self,
        sub: _Analyser,
        rel: _Rel,
        out: ColumnLineage,
        key: tuple[str, int],
        cache: dict[_K, _Summary],
        cache_key: _K,
    ) -> _Summary:
        """The summary of a view or function body analysed by ``sub``; cached unless the
        analysis was cut short by a cycle still open above it."""
        summary = _Summary(
            rel,
            out,
            frozenset(sub.reads),
            sub.reads_opaque,
            tuple(sub.calls),
            tuple(sub.writes),
            tuple(sub.renames),
        )
        cuts = sub.cuts - {key}
        self.cuts |= cuts
        if not cuts:
            cache[cache_key] = summary
        return summary

    def view(self, info: RelationInfo) -> _Summary:
        cached = self.cache.views.get(info.oid)
        if cached is not None:
            return cached
        key = ("v", info.oid)
        opaque = _Rel(info.columns, (OPAQUE,) * len(info.columns), system=info.kind == "m")
        if key in self.active or self.depth >= _MAX_DEPTH:
            self.cuts.add(key if key in self.active else ("depth", 0))
            return _Summary(opaque, OPAQUE, frozenset(), True, (), (), ())
        sub = _Analyser(
            self.catalog,
            self.catalog.definition_search_path,
            self.cache,
            self.active | {key},
            self.depth + 1,
            budget=self.budget,
        )
        defined: _Rel | None = None
        if info.definition:
            try:
                stmts = _parse(info.definition)
            except AnalysisError:
                stmts = []
            item = _wrapped(stmts[0].get("stmt")) if len(stmts) == 1 else None
            if item is not None and item[0] == "SelectStmt":
                defined = sub.select(item[1], None)
        if defined is None:
            rel = opaque
            sub.reads_opaque = True
        else:
            cols: list[ColumnLineage] = []
            for i, column in enumerate(info.columns):
                lin = defined.at(i) or OPAQUE
                cols.append(
                    ColumnLineage(
                        lin.sources | {f"{info.qualified}.{column}"}, lin.direct, lin.opaque
                    )
                )
            rel = _Rel(info.columns, tuple(cols), system=info.kind == "m")
        return self._summarise(sub, rel, CLEAN, key, self.cache.views, info.oid)

    def target(self, rv: Node) -> _Target:
        schema = rv.get("schemaname")
        name = str(rv.get("relname", ""))
        alias = (rv.get("alias") or {}).get("aliasname")
        info = self.catalog.relation(schema, name, self.path)
        if info is None:
            qualified = f"{schema or self.creation_schema(rv.get('relpersistence') == 't')}.{name}"
            return _Target(alias or name, None, qualified, _UNKNOWN_REL, bool(alias))
        return _Target(alias or name, info, info.qualified, self.relation_rel(info), bool(alias))

    def write(self, target: _Target, column: str, lin: ColumnLineage) -> None:
        self.writes.append(WriteFlow(f"{target.qualified}.{column}", lin))
        info = target.info
        names = target.rel.names
        if info is not None and info.kind == "v" and names is not None and column in names:
            # an auto-updatable view writes into the base column it is direct over
            own = f"{target.qualified}.{column}"
            view_col = target.rel.cols[names.index(column)]
            if view_col.direct:
                for source in sorted(view_col.sources):
                    if source != own:
                        self.writes.append(WriteFlow(source, lin))

    def write_outputs(self, qualified: str, rel: _Rel, colnames: Sequence[str]) -> None:
        """CREATE TABLE AS / SELECT INTO / CREATE MATERIALIZED VIEW: rel's columns into a new
        relation."""
        if rel.names is not None:
            names = (*colnames[: len(rel.names)], *rel.names[len(colnames) :])
            for name, lin in zip(names, rel.cols, strict=False):
                self.writes.append(WriteFlow(f"{qualified}.{name}", lin))
            return
        named = min(len(colnames), len(rel.cols))
        for i in range(named):
            self.writes.append(WriteFlow(f"{qualified}.{colnames[i]}", rel.cols[i]))
        self.writes.append(WriteFlow(f"{qualified}.*", _union((*rel.cols[named:], rel.rest))))

    # ---- column references

    def items_named(self, names: Sequence[str], scope: _Scope) -> list[_Item]:
        """FROM items a qualifier refers to (innermost level that has any)."""
        level: _Scope | None = scope
        if len(names) == 1:
            name = names[0]
            while level is not None:
                found = [i for i in level.items if i.rel_visible and i.name == name]
                if found:
                    return found
                level = level.parent
            return []
        schema, relname = names[-2], names[-1]
        while level is not None:
            found = [
                i
                for i in level.items
                if i.rel_visible
                and i.relation is not None
                and i.relation.schema == schema
                and i.relation.name == relname
            ]
            if found:
                return found
            level = level.parent
        return []

    def item_column(self, item: _Item, column: str) -> ColumnLineage:
        rel = item.rel
        names = rel.names
        if names is None:
            return rel.whole()
        if column in names:
            hits = [c for n, c in zip(names, rel.cols, strict=False) if n == column]
            return hits[0] if len(hits) == 1 else _union(hits)
        if rel.system and column in _SYSTEM_COLUMNS:
            return CLEAN
        # functional notation: t.f is f(t)
        return self.call([column], [rel.whole()])[0]

    def unqualified(self, name: str, scope: _Scope, fallback: bool = True) -> ColumnLineage | None:
        possible: list[ColumnLineage] = []
        level: _Scope | None = scope
        while level is not None:
            found: list[ColumnLineage] = []
            for item in level.items:
                if not item.cols_visible:
                    continue
                rel = item.rel
                names = rel.names
                if names is None:
                    possible.append(rel.whole())  # it may have a column of that name
                elif name in names:
                    if names.count(name) == 1:
                        found.append(rel.cols[names.index(name)])
                    else:  # a subquery with two outputs of that name: ambiguous
                        found.extend(c for n, c in zip(names, rel.cols, strict=False) if n == name)
                elif rel.system and name in _SYSTEM_COLUMNS:
                    found.append(CLEAN)
            if found:
                if len(found) == 1 and not possible:
                    return found[0]
                return _union((*found, *possible))
            level = level.parent
        # not a column: a whole-row reference to a FROM item
        items = self.items_named((name,), scope)
        if items:
            return _union((*possible, *(i.rel.whole() for i in items)))
        if possible:
            return _union(possible)
        return self.unresolved(scope) if fallback else None

    def unresolved(self, scope: _Scope) -> ColumnLineage:
        """A name that matches nothing: in a SQL function body it is a parameter (the
        arguments are added to the result anyway), but it could also be a column the
        analyser named differently: the union of everything visible. Elsewhere: OPAQUE."""
        if not self.in_body:
            return OPAQUE
        parts: list[ColumnLineage] = []
        level: _Scope | None = scope
        while level is not None:
            parts.extend(i.rel.whole() for i in level.items if i.cols_visible)
            level = level.parent
        return _union(parts)

    def column(self, names: list[str], scope: _Scope) -> ColumnLineage:
        n = len(names)
        if n == 1:
            return self.unqualified(names[0], scope) or OPAQUE
        if n == 2:
            items = self.items_named(names[:1], scope)
            if items:
                return self._columns_of(items, names[1])
            # composite column . field
            return _indirect(self.unqualified(names[0], scope) or OPAQUE)
        # schema.table.column, or table.column.field (database.… with 4 names)
        items = self.items_named(names[-3:-1], scope)
        if items:
            return self._columns_of(items, names[-1])
        items = self.items_named(names[-4:-2] if n >= 4 else names[:1], scope)
        if items:
            return _indirect(self._columns_of(items, names[-2]))
        return self.unresolved(scope)

    def _columns_of(self, items: list[_Item], column: str) -> ColumnLineage:
        if len(items) == 1:
            return self.item_column(items[0], column)
        return _union(self.item_column(i, column) for i in items)

    def whole_row(self, names: list[str], scope: _Scope) -> ColumnLineage:
        if not names:
            return _union(i.rel.whole() for i in scope.items if i.cols_visible)
        items = self.items_named(names[-2:] if len(names) > 1 else names, scope)
        if not items:
            return self.unresolved(scope)
        return _union(i.rel.whole() for i in items)

    def star(self, names: list[str], scope: _Scope) -> list[_Rel]:
        """The relations ``*`` / ``t.*`` expands to, in order."""
        if not names:
            return [i.rel for i in scope.items if i.cols_visible]
        items = self.items_named(names[-2:] if len(names) > 1 else names, scope)
        if not items:
            return [_Rel(None, (), self.unresolved(scope))]
        return [i.rel for i in items]

    # ---- expressions

    def expr(self, node: Any, scope: _Scope) -> ColumnLineage:
        """The lineage of a (wrapped) expression node; lists give the union."""
        t = type(node)
        if t is dict:
            for kind, body in node.items():
                # node type names are capitalised, field names (of unwrapped nodes) are not
                handler = _EXPR.get(kind)
                if handler is not None:
                    return handler(self, body, scope)
                if len(node) == 1 and type(body) is dict and kind[:1].isupper():
                    return self.generic(kind, body, scope)
                break
            return self.generic("?", node, scope)
        if t is list:
            if len(node) == 1:
                return _indirect(self.expr(node[0], scope))
            return _union([self.expr(item, scope) for item in node])
        return CLEAN

    def node(self, kind: str, body: Node, scope: _Scope) -> ColumnLineage:
        handler = _EXPR.get(kind)
        if handler is not None:
            return handler(self, body, scope)
        return self.generic(kind, body, scope)

    def generic(self, kind: str, body: Node, scope: _Scope) -> ColumnLineage:
        """Any other node: the union of everything inside it."""
        if kind == "?" and "relname" in body:
            self.reads_opaque = True
            return OPAQUE  # a relation where an expression was expected
        typed = _TYPED.get(kind)
        parts: list[ColumnLineage] = []
        for field_name, value in body.items():
            t = type(value)
            if t is dict:
                target = typed.get(field_name) if typed is not None else None
                lin = self.node(target, value, scope) if target else self.expr(value, scope)
            elif t is list:
                lin = self.expr(value, scope)
            else:
                continue
            if lin is not CLEAN:
                parts.append(lin)
        return _union(parts)

    def _e_clean(self, body: Node, scope: _Scope) -> ColumnLineage:
        return CLEAN

    def _e_opaque(self, body: Node, scope: _Scope) -> ColumnLineage:
        self.reads_opaque = True
        return OPAQUE

    def _e_column_ref(self, body: Node, scope: _Scope) -> ColumnLineage:
        names, star = column_ref_names(body)
        lin = self.whole_row(names, scope) if star else self.column(names, scope)
        self.read(lin)
        return lin

    def _e_a_expr(self, body: Node, scope: _Scope) -> ColumnLineage:
        left = body.get("lexpr")
        right = self.expr(body.get("rexpr"), scope)
        lin = _indirect(right) if left is None else _union2(self.expr(left, scope), right)
        operator: list[Any] = body.get("name") or []
        if len(operator) > 1 and _sval(operator[0]) != "pg_catalog":
            # OPERATOR(schema.op): a user operator, whose function may read anything
            self.reads_opaque = True
            return OPAQUE
        return lin

    def _e_args(self, body: Node, scope: _Scope) -> ColumnLineage:
        # BoolExpr, RowExpr, CoalesceExpr, MinMaxExpr: the union of their arguments
        return self.expr(body.get("args"), scope)

    def _e_arg(self, body: Node, scope: _Scope) -> ColumnLineage:
        # TypeCast, CollateClause, NullTest, BooleanTest: derived from their argument
        return _indirect(self.expr(body.get("arg"), scope))

    def _e_list(self, body: Node, scope: _Scope) -> ColumnLineage:
        return self.expr(body.get("items"), scope)

    def _e_func_call(self, body: Node, scope: _Scope) -> ColumnLineage:
        return self.func_call(body, scope)[0]

    def _e_sub_link(self, body: Node, scope: _Scope) -> ColumnLineage:
        link = body.get("subLinkType")
        sub = self.query(body.get("subselect"), scope) or _UNKNOWN_REL
        if link == "EXISTS_SUBLINK":
            return CLEAN  # row existence is not a column value
        if link == "EXPR_SUBLINK":
            if sub.names is not None and len(sub.cols) == 1:
                return sub.cols[0]
            return sub.whole()
        test = body.get("testexpr")
        if test is None:
            return sub.whole()
        return _union((self.expr(test, scope), sub.whole()))

    def _e_select(self, body: Node, scope: _Scope) -> ColumnLineage:
        # a query inside an expression (JSON_ARRAY(SELECT …), …)
        return self.select(body, scope).whole()

    # ---- functions

    def func_call(
        self, body: Node, scope: _Scope
    ) -> tuple[ColumnLineage, tuple[ColumnLineage, ...] | None]:
        names = _snames(body.get("funcname"))
        args = [self.expr(arg, scope) for arg in body.get("args") or ()]
        # aggregate ORDER BY / FILTER and window clauses are read, not returned
        for key in ("agg_order", "agg_filter"):
            extra = body.get(key)
            if extra is not None:
                self.expr(extra, scope)
        over = body.get("over")
        if over:
            self.generic("WindowDef", over, scope)
        return self.call(names, args)

    def call(
        self, names: list[str], args: list[ColumnLineage]
    ) -> tuple[ColumnLineage, tuple[ColumnLineage, ...] | None]:
        """The result of calling ``names`` (and, for SQL functions, its output columns by
        position)."""
        name = names[-1] if names else ""
        schema = names[-2] if len(names) > 1 else None
        candidates = self.catalog.functions(schema, name, self.path)
        if not candidates or name in _SQL_TEXT_FUNCTIONS or name.startswith(_SQL_TEXT_PREFIXES):
            if candidates:
                for fn in candidates:
                    self.opaque_call(fn.qualified)
            else:
                self.opaque_call(f"{schema or self.creation_schema(False)}.{name}")
            return OPAQUE, None
        if name == "count" and all(fn.builtin for fn in candidates):
            return CLEAN, None
        arg = _union(args)
        parts = [arg]
        positional: tuple[ColumnLineage, ...] | None = None
        opaque = False
        for fn in candidates:
            if fn.builtin:
                continue
            summary = self.body(fn) if fn.language == "sql" and fn.body else None
            if isinstance(summary, _Summary):
                self.absorb(summary, arg)
                parts.append(summary.out)
                if len(candidates) == 1:
                    positional = tuple(_union((arg, c)) for c in summary.rel.cols)
                continue
            opaque = True
            if summary is _CUT:
                self.reads_opaque = True  # recursion: the body is being analysed already
            else:
                self.opaque_call(fn.qualified)  # code the analyser does not see
        if opaque:
            return OPAQUE, None
        return _union(parts), positional

    def body(self, fn: FunctionInfo) -> _Summary | object | None:
        """The analysed body of a SQL function; _CUT when the function is already being
        analysed (recursion), None when its body cannot be analysed (unparsable, too deep)."""
        if fn.body_search_path is not None:
            try:
                path = effective_search_path(fn.body_search_path, "")
            except ValueError:
                return None
        else:
            path = self.path
        key = ("f", fn.oid)
        if key in self.active:
            self.cuts.add(key)
            return _CUT
        cached = self.cache.bodies.get((fn.oid, path))
        if cached is not None:
            return cached
        if self.depth >= _MAX_DEPTH:
            self.cuts.add(("depth", 0))
            return None
        try:
            stmts = _parse(fn.body or "")
        except AnalysisError:
            return None
        sub = _Analyser(
            self.catalog, path, self.cache, self.active | {key}, self.depth + 1, True, self.budget
        )
        shapes: list[_Shape] = []
        for raw in stmts:
            item = _wrapped(raw.get("stmt"))
            if item is not None:
                shapes.append(sub.statement(*item))
        outputs: list[ColumnLineage] = []
        last: _Shape | None = None
        for shape in shapes:
            if shape.reference is not None:
                outputs.append(OPAQUE)  # FETCH / EXECUTE of something unseen
            if shape.returns_rows:
                outputs.extend(shape.columns or ())
                outputs.append(shape.rest)
                last = shape
        out = _union(outputs)
        if last is not None and last.columns:
            # the last statement's columns by position; earlier outputs taint every one
            others = _union(
                o for s in shapes if s is not last for o in (*(s.columns or ()), s.rest)
            )
            rel = _Rel(None, tuple(_union((c, others)) for c in last.columns), out)
        else:
            rel = _Rel(None, (), out)
        return self._summarise(sub, rel, out, key, self.cache.bodies, (fn.oid, path))

    # ---- queries

    def query(self, node: Any, scope: _Scope | None) -> _Rel | None:
        """The result columns of a (wrapped) query: SELECT, or DML (its RETURNING list)."""
        wrapped = _wrapped(node)
        if wrapped is None:
            return None
        kind, body = wrapped
        if kind == "SelectStmt":
            return self.select(body, scope)
        if kind in _DML:
            return self.dml(kind, body, scope) or _EMPTY_REL
        return None

    def select(self, body: Node, parent: _Scope | None) -> _Rel:
        budget = self.budget
        budget[0] -= 1
        if budget[0] < 0:
            raise AnalysisError("statement is too complex to analyse")
        scope = _Scope(parent)
        wc = body.get("withClause")
        if wc is not None:
            self.with_clause(wc, scope)
        op = body.get("op")
        if op is not None and op != "SETOP_NONE":
            rel = _setop(self.select(body["larg"], scope), self.select(body["rarg"], scope))
            outputs = _Scope(scope)
            outputs.items.append(_Item(None, rel))
            self.order(body.get("sortClause"), rel, outputs)
            self.reads_only(body, ("limitOffset", "limitCount"), outputs)
            return rel
        values = body.get("valuesLists")
        if values:
            rel = self.values(values, scope)
            self.order(body.get("sortClause"), rel, scope)
            self.reads_only(body, ("limitOffset", "limitCount"), scope)
            return rel
        from_clause = body.get("fromClause")
        if from_clause:
            for item in from_clause:
                self.from_item(item, scope)
        rel = self.targets(body.get("targetList") or (), scope)
        # WHERE, GROUP BY, HAVING, WINDOW, ORDER BY, DISTINCT ON, LIMIT: read, not returned
        for key, value in body.items():
            how = _SELECT_READS.get(key)
            if how is None:
                continue
            if how == 0:
                self.expr(value, scope)
            elif how == 1:
                for item in value:
                    self.order_expr(item, rel, scope)
            else:
                self.order(value, rel, scope)
        return rel

    def reads_only(self, body: Node, keys: Sequence[str], scope: _Scope) -> None:
        for key in keys:
            value = body.get(key)
            if value is not None:
                self.expr(value, scope)

    def order(self, sort: list[Any] | None, rel: _Rel, scope: _Scope) -> None:
        for item in sort or ():
            sortby = item.get("SortBy") if type(item) is dict else None
            if sortby is None:
                self.expr(item, scope)
            else:
                self.order_expr(sortby.get("node"), rel, scope)

    def order_expr(self, node: Any, rel: _Rel, scope: _Scope) -> None:
        """ORDER BY / GROUP BY / DISTINCT ON item: a bare name may be an output column."""
        ref = node.get("ColumnRef") if type(node) is dict else None
        if ref is not None and rel.names is not None:
            fields: list[Any] = ref.get("fields") or []
            name = _sval(fields[0]) if len(fields) == 1 else ""
            if name and name in rel.names:
                for n, lin in zip(rel.names, rel.cols, strict=False):
                    if n == name:
                        self.read(lin)
                found = self.unqualified(name, scope, fallback=False)
                if found is not None:
                    self.read(found)
                return
        self.expr(node, scope)

    def values(self, rows: list[Any], scope: _Scope) -> _Rel:
        lists = [row.get("List", {}).get("items") or () for row in rows]
        width = max(len(row) for row in lists)
        columns: list[list[ColumnLineage]] = [[] for _ in range(width)]
        for row in lists:
            for i, value in enumerate(row):
                columns[i].append(self.expr(value, scope))
        names = tuple(f"column{i + 1}" for i in range(width))
        return _Rel(names, tuple(_union(col) for col in columns))

    def targets(self, targets: Sequence[Any], scope: _Scope) -> _Rel:
        names: list[str] = []
        cols: list[ColumnLineage] = []
        tail: list[ColumnLineage] | None = None  # once the column count is unknown
        for item in targets:
            rt = item.get("ResTarget") or {}
            val = rt.get("val")
            ref = val.get("ColumnRef") if type(val) is dict else None
            if ref is not None:
                fields = ref.get("fields") or ()
                if fields and "A_Star" not in fields[-1]:
                    lin = self._e_column_ref(ref, scope)
                    if tail is not None:
                        tail.append(lin)
                    else:
                        names.append(rt.get("name") or _sval(fields[-1]))
                        cols.append(lin)
                    continue
                if fields:
                    for rel in self.star(_snames(fields[:-1]), scope):
                        for lin in rel.cols:
                            self.read(lin)
                        if rel.names is None:
                            self.read(rel.rest)
                        if tail is not None:
                            tail.append(rel.whole())
                            continue
                        cols.extend(rel.cols)
                        if rel.names is None:
                            tail = [rel.rest]
                        else:
                            names.extend(rel.names)
                    continue
            lin = self.expr(val, scope)
            if _expands(val):
                # (composite).*: as many columns as the composite has, unknown here
                if tail is None:
                    tail = []
                tail.append(lin)
                continue
            if tail is not None:
                tail.append(lin)
                continue
            names.append(rt.get("name") or _figure(val)[0])
            cols.append(lin)
        if tail is not None:
            return _Rel(None, tuple(cols), _union(tail))
        return _Rel(tuple(names), tuple(cols))

    # ---- WITH

    def with_clause(self, wc: Node, scope: _Scope) -> None:
        ctes: dict[str, _Rel] = {}
        scope.ctes = ctes
        entries = [item.get("CommonTableExpr", {}) for item in wc.get("ctes") or ()]
        recursive = bool(wc.get("recursive"))
        if recursive:
            # any CTE of a RECURSIVE list may refer to any other: unknown until analysed
            for cte in entries:
                ctes[str(cte.get("ctename", ""))] = _UNKNOWN_REL
        for cte in entries:
            name = str(cte.get("ctename", ""))
            ctes[name] = self.cte(cte, name, scope, recursive)

    def cte(self, cte: Node, name: str, scope: _Scope, recursive: bool) -> _Rel:
        colnames = _snames(cte.get("aliascolnames"))
        query = cte.get("ctequery")
        wrapped = _wrapped(query)
        if recursive and wrapped is not None and wrapped[0] == "SelectStmt":
            body = wrapped[1]
            assert scope.ctes is not None
            if body.get("op") == "SETOP_UNION" and body.get("larg"):
                # start from the non-recursive term, iterate the whole query to a fixpoint
                # (lineage only grows, direct only falls)
                approx = self.select(body["larg"], scope).renamed(colnames)
                for _ in range(_MAX_ITERATIONS):
                    scope.ctes[name] = approx
                    step = _setop(approx, self.select(body, scope).renamed(colnames))
                    if step == approx:
                        break
                    approx = step
                else:
                    approx = _Rel(approx.names, (OPAQUE,) * len(approx.cols), OPAQUE)
                    self.reads_opaque = True
                rel = approx
            else:
                rel = self.select(body, scope).renamed(colnames)
        else:
            rel = (self.query(query, scope) or _UNKNOWN_REL).renamed(colnames)
        search = cte.get("search_clause")
        if search:
            lin = _union(self.item_lookup(rel, c) for c in _snames(search.get("search_col_list")))
            rel = _concat((rel, _Rel((str(search.get("search_seq_column", "")),), (lin,))))
        cycle = cte.get("cycle_clause")
        if cycle:
            lin = _union(self.item_lookup(rel, c) for c in _snames(cycle.get("cycle_col_list")))
            extra = (
                str(cycle.get("cycle_mark_column", "")),
                str(cycle.get("cycle_path_column", "")),
            )
            rel = _concat((rel, _Rel(extra, (CLEAN, lin))))
        return rel

    @staticmethod
    def item_lookup(rel: _Rel, column: str) -> ColumnLineage:
        if rel.names is None or column not in rel.names:
            return rel.whole()
        return rel.cols[rel.names.index(column)]

    # ---- FROM

    def from_item(self, node: Any, scope: _Scope) -> _Item:
        """Add a FROM element to ``scope``; returns its namespace item."""
        wrapped = _wrapped(node)
        kind, body = wrapped if wrapped is not None else ("?", {})
        if kind == "JoinExpr":
            return self.join(body, scope)
        if kind == "RangeTableSample":
            item = self.from_item(body.get("relation"), scope)
            self.reads_only(body, ("args", "repeatable"), scope)
            return item
        if kind == "RangeVar":
            item = self.range_var(body, scope)
        elif kind == "RangeSubselect":
            # a subquery sees the earlier FROM items only when LATERAL
            parent = scope if body.get("lateral") else _Scope(scope.parent, scope.ctes)
            rel = self.query(body.get("subquery"), parent) or _UNKNOWN_REL
            name, rel = _alias(rel, body.get("alias"), None)
            item = _Item(name, rel)
        elif kind == "RangeFunction":
            item = self.range_function(body, scope)
        elif kind == "RangeTableFunc":
            item = self.xmltable(body, scope)
        elif kind == "JsonTable":
            lin = self.generic("JsonTable", body, scope)
            name, rel = _alias(_Rel(None, (), lin), body.get("alias"), None)
            item = _Item(name, rel)
        else:
            self.reads_opaque = True
            name, rel = _alias(_UNKNOWN_REL, body.get("alias"), None)
            item = _Item(name, rel)
        scope.items.append(item)
        return item

    def range_var(self, body: Node, scope: _Scope) -> _Item:
        schema = body.get("schemaname")
        name = str(body.get("relname", ""))
        alias = body.get("alias")
        if schema is None:
            cte = scope.cte(name)  # CTE names shadow relations
            if cte is not None:
                ref, rel = _alias(cte, alias, name)
                if cte is _UNKNOWN_REL:
                    self.reads_opaque = True
                return _Item(ref, rel)
        info = self.catalog.relation(schema, name, self.path)
        if info is None:
            self.reads_opaque = True
            ref, rel = _alias(_UNKNOWN_REL, alias, name)
            return _Item(ref, rel)
        ref, rel = _alias(self.relation_rel(info), alias, name)
        return _Item(ref, rel, info if not alias else None)

    def join(self, body: Node, scope: _Scope) -> _Item:
        start = len(scope.items)
        left = self.from_item(body.get("larg"), scope)
        right = self.from_item(body.get("rarg"), scope)
        quals = body.get("quals")
        if quals is not None:
            self.expr(quals, scope)
        lrel, rrel = left.rel, right.rel
        using = _snames(body.get("usingClause"))
        natural = bool(body.get("isNatural"))
        if natural and lrel.names is not None and rrel.names is not None:
            using = [n for n in lrel.names if n in rrel.names]
        rel = _join_rel(lrel, rrel, using, natural)
        alias = body.get("alias")
        # the inputs stay usable as qualifiers (unless the join has an alias); their columns
        # are reached through the join's own columns
        for item in scope.items[start:]:
            item.cols_visible = False
            if alias:
                item.rel_visible = False
        name, rel = _alias(rel, alias, None)
        item = _Item(name, rel, None, rel_visible=name is not None)
        scope.items.append(item)
        using_alias = body.get("join_using_alias")
        if using_alias and rel.names is not None and using:
            merged = _Rel(tuple(using), rel.cols[: len(using)])
            scope.items.append(_Item(using_alias.get("aliasname"), merged, None, True, False))
        return item

    def range_function(self, body: Node, scope: _Scope) -> _Item:
        parts: list[_Rel] = []
        rows_from = bool(body.get("is_rowsfrom"))
        for entry in body.get("functions") or ():
            items = (entry.get("List") or {}).get("items") or ()
            if not items:
                continue
            fnode = items[0]
            wrapped = _wrapped(fnode)
            positional: tuple[ColumnLineage, ...] | None = None
            if wrapped is not None and wrapped[0] == "FuncCall":
                lin, positional = self.func_call(wrapped[1], scope)
            else:
                lin = self.expr(fnode, scope)
            coldefs: Sequence[Any] = ()
            if rows_from and len(items) > 1 and items[1]:
                coldefs = (items[1].get("List") or {}).get("items") or ()
            elif not rows_from:
                coldefs = body.get("coldeflist") or ()
            defnames = [str(c.get("ColumnDef", {}).get("colname", "")) for c in coldefs]
            if defnames:
                cols = tuple(
                    positional[i] if positional is not None and i < len(positional) else lin
                    for i in range(len(defnames))
                )
                parts.append(_Rel(tuple(defnames), cols))
            else:
                parts.append(_Rel(None, positional or (), lin))
        if body.get("ordinality"):
            parts.append(_Rel(("ordinality",), (CLEAN,)))
        name, rel = _alias(_concat(parts), body.get("alias"), None)
        return _Item(name, rel)

    def xmltable(self, body: Node, scope: _Scope) -> _Item:
        arg = _union(
            (
                self.expr(body.get("docexpr"), scope),
                self.expr(body.get("rowexpr"), scope),
                self.expr(body.get("namespaces"), scope),
            )
        )
        names: list[str] = []
        cols: list[ColumnLineage] = []
        for entry in body.get("columns") or ():
            col = entry.get("RangeTableFuncCol") or {}
            names.append(str(col.get("colname", "")))
            if col.get("for_ordinality"):
                cols.append(CLEAN)
            else:
                cols.append(
                    _union(
                        (
                            arg,
                            self.expr(col.get("colexpr"), scope),
                            self.expr(col.get("coldefexpr"), scope),
                        )
                    )
                )
        name, rel = _alias(_Rel(tuple(names), tuple(cols)), body.get("alias"), None)
        return _Item(name, rel)

    # ---- data-modifying statements

    def dml(self, kind: str, body: Node, parent: _Scope | None) -> _Rel | None:
        """Collect the writes of INSERT / UPDATE / DELETE / MERGE; its RETURNING columns (None
        without RETURNING)."""
        scope = _Scope(parent)
        wc = body.get("withClause")
        if wc is not None:
            self.with_clause(wc, scope)
        target = self.target(body.get("relation") or {})
        if kind == "InsertStmt":
            return self.insert(body, scope, target)
        if kind == "UpdateStmt":
            return self.update(body, scope, target)
        if kind == "DeleteStmt":
            scope.items.append(target.item())
            for item in body.get("usingClause") or ():
                self.from_item(item, scope)
            self.reads_only(body, ("whereClause",), scope)
            return self.returning(body, scope, scope.items[1:], target, target.rel)
        return self.merge(body, scope, target)

    def insert(self, body: Node, scope: _Scope, target: _Target) -> _Rel | None:
        columns: list[tuple[str, bool]] | None
        if body.get("cols"):
            columns = []
            for item in body["cols"]:
                rt = item.get("ResTarget") or {}
                indirection = rt.get("indirection")
                if indirection:
                    self.expr(indirection, scope)
                columns.append((str(rt.get("name", "")), bool(indirection)))
        elif target.rel.names is not None:
            columns = [(name, False) for name in target.rel.names]
        else:
            columns = None
        # the SELECT / VALUES does not see the target table
        source = self.query(body.get("selectStmt"), scope)
        inserted: dict[str, ColumnLineage] = {}
        if source is not None:
            if columns is None:
                self.writes.append(WriteFlow(f"{target.qualified}.*", source.whole()))
            else:
                for i, (column, partial) in enumerate(columns):
                    lin = source.at(i)
                    if lin is None:
                        continue  # no value: the default
                    if partial:
                        lin = _indirect(lin)
                    self.write(target, column, lin)
                    inserted[column] = _merge(inserted[column], lin) if column in inserted else lin
        assigned = dict(inserted)
        conflict = body.get("onConflictClause")
        if conflict:
            cscope = _Scope(scope)
            cscope.items.append(target.item())
            names = target.rel.names
            if names is not None:
                excluded = _Rel(names, tuple(inserted.get(n, CLEAN) for n in names))
            else:
                excluded = _Rel(None, (), _union((*inserted.values(), OPAQUE)))
            cscope.items.append(_Item("excluded", excluded, None, True, False))
            infer = conflict.get("infer")
            if infer:
                self.generic("InferClause", infer, cscope)
            for column, lin in self.assignments(conflict.get("targetList") or (), cscope, target):
                assigned[column] = _merge(assigned[column], lin) if column in assigned else lin
            self.reads_only(conflict, ("whereClause",), cscope)
        return self.returning(body, scope, [], target, _stored(target.rel, assigned))

    def update(self, body: Node, scope: _Scope, target: _Target) -> _Rel | None:
        scope.items.append(target.item())
        for item in body.get("fromClause") or ():
            self.from_item(item, scope)
        assigned: dict[str, ColumnLineage] = {}
        for column, lin in self.assignments(body.get("targetList") or (), scope, target):
            assigned[column] = _merge(assigned[column], lin) if column in assigned else lin
        self.reads_only(body, ("whereClause",), scope)
        return self.returning(body, scope, scope.items[1:], target, _stored(target.rel, assigned))

    def merge(self, body: Node, scope: _Scope, target: _Target) -> _Rel | None:
        self.from_item(body.get("sourceRelation"), scope)
        source_items = list(scope.items)
        target_item = target.item()
        scope.items.append(target_item)
        self.reads_only(body, ("joinCondition",), scope)
        assigned: dict[str, ColumnLineage] = {}
        for entry in body.get("mergeWhenClauses") or ():
            when = entry.get("MergeWhenClause") or {}
            # MATCHED sees both sides, NOT MATCHED BY SOURCE the target, NOT MATCHED the source
            wscope = _Scope(scope.parent, scope.ctes)
            match = when.get("matchKind")
            if match == "MERGE_WHEN_MATCHED":
                wscope.items = list(scope.items)
            elif match == "MERGE_WHEN_NOT_MATCHED_BY_SOURCE":
                wscope.items = [target_item]
            else:
                wscope.items = list(source_items)
            self.reads_only(when, ("condition",), wscope)
            command = when.get("commandType")
            flows: list[tuple[str, ColumnLineage]] = []
            if command == "CMD_UPDATE":
                flows = self.assignments(when.get("targetList") or (), wscope, target)
            elif command == "CMD_INSERT":
                values = [self.expr(v, wscope) for v in when.get("values") or ()]
                if when.get("targetList"):
                    columns = [
                        str(rt.get("ResTarget", {}).get("name", "")) for rt in when["targetList"]
                    ]
                else:
                    columns = list(target.rel.names or ())
                    if target.rel.names is None and values:
                        self.writes.append(WriteFlow(f"{target.qualified}.*", _union(values)))
                for column, lin in zip(columns, values, strict=False):
                    self.write(target, column, lin)
                    flows.append((column, lin))
            for column, lin in flows:
                assigned[column] = _merge(assigned[column], lin) if column in assigned else lin
        return self.returning(body, scope, source_items, target, _stored(target.rel, assigned))

    def assignments(
        self, targets: Sequence[Any], scope: _Scope, target: _Target
    ) -> list[tuple[str, ColumnLineage]]:
        """SET column = value (UPDATE, ON CONFLICT DO UPDATE, MERGE): written flows."""
        out: list[tuple[str, ColumnLineage]] = []
        for item in targets:
            rt = item.get("ResTarget")
            if rt is None:
                continue
            column = str(rt.get("name", ""))
            val = rt.get("val")
            multi = val.get("MultiAssignRef") if type(val) is dict else None
            lin = self.multi_assign(multi, scope) if multi is not None else self.expr(val, scope)
            indirection = rt.get("indirection")
            if indirection:
                self.expr(indirection, scope)
                lin = _indirect(lin)  # a part of the column
            self.write(target, column, lin)
            out.append((column, lin))
        return out

    def multi_assign(self, body: Node, scope: _Scope) -> ColumnLineage:
        """(a, b) = (SELECT x, y …) / ROW(x, y): column ``colno`` of the source."""
        index = int(body.get("colno", 1)) - 1
        source = body.get("source")
        wrapped = _wrapped(source)
        if wrapped is not None and wrapped[0] == "SubLink":
            rel = self.query(wrapped[1].get("subselect"), scope) or _UNKNOWN_REL
            return rel.at(index) or OPAQUE
        if wrapped is not None and wrapped[0] == "RowExpr":
            args = wrapped[1].get("args") or ()
            if index < len(args):
                return self.expr(args[index], scope)
        return _indirect(self.expr(source, scope))

    def returning(
        self,
        body: Node,
        scope: _Scope,
        others: Sequence[_Item],
        target: _Target,
        stored: _Rel,
    ) -> _Rel | None:
        """The RETURNING list: the stored target row (and, for UPDATE FROM / DELETE USING /
        MERGE, the other FROM items), plus PostgreSQL 18's old / new rows."""
        clause = body.get("returningClause")
        if not clause:
            return None
        old_name, new_name = "old", "new"
        for option in clause.get("options") or ():
            opt = option.get("ReturningOption") or {}
            if opt.get("option") == "RETURNING_OPTION_OLD":
                old_name = str(opt.get("value") or old_name)
            else:
                new_name = str(opt.get("value") or new_name)
        rscope = _Scope(scope.parent, scope.ctes)
        stored_item = target.item(stored)
        if "sourceRelation" in body:  # MERGE: source first
            rscope.items = [*others, stored_item]
        else:
            rscope.items = [stored_item, *others]
        rscope.items.append(_Item(old_name, target.rel, None, True, False))
        rscope.items.append(_Item(new_name, stored, None, True, False))
        return self.targets(clause.get("exprs") or (), rscope)

    # ---- statements

    def statement(self, kind: str, body: Node) -> _Shape:
        handler = _STATEMENTS.get(kind)
        if handler is not None:
            return handler(self, body)
        if kind in _UTILITY:
            return _NO_ROWS
        self.reads_opaque = True  # unknown: fail closed
        return _UNKNOWN_ROWS

    def _s_select(self, body: Node) -> _Shape:
        rel = self.select(body, None)
        into = body.get("intoClause")
        if into:
            self.into(into, rel)
            return _NO_ROWS
        return _shape(rel)

    def into(self, into: Node, rel: _Rel) -> None:
        if into.get("skipData"):
            return
        rv = into.get("rel") or {}
        schema = rv.get("schemaname") or self.creation_schema(rv.get("relpersistence") == "t")
        self.write_outputs(f"{schema}.{rv.get('relname', '')}", rel, _snames(into.get("colNames")))

    def _s_dml(self, body: Node, kind: str) -> _Shape:
        rel = self.dml(kind, body, None)
        return _NO_ROWS if rel is None else _shape(rel)

    def _s_insert(self, body: Node) -> _Shape:
        return self._s_dml(body, "InsertStmt")

    def _s_update(self, body: Node) -> _Shape:
        return self._s_dml(body, "UpdateStmt")

    def _s_delete(self, body: Node) -> _Shape:
        return self._s_dml(body, "DeleteStmt")

    def _s_merge(self, body: Node) -> _Shape:
        return self._s_dml(body, "MergeStmt")

    def _s_copy(self, body: Node) -> _Shape:
        if body.get("is_from"):
            return _NO_ROWS  # data comes from the client or a file: no flows
        query = body.get("query")
        relation: str | None = None
        if query is not None:
            rel = self.query(query, None) or _UNKNOWN_REL
        else:
            rv = body.get("relation") or {}
            info = self.catalog.relation(
                rv.get("schemaname"), str(rv.get("relname", "")), self.path
            )
            if info is None:
                self.reads_opaque = True
                rel = _UNKNOWN_REL
            else:
                relation = info.qualified
                rel = self.relation_rel(info)
            columns = _snames(body.get("attlist"))
            if columns and rel.names is not None:
                rel = _Rel(tuple(columns), tuple(self.item_lookup_strict(rel, c) for c in columns))
            for lin in rel.cols:
                self.read(lin)
            self.read(rel.rest)
        if body.get("is_program") or body.get("filename") is not None:
            return _NO_ROWS  # to a server file / program: refused elsewhere, reads kept
        return _shape(rel, copy=_copy_options(body.get("options") or ()), copy_relation=relation)

    @staticmethod
    def item_lookup_strict(rel: _Rel, column: str) -> ColumnLineage:
        if rel.names is None or column not in rel.names:
            return OPAQUE
        return rel.cols[rel.names.index(column)]

    def _s_declare(self, body: Node) -> _Shape:
        rel = self.query(body.get("query"), None) or _UNKNOWN_REL
        shape = _shape(rel)
        name = str(body.get("portalname", ""))
        return _Shape(False, shape.columns, shape.rest, declares=("cursor", name))

    def _s_fetch(self, body: Node) -> _Shape:
        if body.get("ismove"):
            return _NO_ROWS
        return _Shape(True, None, CLEAN, reference=("cursor", str(body.get("portalname", ""))))

    def _s_prepare(self, body: Node) -> _Shape:
        wrapped = _wrapped(body.get("query"))
        inner = self.statement(*wrapped) if wrapped is not None else _UNKNOWN_ROWS
        name = str(body.get("name", ""))
        if not inner.returns_rows:
            return _Shape(False, (), CLEAN, declares=("prepared", name))
        return _Shape(False, inner.columns, inner.rest, declares=("prepared", name))

    def _s_execute(self, body: Node) -> _Shape:
        params = self.expr(body.get("params") or [], _Scope(None))
        return _Shape(
            True, None, _indirect(params), reference=("prepared", str(body.get("name", "")))
        )

    def _s_explain(self, body: Node) -> _Shape:
        analyze = _explain_analyze(body.get("options") or ())
        wrapped = _wrapped(body.get("query"))
        mark = len(self.writes)
        if wrapped is not None:
            self.statement(*wrapped)
        if not analyze:
            del self.writes[mark:]  # plain EXPLAIN runs nothing
        return _Shape(True, None, CLEAN)  # plan text carries no table values

    def _s_show(self, body: Node) -> _Shape:
        return _Shape(True, None, CLEAN)

    def _s_call(self, body: Node) -> _Shape:
        lin = self.func_call(body.get("funccall") or {}, _Scope(None))[0]
        return _Shape(True, None, lin)  # OUT parameters

    def _s_do(self, body: Node) -> _Shape:
        self.opaque_call("DO")
        return _NO_ROWS

    def _s_create_table_as(self, body: Node) -> _Shape:
        into = body.get("into") or {}
        wrapped = _wrapped(body.get("query"))
        rv = into.get("rel") or {}
        schema = rv.get("schemaname") or self.creation_schema(rv.get("relpersistence") == "t")
        qualified = f"{schema}.{rv.get('relname', '')}"
        if wrapped is not None and wrapped[0] == "ExecuteStmt":
            # CREATE TABLE … AS EXECUTE: the prepared statement is not known here
            self.expr(wrapped[1].get("params") or [], _Scope(None))
            if not into.get("skipData"):
                self.reads_opaque = True
                self.writes.append(WriteFlow(f"{qualified}.*", OPAQUE))
            return _NO_ROWS
        rel = self.query(body.get("query"), None) or _UNKNOWN_REL
        if not into.get("skipData"):
            self.write_outputs(qualified, rel, _snames(into.get("colNames")))
        return _NO_ROWS

    def _s_refresh(self, body: Node) -> _Shape:
        rv = body.get("relation") or {}
        info = self.catalog.relation(rv.get("schemaname"), str(rv.get("relname", "")), self.path)
        if info is not None and info.kind == "m" and not body.get("skipData"):
            rel = self.relation_rel(info)
            for name, lin in zip(info.columns, rel.cols, strict=False):
                self.writes.append(WriteFlow(f"{info.qualified}.{name}", lin))
        return _NO_ROWS

    def _s_rename(self, body: Node) -> _Shape:
        kind = body.get("renameType")
        if kind == "OBJECT_SCHEMA":
            schema = body.get("subname")
            for rel in self.catalog.all_relations():
                if rel.schema == schema:
                    self.renames[rel.qualified] = None
            return _NO_ROWS
        rv = body.get("relation")
        if rv and (kind in _RENAMED_KINDS or kind == "OBJECT_COLUMN"):
            qualified = self.qualify(rv)
            if kind == "OBJECT_COLUMN":
                qualified = f"{qualified}.{body.get('subname', '')}"
            self.renames[qualified] = None
        return _NO_ROWS

    def _s_alter_schema(self, body: Node) -> _Shape:
        rv = body.get("relation")
        if rv and body.get("objectType") in _RENAMED_KINDS:
            self.renames[self.qualify(rv)] = None
        return _NO_ROWS

    def _s_alter_table(self, body: Node) -> _Shape:
        target = self.target(body.get("relation") or {})
        scope = _Scope(None)
        scope.items.append(target.item())
        for entry in body.get("cmds") or ():
            cmd = entry.get("AlterTableCmd") or {}
            subtype = cmd.get("subtype")
            column = str(cmd.get("name") or "")
            definition = cmd.get("def")
            coldef = (definition or {}).get("ColumnDef") if type(definition) is dict else None
            if subtype == "AT_AlterColumnType" and coldef and coldef.get("raw_default"):
                # ALTER COLUMN … TYPE … USING expr rewrites the column from expr
                self.write(target, column, self.expr(coldef["raw_default"], scope))
            elif subtype == "AT_AddColumn" and coldef:
                self.column_defaults(target, coldef, scope)
            elif subtype in ("AT_ColumnDefault", "AT_SetExpression") and definition:
                self.write(target, column, self.expr(definition, scope))
        return _NO_ROWS

    def column_defaults(self, target: _Target, coldef: Node, scope: _Scope) -> None:
        """DEFAULT / GENERATED expressions fill the column."""
        column = str(coldef.get("colname", ""))
        for entry in coldef.get("constraints") or ():
            constraint = entry.get("Constraint") or {}
            if constraint.get("contype") in ("CONSTR_DEFAULT", "CONSTR_GENERATED"):
                expr = constraint.get("raw_expr")
                if expr is not None:
                    self.write(target, column, self.expr(expr, scope))

    def _s_create_table(self, body: Node) -> _Shape:
        rv = body.get("relation") or {}
        schema = rv.get("schemaname") or self.creation_schema(rv.get("relpersistence") == "t")
        qualified = f"{schema}.{rv.get('relname', '')}"
        coldefs = [e["ColumnDef"] for e in body.get("tableElts") or () if "ColumnDef" in e]
        names = tuple(str(c.get("colname", "")) for c in coldefs)
        rel = _Rel(
            names, tuple(ColumnLineage(frozenset({f"{qualified}.{n}"}), True) for n in names)
        )
        target = _Target(str(rv.get("relname", "")), None, qualified, rel)
        scope = _Scope(None)
        scope.items.append(target.item())
        for coldef in coldefs:
            self.column_defaults(target, coldef, scope)
        return _NO_ROWS

    def finish(self, shape: _Shape) -> StatementLineage:
        return StatementLineage(
            returns_rows=shape.returns_rows,
            columns=shape.columns,
            rest=shape.rest,
            reference=shape.reference,
            declares=shape.declares,
            copy=shape.copy,
            copy_relation=shape.copy_relation,
            writes=tuple(dict.fromkeys(self.writes)),
            reads=frozenset(self.reads),
            reads_opaque=self.reads_opaque,
            opaque_calls=tuple(self.calls),
            renames=tuple(self.renames),
        )


def _table_rel(info: RelationInfo) -> _Rel:
    qualified = info.qualified
    if info.kind == "S":
        cols: tuple[ColumnLineage, ...] = (CLEAN,) * len(info.columns)
    elif info.kind in _TABLE_KINDS:
        copies = _STATISTICS.get((info.schema, info.name), frozenset())
        cols = tuple(
            OPAQUE
            if copies is None or column in copies
            else ColumnLineage(frozenset((f"{qualified}.{column}",)), True)
            for column in info.columns
        )
    else:
        cols = (OPAQUE,) * len(info.columns)  # a kind the analyser does not know
    return _Rel(info.columns, cols, CLEAN, system=True)


def _join_rel(left: _Rel, right: _Rel, using: list[str], natural: bool) -> _Rel:
    """Columns of a join: USING / NATURAL columns first (either side's value), then the
    others of the left and of the right input."""
    if left.names is None or right.names is None:
        if not using and not natural:
            if left.names is not None:
                return _Rel(None, left.cols, right.whole())
            return _Rel(None, left.cols, _union((left.rest, right.whole())))
        return _Rel(None, (), _union((left.whole(), right.whole())))
    names: list[str] = []
    cols: list[ColumnLineage] = []
    for column in using:
        if column in left.names and column in right.names:
            lin = _merge(left.cols[left.names.index(column)], right.cols[right.names.index(column)])
        else:
            lin = OPAQUE  # PostgreSQL refuses it
        names.append(column)
        cols.append(lin)
    for side in (left, right):
        assert side.names is not None
        for name, lin in zip(side.names, side.cols, strict=False):
            if name not in using:
                names.append(name)
                cols.append(lin)
    return _Rel(tuple(names), tuple(cols))


def _stored(rel: _Rel, assigned: dict[str, ColumnLineage]) -> _Rel:
    """The target row after a write: each written column is the stored value or the new one."""
    if rel.names is None or not assigned:
        return rel
    cols = tuple(
        _merge(lin, assigned[name]) if name in assigned else lin
        for name, lin in zip(rel.names, rel.cols, strict=False)
    )
    return _Rel(rel.names, cols, rel.rest, rel.system)


_DML = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
# SelectStmt clauses that are only read: 0 expression, 1 GROUP BY / DISTINCT ON items,
# 2 ORDER BY (a bare name may be an output column in the last two)
_SELECT_READS = {
    "whereClause": 0,
    "havingClause": 0,
    "windowClause": 0,
    "limitOffset": 0,
    "limitCount": 0,
    "groupClause": 1,
    "distinctClause": 1,
    "sortClause": 2,
}

_EXPR: dict[str, Callable[[_Analyser, Node, _Scope], ColumnLineage]] = {
    "ColumnRef": _Analyser._e_column_ref,
    "FuncCall": _Analyser._e_func_call,
    "SubLink": _Analyser._e_sub_link,
    "A_Expr": _Analyser._e_a_expr,
    "SelectStmt": _Analyser._e_select,
    "RangeVar": _Analyser._e_opaque,
    "BoolExpr": _Analyser._e_args,
    "CoalesceExpr": _Analyser._e_args,
    "MinMaxExpr": _Analyser._e_args,
    "RowExpr": _Analyser._e_args,
    "TypeCast": _Analyser._e_arg,
    "CollateClause": _Analyser._e_arg,
    "NullTest": _Analyser._e_arg,
    "BooleanTest": _Analyser._e_arg,
    "List": _Analyser._e_list,
    **dict.fromkeys(
        (
            "A_Const",
            "ParamRef",
            "SQLValueFunction",
            "SetToDefault",
            "CurrentOfExpr",
            "MergeSupportFunc",
            "A_Star",
            "String",
            "Integer",
            "Float",
            "Boolean",
            "BitString",
            "TypeName",
        ),
        _Analyser._e_clean,
    ),
}

_STATEMENTS: dict[str, Callable[[_Analyser, Node], _Shape]] = {
    "SelectStmt": _Analyser._s_select,
    "InsertStmt": _Analyser._s_insert,
    "UpdateStmt": _Analyser._s_update,
    "DeleteStmt": _Analyser._s_delete,
    "MergeStmt": _Analyser._s_merge,
    "CopyStmt": _Analyser._s_copy,
    "DeclareCursorStmt": _Analyser._s_declare,
    "FetchStmt": _Analyser._s_fetch,
    "PrepareStmt": _Analyser._s_prepare,
    "ExecuteStmt": _Analyser._s_execute,
    "ExplainStmt": _Analyser._s_explain,
    "VariableShowStmt": _Analyser._s_show,
    "CallStmt": _Analyser._s_call,
    "DoStmt": _Analyser._s_do,
    "CreateTableAsStmt": _Analyser._s_create_table_as,
    "RefreshMatViewStmt": _Analyser._s_refresh,
    "RenameStmt": _Analyser._s_rename,
    "AlterObjectSchemaStmt": _Analyser._s_alter_schema,
    "AlterTableStmt": _Analyser._s_alter_table,
    "CreateStmt": _Analyser._s_create_table,
}


# --------------------------------------------------------------------------- entry point


def _lineage(
    sql: str, catalog: CatalogSnapshot, search_path: tuple[str, ...]
) -> tuple[StatementLineage, ...]:
    stmts = _parse(sql)
    if not stmts:
        return ()
    cache = _cache_for(catalog)
    results: list[StatementLineage] = []
    for raw in stmts:
        item = _wrapped(raw.get("stmt"))
        if item is None:
            continue
        analyser = _Analyser(catalog, search_path, cache)
        results.append(analyser.finish(analyser.statement(*item)))
    return tuple(results)


def lineage(
    sql: str, catalog: CatalogSnapshot, search_path: Sequence[str]
) -> tuple[StatementLineage, ...]:
    """One :class:`StatementLineage` per statement of ``sql`` (the server's statement split).

    ``search_path`` is the session's effective path (:func:`effective_search_path`). A ``SET
    search_path`` earlier in ``sql`` is not applied to the statements after it (the caller
    re-plans once the server confirms the change). Raises :class:`AnalysisError` on a syntax
    error, excessive nesting, or a statement too complex to analyse (more than
    ``_MAX_QUERY_BLOCKS`` query blocks, recursive-CTE iterations included)."""
    path = tuple(search_path)
    return _deep(lambda: _lineage(sql, catalog, path))
