"""Unit tests for the column-lineage analyser (pgguard.masking.lineage).

Everything runs against a hand-built :class:`CatalogSnapshot`: tables in two schemas, views
(and views of views) given as ``pg_get_viewdef``-style text, a materialized view,
``pg_statistic`` with a ``pg_stats``-like view over it, built-in functions (low oids), SQL
functions with bodies, a plpgsql function and procedures. Each rule of the module docstring
has its own tests; the hostile cases check that a masked column's value never comes out
CLEAN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pytest

import pgguard.masking.lineage as lineage_module
from pgguard.masking.lineage import (
    CLEAN,
    OPAQUE,
    AnalysisError,
    ColumnLineage,
    CopyOptions,
    StatementLineage,
    WriteFlow,
    lineage,
)
from pgguard.policy.analysis import _parse
from pgguard.policy.catalog import CatalogSnapshot
from pgguard.policy.facts import FunctionInfo, RelationInfo

# --------------------------------------------------------------------------- catalog

PATH = ("pg_catalog", "public")
SALES_FIRST = ("pg_catalog", "sales", "public")

PG_STATS_DEF = """ SELECT n.nspname AS schemaname,
    c.relname AS tablename,
    a.attname,
    s.stanullfrac AS null_frac,
        CASE
            WHEN (s.stakind1 = 1) THEN s.stavalues1
            WHEN (s.stakind2 = 1) THEN s.stavalues2
            ELSE NULL::anyarray
        END AS most_common_vals
   FROM (((pg_statistic s
     JOIN pg_class c ON ((c.oid = s.starelid)))
     JOIN pg_attribute a ON (((c.oid = a.attrelid) AND (a.attnum = s.staattnum))))
     LEFT JOIN pg_namespace n ON ((n.oid = c.relnamespace)))
  WHERE (NOT a.attisdropped);"""

PG_STATS_EXT_EXPRS_DEF = """ SELECT d.stxoid AS statistics_oid,
    d.stxdexpr AS expr_stats
   FROM pg_statistic_ext_data d;"""


def _rel(
    oid: int, schema: str, name: str, kind: str, cols: str, definition: str | None = None
) -> RelationInfo:
    return RelationInfo(oid, schema, name, kind, tuple(cols.split()), definition=definition)


Kind = Literal["f", "p", "a", "w"]


def _builtin(oid: int, name: str, kind: Kind = "f", returns_set: bool = False) -> FunctionInfo:
    return FunctionInfo(oid, "pg_catalog", name, "i", kind, builtin=True, returns_set=returns_set)


def _sql(
    oid: int,
    name: str,
    body: str | None,
    *,
    schema: str = "public",
    kind: Kind = "f",
    path: str | None = None,
    returns_set: bool = False,
) -> FunctionInfo:
    return FunctionInfo(
        oid,
        schema,
        name,
        "s",
        kind,
        language="sql",
        returns_set=returns_set,
        body=body,
        body_search_path=path,
    )


def _pl(oid: int, name: str, *, schema: str = "public", kind: Kind = "f") -> FunctionInfo:
    return FunctionInfo(oid, schema, name, "v", kind, language="plpgsql")


RELATIONS = [
    _rel(16400, "public", "customers", "r", "id name email ssn"),
    _rel(16401, "public", "notes", "r", "id body customer_id"),
    _rel(16402, "public", "orders", "p", "id customer_id amount"),
    _rel(16403, "public", "ext_users", "f", "id email"),
    _rel(16404, "public", "seq", "S", "last_value log_cnt is_called"),
    RelationInfo(16405, "public", "MixedCase", "r", ("Id", "Secret")),
    _rel(16406, "sales", "customers", "r", "id email"),
    _rel(16407, "sales", "leads", "r", "id phone"),
    _rel(
        16410,
        "public",
        "v_cust",
        "v",
        "id email",
        " SELECT customers.id,\n    customers.email\n   FROM customers;",
    ),
    _rel(16411, "public", "v_of_v", "v", "email", " SELECT v_cust.email\n   FROM v_cust;"),
    _rel(
        16412,
        "public",
        "v_upper",
        "v",
        "id shout",
        " SELECT customers.id,\n    upper(customers.email) AS shout\n   FROM customers;",
    ),
    _rel(16413, "public", "v_nodef", "v", "a"),
    _rel(16414, "public", "v_broken", "v", "a", "SELEC garbage FROM"),
    _rel(16415, "public", "v_loop1", "v", "a", " SELECT v_loop2.a FROM v_loop2;"),
    _rel(16416, "public", "v_loop2", "v", "a", " SELECT v_loop1.a FROM v_loop1;"),
    _rel(16417, "public", "mv_emails", "m", "email", " SELECT customers.email\n   FROM customers;"),
    _rel(
        16418,
        "public",
        "v_union",
        "v",
        "x",
        " SELECT customers.email AS x FROM customers\nUNION\n SELECT leads.phone FROM sales.leads;",
    ),
    _rel(16419, "public", "v_filtered", "v", "id", " SELECT id FROM customers WHERE ssn IS NULL;"),
    _rel(16420, "public", "v_pl", "v", "x", " SELECT f_pl() AS x;"),
    _rel(
        100,
        "pg_catalog",
        "pg_statistic",
        "r",
        "starelid staattnum stanullfrac stakind1 stakind2 stavalues1 stavalues2",
    ),
    _rel(101, "pg_catalog", "pg_statistic_ext_data", "r", "stxoid stxdndistinct stxdexpr"),
    _rel(102, "pg_catalog", "pg_class", "r", "oid relname relnamespace"),
    _rel(103, "pg_catalog", "pg_attribute", "r", "attrelid attname attnum attisdropped"),
    _rel(104, "pg_catalog", "pg_namespace", "r", "oid nspname"),
    _rel(
        105,
        "pg_catalog",
        "pg_stats",
        "v",
        "schemaname tablename attname null_frac most_common_vals",
        PG_STATS_DEF,
    ),
    _rel(
        106,
        "pg_catalog",
        "pg_stats_ext_exprs",
        "v",
        "statistics_oid expr_stats",
        PG_STATS_EXT_EXPRS_DEF,
    ),
]

FUNCTIONS = [
    _builtin(1, "upper"),
    _builtin(2, "lower"),
    _builtin(3, "concat"),
    _builtin(4, "string_agg", "a"),
    _builtin(5, "array_agg", "a"),
    _builtin(6, "row_to_json"),
    _builtin(7, "to_jsonb"),
    _builtin(8, "count", "a"),
    _builtin(9, "coalesce"),
    _builtin(10, "query_to_xml"),
    _builtin(11, "generate_series", returns_set=True),
    _builtin(12, "unnest", returns_set=True),
    _builtin(13, "jsonb_build_object"),
    _builtin(14, "format"),
    _builtin(15, "length"),
    _builtin(16, "substr"),
    _builtin(17, "sum", "a"),
    _builtin(18, "lag", "w"),
    _builtin(19, "table_to_xml"),
    _builtin(20, "ts_stat", returns_set=True),
    FunctionInfo(16500, "public", "dblink", "v", language="c", returns_set=True),
    _sql(16501, "f_sql", "SELECT email FROM customers WHERE id = $1"),
    _sql(16502, "f_sql_set", "SELECT id, email FROM customers", returns_set=True),
    _sql(16503, "f_rec", "SELECT f_rec($1 - 1)"),
    _pl(16504, "f_pl"),
    _sql(16505, "f_write", "INSERT INTO notes(body) VALUES ($1); SELECT 1"),
    _sql(16506, "f_atomic", ""),
    _sql(16507, "f_path", "SELECT email FROM customers LIMIT 1", path="sales"),
    _sql(16508, "f_param", "SELECT upper(name) || suffix FROM customers"),
    _sql(16509, "p_sql", "INSERT INTO notes(body) SELECT email FROM customers", kind="p"),
    _pl(16510, "p_pl", kind="p"),
    _sql(16511, "f_over", "SELECT name FROM customers"),
    _pl(16512, "f_over"),
    _sql(16513, "fullname", "SELECT $1.name"),
    _sql(16514, "f_broken", "SELEC nope"),
    _sql(16515, "f_calls_pl", "SELECT f_pl()"),
    _pl(16516, "count", schema="sales"),
]

CATALOG = CatalogSnapshot(RELATIONS, FUNCTIONS, ("pg_catalog", "public"))


# --------------------------------------------------------------------------- helpers


def src(*sources: str, direct: bool = False, opaque: bool = False) -> ColumnLineage:
    """A lineage; bare column names are customers' columns."""
    full = frozenset(s if "." in s else f"public.customers.{s}" for s in sources)
    return ColumnLineage(full, direct, opaque)


