"""Column masking (SPEC §4): wire codecs, mask functions and row rewriting. Pure: no I/O.

* :mod:`~pgguard.masking.codecs`: decode/encode column values, text and binary formats;
* :mod:`~pgguard.masking.functions`: the mask functions, :func:`build_masker`,
  :func:`applicable`;
* :mod:`~pgguard.masking.rows`: :class:`RowMasker` rewrites DataRow bodies and COPY rows.
"""

from pgguard.masking.codecs import Codec, CodecError, PgSpecial, codec_for
from pgguard.masking.functions import (
    KEYED_FUNCTIONS,
    Masker,
    MaskError,
    MaskSecret,
    applicable,
    build_masker,
    fallback_note,
)
from pgguard.masking.rows import ColumnPlan, CopyFormat, RowFormatError, RowMasker

__all__ = [
    "KEYED_FUNCTIONS",
    "Codec",
    "CodecError",
    "ColumnPlan",
    "CopyFormat",
    "MaskError",
    "MaskSecret",
    "Masker",
    "PgSpecial",
    "RowFormatError",
    "RowMasker",
    "applicable",
    "build_masker",
    "codec_for",
    "fallback_note",
]
