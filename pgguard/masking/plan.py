"""From column lineage to what one identity's session must do with each statement. Pure.

:func:`plan_statement` takes a statement's :class:`~pgguard.masking.lineage.StatementLineage`
and the masks that apply to the identity (:func:`pgguard.policy.engine.masks_for`) and says:

* which mask each result column gets (:class:`ColumnMask`), or that the result is clean;
* whether the statement must be refused because it would copy masked values into a table
  whose columns are not masked, rename a masked relation or column (the mask patterns would
  then stop matching it), or run code pgguard cannot see into;
* whether the server's error text must be scrubbed (the statement reads masked columns, and
  errors such as ``invalid input syntax for type integer: "alice@example.com"`` quote values).

Choosing the mask of a result column (fail closed):

* opaque lineage → ``redact`` (a type-safe constant; NULL for types without a codec);
* no masked source → clean;
* a direct reference whose masked sources all have the same function → that function;
* derived values (expressions, aggregates, constructors…) keep the function only when it
  hides the whole value whatever it is applied to (``nullify``, ``redact``, ``constant``,
  ``hash``, ``pseudo``); partial masks are not safe on a derived value (``keep_last(4)`` of
  ``reverse(ssn)`` shows the first digits), so those become ``redact``.

:class:`MaskerCache` builds the runtime :class:`~pgguard.masking.rows.RowMasker` of a result
from a plan and the RowDescription's types and formats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pgguard.masking.functions import KEYED_FUNCTIONS, Masker, MaskError, build_masker
from pgguard.masking.lineage import CLEAN, ColumnLineage, CopyOptions, StatementLineage
from pgguard.masking.rows import ColumnPlan, CopyFormat, RowMasker
from pgguard.policy.catalog import CatalogSnapshot
from pgguard.policy.engine import mask_for_column
from pgguard.policy.identity_guard import Refusal
from pgguard.policy.model import MaskFunction, MaskRule

__all__ = [
    "NO_MASKS",
    "OPAQUE_LABEL",
    "ColumnMask",
    "MaskerCache",
    "ResultPlan",
    "StatementPlan",
    "plan_statement",
]

RULE = "masking"
OPAQUE_LABEL = "(unknown origin)"
REDACT = MaskFunction(name="redact", args=(), text="redact")
NULLIFY = MaskFunction(name="nullify", args=(), text="nullify")
# Functions that hide the whole value whatever it is: safe on a derived value too.
_WHOLE_VALUE = frozenset({"nullify", "redact", "constant", "hash", "pseudo"})


@dataclass(frozen=True, slots=True)
class ColumnMask:
    """The mask of one result column. ``label``: the policy's column pattern (the metric's
    label); ``sources``: the masked source columns, for the audit record."""

    function: MaskFunction
    label: str
    sources: tuple[str, ...]
    # For COPY, where no RowDescription gives types: (type oid, typmod) of a direct source.
    source_type: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class ResultPlan:
    """Masks of one result's columns; ``rest`` applies to columns past ``columns`` (all of
    them when ``columns`` is None)."""

    columns: tuple[ColumnMask | None, ...] | None
    rest: ColumnMask | None

    def merged(self, extra: ResultPlan | None) -> ResultPlan:
        """This plan with ``extra``'s masks on the columns this one leaves clear."""
        if extra is None:
            return self
        if self.columns is None:
            return ResultPlan(None, self.rest or extra.rest)
        columns = tuple(m or extra.mask_at(i) for i, m in enumerate(self.columns))
        return ResultPlan(columns, self.rest or extra.rest)

    def mask_at(self, index: int) -> ColumnMask | None:
        if self.columns is not None and index < len(self.columns):
            return self.columns[index]
        return self.rest

    @property
    def masked(self) -> tuple[str, ...]:
        """The masked source columns (for the audit record), in column order."""
        out: dict[str, None] = {}
        for mask in (*(self.columns or ()), self.rest):
            if mask is not None:
                out.update(dict.fromkeys(mask.sources or (mask.label,)))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class StatementPlan:
    """What a masked identity's session does with one statement."""

    result: ResultPlan | None = None  # None: nothing to mask in its result
    returns_rows: bool = False
    reference: tuple[str, str] | None = None  # FETCH / EXECUTE: the named object's result
    declares: tuple[str, str] | None = None  # DECLARE / PREPARE: `result` belongs to it
    copy: CopyOptions | None = None
    refusal: Refusal | None = None
    scrub_errors: bool = False
    width: int | None = None  # result columns expected, when the analysis knows


NO_MASKS = StatementPlan()
OPAQUE_MASK = ColumnMask(REDACT, OPAQUE_LABEL, ())
OPAQUE_RESULT = ResultPlan(None, OPAQUE_MASK)


