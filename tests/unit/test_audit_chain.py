"""The audit record's JSON form and the hash chain: sealing, resuming, tamper detection."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pgguard.audit.chain import (
    ZERO_HASH,
    ChainState,
    ChainVerifier,
    Link,
    canonical,
    compute_hash,
    is_sealed,
    seal,
    verify,
    verify_stream,
)
from pgguard.audit.records import (
    DECISIONS,
    EVENTS,
    INDEXED_FIELD_MAX,
    JSON_KEYS,
    AuditRecord,
    format_ts,
    parse_ts,
    storable,
)

SPEC_KEYS = {
    "event",
    "ts",
    "instance_id",
    "session_id",
    "user",
    "email",
    "groups",
    "agent",
    "client_addr",
    "application_name",
    "database",
    "upstream_role",
    "prompt_id",
    "prompt_source",
    "protocol",
    "statement_name",
    "portal",
    "statement",
    "fingerprint",
    "params",
    "class",
    "command",
    "objects",
    "decision",
    "rule",
    "approval_id",
    "masked_columns",
    "rows",
    "sqlstate",
    "duration_ms",
    "prev_hash",
    "hash",
}

settings.register_profile(
    "audit", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
AUDIT = settings.get_profile("audit")


def full_record(**overrides: Any) -> AuditRecord:
    base: dict[str, Any] = {
        "event": "statement",
        "ts": 1714564800.123456,
        "session_id": "s-1",
        "user": "alice",
        "email": "alice@example.com",
        "groups": ("ai-agents", "devs"),
        "agent": "cursor",
        "client_addr": "127.0.0.1:50000",
        "application_name": "psql",
        "database": "app",
        "upstream_role": "analyst",
        "prompt_id": "p-42",
        "prompt_source": "comment",
        "protocol": "extended",
        "statement_name": "s1",
        "portal": "",
        "statement": "SELECT * FROM public.users WHERE id = $1",
        "fingerprint": "a1b2c3",
        "params": ("42", None, "AAEC"),
        "class_": "read",
        "command": "SELECT",
        "objects": ("public.users",),
        "decision": "allow",
        "rule": "ai-read-only",
        "approval_id": None,
        "masked_columns": ("public.users.email",),
        "rows": 3,
        "sqlstate": None,
        "duration_ms": 1.25,
        "extra": {"note": "x", "n": 1},
    }
    base.update(overrides)
    return AuditRecord(**base)


# -- records -----------------------------------------------------------------------------


def test_json_form_has_every_spec_key_plus_seq_and_extra() -> None:
    data = full_record().to_json()
    assert set(data) == SPEC_KEYS | {"seq", "extra"}
    assert tuple(data) == JSON_KEYS
    assert data["class"] == "read"
    assert data["ts"] == "2024-05-01T12:00:00.123456Z"
    assert data["groups"] == ["ai-agents", "devs"]
    assert data["params"] == ["42", None, "AAEC"]
    # a --json line is one line of valid JSON
    line = full_record(statement="a\nb\x1b[31m\u202e").to_json_line()
    assert "\n" not in line and "\u202e" not in line
    assert json.loads(line)["statement"] == "a\nb\x1b[31m\u202e"


def test_from_json_inverts_to_json() -> None:
    r = full_record(seq=7, prev_hash="a" * 64, hash="b" * 64, instance_id="i")
    assert AuditRecord.from_json(r.to_json()) == r
    assert AuditRecord.from_json(json.loads(r.to_json_line())) == r
    # unknown keys are ignored, missing ones are null
    minimal = AuditRecord.from_json({"event": "session_end", "ts": 5, "future": 1})
    assert minimal.ts == 5.0 and minimal.user is None and minimal.groups == ()
    with pytest.raises(ValueError):
        AuditRecord.from_json({"event": "statement"})


def test_coercions() -> None:
    r = AuditRecord(
        event="statement",
        ts=1,
        groups=["a"],  # type: ignore[arg-type]
        duration_ms=2,
        extra=None,  # type: ignore[arg-type]
    )
    assert r.groups == ("a",) and isinstance(r.ts, float) and r.duration_ms == 2.0
    assert isinstance(r.duration_ms, float) and r.extra == {}
    assert AuditRecord(event="statement", ts=0, duration_ms=float("nan")).duration_ms is None


def test_timestamps() -> None:
    assert format_ts(0) == "1970-01-01T00:00:00.000000Z"
    assert parse_ts("1970-01-01T00:00:01.5Z") == 1.5
    assert parse_ts("1970-01-01T02:00:00+02:00") == 0.0
    assert parse_ts("1970-01-01T00:00:10") == 10.0  # naive = UTC
    assert parse_ts(3) == 3.0
    with pytest.raises(ValueError):
        parse_ts("yesterday")


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_iso_timestamp_round_trips_at_microsecond_precision(ts: float) -> None:
    iso = format_ts(ts)
    assert format_ts(parse_ts(iso)) == iso


@given(st.floats(min_value=-1e10, max_value=4e10, allow_nan=False))
def test_iso_timestamp_is_what_datetime_writes(ts: float) -> None:
    # format_ts rounds and caches by itself; the text must be datetime's, always.
    expected = datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="microseconds")
    assert format_ts(ts) == expected[:-6] + "Z"
    assert format_ts(ts + 0.5) == (
        datetime.fromtimestamp(ts + 0.5, tz=UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    )


def test_storable_cleans_and_caps() -> None:
    r = storable(
        full_record(
            statement="a\x00b\udc80",
            prompt_id="p" * 5000,
            extra={1: {"when": object}, "t": (1, 2)},
        )
    )
    assert r.statement is not None and "\x00" not in r.statement
    r.statement.encode("utf-8")  # no lone surrogate left
    assert r.prompt_id is not None and len(r.prompt_id) == INDEXED_FIELD_MAX
    assert r.extra == {"1": {"when": str(object)}, "t": [1, 2]}
    clean = full_record()
    assert storable(replace(clean, extra={})) == replace(clean, extra={})


@pytest.mark.parametrize(
    "change",
    [
        {"statement": "select '\x00'"},
        {"user": "\udc80"},
        {"client_addr": 5},
        {"session_id": "s" * (INDEXED_FIELD_MAX + 1)},
        {"groups": ("a", 7)},
        {"params": (None, b"x")},
        {"objects": (0,)},
    ],
)
def test_storable_sees_each_kind_of_unstorable_field(change: dict[str, Any]) -> None:
    # The quick all-fields check must send every one of these down the cleaning path.
    record = replace(full_record(extra={}), **change)
    cleaned = storable(record)
    assert cleaned is not record
    for name in change:
        value = getattr(cleaned, name)
        if isinstance(value, tuple):
            assert all(v is None or isinstance(v, str) for v in value)
        else:
            assert isinstance(value, str) and "\x00" not in value
            value.encode("utf-8")
            assert len(value) <= max(INDEXED_FIELD_MAX, len(str(change[name])))
    assert storable(cleaned) is cleaned


def test_sealing_in_place_gives_the_same_link_as_a_copy() -> None:
    copy_sealed = seal(full_record(), "inst", 3, ZERO_HASH)
    owned = full_record()
    in_place = seal(owned, "inst", 3, ZERO_HASH, in_place=True)
    assert in_place is owned and in_place == copy_sealed and is_sealed(in_place)


# -- sealing -----------------------------------------------------------------------------


def test_seal_and_hash_definition() -> None:
    r = seal(full_record(), "inst", 1, ZERO_HASH)
    assert r.instance_id == "inst" and r.seq == 1 and r.prev_hash == ZERO_HASH
    data = r.to_json()
    del data["hash"]
    body = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    import hashlib

    assert r.hash == hashlib.sha256((ZERO_HASH + body).encode()).hexdigest()
    assert canonical(r) == body.encode()
    assert compute_hash(r) == r.hash and is_sealed(r)
    assert not is_sealed(replace(r, user="mallory"))


def test_chain_state_links_and_resumes() -> None:
    state = ChainState("i")
    a = state.next(full_record())
    b = state.next(full_record(statement="SELECT 2"))
    assert (a.seq, b.seq) == (1, 2) and b.prev_hash == a.hash
    assert state.head == Link(2, b.hash or "")
    restarted = ChainState("i")
    restarted.resume(state.head)
    c = restarted.next(full_record(statement="SELECT 3"))
    assert c.seq == 3 and c.prev_hash == b.hash
    assert verify({"i": [a, b, c]}).ok


# -- hypothesis: random chains, random single tampers -------------------------------------

_text = st.text(max_size=20)
_opt_text = st.none() | _text

records_st = st.builds(
    AuditRecord,
    event=st.sampled_from(EVENTS),
    ts=st.floats(min_value=1e9, max_value=2e9, allow_nan=False),
    user=_opt_text,
    statement=_opt_text,
    params=st.lists(_opt_text, max_size=3).map(tuple),
    objects=st.lists(_text, max_size=2).map(tuple),
    decision=st.none() | st.sampled_from(DECISIONS),
    rows=st.none() | st.integers(min_value=0, max_value=10**12),
    duration_ms=st.none() | st.floats(min_value=0, max_value=1e6, allow_nan=False),
    extra=st.dictionaries(st.text(max_size=5), st.integers() | _text, max_size=2),
)


def build_chain(records: list[AuditRecord], instance: str = "i") -> list[AuditRecord]:
    state = ChainState(instance)
    return [state.next(r) for r in records]


def _flip(h: str | None) -> str:
    assert h is not None
    return ("1" if h[0] == "0" else "0") + h[1:]


EDITS: dict[str, Any] = {
    "user": lambda r: replace(r, user=(r.user or "") + "x"),
    "statement": lambda r: replace(r, statement=(r.statement or "") + " OR 1=1"),
    "ts": lambda r: replace(r, ts=r.ts + 1.0),
    "rows": lambda r: replace(r, rows=(r.rows or 0) + 1),
    "decision": lambda r: replace(r, decision="deny" if r.decision != "deny" else "allow"),
    "extra": lambda r: replace(r, extra={**r.extra, "forged": True}),
    "params": lambda r: replace(r, params=(*r.params, "x")),
    "seq_up": lambda r: replace(r, seq=(r.seq or 0) + 1),
    "seq_down": lambda r: replace(r, seq=(r.seq or 0) - 1),
    "prev_hash": lambda r: replace(r, prev_hash=_flip(r.prev_hash)),
    "hash": lambda r: replace(r, hash=_flip(r.hash)),
}
CONTENT_EDITS = ("user", "statement", "ts", "rows", "decision", "extra", "params")


@AUDIT
@given(st.lists(records_st, min_size=0, max_size=30), st.integers(0, 3), st.randoms())
def test_intact_chains_always_verify(
    records: list[AuditRecord], instances: int, rnd: random.Random
) -> None:
    """No false alarm: several instances, interleaved in any order, each restarted anywhere."""
    chains: list[list[AuditRecord]] = []
    for n in range(instances + 1):
        state = ChainState(f"inst-{n}")
        chain = []
        for r in records:
            if rnd.random() < 0.1:  # a restart that resumes from the stored head
                head = state.head
                state = ChainState(f"inst-{n}")
                state.resume(head)
            chain.append(state.next(r))
        chains.append(chain)
    # interleave, keeping each chain's own order
    merged: list[AuditRecord] = []
    cursors = [0] * len(chains)
    while any(c < len(ch) for c, ch in zip(cursors, chains, strict=True)):
        k = rnd.choice([i for i, ch in enumerate(chains) if cursors[i] < len(ch)])
        merged.append(chains[k][cursors[k]])
        cursors[k] += 1
    result = verify_stream(enumerate(merged))
    assert result.ok, result.breaks
    assert result.records == len(records) * (instances + 1)
    if records:  # anchored at the real heads, or anywhere along the chains
        heads = {f"inst-{n}": Link(len(ch), ch[-1].hash or "") for n, ch in enumerate(chains)}
        assert verify_stream(enumerate(merged), heads).ok
        k = rnd.randrange(len(records))
        middle = {f"inst-{n}": Link(k + 1, ch[k].hash or "") for n, ch in enumerate(chains)}
        assert verify_stream(enumerate(merged), middle).ok
    # the JSON form carries the chain: a JSON round trip still verifies
    again = [AuditRecord.from_json(json.loads(r.to_json_line())) for r in merged]
    assert verify_stream(enumerate(again)).ok


def _check(tampered: list[AuditRecord], kinds: set[str], position: int | None = None) -> None:
    result = verify({"i": tampered})
    assert not result.ok, "tampering not detected"
    first = result.first
    assert first is not None
    assert first.kind in kinds, first
    if position is not None:
        assert first.position == position, first


@AUDIT
@given(
    st.lists(records_st, min_size=1, max_size=20),
    st.data(),
    st.sampled_from(sorted(EDITS)),
)
def test_any_edit_is_detected_as_edited(
    records: list[AuditRecord], data: st.DataObject, edit: str
) -> None:
    chain = build_chain(records)
    k = data.draw(st.integers(0, len(chain) - 1), label="k")
    edited = EDITS[edit](chain[k])
    assume(edited.to_json() != chain[k].to_json())
    tampered = [*chain[:k], edited, *chain[k + 1 :]]
    _check(tampered, {"edited"}, k)


@AUDIT
@given(
    st.lists(records_st, min_size=2, max_size=20),
    st.data(),
    st.sampled_from(CONTENT_EDITS),
)
def test_an_edit_with_a_recomputed_hash_is_detected(
    records: list[AuditRecord], data: st.DataObject, edit: str
) -> None:
    chain = build_chain(records)
    k = data.draw(st.integers(0, len(chain) - 2), label="k")  # not the last: see heads
    edited = EDITS[edit](chain[k])
    assume(edited.to_json() != chain[k].to_json())
    resealed = replace(edited, hash=compute_hash(edited))
    assert is_sealed(resealed)
    _check([*chain[:k], resealed, *chain[k + 1 :]], {"edited"}, k)
    # the last one needs an anchor: a link known to be in the chain
    last = EDITS[edit](chain[-1])
    assume(last.to_json() != chain[-1].to_json())
    last = replace(last, hash=compute_hash(last))
    heads = {"i": Link(len(chain), chain[-1].hash or "")}
    result = verify({"i": [*chain[:-1], last]}, heads)
    assert result.first is not None and result.first.kind == "edited"


@AUDIT
@given(st.lists(records_st, min_size=1, max_size=20), st.data())
def test_any_deletion_is_detected_as_deleted(
    records: list[AuditRecord], data: st.DataObject
) -> None:
    chain = build_chain(records)
    k = data.draw(st.integers(0, len(chain) - 1), label="k")
    tampered = chain[:k] + chain[k + 1 :]
    heads = {"i": Link(len(chain), chain[-1].hash or "")}
    if k < len(chain) - 1:
        _check(tampered, {"deleted"}, k)
    else:
        # deleting the last record leaves a valid shorter chain: only an anchor shows it
        assert verify({"i": tampered}).ok
    result = verify({"i": tampered}, heads)
    assert result.first is not None and result.first.kind == "deleted"


@AUDIT
@given(st.lists(records_st, min_size=2, max_size=20), st.data())
def test_any_swap_or_move_is_detected_as_reordered(
    records: list[AuditRecord], data: st.DataObject
) -> None:
    chain = build_chain(records)
    n = len(chain)
    i = data.draw(st.integers(0, n - 2), label="i")
    j = data.draw(st.integers(i + 1, n - 1), label="j")
    swapped = list(chain)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    _check(swapped, {"reordered"}, i)
    # move one record elsewhere
    src = data.draw(st.integers(0, n - 1), label="src")
    dst = data.draw(st.integers(0, n - 1).filter(lambda d: d != src), label="dst")
    moved = list(chain)
    moved.insert(dst, moved.pop(src))
    _check(moved, {"reordered"}, min(src, dst))


@AUDIT
@given(
    st.lists(records_st, min_size=1, max_size=20),
    records_st,
    st.data(),
    st.sampled_from(["duplicate", "unsealed", "sealed", "linked"]),
)
def test_any_insertion_is_detected(
    records: list[AuditRecord], forged_body: AuditRecord, data: st.DataObject, how: str
) -> None:
    chain = build_chain(records)
    n = len(chain)
    p = data.draw(st.integers(0, n), label="p")  # insert before chain[p] (n: at the end)
    expected_seq = p + 1
    prev = chain[p - 1].hash if p > 0 else ZERO_HASH
    assert prev is not None
    rnd_hash = data.draw(st.text("0123456789abcdef", min_size=64, max_size=64), label="h")
    seq = data.draw(st.integers(0, n + 3), label="seq")
    if how == "duplicate":
        forged = chain[data.draw(st.integers(0, n - 1), label="j")]
    elif how == "unsealed":
        forged = replace(forged_body, instance_id="i", seq=seq, prev_hash=rnd_hash, hash=rnd_hash)
    elif how == "sealed":
        forged = seal(forged_body, "i", seq, rnd_hash)
    else:  # crafted to link to the record before it
        forged = seal(forged_body, "i", expected_seq, prev)
    tampered = [*chain[:p], forged, *chain[p:]]
    heads = {"i": Link(n, chain[-1].hash or "")}
    result = verify({"i": tampered})
    at_end = p == n
    if at_end and how == "linked":
        # a well-formed record appended after the last one is undetectable by any keyless
        # chain, anchored or not (anchors judge nothing after them)
        assert result.ok and verify({"i": tampered}, heads).ok
        return
    assert not result.ok, "insertion not detected"
    assert result.first is not None
    if at_end and how in ("unsealed", "sealed"):
        # an unlinked record at the very end: an insertion, or an edit/deletion of the tail
        assert result.first.kind in {"inserted", "edited", "deleted"}
    else:
        assert result.first.kind == "inserted", result.first
        if how in ("unsealed", "sealed"):
            assert result.first.position == p


# -- explicit cases (their reasons) --------------------------------------------------------


def _chain(n: int = 6) -> list[AuditRecord]:
    return build_chain([full_record(statement=f"SELECT {k}") for k in range(n)])


def test_reasons_name_the_break() -> None:
    c = _chain()
    r = verify({"i": [c[0], c[1], replace(c[2], statement="DROP TABLE x"), *c[3:]]})
    assert r.first is not None
    assert (r.first.kind, r.first.position, r.first.seq) == ("edited", 2, 3)
    assert "do not match its hash" in r.first.reason

    r = verify({"i": [c[0], c[1], c[3], c[4], c[5]]})
    assert r.first is not None and r.first.kind == "deleted" and "seq 3 missing" in r.first.reason

    r = verify({"i": [c[0], c[3], c[4], c[5]]})
    assert r.first is not None and "seq 2..3 missing" in r.first.reason

    r = verify({"i": c[2:]})
    assert r.first is not None and r.first.kind == "deleted"
    assert "starts at seq 3" in r.first.reason

    r = verify({"i": [c[0], c[2], c[1], *c[3:]]})
    assert r.first is not None and r.first.kind == "reordered" and r.first.position == 1

    r = verify({"i": [c[0], c[1], c[1], *c[2:]]})
    assert r.first is not None and r.first.kind == "inserted"
    assert "seq 2" in r.first.reason


def test_store_positions_are_reported() -> None:
    c = _chain(4)
    items = [(100 + k, r) for k, r in enumerate(c)]
    items[2] = (102, replace(c[2], user="mallory"))
    result = verify_stream(items)
    assert result.first is not None and result.first.ref == 102
    assert "store position 102" in result.first.describe()


def test_one_break_per_instance_and_anchors() -> None:
    a = build_chain([full_record() for _ in range(3)], "a")
    b = build_chain([full_record() for _ in range(3)], "b")
    b[1] = replace(b[1], user="x")
    anchors = {
        "a": Link(3, a[2].hash or ""),
        "b": Link(1, b[0].hash or ""),
        "gone": Link(9, "f" * 64),
    }
    v = ChainVerifier(anchors)
    for r in [a[0], b[0], a[1], b[1], a[2], b[2]]:
        v.feed(r)
    result = v.finish()
    assert [(x.instance_id, x.kind) for x in result.breaks] == [
        ("b", "edited"),
        ("gone", "deleted"),
    ]
    # an anchor whose hash differs: the chain up to it was rewritten
    rewritten = verify({"a": a}, {"a": Link(2, "e" * 64)})
    assert rewritten.first is not None and rewritten.first.kind == "edited"
    assert rewritten.first.seq == 2 and "anchor" in rewritten.first.reason
    # an anchor beyond the end: records were cut off
    cut = verify({"a": a[:2]}, {"a": Link(3, a[2].hash or "")})
    assert cut.first is not None and cut.first.kind == "deleted" and "seq 3" in cut.first.reason
    summaries = {c.instance_id: c for c in result.chains}
    assert summaries["a"].head == Link(3, a[2].hash or "") and summaries["a"].records == 3
    assert summaries["b"].head is not None and summaries["b"].head.seq == 1


def test_an_empty_trail_verifies() -> None:
    assert verify({}).ok
    assert verify_stream([]).records == 0
