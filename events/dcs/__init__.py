"""DCS backends behind one interface (events.dcs.base.DCS)."""

from events.dcs.base import (
    DCS,
    AuthError,
    ClusterView,
    DCSError,
    DuplicateMember,
    Leader,
    SessionLost,
    TimelineCounter,
)

__all__ = [
    "DCS",
    "AuthError",
    "ClusterView",
    "DCSError",
    "DuplicateMember",
    "Leader",
    "SessionLost",
    "TimelineCounter",
]
