"""The statement analyser: SQL text → :class:`~pgguard.policy.facts.StatementFacts`. Pure.

Parsing is PostgreSQL's own grammar (pglast / libpg_query), read as JSON (``parse_sql_json`` +
``json.loads`` is several times faster than building pglast node objects) and walked as plain
dicts. Names are resolved against a :class:`~pgguard.policy.facts.Catalog` along the
session's effective ``search_path`` (see :func:`pgguard.policy.catalog.effective_search_path`).

Class decisions (SPEC §3, pgAudit-like; a statement gets *every* class it belongs to):

* ``read``: SELECT / VALUES / TABLE, SHOW, plain EXPLAIN (never executes), DECLARE CURSOR,
  FETCH / MOVE, COPY … TO, ``LOCK … IN ACCESS SHARE | ROW SHARE | ROW EXCLUSIVE MODE``; and
  any statement that reads a relation (``INSERT … SELECT … FROM u``, ``UPDATE … FROM``).
* ``write``: INSERT / UPDATE / DELETE / MERGE anywhere (data-modifying CTEs included),
  TRUNCATE, COPY … FROM, REFRESH MATERIALIZED VIEW, ALTER SEQUENCE, SELECT INTO and CREATE
  TABLE AS (unless ``WITH NO DATA``), and what PostgreSQL refuses in a read-only transaction
  although it reads: ``SELECT … FOR UPDATE/SHARE`` (row locks) and LOCK in a mode stronger
  than ROW EXCLUSIVE. DDL that destroys or rewrites data is ``ddl`` *and* ``write`` with the
  relation in ``written_tables``: DROP TABLE / MATERIALIZED VIEW / FOREIGN TABLE / SEQUENCE,
  DROP SCHEMA … CASCADE, ALTER TABLE, DROP OWNED.
* ``ddl``: CREATE / ALTER / DROP / COMMENT / RENAME … of schema objects.
* ``role``: GRANT / REVOKE, role DDL, ALTER DEFAULT PRIVILEGES, REASSIGN / DROP OWNED,
  SECURITY LABEL, ownership changes, user mappings, ``SET ROLE`` / ``SET SESSION
  AUTHORIZATION`` (and ``set_config`` of those).
* ``function``: DO, CALL, and calls of functions that are volatile (or SECURITY DEFINER) and
  neither built in nor allow-listed; calls of the dangerous built-ins (:data:`DANGEROUS_FUNCTIONS`,
  :data:`DANGEROUS_PREFIXES`: files, programs, large objects, dblink, sequences, role
  settings, other backends, SQL held in strings); functions missing from the catalog (fail
  closed); operators from a non-``pg_catalog`` schema; COPY to/from a program or server file;
  LOAD.
* ``session``: SET / RESET (except ``SET TRANSACTION``), ``set_config()``, DISCARD, LISTEN,
  UNLISTEN, NOTIFY / ``pg_notify()``, PREPARE, DEALLOCATE, CLOSE.
* ``transaction``: BEGIN / START / COMMIT / ROLLBACK / SAVEPOINT / RELEASE, SET
  TRANSACTION, SET CONSTRAINTS; two-phase commands are also ``admin``.
* ``copy``: every COPY; COPY to/from a program or a server file is also ``admin`` and
  ``function``.
* ``admin``: VACUUM, ANALYZE, CHECKPOINT, CLUSTER, REINDEX, ALTER SYSTEM, LOAD, databases,
  tablespaces, extensions, languages, event triggers, FDWs, subscriptions, access methods;
  and (with ``function``) settings that would make the server lex SQL differently from the
  analyser: ``standard_conforming_strings`` off, a ``client_encoding`` such as SJIS / BIG5 /
  GBK whose characters can end in a backslash byte (SET or ``set_config``).
* A statement type the analyser does not know gets ``admin role function ddl write``.

Evasions: nested statements are walked wherever they are (CTEs, subqueries, EXPLAIN
ANALYZE, PREPARE, DECLARE, COPY (query), CREATE TABLE AS); definitions that do not run now
(CREATE VIEW / RULE / FUNCTION / TRIGGER / POLICY bodies, column defaults of CREATE TABLE,
plain EXPLAIN) record their objects but add no classes. ``PREPARE name AS stmt`` gets the
classes of ``stmt`` plus ``session``. ``EXECUTE name`` takes the facts (and command tag) of
the prepared statement when it is known — from the caller's ``prepared`` mapping (see
:func:`prepared_statement`) or from a PREPARE earlier in the same string — and is otherwise
assumed ``read write function`` (everything a PREPARE may contain). A multi-statement
string gives one facts per statement; a ``SET search_path`` in it applies to the statements
after it.

``commands`` lists the tag of every statement that runs: the outer tag first, then the
data-modifying statements of CTEs (any depth), the statement under EXPLAIN ANALYZE, the inner
statement of PREPARE and of a known EXECUTE, the query of CREATE TABLE AS / CREATE
MATERIALIZED VIEW / COPY (query) / DECLARE CURSOR, and CREATE SCHEMA elements — so a rule on
``commands: [DELETE]`` sees ``WITH d AS (DELETE …) SELECT …``. ``settings`` names the run-time
settings the statement changes (SET / RESET, constant ``set_config`` names, transaction modes
of SET TRANSACTION / BEGIN, ``all`` for RESET ALL and DISCARD ALL); a PREPARE changes none
until it is executed.

``without_where`` is set for an UPDATE / DELETE (anywhere in the statement, CTEs included)
whose WHERE is missing, folds to true (``true``, ``1=1``, ``'a'='a'``, ``x = x``, ``NOT
false``, ``1 IN (1, 2)``, ``true OR …``), or references no column at all (``EXISTS (SELECT
1)``, ``$1``, ``random() < 0.5``: the same answer for every row), and for TRUNCATE.
``WHERE CURRENT OF`` counts as bounded.

Relations missing from the catalog keep their written name: ``schema.name`` when qualified,
otherwise one entry per schema of the search path (``pg_catalog`` excluded) because any of
them could hold it (``?.name`` when the path is empty); new relations of CREATE go to the
first schema of the path that is not ``pg_catalog`` / ``pg_temp*`` (``pg_temp`` for
temporary ones). Functions missing from the catalog are named the same way.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

from pglast import ast, parser

from pgguard.policy.catalog import effective_search_path, split_search_path
from pgguard.policy.facts import Catalog, RelationInfo, StatementClass, StatementFacts
from pgguard.policy.identity_guard import const_string, protected_setting

__all__ = [
    "DANGEROUS_FUNCTIONS",
    "DANGEROUS_PREFIXES",
    "AnalysisError",
    "analyse",
    "prepared_statement",
]

Node = dict[str, Any]
_T = TypeVar("_T")


class AnalysisError(ValueError):
    """The SQL cannot be analysed (syntax error, or nested too deeply): refuse it."""


# --------------------------------------------------------------------------- function lists

# Built-ins that reach files, programs, large objects, other servers, sequences, settings,
# roles or other backends, or run SQL held in a string (which hides what it reads). Matched by
# name in any schema (a user function with such a name is suspicious too). The caller's
# allow-list (qualified names) overrides.
DANGEROUS_FUNCTIONS = frozenset(
    {
        # files and directories on the server
        "pg_read_file",
        "pg_read_binary_file",
        "pg_stat_file",
        "pg_ls_dir",
        "pg_logdir_ls",
        "pg_show_all_file_settings",
        "pg_hba_file_rules",
        "pg_ident_file_mappings",
        # large objects
        "loread",
        "lowrite",
        # sequences
        "nextval",
        "setval",
        # other backends and the server itself
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_rotate_logfile_old",
        "pg_promote",
        "pg_switch_wal",
        "pg_switch_xlog",
        "pg_create_restore_point",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_log_backend_memory_contexts",
        "pg_import_system_collations",
        "pg_log_standby_snapshot",
        "pg_sync_replication_slots",
        "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot",
        "pg_drop_replication_slot",
        "pg_replication_slot_advance",
        "pg_logical_emit_message",
        "pg_logical_slot_get_changes",
        "pg_logical_slot_get_binary_changes",
        # SQL in a string: the statement inside is invisible to analysis
        "ts_stat",
        "ts_rewrite",
    }
)
DANGEROUS_PREFIXES = (
    "lo_",  # lo_import, lo_export, lo_create, lo_unlink, lo_put, lo_from_bytea, lo_get …
    "dblink",
    "pg_ls_",  # pg_ls_dir, pg_ls_logdir, pg_ls_waldir, pg_ls_tmpdir, …
    "pg_file_",  # adminpack: pg_file_write, pg_file_rename, pg_file_unlink, pg_file_sync
    "pg_stat_reset",
    "pg_backup_",
    "pg_wal_replay_",
    "pg_replication_origin_",
    "pg_copy_",  # pg_copy_physical/logical_replication_slot
    "binary_upgrade_",
    "query_to_xml",
    "table_to_xml",
    "cursor_to_xml",
    "schema_to_xml",
    "database_to_xml",
)


def _dangerous(name: str) -> bool:
    return name in DANGEROUS_FUNCTIONS or name.startswith(DANGEROUS_PREFIXES)


# --------------------------------------------------------------------------- JSON tree shape

# In libpg_query's JSON a field declared as a specific node pointer (``RangeVar *relation``)
# holds the node's fields directly; a ``Node *`` field or list element is wrapped as
# ``{"TypeName": {...}}``. This map says which type an unwrapped field has.
_TYPED_FALLBACK: dict[tuple[str, str], str] = {
    ("CallStmt", "funccall"): "FuncCall",
    ("CopyStmt", "relation"): "RangeVar",
    ("CreateForeignTableStmt", "base"): "CreateStmt",
    ("CreateStmt", "relation"): "RangeVar",
    ("CreateTableAsStmt", "into"): "IntoClause",
    ("DeleteStmt", "relation"): "RangeVar",
    ("DeleteStmt", "returningClause"): "ReturningClause",
    ("DeleteStmt", "withClause"): "WithClause",
    ("InsertStmt", "onConflictClause"): "OnConflictClause",
    ("InsertStmt", "relation"): "RangeVar",
    ("InsertStmt", "returningClause"): "ReturningClause",
    ("InsertStmt", "withClause"): "WithClause",
    ("IntoClause", "rel"): "RangeVar",
    ("MergeStmt", "relation"): "RangeVar",
    ("MergeStmt", "returningClause"): "ReturningClause",
    ("MergeStmt", "withClause"): "WithClause",
    ("SelectStmt", "intoClause"): "IntoClause",
    ("SelectStmt", "larg"): "SelectStmt",
    ("SelectStmt", "rarg"): "SelectStmt",
    ("SelectStmt", "withClause"): "WithClause",
    ("UpdateStmt", "relation"): "RangeVar",
    ("UpdateStmt", "returningClause"): "ReturningClause",
    ("UpdateStmt", "withClause"): "WithClause",
    ("ViewStmt", "view"): "RangeVar",
}


def _typed_fields() -> dict[str, dict[str, str]]:
    """(parent type, field) → node type, for fields whose JSON value is not wrapped.

    Derived from pglast's node metadata so new grammar versions are covered; the fallback
    holds the fields the analyser depends on."""
    typed = dict(_TYPED_FALLBACK)
    generic = {"Node", "List", "char", "Bitmapset", "Expr"}
    for type_name in dir(ast):
        cls = getattr(ast, type_name)
        slots = getattr(cls, "__slots__", None)
        if not isinstance(cls, type) or not isinstance(slots, dict):
            continue
        for field_name, info in slots.items():
            ctype = str(getattr(info, "c_type", ""))
            target = ctype[:-1] if ctype.endswith("*") else ctype
            if target in generic or not target or not target[0].isupper():
                continue
            node_cls = getattr(ast, target, None)
            if isinstance(node_cls, type) and issubclass(node_cls, ast.Node):
                typed[(type_name, field_name)] = target
    nested: dict[str, dict[str, str]] = {}
    for (parent, field_name), target in typed.items():
        nested.setdefault(parent, {})[field_name] = target
    return nested


_TYPED = _typed_fields()

# Node types with nothing inside the analyser cares about.
_LEAVES = frozenset(
    {
        "A_Const",
        "A_Star",
        "AccessPriv",
        "Alias",
        "BitString",
        "Boolean",
        "Float",
        "Integer",
        "ParamRef",
        "RoleSpec",
        "SQLValueFunction",
        "SetToDefault",
        "String",
        "TypeName",
        "DefElem",
    }
)

# ObjectType → the noun PostgreSQL uses in command tags.
_OBJECT_NOUNS = {
    "OBJECT_ACCESS_METHOD": "ACCESS METHOD",
    "OBJECT_AMOP": "OPERATOR FAMILY",
    "OBJECT_AMPROC": "OPERATOR FAMILY",
    "OBJECT_ATTRIBUTE": "TYPE",
    "OBJECT_COLUMN": "TABLE",
    "OBJECT_DEFACL": "DEFAULT PRIVILEGES",
    "OBJECT_DOMCONSTRAINT": "DOMAIN",
    "OBJECT_EVENT_TRIGGER": "EVENT TRIGGER",
    "OBJECT_FDW": "FOREIGN DATA WRAPPER",
    "OBJECT_FOREIGN_SERVER": "SERVER",
    "OBJECT_FOREIGN_TABLE": "FOREIGN TABLE",
    "OBJECT_LARGEOBJECT": "LARGE OBJECT",
    "OBJECT_MATVIEW": "MATERIALIZED VIEW",
    "OBJECT_OPCLASS": "OPERATOR CLASS",
    "OBJECT_OPFAMILY": "OPERATOR FAMILY",
    "OBJECT_PARAMETER_ACL": "PARAMETER",
    "OBJECT_PUBLICATION_NAMESPACE": "PUBLICATION",
    "OBJECT_PUBLICATION_REL": "PUBLICATION",
    "OBJECT_STATISTIC_EXT": "STATISTICS",
    "OBJECT_TABCONSTRAINT": "TABLE",
    "OBJECT_TSCONFIGURATION": "TEXT SEARCH CONFIGURATION",
    "OBJECT_TSDICTIONARY": "TEXT SEARCH DICTIONARY",
    "OBJECT_TSPARSER": "TEXT SEARCH PARSER",
    "OBJECT_TSTEMPLATE": "TEXT SEARCH TEMPLATE",
    "OBJECT_USER_MAPPING": "USER MAPPING",
}


def _noun(object_type: str | None, default: str = "TABLE") -> str:
    if not object_type:
        return default
    noun = _OBJECT_NOUNS.get(object_type)
    if noun is None:
        noun = object_type.removeprefix("OBJECT_").replace("_", " ")
    return noun


# Relation kinds whose DROP destroys data, and whose ALTER may rewrite it.
_DATA_OBJECTS = frozenset(
    {"OBJECT_TABLE", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE"}
)
_RELATION_OBJECTS = _DATA_OBJECTS | {"OBJECT_VIEW", "OBJECT_INDEX"}
_ADMIN_OBJECTS = frozenset(
    {
        "OBJECT_EXTENSION",
        "OBJECT_EVENT_TRIGGER",
        "OBJECT_LANGUAGE",
        "OBJECT_FDW",
        "OBJECT_ACCESS_METHOD",
        "OBJECT_DATABASE",
        "OBJECT_TABLESPACE",
        "OBJECT_SUBSCRIPTION",
    }
)
_ROLE_OBJECTS = frozenset({"OBJECT_ROLE", "OBJECT_USER_MAPPING", "OBJECT_DEFACL"})

_ALL_DANGEROUS: frozenset[StatementClass] = frozenset({"admin", "role", "function", "ddl", "write"})
_EXECUTE_UNKNOWN: frozenset[StatementClass] = frozenset({"read", "write", "function"})
_LOCK_READ_MODES = 3  # AccessShare, RowShare, RowExclusive: allowed in read-only transactions
_READ_ONLY_SETTINGS = frozenset({"default_transaction_read_only", "transaction_read_only"})
# Client encodings whose multibyte characters can end in an ASCII byte such as a backslash:
# the server would split string literals where the analyser (reading UTF-8) does not.
_UNSAFE_ENCODINGS = frozenset(
    {
        "sjis",
        "mskanji",
        "shiftjis",
        "shiftjis2004",
        "windows932",
        "big5",
        "windows950",
        "gbk",
        "windows936",
        "gb18030",
        "uhc",
        "windows949",
        "johab",
    }
)
_TRUE_WORDS = frozenset({"t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"f", "fa", "fal", "fals", "false", "n", "no", "off", "of", "0"})


# --------------------------------------------------------------------------- constants


class _Unknown:
    __slots__ = ()


_UNKNOWN: Any = _Unknown()


def _wrapped(node: Any) -> tuple[str, Node] | None:
    if type(node) is dict and len(node) == 1:
        for key, value in node.items():
            if type(value) is dict:
                return key, value
    return None


def _to_bool(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return None


def _const_bool(node: Any) -> bool | None:
    value = _const_value(node)
    if value is _UNKNOWN or value is None:
        return None
    return _to_bool(value)


def _to_number(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | Decimal):
        return Decimal(value)
    if isinstance(value, str):
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            return None
    return None


def _compare(op: str, left: object, right: object) -> object:
    if left is None or right is None:
        return None  # SQL NULL
    if type(left) is not type(right):
        if isinstance(left, bool) or isinstance(right, bool):
            lb, rb = _to_bool(left), _to_bool(right)
            if lb is None or rb is None:
                return _UNKNOWN
            left, right = lb, rb
        else:
            ln, rn = _to_number(left), _to_number(right)
            if ln is None or rn is None:
                return _UNKNOWN
            left, right = ln, rn
    try:
        if op == "=":
            return left == right
        if op in ("<>", "!="):
            return left != right
        if op == "<":
            return left < right  # type: ignore[operator]
        if op == ">":
            return left > right  # type: ignore[operator]
        if op == "<=":
            return left <= right  # type: ignore[operator]
        if op == ">=":
            return left >= right  # type: ignore[operator]
    except TypeError:
        return _UNKNOWN
    return _UNKNOWN


def _same_column(a: Any, b: Any) -> bool:
    wa, wb = _wrapped(a), _wrapped(b)
    if wa is None or wb is None or wa[0] != "ColumnRef" or wb[0] != "ColumnRef":
        return False
    return bool(wa[1].get("fields") == wb[1].get("fields"))


def _const_value(node: Any) -> object:
    """Fold a constant expression: a Python value, None for SQL NULL, _UNKNOWN otherwise.

    Small on purpose: enough to see that ``WHERE true``, ``WHERE 1=1``, ``WHERE 'a'='a'``,
    ``WHERE NOT false``, ``WHERE x = x``, ``WHERE 1 IN (1, 2)`` hold for every row."""
    item = _wrapped(node)
    if item is None:
        return _UNKNOWN
    kind, body = item
    if kind == "A_Const":
        if body.get("isnull"):
            return None
        for key, inner in body.items():
            if type(inner) is not dict:
                continue
            value = inner.get(key)
            if key == "ival":
                return int(value or 0)
            if key == "boolval":
                return bool(value)
            if key == "sval":
                return str(value or "")
            if key == "fval":
                number = _to_number(value)
                return _UNKNOWN if number is None else number
        return _UNKNOWN
    if kind == "TypeCast":
        value = _const_value(body.get("arg"))
        if value is _UNKNOWN or value is None:
            return value
        names = body.get("typeName", {}).get("names", ())
        typname = names[-1].get("String", {}).get("sval", "") if names else ""
        if typname in ("bool", "boolean"):
            converted = _to_bool(value)
            return _UNKNOWN if converted is None else converted
        if typname in ("int2", "int4", "int8", "numeric", "float4", "float8", "integer"):
            number = _to_number(value)
            return _UNKNOWN if number is None else number
        if typname in ("text", "varchar", "bpchar", "name"):
            return str(value) if not isinstance(value, bool) else ("true" if value else "false")
        return _UNKNOWN
    if kind == "BoolExpr":
        op = body.get("boolop")
        values = [_const_value(arg) for arg in body.get("args", ())]
        if op == "NOT_EXPR":
            if len(values) != 1 or values[0] is _UNKNOWN:
                return _UNKNOWN
            return None if values[0] is None else not _to_bool(values[0])
        truths = [
            _UNKNOWN if v is _UNKNOWN else (None if v is None else _to_bool(v)) for v in values
        ]
        if op == "AND_EXPR":
            if any(t is False for t in truths):
                return False
            if all(t is True for t in truths):
                return True
            return _UNKNOWN
        if op == "OR_EXPR":
            if any(t is True for t in truths):
                return True
            if all(t is False for t in truths):
                return False
            return _UNKNOWN
        return _UNKNOWN
    if kind == "A_Expr":
        names = body.get("name", ())
        if len(names) != 1:
            return _UNKNOWN
        op = names[0].get("String", {}).get("sval", "")
        expr_kind = body.get("kind")
        if expr_kind == "AEXPR_OP":
            left, right = body.get("lexpr"), body.get("rexpr")
            if left is not None and _same_column(left, right):
                if op in ("=", "<=", ">="):
                    return True
                if op in ("<>", "!=", "<", ">"):
                    return False
            lv, rv = _const_value(left), _const_value(right)
            if lv is _UNKNOWN or rv is _UNKNOWN:
                return _UNKNOWN
            if op in ("+", "-", "*"):
                ln, rn = _to_number(lv), _to_number(rv)
                if ln is None or rn is None:
                    return _UNKNOWN
                return ln + rn if op == "+" else ln - rn if op == "-" else ln * rn
            return _compare(op, lv, rv)
        if expr_kind == "AEXPR_IN" and op == "=":
            lv = _const_value(body.get("lexpr"))
            rlist = _wrapped(body.get("rexpr"))
            if lv is _UNKNOWN or rlist is None or rlist[0] != "List":
                return _UNKNOWN
            results = [_compare("=", lv, _const_value(x)) for x in rlist[1].get("items", ())]
            if any(r is True for r in results):
                return True
            return _UNKNOWN
        return _UNKNOWN
    if kind == "NullTest":
        value = _const_value(body.get("arg"))
        if value is _UNKNOWN:
            return _UNKNOWN
        is_null = value is None
        return is_null if body.get("nulltesttype") == "IS_NULL" else not is_null
    if kind == "BooleanTest":
        value = _const_value(body.get("arg"))
        if value is _UNKNOWN:
            return _UNKNOWN
        truth = None if value is None else _to_bool(value)
        test = body.get("booltesttype")
        if test == "IS_TRUE":
            return truth is True
        if test == "IS_NOT_TRUE":
            return truth is not True
        if test == "IS_FALSE":
            return truth is False
        if test == "IS_NOT_FALSE":
            return truth is not False
        if test == "IS_UNKNOWN":
            return truth is None
        if test == "IS_NOT_UNKNOWN":
            return truth is not None
    return _UNKNOWN


def _lexer_risk(name: str, value: object) -> str | None:
    """Why setting ``name`` to ``value`` (``_UNKNOWN``: not a constant) would make the server
    read later SQL text differently from the analyser, or None.

    The analyser lexes with ``standard_conforming_strings = on`` and UTF-8 text. With it off
    the server reads a backslash before a quote as an escape, so a statement hidden after a
    literal such as ``'x<backslash>''`` is a string to the analyser but runs on the server."""
    if name == "standard_conforming_strings":
        if value is _UNKNOWN or _to_bool(value) is not True:
            return (
                "standard_conforming_strings off: the server would read string literals "
                "differently from the analyser"
            )
    elif name == "client_encoding":
        if value is _UNKNOWN:
            return "client_encoding set to a non-constant value"
        cleaned = "".join(c for c in str(value).lower() if c.isalnum())
        if cleaned in _UNSAFE_ENCODINGS:
            return f"client_encoding {value}: multibyte characters can hide quotes or backslashes"
    return None


