"""Statement text helpers for the audit trail (SPEC §5). Pure functions, no I/O.

* :func:`prompt_id_from_comment` finds a sqlcommenter-style ``prompt_id`` in a comment.
* :func:`redact_secrets` replaces passwords and other credentials with ``***``.
* :func:`redact_literals` replaces every constant with ``?`` (optional audit mode).
* :func:`fingerprint` is pglast's query fingerprint, for grouping statements by shape.
* :func:`encode_params` renders Bind parameters for a record (size-capped, binary as base64).
* :func:`statement_texts` splits a multi-statement Query into one text per statement.

Lexing is PostgreSQL's own scanner (``pglast.parser.scan``), so comments, string literals,
quoted identifiers and dollar-quoted strings are told apart exactly as the server does.
``scan`` reports character offsets; ``parse_sql_json`` reports byte offsets (UTF-8), which
:class:`_Offsets` converts. Every function here tolerates text that does not parse.
"""

from __future__ import annotations

import base64
import difflib
import json
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

from pglast import parser

__all__ = [
    "PROMPT_ID_KEYS",
    "PROMPT_ID_MAX_LEN",
    "REDACTED",
    "SECRET_TRIGGERS",
    "encode_params",
    "fingerprint",
    "prompt_id_from_comment",
    "redact_literals",
    "redact_secrets",
    "statement_texts",
]

REDACTED = "***"
PROMPT_ID_MAX_LEN = 256
# Comment keys naming the prompt id. ``pgguard.prompt_id`` (the setting's name) is accepted
# too, since people will write it.
PROMPT_ID_KEYS = frozenset({"prompt_id", "pgguard_prompt_id", "pgguard.prompt_id"})

_COMMENT_TOKENS = frozenset({"C_COMMENT", "SQL_COMMENT"})
_STRING_TOKENS = frozenset({"SCONST", "USCONST"})
_LITERAL_TOKENS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"})
_SEMICOLON = "ASCII_59"
# Synthetic token covering an unterminated string/identifier/comment up to the end.
_UNTERMINATED = "UNTERMINATED"

# ---------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True, slots=True)
class _Tok:
    start: int  # character offset, inclusive
    end: int  # character offset, exclusive
    name: str


# Comments nested deeper than this are refused (and never handed to the scanner, whose
# time grows with the square of the nesting: 35,000 levels take seconds).
COMMENT_NESTING_MAX = 100
_COMMENT_MARK = re.compile(r"/\*|\*/")


def nested_too_deep(sql: str) -> bool:
    """Whether ``sql`` nests ``/* */`` comments deeper than :data:`COMMENT_NESTING_MAX` (counted
    without regard to quotes: a string full of ``/*`` counts too). Linear, and no work at all
    for text with fewer openers than that."""
    if sql.count("/*") <= COMMENT_NESTING_MAX:
        return False
    depth = 0
    for mark in _COMMENT_MARK.finditer(sql):
        if mark.group() == "/*":
            depth += 1
            if depth > COMMENT_NESTING_MAX:
                return True
        elif depth:
            depth -= 1
    return False


def _tokens(sql: str) -> list[_Tok] | None:
    """``scan`` as half-open character spans; ``None`` if the text cannot be scanned at all
    (or should not be: comments nested too deep).

    On a lexical error (an unterminated quote or comment, junk after a number, ...) the text
    before the error is scanned normally and the rest becomes one ``UNTERMINATED`` token: no
    comment or literal can start inside it as far as the server is concerned.
    """
    if nested_too_deep(sql):
        return None
    try:
        return [_Tok(t.start, t.end + 1, t.name) for t in parser.scan(sql)]
    except parser.ParseError as exc:
        index = exc.args[1] if len(exc.args) > 1 else None
        if not isinstance(index, int) or not 0 <= index < len(sql):
            return None
        try:
            head = [_Tok(t.start, t.end + 1, t.name) for t in parser.scan(sql[:index])]
        except Exception:
            return None
        return [*head, _Tok(index, len(sql), _UNTERMINATED)]
    except Exception:
        return None