def _column_mask(
    lineage: ColumnLineage, masks: Sequence[MaskRule], catalog: CatalogSnapshot
) -> ColumnMask | None:
    if lineage is CLEAN:
        return None
    if lineage.opaque:
        return OPAQUE_MASK
    hits: list[tuple[str, MaskRule]] = []
    for source in sorted(lineage.sources):
        parts = source.split(".", 2)
        if len(parts) != 3:
            continue
        rule = mask_for_column(masks, *parts)
        if rule is not None:
            hits.append((source, rule))
    if not hits:
        return None
    sources = tuple(source for source, _ in hits)
    label = hits[0][1].column
    functions = {str(rule.function) for _, rule in hits}
    function = hits[0][1].function
    if len(functions) != 1 or (not lineage.direct and function.name not in _WHOLE_VALUE):
        function = REDACT
    source_type = None
    if lineage.direct and len(hits) == 1:
        schema, table, column = sources[0].split(".", 2)
        info = catalog.relation(schema, table, ())
        if info is not None:
            source_type = info.column_type(column)
    return ColumnMask(function, label, sources, source_type)


def _needs_mask(lineage: ColumnLineage, masks: Sequence[MaskRule]) -> str | None:
    """The masked source ``lineage`` carries (or "unknown origin"), or None when clean."""
    if lineage.opaque:
        return OPAQUE_LABEL
    for source in sorted(lineage.sources):
        parts = source.split(".", 2)
        if len(parts) == 3 and mask_for_column(masks, *parts) is not None:
            return source
    return None


def _relation_masked(relation: str, masks: Sequence[MaskRule], catalog: CatalogSnapshot) -> bool:
    schema, _, name = relation.partition(".")
    info = catalog.relation(schema, name, ())
    if info is None:
        # Unknown columns: any mask pattern that could match the relation counts.
        return any(m.column_matches(schema, name, "*") for m in masks)
    return any(mask_for_column(masks, schema, name, c) is not None for c in info.columns)


def _refusal(
    lineage: StatementLineage, masks: Sequence[MaskRule], catalog: CatalogSnapshot
) -> Refusal | None:
    for flow in lineage.writes:
        source = _needs_mask(flow.lineage, masks)
        if source is None:
            continue
        parts = flow.target.split(".", 2)
        if len(parts) == 3 and mask_for_column(masks, *parts) is not None:
            continue  # into a column masked for this identity too
        return Refusal(
            RULE,
            f"the statement copies masked column {source} into {flow.target}, which is not masked",
        )
    for name in lineage.renames:
        parts = name.split(".", 2)
        masked = (
            mask_for_column(masks, *parts) is not None
            if len(parts) == 3
            else _relation_masked(name, masks, catalog)
        )
        if masked:
            return Refusal(RULE, f"{name} has masked columns and cannot be renamed or moved")
    for call in lineage.opaque_calls:
        if call == "DO":
            return Refusal(
                RULE,
                "DO blocks cannot be checked for masked columns; refused for masked identities",
            )
        schema, _, name = call.partition(".")
        candidates = catalog.functions(schema, name, ())
        if not candidates or any(fn.volatility == "v" for fn in candidates):
            return Refusal(
                RULE,
                f"{call} is a volatile function pgguard cannot see into "
                "(it could copy masked columns); refused for masked identities",
            )
    return None


def plan_statement(
    lineage: StatementLineage, masks: Sequence[MaskRule], catalog: CatalogSnapshot
) -> StatementPlan:
    """The plan of one statement for an identity whose masks are ``masks`` (non-empty)."""
    refusal = _refusal(lineage, masks, catalog)
    result: ResultPlan | None = None
    # FETCH / EXECUTE: `rest` is what the statement adds to the named object's columns (the
    # EXECUTE parameters); the session merges it in.
    columns = (
        None
        if lineage.columns is None or lineage.reference is not None
        else tuple(_column_mask(c, masks, catalog) for c in lineage.columns)
    )
    rest = _column_mask(lineage.rest, masks, catalog)
    if rest is not None or (columns is not None and any(columns)):
        result = ResultPlan(columns, rest)
    # A result of another width than analysed means a stale catalog: masked entirely.
    width = (
        len(lineage.columns)
        if lineage.columns is not None and lineage.reference is None and rest is None
        else None
    )
    scrub = lineage.reads_opaque or any(
        _needs_mask(ColumnLineage(frozenset((source,))), masks) for source in lineage.reads
    )
    if (
        refusal is None
        and result is None
        and lineage.reference is None
        and lineage.declares is None
        and not scrub
        and width is None
    ):
        return NO_MASKS
    return StatementPlan(
        result=result,
        returns_rows=lineage.returns_rows,
        reference=lineage.reference,
        declares=lineage.declares,
        copy=lineage.copy,
        refusal=refusal,
        scrub_errors=scrub or result is not None,
        width=width,
    )


# ------------------------------------------------------------------------------- runtime


