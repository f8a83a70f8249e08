"""Startup parameters: what a client may pass upstream, and what pgguard adds. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Settings a client may never choose: identity and privilege belong to pgguard.
FORBIDDEN_SETTINGS = frozenset({"role", "session_authorization", "is_superuser"})
# Startup keys pgguard itself decides.
RESERVED_KEYS = frozenset({"user", "database", "options", "replication"})
PROMPT_ID_SETTING = "pgguard.prompt_id"


class StartupRefused(Exception):
    """The client's startup parameters ask for something pgguard does not allow."""

    def __init__(self, message: str, sqlstate: str = "42501") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def split_options(options: str) -> list[str]:
    """Split a libpq ``options`` value on unescaped whitespace (backslash escapes)."""
    words: list[str] = []
    current: list[str] = []
    escaped = False
    has_word = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
            has_word = True
        elif ch == "\\":
            escaped = True
            has_word = True
        elif ch.isspace():
            if has_word:
                words.append("".join(current))
                current = []
                has_word = False
        else:
            current.append(ch)
            has_word = True
    if escaped:
        current.append("\\")
    if has_word:
        words.append("".join(current))
    return words


def parse_options(options: str) -> list[tuple[str, str]]:
    """``-c name=value`` / ``--name=value`` pairs from an ``options`` string, in order."""
    words = split_options(options)
    settings: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c":
            i += 1
            if i >= len(words):
                raise StartupRefused("options: -c requires a value", "08P01")
            assignment = words[i]
        elif word.startswith("-c") or word.startswith("--"):
            assignment = word[2:]
        else:
            raise StartupRefused(f"options: unsupported switch {word!r}", "08P01")
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            raise StartupRefused(f"options: expected name=value, got {assignment!r}", "08P01")
        settings.append((name.replace("-", "_").lower(), value))
        i += 1
    return settings


def escape_option_value(value: str) -> str:
    return "".join("\\" + ch if ch.isspace() or ch == "\\" else ch for ch in value)


@dataclass(frozen=True, slots=True)
class UpstreamStartup:
    """The parameters of the upstream startup packet, and what the client asked for."""

    params: tuple[tuple[str, str], ...]
    prompt_id: str | None  # from the client's options, if it set pgguard.prompt_id there


def check_setting(name: str, value: str | None = None) -> None:
    """Refuse a client-chosen setting that belongs to pgguard or would let the server read
    SQL differently from pgguard's parser."""
    from pgguard.policy.identity_guard import unsafe_setting

    reason = unsafe_setting(name, value if value is not None else "on")
    if value is not None and reason is not None:
        raise StartupRefused(f"pgguard: sql-safety: {reason}")
    lowered = name.lower()
    if lowered in FORBIDDEN_SETTINGS:
        raise StartupRefused(f'pgguard: identity-guard: setting "{name}" is not allowed')
    if lowered.startswith("pgguard.") and lowered != PROMPT_ID_SETTING:
        raise StartupRefused(f'pgguard: identity-guard: setting "{name}" is reserved')


def build_upstream_startup(
    client_params: Iterable[tuple[str, str]],
    *,
    upstream_user: str,
    database: str,
    identity_settings: Mapping[str, str],
    role: str | None,
) -> UpstreamStartup:
    """Merge the client's startup parameters with pgguard's identity settings.

    The client's ``options`` are re-parsed and re-encoded so that nothing but ``-c`` settings
    reaches the server. pgguard's own settings are added last and cannot be overridden.
    """
    passthrough: list[tuple[str, str]] = []
    option_settings: list[tuple[str, str]] = []
    prompt_id: str | None = None
    for key, value in client_params:
        if key == "replication":
            if value.lower() not in ("false", "off", "no", "0"):
                raise StartupRefused("pgguard: replication connections are not supported")
            continue
        if key in RESERVED_KEYS and key != "options":
            continue
        if key == "options":
            for name, setting in parse_options(value):
                check_setting(name, setting)
                if name == PROMPT_ID_SETTING:
                    prompt_id = setting
                    continue
                option_settings.append((name, setting))
            continue
        if key.startswith("_pq_."):
            continue  # protocol extensions: pgguard speaks plain 3.0 upstream
        check_setting(key, value)
        if key.lower() == PROMPT_ID_SETTING:
            prompt_id = value
            continue
        passthrough.append((key, value))

    params: list[tuple[str, str]] = [("user", upstream_user), ("database", database)]
    params.extend(passthrough)
    if option_settings:
        options = " ".join(f"-c {n}={escape_option_value(v)}" for n, v in option_settings)
        params.append(("options", options))
    if role is not None:
        params.append(("role", role))
    params.extend(identity_settings.items())
    return UpstreamStartup(tuple(params), prompt_id)