def d(source: str) -> ColumnLineage:
    """A direct reference to one column."""
    return src(source, direct=True)


def one(
    sql: str, path: Sequence[str] = PATH, catalog: CatalogSnapshot = CATALOG
) -> StatementLineage:
    results = lineage(sql, catalog, path)
    assert len(results) == 1, results
    return results[0]


def cols(sql: str, path: Sequence[str] = PATH) -> tuple[ColumnLineage, ...]:
    st = one(sql, path)
    assert st.returns_rows
    assert st.columns is not None
    return st.columns


def col(sql: str, path: Sequence[str] = PATH) -> ColumnLineage:
    (only,) = cols(sql, path)
    return only


def carries(lin: ColumnLineage, source: str) -> bool:
    """Sound for ``source``: the value is attributed to it, or it is opaque."""
    return lin.opaque or source in lin.sources


# --------------------------------------------------------------------------- API basics


def test_constants_and_types() -> None:
    assert ColumnLineage() == CLEAN and not CLEAN.opaque and not CLEAN.direct
    assert OPAQUE.opaque and not OPAQUE.sources
    st = StatementLineage(returns_rows=False)
    assert st.rest == CLEAN and st.writes == () and not st.reads
    with pytest.raises(AttributeError):
        CLEAN.opaque = True  # type: ignore[misc]


def test_one_result_per_statement_and_empty_input() -> None:
    results = lineage("SELECT 1; SELECT email FROM customers;; BEGIN", CATALOG, PATH)
    assert [r.returns_rows for r in results] == [True, True, False]
    assert results[1].columns == (d("email"),)
    assert lineage("", CATALOG, PATH) == ()
    assert lineage("-- nothing", CATALOG, PATH) == ()


@pytest.mark.parametrize("sql", ["SELEC 1", "SELECT FROM WHERE", "SELECT 'unterminated"])
def test_syntax_error_raises(sql: str) -> None:
    with pytest.raises(AnalysisError):
        lineage(sql, CATALOG, PATH)


def test_excessive_nesting_raises_analysis_error() -> None:
    sql = "SELECT " + "(" * 20000 + "1" + ")" * 20000
    with pytest.raises(AnalysisError):
        lineage(sql, CATALOG, PATH)


def test_deep_but_acceptable_nesting() -> None:
    sql = "SELECT " + " || ".join(["email"] * 600) + " FROM customers"
    assert col(sql) == src("email")


# --------------------------------------------------------------------------- rule 1: tables


def test_table_columns_are_direct() -> None:
    assert cols("SELECT id, name, email, ssn FROM customers") == (
        d("id"),
        d("name"),
        d("email"),
        d("ssn"),
    )


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT amount FROM orders", d("public.orders.amount")),  # partitioned
        ("SELECT email FROM ext_users", d("public.ext_users.email")),  # foreign
        ("SELECT ctid FROM customers", CLEAN),
        ("SELECT c.xmin FROM customers c", CLEAN),
        ("SELECT tableoid FROM orders", CLEAN),
        ("SELECT last_value FROM seq", CLEAN),  # sequences
        ("SELECT s.is_called FROM seq s", CLEAN),
    ],
)
def test_table_kinds_and_system_columns(sql: str, expected: ColumnLineage) -> None:
    assert col(sql) == expected


def test_sequence_star_is_clean() -> None:
    assert cols("SELECT * FROM seq") == (CLEAN, CLEAN, CLEAN)


# --------------------------------------------------------------------------- rule 2: views


def test_view_column_adds_itself_and_keeps_direct() -> None:
    assert cols("SELECT * FROM v_cust") == (
        src("id", "public.v_cust.id", direct=True),
        src("email", "public.v_cust.email", direct=True),
    )


def test_view_of_view() -> None:
    assert col("SELECT * FROM v_of_v") == src(
        "email", "public.v_cust.email", "public.v_of_v.email", direct=True
    )


def test_view_expression_is_not_direct() -> None:
    assert col("SELECT shout FROM v_upper") == src("email", "public.v_upper.shout")


def test_view_over_union() -> None:
    assert col("SELECT x FROM v_union") == src(
        "email", "sales.leads.phone", "public.v_union.x", direct=True
    )


def test_materialized_view() -> None:
    assert col("SELECT email FROM mv_emails") == src("email", "public.mv_emails.email", direct=True)
    assert col("SELECT ctid FROM mv_emails") == CLEAN  # stored: has system columns


@pytest.mark.parametrize("view", ["v_nodef", "v_broken", "v_loop1", "v_loop2"])
def test_unusable_view_definitions_are_opaque(view: str) -> None:
    st = one(f"SELECT a FROM {view}")
    assert st.columns is not None and st.columns[0].opaque
    assert st.reads_opaque


def test_view_definition_resolves_along_definition_path() -> None:
    # the session path finds sales.customers first; the view was deparsed for public
    assert col("SELECT email FROM v_cust", SALES_FIRST) == src(
        "email", "public.v_cust.email", direct=True
    )


def test_view_reads_include_underlying_columns() -> None:
    st = one("SELECT id FROM v_filtered")
    assert st.reads == {"public.v_filtered.id", "public.customers.id", "public.customers.ssn"}


def test_view_calling_plpgsql_reports_the_call() -> None:
    st = one("SELECT x FROM v_pl")
    assert st.columns is not None and st.columns[0].opaque
    assert st.opaque_calls == ("public.f_pl",)


def test_view_too_deep_is_opaque() -> None:
    rels = [_rel(20000, "public", "base", "r", "secret")]
    previous = "base"
    for i in range(40):
        rels.append(
            _rel(20001 + i, "public", f"v{i}", "v", "secret", f"SELECT secret FROM {previous}")
        )
        previous = f"v{i}"
    catalog = CatalogSnapshot(rels)
    shallow = one("SELECT secret FROM v3", catalog=catalog)
    assert shallow.columns is not None and "public.base.secret" in shallow.columns[0].sources
    deep = one(f"SELECT secret FROM {previous}", catalog=catalog)
    assert deep.columns is not None and deep.columns[0].opaque


def test_view_definitions_are_cached_per_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = CatalogSnapshot(RELATIONS, FUNCTIONS)
    parsed: list[str] = []
    real_parse = _parse

    def counting_parse(sql: str) -> list[Any]:
        parsed.append(sql)
        return real_parse(sql)

    monkeypatch.setattr(lineage_module, "_parse", counting_parse)
    for _ in range(3):
        one("SELECT email FROM v_of_v", catalog=catalog)
    definitions = [s for s in parsed if "FROM v_cust" in s or "FROM customers;" in s]
    assert len(definitions) == 2  # v_of_v and v_cust, once each
    other = CatalogSnapshot(RELATIONS, FUNCTIONS)
    one("SELECT email FROM v_of_v", catalog=other)
    assert len([s for s in parsed if "FROM v_cust" in s]) == 2  # a new catalog: parsed again


# --------------------------------------------------------------------------- rule 3: statistics


def test_pg_statistic_values_are_opaque() -> None:
    st = one("SELECT stanullfrac, stavalues1, stavalues2, stakind1 FROM pg_statistic")
    assert st.columns == (
        d("pg_catalog.pg_statistic.stanullfrac"),
        OPAQUE,
        OPAQUE,
        d("pg_catalog.pg_statistic.stakind1"),
    )


def test_pg_statistic_ext_data_is_opaque() -> None:
    assert cols("SELECT * FROM pg_statistic_ext_data") == (OPAQUE, OPAQUE, OPAQUE)


