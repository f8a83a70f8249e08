"""The approval tables, in the audit database (schema version 2, see
:data:`pgguard.audit.store.MIGRATIONS`).

:func:`v2_tables` is the shape migration 2 creates: never edit it. A later change adds a
migration (``ALTER TABLE …``) and defines the new shape next to it; the store's query tables
(:data:`approvals_table`, :data:`windows_table`) then follow the newest shape.

JSON-array fields (groups, params, approvers) are JSON text, as in ``audit_records``; the
requester's and the window holder's column is ``username`` (``user`` is reserved in SQL).
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Connection, Double, Index, MetaData, Table, Text

APPROVALS_TABLE = "pgguard_approvals"
WINDOWS_TABLE = "pgguard_approval_windows"


def v2_tables(metadata: MetaData) -> tuple[Table, Table]:
    """``pgguard_approvals`` and ``pgguard_approval_windows`` as of schema version 2."""
    approvals = Table(
        APPROVALS_TABLE,
        metadata,
        Column("id", Text, primary_key=True),
        Column("created", Double, nullable=False),
        Column("expires_at", Double, nullable=False),
        Column("username", Text, nullable=False),  # the requester
        Column("groups", Text, nullable=False),  # JSON array
        Column("prompt_id", Text),
        Column("statement", Text, nullable=False),
        Column("fingerprint", Text),
        Column("params", Text, nullable=False),  # JSON array
        Column("rule", Text, nullable=False),
        Column("approvers", Text, nullable=False),  # JSON array
        Column("status", Text, nullable=False),
        Column("decider", Text),
        Column("reason", Text),
        Column("decided_at", Double),
        Column("window_until", Double),
        Column("instance_id", Text, nullable=False),
        Column("session_id", Text, nullable=False),
        Column("database", Text, nullable=False),
        # the pending list and the overdue sweep; newest-first listings
        Index("pgguard_approvals_status_created", "status", "created"),
        Index("pgguard_approvals_created", "created"),
    )
    windows = Table(
        WINDOWS_TABLE,
        metadata,
        Column("id", Text, primary_key=True),
        Column("username", Text, nullable=False),  # who may run the rule's statements
        Column("rule", Text, nullable=False),
        Column("until", Double, nullable=False),
        Column("granted_by", Text, nullable=False),
        Column("request_id", Text, nullable=False),
        Column("approvers", Text, nullable=False),  # JSON array: who may revoke it
        Column("revoked", Boolean(create_constraint=False), nullable=False),
        Column("revoked_by", Text),
        Column("revoked_at", Double),
        Column("created", Double, nullable=False),
        # active_window(user, rule, now): the statement path asks this
        Index("pgguard_approval_windows_user_rule", "username", "rule", "until"),
    )
    return approvals, windows


def create_v2(conn: Connection) -> None:
    """Migration 2: create the approval tables (in the caller's transaction)."""
    approvals, windows = v2_tables(MetaData())
    approvals.create(conn)
    windows.create(conn)


metadata = MetaData()
approvals_table, windows_table = v2_tables(metadata)
