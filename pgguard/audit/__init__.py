"""The audit trail (SPEC §5): records, the per-instance hash chain, the writer, the stores.

The SQL store (:mod:`pgguard.audit.store`, SQLAlchemy) and the CLI helpers
(:mod:`pgguard.audit.query`) are imported from their modules, so that importing this package
stays cheap for the relay.
"""

from pgguard.audit.chain import Break, ChainVerifier, Link, VerifyResult, verify, verify_stream
from pgguard.audit.records import AuditRecord
from pgguard.audit.writer import (
    AuditClosed,
    AuditQueueFull,
    AuditUnavailable,
    AuditWriter,
    DurableCallback,
)

__all__ = [
    "AuditClosed",
    "AuditQueueFull",
    "AuditRecord",
    "AuditUnavailable",
    "AuditWriter",
    "Break",
    "ChainVerifier",
    "DurableCallback",
    "Link",
    "VerifyResult",
    "verify",
    "verify_stream",
]