def test_pg_stats_view_follows_by_view_rule() -> None:
    st = one("SELECT attname, null_frac, most_common_vals FROM pg_stats")
    assert st.columns is not None
    attname, null_frac, mcv = st.columns
    assert not attname.opaque and attname.direct
    assert "pg_catalog.pg_attribute.attname" in attname.sources
    assert not null_frac.opaque
    assert mcv.opaque  # CASE … THEN stavalues1
    assert cols("SELECT * FROM pg_stats_ext_exprs")[1].opaque


# --------------------------------------------------------------------------- rule 4: unknown


def test_unknown_relation_star() -> None:
    st = one("SELECT * FROM nowhere")
    assert st.returns_rows and st.columns is None and st.rest == OPAQUE
    assert st.reads_opaque


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT x FROM nowhere",
        "SELECT n.x FROM nowhere n",
        "SELECT email FROM customers, nowhere",  # email could be nowhere's
        "SELECT (SELECT x FROM nowhere LIMIT 1)",
    ],
)
def test_unknown_relation_references_are_opaque(sql: str) -> None:
    assert col(sql).opaque
    assert one(sql).reads_opaque


def test_unknown_relation_only_read_sets_reads_opaque() -> None:
    st = one("SELECT count(*) FROM customers WHERE id IN (SELECT x FROM nowhere)")
    assert st.columns == (CLEAN,)
    assert st.reads_opaque


def test_known_columns_before_an_unknown_relation_keep_their_lineage() -> None:
    st = one("SELECT c.email, n.x FROM customers c, nowhere n")
    assert st.columns == (d("email"), OPAQUE)
    st = one("SELECT *, 1 FROM customers, nowhere")
    assert st.columns == (d("id"), d("name"), d("email"), d("ssn"))
    assert st.rest.opaque


# --------------------------------------------------------------------------- rule 5: targets


def test_star_and_qualified_star() -> None:
    assert cols("SELECT * FROM customers") == (d("id"), d("name"), d("email"), d("ssn"))
    assert cols("SELECT n.*, c.email FROM customers c, notes n") == (
        d("public.notes.id"),
        d("public.notes.body"),
        d("public.notes.customer_id"),
        d("email"),
    )


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT public.customers.email FROM customers",
        "SELECT customers.email FROM public.customers",
        "SELECT c.email AS alias FROM customers AS c",
        'SELECT "email" FROM "customers"',
        "SELECT x.e FROM (SELECT email AS e FROM customers) AS x",
    ],
)
def test_qualified_and_aliased_references(sql: str) -> None:
    assert col(sql) == d("email")


def test_join_using_merges_columns_first() -> None:
    expected = (
        src("id", "public.notes.id", direct=True),
        d("name"),
        d("email"),
        d("ssn"),
        d("public.notes.body"),
        d("public.notes.customer_id"),
    )
    assert cols("SELECT * FROM customers JOIN notes USING (id)") == expected
    assert cols("SELECT * FROM customers NATURAL JOIN notes") == expected
    assert col("SELECT id FROM customers JOIN notes USING (id)") == expected[0]
    # an expression on one side makes the merged column not direct
    merged = col("SELECT id FROM customers JOIN (SELECT id + 0 AS id FROM notes) n USING (id)")
    assert merged == src("id", "public.notes.id")


def test_join_alias_and_hidden_inputs() -> None:
    assert col("SELECT j.email FROM (customers JOIN notes USING (id)) AS j") == d("email")
    # an aliased join hides its inputs: PostgreSQL refuses; fail closed
    assert col("SELECT customers.email FROM (customers JOIN notes USING (id)) AS j").opaque
    # a USING alias exposes only the merged columns
    assert col("SELECT x.body FROM customers JOIN notes USING (id) AS x").opaque
    assert col("SELECT u.id FROM customers JOIN notes USING (id) AS u") == src(
        "id", "public.notes.id", direct=True
    )


def test_alias_column_list_renames_positionally() -> None:
    assert cols("SELECT a, b, email FROM customers AS x(a, b)") == (d("id"), d("name"), d("email"))


def test_unqualified_searches_outer_scopes() -> None:
    sql = (
        "SELECT (SELECT body FROM notes WHERE notes.customer_id = customers.id LIMIT 1),"
        " (SELECT email FROM notes LIMIT 1) FROM customers"
    )
    assert cols(sql) == (d("public.notes.body"), d("email"))


def test_ambiguous_name_is_the_union() -> None:
    assert col("SELECT id FROM customers, notes") == src("id", "public.notes.id")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT c FROM customers c",
        "SELECT customers FROM customers",
        "SELECT row_to_json(c) FROM customers c",
        "SELECT to_jsonb(c.*) ->> 'email' FROM customers c",
        "SELECT c::text FROM customers c",
        "SELECT ROW(c.*) FROM customers c",
        "SELECT format('%s', c) FROM customers c",
        "SELECT (c.*)::text FROM customers c",
        "SELECT array_agg(c) FROM customers c",
    ],
)
def test_whole_row_references(sql: str) -> None:
    assert col(sql) == src("id", "name", "email", "ssn")


def test_quoted_and_mixed_case_identifiers() -> None:
    assert col('SELECT "Secret" FROM "MixedCase"') == d("public.MixedCase.Secret")
    assert col('SELECT m."Id" FROM public."MixedCase" m') == d("public.MixedCase.Id")
    # unquoted names fold to lower case: no such column, no such relation
    assert col('SELECT secret FROM "MixedCase"').opaque
    assert col("SELECT Secret FROM MixedCase").opaque


def test_search_path_decides_the_relation() -> None:
    assert col("SELECT email FROM customers", SALES_FIRST) == d("sales.customers.email")
    assert col("SELECT email FROM public.customers", SALES_FIRST) == d("email")
    assert col("SELECT email FROM sales.customers") == d("sales.customers.email")
    assert col("SELECT phone FROM leads").opaque  # not on the path
    assert col("SELECT phone FROM leads", SALES_FIRST) == d("sales.leads.phone")


def test_unresolved_column_is_opaque() -> None:
    assert col("SELECT nosuch FROM customers").opaque
    assert col("SELECT c.nosuch FROM customers c").opaque  # functional notation: unknown f


# --------------------------------------------------------------------------- rule 6: FROM items


def test_subquery_and_lateral() -> None:
    assert col("SELECT x FROM (SELECT email AS x FROM customers) s") == d("email")
    assert col("SELECT email FROM (SELECT email FROM customers)") == d("email")
    assert col("SELECT l.e FROM customers c, LATERAL (SELECT c.email AS e) l") == d("email")
    assert col(
        "SELECT l.e FROM customers c CROSS JOIN LATERAL (SELECT upper(c.name) AS e) l"
    ) == src("name")


def test_non_lateral_subquery_does_not_see_siblings() -> None:
    # PostgreSQL refuses the reference; the analyser must not resolve it to anything CLEAN
    assert col("SELECT s.e FROM customers c, (SELECT c.email AS e) s").opaque


def test_function_in_from() -> None:
    st = one("SELECT * FROM generate_series(1, 3) AS g(n)")
    assert st.columns is None and st.rest == CLEAN
    assert col("SELECT n FROM generate_series(1, 3) AS g(n)") == CLEAN
    assert col("SELECT g FROM generate_series(1, 3) g") == CLEAN
    st = one("SELECT * FROM unnest(ARRAY(SELECT email FROM customers))")
    assert st.columns is None and st.rest == src("email")
    assert col("SELECT u FROM unnest(ARRAY(SELECT email FROM customers)) u") == src("email")


def test_function_in_from_with_column_definition_list() -> None:
    assert cols("SELECT * FROM f_pl() AS t(a text, b int)") == (OPAQUE, OPAQUE)
    st = one("SELECT * FROM ROWS FROM (unnest(ARRAY['a']), generate_series(1, 2)) WITH ORDINALITY")
    assert st.columns is None and st.rest == CLEAN
    st = one(
        "SELECT * FROM ROWS FROM (jsonb_build_object('a', 1) AS (x text),"
        " generate_series(1, 2) AS (n int)) WITH ORDINALITY AS r"
    )
    assert st.columns == (CLEAN, CLEAN, CLEAN)