class _Offsets:
    """Converts the parser's UTF-8 byte offsets to ``str`` indexes."""

    __slots__ = ("_char_at",)

    def __init__(self, sql: str) -> None:
        self._char_at: list[int] | None = None
        if not sql.isascii():
            char_at: list[int] = []
            for index, ch in enumerate(sql):
                char_at.extend([index] * len(ch.encode("utf-8", "surrogatepass")))
            char_at.append(len(sql))
            self._char_at = char_at

    def char(self, byte_offset: int) -> int:
        if self._char_at is None:
            return byte_offset
        if byte_offset >= len(self._char_at):
            return self._char_at[-1]
        return self._char_at[max(byte_offset, 0)]


def _sanitize(value: str) -> str:
    """Drop control, format (bidi overrides, zero-width), separator and surrogate chars."""
    return "".join(
        ch for ch in value if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp", "Cs")
    )


# ---------------------------------------------------------------------------------------
# Prompt id

_PROMPT_SETTING = "pgguard.prompt_id"
_PROMPT_SETTING_WORDS = ("prompt_id", "set_config", "reset", "discard")
PromptSetting = tuple[Literal["set", "reset", "unknown"], str | None, bool]


def prompt_setting(sql: str) -> PromptSetting | None:
    """What one statement that ran does to the session's ``pgguard.prompt_id``, read from its
    parse tree: ``("set", value, local)`` (``SET [LOCAL] pgguard.prompt_id = …`` with any
    quoting or comments, or ``set_config('pgguard.prompt_id', '…', is_local)``),
    ``("reset", None, False)`` (``RESET`` it, ``SET … TO DEFAULT``, ``RESET ALL``, ``DISCARD
    ALL``: back to the startup value), ``("unknown", None, local)`` (set to something its text
    does not give: ``FROM CURRENT``, a set_config of a computed value), or None."""
    lowered = sql.lower()
    if not any(word in lowered for word in _PROMPT_SETTING_WORDS):
        return None
    if nested_too_deep(sql):
        return ("unknown", None, False) if _PROMPT_SETTING in lowered else None
    try:
        tree = json.loads(parser.parse_sql_json(sql))
    except (parser.ParseError, ValueError):
        return ("unknown", None, False) if _PROMPT_SETTING in lowered else None
    found: PromptSetting | None = None
    for node_type, fields, _ in _walk(tree):
        effect: PromptSetting | None = None
        if node_type == "VariableSetStmt":
            effect = _variable_set(fields)
        elif node_type == "DiscardStmt" and fields.get("target") == "DISCARD_ALL":
            effect = ("reset", None, False)
        elif node_type == "FuncCall":
            effect = _set_config_call(fields)
        if effect is not None:
            found = effect  # the last one in the statement wins
    return found


def _variable_set(fields: dict[str, Any]) -> PromptSetting | None:
    kind = fields.get("kind")
    if kind == "VAR_RESET_ALL":
        return ("reset", None, False)
    if str(fields.get("name", "")).lower() != _PROMPT_SETTING:
        return None
    local = bool(fields.get("is_local"))
    if kind in ("VAR_SET_DEFAULT", "VAR_RESET"):
        return ("reset", None, local)
    if kind == "VAR_SET_VALUE":
        args = fields.get("args") or []
        value = _constant_text(args[0]) if len(args) == 1 else None
        if value is not None:
            return ("set", clean_prompt_id(value), local)
    return ("unknown", None, local)


def _set_config_call(fields: dict[str, Any]) -> PromptSetting | None:
    names = fields.get("funcname") or []
    last = names[-1].get("String", {}).get("sval", "") if names else ""
    if str(last).lower() != "set_config":
        return None
    args = fields.get("args") or []
    name = _constant_text(args[0]) if args else None
    if name is None:
        return ("unknown", None, False)  # a computed name may be this one
    if name.strip().lower() != _PROMPT_SETTING:
        return None
    value = _constant_text(args[1]) if len(args) > 1 else None
    const = args[2].get("A_Const") if len(args) == 3 and isinstance(args[2], dict) else None
    flag = const.get("boolval") if isinstance(const, dict) else None
    if not isinstance(flag, dict):  # is_local not a boolean constant
        return ("unknown", None, False)
    is_local = bool(flag.get("boolval"))
    if value is None:
        return ("unknown", None, is_local)
    return ("set", clean_prompt_id(value), is_local)


