"""
What a publish is checked against before it goes to the bus, what it
reports (:class:`Published`), and the idempotency keys that make a retried
publish a duplicate rather than a second message.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime

from .._errors import BadRequest, PayloadTooLarge
from ._config import END_EVENT, EVENT_RE, RESERVED_EVENTS, TOPIC_RE

__all__ = ["Published", "IdempotencyKeys", "check_topic", "check_message"]


@attrs.frozen
class Published:
    """
    What a publish did: the message's ``id``, how many subscribers it
    reached in this process, and whether it was a retry already stored.
    """

    topic: str
    id: str | None
    delivered: int
    duplicate: bool = False


def check_topic(name: str) -> None:
    """
    Raise 400 ``bad_topic`` unless ``name`` is a topic name.
    """
    if not TOPIC_RE.match(name):
        raise BadRequest("topic names are 1-100 of A-Z a-z 0-9 _ . -", code="bad_topic")


def check_message(event: str, data: bytes, max_bytes: int) -> None:
    """
    Raise 400 ``bad_event`` for an event name a publish may not use (a
    reserved one among them), 413 ``message_too_large`` past ``max_bytes``.
    """
    if event != "message" and (not EVENT_RE.match(event) or event in RESERVED_EVENTS
                               or event == END_EVENT):
        raise BadRequest(f"event name {event[:64]!r} is not allowed", code="bad_event")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"message of {len(data)} bytes; the limit is {max_bytes}",
                              code="message_too_large")


class IdempotencyKeys:
    """
    The ``(topic, key) → message id`` of recent publishes: at most ``most``
    keys, each for ``ttl`` seconds.  Keys expire in insertion order, so the
    oldest are dropped first and nothing is scanned.
    """

    __slots__ = ("reactor", "ttl", "most", "_keys")

    def __init__(self, reactor: IReactorTime, ttl: float, most: int) -> None:
        self.reactor = reactor
        self.ttl = ttl
        self.most = most
        self._keys: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def seen(self, topic: str, key: str) -> str | None:
        """
        The id of the message published on ``topic`` under ``key``, if
        that was recent enough.
        """
        keys = self._keys
        now = self.reactor.seconds()
        # Stop at the first key still fresh: the ones after it are younger.
        while keys:
            first = next(iter(keys.values()))
            if first[0] > now:
                break
            keys.popitem(last=False)
        hit = keys.get((topic, key))
        return hit[1] if hit is not None else None

    def remember(self, topic: str, key: str, id: str) -> None:
        """
        ``key`` on ``topic`` published the message ``id``.
        """
        keys = self._keys
        keys[(topic, key)] = (self.reactor.seconds() + self.ttl, id)
        while len(keys) > self.most:
            keys.popitem(last=False)