def test_sql_set_returning_function_columns_by_position() -> None:
    st = one("SELECT * FROM f_sql_set()")
    assert st.columns == (src("id"), src("email"))
    assert st.rest == src("id", "email")
    assert col("SELECT email FROM f_sql_set() AS f(id, email)") == src("id", "email")


def test_tablesample_xmltable_json_table() -> None:
    assert col("SELECT email FROM customers TABLESAMPLE SYSTEM (10)") == d("email")
    st = one(
        "SELECT x.v, x.n FROM customers c, XMLTABLE('/r' PASSING (c.email::xml)"
        " COLUMNS v text PATH 'v', n FOR ORDINALITY) x"
    )
    assert st.columns == (src("email"), CLEAN)
    st = one(
        "SELECT jt.* FROM customers c, JSON_TABLE(c.ssn::jsonb, '$' COLUMNS (v text PATH '$.v')) jt"
    )
    assert st.columns is None and st.rest == src("ssn")


# --------------------------------------------------------------------------- rule 7: CTEs


def test_cte_basic_and_hostile() -> None:
    assert col("WITH a AS (SELECT * FROM customers) SELECT (SELECT email FROM a LIMIT 1)") == d(
        "email"
    )
    assert col("WITH a(x, y) AS (SELECT email, id FROM customers) SELECT x FROM a") == d("email")
    assert col(
        "WITH a AS (SELECT email FROM customers), b AS (SELECT * FROM a) SELECT * FROM b"
    ) == d("email")


def test_cte_shadows_table() -> None:
    assert col(
        "WITH customers AS (SELECT body AS email FROM notes) SELECT email FROM customers"
    ) == d("public.notes.body")
    # … but not a schema-qualified name
    assert col(
        "WITH customers AS (SELECT body AS email FROM notes) SELECT email FROM public.customers"
    ) == d("email")


def test_recursive_cte_fixpoint() -> None:
    sql = (
        "WITH RECURSIVE r(n, e) AS (SELECT 1, email FROM customers"
        " UNION ALL SELECT n + 1, e FROM r WHERE n < 3) SELECT n, e FROM r"
    )
    assert cols(sql) == (CLEAN, d("email"))
    # values move between columns on each step: the fixpoint collects both
    sql = (
        "WITH RECURSIVE r(a, b) AS (SELECT id::text, email FROM customers"
        " UNION ALL SELECT b, a FROM r) SELECT a, b FROM r"
    )
    assert cols(sql) == (src("id", "email"), src("id", "email"))
    sql = (
        "WITH RECURSIVE r(a, b) AS (SELECT name, email FROM customers"
        " UNION ALL SELECT b, a FROM r) SELECT a FROM r"
    )
    assert col(sql) == src("name", "email", direct=True)


def test_recursive_cte_search_and_cycle_columns() -> None:
    sql = (
        "WITH RECURSIVE r(id, email) AS (SELECT id, email FROM customers"
        " UNION ALL SELECT id, email FROM r) CYCLE email SET is_cycle USING path"
        " SELECT path, is_cycle FROM r"
    )
    assert cols(sql) == (src("email"), CLEAN)
    sql = (
        "WITH RECURSIVE r(id) AS (SELECT id FROM customers UNION ALL SELECT id FROM r)"
        " SEARCH DEPTH FIRST BY id SET ord SELECT ord FROM r"
    )
    assert col(sql) == src("id")


def test_data_modifying_cte() -> None:
    st = one(
        "WITH w AS (INSERT INTO notes(body) SELECT email FROM customers RETURNING 1)"
        " SELECT * FROM w"
    )
    assert st.columns == (CLEAN,)
    assert st.writes == (WriteFlow("public.notes.body", d("email")),)
    st = one(
        "WITH w AS (INSERT INTO notes(body) SELECT email FROM customers RETURNING body)"
        " SELECT body FROM w"
    )
    assert st.columns == (src("public.notes.body", "email", direct=True),)
    st = one("WITH d AS (DELETE FROM customers RETURNING *) SELECT email FROM d")
    assert st.columns == (d("email"),)


# --------------------------------------------------------------------------- rule 8: set ops


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT email FROM customers UNION SELECT 'x'", src("email")),
        ("SELECT 'x' UNION ALL SELECT email FROM customers", src("email")),
        (
            "SELECT email FROM customers UNION ALL SELECT email FROM sales.customers",
            src("email", "sales.customers.email", direct=True),
        ),
        (
            "SELECT email FROM customers INTERSECT SELECT body FROM notes",
            src("email", "public.notes.body", direct=True),
        ),
        (
            "SELECT email FROM customers EXCEPT ALL SELECT upper(body) FROM notes",
            src("email", "public.notes.body"),
        ),
        ("SELECT 1 UNION SELECT 2 UNION SELECT 3", CLEAN),
    ],
)
def test_set_operations(sql: str, expected: ColumnLineage) -> None:
    assert col(sql) == expected


def test_set_operation_order_by_output_name() -> None:
    st = one("SELECT email AS e FROM customers UNION SELECT body FROM notes ORDER BY e")
    assert st.reads == {"public.customers.email", "public.notes.body"}
    assert not st.reads_opaque


def test_values() -> None:
    assert cols("VALUES (1, 'a'), (2, 'b')") == (CLEAN, CLEAN)
    assert col("SELECT * FROM (VALUES ((SELECT email FROM customers LIMIT 1))) v(x)") == src(
        "email"
    )
    assert cols("SELECT column2 FROM (VALUES (1, 'a'), (2, (SELECT ssn FROM customers))) v") == (
        src("ssn"),
    )


# --------------------------------------------------------------------------- rule 9: expressions


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("email || 'x'", src("email")),
        ("email::text", src("email")),
        ("CAST(email AS varchar(3))", src("email")),
        ('email COLLATE "C"', src("email")),
        ("CASE WHEN ssn IS NULL THEN 'a' ELSE 'b' END", src("ssn")),
        ("CASE WHEN true THEN email END", src("email")),
        ("CASE name WHEN 'x' THEN email ELSE ssn END", src("name", "email", "ssn")),
        ("COALESCE(email, name)", src("email", "name")),
        ("NULLIF(email, 'x')", src("email")),
        ("GREATEST(email, name)", src("email", "name")),
        ("ARRAY[email, name]", src("email", "name")),
        ("ROW(email, id)", src("email", "id")),
        ("(ROW(email, id)).f1", src("email", "id")),
        ("email IS NULL", src("email")),
        ("email IS DISTINCT FROM name", src("email", "name")),
        ("(email = 'x') IS TRUE", src("email")),
        ("NOT (email = 'x')", src("email")),
        ("email = 'x' AND ssn = 'y'", src("email", "ssn")),
        ("email LIKE 'a%'", src("email")),
        ("id BETWEEN 1 AND 2", src("id")),
        ("email IN ('a', 'b')", src("email")),
        ("-id", src("id")),
        ("(array_agg(email))[1]", src("email")),
        ("jsonb_build_object('e', email)", src("email")),
        ("length(email) > 3", src("email")),
        ("substr(ssn, 1, 3)", src("ssn")),
        ("concat(name, ' ', email)", src("name", "email")),
        ("JSON_OBJECT('e': email)", src("email")),
        ("JSON_ARRAY(email, name)", src("email", "name")),
        ("xmlelement(name x, email)", src("email")),
        ("1", CLEAN),
        ("'x'", CLEAN),
        ("NULL", CLEAN),
        ("$1", CLEAN),
        ("current_user", CLEAN),
        ("1 + 2 * 3", CLEAN),
    ],
)
def test_expressions(expr: str, expected: ColumnLineage) -> None:
    assert col(f"SELECT {expr} FROM customers") == expected


def test_user_operator_schema_qualified_is_opaque() -> None:
    st = one("SELECT 1 OPERATOR(public.===) 2")
    assert st.columns == (OPAQUE,) and st.reads_opaque
    assert col("SELECT 1 OPERATOR(pg_catalog.+) id FROM customers") == src("id")