def _constant_text(node: Any) -> str | None:
    """The text of a constant argument (string, number or bare word), else None."""
    const = node.get("A_Const") if isinstance(node, dict) else None
    if not isinstance(const, dict):
        return None
    for key in ("sval", "ival", "fval"):  # the parse tree's JSON leaves zero values out
        inner = const.get(key)
        if isinstance(inner, dict):
            return str(inner.get(key, 0 if key == "ival" else ""))
    return None


def clean_prompt_id(value: str) -> str | None:
    """A prompt id as records keep it, wherever it came from: without control, format and
    separator characters, at most :data:`PROMPT_ID_MAX_LEN` characters; None when empty."""
    if value.isascii() and value.isprintable() and len(value) <= PROMPT_ID_MAX_LEN:
        return value.strip() or None  # the usual id, checked in C (records ask per statement)
    return _sanitize(value).strip()[:PROMPT_ID_MAX_LEN].strip() or None


# One sqlcommenter ``key='value'`` pair; pairs are comma-separated, but whitespace is
# accepted too. The key must not be glued to a preceding word (``xprompt_id=``).
_PAIR = re.compile(
    r"""(?<![^\s,])\s*([A-Za-z0-9_.~%-]+)\s*=\s*
        (?: '((?:[^'\\]|\\.)*)' | "((?:[^"\\]|\\.)*)" | ([^\s,'"]+) )""",
    re.VERBOSE | re.DOTALL,
)
_BACKSLASH_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def prompt_id_from_comment(sql: str) -> str | None:
    """The prompt id given in a sqlcommenter-style comment of ``sql``, if any.

    ``/* prompt_id='abc' */``, ``/*prompt_id='a%20b',agent='cursor'*/`` and
    ``-- pgguard_prompt_id='abc'`` all qualify, anywhere in the statement; text inside string
    literals, quoted identifiers and dollar-quoted strings is not a comment and is ignored.
    Values are URL-decoded (``%20``; ``+`` stays a plus, as in sqlcommenter), stripped of
    control and format characters and capped to :data:`PROMPT_ID_MAX_LEN` characters. When
    several comments carry one, the first wins; an empty value does not count.
    """
    lowered = sql.lower()
    if "prompt" not in lowered or ("/*" not in sql and "--" not in sql):
        return None  # fast path: most statements carry no comment at all
    tokens = _tokens(sql)
    if tokens is None:
        return None
    for tok in tokens:
        if tok.name == "C_COMMENT":
            body = sql[tok.start + 2 : tok.end - 2]
        elif tok.name == "SQL_COMMENT":
            body = sql[tok.start + 2 : tok.end]
        else:
            continue
        found = _prompt_id_in_comment_body(body)
        if found is not None:
            return found
    return None


def _prompt_id_in_comment_body(body: str) -> str | None:
    if "prompt" not in body.lower():
        return None
    for match in _PAIR.finditer(body):
        key = unquote(match.group(1)).strip().lower()
        if key not in PROMPT_ID_KEYS:
            continue
        quoted = match.group(2) if match.group(2) is not None else match.group(3)
        raw = _BACKSLASH_ESCAPE.sub(r"\1", quoted) if quoted is not None else match.group(4)
        value = _sanitize(unquote(raw)).strip()[:PROMPT_ID_MAX_LEN].strip()
        if value:
            return value
    return None


# ---------------------------------------------------------------------------------------
# Secrets

