"""The ``pgguard`` command line (click)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from pgguard.audit.records import DECISIONS, EVENTS, format_ts
from pgguard.config import ConfigError, Settings, default_config_path, load_settings, parse_duration

if TYPE_CHECKING:
    from pgguard.audit.store import SqlStore


_Store = TypeVar("_Store", bound=contextlib.AbstractContextManager[Any])


def _load(config: Path | None) -> Settings:
    try:
        # A file named with --config must exist; the default one may be absent (defaults).
        return load_settings(config, require_file=config is not None)
    except ConfigError as exc:
        click.echo(exc.report(), err=True)
        sys.exit(2)


config_option = click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Configuration file (default: $PGGUARD_CONFIG, else ./pgguard.yaml).",
)


@click.group()
@click.version_option(package_name="pgguard")
def main() -> None:
    """pgguard: an identity-aware PostgreSQL gateway."""


@main.command()
@config_option
@click.option("--workers", type=int, default=None, help="Worker processes sharing the port.")
def serve(config: Path | None, workers: int | None) -> None:
    """Run the gateway."""
    from pgguard.app import serve as run_serve
    from pgguard.logs import setup_logging

    settings = _load(config)
    if workers is not None:
        if workers < 1:
            raise click.BadParameter("must be at least 1", param_hint="--workers")
        settings = settings.model_copy(update={"workers": workers})
    setup_logging(settings.log.level, settings.log.format)
    sys.exit(run_serve(settings))


@main.group()
def token() -> None:
    """Development tokens."""


def _claim(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected key=value, got {value!r}", param_hint="--claim")
    try:
        parsed: Any = json.loads(raw)
    except json.JSONDecodeError:
        parsed = raw
    return key, parsed


@token.command("mint")
@config_option
@click.option("--sub", required=True, help="Subject (the user name clients log in with).")
@click.option("--groups", default="", help="Comma-separated groups.")
@click.option("--ttl", default="15m", help="Lifetime, e.g. 15m or 1h.")
@click.option("--email", default=None)
@click.option("--agent", default=None, help="Agent claim, e.g. cursor.")
@click.option("--prompt-id", default=None)
@click.option("--claim", "claims", multiple=True, help="Extra claim key=value (JSON values ok).")
def token_mint(
    config: Path | None,
    sub: str,
    groups: str,
    ttl: str,
    email: str | None,
    agent: str | None,
    prompt_id: str | None,
    claims: tuple[str, ...],
) -> None:
    """Print a token signed with the configured development (HS256) key."""
    from pgguard.identity import mint_token

    settings = _load(config)
    secret = settings.identity.secret()
    if not secret:
        click.echo(
            f"no signing secret: set ${settings.identity.secret_env} or identity.secret_file",
            err=True,
        )
        sys.exit(2)
    extra: dict[str, Any] = dict(_claim(c) for c in claims)
    for key, value in (("email", email), ("agent", agent), ("prompt_id", prompt_id)):
        if value is not None:
            extra[key] = value
    if settings.identity.audience and "aud" not in extra:
        extra["aud"] = settings.identity.audience
    if settings.identity.issuer and "iss" not in extra:
        extra["iss"] = settings.identity.issuer
    algorithm = next((a for a in settings.identity.algorithms if a.startswith("HS")), None)
    if algorithm is None:
        click.echo("token mint needs an HS* algorithm in identity.algorithms", err=True)
        sys.exit(2)
    group_list = [g.strip() for g in groups.split(",") if g.strip()]
    click.echo(
        mint_token(
            secret,
            sub,
            groups=group_list,
            ttl=float(parse_duration(ttl)),
            claims=extra,
            algorithm=algorithm,
            groups_claim=settings.identity.groups_claim,
        )
    )


@main.group()
def policy() -> None:
    """Check and explain guard rules."""


@policy.command("check")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--dsn",
    default=None,
    envvar="PGGUARD_CHECK_DSN",
    help="Also check every mask against the column types of this live database (libpq DSN).",
)
@click.argument("files", nargs=-1)
def policy_check(
    config: Path | None, as_json: bool, dsn: str | None, files: tuple[str, ...]
) -> None:
    """Validate the policy files (default: the configuration's `policies`).

    Lists every error with its file and rule, warns about rules that can never match, and
    exits non-zero on any error. With --dsn, a mask whose function cannot apply to the type
    of a column it matches is an error too."""
    from pgguard.policy.loader import check_policy_files

    patterns = list(files) if files else _load(config).policies
    result = check_policy_files(patterns)
    type_errors: list[str] = []
    type_warnings: list[str] = []
    if dsn and result.policy is not None:
        from pgguard.masking.plan import mask_type_problems

        for mask, column, reason, is_error in mask_type_problems(
            result.policy.masks, _live_catalog(dsn)[0]
        ):
            line = f"mask {mask.column} ({mask.function}) on {column}: {reason}"
            (type_errors if is_error else type_warnings).append(line)
    ok = result.ok and not type_errors
    if as_json:
        doc = result.to_dict()
        doc["ok"] = ok
        doc["type_errors"] = type_errors
        doc["type_warnings"] = type_warnings
        click.echo(json.dumps(doc, indent=2))
    else:
        for line in type_errors:
            click.echo(f"error: {line}")
        for line in type_warnings:
            click.echo(f"warning: {line}")
        click.echo(result.report())
    sys.exit(0 if ok else 1)


def _live_catalog(dsn: str) -> tuple[Any, tuple[str, ...], str, str]:
    """(catalog snapshot, effective search_path, current user, database) of a live server."""
    import psycopg

    from pgguard.policy.catalog import CATALOG_SQL, effective_search_path, snapshot_from_rows

    with psycopg.connect(dsn, autocommit=True) as conn:
        catalog = snapshot_from_rows(conn.execute(CATALOG_SQL).fetchall())
        row = conn.execute("select current_setting('search_path'), current_user").fetchone()
        assert row is not None
        return catalog, effective_search_path(row[0], row[1]), row[1], conn.info.dbname


@policy.command("explain")
@config_option
@click.option("--as", "user", required=True, help="The user (token subject) to judge as.")
@click.option("--groups", default="", help="Comma-separated groups of that user.")
@click.option("--agent", default=None, help="The agent claim, e.g. cursor.")
@click.option("--database", default="postgres", help="The database the statement runs in.")
@click.option(
    "--dsn",
    default=None,
    envvar="PGGUARD_EXPLAIN_DSN",
    help="Resolve names against this live database (libpq DSN); else no catalog.",
)
@click.argument("sql")
def policy_explain(
    config: Path | None,
    user: str,
    groups: str,
    agent: str | None,
    database: str,
    dsn: str | None,
    sql: str,
) -> None:
    """Show the decision for SQL: matched rules, classes, objects and masked columns."""
    from dataclasses import replace

    from pgguard.policy.analysis import AnalysisError, analyse
    from pgguard.policy.catalog import CatalogSnapshot
    from pgguard.policy.engine import (
        Principal,
        decide_many,
        explain_text,
        limits_for,
        masks_for,
    )
    from pgguard.policy.identity_guard import check_identity
    from pgguard.policy.loader import check_policy_files

    settings = _load(config)
    result = check_policy_files(settings.policies)
    if not result.ok or result.policy is None:
        click.echo(result.report(), err=True)
        sys.exit(2)
    policy = result.policy
    catalog = CatalogSnapshot()
    search_path: tuple[str, ...] = ("pg_catalog", "public")
    current_user = ""
    if dsn:
        catalog, search_path, current_user, database = _live_catalog(dsn)
    principal = Principal(user, tuple(g.strip() for g in groups.split(",") if g.strip()), agent)
    refusal = check_identity(sql, role_mapped=bool(settings.identity.role_map))
    if refusal is not None:
        click.echo("decision: deny")
        click.echo(f"rule: {refusal.rule}")
        click.echo(f"message: {refusal.text()}")
        return
    try:
        facts = analyse(sql, catalog, search_path, current_user=current_user)
    except AnalysisError as exc:
        click.echo("decision: deny")
        click.echo("rule: parser")
        click.echo(f"message: pgguard: parser: statement could not be analysed: {exc}")
        return
    decision = decide_many(policy, principal, database, facts)
    masks = masks_for(policy, principal)
    masked: list[tuple[str, str]] = []
    if masks:
        from pgguard.masking.lineage import lineage
        from pgguard.masking.plan import plan_statement

        for n, statement in enumerate(lineage(sql, catalog, search_path), 1):
            plan = plan_statement(statement, masks, catalog)
            prefix = f"statement {n} " if len(facts) > 1 else ""
            if plan.refusal is not None and decision.allowed:
                decision = replace(
                    decision, action="deny", rule=plan.refusal.rule, message=plan.refusal.message
                )
            planned = plan.result
            if planned is None:
                continue
            for i, mask in enumerate(planned.columns or ()):
                if mask is not None:
                    origin = ", ".join(mask.sources) or mask.label
                    masked.append((f"{prefix}result column {i + 1} ({origin})", str(mask.function)))
            if planned.rest is not None:
                what = "every other result column" if planned.columns else "every result column"
                masked.append(
                    (f"{prefix}{what} ({planned.rest.label})", str(planned.rest.function))
                )
    click.echo(
        explain_text(decision, facts, masked, limits=limits_for(policy, principal, database))
    )


@main.group()
def audit() -> None:
    """Search, follow and verify the audit trail."""


def _fail(message: str, code: int = 2) -> NoReturn:
    """A one-line error on stderr and exit status ``code`` (2: usage or configuration)."""
    click.echo(message, err=True)
    sys.exit(code)


def _one_line(text: str, password: str | None) -> str:
    """A driver's (possibly multi-line) message on one line, never showing ``password``."""
    line = " ".join(text.split())
    if password:
        line = line.replace(password, "***")
    return line


def _db_error(safe: str, exc: Any, password: str | None) -> str:
    """A database error as one line: the driver's message, the URL without password."""
    detail = str(exc.orig) if getattr(exc, "orig", None) is not None else str(exc)
    return f"cannot read the audit store: audit store {safe}: {_one_line(detail, password)}"


def _checked_read_url(url: str) -> tuple[str, str | None]:
    """``(url with its password hidden, the password)`` of an audit store URL that a
    read-only command can open; exits with a one-line error otherwise."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(url)
    except ArgumentError:
        # Not parsed, so where a password would be is unknown: the value is not shown.
        _fail(
            "cannot read the audit store: audit.url is not a database URL (expected "
            "sqlite:///PATH or postgresql+psycopg://USER@HOST/DATABASE)"
        )
    safe = u.render_as_string(hide_password=True)
    password = str(u.password) if u.password else None
    backend = u.get_backend_name()
    if backend not in ("sqlite", "postgresql", "postgres"):
        _fail(
            f"cannot read the audit store: audit store {safe}: unsupported database "
            f"{backend!r} (use sqlite:///PATH or postgresql+psycopg://…)"
        )
    return safe, password


@contextlib.contextmanager
def _reading_store(config: Path | None) -> Iterator[SqlStore]:
    """The configured audit store, opened for reading (never created or migrated), and
    closed afterwards. A store that cannot be used, when opened or while it is read, ends
    the command with a one-line error (password hidden) and exit status 2."""
    from pgguard.audit.store import SqlStore

    settings = _load(config)
    if not settings.audit.url:
        _fail("audit.url is not configured: nothing to read")
    with _opened(lambda url: SqlStore(url, migrate=False), settings.audit.url) as store:
        yield store


@contextlib.contextmanager
def _opened(open_store: Callable[[str], _Store], url: str) -> Iterator[_Store]:
    """A store of the audit database at ``url`` (see :func:`_reading_store`)."""
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from pgguard.audit.store import StoreError

    safe, password = _checked_read_url(url)
    try:
        store = open_store(url)
    except StoreError as exc:
        _fail(f"cannot read the audit store: {_one_line(str(exc), password)}")
    except ImportError as exc:
        _fail(
            f"cannot read the audit store: audit store {safe}: its database driver is not "
            f"installed ({exc.name or exc})"
        )
    except ArgumentError as exc:  # e.g. an unknown driver name
        _fail(f"cannot read the audit store: audit store {safe}: {_one_line(str(exc), password)}")
    except DBAPIError as exc:
        _fail(_db_error(safe, exc, password))
    try:
        with store:
            yield store
    except DBAPIError as exc:
        _fail(_db_error(safe, exc, password))


def _time_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """A ``--since`` / ``--until`` value (a duration back from now, or an ISO timestamp) as
    epoch seconds; every command parses them here, with the same usage error."""
    from pgguard.audit.query import parse_time

    try:
        return parse_time(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


_TIME_HELP = "A duration back from now (1h, 30m) or an ISO timestamp."


def _check_range(since: float | None, until: float | None) -> None:
    if since is not None and until is not None and since > until:
        raise click.UsageError(
            f"--since ({format_ts(since)}) is later than --until ({format_ts(until)})"
        )


def _more_note(more: bool, as_json: bool) -> None:
    """With --json, "there is more" goes to stderr (stdout stays JSON lines)."""
    if more and as_json:
        click.echo("more records match: use --limit to see them", err=True)


@audit.command("search")
@config_option
@click.option("--user", default=None)
@click.option("--prompt-id", default=None)
@click.option("--since", default=None, callback=_time_option, help=_TIME_HELP)
@click.option("--until", default=None, callback=_time_option, help=_TIME_HELP + " Exclusive.")
@click.option("--decision", type=click.Choice(DECISIONS, case_sensitive=False), default=None)
@click.option("--table", default=None, help="schema.table the statement touched.")
@click.option("--fingerprint", default=None)
@click.option("--session", "session_id", default=None)
@click.option("--event", type=click.Choice(EVENTS, case_sensitive=False), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit_search(
    config: Path | None,
    user: str | None,
    prompt_id: str | None,
    since: float | None,
    until: float | None,
    decision: str | None,
    table: str | None,
    fingerprint: str | None,
    session_id: str | None,
    event: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Find audit records (the newest --limit of those that match, oldest first)."""
    from pgguard.audit.query import search_page, search_text

    _check_range(since, until)
    with _reading_store(config) as store:
        records, more = search_page(
            store,
            since=since,
            until=until,
            user=user,
            prompt_id=prompt_id,
            decision=decision,
            table=table,
            fingerprint=fingerprint,
            session_id=session_id,
            event=event,
            limit=limit,
        )
    click.echo(search_text(records, as_json, more=more), nl=False)
    _more_note(more, as_json)


@audit.command("tail")
@config_option
@click.option(
    "--last", type=click.IntRange(min=0), default=10, help="Records to show before following."
)
@click.option("--no-follow", is_flag=True, help="Print the last records and stop.")
@click.option("--json", "as_json", is_flag=True)
def audit_tail(config: Path | None, last: int, no_follow: bool, as_json: bool) -> None:
    """Print the newest records, then follow new ones."""
    from pgguard.audit.query import json_line, tail, terminal_text

    with _reading_store(config) as store:
        try:
            for r in tail(store, follow=not no_follow, last=last):
                if as_json:
                    click.echo(json_line(r))
                    continue
                what = r.statement if r.event == "statement" else f"({r.event})"
                click.echo(
                    f"{format_ts(r.ts)}  {terminal_text(r.user, limit=16):<16} "
                    f"{terminal_text(r.decision or '', limit=14):<14} "
                    f"{terminal_text(r.rule or '', limit=20):<20} "
                    f"{terminal_text(what, limit=120)}"
                )
        except KeyboardInterrupt:
            pass


@audit.command("verify")
@config_option
@click.option(
    "--jsonl",
    "jsonl",
    type=click.Path(exists=True, dir_okay=False, readable=True),
    default=None,
    help="Verify this JSON-lines file instead.",
)
@click.option(
    "--anchor",
    "anchors",
    multiple=True,
    metavar="INSTANCE=SEQ:HASH",
    help="A link known to be in the chain (a head an earlier verify printed): the chain must "
    "still reach it and hold that hash there. Repeatable.",
)
def audit_verify(config: Path | None, jsonl: str | None, anchors: tuple[str, ...]) -> None:
    """Check the hash chains: report the first edited, deleted, inserted or reordered record."""
    from pgguard.audit.query import parse_anchor, verify_jsonl, verify_store

    known = {}
    for text in anchors:
        try:
            instance_id, head = parse_anchor(text)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--anchor") from None
        known[instance_id] = head
    if jsonl:
        try:
            ok, report = verify_jsonl(jsonl, known)
        except OSError as exc:
            _fail(f"cannot read {click.format_filename(jsonl)}: {exc.strerror or exc}")
    else:
        with _reading_store(config) as store:
            ok, report = verify_store(store, known)
    click.echo(report, nl=False)
    sys.exit(0 if ok else 1)


@main.group()
def sessions() -> None:
    """Recorded sessions."""


@sessions.command("list")
@config_option
@click.option("--user", default=None)
@click.option("--since", default=None, callback=_time_option, help=_TIME_HELP)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def sessions_list(
    config: Path | None, user: str | None, since: float | None, limit: int, as_json: bool
) -> None:
    """List recorded sessions, newest first."""
    from pgguard.audit.query import json_line, search_page
    from pgguard.audit.sessions import session_rows

    with _reading_store(config) as store:
        starts, more = search_page(
            store, since=since, user=user, event="session_start", limit=limit, order="desc"
        )
    if as_json:
        click.echo("".join(json_line(r) + "\n" for r in starts), nl=False)
    else:
        click.echo(session_rows(starts, more=more), nl=False)
    _more_note(more, as_json)


@sessions.command("show")
@config_option
@click.argument("session_id")
def sessions_show(config: Path | None, session_id: str) -> None:
    """Replay a session as a psql-like transcript."""
    from pgguard.audit.sessions import transcript

    with _reading_store(config) as store:
        records = store.search(session_id=session_id, order="asc")
    if not records:
        click.echo(f"no session {session_id!r} in the audit trail", err=True)
        sys.exit(1)
    click.echo(transcript(records))


@main.group()
def approvals() -> None:
    """List, approve and deny held statements; list and revoke approval windows.

    Deciding needs your JWT (--token or $PGGUARD_TOKEN), validated with the configured
    identity settings: the same rules as the admin API (only the rule's approver groups,
    never your own request)."""


token_option = click.option(
    "--token",
    envvar="PGGUARD_TOKEN",
    default=None,
    help="Your JWT (default: $PGGUARD_TOKEN, preferred: a command line is visible to others).",
)


@contextlib.contextmanager
def _approval_store(settings: Settings) -> Iterator[Any]:
    """The approvals (in the audit store), with the audit store's one-line errors."""
    from pgguard.approvals.store import ApprovalStore

    if not settings.audit.url:
        _fail("audit.url is not configured: approvals live in the audit store")
    with _opened(lambda url: ApprovalStore(url, migrate=False), settings.audit.url) as store:
        yield store


def _decider(settings: Settings, token: str | None) -> Any:
    """The identity of the person deciding, validated exactly as the admin API does."""
    import asyncio

    from pgguard.identity import IdentityConfigError, TokenError, TokenValidator

    if not token or not token.strip():
        click.echo("a token is required to decide: --token or $PGGUARD_TOKEN", err=True)
        sys.exit(2)
    try:
        validator = TokenValidator(settings.identity)
    except IdentityConfigError as exc:
        click.echo(f"identity configuration: {exc}", err=True)
        sys.exit(2)
    try:
        return asyncio.run(validator.validate(token.strip()))
    except TokenError as exc:
        click.echo(f"token refused: {exc}", err=True)
        sys.exit(1)


def _announce(settings: Settings, request: Any) -> None:
    """Send the "decided" webhook, as the API does, and wait (briefly) for its delivery."""
    from pgguard.approvals.webhook import WebhookNotifier

    url = settings.approvals.webhook_url
    if not url:
        return
    try:
        notifier = WebhookNotifier(url)
    except ValueError as exc:
        click.echo(f"warning: {exc}; no notification sent", err=True)
        return
    notifier.notify("decided", request)
    notifier.close(timeout=10.0)


@approvals.command("list")
@config_option
@click.option(
    "--status",
    type=click.Choice(["pending", "decided", "all", "approved", "denied", "expired", "withdrawn"]),
    default="pending",
    show_default=True,
)
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def approvals_list(config: Path | None, status: str, limit: int, as_json: bool) -> None:
    """List approval requests, newest first."""
    import time

    from pgguard.approvals.display import request_table

    with _approval_store(_load(config)) as store:
        requests = store.list(status, limit)
    if as_json:
        click.echo(
            "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in requests), nl=False
        )
    else:
        click.echo(request_table(requests, time.time()), nl=False)


def _decide(
    config: Path | None,
    request_id: str,
    approve: bool,
    reason: str | None,
    window: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    import time

    from pgguard.approvals.display import request_detail
    from pgguard.approvals.model import ApprovalError
    from pgguard.approvals.rules import parse_window

    settings = _load(config)
    try:
        seconds = parse_window(window)
    except ApprovalError as exc:
        raise click.BadParameter(str(exc), param_hint="--for") from None
    who = _decider(settings, token)
    with _approval_store(settings) as store:
        try:
            decided = store.decide(request_id, approve, who.user, who.groups, reason, seconds)
        except ApprovalError as exc:
            click.echo(f"refused: {exc}", err=True)
            sys.exit(1)
    _announce(settings, decided)
    if as_json:
        click.echo(json.dumps(decided.to_dict(), sort_keys=True))
    else:
        click.echo(request_detail(decided, time.time()), nl=False)


@approvals.command("approve")
@config_option
@click.argument("request_id")
@click.option("--reason", default=None, help="Why (shown to the requester and in the audit).")
@click.option(
    "--for",
    "window",
    default=None,
    help="Also grant a window, e.g. 30m: the same user and "
    "rule run without asking again until it ends.",
)
@token_option
@click.option("--json", "as_json", is_flag=True)
def approvals_approve(
    config: Path | None,
    request_id: str,
    reason: str | None,
    window: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Approve a held statement: it runs."""
    _decide(config, request_id, True, reason, window, token, as_json)


@approvals.command("deny")
@config_option
@click.argument("request_id")
@click.option("--reason", required=True, help="Why: the client's error message carries it.")
@token_option
@click.option("--json", "as_json", is_flag=True)
def approvals_deny(
    config: Path | None, request_id: str, reason: str, token: str | None, as_json: bool
) -> None:
    """Deny a held statement: the client gets 42501 with the reason."""
    _decide(config, request_id, False, reason, None, token, as_json)


@approvals.command("windows")
@config_option
@click.option("--all", "show_all", is_flag=True, help="Also revoked and finished windows.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def approvals_windows(config: Path | None, show_all: bool, as_json: bool) -> None:
    """List approval windows (active ones unless --all), newest first."""
    import time

    from pgguard.approvals.display import window_table

    now = time.time()
    with _approval_store(_load(config)) as store:
        windows = store.windows(not show_all, now)
    if as_json:
        click.echo(
            "".join(json.dumps(w.to_dict(), sort_keys=True) + "\n" for w in windows), nl=False
        )
    else:
        click.echo(window_table(windows, now), nl=False)


@approvals.command("revoke")
@config_option
@click.argument("window_id")
@token_option
def approvals_revoke(config: Path | None, window_id: str, token: str | None) -> None:
    """Revoke an approval window (the rule's approvers only)."""
    from pgguard.approvals.model import ApprovalError

    settings = _load(config)
    who = _decider(settings, token)
    with _approval_store(settings) as store:
        try:
            window = store.revoke_window(window_id, who.user, who.groups)
        except ApprovalError as exc:
            click.echo(f"refused: {exc}", err=True)
            sys.exit(1)
    click.echo(f"window {window.id} revoked")


@main.command()
@click.option("--port", type=int, default=6432, help="Gateway port (0: any free port).")
@click.option("--keep-running/--exit-after-start", default=True, hidden=True)
def demo(port: int, keep_running: bool) -> None:
    """Start an embedded PostgreSQL with pgguard in front of it, and print how to connect."""
    from pgguard.demo import run_demo

    sys.exit(run_demo(port=port, keep_running=keep_running))


@main.command("config-path", hidden=True)
def config_path() -> None:
    click.echo(str(default_config_path()))


if __name__ == "__main__":
    main()