# --------------------------------------------------------------------------- rule 10: sublinks


def test_sublinks() -> None:
    assert col("SELECT (SELECT email FROM customers LIMIT 1)") == d("email")
    assert col("SELECT ARRAY(SELECT email FROM customers)") == src("email")
    assert col("SELECT id IN (SELECT customer_id FROM notes) FROM customers") == src(
        "id", "public.notes.customer_id"
    )
    assert col("SELECT id = ANY (SELECT customer_id FROM notes) FROM customers") == src(
        "id", "public.notes.customer_id"
    )
    assert col("SELECT ssn > ALL (SELECT body FROM notes) FROM customers") == src(
        "ssn", "public.notes.body"
    )
    assert col("SELECT (id, name) = (SELECT id, body FROM notes LIMIT 1) FROM customers") == src(
        "id", "name", "public.notes.id", "public.notes.body"
    )


def test_exists_is_clean_but_read() -> None:
    st = one("SELECT EXISTS (SELECT 1 FROM customers WHERE email = 'x')")
    assert st.columns == (CLEAN,)
    assert st.reads == {"public.customers.email"}


# --------------------------------------------------------------------------- rule 11: functions


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(*) FROM customers",
        "SELECT count(email) FROM customers",
        "SELECT pg_catalog.count(DISTINCT ssn) FROM customers",
        "SELECT count(*) FILTER (WHERE email LIKE 'a%') FROM customers",
    ],
)
def test_count_is_clean(sql: str) -> None:
    assert col(sql) == CLEAN


def test_count_overloaded_by_a_user_function_is_not_clean() -> None:
    st = one("SELECT count(email) FROM customers", SALES_FIRST)
    assert st.columns == (OPAQUE,)
    assert st.opaque_calls == ("sales.count",)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("upper(email)", src("email")),
        ("lower(name)", src("name")),
        ("string_agg(email, ',')", src("email")),
        ("string_agg(email, ',' ORDER BY ssn)", src("email")),
        ("sum(id)", src("id")),
        ("lag(email) OVER (ORDER BY id)", src("email")),
        ("pg_catalog.upper(email)", src("email")),
    ],
)
def test_builtin_functions_union_arguments(expr: str, expected: ColumnLineage) -> None:
    assert col(f"SELECT {expr} FROM customers") == expected


def test_aggregate_order_and_window_clauses_are_read() -> None:
    st = one(
        "SELECT string_agg(name, ',' ORDER BY ssn), lag(id) OVER (PARTITION BY email)"
        " FROM customers"
    )
    assert st.reads == {f"public.customers.{c}" for c in ("name", "ssn", "id", "email")}


@pytest.mark.parametrize(
    ("sql", "calls"),
    [
        (
            "SELECT query_to_xml('select email from customers', true, true, '')",
            ("pg_catalog.query_to_xml",),
        ),
        ("SELECT table_to_xml('customers', true, true, '')", ("pg_catalog.table_to_xml",)),
        ("SELECT * FROM ts_stat('select 1')", ("pg_catalog.ts_stat",)),
        ("SELECT * FROM dblink('dbname=x', 'select 1') AS t(a text)", ("public.dblink",)),
        ("SELECT nosuch(email) FROM customers", ("public.nosuch",)),
        ("SELECT sales.nosuch(1)", ("sales.nosuch",)),
        ("SELECT f_pl()", ("public.f_pl",)),
        ("SELECT f_over()", ("public.f_over",)),
        ("SELECT f_atomic()", ("public.f_atomic",)),
        ("SELECT f_broken()", ("public.f_broken",)),
        ("SELECT f_calls_pl()", ("public.f_pl",)),
    ],
)
def test_opaque_functions(sql: str, calls: tuple[str, ...]) -> None:
    st = one(sql)
    assert all(c.opaque for c in st.columns) if st.columns is not None else st.rest.opaque
    assert st.opaque_calls == calls
    assert st.reads_opaque


def test_sql_function_body_is_analysed() -> None:
    st = one("SELECT f_sql(1)")
    assert st.columns == (src("email"),)
    assert st.reads == {"public.customers.email", "public.customers.id"}
    assert st.opaque_calls == ()
    assert col("SELECT f_sql(c.id) FROM customers c") == src("email", "id")


def test_sql_function_recursion_is_opaque() -> None:
    st = one("SELECT f_rec(3)")
    assert st.columns == (OPAQUE,)
    assert st.opaque_calls == ()  # its body is seen, it just cannot be resolved


def test_sql_function_own_search_path() -> None:
    assert col("SELECT f_path()") == src("sales.customers.email")


def test_sql_function_parameters_by_name_are_not_opaque() -> None:
    lin = col("SELECT f_param('x')")
    assert not lin.opaque
    assert "public.customers.name" in lin.sources


def test_sql_function_writes_are_tainted_with_arguments() -> None:
    st = one("SELECT f_write('x')")
    assert st.writes == (WriteFlow("public.notes.body", CLEAN),)
    st = one("SELECT f_write(email) FROM customers")
    assert st.writes == (WriteFlow("public.notes.body", src("email")),)
    assert st.columns == (src("email"),)


def test_functional_notation() -> None:
    assert col("SELECT c.fullname FROM customers c") == src("id", "name", "email", "ssn")


# --------------------------------------------------------------------------- rule 12: statements


def test_select_into_and_ctas_writes() -> None:
    st = one("CREATE TABLE x AS SELECT email FROM customers")
    assert not st.returns_rows
    assert st.writes == (WriteFlow("public.x.email", d("email")),)
    st = one("SELECT email INTO x FROM customers")
    assert not st.returns_rows and st.columns is None
    assert st.writes == (WriteFlow("public.x.email", d("email")),)
    st = one("CREATE TEMP TABLE x(e) AS SELECT email, upper(name) FROM customers")
    assert st.writes == (
        WriteFlow("pg_temp.x.e", d("email")),
        WriteFlow("pg_temp.x.upper", src("name")),
    )
    st = one("CREATE TABLE sales.x AS SELECT 1, 'a'::text, email::varchar, ssn AS s FROM customers")
    assert [w.target for w in st.writes] == [
        "sales.x.?column?",
        "sales.x.text",
        "sales.x.email",
        "sales.x.s",
    ]
    st = one("CREATE MATERIALIZED VIEW mv AS SELECT email FROM customers")
    assert st.writes == (WriteFlow("public.mv.email", d("email")),)


def test_ctas_with_no_data_writes_nothing() -> None:
    assert one("CREATE TABLE x AS SELECT email FROM customers WITH NO DATA").writes == ()
    assert (
        one("CREATE MATERIALIZED VIEW m AS SELECT email FROM customers WITH NO DATA").writes == ()
    )


def test_ctas_creation_schema_follows_path() -> None:
    st = one("CREATE TABLE x AS SELECT email FROM customers", ("pg_temp_3", "pg_catalog", "sales"))
    assert st.writes == (WriteFlow("sales.x.email", d("sales.customers.email")),)
    st = one("CREATE TABLE x AS SELECT * FROM generate_series(1, 2)")
    assert st.writes == (WriteFlow("public.x.*", CLEAN),)
    st = one("CREATE TABLE x AS EXECUTE p")
    assert st.writes == (WriteFlow("public.x.*", OPAQUE),)


def test_insert_select() -> None:
    st = one("INSERT INTO notes(body) SELECT email FROM customers")
    assert not st.returns_rows
    assert st.writes == (WriteFlow("public.notes.body", d("email")),)
    assert st.reads == {"public.customers.email"}
    st = one("INSERT INTO notes SELECT id, ssn FROM customers")
    assert st.writes == (
        WriteFlow("public.notes.id", d("id")),
        WriteFlow("public.notes.body", d("ssn")),
    )