def _always_true(node: Any) -> bool:
    value = _const_value(node)
    return value is not _UNKNOWN and value is not None and _to_bool(value) is True


def _names(items: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for item in items:
        s = item.get("String") if type(item) is dict else None
        if s is not None:
            out.append(str(s.get("sval", "")))
    return out


# --------------------------------------------------------------------------- scopes


class _Entry:
    """One item of a FROM list: its reference name and what it resolves to."""

    __slots__ = ("bare", "info", "name", "quals")

    def __init__(
        self, name: str, info: RelationInfo | None, quals: tuple[str, ...], bare: bool
    ) -> None:
        self.name = name  # alias, or the relation name
        self.info = info  # resolved relation (None: CTE, subquery, function, unknown)
        self.quals = quals  # schema.name it stands for (empty: CTE, subquery, function)
        self.bare = bare  # no alias: matchable as schema.name


class _Scope:
    __slots__ = ("ctes", "entries", "parent")

    def __init__(self, parent: _Scope | None) -> None:
        self.parent = parent
        self.entries: list[_Entry] = []
        self.ctes: set[str] | None = None


def column_ref_names(body: Node) -> tuple[list[str], bool]:
    """The names of a ColumnRef (``a.b.c`` → ``["a", "b", "c"]``) and whether it ends in
    ``*``."""
    names: list[str] = []
    star = False
    for item in body.get("fields", ()):
        s = item.get("String")
        if s is None:
            star = True  # A_Star
        else:
            names.append(s.get("sval", ""))
    return names, star


# --------------------------------------------------------------------------- the walker

Handler = Callable[["_Walker", Node], None]


class _Walker:
    """Collects the facts of one statement while walking its JSON tree."""

    def __init__(
        self,
        catalog: Catalog,
        search_path: tuple[str, ...],
        allowed: frozenset[str],
        prepared: Mapping[str, StatementFacts] | None,
    ) -> None:
        self.catalog = catalog
        self.path = search_path
        self.allowed = allowed
        self.prepared = prepared
        self.classes: set[StatementClass] = set()
        self.tables: dict[str, None] = {}
        self.written: dict[str, None] = {}
        self.columns: dict[str, None] = {}
        self.functions: dict[str, None] = {}
        self.notes: dict[str, None] = {}
        # command tags of the statements run inside this one (StatementFacts.commands)
        self.commands: list[str] = []
        self.settings: dict[str, None] = {}  # run-time settings it changes
        self.executing = True  # False inside definitions that do not run now
        self.scope = _Scope(None)
        self.colrefs = 0
        self.without_where = False
        self.sets_search_path: tuple[str, ...] | None = None
        self.search_path_is_local = False
        self.sql = ""  # this statement's text
        # SQL-level prepared statements this statement creates or drops ("*": all)
        self.prepared_name: str | None = None
        self.prepared_facts: StatementFacts | None = None
        self.deallocated: str | None = None

    # ---- recording

    def cls(self, *names: StatementClass) -> None:
        if self.executing:
            self.classes.update(names)

    def note(self, text: str) -> None:
        self.notes[text] = None

    def ran(self, command: str) -> None:
        """Record a statement run inside this one (not inside definitions)."""
        if self.executing:
            self.commands.append(command)

    def changes(self, *settings: str) -> None:
        """Record run-time settings this statement changes."""
        if self.executing:
            for name in settings:
                self.settings[name.lower()] = None

    def _candidates(self, name: str) -> tuple[str, ...]:
        """Where an unqualified name missing from the catalog could live."""
        out = tuple(f"{s}.{name}" for s in self.path if s != "pg_catalog")
        return out or (f"?.{name}",)

    def _creation_schema(self, temporary: bool) -> str:
        if temporary:
            return "pg_temp"
        for schema in self.path:
            if schema != "pg_catalog" and not schema.startswith("pg_temp"):
                return schema
        return "?"

    def _lookup_qualified(self, qualified: str) -> RelationInfo | None:
        start = 0
        while True:
            dot = qualified.find(".", start)
            if dot < 0:
                return None
            found = self.catalog.relation(qualified[:dot], qualified[dot + 1 :], ())
            if found is not None:
                return found
            start = dot + 1

    def _expand(self, info: RelationInfo, written: bool) -> None:
        """Add what a view reads (recursively), so rules on base tables apply through it."""
        pending = list(info.depends_on)
        seen = {info.qualified}
        while pending:
            qualified = pending.pop()
            if qualified in seen:
                continue
            seen.add(qualified)
            self.tables[qualified] = None
            if written:
                self.written[qualified] = None
            dep = self._lookup_qualified(qualified)
            if dep is not None and dep.depends_on:
                pending.extend(dep.depends_on)

    def relation(
        self,
        schema: str | None,
        name: str,
        *,
        written: bool = False,
        expand: bool = True,
    ) -> tuple[RelationInfo | None, tuple[str, ...]]:
        """Resolve an existing relation and record it."""
        info = self.catalog.relation(schema, name, self.path)
        written = written and self.executing
        if info is not None:
            quals: tuple[str, ...] = (info.qualified,)
        elif schema is not None:
            quals = (f"{schema}.{name}",)
            self.note(f"relation {schema}.{name} is not in the catalog")
        else:
            quals = self._candidates(name)
            self.note(f'relation "{name}" is not in the catalog; assumed any of {", ".join(quals)}')
        for q in quals:
            self.tables[q] = None
            if written:
                self.written[q] = None
        if info is not None and expand and info.depends_on:
            self._expand(info, written)
        return info, quals

    def range_var(self, rv: Node, *, written: bool = False, expand: bool = True) -> _Entry:
        schema = rv.get("schemaname")
        name = str(rv.get("relname", ""))
        return self._entry_for(schema, name, rv.get("alias"), written=written, expand=expand)

    def _entry_for(
        self,
        schema: str | None,
        name: str,
        alias: Node | None,
        *,
        written: bool,
        expand: bool,
    ) -> _Entry:
        alias_name = alias.get("aliasname") if alias else None
        info, quals = self.relation(schema, name, written=written, expand=expand)
        return _Entry(alias_name or name, info, quals, alias_name is None)

    def created(self, rv: Node) -> str:
        """Record a relation a CREATE makes; returns its qualified name."""
        schema = rv.get("schemaname")
        name = str(rv.get("relname", ""))
        if schema is None:
            schema = self._creation_schema(rv.get("relpersistence") == "t")
        qualified = f"{schema}.{name}"
        self.tables[qualified] = None
        return qualified

    def is_cte(self, name: str) -> bool:
        scope: _Scope | None = self.scope
        while scope is not None:
            if scope.ctes and name in scope.ctes:
                return True
            scope = scope.parent
        return False

    # ---- columns

    def add_column(self, entry: _Entry, column: str) -> None:
        for q in entry.quals:
            self.columns[f"{q}.{column}"] = None

    def add_all_columns(self, entry: _Entry) -> None:
        if entry.info is not None:
            q = entry.info.qualified
            for column in entry.info.columns:
                self.columns[f"{q}.{column}"] = None

    def find_entry(self, name: str) -> _Entry | None:
        scope: _Scope | None = self.scope
        while scope is not None:
            for entry in scope.entries:
                if entry.name == name:
                    return entry
            scope = scope.parent
        return None

    def find_qualified(self, schema: str, name: str) -> _Entry | None:
        scope: _Scope | None = self.scope
        while scope is not None:
            for entry in scope.entries:
                info = entry.info
                if entry.bare and info is not None and info.schema == schema and info.name == name:
                    return entry
            scope = scope.parent
        return None

    def find_unqualified(self, column: str) -> _Entry | None:
        scope: _Scope | None = self.scope
        while scope is not None:
            entries = scope.entries
            if entries:
                having = [e for e in entries if e.info is not None and column in e.info.columns]
                if len(having) == 1:
                    return having[0]
                if having:
                    return None  # ambiguous
                unknown = [e for e in entries if e.info is None or not e.info.columns]
                if unknown:
                    return unknown[0] if len(entries) == 1 else None
            scope = scope.parent
        return None

    def column_ref(self, body: Node) -> None:
        self.colrefs += 1
        names, star = column_ref_names(body)
        entry: _Entry | None
        if star:
            if not names:
                for item in self.scope.entries:
                    self.add_all_columns(item)
                return
            if len(names) == 1:
                entry = self.find_entry(names[0])
            else:
                entry = self.find_qualified(names[-2], names[-1])
            if entry is not None:
                self.add_all_columns(entry)
            return
        if len(names) >= 4:
            names = names[-3:]  # database.schema.table.column
        if len(names) == 1:
            entry = self.find_unqualified(names[0])
            if entry is not None:
                self.add_column(entry, names[0])
            return
        if len(names) == 2:
            entry = self.find_entry(names[0])
            if entry is not None:
                self.add_column(entry, names[1])
                return
            entry = self.find_unqualified(names[0])  # (composite).field
            if entry is not None:
                self.add_column(entry, names[0])
            return
        # schema.table.column, or table.column.field
        entry = self.find_qualified(names[0], names[1])
        if entry is not None:
            self.add_column(entry, names[2])
            return
        entry = self.find_entry(names[0])
        if entry is not None:
            self.add_column(entry, names[1])

    # ---- functions

    def call(self, funcname: Sequence[Any], args: Sequence[Any], *, procedure: bool) -> None:
        names = _names(funcname)
        if not names:
            return
        name = names[-1]
        schema = names[-2] if len(names) > 1 else None
        candidates = self.catalog.functions(schema, name, self.path)
        if candidates:
            quals = tuple(dict.fromkeys(c.qualified for c in candidates))
        elif schema is not None:
            quals = (f"{schema}.{name}",)
        else:
            quals = self._candidates(name)
        for q in quals:
            self.functions[q] = None
        if not self.executing:
            return
        allowed = self.allowed
        if procedure:
            self.cls("function")
        if name == "set_config" and (schema is None or schema == "pg_catalog"):
            self._set_config(args)
        elif name == "pg_notify":
            self.cls("session")
        if _dangerous(name):
            if not any(q in allowed for q in quals):
                self.cls("function")
                self.note(f"{name}() is a dangerous built-in")
            return
        if not candidates:
            if not any(q in allowed for q in quals):
                self.cls("function")
                self.note(f"function {name}() is not in the catalog; assumed volatile")
            return
        for fn in candidates:
            if fn.builtin or fn.qualified in allowed:
                continue
            if fn.volatility == "v":
                self.cls("function")
                self.note(f"{fn.qualified}() is volatile")
                return
            if fn.security_definer:
                self.cls("function")
                self.note(f"{fn.qualified}() is SECURITY DEFINER")
                return

    def _set_config(self, args: Sequence[Any]) -> None:
        self.cls("session")
        setting = const_string(args[0]) if args else None
        if setting is None:
            self.cls("function")
            self.note("set_config() with a non-constant setting name")
            return
        lowered = setting.lower()
        self.changes(lowered)
        if protected_setting(lowered):
            self.cls("function", "role")
            self.note(f'set_config() changes "{lowered}"')
            return
        if lowered in _READ_ONLY_SETTINGS:
            self.note(f'set_config() changes "{lowered}"')
        if lowered in ("standard_conforming_strings", "client_encoding"):
            risk = _lexer_risk(lowered, _const_value(args[1]) if len(args) > 1 else _UNKNOWN)
            if risk:
                self.cls("admin", "function")
                self.note(risk)
            return
        if lowered != "search_path":
            return
        value = const_string(args[1]) if len(args) > 1 else None
        if value is None:
            self.cls("function")
            self.note("search_path set to a non-constant value; it cannot be tracked")
            return
        try:
            names = split_search_path(value)
        except ValueError:
            self.note("search_path value is malformed; the server will reject it")
            return
        local = _const_bool(args[2]) if len(args) > 2 else False
        if local is None:
            self.note("set_config() is_local is not a constant; assumed false")
            local = False
        self.sets_search_path = names
        self.search_path_is_local = local

    # ---- generic walk

    def visit(self, kind: str, body: Node) -> None:
        handler = _DISPATCH.get(kind)
        if handler is None:
            self.children(kind, body)
        elif handler is not _leaf:
            handler(self, body)

    def children(self, kind: str, body: Node, skip: frozenset[str] = frozenset()) -> None:
        typed = _TYPED.get(kind)
        dispatch = _DISPATCH
        for field_name, value in body.items():
            vtype = type(value)
            if vtype is dict:
                if field_name in skip:
                    continue
                if typed is not None:
                    target = typed.get(field_name)
                    if target is not None:
                        self.visit(target, value)
                        continue
                if len(value) == 1:
                    ((key, inner),) = value.items()
                    if type(inner) is dict and key[0].isupper():
                        handler = dispatch.get(key)
                        if handler is None:
                            self.children(key, inner)
                        elif handler is not _leaf:
                            handler(self, inner)
                        continue
                self.visit("RangeVar" if "relname" in value else "?", value)
            elif vtype is list and field_name not in skip:
                self.items(value)

    def items(self, values: list[Any]) -> None:
        dispatch = _DISPATCH
        for item in values:
            itype = type(item)
            if itype is dict:
                for key, inner in item.items():
                    if type(inner) is dict:
                        handler = dispatch.get(key)
                        if handler is None:
                            self.children(key, inner)
                        elif handler is not _leaf:
                            handler(self, inner)
            elif itype is list:
                self.items(item)

    def node(self, value: Any) -> None:
        """Visit a wrapped node (a ``Node *`` field value)."""
        if type(value) is dict:
            for key, inner in value.items():
                if type(inner) is dict:
                    self.visit(key, inner)
        elif type(value) is list:
            self.items(value)

    def definition(self, value: Any) -> None:
        """Visit something defined now but run later: objects recorded, no classes."""
        saved = self.executing
        self.executing = False
        try:
            self.node(value)
        finally:
            self.executing = saved

    def push(self) -> _Scope:
        scope = _Scope(self.scope)
        self.scope = scope
        return scope

    def with_clause(self, wc: Node) -> None:
        scope = self.scope
        names = scope.ctes
        if names is None:
            names = scope.ctes = set()
        ctes = wc.get("ctes", ())
        if wc.get("recursive"):
            for item in ctes:
                cte = item.get("CommonTableExpr", {})
                names.add(str(cte.get("ctename", "")))
        for item in ctes:
            cte = item.get("CommonTableExpr", {})
            self.node(cte.get("ctequery"))
            for key in ("search_clause", "cycle_clause"):
                if key in cte:
                    self.children("CommonTableExpr", {key: cte[key]})
            names.add(str(cte.get("ctename", "")))

    def where(self, clause: Any, dml: bool) -> None:
        """Walk a WHERE clause; for UPDATE/DELETE, note when it does not bound the rows."""
        before = self.colrefs
        self.node(clause)
        unbounded = clause is None or self.colrefs == before or _always_true(clause)
        if dml and self.executing and unbounded:
            self.without_where = True


# --------------------------------------------------------------------------- node handlers


def _h_range_var(w: _Walker, body: Node) -> None:
    name = str(body.get("relname", ""))
    alias = body.get("alias")
    if body.get("schemaname") is None and w.is_cte(name):
        alias_name = alias.get("aliasname") if alias else None
        w.scope.entries.append(_Entry(alias_name or name, None, (), alias_name is None))
        return
    entry = w.range_var(body)
    w.cls("read")
    w.scope.entries.append(entry)


def _alias_entry(w: _Walker, body: Node) -> None:
    alias = body.get("alias")
    if alias and alias.get("aliasname"):
        w.scope.entries.append(_Entry(str(alias["aliasname"]), None, (), False))


def _h_range_subselect(w: _Walker, body: Node) -> None:
    w.node(body.get("subquery"))
    _alias_entry(w, body)


def _h_range_function(w: _Walker, body: Node) -> None:
    w.items(body.get("functions", []))
    _alias_entry(w, body)


def _h_join(w: _Walker, body: Node) -> None:
    w.node(body.get("larg"))
    w.node(body.get("rarg"))
    w.node(body.get("quals"))
    _alias_entry(w, body)


def _h_current_of(w: _Walker, body: Node) -> None:
    w.colrefs += 1  # WHERE CURRENT OF bounds the rows


def _h_func_call(w: _Walker, body: Node) -> None:
    args = body.get("args") or []
    w.call(body.get("funcname", ()), args, procedure=False)
    w.children("FuncCall", body, _FUNC_SKIP)


_FUNC_SKIP = frozenset({"funcname"})


def _h_a_expr(w: _Walker, body: Node) -> None:
    operator = body.get("name", ())
    names = _names(operator) if len(operator) == 2 else ()
    if names and names[0] != "pg_catalog":
        w.cls("function")
        w.note(f"operator {names[0]}.{names[1]} is not built in")
    w.children("A_Expr", body, _AEXPR_SKIP)


_AEXPR_SKIP = frozenset({"name"})

_SELECT_SKIP = frozenset({"withClause", "fromClause", "intoClause", "lockingClause"})


def _h_select(w: _Walker, body: Node) -> None:
    outer = w.scope
    scope = w.push()
    try:
        wc = body.get("withClause")
        if wc:
            w.with_clause(wc)
        into = body.get("intoClause")
        if into:
            _select_into(w, into)
        w.items(body.get("fromClause", []))
        w.children("SelectStmt", body, _SELECT_SKIP)
        locking = body.get("lockingClause")
        if locking:
            _locking(w, locking, scope)
    finally:
        w.scope = outer


def _select_into(w: _Walker, into: Node) -> None:
    rel = into.get("rel") or {}
    w.cls("ddl", "write")
    if w.executing:
        w.written[w.created(rel)] = None
    else:
        w.created(rel)
    w.note("SELECT INTO creates and fills a table")


def _locking(w: _Walker, locking: list[Any], scope: _Scope) -> None:
    if not w.executing:
        return
    w.cls("write")
    w.note("FOR UPDATE/SHARE locks rows (refused in read-only transactions)")
    targets: list[_Entry] = []
    for item in locking:
        clause = item.get("LockingClause", {})
        locked = clause.get("lockedRels")
        if not locked:
            targets = list(scope.entries)
            break
        for rel in locked:
            rv = rel.get("RangeVar", {})
            name = str(rv.get("relname", ""))
            for entry in scope.entries:
                if entry.name == name:
                    targets.append(entry)
    for entry in targets:
        for q in entry.quals:
            w.written[q] = None
        if entry.info is not None and entry.info.depends_on:
            w._expand(entry.info, True)


def _target(w: _Walker, body: Node) -> _Entry:
    """The target of INSERT/UPDATE/DELETE/MERGE: recorded as written, put in scope."""
    rv = body.get("relation") or {}
    entry = w.range_var(rv, written=True)
    w.scope.entries.append(entry)
    w.cls("write")
    return entry


def _set_targets(w: _Walker, entry: _Entry, targets: list[Any]) -> None:
    for item in targets:
        rt = item.get("ResTarget")
        if rt is None:
            w.node(item)
            continue
        if rt.get("name"):
            w.add_column(entry, str(rt["name"]))
        w.node(rt.get("val"))
        w.items(rt.get("indirection", []))


def _h_insert(w: _Walker, body: Node) -> None:
    w.ran("INSERT")
    outer = w.scope
    w.push()
    try:
        wc = body.get("withClause")
        if wc:
            w.with_clause(wc)
        w.node(body.get("selectStmt"))
        entry = _target(w, body)
        for item in body.get("cols", ()):
            rt = item.get("ResTarget", {})
            if rt.get("name"):
                w.add_column(entry, str(rt["name"]))
        conflict = body.get("onConflictClause")
        if conflict:
            w.scope.entries.append(_Entry("excluded", entry.info, entry.quals, False))
            w.children("OnConflictClause", conflict, frozenset({"targetList"}))
            _set_targets(w, entry, conflict.get("targetList", []))
        ret = body.get("returningClause")
        if ret:
            w.visit("ReturningClause", ret)
    finally:
        w.scope = outer


def _h_update(w: _Walker, body: Node) -> None:
    w.ran("UPDATE")
    outer = w.scope
    w.push()
    try:
        wc = body.get("withClause")
        if wc:
            w.with_clause(wc)
        entry = _target(w, body)
        w.items(body.get("fromClause", []))
        _set_targets(w, entry, body.get("targetList", []))
        w.where(body.get("whereClause"), dml=True)
        ret = body.get("returningClause")
        if ret:
            w.visit("ReturningClause", ret)
    finally:
        w.scope = outer


def _h_delete(w: _Walker, body: Node) -> None:
    w.ran("DELETE")
    outer = w.scope
    w.push()
    try:
        wc = body.get("withClause")
        if wc:
            w.with_clause(wc)
        _target(w, body)
        w.items(body.get("usingClause", []))
        w.where(body.get("whereClause"), dml=True)
        ret = body.get("returningClause")
        if ret:
            w.visit("ReturningClause", ret)
    finally:
        w.scope = outer


def _h_merge(w: _Walker, body: Node) -> None:
    w.ran("MERGE")
    outer = w.scope
    w.push()
    try:
        wc = body.get("withClause")
        if wc:
            w.with_clause(wc)
        entry = _target(w, body)
        w.node(body.get("sourceRelation"))
        w.node(body.get("joinCondition"))
        for item in body.get("mergeWhenClauses", ()):
            clause = item.get("MergeWhenClause", {})
            w.node(clause.get("condition"))
            _set_targets(w, entry, clause.get("targetList", []))
            w.items(clause.get("values", []))
        ret = body.get("returningClause")
        if ret:
            w.visit("ReturningClause", ret)
    finally:
        w.scope = outer


def _h_call_stmt(w: _Walker, body: Node) -> None:
    fc = body.get("funccall") or {}
    w.call(fc.get("funcname", ()), fc.get("args") or [], procedure=True)
    w.children("FuncCall", fc, _FUNC_SKIP)


def _leaf(w: _Walker, body: Node) -> None:
    """Nothing inside matters."""


_HANDLERS: dict[str, Handler] = {
    "RangeVar": _h_range_var,
    "RangeSubselect": _h_range_subselect,
    "RangeFunction": _h_range_function,
    "JoinExpr": _h_join,
    "ColumnRef": _Walker.column_ref,
    "CurrentOfExpr": _h_current_of,
    "FuncCall": _h_func_call,
    "A_Expr": _h_a_expr,
    "SelectStmt": _h_select,
    "InsertStmt": _h_insert,
    "UpdateStmt": _h_update,
    "DeleteStmt": _h_delete,
    "MergeStmt": _h_merge,
}
_DISPATCH: dict[str, Handler] = {**dict.fromkeys(_LEAVES, _leaf), **_HANDLERS}


# --------------------------------------------------------------------------- statements

Statement = Callable[[_Walker, Node], str]


def _s_select(w: _Walker, body: Node) -> str:
    w.cls("read")
    _h_select(w, body)
    return "SELECT"


def _s_dml(command: str, handler: Handler) -> Statement:
    def run(w: _Walker, body: Node) -> str:
        handler(w, body)
        return command

    return run


def _s_truncate(w: _Walker, body: Node) -> str:
    w.cls("write")
    for item in body.get("relations", ()):
        w.range_var(item.get("RangeVar", {}), written=True, expand=False)
    if w.executing:
        w.without_where = True
    if body.get("behavior") == "DROP_CASCADE":
        w.note("TRUNCATE … CASCADE also empties the tables that reference these")
    return "TRUNCATE TABLE"


def _explain_analyze(options: Iterable[Any]) -> bool:
    analyze = False
    for item in options:
        elem = item.get("DefElem", {})
        if elem.get("defname") != "analyze":
            continue
        arg = elem.get("arg")
        if arg is None:
            analyze = True
            continue
        wrapped = _wrapped(arg)
        value: object = _UNKNOWN
        if wrapped is not None:
            kind, inner = wrapped
            if kind == "String":
                value = inner.get("sval", "")
            elif kind == "Boolean":
                value = bool(inner.get("boolval", False))
            elif kind == "Integer":
                value = int(inner.get("ival", 0))
            else:
                value = _const_value(arg)
        truth = _to_bool(value) if value is not _UNKNOWN else None
        if truth is not False:
            analyze = True  # unknown spelling: assume it executes
    return analyze


def _s_explain(w: _Walker, body: Node) -> str:
    query = body.get("query")
    analyze = _explain_analyze(body.get("options", ()))
    w.cls("read")
    inner = _wrapped(query)
    if inner is None:
        return "EXPLAIN"
    if analyze:
        w.note("EXPLAIN ANALYZE executes the statement")
        _nested(w, *inner)
    else:
        saved = w.executing
        w.executing = False
        try:
            _statement(w, *inner)
        finally:
            w.executing = saved
    return "EXPLAIN"


def _s_copy(w: _Walker, body: Node) -> str:
    w.cls("copy")
    is_from = bool(body.get("is_from"))
    rel = body.get("relation")
    if rel:
        outer = w.scope
        w.push()
        try:
            entry = w.range_var(rel, written=is_from)
            w.scope.entries.append(entry)
            for column in _names(body.get("attlist", ())):
                w.add_column(entry, column)
            if not body.get("attlist"):
                w.add_all_columns(entry)
            w.node(body.get("whereClause"))
        finally:
            w.scope = outer
        w.cls("write" if is_from else "read")
    query = body.get("query")
    if query:
        w.cls("read")
        _query(w, query)
    if body.get("is_program"):
        w.cls("admin", "function")
        w.note("COPY … PROGRAM runs a program on the database server")
    elif body.get("filename") is not None:
        w.cls("admin", "function")
        w.note("COPY … to/from a file on the database server")
    return "COPY"


def _s_show(w: _Walker, body: Node) -> str:
    w.cls("read")
    return "SHOW"


def _s_variable_set(w: _Walker, body: Node) -> str:
    kind = body.get("kind", "VAR_SET_VALUE")
    name = str(body.get("name") or "").lower()
    command = "RESET" if kind in ("VAR_RESET", "VAR_RESET_ALL") else "SET"
    if name in ("transaction", "transaction snapshot"):
        w.cls("transaction")
    else:
        w.cls("session")
    if protected_setting(name):
        w.cls("role")
        w.note(f'changes "{name}"')
    if name in _READ_ONLY_SETTINGS:
        w.note(f'changes "{name}"')
    if kind == "VAR_SET_VALUE" and name in ("standard_conforming_strings", "client_encoding"):
        args = body.get("args") or []
        risk = _lexer_risk(name, _const_value(args[0]) if len(args) == 1 else _UNKNOWN)
        if risk:
            w.cls("admin", "function")
            w.note(risk)
    if kind == "VAR_SET_MULTI":
        # SET TRANSACTION …, SET SESSION CHARACTERISTICS AS TRANSACTION … (and SET TRANSACTION
        # SNAPSHOT, whose argument is no DefElem and which changes no setting)
        prefix = "default_" if name == "session characteristics" else ""
        for option in _transaction_options(body.get("args", ())):
            w.changes(prefix + option)
            if option == "transaction_read_only":
                w.note("changes the transaction read-only mode")
    elif kind == "VAR_RESET_ALL":
        w.changes("all")
    elif name:
        w.changes(name)
    if kind == "VAR_RESET_ALL":
        if w.executing:
            w.sets_search_path = ()
            w.search_path_is_local = False
    elif name == "search_path" and w.executing:
        if kind == "VAR_SET_VALUE":
            values = [const_string(arg) for arg in body.get("args", ())]
            if all(v is not None for v in values):
                w.sets_search_path = tuple(v for v in values if v is not None)
            else:
                w.cls("function")
                w.note("search_path set to a non-constant value; it cannot be tracked")
        elif kind in ("VAR_SET_DEFAULT", "VAR_RESET"):
            w.sets_search_path = ()
        if w.sets_search_path is not None:
            w.search_path_is_local = bool(body.get("is_local"))
    return command


def _s_discard(w: _Walker, body: Node) -> str:
    w.cls("session")
    target = str(body.get("target", "DISCARD_ALL"))
    if target == "DISCARD_ALL" and w.executing:
        w.changes("all")  # DISCARD ALL includes RESET ALL
        w.sets_search_path = ()
        w.search_path_is_local = False
        w.deallocated = "*"
    return target.replace("_", " ")


_TRANSACTION_TAGS = {
    "TRANS_STMT_BEGIN": "BEGIN",
    "TRANS_STMT_START": "START TRANSACTION",
    "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK",
    "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
    "TRANS_STMT_RELEASE": "RELEASE",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}


def _s_transaction(w: _Walker, body: Node) -> str:
    kind = str(body.get("kind", ""))
    w.cls("transaction")
    if kind in ("TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED"):
        w.cls("admin")
        w.note("two-phase commit outlives the session")
    for option in _transaction_options(body.get("options", ())):
        w.changes(option)  # BEGIN / START TRANSACTION ISOLATION LEVEL …, READ ONLY, …
        if option == "transaction_read_only":
            w.note("changes the transaction read-only mode")
    return _TRANSACTION_TAGS.get(kind, "BEGIN")


def _transaction_options(items: Iterable[Any]) -> list[str]:
    """The settings named by transaction modes (``transaction_isolation``, …)."""
    out: list[str] = []
    for item in items:
        elem = item.get("DefElem") if type(item) is dict else None
        if elem and elem.get("defname"):
            out.append(str(elem["defname"]).lower())
    return out


def _merge(w: _Walker, facts: StatementFacts, *, runs: bool) -> None:
    """Take over the facts of a statement this one runs (``runs``) or prepares. A prepared
    statement is judged as if it ran now, but changes no setting until it is executed."""
    if w.executing:
        w.classes.update(facts.classes)
        w.written.update(dict.fromkeys(facts.written_tables))
        w.without_where = w.without_where or facts.without_where
        w.commands.extend(facts.all_commands)
        if runs:
            w.changes(*facts.settings)
    w.tables.update(dict.fromkeys(facts.tables))
    w.columns.update(dict.fromkeys(facts.columns))
    w.functions.update(dict.fromkeys(facts.functions))
    for text in facts.notes:
        w.note(text)


def _s_prepare(w: _Walker, body: Node) -> str:
    w.cls("session")
    inner = _wrapped(body.get("query"))
    if inner is not None:
        # judged as if it ran now, and kept for an EXECUTE later in the same string
        sub = _Walker(w.catalog, w.path, w.allowed, w.prepared)
        sub.executing = w.executing
        command = _statement(sub, *inner)
        facts = _facts(sub, w.sql, command)
        _merge(w, facts, runs=False)
        w.prepared_name = str(body.get("name", ""))
        w.prepared_facts = facts
    return "PREPARE"


def _s_execute(w: _Walker, body: Node) -> str:
    w.items(body.get("params", []))
    name = str(body.get("name", ""))
    known = w.prepared.get(name) if w.prepared is not None else None
    if known is None:
        if w.executing:
            w.classes.update(_EXECUTE_UNKNOWN)
        w.note(f'EXECUTE of unknown prepared statement "{name}": assumed read, write, function')
        return "EXECUTE"
    _merge(w, known, runs=True)
    return known.command


def _s_declare(w: _Walker, body: Node) -> str:
    w.cls("read")
    _query(w, body.get("query"))
    return "DECLARE CURSOR"


def _s_fetch(w: _Walker, body: Node) -> str:
    w.cls("read")
    return "MOVE" if body.get("ismove") else "FETCH"


def _s_close(w: _Walker, body: Node) -> str:
    w.cls("session")
    return "CLOSE CURSOR" if body.get("portalname") else "CLOSE CURSOR ALL"


def _s_deallocate(w: _Walker, body: Node) -> str:
    w.cls("session")
    if body.get("isall") or not body.get("name"):
        w.deallocated = "*"
        return "DEALLOCATE ALL"
    w.deallocated = str(body["name"])
    return "DEALLOCATE"


def _s_do(w: _Walker, body: Node) -> str:
    w.cls("function")
    w.note("DO runs a procedural block the analyser cannot see into")
    return "DO"


def _s_call(w: _Walker, body: Node) -> str:
    _h_call_stmt(w, body)
    return "CALL"


def _s_lock(w: _Walker, body: Node) -> str:
    mode = int(body.get("mode", 8) or 8)
    strong = mode > _LOCK_READ_MODES
    w.cls("write" if strong else "read")
    for item in body.get("relations", ()):
        w.range_var(item.get("RangeVar", {}), written=strong, expand=False)
    if strong:
        w.note("LOCK in a mode stronger than ROW EXCLUSIVE blocks writers")
    return "LOCK TABLE"


def _s_vacuum(w: _Walker, body: Node) -> str:
    w.cls("admin")
    for item in body.get("rels", ()):
        vr = item.get("VacuumRelation", {})
        rel = vr.get("relation")
        if rel:
            entry = w.range_var(rel, expand=False)
            for column in _names(vr.get("va_cols", ())):
                w.add_column(entry, column)
    return "VACUUM" if body.get("is_vacuumcmd") else "ANALYZE"


def _admin_with_relation(command: str) -> Statement:
    def run(w: _Walker, body: Node) -> str:
        w.cls("admin")
        rel = body.get("relation")
        if rel:
            w.range_var(rel, expand=False)
        return command

    return run


def _s_load(w: _Walker, body: Node) -> str:
    w.cls("admin", "function")
    w.note("LOAD loads a shared library into the server")
    return "LOAD"


def _s_create_table(w: _Walker, body: Node) -> str:
    w.cls("ddl")
    rel = body.get("relation") or {}
    w.created(rel)
    w.definition({"CreateStmt": {k: v for k, v in body.items() if k != "relation"}})
    return "CREATE TABLE"


def _s_create_foreign_table(w: _Walker, body: Node) -> str:
    _s_create_table(w, body.get("base") or {})
    return "CREATE FOREIGN TABLE"


def _s_create_table_as(w: _Walker, body: Node) -> str:
    into = body.get("into") or {}
    objtype = body.get("objtype", "OBJECT_TABLE")
    if body.get("is_select_into"):
        command = "SELECT"
    elif objtype == "OBJECT_MATVIEW":
        command = "CREATE MATERIALIZED VIEW"
    else:
        command = "CREATE TABLE AS"
    w.cls("ddl")
    qualified = w.created(into.get("rel") or {})
    if into.get("skipData"):
        w.definition(body.get("query"))
    else:
        w.cls("write")
        if w.executing:
            w.written[qualified] = None
        inner = _wrapped(body.get("query"))
        if inner is not None and inner[0] == "ExecuteStmt":
            _nested(w, *inner)  # CREATE TABLE … AS EXECUTE name
        else:
            _query(w, body.get("query"))
    return command


def _s_view(w: _Walker, body: Node) -> str:
    w.cls("ddl")
    w.created(body.get("view") or {})
    w.definition(body.get("query"))
    return "CREATE VIEW"


def _s_index(w: _Walker, body: Node) -> str:
    w.cls("ddl")
    rel = body.get("relation")
    if rel:
        outer = w.scope
        w.push()
        try:
            w.scope.entries.append(w.range_var(rel, expand=False))
            w.definition({"IndexStmt": {k: v for k, v in body.items() if k != "relation"}})
        finally:
            w.scope = outer
    return "CREATE INDEX"


def _s_alter_table(w: _Walker, body: Node) -> str:
    objtype = str(body.get("objtype", "OBJECT_TABLE"))
    w.cls("ddl")
    rewrites = objtype in ("OBJECT_TABLE", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE")
    if rewrites:
        w.cls("write")
    rel = body.get("relation") or {}
    outer = w.scope
    w.push()
    try:
        entry = w.range_var(rel, written=rewrites, expand=False)
        w.scope.entries.append(entry)
        for item in body.get("cmds", ()):
            cmd = item.get("AlterTableCmd", {})
            subtype = cmd.get("subtype")
            if subtype == "AT_ChangeOwner":
                w.cls("role")
            if cmd.get("name") and subtype not in ("AT_ChangeOwner",):
                w.add_column(entry, str(cmd["name"]))
            definition = cmd.get("def")
            wrapped = _wrapped(definition)
            if wrapped is not None and wrapped[0] == "ColumnDef":
                # defaults and USING expressions run against the existing rows
                w.items(wrapped[1].get("constraints", []))
                w.node(wrapped[1].get("raw_default"))
            else:
                w.node(definition)
    finally:
        w.scope = outer
    return f"ALTER {_noun(objtype)}"


def _drop_objects(w: _Walker, body: Node, remove: str) -> None:
    written = remove in _DATA_OBJECTS
    for item in body.get("objects", ()):
        wrapped = _wrapped(item)
        if wrapped is None:
            continue
        kind, inner = wrapped
        if kind == "List":
            names = _names(inner.get("items", ()))
        elif kind == "String":
            names = [str(inner.get("sval", ""))]
        else:
            continue
        if not names:
            continue
        if remove in _RELATION_OBJECTS:
            schema = names[-2] if len(names) > 1 else None
            w.relation(schema, names[-1], written=written, expand=False)
        elif remove == "OBJECT_SCHEMA":
            qualified = f"{names[-1]}.*"
            w.tables[qualified] = None
            if body.get("behavior") == "DROP_CASCADE" and w.executing:
                w.written[qualified] = None
        elif remove in ("OBJECT_POLICY", "OBJECT_RULE", "OBJECT_TRIGGER") and len(names) > 1:
            table = names[:-1]
            w.relation(table[-2] if len(table) > 1 else None, table[-1], expand=False)


def _s_drop(w: _Walker, body: Node) -> str:
    remove = str(body.get("removeType", "OBJECT_TABLE"))
    w.cls("ddl")
    if remove in _DATA_OBJECTS:
        w.cls("write")
    if remove == "OBJECT_SCHEMA" and body.get("behavior") == "DROP_CASCADE":
        w.cls("write")
        w.note("DROP SCHEMA … CASCADE drops every table in it")
    if remove in _ADMIN_OBJECTS:
        w.cls("admin")
    if remove in _ROLE_OBJECTS:
        w.cls("role")
    _drop_objects(w, body, remove)
    return f"DROP {_noun(remove)}"


def _object_relation(w: _Walker, objtype: str, obj: Any) -> None:
    """Record the relation named by a COMMENT / SECURITY LABEL object."""
    wrapped = _wrapped(obj)
    if wrapped is None or wrapped[0] != "List":
        return
    names = _names(wrapped[1].get("items", ()))
    if objtype == "OBJECT_COLUMN" and len(names) >= 2:
        column = names[-1]
        table = names[:-1]
        info, quals = w.relation(table[-2] if len(table) > 1 else None, table[-1], expand=False)
        entry = _Entry(table[-1], info, quals, True)
        w.add_column(entry, column)
    elif objtype in _RELATION_OBJECTS and names:
        w.relation(names[-2] if len(names) > 1 else None, names[-1], expand=False)


def _s_comment(w: _Walker, body: Node) -> str:
    w.cls("ddl")
    _object_relation(w, str(body.get("objtype", "")), body.get("object"))
    return "COMMENT"


def _s_seclabel(w: _Walker, body: Node) -> str:
    w.cls("role")
    _object_relation(w, str(body.get("objtype", "")), body.get("object"))
    return "SECURITY LABEL"


def _s_rename(w: _Walker, body: Node) -> str:
    rename = str(body.get("renameType", "OBJECT_TABLE"))
    w.cls("ddl")
    if rename in _ROLE_OBJECTS:
        w.cls("role")
    if rename in _ADMIN_OBJECTS:
        w.cls("admin")
    rel = body.get("relation")
    if rel:
        info, quals = w.relation(rel.get("schemaname"), str(rel.get("relname", "")), expand=False)
        if rename == "OBJECT_COLUMN" and body.get("subname"):
            w.add_column(_Entry("", info, quals, True), str(body["subname"]))
    if rename in ("OBJECT_COLUMN", "OBJECT_TABCONSTRAINT"):
        return f"ALTER {_noun(body.get('relationType'))}"
    return f"ALTER {_noun(rename)}"


def _s_alter_object(key: str, *extra: StatementClass) -> Statement:
    def run(w: _Walker, body: Node) -> str:
        objtype = str(body.get(key, ""))
        w.cls("ddl", *extra)
        if objtype in _ADMIN_OBJECTS:
            w.cls("admin")
        if objtype in _ROLE_OBJECTS:
            w.cls("role")
        rel = body.get("relation")
        if rel:
            w.range_var(rel, expand=False)
        return f"ALTER {_noun(objtype)}"

    return run


def _s_define(w: _Walker, body: Node) -> str:
    w.cls("ddl")
    return f"CREATE {_noun(body.get('kind'))}"


def _s_create_schema(w: _Walker, body: Node) -> str:
    w.cls("ddl")
    schema = body.get("schemaname")
    saved = w.path
    if schema:
        w.path = (str(schema), *saved)  # elements are created in the new schema
    try:
        for item in body.get("schemaElts", ()):
            wrapped = _wrapped(item)
            if wrapped is not None:
                _nested(w, *wrapped)
    finally:
        w.path = saved
    return "CREATE SCHEMA"


def _s_create_function(w: _Walker, body: Node) -> str:
    w.cls("ddl")
    w.definition(body.get("sql_body"))
    return "CREATE PROCEDURE" if body.get("is_procedure") else "CREATE FUNCTION"


def _s_alter_function(w: _Walker, body: Node) -> str:
    w.cls("ddl")
    return f"ALTER {_noun(body.get('objtype'), 'FUNCTION')}"


def _s_create_trigger(w: _Walker, body: Node) -> str:
    w.cls("ddl")
    rel = body.get("relation")
    if rel:
        w.range_var(rel, expand=False)
    names = _names(body.get("funcname", ()))
    if names:
        candidates = w.catalog.functions(names[-2] if len(names) > 1 else None, names[-1], w.path)
        for fn in candidates:
            w.functions[fn.qualified] = None
    w.definition(body.get("whenClause"))
    return "CREATE TRIGGER"


def _with_relation_definition(
    command: str, rel_key: str, definition_keys: tuple[str, ...]
) -> Statement:
    def run(w: _Walker, body: Node) -> str:
        w.cls("ddl")
        rel = body.get(rel_key)
        outer = w.scope
        w.push()
        try:
            if rel:
                w.scope.entries.append(w.range_var(rel, expand=False))
            for key in definition_keys:
                w.definition(body.get(key))
        finally:
            w.scope = outer
        return command

    return run


def _s_create_stats(w: _Walker, body: Node) -> str:
    w.cls("ddl")
    for item in body.get("relations", ()):
        rv = item.get("RangeVar")
        if rv:
            w.range_var(rv, expand=False)
    return "CREATE STATISTICS"


def _s_refresh(w: _Walker, body: Node) -> str:
    w.cls("write", "read")
    rel = body.get("relation")
    if rel:
        info, _ = w.relation(
            rel.get("schemaname"), str(rel.get("relname", "")), written=True, expand=False
        )
        if info is not None and info.depends_on:
            w._expand(info, False)
    return "REFRESH MATERIALIZED VIEW"


def _s_sequence(command: str, *classes: StatementClass, create: bool) -> Statement:
    def run(w: _Walker, body: Node) -> str:
        w.cls(*classes)
        seq = body.get("sequence") or {}
        if create:
            w.created(seq)
        else:
            w.range_var(seq, written="write" in classes, expand=False)
        return command

    return run


def _s_grant(w: _Walker, body: Node) -> str:
    w.cls("role")
    objtype = body.get("objtype")
    targtype = body.get("targtype")
    if objtype in ("OBJECT_TABLE", "OBJECT_SEQUENCE"):
        for item in body.get("objects", ()):
            wrapped = _wrapped(item)
            if wrapped is None:
                continue
            kind, inner = wrapped
            if kind == "RangeVar" and targtype == "ACL_TARGET_OBJECT":
                w.range_var(inner, expand=False)
            elif kind == "String" and targtype == "ACL_TARGET_ALL_IN_SCHEMA":
                w.tables[f"{inner.get('sval', '')}.*"] = None
    return "GRANT" if body.get("is_grant") else "REVOKE"


def _s_grant_role(w: _Walker, body: Node) -> str:
    w.cls("role")
    return "GRANT ROLE" if body.get("is_grant") else "REVOKE ROLE"


def _s_drop_owned(w: _Walker, body: Node) -> str:
    w.cls("role", "ddl", "write")
    w.note("DROP OWNED drops every object the roles own")
    return "DROP OWNED"


def _fixed(command: str, *classes: StatementClass) -> Statement:
    def run(w: _Walker, body: Node) -> str:
        w.cls(*classes)
        return command

    return run


_STATEMENTS: dict[str, Statement] = {
    # read / write
    "SelectStmt": _s_select,
    "InsertStmt": _s_dml("INSERT", _h_insert),
    "UpdateStmt": _s_dml("UPDATE", _h_update),
    "DeleteStmt": _s_dml("DELETE", _h_delete),
    "MergeStmt": _s_dml("MERGE", _h_merge),
    "TruncateStmt": _s_truncate,
    "CopyStmt": _s_copy,
    "VariableShowStmt": _s_show,
    "ExplainStmt": _s_explain,
    "DeclareCursorStmt": _s_declare,
    "FetchStmt": _s_fetch,
    "LockStmt": _s_lock,
    "RefreshMatViewStmt": _s_refresh,
    # function
    "DoStmt": _s_do,
    "CallStmt": _s_call,
    # session
    "VariableSetStmt": _s_variable_set,
    "DiscardStmt": _s_discard,
    "ListenStmt": _fixed("LISTEN", "session"),
    "UnlistenStmt": _fixed("UNLISTEN", "session"),
    "NotifyStmt": _fixed("NOTIFY", "session"),
    "PrepareStmt": _s_prepare,
    "ExecuteStmt": _s_execute,
    "DeallocateStmt": _s_deallocate,
    "ClosePortalStmt": _s_close,
    # transaction
    "TransactionStmt": _s_transaction,
    "ConstraintsSetStmt": _fixed("SET CONSTRAINTS", "transaction"),
    # admin
    "VacuumStmt": _s_vacuum,
    "ClusterStmt": _admin_with_relation("CLUSTER"),
    "ReindexStmt": _admin_with_relation("REINDEX"),
    "CheckPointStmt": _fixed("CHECKPOINT", "admin"),
    "AlterSystemStmt": _fixed("ALTER SYSTEM", "admin"),
    "LoadStmt": _s_load,
    "CreatedbStmt": _fixed("CREATE DATABASE", "admin", "ddl"),
    "DropdbStmt": _fixed("DROP DATABASE", "admin", "ddl"),
    "AlterDatabaseStmt": _fixed("ALTER DATABASE", "admin", "ddl"),
    "AlterDatabaseSetStmt": _fixed("ALTER DATABASE", "admin", "ddl"),
    "AlterDatabaseRefreshCollStmt": _fixed("ALTER DATABASE", "admin", "ddl"),
    "CreateTableSpaceStmt": _fixed("CREATE TABLESPACE", "admin", "ddl"),
    "DropTableSpaceStmt": _fixed("DROP TABLESPACE", "admin", "ddl"),
    "AlterTableSpaceOptionsStmt": _fixed("ALTER TABLESPACE", "admin", "ddl"),
    "AlterTableMoveAllStmt": _fixed("ALTER TABLE", "admin", "ddl"),
    "CreateExtensionStmt": _fixed("CREATE EXTENSION", "admin", "ddl"),
    "AlterExtensionStmt": _fixed("ALTER EXTENSION", "admin", "ddl"),
    "AlterExtensionContentsStmt": _fixed("ALTER EXTENSION", "admin", "ddl"),
    "CreateEventTrigStmt": _fixed("CREATE EVENT TRIGGER", "admin", "ddl"),
    "AlterEventTrigStmt": _fixed("ALTER EVENT TRIGGER", "admin", "ddl"),
    "CreatePLangStmt": _fixed("CREATE LANGUAGE", "admin", "ddl"),
    "CreateFdwStmt": _fixed("CREATE FOREIGN DATA WRAPPER", "admin", "ddl"),
    "AlterFdwStmt": _fixed("ALTER FOREIGN DATA WRAPPER", "admin", "ddl"),
    "CreateSubscriptionStmt": _fixed("CREATE SUBSCRIPTION", "admin", "ddl"),
    "AlterSubscriptionStmt": _fixed("ALTER SUBSCRIPTION", "admin", "ddl"),
    "DropSubscriptionStmt": _fixed("DROP SUBSCRIPTION", "admin", "ddl"),
    "CreateAmStmt": _fixed("CREATE ACCESS METHOD", "admin", "ddl"),
    # role
    "GrantStmt": _s_grant,
    "GrantRoleStmt": _s_grant_role,
    "CreateRoleStmt": _fixed("CREATE ROLE", "role"),
    "AlterRoleStmt": _fixed("ALTER ROLE", "role"),
    "AlterRoleSetStmt": _fixed("ALTER ROLE", "role"),
    "DropRoleStmt": _fixed("DROP ROLE", "role"),
    "AlterDefaultPrivilegesStmt": _fixed("ALTER DEFAULT PRIVILEGES", "role"),
    "ReassignOwnedStmt": _fixed("REASSIGN OWNED", "role", "ddl"),
    "DropOwnedStmt": _s_drop_owned,
    "SecLabelStmt": _s_seclabel,
    "AlterOwnerStmt": _s_alter_object("objectType", "role"),
    "CreateUserMappingStmt": _fixed("CREATE USER MAPPING", "role", "ddl"),
    "AlterUserMappingStmt": _fixed("ALTER USER MAPPING", "role", "ddl"),
    "DropUserMappingStmt": _fixed("DROP USER MAPPING", "role", "ddl"),
    # ddl
    "CreateStmt": _s_create_table,
    "CreateForeignTableStmt": _s_create_foreign_table,
    "CreateTableAsStmt": _s_create_table_as,
    "ViewStmt": _s_view,
    "IndexStmt": _s_index,
    "AlterTableStmt": _s_alter_table,
    "DropStmt": _s_drop,
    "RenameStmt": _s_rename,
    "AlterObjectSchemaStmt": _s_alter_object("objectType"),
    "AlterObjectDependsStmt": _s_alter_object("objectType"),
    "CommentStmt": _s_comment,
    "DefineStmt": _s_define,
    "CreateSchemaStmt": _s_create_schema,
    "CreateFunctionStmt": _s_create_function,
    "AlterFunctionStmt": _s_alter_function,
    "CreateTrigStmt": _s_create_trigger,
    "RuleStmt": _with_relation_definition("CREATE RULE", "relation", ("whereClause", "actions")),
    "CreatePolicyStmt": _with_relation_definition("CREATE POLICY", "table", ("qual", "with_check")),
    "AlterPolicyStmt": _with_relation_definition("ALTER POLICY", "table", ("qual", "with_check")),
    "CreateStatsStmt": _s_create_stats,
    "AlterStatsStmt": _fixed("ALTER STATISTICS", "ddl"),
    "CreateSeqStmt": _s_sequence("CREATE SEQUENCE", "ddl", create=True),
    "AlterSeqStmt": _s_sequence("ALTER SEQUENCE", "ddl", "write", create=False),
    "CompositeTypeStmt": _fixed("CREATE TYPE", "ddl"),
    "CreateEnumStmt": _fixed("CREATE TYPE", "ddl"),
    "CreateRangeStmt": _fixed("CREATE TYPE", "ddl"),
    "AlterEnumStmt": _fixed("ALTER TYPE", "ddl"),
    "AlterTypeStmt": _fixed("ALTER TYPE", "ddl"),
    "CreateDomainStmt": _fixed("CREATE DOMAIN", "ddl"),
    "AlterDomainStmt": _fixed("ALTER DOMAIN", "ddl"),
    "CreateCastStmt": _fixed("CREATE CAST", "ddl"),
    "CreateConversionStmt": _fixed("CREATE CONVERSION", "ddl"),
    "CreateOpClassStmt": _fixed("CREATE OPERATOR CLASS", "ddl"),
    "CreateOpFamilyStmt": _fixed("CREATE OPERATOR FAMILY", "ddl"),
    "AlterOpFamilyStmt": _fixed("ALTER OPERATOR FAMILY", "ddl"),
    "AlterOperatorStmt": _fixed("ALTER OPERATOR", "ddl"),
    "CreateTransformStmt": _fixed("CREATE TRANSFORM", "ddl"),
    "AlterCollationStmt": _fixed("ALTER COLLATION", "ddl"),
    "AlterTSDictionaryStmt": _fixed("ALTER TEXT SEARCH DICTIONARY", "ddl"),
    "AlterTSConfigurationStmt": _fixed("ALTER TEXT SEARCH CONFIGURATION", "ddl"),
    "CreateForeignServerStmt": _fixed("CREATE SERVER", "ddl"),
    "AlterForeignServerStmt": _fixed("ALTER SERVER", "ddl"),
    "ImportForeignSchemaStmt": _fixed("IMPORT FOREIGN SCHEMA", "ddl"),
    "CreatePublicationStmt": _fixed("CREATE PUBLICATION", "ddl"),
    "AlterPublicationStmt": _fixed("ALTER PUBLICATION", "ddl"),
}

_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def _s_unknown(w: _Walker, kind: str, body: Node) -> str:
    if w.executing:
        w.classes.update(_ALL_DANGEROUS)
    w.note(f"unrecognised statement {kind}: assumed admin, role, function, ddl and write")
    w.definition({kind: body})
    return _CAMEL.sub(" ", kind.removesuffix("Stmt")).upper()


def _statement(w: _Walker, kind: str, body: Node) -> str:
    handler = _STATEMENTS.get(kind)
    if handler is None:
        return _s_unknown(w, kind, body)
    return handler(w, body)


def _nested(w: _Walker, kind: str, body: Node) -> str:
    """Analyse a statement run inside this one (EXPLAIN ANALYZE, CREATE SCHEMA elements, AS
    EXECUTE); its tag goes before the tags of the statements it runs itself."""
    mark = len(w.commands)
    command = _statement(w, kind, body)
    if w.executing:
        w.commands.insert(mark, command)
    return command


# Tags of the queries COPY (query), DECLARE CURSOR and CREATE TABLE AS may run.
_QUERY_COMMANDS = {
    "SelectStmt": "SELECT",
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
}


def _query(w: _Walker, query: Any) -> None:
    """Walk the query of COPY (query) / DECLARE CURSOR / CREATE TABLE AS, recording its tag."""
    inner = _wrapped(query)
    if inner is not None:
        command = _QUERY_COMMANDS.get(inner[0])
        if command is not None:
            w.ran(command)
    w.node(query)


# --------------------------------------------------------------------------- entry points


def _facts(w: _Walker, sql: str, command: str) -> StatementFacts:
    return StatementFacts(
        sql=sql,
        command=command,
        classes=frozenset(w.classes),
        tables=tuple(w.tables),
        written_tables=tuple(w.written),
        columns=tuple(w.columns),
        functions=tuple(w.functions),
        without_where=w.without_where,
        commands=tuple(dict.fromkeys((command, *w.commands))),
        settings=tuple(w.settings),
        sets_search_path=w.sets_search_path,
        search_path_is_local=w.search_path_is_local,
        notes=tuple(w.notes),
    )


def _parse(sql: str) -> list[Any]:
    try:
        tree = json.loads(parser.parse_sql_json(sql))
    except parser.ParseError as exc:
        raise AnalysisError(str(exc)) from None
    except (ValueError, TypeError) as exc:  # e.g. invalid UTF-8 surrogates
        raise AnalysisError(f"statement could not be parsed: {exc}") from None
    stmts = tree.get("stmts", [])
    return stmts if isinstance(stmts, list) else []


def _slice(sql: str, encoded: bytes | None, start: int, length: int) -> str:
    if encoded is None:
        text = sql[start : start + length] if length else sql[start:]
    else:
        raw = encoded[start : start + length] if length else encoded[start:]
        text = raw.decode("utf-8", errors="replace")
    return text.strip()


def _analyse(
    sql: str,
    catalog: Catalog,
    search_path: Sequence[str],
    allowed_functions: frozenset[str] = frozenset(),
    *,
    prepared: Mapping[str, StatementFacts] | None = None,
    current_user: str = "",
) -> list[StatementFacts]:
    """See :func:`analyse`."""
    stmts = _parse(sql)
    if not stmts:
        return []
    encoded = None if sql.isascii() else sql.encode("utf-8")
    initial = tuple(search_path)
    path = initial
    known = prepared
    results: list[StatementFacts] = []
    for raw in stmts:
        text = _slice(sql, encoded, int(raw.get("stmt_location", 0)), int(raw.get("stmt_len", 0)))
        item = _wrapped(raw.get("stmt"))
        if item is None:
            continue
        walker = _Walker(catalog, path, allowed_functions, known)
        walker.sql = text
        command = _statement(walker, *item)
        facts = _facts(walker, text, command)
        results.append(facts)
        if walker.prepared_facts is not None or walker.deallocated is not None:
            changed = dict(known or {})
            if walker.deallocated == "*":
                changed.clear()
            elif walker.deallocated is not None:
                changed.pop(walker.deallocated, None)
            if walker.prepared_name is not None and walker.prepared_facts is not None:
                changed[walker.prepared_name] = walker.prepared_facts
            known = changed
        if facts.sets_search_path is not None:
            if not facts.sets_search_path:
                path = initial
            else:
                temp = next((s for s in path if s.startswith("pg_temp")), None)
                path = effective_search_path(facts.sets_search_path, current_user, temp)
    return results


def _prepared_statement(
    sql: str,
    catalog: Catalog,
    search_path: Sequence[str],
    allowed_functions: frozenset[str] = frozenset(),
) -> tuple[str, StatementFacts] | None:
    """See :func:`prepared_statement`."""
    stmts = _parse(sql)
    if len(stmts) != 1:
        return None
    item = _wrapped(stmts[0].get("stmt"))
    if item is None or item[0] != "PrepareStmt":
        return None
    walker = _Walker(catalog, tuple(search_path), allowed_functions, None)
    walker.sql = sql.strip()
    _statement(walker, *item)
    if walker.prepared_name is None or walker.prepared_facts is None:
        return None
    return walker.prepared_name, walker.prepared_facts


_DEEP_RECURSION_LIMIT = 12000


def _deep(run: Callable[[], _T]) -> _T:
    """Run ``run``; if the tree is too deep for the default recursion limit (``json.loads``
    and the walker recurse per nesting level: ~500 chained operators), retry once with a
    higher limit, and refuse the statement if even that is not enough."""
    try:
        return run()
    except RecursionError:
        pass
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, _DEEP_RECURSION_LIMIT))
    try:
        return run()
    except RecursionError:
        raise AnalysisError("statement is nested too deeply to analyse") from None
    finally:
        sys.setrecursionlimit(old)


