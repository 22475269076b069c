"""
Topics kept by a bus that keeps the history (Redis, :class:`IHistoryBus`):
the bus numbers the messages and the hub's topics are a cache of it, loaded
before they serve and brought back in line after a drop; what cannot be
brought back is told to the subscribers (``gap``, ``reset``), never lost
silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.python.failure import Failure

from .._bus import TopicHistory
from .._errors import ServiceUnavailable
from .._interfaces import IHistoryBus
from ._topics import Topic

if TYPE_CHECKING:
    from ._hub import CometHub

__all__ = ["HistoryFollower"]


class HistoryFollower:
    """
    Keeps ``hub``'s topics in line with ``bus``, the copy of record.

    :param hub: the hub whose topics, counts and subscribers these are.
    :param bus: the bus that numbers and keeps the messages.
    """

    __slots__ = ("hub", "bus")

    def __init__(self, hub: CometHub, bus: IHistoryBus) -> None:
        self.hub = hub
        self.bus = bus

    def load_topics(self, topics: Sequence[Topic]) -> Deferred[None] | None:
        """
        None when every topic can serve now; else a Deferred that fires
        when they are loaded from the bus.  Raises 503 ``bus_unavailable``
        while the bus is down (subscribers already held stay).
        """
        hub = self.hub
        if not hub.bus_ok:
            raise hub.stats.reject(ServiceUnavailable("the comet bus is unavailable",
                                                      code="bus_unavailable",
                                                      retry_after=hub.config.retry))
        waits = [self.load(t) for t in topics if not t.loaded or t.waiting is not None]
        if not waits:
            return None

        def first_failure(f: Failure) -> Failure:
            # gatherResults wraps the failure: give the load's own.
            error = f.value
            assert isinstance(error, FirstError)
            sub: Failure = error.subFailure
            return sub

        return gatherResults(waits, consumeErrors=True).addCallbacks(lambda _: None,
                                                                     first_failure)

    def catch_up(self) -> None:
        """
        The bus is back: each topic held here catches up from it (missed
        messages, or a gap/reset event for what it no longer has).
        """
        for t in list(self.hub.topics.values()):
            if t.loaded and t.waiting is None:
                self.load(t).addErrback(lambda f: None)

    def load(self, t: Topic) -> Deferred[None]:
        """
        Load ``t`` from the bus (one load at a time per topic; later
        callers wait for it).
        """
        d: Deferred[None] = Deferred()
        if t.waiting is not None:
            t.waiting.append(d)
            return d
        t.waiting = [d]

        def loaded(history: TopicHistory) -> None:
            waiting, t.waiting = t.waiting or [], None
            self._sync(t, history)
            for w in waiting:
                w.callback(None)

        def failed(f: Failure) -> None:
            waiting, t.waiting = t.waiting or [], None
            t.early = []
            for w in waiting:
                w.errback(f)

        self.bus.load(t.name, t.limits.history_count).addCallbacks(loaded, failed)
        return d

    def _sync(self, t: Topic, history: TopicHistory) -> None:
        """
        Bring ``t`` in line with the bus's copy: the first load takes it
        as is; a later one (after a drop) delivers what was missed, or
        says what is gone (``gap``) or that the epoch changed (``reset``).
        """
        msgs = history.messages
        if not t.loaded:
            t.loaded = True
            t.epoch = history.epoch
            t.clear()
            first = msgs[0].offset if msgs else history.last_offset + 1
            t.last_offset = first - 1
            for m in msgs:
                t.append(m.event, m.data, m.time, m.offset)
            t.last_offset = history.last_offset
        else:
            if history.epoch != t.epoch and not msgs:
                self._reset(t, history.epoch, history.last_offset)
            for m in msgs:
                self._receive(t, history.epoch, m.offset, m.event, m.data, m.time)
            if history.last_offset > t.last_offset:
                self._gap(t, history.last_offset)
        early, t.early = t.early, []
        now = self.hub.reactor.seconds()
        for epoch, offset, event, data in early:
            self._receive(t, epoch, offset, event, data, now)

    def numbered(self, topic: str, id: str, event: str, data: bytes) -> None:
        """
        A message the bus numbered ``id`` (``epoch:offset``) arrived live.
        """
        t = self.hub.topics.get(topic)
        if t is None:
            return  # not held here: the bus keeps its history
        epoch, _, offset = id.partition(":")
        if not t.loaded or t.waiting is not None:
            t.early.append((epoch, int(offset), event, data))
            return
        off = int(offset)
        if epoch == t.epoch and off > t.last_offset + 1:
            # Messages between went past us: the bus may still have them.
            t.early.append((epoch, off, event, data))
            self.load(t).addErrback(lambda f: None)
            return
        self._receive(t, epoch, off, event, data, self.hub.reactor.seconds())

    def _receive(self, t: Topic, epoch: str, offset: int, event: str, data: bytes,
                 now: float) -> None:
        if epoch != t.epoch:
            self._reset(t, epoch, offset - 1)
        elif offset <= t.last_offset:
            return  # already here (replayed and live both)
        elif offset > t.last_offset + 1:
            self._gap(t, offset - 1)
        self.hub.deliver(t, t.append(event, data, now, offset))

    def _reset(self, t: Topic, epoch: str, last: int) -> None:
        """
        The bus lost the topic's history and started a new epoch: say so.
        """
        old = t.id_at(t.last_offset)
        t.epoch = epoch
        t.clear()
        t.last_offset = last
        self.hub.stats.resets += 1
        self.hub.tell(t, "reset", {"topic": t.name, "reason": "reset", "from": old,
                                   "resumed_from": t.id_at(last), "epoch": epoch}, last)

    def _gap(self, t: Topic, upto: int) -> None:
        """
        Offsets ``t.last_offset + 1 .. upto`` are gone for good: say so.
        """
        missed = upto - t.last_offset
        self.hub.stats.gaps += 1
        fields: dict[str, Any] = {"topic": t.name, "reason": "bus",
                                  "from": t.id_at(t.last_offset),
                                  "resumed_from": t.id_at(upto), "missed": missed}
        self.hub.tell(t, "gap", fields, upto)
        # The local history stays contiguous: it restarts after the gap.
        t.clear()
        t.last_offset = upto
