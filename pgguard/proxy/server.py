"""The one module that owns sockets: listener, handshake, relay loop, cancel map, drain.

The hot path is asyncio ``Protocol`` callbacks (on uvloop when installed): bytes from one
side go through the sans-IO ``RelayCore`` and out to the other side in one write, with no
``await`` per message. Back-pressure pauses reading from one side while the other side's
write buffer is full, so a slow client never makes pgguard hold a whole result.
anyio drives the structure around it: the task group, signals, timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import secrets
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from pgguard.approvals.model import ApprovalRequest
from pgguard.audit.events import SessionContext, described
from pgguard.audit.link import WriterConfig
from pgguard.audit.records import AuditRecord
from pgguard.audit.store import open_stores
from pgguard.audit.text import encode_params, prompt_id_from_comment
from pgguard.config import Settings
from pgguard.identity import Identity, TokenError, TokenValidator
from pgguard.masking.plan import MaskerCache, mask_type_problems
from pgguard.masking.planner import LineageCache, SessionPlanner
from pgguard.masking.session import SessionMasking
from pgguard.metrics import Tally
from pgguard.policy.catalog import CATALOG_SQL, effective_search_path, snapshot_from_rows
from pgguard.policy.engine import limits_for
from pgguard.policy.guard import GuardState, SessionGuard, literal_free, policy_in_force
from pgguard.policy.identity_guard import Hold, PromptSync, Refusal
from pgguard.policy.loader import check_policy_files
from pgguard.policy.model import Policy
from pgguard.protocol import messages as m
from pgguard.protocol.auth import AuthFailed, ScramClient, md5_password
from pgguard.protocol.framing import MessageReader, StartupReader
from pgguard.protocol.relay import (
    IDLE_TIMEOUT,
    SHUTTING_DOWN,
    TOKEN_EXPIRED,
    Counted,
    Fatal,
    RelayCore,
)
from pgguard.protocol.startup import StartupRefused, build_upstream_startup
from pgguard.protocol.statements import StatementRun, StatementTracker, split_statements
from pgguard.proxy.audit_link import AuditLink
from pgguard.proxy.holds import ApprovalBroker, verdict_for

log = logging.getLogger("pgguard.proxy")

# Strict audit: once this much output is held (past a statement's CommandComplete, waiting
# for its record), the upstream's reading stops until it is released.
HELD_RESULT_BYTES = 256 * 1024
# A client gone mid-request: how long its statements' outcomes are waited for (after a cancel).
_OUTCOME_WAIT_S = 10.0
OUTCOME_UNKNOWN = (
    "08006",
    "pgguard: the client disconnected before the outcome was known; the statement may have run",
)
INTERNAL_ERROR = Fatal("XX000", "pgguard: internal error")  # a bug ends only its session
AUDIT_UNAVAILABLE = Refusal(
    "audit", "the audit store is unavailable; statements are refused until it recovers"
)

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


class SessionEnded(Exception):
    """The session cannot go on; ``fatal`` (if any) has been or should be sent."""

    def __init__(self, fatal: Fatal | None = None) -> None:
        super().__init__(fatal.message if fatal else "session ended")
        self.fatal = fatal


@dataclass(frozen=True, slots=True)
class CancelTarget:
    """Where to send a CancelRequest for one upstream backend."""

    host: str
    port: int
    process_id: int
    secret_key: int
    session: Session | None = field(default=None, compare=False)


class Side(asyncio.Protocol):
    """One socket of a session. Buffers input during the handshake; relays it afterwards."""

    def __init__(self, name: str, on_connect: Callable[[Side], None] | None = None) -> None:
        self.name = name
        self._on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self.on_data: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[Side], None] | None = None
        self.on_pause: Callable[[bool], None] | None = None
        self.closed = False
        self._chunks: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(_HIGH_WATER, _LOW_WATER)
        if self._on_connect is not None:
            self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
            return
        self._chunks.append(data)
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._eof = True
        self._wake()
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(True)

    def resume_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(False)

    # --- handshake helpers
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def recv(self) -> bytes:
        """The next chunk received, or b'' at end of stream."""
        while not self._chunks:
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    def unread(self, data: bytes) -> None:
        if data:
            self._chunks.insert(0, data)

    def take_buffered(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def read_message(side: Side, reader: MessageReader) -> tuple[bytes, bytes]:
    """The next whole message from ``side``; SessionEnded at end of stream."""
    while True:
        msg = reader.next_message()
        if msg is not None:
            return msg
        data = await side.recv()
        if not data:
            raise SessionEnded()
        reader.feed(data)


def fatal_bytes(sqlstate: str, message: str) -> bytes:
    return Fatal(sqlstate, message).encode()


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class SessionInfo:
    """What the gateway knows about a live session (for drain, cancel and logs)."""

    session_id: str
    client_addr: str
    user: str | None = None
    database: str | None = None
    started: float = field(default_factory=time.time)


STALE_REFRESH_INTERVAL = 5.0
_SETS_PROMPT = re.compile(r"\b(set|reset)\b[^;]*\bpgguard\.prompt_id\b", re.I)
_RESETS_ALL = re.compile(r"\b(reset|discard)\s+all\b", re.I)
# set_config and its first argument when that is a plain string constant.
_SET_CONFIG = re.compile(r"\bset_config\s*\(\s*('(?:[^']|'')*')?", re.I)


def prompt_effect(sql: str) -> Literal["sets", "resets"] | None:
    """What ``sql`` may do to ``pgguard.prompt_id`` itself: ``sets`` (SET or RESET of it, a
    set_config whose name is it or not a constant), ``resets`` (RESET ALL, DISCARD ALL: back to
    the session's startup value), or nothing (a set_config of another setting, such as a
    row-level security key, leaves it alone)."""
    if _SETS_PROMPT.search(sql):
        return "sets"
    for call in _SET_CONFIG.finditer(sql):
        name = call.group(1)
        if name is None or name[1:-1].replace("''", "'").strip().lower() == "pgguard.prompt_id":
            return "sets"
    return "resets" if _RESETS_ALL.search(sql) else None


# Injected into a client's batch (the prompt id is a parameter, never part of the text).
_SET_PROMPT = "select pg_catalog.set_config('pgguard.prompt_id', $1, false)"
# Statements that must come before any query of their transaction, or run outside a
# transaction or pipeline: a set_config injected before one would make it fail, so it keeps
# the prompt id upstream as it is. A rough test (leading comments skipped), on the rare path
# of a prompt id changed in the middle of a batch.
_NOT_AFTER_A_QUERY = re.compile(
    r"(?:\s|/\*(?:[^*]|\*(?!/))*\*/|--[^\n]*(?:\n|$))*"  # one way to match: no backtracking
    r"(?:vacuum|cluster|reindex|discard|alter\s+system|set\s+transaction"
    r"|(?:create|alter|drop)\s+(?:database|tablespace|subscription)"
    r"|create\s+(?:unique\s+)?index\s+concurrently|drop\s+index\s+concurrently"
    r"|(?:commit|rollback)\s+prepared)\b",
    re.I,
)
MASKS_CHANGED = Refusal(
    "masking", "the masks for this session changed; run the statement again", "40001"
)


def _log_mask_fallback(function: object, type_oid: int, reason: str) -> None:
    log.info(
        "mask %s does not apply to type oid %s (%s): redacted instead", function, type_oid, reason
    )


_ONE_UNKNOWN = (("unknown", "allow"),)
_KINDS_CACHE = 4096


class Session:
    """One client connection: handshake, upstream login, then the relay."""

    def __init__(self, gateway: Gateway, client: Side) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.client = client
        self.upstream: Side | None = None
        self.core = RelayCore(self.settings.limits.max_message_bytes)
        peer = client.transport.get_extra_info("peername") if client.transport else None
        addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local")
        self.info = SessionInfo(session_id=secrets.token_hex(8), client_addr=addr)
        self.identity: Identity | None = None
        self.guard: SessionGuard | None = None
        self.guard_ready = False  # the catalog and search_path are known to the guard
        self.role_mapped = False
        self.key: tuple[int, int] | None = None
        self.tls = False
        self.last_active = time.monotonic()
        self._expiry_handle: asyncio.TimerHandle | None = None
        self._done = asyncio.get_running_loop().create_future()
        self.audit = gateway.audit
        self.audit_ctx = SessionContext(gateway.instance_id, self.info.session_id, addr)
        self._awaiting = 0  # statement records not yet durable (strict mode)
        self._held: list[bytes] | None = None  # client output held until they are
        self._stall_timer: asyncio.TimerHandle | None = None
        self._held_bytes = 0
        self._upstream_paused = False  # by a held result (strict audit)
        self._client_paused = False  # the client's socket is not keeping up
        self.outcome = "aborted"  # metrics: pgguard_connections_total{result}
        self._approval: ApprovalRequest | None = None  # the request of a held statement
        self._held_text = ""
        self._session_recorded = False  # its session_start record was written
        # (SQL, request id, rule) approved to run
        self._approved: tuple[str, str, str] | None = None
        self._upstream_prompt: str | None = None  # pgguard.prompt_id on the upstream session
        # ... and the session's own (startup options or token), which statements without a
        # prompt comment run under; None once the client sets it itself (then unknown).
        self._base_prompt: str | None = None
        # pgguard set it inside a transaction block: a ROLLBACK undoes that, so once the
        # session is idle again the value upstream is not known (set again when needed).
        self._prompt_in_block = False
        # Statement metrics without the audit: (class, decision if let run) of each statement
        # of a text, valid for one guard epoch.
        self._kinds: dict[bytes | str, tuple[tuple[str, str], ...]] = {}  # by text or shape
        self._kinds_epoch = -1
        self._last_kinds: tuple[bytes | None, tuple[tuple[str, str], ...], int] = (None, (), -1)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        try:
            timeout = self.settings.limits.auth_timeout or None
            try:
                async with asyncio.timeout(timeout):
                    started = await self._handshake()
            except TimeoutError:
                self._send_fatal(Fatal("08006", "pgguard: authentication timed out"))
                return
            if not started:
                return
            self.outcome = "accepted"
            self.gateway.tally.connection("accepted")
            self._start_relay()
            await self._done
        except SessionEnded as exc:
            if exc.fatal is not None:
                self._send_fatal(exc.fatal)
        except m.ProtocolError as exc:
            self._send_fatal(Fatal(exc.sqlstate, f"pgguard: {exc}"))
        finally:
            if self.outcome != "accepted":
                self.gateway.tally.connection(self.outcome)
            self._teardown()

    def _auth_failure(self, reason: str, refusal: Fatal | None = None) -> None:
        """A login refused: counted, and recorded with what the client was told."""
        self.outcome = "auth_failed"
        self.gateway.auth_failed(reason)
        extra: dict[str, object] = {"reason": reason}
        if refusal is not None:
            extra["error"] = refusal.message
        sqlstate = refusal.sqlstate if refusal is not None else None
        self._audit(self.audit_ctx.base("auth_failure", sqlstate=sqlstate, extra=extra))

    def _audit(self, record: AuditRecord) -> None:
        """Submit a non-statement record (never held for)."""
        if self.audit is not None:
            self.audit.submit(record)

    def _send_fatal(self, fatal: Fatal) -> None:
        self.client.write(fatal.encode())

    def _teardown(self) -> None:
        if self._expiry_handle is not None:
            self._expiry_handle.cancel()
        if self._approval is not None and self.gateway.approvals is not None:
            self._spawn(self.gateway.approvals.withdraw(self._approval.id, "client disconnected"))
            self._approval = None
        if self.key is not None:
            self.gateway.cancel_map.pop(self.key, None)
        if self.upstream is not None:
            if not self.upstream.closed and self.core.terminated is False:
                # Tell the server we are leaving rather than just dropping the socket.
                self.upstream.write(m.Terminate().encode())
            self.upstream.close()
        self.client.close()
        if self.identity is not None:
            log.info(
                "session end",
                extra={"session_id": self.info.session_id, "user": self.info.user},
            )
        if self.core.tracker is not None and self.audit is not None:
            unknown = self.core.tracker.abandon(time.time(), *OUTCOME_UNKNOWN)
            if unknown:
                try:
                    self._record_runs(unknown, wait=False)
                except Exception:
                    log.exception("audit record failed", extra={"session_id": self.info.session_id})
        if self._session_recorded:
            self._audit(self.audit_ctx.base("session_end"))
        elif self.identity is not None and self.outcome != "auth_failed":
            # Logged in but never relayed (e.g. the upstream refused it): say how it ended.
            self._audit(self.audit_ctx.base("session_end", extra={"outcome": self.outcome}))
        if self.audit is not None:
            self.audit.forget(self.info.session_id)

    def finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    # ------------------------------------------------------------------ handshake
    async def _handshake(self) -> bool:
        limits = self.settings.limits
        startup_reader = StartupReader(limits.max_startup_bytes)
        while True:
            body = startup_reader.next_packet()
            if body is None:
                data = await self.client.recv()
                if not data:
                    return False
                startup_reader.feed(data)
                continue
            packet = m.decode_startup(body)
            if isinstance(packet, m.SSLRequest):
                if startup_reader.take_buffer() or self.client.take_buffered():
                    raise m.ProtocolError("received unencrypted data after SSL request")
                if self.tls or self.gateway.server_ssl is None:
                    self.client.write(b"N")
                    continue
                self.client.write(b"S")
                await self._start_client_tls()
                continue
            if isinstance(packet, m.GSSENCRequest):
                self.client.write(b"N")
                continue
            if isinstance(packet, m.CancelRequest):
                self.outcome = "cancel"
                await self.gateway.forward_cancel(packet.process_id, packet.secret_key)
                return False
            assert isinstance(packet, m.StartupMessage)
            self.client.unread(startup_reader.take_buffer())
            return await self._authenticate(packet)

    async def _start_client_tls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.client.transport is not None and self.gateway.server_ssl is not None
        new_transport = await loop.start_tls(
            self.client.transport,
            self.client,
            self.gateway.server_ssl,
            server_side=True,
            ssl_handshake_timeout=self.settings.limits.auth_timeout or None,
        )
        if new_transport is None:
            raise SessionEnded()
        self.client.transport = new_transport
        self.tls = True

    async def _authenticate(self, startup: m.StartupMessage) -> bool:
        user = startup.param("user")
        if not user:
            raise SessionEnded(
                Fatal("28000", "no PostgreSQL user name specified in startup packet")
            )
        database = startup.param("database") or user
        self.info.user = user
        self.info.database = database
        self.audit_ctx.user = user
        self.audit_ctx.database = database
        self.audit_ctx.application_name = startup.param("application_name")

        if not self.tls and not (
            self.settings.tls.allow_plaintext_loopback and self.gateway.listener_is_loopback
        ):
            fatal = Fatal(
                "28000", "pgguard: an encrypted connection is required (use sslmode=require)"
            )
            self._auth_failure("tls_required", fatal)
            raise SessionEnded(fatal)

        if self.gateway.draining:
            self.outcome = "draining"
            raise SessionEnded(SHUTTING_DOWN)

        if startup.protocol != m.PROTOCOL_V3 or any(
            k.startswith("_pq_.") for k, _ in startup.params
        ):
            # A newer minor version or protocol options: say what we speak (3.0, no options).
            unsupported = tuple(k for k, _ in startup.params if k.startswith("_pq_."))
            self.client.write(m.NegotiateProtocolVersion(0, unsupported).encode())
        self.client.write(m.Authentication(m.Authentication.CLEARTEXT).encode())
        limit = self.settings.identity.max_token_bytes + 64
        reader = MessageReader(limit)
        try:
            type_code, body = await read_message(self.client, reader)
        except m.ProtocolError as exc:
            fatal = Fatal("28000", "pgguard: token too large")
            self._auth_failure("too_large", fatal)
            raise SessionEnded(fatal) from exc
        if type_code != b"p":
            raise m.ProtocolError(f"expected password response, got message type {type_code!r}")
        # Whatever the client pipelined behind the password belongs to the relay.
        self.client.unread(reader.take_buffer())
        token = m.PasswordMessage.decode_body(body).password.decode("utf-8", "replace")
        try:
            identity = await self.gateway.validator.validate(token)
        except TokenError as exc:
            fatal = Fatal(exc.sqlstate, f"pgguard: {exc}")
            self._auth_failure(exc.reason, fatal)
            log.warning(
                "authentication failed: %s",
                exc.reason,
                extra={"session_id": self.info.session_id, "user": user},
            )
            raise SessionEnded(fatal) from None
        if identity.user != user:
            fatal = Fatal("28000", f'pgguard: user name "{user}" does not match the token subject')
            self._auth_failure("user_mismatch", fatal)
            raise SessionEnded(fatal)
        allowed = self.settings.upstream.databases
        if allowed is not None and database not in allowed:
            fatal = Fatal("3D000", f'pgguard: database "{database}" is not served by this gateway')
            self._auth_failure("database", fatal)
            raise SessionEnded(fatal)
        self.identity = identity
        self.audit_ctx.identity = identity

        role = None
        for group, mapped in self.settings.identity.role_map.items():
            if group in identity.groups:
                role = mapped
                break
        try:
            upstream_startup = build_upstream_startup(
                startup.params,
                upstream_user=self.settings.upstream.user,
                database=database,
                identity_settings=self._pgguard_settings(identity, database),
                role=role,
            )
        except StartupRefused as exc:
            # e.g. a startup option setting pgguard.user: worth a record of its own.
            fatal = Fatal(exc.sqlstate, str(exc))
            self._auth_failure("startup_refused", fatal)
            raise SessionEnded(fatal) from None
        self.role_mapped = role is not None
        self.audit_ctx.upstream_role = role or self.settings.upstream.user
        self.audit_ctx.startup_prompt_id = upstream_startup.prompt_id
        if upstream_startup.prompt_id is not None:
            params = [
                (k, upstream_startup.prompt_id if k == "pgguard.prompt_id" else v)
                for k, v in upstream_startup.params
            ]
        else:
            params = list(upstream_startup.params)
        self._upstream_prompt = upstream_startup.prompt_id or identity.prompt_id or ""
        self._base_prompt = self._upstream_prompt
        await self._connect_upstream(m.StartupMessage(tuple(params)))
        await self._start_guard(identity, database)
        return True

    def _pgguard_settings(self, identity: Identity, database: str) -> dict[str, str]:
        """Settings pgguard puts on the upstream session: identity, and the identity's limits."""
        settings = {
            "pgguard.user": identity.user,
            "pgguard.groups": ",".join(identity.groups),
            "pgguard.prompt_id": identity.prompt_id or "",
        }
        policy = self.gateway.guard.policy
        if policy is not None:
            limits = limits_for(policy, identity, database)
            if limits.statement_timeout is not None:
                settings["statement_timeout"] = str(int(limits.statement_timeout * 1000))
            if limits.read_only:
                settings["default_transaction_read_only"] = "on"
        return settings

    async def _start_guard(self, identity: Identity, database: str) -> None:
        state = self.gateway.guard
        guard = SessionGuard(state, identity, database, role_mapped=self.role_mapped)
        if state.policy is not None:
            assert self.upstream is not None
            self.guard_ready = True
            await self.gateway.ensure_catalog(database)
            try:
                rows = await simple_query(
                    self.upstream,
                    "select current_setting('search_path'), current_user",
                    self.settings.limits.max_message_bytes,
                )
            except QueryFailed as exc:
                raise SessionEnded(
                    Fatal("08P01", f"pgguard: session setup failed: {exc}")
                ) from None
            setting, current_user = rows[0][0] or "", rows[0][1] or ""
            guard.current_user = current_user
            guard.search_path = guard.default_search_path = effective_search_path(
                setting, current_user
            )
        guard.on_limits = self._apply_row_limit
        self._apply_row_limit(guard)
        guard.on_search_path_change = self._sync_search_path
        guard.on_schema_change = self._schema_changed
        self.guard = guard
        self.core.epoch = state.epoch
        planner = SessionPlanner(self.gateway.lineage, guard)
        planner.on_stale = lambda: self.gateway.catalog_looks_stale(database)
        core = self.core
        if planner.masks:
            core.enable_masking(self._new_masking(planner))

        def judge(sql: str) -> Refusal | None:
            refusal = guard(sql)
            if refusal is None and planner.masks:
                if core.masking is None:
                    # The policy now masks columns for this identity: masking starts at the
                    # session's next idle point; until then nothing runs unmasked.
                    core.masking_wanted = self._new_masking(planner)
                    return MASKS_CHANGED
                refusal = planner.refusal(sql)
            if refusal is None and (
                "prompt_id" in sql or self._known_prompt() != self._base_prompt
            ):
                return self._prompt_sync(sql)
            return refusal

        core.hook = judge
        core.on_hold = self._on_hold

    def prepare_guard(self) -> None:
        """A policy came into force after this session started: load the catalog and learn
        the session's search_path and user (statements are judged fail-closed meanwhile)."""
        guard = self.guard
        assert guard is not None
        self.guard_ready = True
        self.gateway.schedule_catalog_refresh(guard.database)

        def learned(rows: list[tuple[str | None, ...]], error: str | None) -> None:
            if error is None and rows:
                guard.current_user = rows[0][1] or ""
                guard.default_search_path = effective_search_path(
                    rows[0][0] or "", guard.current_user
                )
                guard.search_path_confirmed(rows[0][0] or "", in_transaction=False)
                self.core.forget_verdicts()

        self.core.internal_query(
            "select current_setting('search_path'), current_user", learned, outside_transaction=True
        )

    # ------------------------------------------------------------------ approval holds
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.gateway._tasks.add(task)
        task.add_done_callback(self.gateway._tasks.discard)

    def _prompt_sync(self, sql: str) -> Refusal | None:
        """A statement whose comment names another prompt id than the upstream session's
        ``pgguard.prompt_id``, or one without a comment after such a statement (the session's
        own prompt id goes back): held while pgguard sets it (see :meth:`_sync_prompt`), so
        that a trigger sees the prompt id the statement's audit record carries."""
        effect = prompt_effect(sql)
        if effect == "sets":
            # The client sets it itself: no longer known, and no longer pgguard's to restore.
            self._upstream_prompt = self._base_prompt = None
            return None
        if effect == "resets":
            self._upstream_prompt = None  # the startup value once it ran: set again if needed
            return None
        prompt = prompt_id_from_comment(sql)
        if prompt is None:
            prompt = self._base_prompt
        if prompt is None or prompt == self._known_prompt():
            return None
        return PromptSync("prompt", prompt)

    def _known_prompt(self) -> str | None:
        """``pgguard.prompt_id`` on the upstream session as far as pgguard knows; None when it
        does not (a batch it injected a set_config into is over but not answered yet; a
        transaction block it set it in has ended, maybe rolled back)."""
        core = self.core
        if core.injected_in_flight or (self._prompt_in_block and core.status == b"I"):
            return None
        return self._upstream_prompt

    def _sync_prompt(self, prompt: str, sql: str) -> None:
        """Set ``pgguard.prompt_id`` upstream, then let the held statement run: at the start
        of a batch, with a query of pgguard's own (where it cannot deadlock: nothing of
        pgguard's own queued, no failed transaction); within a batch (or while pgguard's own
        query runs), with a statement injected into it just before the held message (where
        pgguard can tell its replies apart, see ``RelayCore.can_inject``). Otherwise the
        statement (``sql``) runs at once and its audit record still carries the prompt id."""
        core = self.core
        if prompt == self._known_prompt():
            self._release_hold(None)
            return
        value = prompt.replace("\x00", "")[:256]
        if not core.internal_clear():
            # ASCII only: valid in any client encoding, so the injected statement cannot
            # fail on it (its error would fail the client's statement).
            if value.isascii() and core.can_inject() and not _NOT_AFTER_A_QUERY.match(sql):
                core.inject(_SET_PROMPT, (value,), self._prompt_settled)
                # The client's statements after it in the batch run only if it did. The
                # batch may open a transaction block and roll it back: known until idle.
                self._upstream_prompt = prompt
                self._prompt_in_block = core.forget_at_idle = True
                core.forget_verdicts()
            self._release_hold(None)
            return
        literal = value.replace("'", "''")

        def done(_rows: list[tuple[str | None, ...]], error: str | None) -> None:
            if error is None:
                self._prompt_in_block = core.status != b"I"
                if self._prompt_in_block:
                    core.forget_at_idle = True
                if prompt != self._upstream_prompt:
                    self._upstream_prompt = prompt
                    # Verdicts remembered per text were given under the previous prompt id
                    # (None for texts without a comment, which may now need it restored).
                    core.forget_verdicts()
            self._release_hold(None)

        core.internal_query(
            f"select pg_catalog.set_config('pgguard.prompt_id', '{literal}', false)", done
        )
        if core.internal_now() and self.upstream is not None and self.upstream.transport:
            self.upstream.transport.write(b"".join(core.server_out))
            core.server_out.clear()

    def _prompt_settled(self, landed: bool) -> None:
        """The batch a prompt id was injected into got its ReadyForQuery. If the set_config
        did not run, or the batch failed after it (an error rolls it back), the value upstream
        is not known: the next statement sets it again."""
        if not landed and self._upstream_prompt is not None:
            self._upstream_prompt = None
            self.core.forget_verdicts()

    def _on_hold(self, hold: Hold, sql: str, message: bytes) -> None:
        """The relay holds a statement: set its prompt id upstream, or ask for approval
        (unless a window covers it)."""
        if isinstance(hold, PromptSync):
            self._sync_prompt(hold.message, sql)
            return
        broker = self.gateway.approvals
        if broker is None:
            # No store to keep requests in: refused, as the rule's message says.
            self._release_hold(Refusal(hold.rule, hold.message, hold.sqlstate))
            return
        assert self.identity is not None
        prompt_id, _ = self.audit_ctx.prompt(sql)
        params: tuple[str | None, ...] = ()
        if message[:1] == b"B":
            bind = m.Bind.decode_body(message[5:])
            params = encode_params(bind.params, bind.param_formats)
        request = broker.new_request(
            hold=hold,
            sql=sql,
            user=self.identity.user,
            groups=tuple(self.identity.groups),
            prompt_id=prompt_id,
            instance_id=self.gateway.instance_id,
            session_id=self.info.session_id,
            database=self.info.database or "",
            params=params,
        )
        self._approval = request
        self._held_text = sql
        self._spawn(self._submit_hold(request))

    async def _submit_hold(self, request: ApprovalRequest) -> None:
        broker = self.gateway.approvals
        assert broker is not None
        try:
            stored = await broker.submit(request, self._approval_decided)
        except Exception as exc:
            log.error("approvals: cannot store request %s: %s", request.id, exc)
            self._approval = None
            self._release_hold(
                Refusal(request.rule, "the approvals store is unavailable; try again", "58030")
            )
            return
        if self._approval is not request:
            # The client cancelled or left while the request was being stored.
            await broker.withdraw(request.id, "client gone")
            return
        if stored is None:
            self._audit(
                self.audit_ctx.base(
                    "approval_decision", approval_id=request.id, decision="approved",
                    rule=request.rule, statement=request.statement,
                    extra={"window": True},
                )
            )  # fmt: skip
            self._approval = None
            self._release_hold(None)
            return
        self._audit(
            self.audit_ctx.base(
                "approval_request", approval_id=request.id, rule=request.rule,
                statement=request.statement, prompt_id=request.prompt_id,
                fingerprint=request.fingerprint,
                extra={"approvers": list(request.approvers), "expires_at": request.expires_at},
            )
        )  # fmt: skip
        if not self.client.closed:
            self.client.write(broker.notice(request))

    def _approval_decided(self, request: ApprovalRequest) -> None:
        decision = {
            "approved": "approved",
            "denied": "approval_denied",
            "expired": "approval_expired",
        }.get(request.status)
        self._audit(
            self.audit_ctx.base(
                "approval_decision", approval_id=request.id, decision=decision,
                rule=request.rule, statement=request.statement,
                extra={
                    "status": request.status, "decider": request.decider,
                    "reason": request.reason, "window_until": request.window_until,
                },
            )
        )  # fmt: skip
        if request.status == "approved":
            self._approved = (self._held_text, request.id, request.rule)
        self._approval = None
        self._release_hold(verdict_for(request))

    def cancel_hold(self) -> None:
        """The client's CancelRequest while its statement waits: withdraw the request."""
        request = self._approval
        if request is None or self.gateway.approvals is None:
            return
        self._approval = None
        self._spawn(self.gateway.approvals.withdraw(request.id, "cancelled by the client"))
        self._release_hold(
            Refusal(
                request.rule,
                f"request {request.id} cancelled by the client",
                "57014",
                approval_id=request.id,
            )
        )

    def _release_hold(self, verdict: Refusal | None) -> None:
        if not self.core.holding or self.upstream is None or self.upstream.transport is None:
            return
        try:
            data = self.core.release(verdict)
        except m.ProtocolError as exc:
            self.client.write(fatal_bytes(exc.sqlstate, f"pgguard: {exc}"))
            self.finish()
            return
        if data:
            self.upstream.transport.write(data)
        if self.core.closing:
            self.finish()

    def _new_masking(self, planner: SessionPlanner) -> SessionMasking:
        return SessionMasking(planner, self.gateway.maskers, planner.origin)

    def _apply_row_limit(self, guard: SessionGuard) -> None:
        limits = guard.limits
        if limits is not None and limits.max_rows is not None:
            self.core.set_row_limit(limits.max_rows, limits.on_max_rows)
        else:
            self.core.set_row_limit(None)

    def _sync_search_path(self) -> None:
        """Ask the server for the search_path once the statement that changes it has run, and
        again when the transaction block ends (a rollback restores the old one)."""
        core, guard = self.core, self.guard
        assert guard is not None

        def confirmed(rows: list[tuple[str | None, ...]], error: str | None) -> None:
            if error is None and rows:
                guard.search_path_confirmed(rows[0][0] or "", in_transaction=core.status != b"I")
                core.forget_verdicts()

        sql = "select current_setting('search_path')"
        core.internal_query(sql, confirmed)
        core.internal_query(sql, confirmed, outside_transaction=True)

    def _schema_changed(self) -> None:
        """Reload the catalog once a DDL statement's transaction is over."""
        database = self.info.database or ""

        def done(_rows: list[tuple[str | None, ...]], _error: str | None) -> None:
            self.gateway.schedule_catalog_refresh(database)

        self.core.internal_query("select 1", done, outside_transaction=True)

    # ------------------------------------------------------------------ upstream
    async def _connect_upstream(self, startup: m.StartupMessage) -> None:
        self.outcome = "upstream_failed"  # until the session is accepted
        extra = {"session_id": self.info.session_id}
        try:
            conn = await connect_upstream(self.gateway, startup, extra)
        except UpstreamRefused as exc:
            # Relay the server's own startup error (bad database, too many clients, …).
            self.client.write(exc.raw)
            raise SessionEnded() from None
        self.upstream = conn.side
        up = self.settings.upstream
        target = CancelTarget(
            up.host, up.port, conn.key.process_id, conn.key.secret_key, session=self
        )
        self.key = self.gateway.new_cancel_key(target)
        self.client.write(
            m.Authentication(m.Authentication.OK).encode()
            + b"".join(conn.greeting)
            + m.BackendKeyData(*self.key).encode()
            + m.ReadyForQuery(conn.status).encode()
        )
        self.core.status = conn.status
        for raw in conn.greeting:
            if raw[:1] == b"S":
                setting = m.ParameterStatus.decode_body(raw[5:])
                if setting.name == "client_encoding":
                    self.core.set_client_encoding(setting.value)

    # ------------------------------------------------------------------ relay
    def _start_relay(self) -> None:
        client, upstream = self.client, self.upstream
        assert upstream is not None and upstream.transport is not None
        assert client.transport is not None
        core = self.core
        client_transport = client.transport
        upstream_transport = upstream.transport
        track_idle = self.settings.limits.idle_timeout > 0
        monotonic = time.monotonic
        tally = self.gateway.tally  # byte counts: plain ints, folded into the metrics later

        def from_client(data: bytes) -> None:
            tally.bytes_client_to_server += len(data)
            if track_idle:
                self.last_active = monotonic()
            try:
                to_server = core.from_client(data)
            except m.ProtocolError as exc:
                client_transport.write(fatal_bytes(exc.sqlstate, f"pgguard: {exc}"))
                self.finish()
                return
            except Exception:  # a bug: this session ends with a clear error, no other does
                self._crashed()
                return
            if to_server:
                upstream_transport.write(to_server)
            if core.closing:
                self.finish()

        def from_server(data: bytes) -> None:
            tally.bytes_server_to_client += len(data)
            try:
                to_client = core.from_server(data)
            except m.ProtocolError as exc:
                log.error("upstream protocol error: %s", exc)
                client_transport.write(fatal_bytes("08P01", "pgguard: upstream protocol error"))
                self.finish()
                return
            except Exception:
                self._crashed()
                return
            if client.closed:
                # The client left mid-request: its statements' outcomes are read for the
                # audit trail (see _await_outcomes), the rest goes nowhere.
                if core.pending == 0 or core.closing:
                    self.finish()
                return
            masking = core.masking
            if masking is not None and masking.counts:
                tally.masked_values(masking.take_counts())
            if to_client:
                if self._awaiting or self._held is not None:
                    # Strict audit: results wait until their records are durable.
                    if self._held is None:
                        self._held = []
                        self._held_bytes = 0
                        self._stall_timer = asyncio.get_running_loop().call_later(
                            self.settings.audit.strict_timeout, self._audit_stalled
                        )
                    self._held.append(to_client)
                    self._held_bytes += len(to_client)
                    if self._held_bytes > HELD_RESULT_BYTES and not self._upstream_paused:
                        # Much held output: stop reading the server until the record is
                        # durable (a little is not worth two epoll changes per statement).
                        self._upstream_paused = True
                        upstream_transport.pause_reading()
                else:
                    client_transport.write(to_client)
            if core.server_out:
                upstream_transport.write(b"".join(core.server_out))
                core.server_out.clear()
            if core.cancel_requested:
                core.cancel_requested = False
                self._cancel_upstream()
            if core.closing:
                self.finish()

        def lost(side: Side) -> None:
            if side is upstream and not core.closing and not client.closed:
                self.gateway.upstream_error()
                client_transport.write(
                    fatal_bytes("08006", "pgguard: lost connection to the upstream server")
                )
            if side is client and self._await_outcomes():
                return
            self.finish()

        def client_paused(paused: bool) -> None:
            # The client cannot keep up: stop reading the server until it drains.
            self._client_paused = paused
            if paused:
                upstream_transport.pause_reading()
            elif not upstream.closed and not self._upstream_paused:
                upstream_transport.resume_reading()

        def upstream_paused(paused: bool) -> None:
            if paused:
                client_transport.pause_reading()
            elif not client.closed:
                client_transport.resume_reading()

        client.on_lost = lost
        upstream.on_lost = lost
        client.on_pause = client_paused
        upstream.on_pause = upstream_paused
        client.on_data = from_client
        upstream.on_data = from_server
        assert self.identity is not None
        loop = asyncio.get_running_loop()
        if self.audit is not None:
            # Before any buffered client input is relayed: a query sent while the session
            # was being set up must be tracked (and, in strict mode, held) like any other.
            rec = self.settings.recording
            core.track_statements(
                StatementTracker(time.time), self._on_runs, rec.max_rows, rec.max_bytes
            )
            if self.audit.mode == "strict":
                core.gate = self._audit_gate
            self.audit.session(self.audit_ctx)
            self._audit(self.audit_ctx.base("session_start"))
            self._session_recorded = True
        else:
            # No audit, so no statement tracker (too slow to run just for the metrics): the
            # relay notes each statement and its verdict instead.
            core.count_statements(self._count_statements, time.monotonic)
        if client.closed or upstream.closed:
            # Gone while the session was set up: what it sent was never relayed (so never
            # ran), and the session's start and end are on the record.
            self.finish()
            return
        leftover = upstream.take_buffered()
        if leftover:
            from_server(leftover)
        leftover = client.take_buffered()
        if leftover:
            from_client(leftover)
        if self.settings.identity.end_session_on_expiry:
            delay = max(0.0, self.identity.expires_at - time.time())
            self._expiry_handle = loop.call_later(delay, self.end, TOKEN_EXPIRED)
        log.info(
            "session start",
            extra={
                "session_id": self.info.session_id,
                "user": self.identity.user,
                "database": self.info.database,
            },
        )

    # ------------------------------------------------------------------ audit
    def _audit_gate(self) -> Refusal | None:
        """Strict mode: while the audit store fails, statements are refused."""
        assert self.audit is not None
        return None if self.audit.healthy else AUDIT_UNAVAILABLE

    def _on_runs(self, runs: list[StatementRun]) -> None:
        try:
            self._record_runs(runs)
        except Exception:  # a bug here must not pass a statement unrecorded in strict mode
            log.exception("audit record failed", extra={"session_id": self.info.session_id})
            if self.audit is not None and self.audit.mode == "strict":
                self._held = None
                self.force_end(Fatal("58030", "pgguard: audit: could not record the statement"))

    def _record_runs(self, runs: list[StatementRun], wait: bool = True) -> None:
        """Hand the runs to the audit trail; in strict mode (and ``wait``) the client's output
        waits until their records are durable."""
        audit = self.audit
        assert audit is not None
        strict = audit.mode == "strict" and wait
        session_id = self.info.session_id
        for run in runs:
            self.audit_ctx.note_statement(run)
            about: tuple[object, ...] = (None, (), None, ())
            audit_only: tuple[str, ...] = ()
            if self.guard is not None:
                facts, audit_only = self.guard.describe(run.statement)
                about = (*described(facts), audit_only)
            approval: tuple[str, str] | None = None
            approved = self._approved
            if approved is not None and run.statement.strip() in approved[0]:
                self._approved = None
                approval = (approved[1], approved[2])
            decision, _ = self.audit_ctx.decision(run, audit_only)
            if approval is not None and decision == "allow":
                decision = "approved"
            self.gateway.tally.statement(about[0], decision, run.duration_ms)  # type: ignore[arg-type]
            if not strict:
                audit.statement(session_id, run, about, approval)
                continue
            self._awaiting += 1
            audit.statement(session_id, run, about, approval, self._durable)

    def _count_statements(self, noted: list[Counted], seconds: float) -> None:
        """A request's statements, for the statement metrics when the audit is off. Each
        statement observes the whole request's duration (docs/metrics.md says why)."""
        try:
            tally = self.gateway.tally
            duration_ms = seconds * 1000.0
            for sql, refusal in noted:
                decided: str | None = None
                if refusal is not None:
                    decided = refusal.decision
                elif self._approved is not None and self._approved[0] == self.core.sql_text(sql):
                    self._approved = None
                    decided = "approved"
                for statement_class, allowed in self._statement_kinds(sql):
                    tally.statement(statement_class, decided or allowed, duration_ms)
        except Exception:  # a bug in the metrics must not end the session
            log.exception("statement metrics failed", extra={"session_id": self.info.session_id})

    def _statement_kinds(self, sql: bytes) -> tuple[tuple[str, str], ...]:
        """(class, decision when pgguard lets it run) of each statement of ``sql``: one per
        statement as the audit trail splits it; classes from the guard's caches, "unknown"
        without a policy (then nothing is analysed for the metrics)."""
        guard = self.guard
        epoch = guard.state.epoch[0] if guard is not None else 0
        last = self._last_kinds
        if sql is last[0] and epoch == last[2]:
            return last[1]  # a prepared statement's text: the same object each time
        if guard is None or guard.state.policy is None:
            semicolon = sql.find(b";")
            if semicolon < 0 or not sql[semicolon + 1 :].strip():
                return _ONE_UNKNOWN  # the pass-through case: no decoding, no cache
        if epoch != self._kinds_epoch or len(self._kinds) >= _KINDS_CACHE:
            self._kinds.clear()
            self._kinds_epoch = epoch
        kinds = self._kinds.get(sql)
        if kinds is not None:
            self._last_kinds = (sql, kinds, epoch)
            return kinds
        text = self.core.sql_text(sql)
        # Texts that differ only in numbers share their kinds (pgbench and ORMs send a new
        # literal every time).
        shape = literal_free(text)
        if shape is not None:
            kinds = self._kinds.get(shape)
        if kinds is None:
            count = len(split_statements(text)) if b";" in sql else 1
            known = guard.statement_kinds(text) if guard is not None else None
            kinds = tuple(
                (known[i][0], "audit_only" if known[i][1] else "allow")
                if known is not None and i < len(known)
                else ("unknown", "allow")
                for i in range(count)
            )
            self._kinds[shape if shape is not None else sql] = kinds
        self._last_kinds = (sql, kinds, epoch)
        return kinds

    def _audit_stalled(self) -> None:
        """Strict mode: a record is still not durable; the client gets a clear error rather
        than waiting (the record stays queued and is written when the store recovers)."""
        self._stall_timer = None
        if self._held is not None and self._awaiting:
            log.error("audit store not answering", extra={"session_id": self.info.session_id})
            self._held = None
            self.force_end(Fatal("58030", "pgguard: audit: the audit store is not answering"))

    def _durable(self, error: BaseException | None) -> None:
        self._awaiting -= 1
        if error is not None:
            # The result cannot be confirmed: the client must not see it. The record stays
            # queued and is written once the store recovers.
            log.error("audit store failing: %s", error, extra={"session_id": self.info.session_id})
            self._held = None
            self.force_end(Fatal("58030", "pgguard: audit: the audit store is unavailable"))
            return
        if self._awaiting == 0 and self._held is not None:
            held, self._held = self._held, None
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
            self.client.write(b"".join(held))
            upstream = self.upstream
            if self._upstream_paused:
                self._upstream_paused = False
                transport = upstream.transport if upstream is not None else None
                if transport is not None and not upstream.closed and not self._client_paused:  # type: ignore[union-attr]
                    transport.resume_reading()

    def _crashed(self) -> None:
        log.exception("session crashed", extra={"session_id": self.info.session_id})
        self.client.write(INTERNAL_ERROR.encode())
        self.finish()

    def _await_outcomes(self) -> bool:
        """The client left with statements sent and unanswered: cancel them and read the
        server's replies anyway (for a while), so that their records say what happened to
        them rather than nothing (a write may commit before the cancel lands). True if the
        session waits for them; it ends once they are answered."""
        core, upstream = self.core, self.upstream
        if (
            core.tracker is None
            or core.pending == 0
            or core.holding is not None
            or upstream is None
            or upstream.closed
            or upstream.transport is None
        ):
            return False
        self._held = None  # nobody to give it to
        self._cancel_upstream()
        if self._upstream_paused or self._client_paused:
            self._upstream_paused = self._client_paused = False
            upstream.transport.resume_reading()
        asyncio.get_running_loop().call_later(_OUTCOME_WAIT_S, self.finish)
        return True

    def _cancel_upstream(self) -> None:
        """Cancel the running statement (the row limit was passed)."""
        if self.key is None:
            return
        task = asyncio.get_running_loop().create_task(
            self.gateway.forward_cancel(*self.key, route=False)
        )
        self.gateway._tasks.add(task)
        task.add_done_callback(self.gateway._tasks.discard)

    def end(self, reason: Fatal) -> None:
        """End the session at its next idle point (now, if idle)."""
        if self.upstream is None or self._done.done():
            # Still in the handshake or already over: close right away.
            self._send_fatal(reason)
            self.finish()
            return
        out = self.core.end(reason)
        if out:
            self.client.write(out)
        if self.core.closing:
            self.finish()

    def force_end(self, reason: Fatal) -> None:
        """End now, mid-statement if need be."""
        if not self._done.done():
            self.core.closing = True
            self._send_fatal(reason)
            self.finish()