# Substrings (lower case) without which :func:`redact_secrets` never changes anything.
SECRET_TRIGGERS = ("passw", "pwd", "secret", "token", "://")
# Option names (DefElem ``defname``) whose string value is a secret: ``password`` in
# CREATE/ALTER ROLE, and password/passwd/secret/token/... in USER MAPPING, SERVER, FDW and
# FOREIGN TABLE ``OPTIONS (...)``, also as part of a longer name (``client_secret``,
# ``aws_secret_access_key``, ``sslpassword``).
_SECRET_OPTION = re.compile(r"(?:^|_)(?:ssl)?(?:password|passwd|pwd|secret|token)(?:_|$)", re.I)
# Conninfo: ``password=...`` in key/value form (value bare or libpq-quoted), and the
# password in URI form (``postgresql://user:secret@host`` or ``?password=secret``).
_CONNINFO_URI_PASSWORD = re.compile(r"(?i)([?&](?:ssl)?password=)([^&#\s]*)")
_CONNINFO_KV_PASSWORD = re.compile(
    r"""(?i)(?<![?&\w])((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s']*)"""
)
_CONNINFO_URI_USERINFO = re.compile(
    r"(?i)(\b(?:postgres(?:ql)?|mysql|mariadb|mongodb(?:\+srv)?|redis|https?)://[^:/@\s?#]*:)"
    r"([^@/\s]*)(@)"
)
_DBLINK_FUNCTION = re.compile(r"dblink(?:_[a-z_]+)?\Z")
# Fallback when the text cannot even be scanned.
_FALLBACK_PASSWORD = re.compile(
    r"""(?i)(\b(?:(?:ssl)?password|passwd|pwd|secret|token)\b\s*(?:=\s*)?)('(?:[^']|'')*'?)"""
)
_MAX_NESTING = 2


def redact_secrets(sql: str) -> str:
    """``sql`` with credentials replaced by ``***``, every other character unchanged.

    Covered: ``PASSWORD '…'`` (also ``ENCRYPTED PASSWORD``) in CREATE/ALTER
    ROLE/USER/GROUP; the string value of any secret-named option (password, passwd, pwd,
    secret, token, also within a longer ``_``-separated name such as ``client_secret``) in any
    statement, i.e. ``OPTIONS (…)`` of CREATE/ALTER USER MAPPING, SERVER, FOREIGN DATA WRAPPER
    and FOREIGN TABLE; the password inside connection strings (key/value and URI forms) given
    to ``dblink*`` functions, in CREATE/ALTER SUBSCRIPTION ``CONNECTION '…'`` and in other
    option values (``dsn '…'``); statements nested in a ``dblink*`` string argument are
    redacted recursively. Other string literals (user data) are left alone. Text without any
    of :data:`SECRET_TRIGGERS` is returned as is without being scanned.

    Literal spans come from the parse tree's locations (``parse_sql_json``) and the scanner's
    token boundaries. A statement that does not parse is handled on its tokens, conservatively:
    any string following ``PASSWORD`` or a secret-looking word, and any conninfo-looking
    password anywhere. Text that cannot even be scanned falls back to a regular expression.
    Never raises.
    """
    return _redact_secrets(sql, 0)


def _redact_secrets(sql: str, depth: int) -> str:
    lowered = sql.lower()
    if not any(trigger in lowered for trigger in SECRET_TRIGGERS):
        return sql
    try:
        return _redact_tokens_and_tree(sql, depth)
    except Exception:
        return _FALLBACK_PASSWORD.sub(lambda m: m.group(1) + "'" + REDACTED + "'", sql)


def _redact_tokens_and_tree(sql: str, depth: int) -> str:
    tokens = _tokens(sql)
    if tokens is None:
        return _FALLBACK_PASSWORD.sub(lambda m: m.group(1) + "'" + REDACTED + "'", sql)
    try:
        tree = json.loads(parser.parse_sql_json(sql))
    except parser.ParseError:
        tree = None
    if tree is not None:
        edits = _edits_from_tree(sql, tree, tokens, depth)
    else:
        # Parse the statements one by one so that one broken statement does not cost the
        # others their exact treatment.
        edits = []
        for start, end in _statement_spans(tokens, len(sql)) or [(0, len(sql))]:
            piece = sql[start:end]
            redacted = _redact_piece(piece, depth)
            if redacted != piece:
                edits.append((start, end, redacted))
    return _apply(sql, edits)


