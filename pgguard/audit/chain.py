"""The hash chain: one chain per pgguard instance, and its verification. Pure functions.

Sealing. Each instance numbers its records ``seq`` = 1, 2, 3 … and links them::

    canonical(r) = JSON of r.to_json() without "hash": sorted keys, separators (",", ":"),
                   ASCII-only (ensure_ascii) — UTF-8 bytes
    r.hash       = sha256(r.prev_hash + canonical(r)).hexdigest()
    r.prev_hash  = hash of the instance's previous record, or 64 zeros for seq 1

The JSON form is the one ``--json`` and the JSON-lines sink print (``ts`` as ISO-8601 with
microseconds), so anyone can re-check a chain from that output alone. An instance that restarts
continues its chain: the writer loads the last ``(seq, hash)`` of its ``instance_id`` from the
store (:meth:`ChainState.resume`).

Verification reads records in *storage order* (row id, line number) — not sorted by ``seq``,
which would hide a reordering — and reports, per instance, the first broken link:

* ``edited``: a record's contents no longer match its hash (or a record was rewritten and
  re-hashed, so the next record's ``prev_hash`` no longer matches it);
* ``deleted``: ``seq`` values are missing (a gap, or a chain that does not start at 1);
* ``inserted``: an extra record (a duplicate ``seq``, or one the chain does not need);
* ``reordered``: the records are all there but not stored in ``seq`` order.

Limits of any keyless hash chain: deleting the *last* records, or appending well-formed
forged ones, leaves a valid (shorter or longer) chain; so does rewriting and re-hashing every
record from some point on. Anchors catch the first and the last: ``anchors={instance: Link}``
are links known to be in the chain (the head a previous verification printed, the writer's
``head``, another store's or a shipped JSON-lines copy's last link); verification then also
fails if the chain does not reach an anchor (``deleted``) or holds another hash at its seq
(``edited``). Records after an anchor are not judged by it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

from pgguard.audit.jsoncodec import canonical_json
from pgguard.audit.records import (
    AuditRecord,
    PlainExtra,
    format_ts,
    set_link,
    storable,
    with_link,
)

ZERO_HASH = "0" * 64

BreakKind = Literal["edited", "deleted", "inserted", "reordered"]


def canonical(record: AuditRecord) -> bytes:
    """The bytes a record's hash covers: its JSON form without ``hash``, canonicalised."""
    return _dumps(record, _hashed(record, record.instance_id, record.seq, record.prev_hash))


def _dumps(record: AuditRecord, data: dict[str, object]) -> bytes:
    # Every field but ``extra`` is finite by construction (AuditRecord.__post_init__); an
    # ``extra`` pgguard's record builder made is too (PlainExtra).
    extra = record.extra
    return canonical_json(data, finite=not extra or type(extra) is PlainExtra)


def _hashed(
    r: AuditRecord, instance_id: str, seq: int | None, prev_hash: str | None
) -> dict[str, object]:
    """:meth:`AuditRecord.to_json` without ``hash`` and with the given link fields; tuples
    are left as tuples (JSON arrays all the same), so nothing is copied."""
    return {
        "event": r.event,
        "ts": format_ts(r.ts),
        "instance_id": instance_id,
        "seq": seq,
        "session_id": r.session_id,
        "user": r.user,
        "email": r.email,
        "groups": r.groups,
        "agent": r.agent,
        "client_addr": r.client_addr,
        "application_name": r.application_name,
        "database": r.database,
        "upstream_role": r.upstream_role,
        "prompt_id": r.prompt_id,
        "prompt_source": r.prompt_source,
        "protocol": r.protocol,
        "statement_name": r.statement_name,
        "portal": r.portal,
        "statement": r.statement,
        "fingerprint": r.fingerprint,
        "params": r.params,
        "class": r.class_,
        "command": r.command,
        "objects": r.objects,
        "decision": r.decision,
        "rule": r.rule,
        "approval_id": r.approval_id,
        "masked_columns": r.masked_columns,
        "rows": r.rows,
        "sqlstate": r.sqlstate,
        "duration_ms": r.duration_ms,
        "prev_hash": prev_hash,
        "extra": r.extra,
    }


