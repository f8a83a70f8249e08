"""From lineage to one identity's masking plan: mask choice, refusals, error scrubbing."""

from __future__ import annotations

import pytest

from pgguard.masking.lineage import (
    CLEAN,
    OPAQUE,
    ColumnLineage,
    StatementLineage,
    WriteFlow,
)
from pgguard.masking.plan import (
    NO_MASKS,
    MaskerCache,
    ResultPlan,
    mask_type_problems,
    plan_statement,
)
from pgguard.policy.catalog import CatalogSnapshot
from pgguard.policy.facts import FunctionInfo, RelationInfo
from pgguard.policy.loader import parse_policy

POLICY = parse_policy(
    """
version: 1
masks:
  - column: public.customers.email
    function: partial_email
  - column: public.customers.ssn
    function: keep_last(4)
  - column: public.customers.card
    function: hash(8)
  - column: public.notes.secret
    function: redact
  - column: public.customers.age
    function: partial_email
"""
)
MASKS = POLICY.masks
CATALOG = CatalogSnapshot(
    [
        RelationInfo(
            1,
            "public",
            "customers",
            "r",
            ("id", "email", "ssn", "card", "age"),
            attnums=(1, 2, 3, 4, 5),
            column_types=((23, -1), (25, -1), (25, -1), (25, -1), (23, -1)),
        ),
        RelationInfo(2, "public", "notes", "r", ("id", "body", "secret")),
    ],
    [
        FunctionInfo(10, "public", "leak", "v", language="plpgsql"),
        FunctionInfo(11, "public", "peek", "s", language="plpgsql"),
    ],
)


def src(*names: str, direct: bool = False) -> ColumnLineage:
    return ColumnLineage(frozenset(f"public.customers.{n}" for n in names), direct=direct)


def select(*columns: ColumnLineage, **kw: object) -> StatementLineage:
    return StatementLineage(returns_rows=True, columns=columns, **kw)  # type: ignore[arg-type]


def result(lineage: StatementLineage) -> ResultPlan:
    plan = plan_statement(lineage, MASKS, CATALOG)
    assert plan.result is not None
    return plan.result


def test_clean_statement_needs_nothing_but_a_width_check() -> None:
    plan = plan_statement(select(CLEAN, src("id", direct=True)), MASKS, CATALOG)
    assert plan.result is None and plan.refusal is None and not plan.scrub_errors
    assert plan.width == 2  # a result of another width means a stale catalog
    clean_utility = StatementLineage(returns_rows=False)
    assert plan_statement(clean_utility, MASKS, CATALOG) is NO_MASKS


def test_direct_reference_keeps_its_function_and_source_type() -> None:
    plan = result(select(src("id", direct=True), src("email", direct=True)))
    assert plan.columns is not None and plan.columns[0] is None
    mask = plan.columns[1]
    assert mask is not None
    assert str(mask.function) == "partial_email"
    assert mask.sources == ("public.customers.email",)
    assert mask.source_type == (25, -1)
    assert plan.masked == ("public.customers.email",)


@pytest.mark.parametrize(
    ("lineage", "function"),
    [
        (src("email"), "redact"),  # upper(email): a partial mask is not safe on it
        (src("ssn"), "redact"),
        (src("card"), "hash(8)"),  # hash hides the whole value: kept
        (src("email", "ssn", direct=True), "redact"),  # two functions disagree
        (OPAQUE, "redact"),
    ],
)
def test_derived_and_opaque_values(lineage: ColumnLineage, function: str) -> None:
    plan = result(select(lineage))
    assert plan.columns is not None and plan.columns[0] is not None
    assert str(plan.columns[0].function) == function


def test_unknown_shape_masks_every_column() -> None:
    plan = result(StatementLineage(returns_rows=True, columns=None, rest=OPAQUE))
    assert plan.mask_at(0) is not None and plan.mask_at(7) is not None


def test_without_masks_nothing_is_masked() -> None:
    plan = plan_statement(select(src("email", direct=True)), (), CATALOG)
    assert plan.result is None and plan.refusal is None


@pytest.mark.parametrize(
    "writes",
    [
        (WriteFlow("public.copy.email", src("email", direct=True)),),
        (WriteFlow("public.notes.body", src("ssn")),),
        (WriteFlow("public.customers.id", src("email")),),  # UPDATE customers SET id = …email
        (WriteFlow("public.notes.body", OPAQUE),),
    ],
)
def test_copying_masked_values_into_a_clear_column_is_refused(
    writes: tuple[WriteFlow, ...],
) -> None:
    plan = plan_statement(StatementLineage(returns_rows=False, writes=writes), MASKS, CATALOG)
    assert plan.refusal is not None
    assert plan.refusal.rule == "masking"
    assert plan.refusal.sqlstate == "42501"