class MaskerCache:
    """Builds maskers and row maskers, remembering them per (function, type, typmod)."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self._maskers: dict[tuple[str, int, int], Masker] = {}
        self._rows: dict[tuple[object, ...], RowMasker] = {}
        self.on_fallback: Callable[[MaskFunction, int, str], None] | None = None

    def masker(self, function: MaskFunction, type_oid: int, typmod: int) -> Masker:
        key = (function.text or str(function), type_oid, typmod)
        found = self._maskers.get(key)
        if found is not None:
            return found
        chosen = function
        if function.name in KEYED_FUNCTIONS and not self.secret:
            chosen = REDACT  # no secret configured: a keyed mask cannot be computed
        try:
            found = build_masker(chosen, type_oid, self.secret, typmod=typmod)
        except MaskError as exc:
            # Not applicable to this type (e.g. a derived value): a type-safe constant.
            if self.on_fallback is not None:
                self.on_fallback(function, type_oid, str(exc))
            try:
                found = build_masker(REDACT, type_oid, self.secret, typmod=typmod)
            except MaskError:
                found = build_masker(NULLIFY, type_oid, self.secret, typmod=typmod)
        if len(self._maskers) > 4096:
            self._maskers.clear()
        self._maskers[key] = found
        return found

    def rows(
        self,
        plan: ResultPlan,
        types: Sequence[tuple[int, int]],
        formats: Sequence[int],
    ) -> RowMasker:
        """The row masker of a result with these column types ((oid, typmod)) and formats."""
        key = (plan, tuple(types), tuple(formats))  # plans compare by value
        known = self._rows.get(key)
        if known is not None:
            return known
        entries: list[ColumnPlan] = []
        for i, (type_oid, typmod) in enumerate(types):
            mask = plan.mask_at(i)
            fmt = formats[i] if i < len(formats) else 0
            if mask is None:
                entries.append(ColumnPlan(type_oid, fmt, None))
            else:
                entries.append(
                    ColumnPlan(
                        type_oid, fmt, self.masker(mask.function, type_oid, typmod), mask.label
                    )
                )
        masker = RowMasker(entries)
        if len(self._rows) > 1024:
            self._rows.clear()
        self._rows[key] = masker
        return masker

    def blind(self, width: int) -> RowMasker:
        """Every column NULL: rows whose types pgguard does not know."""
        nullify = self.masker(NULLIFY, 0, -1)
        return RowMasker([ColumnPlan(0, 0, nullify, OPAQUE_LABEL)] * width)

    def copy_rows(self, plan: ResultPlan, width: int, fmt: int) -> RowMasker:
        """The row masker of a COPY … TO STDOUT of ``width`` columns. COPY has no
        RowDescription: a masked column is masked with its function when its direct source's
        type is known, and sent as NULL (valid for every type) otherwise."""
        entries: list[ColumnPlan] = []
        for i in range(width):
            mask = plan.mask_at(i)
            if mask is None:
                entries.append(ColumnPlan(25, fmt, None))
            elif mask.source_type is not None:
                type_oid, typmod = mask.source_type
                entries.append(
                    ColumnPlan(
                        type_oid, fmt, self.masker(mask.function, type_oid, typmod), mask.label
                    )
                )
            else:
                entries.append(ColumnPlan(0, fmt, self.masker(NULLIFY, 0, -1), mask.label))
        return RowMasker(entries)


def copy_format(options: CopyOptions | None) -> CopyFormat | None:
    """The rows.CopyFormat of a text/csv COPY (None for binary)."""
    if options is None:
        return CopyFormat()
    if options.format == "binary":
        return None
    kind: Literal["text", "csv"] = "csv" if options.format == "csv" else "text"

    def b(value: str | None) -> bytes | None:
        return None if value is None else value.encode("utf-8")

    return CopyFormat(
        kind,
        b(options.delimiter),
        b(options.null),
        b(options.quote) or b'"',
        b(options.escape),
    )


def mask_type_problems(
    masks: Sequence[MaskRule], catalog: CatalogSnapshot
) -> list[tuple[MaskRule, str, str, bool]]:
    """Masks that cannot apply to the type of a column they match in ``catalog``:
    ``(mask, "schema.table.column", reason, is_error)``. An error is a function that does
    not apply to the type (pgguard then redacts that column); a warning a type without a
    codec (masked as NULL whatever the function)."""
    from pgguard.masking.functions import applicable, fallback_note

    found: list[tuple[MaskRule, str, str, bool]] = []
    for info in catalog.all_relations():
        if info.kind not in ("r", "p", "f", "v", "m") or not info.column_types:
            continue
        for column, (type_oid, _typmod) in zip(info.columns, info.column_types, strict=False):
            for mask in masks:
                if not mask.column_matches(info.schema, info.name, column):
                    continue
                where = f"{info.schema}.{info.name}.{column}"
                reason = applicable(mask.function, type_oid)
                if reason is not None:
                    found.append((mask, where, reason, True))
                    continue
                note = fallback_note(mask.function, type_oid)
                if note is not None:
                    found.append((mask, where, note, False))
    return found
