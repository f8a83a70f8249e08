"""A snapshot of the live catalog, and name resolution the way PostgreSQL does it. Pure.

* :data:`CATALOG_SQL` loads everything the analyser needs in one round trip.
* :func:`snapshot_from_rows` turns its result rows into a :class:`CatalogSnapshot`.
* :func:`effective_search_path` turns a ``search_path`` setting into the list of schemas
  PostgreSQL actually searches (``$user`` expanded, ``pg_temp`` / ``pg_catalog`` added).

Row format of ``CATALOG_SQL`` (two text columns, so the gateway can read plain text
DataRows and tests can use any driver):

* ``kind``: ``'r'`` for a relation, ``'f'`` for a function.
* ``doc``: a JSON array, as text.

  - relation: ``[oid, schema, name, relkind, [column, ...], [[dep_schema, dep_name], ...],
    [[attnum, type_oid, typmod], ...], definition]`` (the dependencies are the relations a
    view or materialized view reads, from ``pg_depend`` entries of its ``_RETURN`` rule in
    ``pg_rewrite``; ``definition`` is ``pg_get_viewdef`` for views and materialized views);
  - function: ``[oid, schema, name, provolatile, prokind, builtin, prosecdef, language,
    retset, body, search_path]`` (``builtin`` is ``oid < 16384``, i.e. shipped with
    PostgreSQL; ``body`` is the SQL of a non-built-in SQL function; ``search_path`` the one
    its ``proconfig`` sets);
  - ``'s'``: ``[search_path, current_user]`` of the loading session. ``pg_get_viewdef``
    qualifies exactly the names that this path would not find, so view definitions resolve
    along it (:attr:`CatalogSnapshot.definition_search_path`).

Relations of kinds ``r v m p f S`` are loaded (tables, views, materialized views,
partitioned and foreign tables, sequences) from every schema except TOAST and other
sessions' temporary schemas.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from typing import Any, cast

from pgguard.policy.facts import FunctionInfo, RelationInfo

__all__ = [
    "CATALOG_SQL",
    "CatalogSnapshot",
    "effective_search_path",
    "snapshot_from_rows",
    "split_search_path",
]

FIRST_NORMAL_OBJECT_ID = 16384
RELATION_KINDS = ("r", "v", "m", "p", "f", "S")

CATALOG_SQL = """\
SELECT 'r'::text AS kind,
       json_build_array(
         c.oid::bigint, n.nspname, c.relname, c.relkind,
         COALESCE((SELECT json_agg(a.attname ORDER BY a.attnum)
                     FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
                  '[]'::json),
         COALESCE((SELECT json_agg(json_build_array(dep.nspname, dep.relname))
                     FROM (SELECT DISTINCT dn.nspname, dc.relname
                             FROM pg_catalog.pg_rewrite rw
                             JOIN pg_catalog.pg_depend d
                               ON d.classid = 'pg_catalog.pg_rewrite'::regclass
                              AND d.objid = rw.oid
                              AND d.refclassid = 'pg_catalog.pg_class'::regclass
                             JOIN pg_catalog.pg_class dc ON dc.oid = d.refobjid
                             JOIN pg_catalog.pg_namespace dn ON dn.oid = dc.relnamespace
                            WHERE rw.ev_class = c.oid AND d.refobjid <> c.oid
                              AND dc.relkind IN ('r', 'v', 'm', 'p', 'f', 'S')) dep),
                  '[]'::json),
         COALESCE((SELECT json_agg(json_build_array(a.attnum, a.atttypid::bigint, a.atttypmod)
                                   ORDER BY a.attnum)
                     FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
                  '[]'::json),
         CASE WHEN c.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(c.oid) END
       )::text AS doc
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f', 'S')
   AND n.nspname <> 'pg_toast'
   AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
   AND NOT pg_catalog.pg_is_other_temp_schema(n.oid)
UNION ALL
SELECT 'f'::text,
       json_build_array(
         p.oid::bigint, n.nspname, p.proname, p.provolatile, p.prokind,
         p.oid < 16384, p.prosecdef, l.lanname, p.proretset,
         CASE WHEN l.lanname = 'sql' AND p.oid >= 16384 THEN p.prosrc END,
         (SELECT substr(cfg, 13) FROM pg_catalog.unnest(p.proconfig) cfg
           WHERE cfg LIKE 'search\\_path=%' LIMIT 1)
       )::text
  FROM pg_catalog.pg_proc p
  JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
  JOIN pg_catalog.pg_language l ON l.oid = p.prolang
 WHERE NOT pg_catalog.pg_is_other_temp_schema(n.oid)
UNION ALL
SELECT 's'::text,
       json_build_array(pg_catalog.current_setting('search_path'), current_user)::text
"""


def _is_temp(schema: str) -> bool:
    return schema.startswith("pg_temp")


class CatalogSnapshot:
    """An immutable :class:`~pgguard.policy.facts.Catalog` built from lists of entries.

    Resolution follows PostgreSQL: a qualified name is looked up in its schema (``pg_temp``
    meaning the session's temporary schema when the path has one); an unqualified relation
    is the first match along ``search_path``. Functions are never looked up in temporary
    schemas, and :meth:`functions` returns every candidate along the path (overloads in
    every schema): without argument types the analyser cannot pick the overload PostgreSQL
    would, so it judges all of them.
    """

    __slots__ = (
        "__weakref__",
        "_by_oid",
        "_functions",
        "_relations",
        "definition_search_path",
        "function_count",
        "relation_count",
    )

    def __init__(
        self,
        relations: Iterable[RelationInfo] = (),
        functions: Iterable[FunctionInfo] = (),
        definition_search_path: Sequence[str] = ("pg_catalog", "public"),
    ) -> None:
        rels: dict[tuple[str, str], RelationInfo] = {}
        by_oid: dict[int, RelationInfo] = {}
        for rel in relations:
            rels.setdefault((rel.schema, rel.name), rel)
            by_oid.setdefault(rel.oid, rel)
        self._by_oid = by_oid
        #: The effective search_path view definitions (and function bodies without their
        #: own path) were written for.
        self.definition_search_path = tuple(definition_search_path)
        funcs: dict[tuple[str, str], list[FunctionInfo]] = {}
        for fn in functions:
            funcs.setdefault((fn.schema, fn.name), []).append(fn)
        self._relations = rels
        self._functions = {key: tuple(value) for key, value in funcs.items()}
        self.relation_count = len(rels)
        self.function_count = sum(len(v) for v in self._functions.values())

    def __repr__(self) -> str:
        return f"CatalogSnapshot({self.relation_count} relations, {self.function_count} functions)"

    def relation(
        self, schema: str | None, name: str, search_path: Sequence[str]
    ) -> RelationInfo | None:
        rels = self._relations
        if schema is not None:
            if schema == "pg_temp":
                for entry in search_path:
                    if _is_temp(entry):
                        return rels.get((entry, name))
            return rels.get((schema, name))
        for entry in search_path:
            found = rels.get((entry, name))
            if found is not None:
                return found
        return None

    def functions(
        self, schema: str | None, name: str, search_path: Sequence[str]
    ) -> Sequence[FunctionInfo]:
        funcs = self._functions
        if schema is not None:
            return funcs.get((schema, name), ())
        found: list[FunctionInfo] = []
        for entry in search_path:
            if _is_temp(entry):
                continue
            candidates = funcs.get((entry, name))
            if candidates:
                found.extend(candidates)
        return found

    def relation_by_oid(self, oid: int) -> RelationInfo | None:
        return self._by_oid.get(oid)

    def all_relations(self) -> tuple[RelationInfo, ...]:
        return tuple(self._relations.values())

    def all_functions(self) -> tuple[FunctionInfo, ...]:
        return tuple(fn for group in self._functions.values() for fn in group)


def _decode(doc: object) -> list[Any]:
    if isinstance(doc, bytes | bytearray | memoryview):
        doc = bytes(doc).decode("utf-8")
    if isinstance(doc, str):
        doc = json.loads(doc)
    if not isinstance(doc, list):
        raise ValueError(f"catalog row document is not a JSON array: {doc!r:.80}")
    return doc


def _as_bool(value: object) -> bool:
    if isinstance(value, str):
        return value.lower() in ("t", "true", "1", "on", "yes")
    return bool(value)


def snapshot_from_rows(rows: Iterable[Sequence[object]]) -> CatalogSnapshot:
    """Build a snapshot from the rows of :data:`CATALOG_SQL`.

    Each row is ``(kind, doc)``: ``kind`` a ``str`` (``'r'`` / ``'f'``; bytes accepted),
    ``doc`` the JSON text of the array described in the module docstring (``str`` or UTF-8
    ``bytes``, exactly as a text-format DataRow carries it; an already-decoded list is
    accepted too). Unknown kinds are ignored, so the query can grow.
    """
    relations: list[RelationInfo] = []
    functions: list[FunctionInfo] = []
    path: tuple[str, ...] = ("pg_catalog", "public")
    for row in rows:
        kind = row[0]
        if isinstance(kind, bytes | bytearray | memoryview):
            kind = bytes(kind).decode("ascii")
        doc = _decode(row[1])
        if kind == "r":
            oid, schema, name, relkind, columns, deps = doc[:6]
            attrs = doc[6] if len(doc) > 6 and doc[6] else []
            relations.append(
                RelationInfo(
                    oid=int(oid),
                    schema=str(schema),
                    name=str(name),
                    kind=str(relkind),
                    columns=tuple(str(c) for c in columns or ()),
                    depends_on=tuple(f"{s}.{n}" for s, n in deps or ()),
                    attnums=tuple(int(a[0]) for a in attrs),
                    column_types=tuple((int(a[1]), int(a[2])) for a in attrs),
                    definition=str(doc[7]) if len(doc) > 7 and doc[7] is not None else None,
                )
            )
        elif kind == "f":
            oid, schema, name, volatility, prokind, builtin, secdef, language = doc[:8]
            functions.append(
                FunctionInfo(
                    oid=int(oid),
                    schema=str(schema),
                    name=str(name),
                    volatility=cast(Any, str(volatility)),
                    kind=cast(Any, str(prokind)),
                    builtin=_as_bool(builtin),
                    security_definer=_as_bool(secdef),
                    language=str(language),
                    returns_set=_as_bool(doc[8]) if len(doc) > 8 else False,
                    body=str(doc[9]) if len(doc) > 9 and doc[9] is not None else None,
                    body_search_path=(
                        str(doc[10]) if len(doc) > 10 and doc[10] is not None else None
                    ),
                )
            )
        elif kind == "s":
            setting, user = doc[:2]
            with contextlib.suppress(ValueError):
                path = effective_search_path(str(setting), str(user))
    return CatalogSnapshot(relations, functions, path)


def split_search_path(setting: str) -> tuple[str, ...]:
    """Split a ``search_path`` setting string into schema names, as PostgreSQL's
    ``SplitIdentifierString`` does: comma separated, whitespace around names ignored,
    unquoted names folded to lower case, ``"quoted"`` names kept verbatim (``""`` is a
    quote). ``"$user"`` and ``pg_temp`` are returned as written. Raises ``ValueError`` on a
    malformed list (PostgreSQL rejects such a setting)."""
    names: list[str] = []
    text = setting
    i = 0
    n = len(text)
    while i < n and text[i].isspace():
        i += 1
    if i == n:
        return ()
    while True:
        if i < n and text[i] == '"':
            i += 1
            buf: list[str] = []
            while True:
                end = text.find('"', i)
                if end < 0:
                    raise ValueError(f"unterminated quoted identifier in {setting!r}")
                buf.append(text[i:end])
                i = end + 1
                if i < n and text[i] == '"':
                    buf.append('"')
                    i += 1
                    continue
                break
            name = "".join(buf)
        else:
            start = i
            while i < n and text[i] != "," and not text[i].isspace():
                if text[i] == '"':
                    raise ValueError(f"misplaced quote in {setting!r}")
                i += 1
            name = text[start:i].lower()
        if not name:
            raise ValueError(f"empty schema name in {setting!r}")
        names.append(name[:63])
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            break
        if text[i] != ",":
            raise ValueError(f"expected a comma in {setting!r}")
        i += 1
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            raise ValueError(f"trailing comma in {setting!r}")
    return tuple(names)


def effective_search_path(
    setting: str | Sequence[str], current_user: str, temp_schema: str | None = None
) -> tuple[str, ...]:
    """The schemas PostgreSQL searches for ``setting`` (a ``search_path`` string such as
    ``'"$user", public'``, or already-split names such as
    :attr:`StatementFacts.sets_search_path`).

    ``"$user"`` becomes ``current_user`` (dropped when empty); ``pg_temp`` becomes
    ``temp_schema`` (dropped when the session has none). As in PostgreSQL's
    ``recomputeNamespacePath``, ``pg_catalog`` is searched first unless the setting lists
    it elsewhere, and the temporary schema is searched before everything unless the setting
    lists it (for relations: :class:`CatalogSnapshot` never looks up functions there).
    Duplicates keep their first position.
    """
    names = split_search_path(setting) if isinstance(setting, str) else tuple(setting)
    explicit: list[str] = []
    temp_listed = False
    for name in names:
        if name == "$user":
            if current_user:
                explicit.append(current_user)
        elif name == "pg_temp":
            temp_listed = True
            if temp_schema:
                explicit.append(temp_schema)
        else:
            if temp_schema and name == temp_schema:
                temp_listed = True
            explicit.append(name)
    result: list[str] = []
    if temp_schema and not temp_listed:
        result.append(temp_schema)
    if "pg_catalog" not in explicit:
        result.append("pg_catalog")
    for name in explicit:
        if name not in result:
            result.append(name)
    return tuple(result)