def test_copying_into_a_masked_column_or_clean_values_is_allowed() -> None:
    writes = (
        WriteFlow("public.customers.email", src("email")),  # UPDATE SET email = lower(email)
        WriteFlow("public.notes.secret", src("ssn")),  # the target is masked too
        WriteFlow("public.notes.body", src("id", direct=True)),
    )
    plan = plan_statement(StatementLineage(returns_rows=False, writes=writes), MASKS, CATALOG)
    assert plan.refusal is None


@pytest.mark.parametrize(
    ("lineage", "refused"),
    [
        (StatementLineage(returns_rows=False, renames=("public.customers",)), True),
        (StatementLineage(returns_rows=False, renames=("public.customers.email",)), True),
        (StatementLineage(returns_rows=False, renames=("public.customers.id",)), False),
        (StatementLineage(returns_rows=False, opaque_calls=("DO",)), True),
        (StatementLineage(returns_rows=True, opaque_calls=("public.leak",)), True),
        (StatementLineage(returns_rows=True, opaque_calls=("public.peek",)), False),
        (StatementLineage(returns_rows=True, opaque_calls=("public.missing",)), True),
    ],
)
def test_renames_and_opaque_code(lineage: StatementLineage, refused: bool) -> None:
    plan = plan_statement(lineage, MASKS, CATALOG)
    assert (plan.refusal is not None) is refused


def test_errors_are_scrubbed_when_masked_columns_are_read_anywhere() -> None:
    where_only = select(src("id", direct=True), reads=frozenset({"public.customers.email"}))
    plan = plan_statement(where_only, MASKS, CATALOG)
    assert plan.result is None and plan.scrub_errors
    clean = select(src("id", direct=True), reads=frozenset({"public.customers.id"}))
    assert not plan_statement(clean, MASKS, CATALOG).scrub_errors


def test_fetch_and_execute_carry_what_the_statement_adds() -> None:
    execute = StatementLineage(returns_rows=True, reference=("prepared", "p"), rest=src("email"))
    plan = plan_statement(execute, MASKS, CATALOG)
    assert plan.reference == ("prepared", "p")
    assert plan.result is not None and plan.result.rest is not None
    named = ResultPlan((None, None), None)
    merged = named.merged(plan.result)
    assert merged.mask_at(0) is not None and merged.mask_at(1) is not None


def test_masker_cache_falls_back_to_redact_for_inapplicable_types() -> None:
    cache = MaskerCache(b"k")
    seen: list[str] = []
    cache.on_fallback = lambda fn, oid, why: seen.append(why)
    plan = result(select(src("age", direct=True)))  # partial_email on an int4
    rows = cache.rows(plan, [(23, -1)], [0])
    body = b"\x00\x01" + (2).to_bytes(4, "big") + b"42"
    assert rows.mask_datarow(body) == b"\x00\x01" + (1).to_bytes(4, "big") + b"0"
    assert seen


def test_keyed_masks_without_a_secret_are_redacted() -> None:
    cache = MaskerCache(b"")
    plan = result(select(src("card", direct=True)))
    rows = cache.rows(plan, [(25, -1)], [0])
    body = b"\x00\x01" + (4).to_bytes(4, "big") + b"abcd"
    assert rows.mask_datarow(body).endswith(b"****")


def test_type_problems_reported_for_policy_check() -> None:
    problems = mask_type_problems(MASKS, CATALOG)
    assert [(p[1], p[3]) for p in problems] == [("public.customers.age", True)]


def test_raw_transforms_are_shared_and_remember_results() -> None:
    from pgguard.masking.functions import build_masker
    from pgguard.policy.model import MaskFunction

    masker = build_masker(MaskFunction(name="keep_last", args=(4,), text="keep_last(4)"), 25, b"")
    transform = masker.raw(0)
    assert masker.raw(0) is transform
    assert transform(b"123-45-6789") == b"***-**-6789"
    assert transform(b"123-45-6789") == b"***-**-6789"
    numeric = build_masker(MaskFunction(name="generalize", args=(1000,), text="g"), 1700, b"")
    bad = numeric.raw(0)
    for _ in range(2):  # a value that fails to decode fails every time (never remembered)
        with pytest.raises(ValueError):
            bad(b"not a number")
    assert bad(b"-1.5") == b"-1000.0"