def compute_hash(record: AuditRecord) -> str:
    """``sha256(prev_hash + canonical(record))`` as hex (``prev_hash`` null counts as zeros)."""
    prev = record.prev_hash if record.prev_hash is not None else ZERO_HASH
    h = hashlib.sha256(prev.encode("ascii", "backslashreplace"))
    h.update(canonical(record))
    return h.hexdigest()


def is_sealed(record: AuditRecord) -> bool:
    """Whether ``record.hash`` matches its contents."""
    return (
        record.hash is not None
        and record.prev_hash is not None
        and (compute_hash(record) == record.hash)
    )


def seal(
    record: AuditRecord, instance_id: str, seq: int, prev_hash: str, in_place: bool = False
) -> AuditRecord:
    """``record`` as link ``seq`` of ``instance_id``'s chain, after ``prev_hash``; made
    :func:`~pgguard.audit.records.storable` first, so that it survives any store unchanged.
    ``in_place``: the caller owns ``record`` (nothing else holds it), so its chain fields are
    set on it (or on its storable copy) rather than on another copy."""
    record = storable(record)
    h = hashlib.sha256(prev_hash.encode("ascii"))
    h.update(_dumps(record, _hashed(record, instance_id, seq, prev_hash)))
    if in_place:
        set_link(record, instance_id, seq, prev_hash, h.hexdigest())
        return record
    return with_link(record, instance_id, seq, prev_hash, h.hexdigest())


class Link(NamedTuple):
    """A link of a chain, ``(seq, hash)``: e.g. the last record's."""

    seq: int
    hash: str


class ChainState:
    """One instance's chain head; ``next(record)`` seals the record and advances. Not
    thread-safe: the writer thread owns it."""

    __slots__ = ("head", "instance_id")

    def __init__(self, instance_id: str, head: Link | None = None) -> None:
        self.instance_id = instance_id
        self.head = head

    def resume(self, head: Link | None) -> None:
        """Continue after ``head`` (the last stored link of this instance), if any."""
        self.head = head

    def next(self, record: AuditRecord, in_place: bool = False) -> AuditRecord:
        seq = self.head.seq + 1 if self.head else 1
        prev = self.head.hash if self.head else ZERO_HASH
        sealed = seal(record, self.instance_id, seq, prev, in_place)
        assert sealed.hash is not None
        self.head = Link(seq, sealed.hash)
        return sealed


# -- verification ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Break:
    """The first broken link of one instance's chain."""

    instance_id: str
    kind: BreakKind
    position: int  # 0-based index among this instance's records, in storage order
    ref: int | None  # where the store keeps it: row id, line number; None if unknown
    seq: int | None  # the seq stored in that record
    reason: str

    def describe(self) -> str:
        where = f"position {self.position}"
        if self.ref is not None:
            where += f" (store position {self.ref})"
        seq = f", seq {self.seq}" if self.seq is not None else ""
        return f"instance {self.instance_id!r}: record at {where}{seq}: {self.kind}: {self.reason}"


@dataclass(frozen=True, slots=True)
class ChainSummary:
    """What was checked for one instance."""

    instance_id: str
    records: int
    first_seq: int | None
    head: Link | None  # the last record that links correctly (the verified head)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    records: int
    chains: tuple[ChainSummary, ...]
    breaks: tuple[Break, ...]  # at most one per instance, in the order the instances came

    @property
    def first(self) -> Break | None:
        return self.breaks[0] if self.breaks else None


@dataclass(slots=True)
class _L:
    """What verification keeps of a record."""

    seq: int
    prev: str
    hash: str
    sealed: bool


@dataclass(slots=True)
class _Pending:
    """An anomaly at record ``r``, waiting for the records after it to be classified."""

    index: int
    ref: int | None
    r: _L
    last: _L | None
    before_last: _L | None
    before_index: int | None
    before_ref: int | None
    n1: _L | None = None
    seen_after: int = 0
    missing_at: tuple[int, int | None] | None = None  # first later record with seq == expected
    same_seq_later: bool = False  # a later record has r's seq
    pred_later: bool = False  # a later record is r's predecessor (seq - 1, hash == r.prev)


@dataclass(slots=True)
class _Chain:
    instance_id: str
    anchor: Link | None = None
    count: int = 0
    first_seq: int | None = None
    last: _L | None = None
    last_index: int | None = None
    last_ref: int | None = None
    before_last: _L | None = None
    pending: _Pending | None = None
    broken: Break | None = None


