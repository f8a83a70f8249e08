"""The policy format (SPEC §3): frozen pydantic models for ``policies/*.yaml``. Pure.

One YAML file is a :class:`PolicyDocument`; the loader merges every file into one
:class:`Policy`. Patterns in ``when``, ``match.tables``, ``match.functions``, ``masks[].column``
and ``exempt`` are globs (``*``, ``?``, ``[abc]``, ``[!abc]``), compiled to regular expressions
once, when the model is built:

* names (users, groups, databases, agents): fnmatch-style, case-sensitive, on the whole name;
* qualified names (tables and functions ``schema.name``, columns ``schema.table.column``): the
  pattern is matched segment by segment: ``*`` and ``?`` never cross a dot, so ``vault.*``
  matches ``vault.api_keys`` but ``public.*.ssn`` does not match a two-part name. A pattern with
  fewer segments than the kind has is qualified with ``*``: the table pattern ``orders`` means
  ``*.orders`` (an ``orders`` table in any schema), the column pattern ``customers.email`` means
  ``*.customers.email``. Identifiers are compared as PostgreSQL stores them (case-sensitive:
  unquoted identifiers are lower case).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, Final, Literal, Self, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from pgguard.policy.facts import StatementClass, StatementFacts

# --------------------------------------------------------------------------------------------
# Vocabulary

STATEMENT_CLASSES: Final[tuple[StatementClass, ...]] = get_args(StatementClass)
_ALL_CLASSES: Final[frozenset[str]] = frozenset(STATEMENT_CLASSES)

Action = Literal["allow", "deny", "require_approval", "audit_only"]
DefaultAction = Literal["allow", "deny"]
OnMaxRows = Literal["error", "truncate"]

RULE_NAME_RE: Final = re.compile(r"[a-z0-9._-]+\Z")

# Every command tag PostgreSQL reports (src/include/tcop/cmdtaglist.h, PostgreSQL 13-17), with
# the classes a statement carrying that tag could be given. The sets are deliberately generous
# (a SELECT can write through a CTE, anything with expressions can call a volatile function):
# they only serve the "this rule can never match" warning, never a decision.
_ANY: Final = _ALL_CLASSES
_QUERY_TAGS = (
    "SELECT",
    "SELECT FOR KEY SHARE",
    "SELECT FOR NO KEY UPDATE",
    "SELECT FOR SHARE",
    "SELECT FOR UPDATE",
    "SELECT INTO",
    "INSERT",
    "UPDATE",
    "DELETE",
    "MERGE",
    "CREATE TABLE AS",
    "CREATE MATERIALIZED VIEW",
    "REFRESH MATERIALIZED VIEW",
    "COPY",
    "COPY FROM",
    "EXPLAIN",
    "EXECUTE",
    "PREPARE",
    "DECLARE CURSOR",
    "FETCH",
    "MOVE",
    "CALL",
    "DO",
)
_TRANSACTION_TAGS = (
    "BEGIN",
    "START TRANSACTION",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT",
    "RELEASE",
    "PREPARE TRANSACTION",
    "COMMIT PREPARED",
    "ROLLBACK PREPARED",
)
_SESSION_TAGS = (
    "SET",
    "RESET",
    "SHOW",
    "DISCARD",
    "DISCARD ALL",
    "DISCARD PLANS",
    "DISCARD SEQUENCES",
    "DISCARD TEMP",
    "LISTEN",
    "UNLISTEN",
    "NOTIFY",
    "DEALLOCATE",
    "DEALLOCATE ALL",
    "SET CONSTRAINTS",
    "CLOSE",
    "CLOSE CURSOR",
    "CLOSE CURSOR ALL",
    "LOAD",
)
_ROLE_TAGS = (
    "GRANT",
    "REVOKE",
    "GRANT ROLE",
    "REVOKE ROLE",
    "CREATE ROLE",
    "ALTER ROLE",
    "DROP ROLE",
    "ALTER DEFAULT PRIVILEGES",
    "REASSIGN OWNED",
    "DROP OWNED",
)
_ADMIN_TAGS = ("ALTER SYSTEM", "CHECKPOINT", "VACUUM", "ANALYZE", "CLUSTER", "REINDEX")
_DDL_OBJECTS = (
    "ACCESS METHOD",
    "AGGREGATE",
    "CAST",
    "COLLATION",
    "CONSTRAINT",
    "CONVERSION",
    "DATABASE",
    "DOMAIN",
    "EVENT TRIGGER",
    "EXTENSION",
    "FOREIGN DATA WRAPPER",
    "FOREIGN TABLE",
    "FUNCTION",
    "INDEX",
    "LANGUAGE",
    "MATERIALIZED VIEW",
    "OPERATOR",
    "OPERATOR CLASS",
    "OPERATOR FAMILY",
    "POLICY",
    "PROCEDURE",
    "PUBLICATION",
    "ROUTINE",
    "RULE",
    "SCHEMA",
    "SEQUENCE",
    "SERVER",
    "STATISTICS",
    "SUBSCRIPTION",
    "TABLE",
    "TABLESPACE",
    "TEXT SEARCH CONFIGURATION",
    "TEXT SEARCH DICTIONARY",
    "TEXT SEARCH PARSER",
    "TEXT SEARCH TEMPLATE",
    "TRANSFORM",
    "TRIGGER",
    "TYPE",
    "USER MAPPING",
    "VIEW",
)
_ALTER_ONLY = ("LARGE OBJECT",)

# Statements that run inside another one (``StatementFacts.commands`` lists them after the outer
# tag), with the tags of the statements that can hold them: data-modifying CTEs, EXPLAIN
# ANALYZE, PREPARE / EXECUTE, COPY (query), CREATE TABLE AS, DECLARE CURSOR, CREATE SCHEMA.
_DML_HOSTS = (
    "SELECT",
    "SELECT INTO",
    "INSERT",
    "UPDATE",
    "DELETE",
    "MERGE",
    "EXPLAIN",
    "PREPARE",
    "EXECUTE",
    "COPY",
    "CREATE TABLE AS",
    "CREATE MATERIALIZED VIEW",
    "DECLARE CURSOR",
)
_NESTED_IN: Final[dict[str, tuple[str, ...]]] = {
    "SELECT": (
        "EXPLAIN",
        "PREPARE",
        "EXECUTE",
        "COPY",
        "CREATE TABLE AS",
        "CREATE MATERIALIZED VIEW",
        "DECLARE CURSOR",
    ),
    "INSERT": _DML_HOSTS,
    "UPDATE": _DML_HOSTS,
    "DELETE": _DML_HOSTS,
    "MERGE": _DML_HOSTS,
    "EXECUTE": ("EXPLAIN", "CREATE TABLE AS"),
    "DECLARE CURSOR": ("EXPLAIN",),
    "CREATE TABLE AS": ("EXPLAIN",),
    "CREATE MATERIALIZED VIEW": ("EXPLAIN",),
    **{
        tag: ("CREATE SCHEMA",)
        for tag in (
            "CREATE TABLE",
            "CREATE VIEW",
            "CREATE INDEX",
            "CREATE SEQUENCE",
            "CREATE TRIGGER",
            "GRANT",
        )
    },
}


def _closure(start: Iterable[str]) -> frozenset[str]:
    """``start`` and every tag that can hold one of them, directly or not."""
    found = set(start)
    pending = list(found)
    while pending:
        for host in _NESTED_IN.get(pending.pop(), ()):
            if host not in found:
                found.add(host)
                pending.append(host)
    return frozenset(found)


def _command_classes() -> dict[str, frozenset[str]]:
    ddl = frozenset({"ddl", "role", "admin", "function", "write", "read"})
    table: dict[str, frozenset[str]] = {}
    for obj in _DDL_OBJECTS:
        for verb in ("CREATE", "ALTER", "DROP"):
            table[f"{verb} {obj}"] = ddl
    for obj in _ALTER_ONLY:
        table[f"ALTER {obj}"] = ddl
    for tag in ("COMMENT", "SECURITY LABEL", "IMPORT FOREIGN SCHEMA"):
        table[tag] = ddl
    for tag in _ROLE_TAGS:
        table[tag] = frozenset({"role", "ddl", "admin"})
    table["DROP OWNED"] |= {"write"}  # it drops the roles' tables
    for tag in _ADMIN_TAGS:
        table[tag] = frozenset({"admin", "ddl", "write", "function"})
    table["TRUNCATE TABLE"] = frozenset({"write", "ddl", "admin", "function"})
    table["LOCK TABLE"] = frozenset({"admin", "read", "write", "session", "transaction"})
    for tag in _SESSION_TAGS:
        table[tag] = frozenset({"session", "read", "role", "admin", "function", "transaction"})
    for tag in _TRANSACTION_TAGS:
        table[tag] = frozenset({"transaction", "session", "admin"})
    for tag in _QUERY_TAGS:
        table[tag] = _ANY
    # A rule's commands match a nested statement too, so a tag can have every class of the
    # statements that can hold it.
    for tag in _NESTED_IN:
        table[tag] = frozenset().union(*(table[host] for host in _closure([tag])))
    return table


#: Command tag → the classes a statement with that tag could have.
COMMAND_CLASSES: Final[dict[str, frozenset[str]]] = _command_classes()
COMMAND_TAGS: Final[frozenset[str]] = frozenset(COMMAND_CLASSES)
#: Tags a statement with ``without_where`` can list in its commands: UPDATE, DELETE, TRUNCATE
#: and every statement that can run an UPDATE or DELETE inside it.
WITHOUT_WHERE_TAGS: Final[frozenset[str]] = _closure(["UPDATE", "DELETE", "TRUNCATE TABLE"])

#: Spellings people write for a command whose tag differs. A rule listing one of these matches
#: both the spelling and the real tag.
COMMAND_ALIASES: Final[dict[str, str]] = {
    "TRUNCATE": "TRUNCATE TABLE",
    "LOCK": "LOCK TABLE",
    "CREATE USER": "CREATE ROLE",
    "CREATE GROUP": "CREATE ROLE",
    "ALTER USER": "ALTER ROLE",
    "ALTER GROUP": "ALTER ROLE",
    "DROP USER": "DROP ROLE",
    "DROP GROUP": "DROP ROLE",
    "ABORT": "ROLLBACK",
    "END": "COMMIT",
    "VALUES": "SELECT",
    "TABLE": "SELECT",
    "DECLARE": "DECLARE CURSOR",
    "REFRESH": "REFRESH MATERIALIZED VIEW",
}


def normalize_command(tag: str) -> str:
    """Upper case, single spaces: ``"create  table"`` → ``"CREATE TABLE"``."""
    return " ".join(tag.split()).upper()


def command_suggestion(tag: str) -> str | None:
    """The closest real command tag to a misspelt one, if any is close."""
    close = difflib.get_close_matches(tag, sorted(COMMAND_TAGS), n=1, cutoff=0.75)
    return close[0] if close else None


# --------------------------------------------------------------------------------------------
# Globs

_GLOB_MAGIC = re.compile(r"[*?\[]")

GlobKind = Literal["name", "relation", "column"]
_KIND_PARTS: Final[dict[str, int]] = {"name": 1, "relation": 2, "column": 3}


def is_glob(pattern: str) -> bool:
    return _GLOB_MAGIC.search(pattern) is not None


def _glob_to_regex(pattern: str, *, dotted: bool) -> str:
    """fnmatch-style translation; with ``dotted``, wildcards never match a ``.``."""
    star, one = ("[^.]*", "[^.]") if dotted else (".*", ".")
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not out or out[-1] != star:
                out.append(star)
        elif c == "?":
            out.append(one)
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append("\\[")
                continue
            body = pattern[i:j].replace("\\", "\\\\")
            i = j + 1
            if body.startswith("!"):
                body = ("^." if dotted else "^") + body[1:]
            elif body.startswith("^"):
                body = "\\" + body
            out.append(f"[{body}]")
        else:
            out.append(re.escape(c))
    return "".join(out)


def qualify_pattern(pattern: str, kind: GlobKind) -> str:
    """``orders`` → ``*.orders`` for a relation; ``ssn`` → ``*.*.ssn`` for a column."""
    parts = _KIND_PARTS[kind]
    if parts == 1:
        return pattern
    missing = parts - len(pattern.split("."))
    return "*." * missing + pattern if missing > 0 else pattern


def pattern_shape_problem(pattern: str, kind: GlobKind) -> str | None:
    """Why a qualified pattern can never match anything, or None."""
    parts = _KIND_PARTS[kind]
    if parts == 1:
        return None
    segments = pattern.split(".")
    if any(not s for s in segments):
        return f"{pattern!r} has an empty name part"
    if len(segments) > parts:
        shape = "schema.table" if kind == "relation" else "schema.table.column"
        return f"{pattern!r} has more than {parts} dot-separated parts ({shape})"
    return None


_MEMO_LIMIT: Final = 4096


class GlobSet:
    """A compiled list of glob patterns: ``match(value)`` is true when any pattern matches."""

    __slots__ = ("_literals", "_memo", "_regex", "_tail_regex", "kind", "patterns")

    def __init__(self, patterns: Iterable[str], kind: GlobKind = "name") -> None:
        self.patterns: tuple[str, ...] = tuple(patterns)
        self.kind: GlobKind = kind
        literals: set[str] = set()
        regexes: list[str] = []
        tails: list[str] = []
        dotted = kind != "name"
        parts = _KIND_PARTS[kind]
        for raw in self.patterns:
            if dotted and pattern_shape_problem(raw, kind) is not None:
                continue  # can never match; reported as a warning
            pattern = qualify_pattern(raw, kind)
            if dotted:
                # A value the analyser could not qualify (fewer parts) matches on its last
                # parts alone: an unknown schema could be any schema (fail closed).
                segments = pattern.split(".")
                for keep in range(1, parts):
                    tails.append(
                        "\\.".join(_glob_to_regex(s, dotted=True) for s in segments[-keep:])
                    )
            if not is_glob(pattern):
                literals.add(pattern)
            elif dotted:
                regexes.append(
                    "\\.".join(_glob_to_regex(s, dotted=True) for s in pattern.split("."))
                )
            else:
                regexes.append(_glob_to_regex(pattern, dotted=False))
        self._literals = frozenset(literals)
        self._memo: dict[str, bool] = {}
        self._regex = re.compile("|".join(f"(?:{r})" for r in regexes), re.S) if regexes else None
        self._tail_regex = re.compile("|".join(f"(?:{r})" for r in tails), re.S) if tails else None

    def match(self, value: str) -> bool:
        found = self._memo.get(value)
        if found is None:
            found = self._match(value)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[value] = found
        return found

    def _match(self, value: str) -> bool:
        if value in self._literals:
            return True
        regex = self._regex
        if regex is not None and regex.fullmatch(value) is not None:
            return True
        if self._tail_regex is not None and value.count(".") < _KIND_PARTS[self.kind] - 1:
            return self._tail_regex.fullmatch(value) is not None
        return False

    def match_any(self, values: Iterable[str]) -> bool:
        memo = self._memo
        for value in values:
            found = memo.get(value)
            if found is None:
                found = self.match(value)
            if found:
                return True
        return False

    def covers(self, pattern: str) -> bool:
        """True when every value ``pattern`` matches is matched by this set (conservative: only
        proven for literal patterns, identical patterns and all-wildcard patterns)."""
        qualified = qualify_pattern(pattern, self.kind)
        mine = {qualify_pattern(p, self.kind) for p in self.patterns}
        if qualified in mine:
            return True
        if any(set(p.split(".")) == {"*"} for p in mine):
            return True
        return not is_glob(qualified) and self.match(qualified)

    def __repr__(self) -> str:
        return f"GlobSet({list(self.patterns)!r}, kind={self.kind!r})"


# --------------------------------------------------------------------------------------------
# Mask functions (SPEC §4)

MaskArg = int | float | str | tuple[Any, ...]

PSEUDO_KINDS: Final[tuple[str, ...]] = ("name", "email", "city", "phone")
GENERALIZE_UNITS: Final[tuple[str, ...]] = (
    "minute",
    "hour",
    "day",
    "week",
    "month",
    "quarter",
    "year",
    "decade",
)
MASK_FUNCTIONS: Final[tuple[str, ...]] = (
    "nullify",
    "redact",
    "constant",
    "partial",
    "partial_email",
    "keep_last",
    "hash",
    "pseudo",
    "generalize",
    "noise",
    "json_mask",
    "regex_redact",
)
_SIGNATURES: Final[dict[str, str]] = {
    "nullify": "nullify",
    "redact": "redact",
    "constant": "constant(value)",
    "partial": "partial(prefix, pad, suffix)",
    "partial_email": "partial_email",
    "keep_last": "keep_last(n)",
    "hash": "hash(length)",
    "pseudo": "pseudo(kind)",
    "generalize": "generalize(step | unit)",
    "noise": "noise(ratio)",
    "json_mask": "json_mask(['$.path', ...])",
    "regex_redact": "regex_redact('pattern', 'replacement')",
}
_PARAM_NAMES: Final[dict[str, tuple[str, ...]]] = {
    "constant": ("value",),
    "partial": ("prefix", "pad", "suffix"),
    "keep_last": ("n",),
    "hash": ("length",),
    "pseudo": ("kind",),
    "generalize": ("step",),
    "noise": ("ratio",),
    "json_mask": ("paths",),
    "regex_redact": ("pattern", "replacement"),
}
HASH_MAX_LENGTH: Final = 64  # hex digits of an HMAC-SHA256

JSON_PATH_RE: Final = re.compile(
    r"""\$(?:\.(?:[A-Za-z_][A-Za-z0-9_-]*|\*)|\[(?:\d+|\*|'[^']*'|"[^"]*")\])+\Z"""
)

_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<num>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<sq>'(?:[^']|'')*')
      | (?P<dq>"(?:[^"]|"")*")
      | (?P<punct>[(),\[\]])
    )""",
    re.X,
)


class MaskSyntaxError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # num, ident, str, punct, end
    value: Any
    col: int  # 1-based column in the spec


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos, n = 0, len(text)
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            break
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            ch = text[pos]
            if ch in "'\"":
                raise MaskSyntaxError(f"unterminated string at column {pos + 1}")
            raise MaskSyntaxError(f"unexpected character {ch!r} at column {pos + 1}")
        kind = m.lastgroup or ""
        raw = m.group(kind)
        col = m.start(kind) + 1
        if kind == "num":
            value: Any = float(raw) if any(c in raw for c in ".eE") else int(raw)
        elif kind in ("sq", "dq"):
            quote = raw[0]
            value = raw[1:-1].replace(quote * 2, quote)
            kind = "str"
        else:
            value = raw
        tokens.append(_Token(kind, value, col))
        pos = m.end()
    tokens.append(_Token("end", None, n + 1))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, value: str) -> None:
        tok = self.take()
        if tok.kind != "punct" or tok.value != value:
            raise MaskSyntaxError(f"expected {value!r} at column {tok.col}, found {_show(tok)}")

    def spec(self) -> tuple[str, tuple[MaskArg, ...]]:
        tok = self.take()
        if tok.kind != "ident":
            raise MaskSyntaxError(f"expected a function name at column {tok.col}")
        name: str = tok.value
        args: tuple[MaskArg, ...] = ()
        if self.peek().kind == "punct" and self.peek().value == "(":
            self.take()
            args = self.items(")")
        tok = self.peek()
        if tok.kind != "end":
            raise MaskSyntaxError(f"unexpected {_show(tok)} at column {tok.col}")
        return name, args

    def items(self, close: str) -> tuple[MaskArg, ...]:
        out: list[MaskArg] = []
        if self.peek().kind == "punct" and self.peek().value == close:
            self.take()
            return ()
        while True:
            out.append(self.value())
            tok = self.take()
            if tok.kind == "punct" and tok.value == close:
                return tuple(out)
            if not (tok.kind == "punct" and tok.value == ","):
                raise MaskSyntaxError(
                    f"expected ',' or {close!r} at column {tok.col}, found {_show(tok)}"
                )

    def value(self) -> MaskArg:
        tok = self.take()
        if tok.kind in ("num", "str", "ident"):
            return tok.value  # type: ignore[no-any-return]
        if tok.kind == "punct" and tok.value == "[":
            return self.items("]")
        raise MaskSyntaxError(f"expected a value at column {tok.col}, found {_show(tok)}")


def _show(tok: _Token) -> str:
    return "the end" if tok.kind == "end" else repr(tok.value)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _validate_mask_args(name: str, args: tuple[MaskArg, ...]) -> tuple[MaskArg, ...]:
    """Check arity and types; returns the normalised arguments. Raises ValueError."""
    usage = f"usage: {_SIGNATURES[name]}"

    def arity(n: int) -> None:
        if len(args) != n:
            want = "no arguments" if n == 0 else f"{n} argument{'s' if n > 1 else ''}"
            raise ValueError(f"{name} takes {want}, got {len(args)} ({usage})")

    if name in ("nullify", "redact", "partial_email"):
        arity(0)
        return ()
    if name == "constant":
        arity(1)
        if isinstance(args[0], tuple):
            raise ValueError(f"constant takes a number or a string, not a list ({usage})")
        return args
    if name == "partial":
        arity(3)
        prefix, pad, suffix = args
        if not (isinstance(prefix, int) and prefix >= 0):
            raise ValueError(f"partial: prefix must be an integer >= 0, got {prefix!r}")
        if not isinstance(pad, str):
            raise ValueError(f"partial: pad must be a quoted string, got {pad!r}")
        if not (isinstance(suffix, int) and suffix >= 0):
            raise ValueError(f"partial: suffix must be an integer >= 0, got {suffix!r}")
        return args
    if name == "keep_last":
        arity(1)
        if not (isinstance(args[0], int) and args[0] >= 0):
            raise ValueError(f"keep_last: n must be an integer >= 0, got {args[0]!r}")
        return args
    if name == "hash":
        arity(1)
        if not (isinstance(args[0], int) and 1 <= args[0] <= HASH_MAX_LENGTH):
            raise ValueError(
                f"hash: length must be an integer from 1 to {HASH_MAX_LENGTH}, got {args[0]!r}"
            )
        return args
    if name == "pseudo":
        arity(1)
        if args[0] not in PSEUDO_KINDS:
            raise ValueError(
                f"pseudo: kind must be one of {', '.join(PSEUDO_KINDS)}, got {args[0]!r}"
            )
        return args
    if name == "generalize":
        arity(1)
        step = args[0]
        if _is_number(step):
            if step <= 0:  # type: ignore[operator]
                raise ValueError(f"generalize: step must be > 0, got {step!r}")
            return args
        if isinstance(step, str) and step.lower() in GENERALIZE_UNITS:
            return (step.lower(),)
        raise ValueError(
            f"generalize: expected a number > 0 or a unit ({', '.join(GENERALIZE_UNITS)}), "
            f"got {step!r}"
        )
    if name == "noise":
        arity(1)
        ratio = args[0]
        if not (_is_number(ratio) and 0 < ratio <= 1):  # type: ignore[operator]
            raise ValueError(f"noise: ratio must be a number with 0 < ratio <= 1, got {ratio!r}")
        return (float(ratio),)  # type: ignore[arg-type]
    if name == "json_mask":
        if not args:
            raise ValueError(f"json_mask needs at least one JSON path ({usage})")
        paths: list[Any] = []
        for arg in args:
            paths.extend(arg if isinstance(arg, tuple) else (arg,))
        if not paths:
            raise ValueError(f"json_mask needs at least one JSON path ({usage})")
        for path in paths:
            if not isinstance(path, str) or JSON_PATH_RE.match(path) is None:
                raise ValueError(
                    f"json_mask: {path!r} is not a JSON path like '$.a', '$.a.b', '$.items[*].id'"
                )
        return (tuple(paths),)
    if name == "regex_redact":
        arity(2)
        pattern, repl = args
        if not isinstance(pattern, str) or not isinstance(repl, str):
            raise ValueError(f"regex_redact takes two quoted strings ({usage})")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(
                f"regex_redact: invalid regular expression {pattern!r}: {exc}"
            ) from None
        return args
    raise AssertionError(name)  # pragma: no cover


def parse_mask_function(text: str) -> MaskFunction:
    """Parse and validate a mask function spec such as ``keep_last(4)``. Raises ValueError.

    Literals: integers and decimals, strings in ``'…'`` or ``"…"`` (a doubled quote inside is
    one quote; backslashes are kept as written, so ``regex_redact('\\d', '#')`` means the regex
    ``\\d``), bare identifiers (taken as strings: ``pseudo(name)``), and ``[…]`` lists.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a string such as 'keep_last(4)', got {text!r}")
    source = text.strip()
    if not source:
        raise ValueError("must not be empty")
    try:
        name, args = _Parser(source).spec()
    except MaskSyntaxError as exc:
        raise ValueError(f"cannot parse {source!r}: {exc}") from None
    if name not in MASK_FUNCTIONS:
        close = difflib.get_close_matches(name, MASK_FUNCTIONS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(
            f"unknown mask function {name!r}{hint}; known: {', '.join(MASK_FUNCTIONS)}"
        )
    return MaskFunction(name=name, args=_validate_mask_args(name, args), text=source)


# Which kinds of column type a function can apply to ("any": every type).
TypeCategory = Literal["text", "number", "date", "json", "any"]


# --------------------------------------------------------------------------------------------
# Models


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy without the compiled forms cached on the original (they would be stale)."""
        copied = super().model_copy(update=update, deep=deep)
        fields = type(copied).model_fields
        for key in [k for k in copied.__dict__ if k not in fields]:
            del copied.__dict__[key]
        return copied


def _or_list(items: Sequence[str]) -> str:
    """``[a, b, c]`` → ``"a, b or c"``."""
    items = list(dict.fromkeys(items))
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _one_or_many(value: Any) -> Any:
    """YAML convenience: ``groups: dba`` means ``groups: [dba]``."""
    return (value,) if isinstance(value, str) else value


def _none_is_empty(value: Any) -> Any:
    """``rules:`` with nothing under it means no rules."""
    return () if value is None else value


Pattern = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Patterns = Annotated[tuple[Pattern, ...], BeforeValidator(_one_or_many)]
Section = BeforeValidator(_none_is_empty)


class MaskFunction(_Model):
    """A parsed mask function: ``keep_last(4)`` → name ``keep_last``, args ``(4,)``."""

    name: str
    args: tuple[MaskArg, ...] = ()
    text: str = ""  # as written in the policy

    @property
    def params(self) -> dict[str, Any]:
        """The arguments by parameter name, e.g. ``{"prefix": 2, "pad": "*", "suffix": 2}``."""
        return dict(zip(_PARAM_NAMES.get(self.name, ()), self.args, strict=False))

    @property
    def type_categories(self) -> frozenset[TypeCategory]:
        """The kinds of column type this function produces valid values for."""
        if self.name in ("nullify", "redact", "constant"):
            return frozenset({"any"})
        if self.name == "generalize":
            return frozenset({"number"} if _is_number(self.args[0]) else {"date"})
        if self.name == "noise":
            return frozenset({"number", "date"})
        if self.name == "json_mask":
            return frozenset({"json"})
        return frozenset({"text"})

    def __str__(self) -> str:
        return self.text or self.name


def _parse_mask_field(value: Any) -> Any:
    if isinstance(value, MaskFunction):
        return value
    return parse_mask_function(value)


class When(_Model):
    """Who a rule or limit applies to. Omitted keys match anyone; all given keys must match."""

    users: Patterns | None = None
    groups: Patterns | None = None
    databases: Patterns | None = None
    agents: Patterns | None = None

    @cached_property
    def compiled(self) -> tuple[GlobSet | None, GlobSet | None, GlobSet | None, GlobSet | None]:
        def glob(p: tuple[str, ...] | None) -> GlobSet | None:
            return None if p is None else GlobSet(p, "name")

        return glob(self.users), glob(self.groups), glob(self.databases), glob(self.agents)

    def matches(self, user: str, groups: Sequence[str], agent: str | None, database: str) -> bool:
        users_g, groups_g, databases_g, agents_g = self.compiled
        if users_g is not None and not users_g.match(user):
            return False
        if groups_g is not None and not groups_g.match_any(groups):
            return False
        if databases_g is not None and not databases_g.match(database):
            return False
        return agents_g is None or (agent is not None and agents_g.match(agent))


class Match(_Model):
    """What a rule applies to. Omitted keys match any statement; all given keys must hold."""

    classes: Annotated[tuple[StatementClass, ...], BeforeValidator(_one_or_many)] | None = None
    # Any command the statement runs: its own, or one nested in it (a DELETE in a CTE, …).
    commands: Annotated[tuple[Pattern, ...], BeforeValidator(_one_or_many)] | None = None
    tables: Patterns | None = None
    functions: Patterns | None = None
    # true: only UPDATE/DELETE without a WHERE clause; false: only statements that are not.
    without_where: StrictBool | None = None

    @field_validator("commands")
    @classmethod
    def _normalize_commands(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(normalize_command(c) for c in value)

    @cached_property
    def compiled(
        self,
    ) -> tuple[
        frozenset[str] | None, frozenset[str] | None, GlobSet | None, GlobSet | None, bool | None
    ]:
        classes = None if self.classes is None else frozenset(self.classes)
        commands: frozenset[str] | None = None
        if self.commands is not None:
            tags = set(self.commands)
            tags.update(COMMAND_ALIASES[c] for c in self.commands if c in COMMAND_ALIASES)
            commands = frozenset(tags)
        tables = None if self.tables is None else GlobSet(self.tables, "relation")
        functions = None if self.functions is None else GlobSet(self.functions, "relation")
        return classes, commands, tables, functions, self.without_where

    def matches(self, facts: StatementFacts) -> bool:
        classes, commands, tables, functions, without_where = self.compiled
        if classes is not None and classes.isdisjoint(facts.classes):
            return False
        if commands is not None and commands.isdisjoint(c.upper() for c in facts.all_commands):
            return False
        if without_where is not None and facts.without_where != without_where:
            return False
        if tables is not None and not tables.match_any(facts.tables):
            return False
        return functions is None or functions.match_any(facts.functions)

    def describe(self) -> str:
        """A short English description, used for default messages."""
        if self.commands:
            subject = _or_list(self.commands)
        elif self.classes:
            subject = f"a {_or_list(self.classes)} statement"
        elif self.tables or self.functions:
            subject = "access"
        else:
            subject = "this statement"
        if self.without_where is True:
            subject += " without a WHERE clause"
        if self.tables:
            subject += f" {'to' if subject == 'access' else 'on'} {', '.join(self.tables)}"
        if self.functions:
            subject += f" calling {', '.join(self.functions)}"
        return subject


class Rule(_Model):
    """One guard rule."""

    name: str
    when: When = When()
    match: Match = Match()
    action: Action
    message: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] | None = None
    approvers: Annotated[tuple[Pattern, ...], BeforeValidator(_one_or_many)] | None = Field(
        default=None, validate_default=True
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not RULE_NAME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a valid rule name: use lower-case letters, digits, "
                "'-', '_' and '.'"
            )
        return value

    @field_validator("approvers")
    @classmethod
    def _check_approvers(
        cls, value: tuple[str, ...] | None, info: ValidationInfo
    ) -> tuple[str, ...] | None:
        action = info.data.get("action")
        if action is None:
            return value  # the action itself is invalid: reported there
        if action == "require_approval":
            if not value:
                raise ValueError(
                    "required for action require_approval: the groups that may approve"
                )
        elif value is not None:
            raise ValueError(f"only allowed with action require_approval, not {action}")
        return value

    @property
    def effective_message(self) -> str:
        """``message``, or one derived from the rule."""
        if self.message:
            return self.message
        desc = self.match.describe()
        if self.action == "deny":
            return f"{desc} is not allowed"
        if self.action == "require_approval":
            return f"{desc} needs approval from {', '.join(self.approvers or ())}"
        return f"{desc} matched rule {self.name}"


class Exempt(_Model):
    """Identities a mask does not apply to (either list matching is enough)."""

    users: Patterns = ()
    groups: Patterns = ()

    @cached_property
    def compiled(self) -> tuple[GlobSet, GlobSet]:
        return GlobSet(self.users, "name"), GlobSet(self.groups, "name")


class MaskRule(_Model):
    """A masked column: ``column`` (``schema.table.column`` glob), ``function``, ``exempt``."""

    column: Pattern
    function: Annotated[MaskFunction, BeforeValidator(_parse_mask_field)]
    exempt: Exempt = Exempt()

    @field_serializer("function")
    def _dump_function(self, value: MaskFunction) -> str:
        return str(value)

    @cached_property
    def compiled(self) -> GlobSet:
        return GlobSet((self.column,), "column")

    def column_matches(self, schema: str, table: str, column: str) -> bool:
        return self.compiled.match(f"{schema}.{table}.{column}")

    def exempts(self, user: str, groups: Sequence[str]) -> bool:
        """True when ``user`` or one of ``groups`` is exempt from this mask."""
        users_g, groups_g = self.exempt.compiled
        return users_g.match(user) or groups_g.match_any(groups)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|secs|sec|s|mins|min|m|hrs|hr|h)?")
_DURATION_UNITS: Final[dict[str, float]] = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
}


def parse_duration(value: Any) -> float:
    """``30`` / ``"30s"`` / ``"500ms"`` / ``"5m"`` / ``"1h30m"`` → seconds (> 0)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s or 5m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        pos, seconds, parts = 0, 0.0, 0
        while pos < len(text):
            m = _DURATION_PART.match(text, pos)
            if m is None:
                break
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
            pos = m.end()
            while pos < len(text) and text[pos] == " ":
                pos += 1
            parts += 1
        if not parts or pos != len(text):
            raise ValueError(f"expected a duration such as 30s, 500ms, 5m or 1h, got {value!r}")
    else:
        raise ValueError(f"expected a duration such as 30s or 5m, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"must be greater than zero, got {value!r} (omit it for no timeout)")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class LimitRule(_Model):
    """Ceilings for the identities ``when`` matches (SPEC §3 ``limits``)."""

    when: When = When()
    max_rows: Annotated[StrictInt, Field(gt=0)] | None = None
    statement_timeout: Duration | None = None  # seconds
    read_only: StrictBool = False
    on_max_rows: OnMaxRows = "error"

    @property
    def sets_anything(self) -> bool:
        return self.max_rows is not None or self.statement_timeout is not None or self.read_only


class Defaults(_Model):
    action: DefaultAction = "allow"


class PolicyDocument(_Model):
    """One policy file."""

    version: Literal[1]
    rules: Annotated[tuple[Rule, ...], Section] = ()
    masks: Annotated[tuple[MaskRule, ...], Section] = ()
    defaults: Defaults | None = None
    limits: Annotated[tuple[LimitRule, ...], Section] = ()


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """An error or a warning about a policy, with where it is."""

    file: str
    location: str  # e.g. "rules[1](no-unbounded-delete).match.commands[0]"; "" = whole file
    message: str
    line: int | None = None
    severity: Literal["error", "warning"] = "error"

    def to_dict(self) -> dict[str, Any]:
        """For ``--json`` output."""
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "location": self.location,
            "message": self.message,
        }

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        loc = f" {self.location}:" if self.location else ""
        return f"{where}:{loc} {self.message}"


class PolicyError(ValueError):
    """The policy files have errors; ``problems`` lists every one of them."""

    def __init__(
        self, problems: Sequence[PolicyProblem], warnings: Sequence[PolicyProblem] = ()
    ) -> None:
        self.problems: list[PolicyProblem] = list(problems)
        self.warnings: list[PolicyProblem] = list(warnings)
        count = len(self.problems)
        head = f"{count} error{'s' if count != 1 else ''} in policy"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


class Policy(_Model):
    """The policy in force: every file merged (rules, masks and limits in file order)."""

    rules: tuple[Rule, ...] = ()
    masks: tuple[MaskRule, ...] = ()
    limits: tuple[LimitRule, ...] = ()
    defaults: Defaults = Defaults()
    sources: tuple[str, ...] = ()  # the files it was loaded from
    warnings: tuple[PolicyProblem, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> Policy:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"duplicate rule name {rule.name!r}")
            seen.add(rule.name)
        return self

    @cached_property
    def runtime(self) -> dict[str, Any]:
        """Scratch space for the engine's compiled form and caches (not part of the model)."""
        return {}

    def rule_named(self, name: str) -> Rule | None:
        for rule in self.rules:
            if rule.name == name:
                return rule
        return None