def _redact_piece(piece: str, depth: int) -> str:
    tokens = _tokens(piece)
    if tokens is None:
        return _FALLBACK_PASSWORD.sub(lambda m: m.group(1) + "'" + REDACTED + "'", piece)
    try:
        tree = json.loads(parser.parse_sql_json(piece))
    except parser.ParseError:
        return _apply(piece, _edits_from_tokens(piece, tokens))
    return _apply(piece, _edits_from_tree(piece, tree, tokens, depth))


_Edit = tuple[int, int, str]


def _apply(sql: str, edits: list[_Edit]) -> str:
    if not edits:
        return sql
    out: list[str] = []
    pos = 0
    for start, end, replacement in sorted(edits):
        if start < pos:  # overlapping edit: the first one wins
            continue
        out.append(sql[pos:start])
        out.append(replacement)
        pos = end
    out.append(sql[pos:])
    return "".join(out)


def _walk(node: Any, inside_dblink: bool = False) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """Yield ``(node_type, fields, inside_dblink_call)`` for every node of a JSON parse tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, dict) and key[:1].isupper():
                yield key, value, inside_dblink
                nested = inside_dblink
                if key == "FuncCall" and _is_dblink_call(value):
                    nested = True
                yield from _walk(value, nested)
            else:
                yield from _walk(value, inside_dblink)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, inside_dblink)


def _is_dblink_call(fields: dict[str, Any]) -> bool:
    names = fields.get("funcname") or []
    if not names:
        return False
    last = names[-1].get("String", {}).get("sval", "") if isinstance(names[-1], dict) else ""
    return bool(_DBLINK_FUNCTION.match(str(last).lower()))


def _edits_from_tree(sql: str, tree: Any, tokens: list[_Tok], depth: int) -> list[_Edit]:
    offsets = _Offsets(sql)
    by_start = {tok.start: tok for tok in tokens if tok.name in _STRING_TOKENS}
    edits: list[_Edit] = []

    def literal_at(byte_location: Any) -> _Tok | None:
        if not isinstance(byte_location, int) or byte_location < 0:
            return None
        return by_start.get(offsets.char(byte_location))

    for node_type, fields, in_dblink in _walk(tree):
        if node_type == "DefElem":
            arg = fields.get("arg")
            if not (isinstance(arg, dict) and "String" in arg):
                continue
            tok = literal_at(fields.get("arg_location"))
            if tok is None:
                continue
            if _SECRET_OPTION.search(str(fields.get("defname", ""))):
                edits.append((tok.start, tok.end, "'" + REDACTED + "'"))
            else:  # e.g. a ``dsn``/``connstr`` option holding a connection string
                value = arg["String"].get("sval") if isinstance(arg["String"], dict) else None
                _redact_literal(sql, tok, _redact_conninfo, edits, value)
        elif node_type in ("CreateSubscriptionStmt", "AlterSubscriptionStmt"):
            tok = literal_at(fields.get("conninfo_location"))
            if tok is not None:
                _redact_literal(sql, tok, _redact_conninfo, edits, fields.get("conninfo"))
        elif node_type == "A_Const" and in_dblink and "sval" in fields:
            tok = literal_at(fields.get("location"))
            if tok is not None:
                sval = fields["sval"]
                value = sval.get("sval") if isinstance(sval, dict) else None
                _redact_literal(
                    sql, tok, lambda text: _redact_dblink_arg(text, depth), edits, value
                )
    return edits


def _edits_from_tokens(sql: str, tokens: list[_Tok]) -> list[_Edit]:
    """Conservative redaction for a statement that does not parse."""
    edits: list[_Edit] = []
    # Which string the user meant as the secret cannot be told from broken text: every
    # string after a secret-looking word is redacted (``PASSWORD 'a' 'b'``).
    after_secret = False
    for tok in tokens:
        if tok.name in _COMMENT_TOKENS:
            continue
        is_string = tok.name in _STRING_TOKENS or (
            tok.name == _UNTERMINATED and sql[tok.start] not in '"/-'
        )
        if not is_string:
            if _SECRET_OPTION.search(sql[tok.start : tok.end].strip('"')):
                after_secret = True
            continue
        if after_secret:
            # In the string's own quoting: a quoted string right after another one (a
            # newline apart) would be read as its continuation.
            quote = "$$" if sql[tok.start] == "$" else "'"
            edits.append((tok.start, tok.end, quote + REDACTED + quote))
        elif tok.name in _STRING_TOKENS:
            _redact_literal(sql, tok, _redact_conninfo, edits)
    return edits


_NEAR = re.compile(r'(at or near )"(?:[^"]|"")*"')


def scrub_error(message: str, statement: str, recorded: str) -> str:
    """A server or parser error ``message`` about ``statement``, made safe to keep beside its
    ``recorded`` text (``statement`` with secrets, or every literal, redacted): what the
    redaction took out of the statement is taken out of the message too, and the text an
    error points at ("at or near ...") goes. ``message`` itself when nothing was redacted."""
    if recorded == statement or not message:
        return message
    removed = [
        statement[i1:i2]
        for op, i1, i2, _, _ in difflib.SequenceMatcher(
            None, statement, recorded, autojunk=False
        ).get_opcodes()
        if op in ("replace", "delete")
    ]
    for fragment in sorted(removed, key=len, reverse=True):
        for piece in {fragment, fragment.strip("'\"$ ")}:
            if len(piece) >= 3:
                message = message.replace(piece, REDACTED)
    return _NEAR.sub(r'\1"' + REDACTED + '"', message)


def _redact_dblink_arg(value: str, depth: int) -> str:
    redacted = _redact_conninfo(value)
    if redacted == value and depth < _MAX_NESTING:
        redacted = _redact_secrets(value, depth + 1)  # a statement run through dblink
    return redacted


def _redact_conninfo(value: str) -> str:
    lowered = value.lower()
    if "password" in lowered:
        value = _CONNINFO_URI_PASSWORD.sub(lambda m: m.group(1) + REDACTED, value)
        value = _CONNINFO_KV_PASSWORD.sub(lambda m: m.group(1) + REDACTED, value)
    if "://" in value:
        value = _CONNINFO_URI_USERINFO.sub(lambda m: m.group(1) + REDACTED + m.group(3), value)
    return value


_DOLLAR_QUOTE = re.compile(r"(\$[^$]*\$)(.*)\1\Z", re.DOTALL)
_Codec = tuple[str, Callable[[str], str]]


def _literal_codec(raw: str) -> _Codec | None:
    """The value of a literal token and how to write a new value the same way, if simple."""
    prefix = ""
    if raw[:2] in ("E'", "e'") and "\\" not in raw:
        prefix, raw = raw[:1], raw[1:]
    if len(raw) >= 2 and raw.startswith("'") and raw.endswith("'"):
        value = raw[1:-1].replace("''", "'")
        if "'" + value.replace("'", "''") + "'" != raw:
            return None  # e.g. 'a' 'b' continued over lines

        def quote(text: str) -> str:
            return prefix + "'" + text.replace("'", "''") + "'"

        return value, quote
    match = _DOLLAR_QUOTE.match(raw)
    if match is None or prefix:
        return None
    tag = match.group(1)

    def dollar_quote(text: str) -> str:
        return tag + text + tag if tag not in text else "'" + REDACTED + "'"

    return match.group(2), dollar_quote


def _redact_literal(
    sql: str,
    tok: _Tok,
    redact: Callable[[str], str],
    edits: list[_Edit],
    parsed_value: Any = None,
) -> None:
    """Redact inside a string literal token, keeping its quoting when it can round-trip.

    Plain ``'…'``, ``E'…'`` without backslashes and dollar-quoted literals are decoded,
    redacted and re-encoded the same way; any other form (escapes, ``U&'…'``, literals
    continued over lines) whose value (``parsed_value`` from the parse tree, else the raw
    token) needs redaction is replaced whole by ``'***'``.
    """
    raw = sql[tok.start : tok.end]
    codec = _literal_codec(raw)
    if codec is None:
        judged = parsed_value if isinstance(parsed_value, str) else raw
        if redact(judged) != judged:
            edits.append((tok.start, tok.end, "'" + REDACTED + "'"))
        return
    value, encode = codec
    redacted = redact(value)
    if redacted != value:
        edits.append((tok.start, tok.end, encode(redacted)))


# ---------------------------------------------------------------------------------------
# Literals

_FALLBACK_LITERAL = re.compile(
    r"""(?:[eEbBxXnN]|[uU]&)?'(?:[^']|'')*'?|(?<![\w$])\d+(?:\.\d*)?(?:[eE][-+]?\d+)?""",
)