def _fits(x: _L, after: _L | None) -> bool:
    if after is None:
        return x.seq == 1 and x.prev == ZERO_HASH
    return x.seq == after.seq + 1 and x.prev == after.hash


class ChainVerifier:
    """Streaming verifier: ``feed`` records in storage order (instances may interleave), then
    ``finish``. Memory is O(number of instances). ``anchors``: see the module docstring."""

    def __init__(self, anchors: Mapping[str, Link] | None = None) -> None:
        self._chains: dict[str, _Chain] = {}
        self._records = 0
        self._anchors = dict(anchors or {})

    def feed(self, record: AuditRecord, ref: int | None = None) -> None:
        self._records += 1
        c = self._chains.get(record.instance_id)
        if c is None:
            c = self._chains[record.instance_id] = _Chain(
                record.instance_id, self._anchors.get(record.instance_id)
            )
        index = c.count
        c.count += 1
        if c.first_seq is None:
            c.first_seq = record.seq
        if c.broken is not None:
            return
        link = _L(
            seq=record.seq if record.seq is not None else -1,
            prev=record.prev_hash or "",
            hash=record.hash or "",
            sealed=is_sealed(record),
        )
        p = c.pending
        if p is not None:
            self._observe(p, link, index, ref)
            return
        if link.sealed and _fits(link, c.last):
            c.before_last = c.last
            c.last, c.last_index, c.last_ref = link, index, ref
            if c.anchor is not None and link.seq == c.anchor.seq and link.hash != c.anchor.hash:
                c.broken = Break(
                    c.instance_id,
                    "edited",
                    index,
                    ref,
                    link.seq,
                    "the chain up to here was rewritten: this record's hash differs from the "
                    "anchor's",
                )
            return
        c.pending = _Pending(
            index=index,
            ref=ref,
            r=link,
            last=c.last,
            before_last=c.before_last,
            before_index=c.last_index,
            before_ref=c.last_ref,
        )

    @staticmethod
    def _observe(p: _Pending, link: _L, index: int, ref: int | None) -> None:
        if p.n1 is None:
            p.n1 = link
        p.seen_after += 1
        expected = p.last.seq + 1 if p.last else 1
        if p.missing_at is None and link.seq == expected:
            p.missing_at = (index, ref)
        if link.seq == p.r.seq:
            p.same_seq_later = True
        if link.seq == p.r.seq - 1 and link.hash == p.r.prev:
            p.pred_later = True

    def finish(self) -> VerifyResult:
        """Classify what is pending, check the anchors, and report."""
        chains: list[ChainSummary] = []
        breaks: list[Break] = []
        for c in self._chains.values():
            if c.broken is None and c.pending is not None:
                c.broken = _classify(c.instance_id, c.pending)
            if c.broken is None and c.anchor is not None:
                c.broken = _check_anchor(c, c.anchor)
            head = Link(c.last.seq, c.last.hash) if c.last else None
            chains.append(ChainSummary(c.instance_id, c.count, c.first_seq, head))
            if c.broken is not None:
                breaks.append(c.broken)
        for instance_id, anchor in self._anchors.items():
            if instance_id not in self._chains:
                chains.append(ChainSummary(instance_id, 0, None, None))
                breaks.append(
                    Break(
                        instance_id,
                        "deleted",
                        0,
                        None,
                        None,
                        f"no records at all, but the chain is known to reach seq {anchor.seq}",
                    )
                )
        return VerifyResult(not breaks, self._records, tuple(chains), tuple(breaks))


def _check_anchor(c: _Chain, anchor: Link) -> Break | None:
    last = c.last
    if last is None or last.seq >= anchor.seq:
        return None  # an empty chain is reported by its pending break; a reached one, in feed
    return Break(
        c.instance_id,
        "deleted",
        c.last_index if c.last_index is not None else 0,
        c.last_ref,
        last.seq,
        f"the chain ends at seq {last.seq}, but it is known to reach seq {anchor.seq}: "
        f"the last {anchor.seq - last.seq} record(s) are missing",
    )


