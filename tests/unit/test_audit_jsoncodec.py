"""The fast JSON encodings of audit records give exactly the standard library's bytes."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from pgguard.audit.jsoncodec import (
    _SMALL_FLOAT,
    _has_small_float,
    _orjson,
    canonical_json,
    compact_json,
)

STANDARD = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | finite_floats
    | st.text()
    | st.sampled_from(["\x7f", "\ud800", "é", "\u2028", "0.00001", "1e-5"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=600)
@given(values)
def test_canonical_json_is_the_standard_encoding(value: object) -> None:
    expected = STANDARD.encode(value).encode("ascii")
    assert canonical_json(value, finite=True) == expected
    assert canonical_json(value) == expected


@settings(max_examples=600)
@given(values)
def test_compact_json_is_the_standard_encoding(value: object) -> None:
    assert compact_json(value, finite=True) == COMPACT.encode(value)


def test_every_float_magnitude_is_written_as_python_does() -> None:
    for exponent in range(-320, 308):
        for mantissa in ("1", "1.2345", "9.99", "5.5"):
            number = float(f"{mantissa}e{exponent}")
            if number == 0 or not math.isfinite(number):
                continue
            for v in (number, -number, [number], {"d": number}):
                assert canonical_json(v, finite=True) == STANDARD.encode(v).encode("ascii")


def test_non_finite_floats_need_the_standard_encoder() -> None:
    # Without ``finite`` the standard encoder keeps NaN as NaN (orjson would write null).
    assert canonical_json({"d": math.nan}) == b'{"d":NaN}'
    assert compact_json([math.inf]) == "[Infinity]"


# Bytes that make up (or border) the number tokens the small-float check looks for.
number_texts = st.lists(st.sampled_from(list(b'0123456789.-e:,["a ')), max_size=24).map(bytes)


@settings(max_examples=3000)
@given(number_texts)
def test_the_small_float_check_answers_as_its_pattern(text: bytes) -> None:
    assert _has_small_float(text) == (_SMALL_FLOAT.search(text) is not None)


def test_the_small_float_check_finds_number_tokens_only() -> None:
    # a float token in the range where the encoders differ, wherever a value can start
    for text in (b"1e-5", b'{"a":1e-5}', b"[2.5e-7,1]", b'{"d":-0.00001}', b",0.0000999]"):
        assert _has_small_float(text), text
    # ids and text that merely contain such bytes
    for text in (
        b'{"session_id":"5f0c8a7e-3d1b"}',
        b'{"s":"x1e-5"}',
        b'{"d":12e-5}',
        b'{"d":0.001}',
        b'{"d":1e-10}',
        b"1e-",
        b"0.000",
    ):
        assert not _has_small_float(text), text


def test_a_uuid_in_a_record_keeps_the_fast_encoder() -> None:
    record = {"prompt_id": "5f0c8a7e-3d1b-4c2a-9e6f-0123456789ab", "duration_ms": 0.5}
    assert _orjson(record, 0) is not None
    assert _orjson({**record, "duration_ms": 5e-05}, 0) is None
