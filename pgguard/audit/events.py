"""Building audit records from what a session knows. Pure: no I/O, no awaits."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import cast

from pglast import parse_sql
from pglast.enums.parsenodes import TransactionStmtKind
from pglast.parser import ParseError

from pgguard.audit.recording import RawPreview
from pgguard.audit.records import AuditRecord, DecisionKind, EventKind, PlainExtra, PromptSource
from pgguard.audit.text import (
    clean_prompt_id,
    encode_params,
    fingerprint,
    prompt_id_from_comment,
    prompt_setting,
    redact_literals,
    redact_secrets,
    scrub_error,
)
from pgguard.identity import Identity
from pgguard.policy.facts import StatementFacts
from pgguard.policy.guard import literal_free
from pgguard.protocol.statements import StatementRun

_QUOTED = re.compile(r'"(?:[^"]|"")*"')


@dataclass
class SessionContext:
    """Who and where: the fields every record of one session shares."""

    instance_id: str
    session_id: str
    client_addr: str
    database: str | None = None
    application_name: str | None = None
    upstream_role: str | None = None
    identity: Identity | None = None
    user: str | None = None  # the startup user, before (or without) a valid token
    startup_prompt_id: str | None = None
    set_prompt_id: str | None = None  # by SET (or set_config) for the session
    refused_batch: tuple[int, str] | None = None  # (batch, rule) of the last refusal
    # The transaction block (BEGIN … COMMIT/ROLLBACK): the session's SET value when it began
    # (a ROLLBACK restores it), and a SET LOCAL value for the rest of it ((None,): the default).
    in_block: bool = False
    block_prompt_id: str | None = None
    local_prompt_id: tuple[str | None] | None = None

    def decision(
        self, run: StatementRun, audit_only: tuple[str, ...] = ()
    ) -> tuple[DecisionKind, str | None]:
        """:func:`statement_decision`, and for the statements a refusal kept from running
        (the rest of a refused multi-statement Query, which runs as a unit) ``deny`` with
        the same rule: pgguard, not the server, stopped them."""
        decision, rule = statement_decision(run, audit_only)
        if run.refused is not None:
            self.refused_batch = (run.batch, run.refused[0])
        elif not run.executed and self.refused_batch is not None:
            batch, refused_rule = self.refused_batch
            if batch == run.batch:
                return "deny", refused_rule
        return decision, rule

    def base(self, event: EventKind, **fields: object) -> AuditRecord:
        ident = self.identity
        ts = fields.pop("ts", None)
        return AuditRecord(
            event=event,
            ts=time.time() if ts is None else float(ts),  # type: ignore[arg-type]
            instance_id=self.instance_id,
            session_id=self.session_id,
            user=ident.user if ident else self.user,
            email=ident.email if ident else None,
            groups=ident.groups if ident else (),
            agent=ident.agent if ident else None,
            client_addr=self.client_addr,
            application_name=self.application_name,
            database=self.database,
            upstream_role=self.upstream_role,
            **fields,  # type: ignore[arg-type]
        )

    def prompt(self, statement: str) -> tuple[str | None, PromptSource | None]:
        """Prompt id, most specific first: comment, SET, startup options, token claim."""
        from_comment = prompt_id_from_comment(statement)
        if from_comment:
            return from_comment, "comment"
        local = self.local_prompt_id
        if local is not None and local[0]:
            return local[0], "set"
        if self.set_prompt_id and local is None:
            return self.set_prompt_id, "set"
        if self.startup_prompt_id:
            cleaned = clean_prompt_id(self.startup_prompt_id)
            if cleaned:
                return cleaned, "startup"
        if self.identity is not None and self.identity.prompt_id:
            cleaned = clean_prompt_id(self.identity.prompt_id)
            if cleaned:
                return cleaned, "jwt"
        return None, None

    def note_statement(self, run: StatementRun) -> None:
        """Follow what a statement that ran did to ``pgguard.prompt_id``: SET (LOCAL), RESET,
        set_config, RESET ALL, DISCARD ALL, and the transaction block around them (a
        ROLLBACK undoes a SET made in the block; LOCAL ends with the block). ROLLBACK TO
        SAVEPOINT keeps the value as it is (the savepoint's is not followed)."""
        if run.sqlstate is not None or not run.executed:
            return  # did nothing (an aborted block is undone by its ROLLBACK)
        tag = run.command_tag
        if tag in _BLOCK_START:
            if not self.in_block:
                self.in_block, self.block_prompt_id = True, self.set_prompt_id
            return
        if tag in _BLOCK_END:  # COMMIT of a failed block says ROLLBACK
            if tag != "ROLLBACK" or not _rolls_back_to_savepoint(run.statement):
                if tag == "ROLLBACK" and self.in_block:
                    self.set_prompt_id = self.block_prompt_id
                self.in_block, self.local_prompt_id = False, None
            return
        effect = prompt_setting(run.statement)
        if effect is None:
            return
        kind, value, local = effect
        if kind == "unknown":
            value = None  # not known from the text: the next source says
        if local:
            if self.in_block:  # outside one, SET LOCAL does nothing
                self.local_prompt_id = (value if kind == "set" else None,)
            return
        self.set_prompt_id = value
        self.local_prompt_id = None  # a session-level SET overrides a LOCAL one


_BLOCK_START = frozenset(("BEGIN", "START TRANSACTION"))
_BLOCK_END = frozenset(("COMMIT", "ROLLBACK", "PREPARE TRANSACTION"))


def _rolls_back_to_savepoint(sql: str) -> bool:
    if " to " not in sql.lower().replace("\n", " ").replace("\t", " "):
        return False
    try:
        stmts = parse_sql(sql)
    except ParseError:
        return True  # unsure: keep the value as it is
    return any(
        getattr(s.stmt, "kind", None) == TransactionStmtKind.TRANS_STMT_ROLLBACK_TO for s in stmts
    )


def statement_decision(
    run: StatementRun, audit_only: tuple[str, ...] = ()
) -> tuple[DecisionKind, str | None]:
    """The decision and rule a statement's record carries: how pgguard refused it (``deny``,
    or ``approval_denied`` / ``approval_expired``; the relay marks the runs it refused, so no
    error text can pass for a refusal), ``audit_only`` when such a rule matched, else
    ``allow``."""
    if run.refused is not None:
        rule, decision, _ = run.refused
        return cast(DecisionKind, decision), rule
    if audit_only:
        return "audit_only", audit_only[0]
    return "allow", None


@dataclass(frozen=True, slots=True)
class RecordOptions:
    """How statement texts and parameters are written (``audit.*``)."""

    param_cap: int = 1024
    redact_literals: bool = False
    redact_params: bool = False


_CACHED_TEXT_MAX = 4096  # longer statement texts are not kept in the caches below


class Fingerprints:
    """pglast fingerprints, cached by literal-free text (statements that differ only in
    numbers share one; pgbench and ORMs send a new literal every time), else by the exact
    text (a parameterised statement comes back verbatim with every execution)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._cache: dict[str, str | None] = {}

    def __call__(self, sql: str) -> str | None:
        return self.by_shape(sql, literal_free(sql))

    def by_shape(self, sql: str, key: str | None) -> str | None:
        """``key``: ``literal_free(sql)``, when the caller has it already. (A literal-free key
        never equals a text that is not literal-free: it holds no quote, ``$`` or ``::``.)"""
        if key is None:
            if len(sql) > _CACHED_TEXT_MAX:
                return fingerprint(sql)  # long texts are rarely repeated: not worth keeping
            key = sql
        try:
            return self._cache[key]
        except KeyError:
            pass
        value = fingerprint(sql)
        if len(self._cache) >= self.size:
            self._cache.clear()
        self._cache[key] = value
        return value


class Redactions:
    """:func:`redact_secrets` of texts that hold strings or parameters, cached by text (the
    same statement comes back with every execution; the redaction is a scan of it)."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._cache: dict[str, str | None] = {}  # None: nothing to redact

    def __call__(self, sql: str) -> str:
        """The redacted text; ``sql`` itself (the same object) when nothing is redacted."""
        try:
            known = self._cache[sql]
        except KeyError:
            redacted = redact_secrets(sql)
            known = None if redacted == sql else redacted
            if len(sql) <= _CACHED_TEXT_MAX:  # long texts are rarely repeated
                if len(self._cache) >= self.size:
                    self._cache.clear()
                self._cache[sql] = known
        return sql if known is None else known


def statement_record(
    ctx: SessionContext,
    run: StatementRun,
    *,
    statement_class: str | None = None,
    objects: tuple[str, ...] = (),
    command: str | None = None,
    audit_only: tuple[str, ...] = (),
    approval: tuple[str, str] | None = None,
    options: RecordOptions = RecordOptions(),
    fingerprints: Fingerprints | None = None,
    redactions: Redactions | None = None,
) -> AuditRecord:
    """The record of one statement run. ``statement_class``, ``objects`` and ``command``
    come from the guard's analysis (when there is one); ``approval`` is the approval the
    statement ran under: (request id, the rule that asked for it)."""
    prompt_id, source = ctx.prompt(run.statement)
    decision, rule = ctx.decision(run, audit_only)
    approval_id = None
    if approval is not None and decision == "allow":
        approval_id, rule = approval
        decision = "approved"
    elif run.refused is not None:
        approval_id = run.refused[2]
    extra = PlainExtra()  # str keys, JSON values: see its docstring
    if not run.executed:
        extra["executed"] = False
    if run.command_tag == "SUSPENDED":
        extra["suspended"] = True  # the portal stopped at its row limit; rows: those sent
    error = run.error
    if error and options.redact_literals and (run.sqlstate or "").startswith("22"):
        # Data exceptions quote the offending input: 'invalid input syntax for type
        # integer: "abc"'.
        error = _QUOTED.sub('"?"', error)
    sql = run.statement
    shape = literal_free(sql)
    if shape is None:  # plain texts hold no string, so no secret
        sql = redact_secrets(sql) if redactions is None else redactions(sql)
    if options.redact_literals:
        sql = redact_literals(sql)
    if error and sql is not run.statement:
        error = scrub_error(error, run.statement, sql)  # it may quote what was redacted
    if error:
        extra["error"] = error[:500]  # a refusal's too: the message the client got
    recorded = run.preview
    if isinstance(recorded, RawPreview):  # as the relay kept it: decoded here
        recorded = recorded.decoded()
    if recorded is not None and (recorded.columns or recorded.rows):
        preview = recorded.to_dict()
        if sql is not run.statement:
            preview["statement"] = sql
        if error is not run.error and preview.get("error"):
            preview["error"] = {**preview["error"], "message": error}
        extra["preview"] = preview
    return ctx.base(
        "statement",
        ts=run.started,
        prompt_id=prompt_id,
        prompt_source=source,
        protocol=run.protocol if run.protocol in ("simple", "extended") else None,
        statement_name=run.statement_name,
        portal=run.portal,
        statement=sql,
        fingerprint=fingerprint(run.statement)
        if fingerprints is None
        else fingerprints.by_shape(run.statement, shape),
        params=encode_params(
            run.params,
            run.param_formats,
            options.param_cap,
            redact_params=options.redact_params,
        ),
        class_=statement_class,
        command=run.command or command,
        objects=objects,
        decision=decision,
        rule=rule,
        approval_id=approval_id,
        masked_columns=run.masked_columns,
        rows=run.rows,
        sqlstate=run.sqlstate,
        duration_ms=run.duration_ms,
        extra=extra,
    )


def described(facts: StatementFacts | None) -> tuple[str | None, tuple[str, ...], str | None]:
    """``(statement_class, objects, command)`` of a statement's facts, for its record."""
    if facts is None:
        return None, (), None
    objects = tuple(dict.fromkeys((*facts.tables, *facts.functions)))
    return facts.statement_class, objects, facts.command


class RecordBuilder:
    """The writer process's side of the pipe: sessions by id, and their statement records."""

    def __init__(self, options: RecordOptions = RecordOptions()) -> None:
        self.options = options
        self.sessions: dict[str, SessionContext] = {}
        self.fingerprints = Fingerprints()
        self.redactions = Redactions()

    def session(self, ctx: SessionContext) -> None:
        self.sessions[ctx.session_id] = ctx

    def redacted(self, record: AuditRecord) -> AuditRecord:
        """A record made elsewhere (an approval request or decision carries its statement
        and parameters) with the same ``redact_literals`` / ``redact_params`` as statements."""
        options = self.options
        changes: dict[str, object] = {}
        if options.redact_literals and record.statement:
            changes["statement"] = redact_literals(record.statement)
        if options.redact_params and record.params:
            changes["params"] = tuple(None if v is None else "***" for v in record.params)
        return replace(record, **changes) if changes else record  # type: ignore[arg-type]

    def forget(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def statement(
        self,
        session_id: str,
        run: StatementRun,
        described: tuple[str | None, tuple[str, ...], str | None, tuple[str, ...]],
        approval: tuple[str, str] | None,
    ) -> AuditRecord:
        """``described`` = ``(statement_class, objects, command, audit_only)``."""
        ctx = self.sessions.get(session_id)
        if ctx is None:  # never announced (or already forgotten): recorded with what is known
            ctx = SessionContext("", session_id, "")
        ctx.note_statement(run)
        statement_class, objects, command, audit_only = described
        return statement_record(
            ctx,
            run,
            statement_class=statement_class,
            objects=objects,
            command=command,
            audit_only=audit_only,
            approval=approval,
            options=self.options,
            fingerprints=self.fingerprints,
            redactions=self.redactions,
        )
