"""Building audit records from what a session knows. Pure: no I/O, no awaits."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from pgguard.audit.records import AuditRecord, EventKind, PromptSource
from pgguard.audit.text import encode_params, fingerprint, prompt_id_from_comment, redact_secrets
from pgguard.identity import Identity
from pgguard.policy.facts import StatementFacts
from pgguard.protocol.statements import StatementRun

_REFUSAL = re.compile(r"^pgguard: ([^:]+): ")
_SET_PROMPT = re.compile(
    r"^\s*set\s+(?:session\s+|local\s+)?pgguard\.prompt_id\s*(?:=|to)\s*'((?:[^']|'')*)'\s*;?\s*$",
    re.IGNORECASE,
)
_RESET_PROMPT = re.compile(r"^\s*reset\s+pgguard\.prompt_id\s*;?\s*$", re.IGNORECASE)


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
    set_prompt_id: str | None = None

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
        if self.set_prompt_id:
            return self.set_prompt_id, "set"
        if self.startup_prompt_id:
            return self.startup_prompt_id, "startup"
        if self.identity is not None and self.identity.prompt_id:
            return self.identity.prompt_id, "jwt"
        return None, None

    def note_statement(self, run: StatementRun) -> None:
        """Follow ``SET pgguard.prompt_id`` (once it has succeeded)."""
        if run.sqlstate is not None or not run.executed:
            return
        if "prompt_id" not in run.statement:
            return
        match = _SET_PROMPT.match(run.statement)
        if match:
            self.set_prompt_id = match.group(1).replace("''", "'")[:256] or None
        elif _RESET_PROMPT.match(run.statement):
            self.set_prompt_id = None


def statement_record(
    ctx: SessionContext,
    run: StatementRun,
    facts: StatementFacts | None,
    *,
    audit_only: tuple[str, ...] = (),
    masked_columns: tuple[str, ...] = (),
    param_cap: int = 1024,
) -> AuditRecord:
    """The record of one statement run."""
    prompt_id, source = ctx.prompt(run.statement)
    decision = "allow"
    rule = None
    if run.sqlstate == "42501" and run.error:
        refused = _REFUSAL.match(run.error)
        if refused:
            decision, rule = "deny", refused.group(1)
    if decision == "allow" and audit_only:
        decision, rule = "audit_only", audit_only[0]
    objects: tuple[str, ...] = ()
    statement_class = None
    command = run.command
    if facts is not None:
        objects = tuple(dict.fromkeys((*facts.tables, *facts.functions)))
        statement_class = facts.statement_class
        command = command or facts.command
    extra: dict[str, object] = {}
    if not run.executed:
        extra["executed"] = False
    if run.error and decision != "deny":
        extra["error"] = run.error[:500]
    if run.preview is not None and (run.preview.columns or run.preview.rows):
        extra["preview"] = run.preview.to_dict()
    return ctx.base(
        "statement",
        ts=run.started,
        prompt_id=prompt_id,
        prompt_source=source,
        protocol=run.protocol if run.protocol in ("simple", "extended") else None,
        statement_name=run.statement_name,
        portal=run.portal,
        statement=redact_secrets(run.statement),
        fingerprint=fingerprint(run.statement),
        params=encode_params(run.params, run.param_formats, param_cap),
        class_=statement_class,
        command=command,
        objects=objects,
        decision=decision,
        rule=rule,
        masked_columns=masked_columns,
        rows=run.rows,
        sqlstate=run.sqlstate,
        duration_ms=run.duration_ms,
        extra=extra,
    )