def redact_literals(sql: str) -> str:
    """``sql`` with every constant replaced by ``?``, everything else byte-identical.

    Token-based (``scan``), not ``parser.normalize``: it works on text that does not parse,
    keeps comments (and so the prompt id), and leaves existing ``$n`` parameters alone
    rather than renumbering them. Replaced: string constants of every form (``'…'``,
    ``E'…'``, ``U&'…'``, ``$$…$$``), bit strings (``B'…'``, ``X'…'``) and numbers (a sign
    is an operator and stays: ``-5`` becomes ``-?``). Keywords ``TRUE``/``FALSE``/``NULL``
    stay. The result is for display; it is not meant to be executed.
    """
    tokens = _tokens(sql)
    if tokens is None:
        return _FALLBACK_LITERAL.sub("?", sql)
    edits: list[_Edit] = []
    for tok in tokens:
        if tok.name in _LITERAL_TOKENS or (
            tok.name == _UNTERMINATED and sql[tok.start] not in '"/-'
        ):
            edits.append((tok.start, tok.end, "?"))
    return _apply(sql, edits)


# ---------------------------------------------------------------------------------------
# Fingerprint


def fingerprint(sql: str) -> str | None:
    """pglast's fingerprint of ``sql`` (same shape, same value), ``None`` if it does not parse."""
    if nested_too_deep(sql):
        return None
    try:
        return str(parser.fingerprint(sql))
    except Exception:
        return None


