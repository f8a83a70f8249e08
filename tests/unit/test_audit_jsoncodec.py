"""The fast JSON encodings of audit records give exactly the standard library's bytes."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from pgguard.audit.jsoncodec import canonical_json, compact_json

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
