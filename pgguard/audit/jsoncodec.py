"""JSON encodings of audit records, fast where it is safe. Pure: no I/O.

The hash chain covers :func:`canonical_json`: the bytes of ``json.JSONEncoder(sort_keys=True,
separators=(",", ":"), ensure_ascii=True)``. That encoder costs ~20 µs for a statement record
on the writer's hot path; orjson produces the same bytes in a fifth of the time for every
record whose output is plain ASCII and holds no float in the ranges where the two format
floats differently. :func:`canonical_json` uses orjson then and the standard encoder
otherwise, so the canonical form is exactly the standard one, whichever path made it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)

# Where orjson and Python format a float differently: 1e-9 <= |f| < 1e-4 (orjson writes
# "0.0000999" and "1e-9", Python "9.99e-05" and "1e-09"). A number token starts the text or
# follows ":", "," or "["; a match inside a string only sends the value down the standard path.
# The definition; _has_small_float answers the same question faster.
_SMALL_FLOAT = re.compile(rb"(?:^|[:,\[])-?(?:0\.0000|\d(?:\.\d+)?e-\d(?!\d))")
_SMALL_FLOAT_AT = re.compile(rb"-?(?:0\.0000|\d(?:\.\d+)?e-\d(?!\d))")
_DIGITS = frozenset(b"0123456789")
_NUMBER_BYTES = frozenset(b"0123456789.-")
_TOKEN_STARTS = frozenset(b":,[")


def canonical_json(data: Any, finite: bool = False) -> bytes:
    """``data`` as the standard library's sorted, compact, ASCII-only JSON, as bytes.

    ``finite``: the caller knows that no float in ``data`` is NaN or infinite (orjson writes
    those as ``null``, the standard encoder as ``NaN``); without it, the standard encoder.
    """
    if finite:
        fast = _orjson(data, orjson.OPT_SORT_KEYS)
        if fast is not None:
            return fast
    return _CANONICAL.encode(data).encode("ascii")


def compact_json(value: Any, finite: bool = False) -> str:
    """``value`` as the standard library's compact, ASCII-only JSON text (key order kept),
    for a store's column: the same text as ever, so searches on it keep matching."""
    if finite:
        fast = _orjson(value, 0)
        if fast is not None:
            return fast.decode("ascii")
    return _COMPACT.encode(value)


def _orjson(value: Any, option: int) -> bytes | None:
    """orjson's encoding of ``value`` if it is the standard encoder's, byte for byte."""
    try:
        fast = orjson.dumps(value, option=option)
    except TypeError:  # non-str keys, integers past 64 bits, lone surrogates
        return None
    if (
        fast.isascii()
        and b"\x7f" not in fast  # ensure_ascii escapes DEL; orjson keeps it
        and not _has_small_float(fast)
    ):
        return fast
    return None


def _has_small_float(text: bytes) -> bool:
    """Whether ``_SMALL_FLOAT`` matches ``text``. The pattern itself scans ~1 KB of record
    in ~35 µs (the engine tries it at every byte); ids and UUIDs put "7e-3" in many records.
    Every match holds "0.0000", or "e-" between two digits, so only those places are tried:
    from each, back to the start of its run of number bytes (a match starts there, since
    ":", "," and "[" end the run), where the pattern is tried anchored."""
    size = len(text)
    for literal, digit_before in ((b"e-", 1), (b"0.0000", 0)):
        at = text.find(literal)
        while at != -1:
            start = at - digit_before
            if not digit_before or (
                start >= 0 and at + 2 < size and text[start] in _DIGITS and text[at + 2] in _DIGITS
            ):
                while start and text[start - 1] in _NUMBER_BYTES:
                    start -= 1
                if (start == 0 or text[start - 1] in _TOKEN_STARTS) and _SMALL_FLOAT_AT.match(
                    text, start
                ):
                    return True
            at = text.find(literal, at + 1)
    return False
