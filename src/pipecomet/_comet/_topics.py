"""
Topics and cursors: a topic's message ids (``epoch:offset``) and bounded
history, and the cursor a client resumes from.
"""

from __future__ import annotations

import os
import re
from collections import deque
from typing import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from .._errors import BadRequest
from ._config import TopicLimits

__all__ = ["Message", "Topic", "format_cursor", "parse_cursor"]

_EPOCH_RE = re.compile(r"^[0-9a-f]{1,32}$")

#: Number of frame caches a message has (see :meth:`Message.frame`).
FRAME_SLOTS = 5


class Message:
    """
    One published message.  ``data`` is its payload as compact JSON text;
    ``id`` is ``epoch:offset`` in its topic.
    """

    __slots__ = ("topic", "offset", "id", "event", "data", "time", "size", "_frames")

    def __init__(self, topic: str, offset: int, id: str, event: str, data: bytes,
                 time: float) -> None:
        self.topic = topic
        self.offset = offset
        self.id = id
        self.event = event
        self.data = data
        self.time = time
        # What the history counts: payload plus the per-message overhead.
        self.size = len(data) + 160
        self._frames: list[bytes | None] | None = None

    def frame(self, slot: int, encode: Callable[[Message], bytes]) -> bytes:
        """
        This message encoded by ``encode``, once for all: the same bytes
        object goes to every connection that frames it the same way.  The
        sinks (:mod:`pipecomet._responders`) number their framings
        ``0 .. FRAME_SLOTS - 1``.
        """
        frames = self._frames
        if frames is None:
            frames = self._frames = [None] * FRAME_SLOTS
        out = frames[slot]
        if out is None:
            out = frames[slot] = encode(self)
        return out


class Topic:
    """
    A topic's ids and bounded history.  Old messages leave by count and
    bytes on append, and by age through one timed call at the oldest
    message's expiry (messages are in time order: nothing is scanned).

    :param when_empty: called when the history has emptied by age (the hub
        may then forget the topic).
    """

    __slots__ = ("reactor", "when_empty", "name", "key", "epoch", "last_offset", "history",
                 "bytes", "subscribers", "timer", "idle", "limits", "evicted", "loaded",
                 "waiting", "early", "keys", "alone")

    def __init__(self, reactor: IReactorTime, name: str, limits: TopicLimits,
                 when_empty: Callable[[Topic], None], loaded: bool = True) -> None:
        self.reactor = reactor
        self.when_empty = when_empty
        self.name = name
        # The topic's key in the EventKeeper, shared by all its waiters.
        self.key = ("comet", name)
        # The keys and topics of a subscription to this topic alone
        # (shared by all such subscriptions).
        self.keys = (self.key,)
        self.alone: tuple[Topic, ...] = (self,)
        self.epoch = os.urandom(4).hex()
        self.last_offset = 0
        self.history: deque[Message] = deque()
        self.bytes = 0
        self.subscribers = 0
        self.timer: IDelayedCall | None = None
        self.idle: IDelayedCall | None = None
        self.limits = limits
        self.evicted = 0
        # With a bus that keeps the history (Redis), a topic is loaded from
        # it before it serves; ``waiting`` holds the Deferreds of a load in
        # progress and ``early`` the messages that arrived meanwhile.
        self.loaded = loaded
        self.waiting: list[Deferred[None]] | None = None
        self.early: list[tuple[str, int, str, bytes]] = []

    @property
    def first_offset(self) -> int:
        """
        Offset of the oldest message kept (``last_offset + 1`` when none).
        """
        return self.history[0].offset if self.history else self.last_offset + 1

    def id_at(self, offset: int) -> str:
        return f"{self.epoch}:{offset}"

    def append(self, event: str, data: bytes, now: float, offset: int | None = None) -> Message:
        self.busy()
        self.last_offset = self.last_offset + 1 if offset is None else offset
        msg = Message(self.name, self.last_offset, f"{self.epoch}:{self.last_offset}", event,
                      data, now)
        lim = self.limits
        if lim.history_count == 0 or msg.size > lim.history_bytes:
            return msg
        h = self.history
        h.append(msg)
        self.bytes += msg.size
        while len(h) > lim.history_count or self.bytes > lim.history_bytes:
            self.bytes -= h.popleft().size
            self.evicted += 1
        if self.timer is None:
            self.timer = self.reactor.callLater(lim.history_age, self._expire)
        return msg

    def _expire(self) -> None:
        self.timer = None
        now = self.reactor.seconds()
        age = self.limits.history_age
        h = self.history
        while h and h[0].time + age <= now:
            self.bytes -= h.popleft().size
            self.evicted += 1
        if h:
            self.timer = self.reactor.callLater(h[0].time + age - now, self._expire)
        else:
            self.when_empty(self)

    def after(self, offset: int, limit: int | None = None) -> list[Message]:
        """
        Kept messages with an offset above ``offset``, oldest first.
        """
        h = self.history
        if not h:
            return []
        start = max(0, offset + 1 - h[0].offset)
        end = len(h) if limit is None else min(len(h), start + limit)
        if start >= end:
            return []
        if start == 0 and end == len(h):
            return list(h)
        return [h[i] for i in range(start, end)]

    def clear(self) -> None:
        """
        Drop the kept messages (the ids go on).
        """
        self.history.clear()
        self.bytes = 0

    def busy(self) -> None:
        """
        The topic is in use again: it is not to be forgotten.
        """
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None

    def close(self) -> None:
        self.busy()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def format_cursor(positions: Sequence[tuple[str, str, int]], single: bool) -> str:
    """
    ``epoch:offset`` for one topic, ``topic:epoch:offset,...`` for several.
    """
    if single:
        _, epoch, offset = positions[0]
        return f"{epoch}:{offset}"
    return ",".join(f"{t}:{e}:{o}" for t, e, o in positions)


def parse_cursor(text: str, topics: Sequence[str]) -> dict[str, tuple[str, int]]:
    """
    Read a cursor into ``{topic: (epoch, offset)}``.  ``0`` means "from the
    start of every topic's history" (epoch ``""``).  Raises 400
    ``bad_cursor`` on anything malformed.
    """
    text = text.strip()
    if text in ("", "0"):
        return {t: ("", 0) for t in topics}
    out: dict[str, tuple[str, int]] = {}
    for entry in text.split(","):
        parts = entry.strip().split(":")
        if len(parts) == 2 and len(topics) == 1:
            topic, epoch, offset = topics[0], parts[0], parts[1]
        elif len(parts) == 3:
            topic, epoch, offset = parts
        else:
            raise BadRequest(f"malformed cursor {text[:80]!r}", code="bad_cursor")
        # isdigit() alone takes any Unicode digit ("٣" is 3): ASCII only.
        if (not _EPOCH_RE.match(epoch) or not offset.isascii() or not offset.isdigit()
                or len(offset) > 18):
            raise BadRequest(f"malformed cursor {text[:80]!r}", code="bad_cursor")
        if topic in topics:
            out[topic] = (epoch, int(offset))
    return out