def test_insert_values() -> None:
    st = one("INSERT INTO notes VALUES (1, 'x', DEFAULT)")
    assert st.writes == tuple(
        WriteFlow(f"public.notes.{c}", CLEAN) for c in ("id", "body", "customer_id")
    )
    st = one("INSERT INTO notes(body) VALUES ('a'), ((SELECT email FROM customers LIMIT 1))")
    assert st.writes == (WriteFlow("public.notes.body", src("email")),)


def test_insert_returning_sees_the_stored_row() -> None:
    st = one("INSERT INTO notes(body) SELECT email FROM customers RETURNING body, id")
    assert st.returns_rows
    assert st.columns == (src("public.notes.body", "email", direct=True), d("public.notes.id"))
    st = one("INSERT INTO notes AS n (body) VALUES ('x') RETURNING n.body, *")
    assert st.columns == (
        src("public.notes.body"),
        d("public.notes.id"),
        src("public.notes.body"),
        d("public.notes.customer_id"),
    )


def test_insert_on_conflict() -> None:
    st = one(
        "INSERT INTO notes(id, body) SELECT id, email FROM customers"
        " ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body"
    )
    assert st.writes == (
        WriteFlow("public.notes.id", d("id")),
        WriteFlow("public.notes.body", d("email")),
    )
    st = one(
        "INSERT INTO notes AS n (id, body) VALUES (1, 'x')"
        " ON CONFLICT (id) DO UPDATE SET body = n.body || EXCLUDED.body, customer_id = 7"
        " WHERE n.customer_id > 0 RETURNING body"
    )
    assert WriteFlow("public.notes.body", src("public.notes.body")) in st.writes
    assert st.columns == (src("public.notes.body"),)
    assert "public.notes.customer_id" in st.reads


def test_update_flows() -> None:
    st = one("UPDATE notes SET body = c.email FROM customers c WHERE c.id = notes.customer_id")
    assert not st.returns_rows
    assert st.writes == (WriteFlow("public.notes.body", d("email")),)
    assert st.reads == {"public.customers.email", "public.customers.id", "public.notes.customer_id"}
    st = one("UPDATE customers SET name = email")
    assert st.writes == (WriteFlow("public.customers.name", d("email")),)


def test_update_multi_column_assignments() -> None:
    st = one("UPDATE notes SET (body, customer_id) = (SELECT email, id FROM customers LIMIT 1)")
    assert st.writes == (
        WriteFlow("public.notes.body", d("email")),
        WriteFlow("public.notes.customer_id", d("id")),
    )
    st = one("UPDATE notes SET (body, customer_id) = ROW(upper('x'), 1), id = DEFAULT")
    assert st.writes == (
        WriteFlow("public.notes.body", CLEAN),
        WriteFlow("public.notes.customer_id", CLEAN),
        WriteFlow("public.notes.id", CLEAN),
    )


def test_update_returning() -> None:
    st = one(
        "UPDATE notes n SET body = 'x' FROM customers c WHERE c.id = n.customer_id RETURNING *"
    )
    assert st.columns == (
        d("public.notes.id"),
        src("public.notes.body"),
        d("public.notes.customer_id"),
        d("id"),
        d("name"),
        d("email"),
        d("ssn"),
    )
    st = one("UPDATE customers SET name = email RETURNING old.name, new.name, name")
    assert st.columns == (
        d("name"),
        src("name", "email", direct=True),
        src("name", "email", direct=True),
    )
    st = one("UPDATE customers SET name = 'x' RETURNING WITH (OLD AS o, NEW AS n) o.name, n.name")
    assert st.columns == (d("name"), src("name"))


def test_delete_returning() -> None:
    st = one("DELETE FROM customers WHERE id = 1 RETURNING email")
    assert st.returns_rows and st.columns == (d("email"),) and st.writes == ()
    st = one("DELETE FROM notes USING customers c WHERE c.id = notes.customer_id RETURNING *")
    assert st.columns is not None and len(st.columns) == 7
    assert st.columns[3:] == (d("id"), d("name"), d("email"), d("ssn"))
    assert not one("DELETE FROM customers").returns_rows


def test_merge() -> None:
    st = one(
        "MERGE INTO notes n USING customers c ON n.customer_id = c.id"
        " WHEN MATCHED AND c.ssn IS NOT NULL THEN UPDATE SET body = c.email"
        " WHEN NOT MATCHED THEN INSERT (customer_id, body) VALUES (c.id, c.name)"
        " WHEN NOT MATCHED BY SOURCE THEN DELETE"
    )
    assert not st.returns_rows
    assert st.writes == (
        WriteFlow("public.notes.body", d("email")),
        WriteFlow("public.notes.customer_id", d("id")),
        WriteFlow("public.notes.body", d("name")),
    )
    assert "public.customers.ssn" in st.reads


def test_merge_returning_source_then_target() -> None:
    st = one(
        "MERGE INTO notes n USING customers c ON n.customer_id = c.id"
        " WHEN MATCHED THEN UPDATE SET body = c.email RETURNING merge_action(), *"
    )
    assert st.columns == (
        CLEAN,
        d("id"),
        d("name"),
        d("email"),
        d("ssn"),
        d("public.notes.id"),
        src("public.notes.body", "email", direct=True),
        d("public.notes.customer_id"),
    )


def test_merge_not_matched_sees_only_the_source() -> None:
    # NOT MATCHED: the target is invisible, so "id" is the source's
    st = one(
        "MERGE INTO notes USING customers c ON notes.customer_id = c.id"
        " WHEN NOT MATCHED THEN INSERT (body) VALUES (ssn)"
    )
    assert st.writes == (WriteFlow("public.notes.body", d("ssn")),)


def test_write_into_view_reaches_the_base_column() -> None:
    st = one("UPDATE v_cust SET email = 'x'")
    assert st.writes == (
        WriteFlow("public.v_cust.email", CLEAN),
        WriteFlow("public.customers.email", CLEAN),
    )


def test_explain() -> None:
    st = one("EXPLAIN ANALYZE INSERT INTO notes(body) SELECT email FROM customers")
    assert st.returns_rows and st.columns is None and st.rest == CLEAN
    assert st.writes == (WriteFlow("public.notes.body", d("email")),)
    assert st.reads == {"public.customers.email"}
    st = one("EXPLAIN INSERT INTO notes(body) SELECT email FROM customers")
    assert st.writes == () and st.rest == CLEAN
    st = one("EXPLAIN (ANALYZE false) SELECT email FROM customers")
    assert st.rest == CLEAN and st.writes == ()


def test_prepare_and_execute() -> None:
    st = one("PREPARE p(int) AS SELECT email FROM customers WHERE id = $1")
    assert not st.returns_rows
    assert st.declares == ("prepared", "p")
    assert st.columns == (d("email"),)
    st = one("PREPARE q AS INSERT INTO notes(body) SELECT email FROM customers")
    assert st.declares == ("prepared", "q") and st.columns == ()
    assert st.writes == (WriteFlow("public.notes.body", d("email")),)
    st = one("EXECUTE p(1)")
    assert st.returns_rows and st.reference == ("prepared", "p") and st.rest == CLEAN
    st = one("EXECUTE p((SELECT email FROM customers LIMIT 1))")
    assert st.rest == src("email")


def test_declare_fetch_move() -> None:
    st = one('DECLARE "MyCur" BINARY CURSOR WITH HOLD FOR SELECT email FROM customers')
    assert not st.returns_rows
    assert st.declares == ("cursor", "MyCur")
    assert st.columns == (d("email"),)
    assert one("DECLARE MyCur CURSOR FOR SELECT 1").declares == ("cursor", "mycur")
    st = one("FETCH 5 FROM MyCur")
    assert st.returns_rows and st.reference == ("cursor", "mycur")
    assert one("FETCH ALL IN c").reference == ("cursor", "c")
    assert not one("MOVE NEXT FROM c").returns_rows


def test_copy_table_to_stdout() -> None:
    st = one("COPY customers TO STDOUT")
    assert st.returns_rows
    assert st.columns == (d("id"), d("name"), d("email"), d("ssn"))
    assert st.copy == CopyOptions()
    assert st.copy_relation == "public.customers"
    st = one("COPY customers (email, id) TO STDOUT WITH (FORMAT csv, HEADER, DELIMITER ';')")
    assert st.columns == (d("email"), d("id"))
    assert st.copy == CopyOptions("csv", ";", None, None, None, True)