# ---------------------------------------------------------------------------------------
# Parameters


def encode_params(
    values: Sequence[bytes | None],
    formats: Sequence[int],
    cap: int = 1024,
    *,
    redact_params: bool = False,
) -> tuple[str | None, ...]:
    """Bind parameter values as audit strings.

    ``formats`` follows the Bind message: empty means all text, one code applies to every
    parameter, otherwise one code per parameter (a missing code counts as text). Text values
    are decoded as UTF-8 (or, if not valid UTF-8, as Latin-1); binary ones ``base64:`` + base64.
    A value longer than ``cap`` bytes keeps its first ``cap`` bytes (cut on a character
    boundary for text) followed by ``…(N bytes)``, N being its full size. SQL NULL stays
    ``None``. With ``redact_params`` every non-NULL value becomes ``***``.
    """
    cap = max(cap, 0)
    out: list[str | None] = []
    for index, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        if redact_params:
            out.append(REDACTED)
            continue
        if len(formats) == 0:
            code = 0
        elif len(formats) == 1:
            code = formats[0]
        else:
            code = formats[index] if index < len(formats) else 0
        raw = bytes(value)
        suffix = f"…({len(raw)} bytes)" if len(raw) > cap else ""
        if code == 0:
            cut = len(raw)
            if suffix:
                cut = cap
                while 0 < cut < len(raw) and raw[cut] & 0xC0 == 0x80:
                    cut -= 1  # do not split a UTF-8 sequence
            try:
                text = raw[:cut].decode("utf-8")
            except UnicodeDecodeError:  # a single-byte client_encoding (LATIN1): as SQL is read
                text = raw[:cap].decode("latin-1")
            out.append(text + suffix)
        else:
            out.append("base64:" + base64.b64encode(raw[:cap]).decode("ascii") + suffix)
    return tuple(out)


# ---------------------------------------------------------------------------------------
# Statements

_PLAIN_STATEMENT = re.compile(r"[\w\s,.*=()<>+\-/]*;?\s*\Z", re.ASCII)
_BODY_OPENERS = frozenset({"BEGIN_P", "CASE"})


