"""The identity guard: clients may not change who they are on the upstream session.

Refuses ``SET ROLE``, ``SET SESSION AUTHORIZATION``, their ``RESET`` forms, ``SET pgguard.*``
(except ``pgguard.prompt_id``), ``set_config()`` on any of those (or with a name that is not a
constant), and ``DISCARD ALL`` when pgguard chose the upstream role (it would drop the role).
Parsing uses pglast, PostgreSQL's own parser; a statement it cannot parse is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pglast import parser

RULE = "identity-guard"
SAFETY_RULE = "sql-safety"
# Settings that change how the server reads SQL text: with them pgguard's parser and the
# server could see different statements (a string literal that ends early, a multibyte
# character that swallows a quote), so they are fixed.
UNSAFE_ENCODINGS = frozenset(
    {
        "sjis",
        "shift_jis",
        "big5",
        "gbk",
        "gb18030",
        "uhc",
        "johab",
        "cp932",
        "windows932",
        "cp936",
        "windows936",
        "cp949",
        "windows949",
        "cp950",
        "windows950",
        "mskanji",
        "shiftjis",
        "tcvn",
        "tcvn5712",
        "vscii",
    }
)
LIMITS_RULE = "limits"
PROMPT_ID = "pgguard.prompt_id"
_PROTECTED = frozenset({"role", "session_authorization", "is_superuser"})
# Cheap pre-filter: a statement containing none of these cannot touch identity settings.
# ``u&`` catches Unicode-escaped identifiers such as U&"\0072ole".
_TRIGGERS = (
    "role",
    "session",
    "authoriz",
    "pgguard",
    "set_config",
    "discard",
    "u&",
    "standard_conforming",
    "encoding",
    "names",
)
# Extra triggers when limits pin settings: the names themselves and READ WRITE.
_LIMIT_TRIGGERS = ("timeout", "read", "set", "begin", "start")


@dataclass(frozen=True, slots=True)
class Refusal:
    """A statement pgguard will not send, and the rule that says so."""

    rule: str
    message: str
    sqlstate: str = "42501"
    # What the statement's audit record says: "deny", or how its approval request ended
    # ("approval_denied", "approval_expired") and which request it was.
    decision: str = "deny"
    approval_id: str | None = None

    def text(self) -> str:
        return f"pgguard: {self.rule}: {self.message}"


@dataclass(frozen=True, slots=True)
class Hold(Refusal):
    """A statement that waits for a human's approval (``require_approval``). Where the relay
    cannot hold statements it is refused like any other refusal."""

    approvers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PromptSync(Hold):
    """Not a refusal: the statement waits while pgguard sets ``pgguard.prompt_id`` on the
    upstream session to the prompt id in its comment (``message``), so that database-side
    triggers see it."""


def unsafe_setting(name: str, value: str | None) -> str | None:
    """Why setting ``name`` to ``value`` would let the server read SQL differently, or None.
    ``value`` None means "not a constant" (refused for these names)."""
    lowered = name.lower()
    if lowered == "standard_conforming_strings":
        if value is None or value.strip().lower() not in ("on", "true", "yes", "1", "t", "y"):
            return "standard_conforming_strings must stay on"
    elif lowered == "client_encoding":
        if value is None:
            return "client_encoding must be a constant"
        normalized = value.strip().lower().replace("-", "").replace("_", "")
        if normalized in {e.replace("_", "") for e in UNSAFE_ENCODINGS}:
            return f"client encoding {value} is not supported through pgguard"
    return None


def protected_setting(name: str) -> bool:
    lowered = name.lower()
    if lowered in _PROTECTED:
        return True
    return lowered.startswith("pgguard.") and lowered != PROMPT_ID


def _walk(node: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if isinstance(value, dict):
                    if key[:1].isupper():
                        yield key, value
                    stack.append(value)
                elif isinstance(value, list):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def const_string(node: Any) -> str | None:
    """The string value of a constant node (``'x'``, ``'x'::text``) of pglast's JSON tree."""
    if type(node) is not dict or len(node) != 1:
        return None
    ((kind, body),) = node.items()
    if type(body) is not dict:
        return None
    if kind == "TypeCast":
        return const_string(body.get("arg"))
    if kind == "A_Const":
        sval = body.get("sval")
        if type(sval) is dict:
            return str(sval.get("sval", ""))
    return None


def _read_write(options: list[Any]) -> bool:
    """Whether transaction options ask for READ WRITE."""
    for option in options or ():
        elem = option.get("DefElem", {}) if isinstance(option, dict) else {}
        if elem.get("defname") == "transaction_read_only":
            const = elem.get("arg", {}).get("A_Const", {})
            if not const.get("ival", {}).get("ival", 0):
                return True
    return False


def check_identity(
    sql: str,
    role_mapped: bool,
    pinned: frozenset[str] = frozenset(),
    read_only: bool = False,
) -> Refusal | None:
    """A Refusal if ``sql`` would change the session's identity, else None.

    ``pinned`` names settings the identity's limits fix (statement_timeout, …): they may be
    reset to pgguard's value but not set. ``read_only`` also refuses READ WRITE transactions.
    """
    lowered = sql.lower()
    if not any(t in lowered for t in _TRIGGERS) and not (
        (pinned or read_only) and any(t in lowered for t in _LIMIT_TRIGGERS)
    ):
        return None
    try:
        tree = json.loads(parser.parse_sql_json(sql))
    except parser.ParseError as exc:
        return Refusal("parser", f"statement could not be analysed: {exc}", "42601")
    for kind, node in _walk(tree):
        if kind == "VariableSetStmt":
            name = str(node.get("name", ""))
            if name and protected_setting(name):
                return Refusal(RULE, f'changing "{name}" is not allowed through pgguard')
            if node.get("kind") == "VAR_SET_VALUE":
                args = node.get("args") or []
                value = const_string(args[0]) if args else None
                if value is None and args:
                    const = args[0].get("A_Const", {})
                    if "ival" in const:
                        value = str(const["ival"].get("ival", 0))
                reason = unsafe_setting(name, value)
                if reason is not None:
                    return Refusal(SAFETY_RULE, reason)
            if name.lower() in pinned and node.get("kind") == "VAR_SET_VALUE":
                return Refusal(LIMITS_RULE, f'"{name}" is fixed for your identity')
            if read_only and _read_write(node.get("args") or []):
                return Refusal(LIMITS_RULE, "your identity is limited to read-only transactions")
        elif kind == "TransactionStmt":
            if read_only and _read_write(node.get("options") or []):
                return Refusal(LIMITS_RULE, "your identity is limited to read-only transactions")
        elif kind == "DiscardStmt":
            if role_mapped and node.get("target") == "DISCARD_ALL":
                return Refusal(
                    RULE, "DISCARD ALL would reset the role pgguard chose; use DISCARD PLANS etc."
                )
        elif kind == "FuncCall":
            names = [n.get("String", {}).get("sval", "") for n in node.get("funcname", [])]
            if names and names[-1].lower() == "set_config":
                args = node.get("args") or []
                setting = const_string(args[0]) if args else None
                if setting is None:
                    return Refusal(RULE, "set_config() with a non-constant name is not allowed")
                if protected_setting(setting):
                    return Refusal(RULE, f'changing "{setting}" is not allowed through pgguard')
                value = const_string(args[1]) if len(args) > 1 else None
                reason = unsafe_setting(setting, value)
                if reason is not None:
                    return Refusal(SAFETY_RULE, reason)
                if setting.lower() in pinned:
                    return Refusal(LIMITS_RULE, f'"{setting}" is fixed for your identity')
    return None