@pytest.mark.parametrize(
    ("sql", "options"),
    [
        (
            "COPY customers TO STDOUT CSV HEADER DELIMITER ',' NULL 'x' QUOTE '\"' ESCAPE '\\'",
            CopyOptions("csv", ",", "x", '"', "\\", True),
        ),
        ("COPY customers TO STDOUT BINARY", CopyOptions("binary")),
        ("COPY customers TO STDOUT WITH BINARY", CopyOptions("binary")),
        ("COPY customers TO STDOUT (FORMAT 'text', HEADER false)", CopyOptions()),
        ("COPY customers TO STDOUT (FORMAT csv, HEADER match)", CopyOptions("csv", header=True)),
        ("COPY customers TO STDOUT DELIMITER '|'", CopyOptions(delimiter="|")),
    ],
)
def test_copy_options(sql: str, options: CopyOptions) -> None:
    assert one(sql).copy == options


def test_copy_query_file_program_from() -> None:
    st = one("COPY (SELECT upper(email) FROM customers) TO STDOUT")
    assert st.columns == (src("email"),) and st.copy == CopyOptions() and st.copy_relation is None
    st = one("COPY (INSERT INTO notes(body) SELECT email FROM customers RETURNING body) TO STDOUT")
    assert st.writes == (WriteFlow("public.notes.body", d("email")),)
    for sql in ("COPY customers TO '/tmp/x'", "COPY customers TO PROGRAM 'cat'"):
        st = one(sql)
        assert not st.returns_rows
        assert "public.customers.email" in st.reads
    st = one("COPY notes FROM STDIN")
    assert not st.returns_rows and st.writes == ()
    st = one("COPY nowhere TO STDOUT")
    assert st.returns_rows and st.columns is None and st.rest == OPAQUE


def test_show_call_do() -> None:
    st = one("SHOW search_path")
    assert st.returns_rows and st.columns is None and st.rest == CLEAN
    st = one("CALL p_sql()")
    assert st.returns_rows and not st.rest.opaque
    assert st.writes == (WriteFlow("public.notes.body", d("email")),)
    assert st.opaque_calls == ()
    st = one("CALL p_pl(1)")
    assert st.returns_rows and st.rest == OPAQUE and st.opaque_calls == ("public.p_pl",)
    st = one("DO $$ BEGIN PERFORM 1; END $$")
    assert not st.returns_rows and st.opaque_calls == ("DO",) and st.reads_opaque


@pytest.mark.parametrize(
    ("sql", "renames", "path"),
    [
        ("ALTER TABLE customers RENAME TO clients", ("public.customers",), PATH),
        ("ALTER TABLE customers RENAME COLUMN email TO mail", ("public.customers.email",), PATH),
        ("ALTER TABLE IF EXISTS customers RENAME ssn TO x", ("public.customers.ssn",), PATH),
        (
            "ALTER TABLE customers RENAME COLUMN email TO mail",
            ("sales.customers.email",),
            SALES_FIRST,
        ),
        ("ALTER VIEW v_cust RENAME COLUMN email TO e", ("public.v_cust.email",), PATH),
        ("ALTER MATERIALIZED VIEW mv_emails RENAME TO m", ("public.mv_emails",), PATH),
        ("ALTER TABLE customers SET SCHEMA sales", ("public.customers",), PATH),
        ("ALTER VIEW sales.x SET SCHEMA public", ("sales.x",), PATH),
        ("ALTER TABLE nowhere RENAME TO x", ("public.nowhere",), PATH),
        ("ALTER SCHEMA sales RENAME TO s2", ("sales.customers", "sales.leads"), PATH),
        ("ALTER TABLE customers RENAME CONSTRAINT c TO d", (), PATH),
        ("ALTER INDEX customers_pkey RENAME TO x", (), PATH),
    ],
)
def test_renames(sql: str, renames: tuple[str, ...], path: tuple[str, ...]) -> None:
    st = one(sql, path)
    assert not st.returns_rows
    assert st.renames == renames


@pytest.mark.parametrize(
    "sql",
    [
        "BEGIN",
        "COMMIT",
        "ROLLBACK TO SAVEPOINT s",
        "SET search_path = sales",
        "RESET ALL",
        "CREATE INDEX ON customers (email)",
        "DROP TABLE notes",
        "TRUNCATE customers",
        "VACUUM ANALYZE customers",
        "LISTEN x",
        "DEALLOCATE ALL",
        "CLOSE c",
        "GRANT SELECT ON customers TO bob",
        "CREATE VIEW v AS SELECT email FROM customers",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "LOCK customers",
        "CREATE TABLE t (a int)",
        "DISCARD ALL",
    ],
)
def test_utility_statements_return_nothing(sql: str) -> None:
    st = one(sql)
    assert not st.returns_rows
    assert st.rest == CLEAN and st.writes == () and not st.reads
    assert not st.reads_opaque and st.opaque_calls == ()


def test_unknown_statement_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lineage_module, "_UTILITY", frozenset())
    st = one("CHECKPOINT")
    assert st.returns_rows and st.columns is None and st.rest == OPAQUE and st.reads_opaque


def test_ddl_defaults_and_generated_columns_are_flows() -> None:
    st = one("ALTER TABLE customers ALTER COLUMN name TYPE text USING email")
    assert st.writes == (WriteFlow("public.customers.name", d("email")),)
    st = one("ALTER TABLE notes ADD COLUMN copy text DEFAULT f_sql(1)")
    assert st.writes == (WriteFlow("public.notes.copy", src("email")),)
    st = one("ALTER TABLE customers ADD COLUMN e2 text GENERATED ALWAYS AS (upper(email)) STORED")
    assert st.writes == (WriteFlow("public.customers.e2", src("email")),)
    st = one("CREATE TABLE g (a text, b text GENERATED ALWAYS AS (upper(a)) STORED)")
    assert st.writes == (WriteFlow("public.g.b", src("public.g.a")),)


def test_refresh_materialized_view_flows() -> None:
    st = one("REFRESH MATERIALIZED VIEW mv_emails")
    assert st.writes == (
        WriteFlow("public.mv_emails.email", src("email", "public.mv_emails.email", direct=True)),
    )
    assert one("REFRESH MATERIALIZED VIEW mv_emails WITH NO DATA").writes == ()


# --------------------------------------------------------------------------- rule 13: reads


def test_reads_cover_every_clause() -> None:
    st = one(
        "SELECT c.id FROM customers c JOIN notes n ON n.customer_id = c.id"
        " WHERE c.email LIKE '%x' AND EXISTS (SELECT 1 FROM sales.leads l WHERE l.phone = c.ssn)"
        " GROUP BY c.id, c.name HAVING count(n.body) > 1 ORDER BY c.name"
    )
    assert st.columns == (d("id"),)
    assert st.reads == {
        "public.customers.id",
        "public.customers.email",
        "public.customers.ssn",
        "public.customers.name",
        "public.notes.customer_id",
        "public.notes.body",
        "sales.leads.phone",
    }
    assert not st.reads_opaque


def test_order_by_output_alias_is_not_opaque() -> None:
    st = one("SELECT email AS e FROM customers ORDER BY e")
    assert st.reads == {"public.customers.email"} and not st.reads_opaque
    st = one("SELECT name AS email FROM customers GROUP BY email")
    assert st.reads == {"public.customers.name", "public.customers.email"}


def test_reads_opaque_for_opaque_references_only() -> None:
    assert not one("SELECT email FROM customers").reads_opaque
    assert one("SELECT 1 FROM customers WHERE f_pl() IS NULL").reads_opaque
    assert one("SELECT 1 FROM nowhere").reads_opaque


# --------------------------------------------------------------------------- hostile cases