def statement_texts(sql: str) -> list[str]:
    """One text per statement of a (possibly multi-statement) Query string.

    Each text runs from just after the previous statement's ``;`` to just before its own,
    whitespace-trimmed: comments before a statement stay with it (so its prompt id does);
    the separating ``;`` is not included. Empty statements (``;;``, comment-only) are dropped,
    but a comment after the last ``;`` is kept with the last statement. Boundaries come from
    the parser (so ``BEGIN ATOMIC … END`` bodies stay whole); text that does not parse is
    split on the scanner's ``;`` tokens, tracking ``BEGIN``/``CASE``…``END`` nesting in
    CREATE FUNCTION/PROCEDURE as psql does. Unscannable text is returned whole.
    """
    stripped = sql.strip()
    if not stripped:
        return []
    if "--" not in sql and "/*" not in sql and _PLAIN_STATEMENT.match(sql):
        single = stripped[:-1].rstrip() if stripped.endswith(";") else stripped
        return [single] if single else []
    tokens = _tokens(sql)
    if tokens is None:
        return [stripped]
    semicolons = [tok for tok in tokens if tok.name == _SEMICOLON]
    if not semicolons or (len(semicolons) == 1 and tokens[-1] is semicolons[0]):
        # One statement at most: no need for the parser (sqlcommenter-tagged ORM queries).
        if all(tok.name in _COMMENT_TOKENS or tok.name == _SEMICOLON for tok in tokens):
            return []
        end = semicolons[0].start if semicolons else len(sql)
        return [sql[:end].strip()]
    spans = _statement_spans(tokens, len(sql), sql)
    if spans is None:
        return [stripped]
    return [text for start, end in spans if (text := sql[start:end].strip())]


def _statement_spans(
    tokens: list[_Tok], length: int, sql: str | None = None
) -> list[tuple[int, int]]:
    """Character spans of the statements: text between separating ``;`` tokens."""
    separators = _separators_from_parser(sql, tokens) if sql is not None else None
    if separators is None:
        separators = _separators_from_tokens(tokens)
    separator_set = set(separators)
    spans: list[tuple[int, int]] = []
    start = 0
    has_statement = has_comment = False
    for tok in tokens:
        if tok.start in separator_set:
            if has_statement:
                spans.append((start, tok.start))
            start, has_statement, has_comment = tok.end, False, False
        elif tok.name in _COMMENT_TOKENS:
            has_comment = True
        else:
            has_statement = True
    if has_statement:
        spans.append((start, length))
    elif has_comment and spans:  # a comment after the last ``;`` goes with the last statement
        spans[-1] = (spans[-1][0], length)
    return spans


def _separators_from_parser(sql: str, tokens: list[_Tok]) -> list[int] | None:
    try:
        stmts = json.loads(parser.parse_sql_json(sql)).get("stmts", [])
    except Exception:
        return None
    offsets = _Offsets(sql)
    spans: list[tuple[int, int]] = []
    for stmt in stmts:
        start_byte = int(stmt.get("stmt_location", 0))
        length = stmt.get("stmt_len")
        end = offsets.char(start_byte + int(length)) if length else len(sql)
        spans.append((offsets.char(start_byte), end))
    separators: list[int] = []
    index = 0
    for tok in tokens:
        if tok.name != _SEMICOLON:
            continue
        while index < len(spans) and spans[index][1] <= tok.start:
            index += 1
        if index < len(spans) and spans[index][0] <= tok.start:
            continue  # a ``;`` inside a statement (BEGIN ATOMIC ... END)
        separators.append(tok.start)
    return separators


def _separators_from_tokens(tokens: list[_Tok]) -> list[int]:
    separators: list[int] = []
    depth = 0
    routine = False  # inside CREATE [OR REPLACE] FUNCTION/PROCEDURE
    head: list[str] = []  # leading keywords of the current statement
    for tok in tokens:
        if tok.name in _COMMENT_TOKENS:
            continue
        if tok.name == _SEMICOLON and depth == 0:
            separators.append(tok.start)
            head, routine = [], False
            continue
        if len(head) < 4:
            head.append(tok.name)
            routine = head[0] == "CREATE" and any(
                name in ("FUNCTION", "PROCEDURE") for name in head[1:]
            )
        if routine:
            if tok.name in _BODY_OPENERS:
                depth += 1
            elif tok.name == "END_P" and depth > 0:
                depth -= 1
    return separators