def analyse(
    sql: str,
    catalog: Catalog,
    search_path: Sequence[str],
    allowed_functions: frozenset[str] = frozenset(),
    *,
    prepared: Mapping[str, StatementFacts] | None = None,
    current_user: str = "",
) -> list[StatementFacts]:
    """Analyse every statement of ``sql``; one :class:`StatementFacts` per statement.

    ``search_path`` is the session's effective path (``effective_search_path``).
    ``allowed_functions`` holds qualified names (``schema.name``) whose calls are never
    class ``function``. ``prepared`` maps SQL-level prepared statement names to the facts
    of their inner statement (:func:`prepared_statement`), so ``EXECUTE`` is judged exactly;
    PREPARE / DEALLOCATE / DISCARD ALL earlier in ``sql`` are tracked too. ``current_user``
    expands ``$user`` when a ``SET search_path`` in ``sql`` applies to the statements after
    it. An empty or comment-only string gives ``[]``.

    Raises :class:`AnalysisError` when the text does not parse (or is nested too deeply).
    """
    return _deep(
        lambda: _analyse(
            sql,
            catalog,
            search_path,
            allowed_functions,
            prepared=prepared,
            current_user=current_user,
        )
    )


def prepared_statement(
    sql: str,
    catalog: Catalog,
    search_path: Sequence[str],
    allowed_functions: frozenset[str] = frozenset(),
) -> tuple[str, StatementFacts] | None:
    """For a single SQL-level ``PREPARE name AS stmt``: ``(name, facts of stmt)``, the value
    to keep for ``analyse(..., prepared=...)``; None for anything else. The inner facts carry
    the inner command tag (DELETE, …) and its own ``without_where``."""
    return _deep(lambda: _prepared_statement(sql, catalog, search_path, allowed_functions))