HOSTILE = [
    "SELECT x FROM (SELECT email AS x FROM customers) s",
    "WITH a AS (SELECT * FROM customers) SELECT (SELECT email FROM a LIMIT 1)",
    "SELECT email FROM customers UNION SELECT 'x'",
    "SELECT row_to_json(c) FROM customers c",
    "SELECT to_jsonb(c.*) ->> 'email' FROM customers c",
    "SELECT c::text FROM customers c",
    "SELECT string_agg(email, ',') FROM customers",
    "SELECT (array_agg(email))[1] FROM customers",
    "SELECT * FROM unnest(ARRAY(SELECT email FROM customers))",
    "SELECT f_sql(1)",
    "SELECT * FROM v_of_v",
    "SELECT * FROM v_cust",
    "SELECT l.x FROM customers c, LATERAL (SELECT c.email || '' AS x) l",
    "SELECT (SELECT c.email) FROM customers c",
    "SELECT e FROM customers AS t(a, b, e)",
    "SELECT y.z FROM (SELECT * FROM (SELECT email AS z FROM customers) q) y",
    "SELECT * FROM (SELECT email FROM customers) AS q(renamed)",
    "SELECT max FROM (SELECT max(email) FROM customers) s",
    "SELECT upper FROM (SELECT upper(email) FROM customers) s",
    "SELECT email FROM (SELECT email::text FROM customers) s",
    "SELECT \"?column?\" FROM (SELECT email || '' FROM customers) s",
    "SELECT coalesce FROM (SELECT COALESCE(email, '') FROM customers) s",
    "SELECT j FROM customers c, jsonb_build_object('a', c.email) j",
    "SELECT * FROM customers c, LATERAL unnest(ARRAY[c.email]) u",
    "SELECT v FROM customers c, LATERAL (VALUES (c.email)) v(v)",
    "SELECT column1 FROM (VALUES ((SELECT email FROM customers LIMIT 1))) v",
    "SELECT * FROM (SELECT email FROM customers UNION ALL SELECT 'x') u",
    "WITH RECURSIVE r AS (SELECT email FROM customers UNION SELECT email FROM r) SELECT * FROM r",
    "SELECT (SELECT x FROM (SELECT email AS x) s) FROM customers",
    "SELECT CASE WHEN email LIKE 'a%' THEN 'A' ELSE 'B' END FROM customers",
    "SELECT format('%s', email) FROM customers",
    "SELECT ROW(email)::text FROM customers",
    "SELECT (SELECT ARRAY_AGG(c.email) FROM customers c)",
    "SELECT x FROM customers c JOIN LATERAL (SELECT c.email AS x) s ON true",
    "SELECT email FROM customers NATURAL JOIN (SELECT 1 AS id) s",
    "SELECT id FROM customers JOIN (SELECT email AS id FROM customers) s USING (id)",
    "SELECT * FROM f_sql_set()",
    "SELECT email FROM f_sql_set() f(id, email)",
    "SELECT c.fullname FROM customers c",
    "SELECT JSON_ARRAYAGG(email) FROM customers",
    "SELECT JSON_ARRAY(SELECT email FROM customers)",
    "SELECT xmlagg(xmlelement(name e, email)) FROM customers",
    "SELECT * FROM customers c, XMLTABLE('/a' PASSING (c.email::xml) COLUMNS v text) x",
    "SELECT customers.email FROM customers, (SELECT 1) customers2",
    "SELECT excluded FROM (SELECT email AS excluded FROM customers) s",
    "SELECT old FROM (SELECT email AS old FROM customers) s",
]


@pytest.mark.parametrize("sql", HOSTILE)
def test_hostile_queries_never_lose_email(sql: str) -> None:
    st = one(sql)
    assert st.returns_rows
    every = (*(st.columns or ()), st.rest)
    assert any(carries(c, "public.customers.email") for c in every), st
    # a value derived from email is never reported as coming from nothing
    for c in every:
        if c == CLEAN:
            continue
        assert c.sources or c.opaque


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO notes(body) SELECT email FROM customers",
        "INSERT INTO notes(body) SELECT lower(e) FROM (SELECT email AS e FROM customers) s",
        "UPDATE notes SET body = (SELECT email FROM customers LIMIT 1)",
        "UPDATE notes n SET body = c.email FROM customers c WHERE c.id = n.customer_id",
        "INSERT INTO notes(id, body) SELECT id, 'x' FROM customers"
        " ON CONFLICT (id) DO UPDATE SET body = (SELECT email FROM customers LIMIT 1)",
        "WITH w AS (INSERT INTO notes(body) SELECT email FROM customers RETURNING 1) SELECT 1",
        "EXPLAIN ANALYZE INSERT INTO notes(body) SELECT email FROM customers",
        "EXPLAIN (ANALYZE, BUFFERS) UPDATE notes SET body = (SELECT email FROM customers)",
        "PREPARE p AS INSERT INTO notes(body) SELECT email FROM customers",
        "CREATE TABLE x AS SELECT email FROM customers",
        "SELECT email INTO x FROM customers",
        "SELECT f_write(email) FROM customers",
        "CALL p_sql()",
        "MERGE INTO notes USING customers c ON false"
        " WHEN NOT MATCHED THEN INSERT (body) VALUES (c.email)",
        "ALTER TABLE notes ALTER COLUMN body TYPE text USING f_sql(id)",
    ],
)
def test_hostile_writes_never_lose_email(sql: str) -> None:
    st = one(sql)
    assert any(carries(w.lineage, "public.customers.email") for w in st.writes), st.writes


def test_written_then_returned_keeps_both_sources() -> None:
    # the target column is not masked but the value came from email: both are sources
    st = one("UPDATE notes SET body = c.email FROM customers c RETURNING notes.body")
    assert st.columns == (src("public.notes.body", "email", direct=True),)


# --------------------------------------------------------------------------- robustness


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT (c).* FROM (SELECT c FROM customers c) s",
        "SELECT 1, (f_sql_set()).*",
        "SELECT (s.c).* FROM (SELECT c FROM customers c) s",
    ],
)
def test_composite_star_expansion_has_unknown_width(sql: str) -> None:
    # PostgreSQL expands (x).* into every field: the count is unknown here, so every
    # column from there on gets the union (never CLEAN by position)
    st = one(sql)
    assert st.rest != CLEAN
    assert carries(st.rest, "public.customers.email")


def test_output_names_follow_postgresql() -> None:
    # (c.*)::text is named "c", like PostgreSQL's FigureColname
    assert col("SELECT c FROM (SELECT (c.*)::text FROM customers c) s") == src(
        "id", "name", "email", "ssn"
    )
    assert col("SELECT \"?column?\" FROM (SELECT email || '' FROM customers) s") == src("email")
    assert col("SELECT upper FROM (SELECT upper(email) FROM customers) s") == src("email")
    assert col("SELECT text FROM (SELECT 'x'::text, email FROM customers) s") == CLEAN
    assert col("SELECT email FROM (SELECT (SELECT email FROM customers LIMIT 1)) s") == d("email")


def test_too_complex_statement_is_refused() -> None:
    def nest(k: int) -> str:
        if k == 0:
            return "SELECT name, email FROM customers"
        return (
            f"WITH RECURSIVE r{k}(a, b) AS (SELECT name, email FROM customers"
            f" UNION ALL SELECT b, a FROM r{k}, ({nest(k - 1)}) z) SELECT a, b FROM r{k}"
        )

    assert len(cols(nest(3))) == 2
    with pytest.raises(AnalysisError):
        lineage(nest(14), CATALOG, PATH)


def test_function_bodies_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = CatalogSnapshot(RELATIONS, FUNCTIONS)
    parsed: list[str] = []
    real_parse = _parse

    def counting_parse(sql: str) -> list[Any]:
        parsed.append(sql)
        return real_parse(sql)

    monkeypatch.setattr(lineage_module, "_parse", counting_parse)
    for _ in range(3):
        one("SELECT f_sql(1), f_sql(2)", catalog=catalog)
    assert parsed.count("SELECT email FROM customers WHERE id = $1") == 1


def test_search_path_may_be_any_sequence() -> None:
    assert lineage("SELECT email FROM customers", CATALOG, ["pg_catalog", "sales"])[0].columns == (
        d("sales.customers.email"),
    )