def _classify(instance_id: str, p: _Pending) -> Break:
    r, last, n1 = p.r, p.last, p.n1
    expected = last.seq + 1 if last else 1
    expected_prev = last.hash if last else ZERO_HASH
    prev_desc = f"seq {last.seq}" if last else "the start of the chain"
    n1_fits = n1 is not None and n1.sealed and _fits(n1, last)

    def brk(kind: BreakKind, reason: str, at_previous: bool = False) -> Break:
        if at_previous and p.before_index is not None and last is not None:
            return Break(instance_id, kind, p.before_index, p.before_ref, last.seq, reason)
        return Break(instance_id, kind, p.index, p.ref, r.seq, reason)

    if not r.sealed:
        if n1_fits:
            return brk(
                "inserted",
                f"this record does not belong to the chain (its hash does not match its "
                f"contents, and the next record follows on from {prev_desc})",
            )
        linked = r.prev == expected_prev or (n1 is not None and n1.prev == r.hash)
        if linked or r.seq == expected:
            return brk("edited", "the record's contents do not match its hash")
        return brk(
            "inserted",
            f"a record with seq {r.seq} that is not linked to the chain (neither to "
            f"{prev_desc} nor to the next record), and whose hash does not match",
        )
    if r.seq == expected:
        if n1_fits:
            return brk(
                "inserted",
                f"an extra record with seq {r.seq}: the next record follows on from {prev_desc}",
            )
        if last is None:
            return brk("edited", "the first record's prev_hash is not 64 zeros: it was rewritten")
        return brk(
            "edited",
            f"this record was rewritten and re-hashed: the next record (seq {r.seq}) has a "
            f"prev_hash that does not match it",
            at_previous=True,
        )
    if r.seq < expected:
        if last is None:  # seq 0 or negative: no genuine record has it
            return brk("inserted", f"a record with an impossible seq {r.seq}")
        if (
            r.seq == last.seq
            and _fits(r, p.before_last)
            and (n1 is None or (n1.sealed and _fits(n1, r)))
        ):
            return brk(
                "inserted",
                f"seq {r.seq} appears twice; this earlier copy is the extra one (the later "
                f"copy links correctly both ways)",
                at_previous=True,
            )
        if n1_fits or n1 is None:
            return brk(
                "inserted",
                f"an extra record with seq {r.seq} after seq {last.seq} "
                f"(seq {r.seq} already appeared)",
            )
        return brk("reordered", f"seq {r.seq} is stored after seq {last.seq}")
    # r.seq > expected: a gap
    if n1_fits:
        if p.same_seq_later or not p.pred_later:
            return brk(
                "inserted",
                f"an extra record with seq {r.seq}: the next record follows on from {prev_desc}",
            )
        return brk(
            "reordered",
            f"seq {r.seq} is stored before seq {expected} (which is the next record)",
        )
    if p.missing_at is not None:
        at_index, at_ref = p.missing_at
        where = f"position {at_index}" + (
            f" (store position {at_ref})" if at_ref is not None else ""
        )
        return brk("reordered", f"seq {r.seq} is stored before seq {expected}, found at {where}")
    missing = f"seq {expected}" if r.seq == expected + 1 else f"seq {expected}..{r.seq - 1}"
    if last is None:
        return brk("deleted", f"the chain starts at seq {r.seq}: {missing} missing")
    return brk("deleted", f"{missing} missing after {prev_desc}")


# -- convenience wrappers -------------------------------------------------------------------


def verify_stream(
    items: Iterable[tuple[int | None, AuditRecord]], anchors: Mapping[str, Link] | None = None
) -> VerifyResult:
    """Verify ``(store position, record)`` pairs given in storage order."""
    v = ChainVerifier(anchors)
    for ref, record in items:
        v.feed(record, ref)
    return v.finish()


def verify(
    records_by_instance: Mapping[str, Iterable[AuditRecord]],
    anchors: Mapping[str, Link] | None = None,
) -> VerifyResult:
    """Verify each instance's records, given in storage order. The first break of each
    instance is reported (``result.first`` is the first of them)."""
    v = ChainVerifier(anchors)
    for records in records_by_instance.values():
        for record in records:
            v.feed(record)
    return v.finish()


def enumerate_records(records: Iterable[AuditRecord]) -> Iterator[tuple[int, AuditRecord]]:
    """``(line number, record)`` pairs, 1-based, for :func:`verify_stream`."""
    yield from enumerate(records, 1)
