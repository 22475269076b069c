"""
The figures of one comet hub: its running counts (:class:`CometStats`, one
object) and the ``comet`` section of ``/_pipecomet/status`` built from them
and from what the hub holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from .._errors import PipecometError

if TYPE_CHECKING:
    from .._json import JSON
    from ._hub import CometHub

__all__ = ["CometStats", "TRANSPORTS", "status"]

#: The transports a subscription is served with.
TRANSPORTS = ("sse", "ndjson", "longpoll")

#: How many topics the status lists by subscriber count.
BUSIEST = 50


@attrs.define
class CometStats:
    """
    The running counts of one hub (``/_pipecomet/status`` under ``comet``).

    :ivar opened: subscriptions served, by transport.
    :ivar published: messages stored and fired in this process.
    :ivar delivered: subscribers they reached.
    :ivar dropped: messages dropped for slow clients (``drop`` policy).
    :ivar duplicates: publishes answered from their idempotency key.
    :ivar slow_disconnects: clients cut off past ``buffer_bytes``.
    :ivar resume_hits: subscriptions resumed without loss.
    :ivar gaps: gaps declared (cursor too old, or messages the bus lost).
    :ivar resets: resets declared (cursor of another epoch).
    :ivar lifetime_ends: streams told to reconnect at ``max_lifetime``.
    :ivar bus_drops: times the bus went down.
    :ivar rejected: refused requests by error code.
    """

    opened: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(TRANSPORTS, 0))
    published: int = 0
    delivered: int = 0
    dropped: int = 0
    duplicates: int = 0
    slow_disconnects: int = 0
    resume_hits: int = 0
    gaps: int = 0
    resets: int = 0
    lifetime_ends: int = 0
    bus_drops: int = 0
    rejected: dict[str, int] = attrs.field(factory=dict)

    def count_resume(self, status: str) -> None:
        """
        Count how a subscription's cursor resumed.
        """
        if status == "ok":
            self.resume_hits += 1
        elif status == "gap":
            self.gaps += 1
        elif status == "reset":
            self.resets += 1

    def reject(self, error: PipecometError) -> PipecometError:
        """
        Count a refusal by its code; ``error`` is given back, to raise.
        """
        self.rejected[error.code] = self.rejected.get(error.code, 0) + 1
        return error


def status(hub: CometHub) -> dict[str, JSON]:
    """
    The ``comet`` section of ``/_pipecomet/status``: what ``hub`` holds now
    and its counts.
    """
    stats = hub.stats
    by_kind = dict.fromkeys(TRANSPORTS, 0)
    for sub in hub._streams:
        by_kind[sub.transport] += 1
    by_kind["longpoll"] = len(hub._polls)
    topics = hub.topics.values()
    busiest = sorted(topics, key=lambda t: -t.subscribers)[:BUSIEST]
    return {
        "connections": hub.connections,
        "connections_by_transport": {k: n for k, n in by_kind.items()},
        "opened_by_transport": dict(stats.opened),
        "topics": len(hub.topics),
        "waiters_by_topic": {t.name: t.subscribers for t in busiest if t.subscribers},
        "history_messages": sum(len(t.history) for t in topics),
        "history_bytes": sum(t.bytes for t in topics),
        "published": stats.published,
        "delivered": stats.delivered,
        "dropped": stats.dropped,
        "duplicates": stats.duplicates,
        "slow_disconnects": stats.slow_disconnects,
        "resume_hits": stats.resume_hits,
        "gaps": stats.gaps,
        "resets": stats.resets,
        "lifetime_ends": stats.lifetime_ends,
        "rejected": dict(stats.rejected),
        "idempotency_keys": len(hub._idem),
        "bus_connected": hub.bus_ok,
        "bus_drops": stats.bus_drops,
        "closing": hub.closing,
    }