class Gateway:
    """Listener and shared state of one pgguard process."""

    def __init__(
        self,
        settings: Settings,
        validator: TokenValidator | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.settings = settings
        self.guard = GuardState(policy_in_force(policy))
        self.audit: AuditLink | None = None
        self.instance_id = ""
        self._catalog_locks: dict[str, asyncio.Lock] = {}
        self._catalog_refresh: dict[str, asyncio.Task[None]] = {}
        self._stale_refresh: dict[str, float] = {}
        self._policy_signature: tuple[tuple[str, float, int], ...] = ()
        self.validator = validator or TokenValidator(settings.identity)
        self.sessions: set[Session] = set()
        self.cancel_map: dict[tuple[int, int], CancelTarget] = {}
        self.server_ssl = self._server_ssl_context()
        self.upstream_ssl = self._upstream_ssl_context()
        self.listener_is_loopback = _is_loopback(settings.listen.host)
        self.draining = False
        self.server: asyncio.base_events.Server | None = None
        self.port: int | None = None
        self.worker_id = 0
        self.worker_group: int | None = None  # the serving parent's pid when several workers run
        self._cancel_server: asyncio.base_events.Server | None = None
        self.stats: dict[str, int] = {"connections": 0, "auth_failures": 0, "upstream_errors": 0}
        self.tally = Tally()  # plain counters, folded into the metrics (pgguard.metrics)
        self.approvals: ApprovalBroker | None = None  # set when the approvals store opens
        self.lineage = LineageCache(self.guard)
        self.maskers = MaskerCache(settings.masking.secret())
        self.maskers.on_fallback = _log_mask_fallback
        self.policy_error: str | None = None  # the last policy load's problems (/readyz)
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ TLS contexts
    def _server_ssl_context(self) -> ssl.SSLContext | None:
        tls = self.settings.tls
        if tls.cert_file is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        return ctx

    def _upstream_ssl_context(self) -> ssl.SSLContext:
        up = self.settings.upstream
        if up.sslmode == "verify-full":
            ctx = ssl.create_default_context(cafile=str(up.sslrootcert) if up.sslrootcert else None)
            ctx.check_hostname = True
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    # ------------------------------------------------------------------ policy and catalogs
    def reload_policy(self) -> bool:
        """Load the policy files again; an invalid policy leaves the current one in force."""
        result = check_policy_files(self.settings.policies)
        for problem in result.warnings:
            log.warning("policy: %s", problem)
        if not result.ok or result.policy is None:
            for problem in result.errors:
                log.error("policy: %s", problem)
            log.error("policy reload failed: keeping the policy in force")
            self.policy_error = "; ".join(map(str, result.errors)) or "no valid policy"
            self._audit_reload(result.files, [str(p) for p in result.errors])
            return False
        self.guard.set_policy(policy_in_force(result.policy))
        self.policy_error = None
        for session in list(self.sessions):
            if session.guard is not None:
                session.guard.apply_limits()
                if self.guard.policy is not None and not session.guard_ready:
                    session.prepare_guard()  # it started without a policy in force
        log.info("policy loaded from %d file(s)", len(result.files))
        self._policy_signature = self._policy_files_signature()
        self._audit_reload(result.files, [])
        return True

    def _audit_reload(self, files: Sequence[str], errors: list[str]) -> None:
        """A policy reload is an audit record too (applied, or refused and why)."""
        if self.audit is None:
            return
        extra = {"files": list(files), "applied": not errors, "errors": errors[:20]}
        self.audit.submit(
            AuditRecord(
                event="policy_reload",
                ts=time.time(),
                instance_id=self.instance_id,
                decision=None,
                extra=extra,
            )
        )

    def _policy_files_signature(self) -> tuple[tuple[str, float, int], ...]:
        import glob
        import os

        entries = []
        for pattern in self.settings.policies:
            for path in sorted(glob.glob(pattern)):
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                entries.append((path, st.st_mtime, st.st_size))
        return tuple(entries)

    async def _watch_policy_files(self) -> None:
        self._policy_signature = self._policy_files_signature()
        while True:
            await asyncio.sleep(2.0)
            signature = self._policy_files_signature()
            if signature != self._policy_signature:
                self._policy_signature = signature
                log.info("policy files changed: reloading")
                self.reload_policy()

    async def ensure_catalog(self, database: str) -> None:
        """Load ``database``'s catalog once; sessions resolve names against it."""
        if database in self.guard.catalogs:
            return
        lock = self._catalog_locks.setdefault(database, asyncio.Lock())
        async with lock:
            if database not in self.guard.catalogs:
                await self._load_catalog(database)

    async def _load_catalog(self, database: str) -> None:
        up = self.settings.upstream
        startup = m.StartupMessage(
            (("user", up.user), ("database", database), ("application_name", "pgguard-catalog"))
        )
        extra = {"database": database}
        try:
            conn = await connect_upstream(self, startup, extra)
            try:
                rows = await simple_query(
                    conn.side, CATALOG_SQL, self.settings.limits.max_message_bytes
                )
            finally:
                conn.side.write(m.Terminate().encode())
                conn.side.close()
            snapshot = snapshot_from_rows(rows)
            self.guard.set_catalog(database, snapshot)
            policy = self.guard.policy
            if policy is not None and policy.masks:
                for mask, column, reason, is_error in mask_type_problems(policy.masks, snapshot):
                    level = logging.WARNING if is_error else logging.INFO
                    log.log(
                        level,
                        "mask %s (%s) on %s: %s",
                        mask.column,
                        mask.function,
                        column,
                        reason,
                        extra=extra,
                    )
        except (SessionEnded, UpstreamRefused, QueryFailed, m.ProtocolError) as exc:
            # Unknown names are judged as the most dangerous thing they could be.
            log.error("could not load the catalog of %s: %s", database, exc, extra=extra)

    def catalog_looks_stale(self, database: str) -> None:
        """A result named a relation or column the catalog does not have: reload it, at
        most every few seconds (temporary tables, which it never has, ask often)."""
        now = time.monotonic()
        if now - self._stale_refresh.get(database, 0.0) >= STALE_REFRESH_INTERVAL:
            self._stale_refresh[database] = now
            self.schedule_catalog_refresh(database)

    def schedule_catalog_refresh(self, database: str) -> None:
        task = self._catalog_refresh.get(database)
        if task is not None and not task.done():
            return

        async def refresh() -> None:
            await asyncio.sleep(0.05)  # coalesce a burst of DDL
            await self._load_catalog(database)

        task = asyncio.get_running_loop().create_task(refresh())
        self._catalog_refresh[database] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ counters
    def auth_failed(self, reason: str) -> None:
        self.stats["auth_failures"] += 1
        self.tally.auth_failure(reason)

    def upstream_error(self) -> None:
        self.stats["upstream_errors"] += 1

    # ------------------------------------------------------------------ cancel
    def new_cancel_key(self, target: CancelTarget) -> tuple[int, int]:
        """The key a client gets: the server's real pid (clients compare it with
        pg_backend_pid() and with NOTIFY senders) and a secret of pgguard's own."""
        while True:
            key = (target.process_id, secrets.randbits(32) - (1 << 31))
            if key not in self.cancel_map:
                self.cancel_map[key] = target
                return key

    def _cancel_socket_name(self, worker_id: int) -> str:
        # Abstract unix socket: nothing on disk, private to this host.
        return f"\0pgguard-cancel-{self.worker_group}-{worker_id}"

    async def _start_cancel_listener(self) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                packet = await asyncio.wait_for(reader.readexactly(16), 5)
                length, code, pid, key = struct.unpack("!iiii", packet)
                if length == 16 and code == m.CANCEL_REQUEST_CODE:
                    await self.forward_cancel(pid, key, route=False)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                pass
            finally:
                writer.close()

        # Bound here: uvloop does not take abstract names as a path.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self._cancel_socket_name(self.worker_id))
        self._cancel_server = await asyncio.start_unix_server(handle, sock=sock)

    async def _route_cancel(self, worker_id: int, process_id: int, secret_key: int) -> None:
        try:
            async with asyncio.timeout(5):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(
                    sock, self._cancel_socket_name(worker_id)
                )
                _, writer = await asyncio.open_unix_connection(sock=sock)
                writer.write(
                    struct.pack("!iiii", 16, m.CANCEL_REQUEST_CODE, process_id, secret_key)
                )
                await writer.drain()
                writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("could not route cancel request to worker %d: %s", worker_id, exc)

    async def forward_cancel(self, process_id: int, secret_key: int, route: bool = True) -> None:
        """Send the upstream CancelRequest for one of our keys. A key this worker does not
        know may belong to a sibling worker (SO_REUSEPORT spreads connections): ask them."""
        target = self.cancel_map.get((process_id, secret_key))
        if target is not None and target.session is not None and target.session.core.holding:
            target.session.cancel_hold()  # nothing runs upstream: withdraw the request
            return
        if target is None:
            if route and self.worker_group is not None:
                siblings = [w for w in range(self.settings.workers) if w != self.worker_id]
                await asyncio.gather(
                    *(self._route_cancel(w, process_id, secret_key) for w in siblings)
                )
            else:
                log.info("cancel request for an unknown key ignored")
            return
        try:
            async with asyncio.timeout(5):
                _, writer = await asyncio.open_connection(target.host, target.port)
                writer.write(
                    struct.pack(
                        "!iiii",
                        16,
                        m.CANCEL_REQUEST_CODE,
                        target.process_id,
                        target.secret_key,
                    )
                )
                await writer.drain()
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            log.warning("could not forward cancel request: %s", exc)

    # ------------------------------------------------------------------ serving
    def _accept(self) -> Side:
        return Side("client", on_connect=self._on_client)

    def _on_client(self, side: Side) -> None:
        task = asyncio.get_running_loop().create_task(self._serve_client(side))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_client(self, side: Side) -> None:
        if len(self.sessions) >= self.settings.limits.max_connections:
            side.write(fatal_bytes("53300", "sorry, too many clients already"))
            self.tally.connection("refused_limit")
            side.close()
            return
        self.stats["connections"] += 1
        try:
            session = Session(self, side)
        except Exception:  # a bug: the client gets an error rather than a silent socket
            log.exception("session could not start")
            side.write(INTERNAL_ERROR.encode())
            side.close()
            return
        self.sessions.add(session)
        try:
            await session.run()
        except Exception:  # a bug must never take other sessions down
            log.exception("session crashed", extra={"session_id": session.info.session_id})
            side.write(INTERNAL_ERROR.encode())
            side.close()
            if session.upstream is not None:
                session.upstream.close()
        finally:
            self.sessions.discard(session)

    async def _start_audit(self) -> None:
        audit = self.settings.audit
        if audit.instance_id:
            # Each worker writes its own chain: a shared one would fork at the first record.
            self.instance_id = (
                f"{audit.instance_id}:{self.worker_id}"
                if self.settings.workers > 1
                else audit.instance_id
            )
        else:
            self.instance_id = (
                f"{socket.gethostname()}:{self.settings.listen.port}:{self.worker_id}"
            )
        # Opened here first so that a store that cannot work stops pgguard at start-up (and
        # the schema is created or migrated once); the writer process opens its own.
        stores = open_stores(audit.url, audit.jsonl)
        if not stores:
            return
        for store in stores:
            store.close()
        self.audit = AuditLink(
            WriterConfig(
                url=audit.url,
                jsonl=audit.jsonl,
                mode=audit.mode,
                instance_id=self.instance_id,
                queue_size=audit.queue_size,
                param_cap=audit.max_param_bytes,
                redact_literals=audit.redact_literals,
                redact_params=audit.redact_params,
                sync=audit.sync,
                log_level=self.settings.log.level,
                log_format=self.settings.log.format,
                worker=self.worker_id if self.settings.workers > 1 else None,
            ),
            secret_env=frozenset(
                name
                for name in (
                    self.settings.upstream.password_env,
                    self.settings.identity.secret_env,
                    self.settings.masking.secret_env,
                )
                if name
            ),
        )
        await self.audit.start()

    def _start_approvals(self) -> None:
        """Held statements need the shared store (the audit database): without one,
        ``require_approval`` statements are refused instead."""
        url = self.settings.audit.url
        if not url:
            return
        from pgguard.approvals.store import ApprovalStore
        from pgguard.approvals.webhook import WebhookNotifier

        try:
            store = ApprovalStore(url)
        except Exception as exc:
            log.error("approvals store unavailable, approval rules will refuse: %s", exc)
            return
        admin = self.settings.admin

        def count(n: int) -> None:
            self.tally.approvals_pending = n

        try:
            notifier = WebhookNotifier(
                self.settings.approvals.webhook_url,
                page_url=f"http://{admin.host}:{admin.port}/approvals",
            )
        except ValueError as exc:
            log.error("approvals.webhook_url: %s; no webhook notifications", exc)
            notifier = WebhookNotifier(None)
        self.approvals = ApprovalBroker(
            store,
            notifier,
            self.settings.approvals.timeout,
            f"http://{admin.host}:{admin.port}",
            on_count=count,
        )

    def approval_routes(self) -> dict[str, Any]:
        """The admin listener's approvals API and page (empty without a store)."""
        if self.approvals is None:
            return {}
        from pgguard.approvals.api import approval_routes

        return approval_routes(self.approvals.store, self.validator, self.approvals.notifier)

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        await self._start_audit()
        self._start_approvals()
        listen = self.settings.listen
        if sock is not None:
            self.server = await loop.create_server(self._accept, sock=sock, backlog=1024)
        else:
            self.server = await loop.create_server(
                self._accept,
                listen.host,
                listen.port,
                backlog=1024,
                reuse_address=True,
                reuse_port=self.settings.workers > 1 or None,
            )
        sockets = self.server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else None
        if self.worker_group is not None:
            await self._start_cancel_listener()
        if self.settings.policies:
            task = loop.create_task(self._watch_policy_files())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self.settings.limits.idle_timeout > 0:
            task = loop.create_task(self._idle_reaper())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _idle_reaper(self) -> None:
        timeout = self.settings.limits.idle_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 2))
            now = time.monotonic()
            for session in list(self.sessions):
                stale = now - session.last_active > timeout
                if stale and session.upstream is not None and session.core.idle():
                    session.end(IDLE_TIMEOUT)

    async def drain(self, deadline: float) -> None:
        """Stop accepting, end idle sessions, wait for busy ones, then flush the audit trail,
        all within ``deadline`` seconds (plus a second), so that a supervisor's grace period
        a little longer than ``limits.drain_timeout`` is enough."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        if self._cancel_server is not None:
            self._cancel_server.close()
        for session in list(self.sessions):
            session.end(SHUTTING_DOWN)
        end = time.monotonic() + deadline
        # Sessions may use the budget but for a reserve to write the last records.
        reserve = min(5.0, deadline / 5)

        def remaining(at_least: float = 0.0) -> float:
            return max(at_least, end - time.monotonic())

        while self.sessions and time.monotonic() < end - reserve:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.force_end(SHUTTING_DOWN)
        # Give the final writes a moment to reach the sockets.
        stop_waiting = time.monotonic() + min(2.0, remaining())
        while self.sessions and time.monotonic() < stop_waiting:
            await asyncio.sleep(0.05)
        if self.approvals is not None:
            await self.approvals.close()
            await asyncio.to_thread(self.approvals.notifier.close, min(2.0, remaining(0.1)))
        if self.audit is not None:
            audit = self.audit
            flushed = await audit.close(remaining(1.0))
            if not flushed:
                log.error("audit: %d record(s) could not be written before exit", audit.abandoned)


class UpstreamRefused(Exception):
    """The upstream server refused the session with an ErrorResponse (raw message kept)."""

    def __init__(self, raw: bytes, error: m.ErrorResponse) -> None:
        super().__init__(f"{error.sqlstate} {error.message}")
        self.raw = raw
        self.error = error


@dataclass
class UpstreamConnection:
    """A logged-in upstream connection, ready for queries."""

    side: Side
    key: m.BackendKeyData
    greeting: list[bytes]  # ParameterStatus / NoticeResponse messages, raw, for the client
    status: bytes  # transaction status of the first ReadyForQuery


async def connect_upstream(
    gateway: Gateway, startup: m.StartupMessage, log_extra: dict[str, Any]
) -> UpstreamConnection:
    """Connect, negotiate TLS per ``upstream.sslmode``, log in. Raises SessionEnded(Fatal)."""
    up = gateway.settings.upstream
    loop = asyncio.get_running_loop()
    side = Side("upstream")
    try:
        async with asyncio.timeout(up.connect_timeout or None):
            transport, _ = await loop.create_connection(lambda: side, up.host, up.port)
    except (OSError, TimeoutError) as exc:
        gateway.upstream_error()
        log.error("upstream connect failed: %s", exc, extra=log_extra)
        raise SessionEnded(
            Fatal("08001", "pgguard: could not connect to the upstream server")
        ) from None
    try:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if up.sslmode != "disable":
            await _upstream_tls(gateway, side, log_extra)
        side.write(startup.encode())
        return await _upstream_login(gateway, side, log_extra)
    except BaseException:
        side.close()
        raise


async def _upstream_tls(gateway: Gateway, side: Side, log_extra: dict[str, Any]) -> None:
    up = gateway.settings.upstream
    side.write(m.SSLRequest().encode())
    answer = await side.recv()
    if not answer:
        raise SessionEnded(Fatal("08006", "pgguard: upstream closed during TLS negotiation"))
    if answer[:1] == b"N":
        if up.sslmode in ("require", "verify-full"):
            raise SessionEnded(Fatal("08001", "pgguard: the upstream server does not support TLS"))
        side.unread(answer[1:])
        return
    if answer[:1] != b"S" or len(answer) > 1:
        raise SessionEnded(Fatal("08006", "pgguard: bad upstream reply to SSLRequest"))
    assert side.transport is not None
    try:
        new_transport = await asyncio.get_running_loop().start_tls(
            side.transport,
            side,
            gateway.upstream_ssl,
            server_hostname=up.host if up.sslmode == "verify-full" else None,
        )
    except (ssl.SSLError, OSError) as exc:
        gateway.upstream_error()
        log.error("upstream TLS failed: %s", exc, extra=log_extra)
        raise SessionEnded(
            Fatal("08001", "pgguard: TLS negotiation with the upstream server failed")
        ) from None
    side.transport = new_transport


async def _upstream_login(
    gateway: Gateway, side: Side, log_extra: dict[str, Any]
) -> UpstreamConnection:
    up = gateway.settings.upstream
    reader = MessageReader(gateway.settings.limits.max_message_bytes)
    scram: ScramClient | None = None
    password = up.password()
    greeting: list[bytes] = []
    key: m.BackendKeyData | None = None
    while True:
        try:
            type_code, body = await read_message(side, reader)
        except SessionEnded:
            gateway.upstream_error()
            raise SessionEnded(
                Fatal("08006", "pgguard: the upstream server closed the connection")
            ) from None
        if type_code == b"R":
            auth = m.Authentication.decode_body(body)
            try:
                scram = _answer_auth(up.user, side, auth, password, scram)
            except AuthFailed as exc:
                gateway.upstream_error()
                log.error("upstream authentication failed: %s", exc, extra=log_extra)
                raise SessionEnded(
                    Fatal("08001", "pgguard: upstream authentication failed")
                ) from None
        elif type_code == b"K":
            key = m.BackendKeyData.decode_body(body)
        elif type_code == b"E":
            err = m.ErrorResponse.decode_body(body)
            log.warning(
                "upstream refused the session: %s %s", err.sqlstate, err.message, extra=log_extra
            )
            if err.sqlstate.startswith("28"):
                gateway.upstream_error()
                raise SessionEnded(Fatal("08001", "pgguard: upstream authentication failed"))
            raise UpstreamRefused(b"".join(greeting) + m.frame(b"E", body), err)
        elif type_code == b"Z":
            if key is None:
                raise SessionEnded(Fatal("08P01", "pgguard: upstream sent no BackendKeyData"))
            # Anything the server sent after ReadyForQuery belongs to whoever reads next.
            leftover = reader.take_buffer() + side.take_buffered()
            if leftover:
                side.unread(leftover)
            return UpstreamConnection(side, key, greeting, m.ReadyForQuery.decode_body(body).status)
        elif type_code in (b"S", b"N", b"v"):
            greeting.append(m.frame(type_code, body))
        else:
            raise SessionEnded(
                Fatal("08P01", f"pgguard: unexpected upstream message {type_code!r}")
            )


def _answer_auth(
    user: str,
    side: Side,
    auth: m.Authentication,
    password: str | None,
    scram: ScramClient | None,
) -> ScramClient | None:
    code = auth.code
    if code == m.Authentication.OK:
        return scram
    if code == m.Authentication.SASL_FINAL:
        if scram is None:
            raise AuthFailed("SASL final without a SASL exchange")
        scram.verify_server_final(auth.data)
        return scram
    if password is None:
        raise AuthFailed(f"the server asks for a password (auth code {code}) but none is set")
    if code == m.Authentication.CLEARTEXT:
        side.write(m.PasswordMessage(password.encode()).encode())
    elif code == m.Authentication.MD5:
        side.write(m.PasswordMessage(md5_password(user, password, auth.data)).encode())
    elif code == m.Authentication.SASL:
        if ScramClient.MECHANISM not in auth.mechanisms():
            raise AuthFailed(f"no supported SASL mechanism in {auth.mechanisms()}")
        scram = ScramClient(password)
        side.write(m.SASLInitialResponse(ScramClient.MECHANISM, scram.client_first()).encode())
    elif code == m.Authentication.SASL_CONTINUE:
        if scram is None:
            raise AuthFailed("SASL continue without a SASL exchange")
        side.write(m.SASLResponse(scram.client_final(auth.data)).encode())
    else:
        raise AuthFailed(f"unsupported authentication method {code}")
    return scram


class QueryFailed(Exception):
    def __init__(self, error: m.ErrorResponse) -> None:
        super().__init__(f"{error.sqlstate}: {error.message}")
        self.error = error


async def simple_query(side: Side, sql: str, limit: int) -> list[tuple[str | None, ...]]:
    """Run ``sql`` (simple protocol) on an idle upstream connection; text rows of the last
    result. Used for pgguard's own queries (catalog, session settings), never client traffic."""
    side.write(m.Query(sql).encode())
    reader = MessageReader(limit)
    rows: list[tuple[str | None, ...]] = []
    error: m.ErrorResponse | None = None
    while True:
        type_code, body = await read_message(side, reader)
        if type_code == b"T":
            rows = []
        elif type_code == b"D":
            values = m.DataRow.decode_body(body).values
            rows.append(tuple(None if v is None else v.decode("utf-8", "replace") for v in values))
        elif type_code == b"E":
            error = m.ErrorResponse.decode_body(body)
        elif type_code == b"Z":
            leftover = reader.take_buffer()
            if leftover:
                side.unread(leftover)
            if error is not None:
                raise QueryFailed(error)
            return rows


def run_coroutine(coro_factory: Callable[[], Any]) -> Any:
    """Run on uvloop when it is installed, else on the default asyncio loop."""
    import anyio

    try:
        import uvloop  # noqa: F401

        use_uvloop = True
    except ImportError:
        use_uvloop = False
    return anyio.run(coro_factory, backend="asyncio", backend_options={"use_uvloop": use_uvloop})
