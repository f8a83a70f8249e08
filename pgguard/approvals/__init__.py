"""Just-in-time approval (SPEC §6): requests held for a human decision, the windows an
approval grants, the shared store, the webhook, and the admin API and page.

The relay holds the statement; this package stores and decides. See :mod:`.store` for the
atomicity guarantees and :mod:`.api` for the HTTP surface.
"""

from .model import (
    FINAL_STATUSES,
    STATUSES,
    ApprovalError,
    ApprovalRequest,
    Event,
    Status,
    Window,
    new_id,
)
from .rules import check_decider, check_revoker, clean_reason, is_approver, parse_window
from .store import NOTIFY_CHANNEL, ApprovalStore
from .webhook import WebhookNotifier

__all__ = [
    "FINAL_STATUSES",
    "NOTIFY_CHANNEL",
    "STATUSES",
    "ApprovalError",
    "ApprovalRequest",
    "ApprovalStore",
    "Event",
    "Status",
    "WebhookNotifier",
    "Window",
    "check_decider",
    "check_revoker",
    "clean_reason",
    "is_approver",
    "new_id",
    "parse_window",
]
