"""
The comet hub of one process: its topics, its held subscriptions, its
figures, and publishing through the bus.

A publish goes through the bus (:mod:`pipecomet._bus`) to the hub of every
process.  The hub gives the message its id ``epoch:offset`` in its topic,
keeps it in the topic's bounded history (count, bytes, age) and fires the
topic's key in the :class:`~pipecomet._events.EventKeeper`; each waiting
:class:`~pipecomet._comet.Subscription` is an event listener there and
sends the message to its client.  The Deferred a publish returns is the
bus's own report (:class:`~pipecomet._bus.BusDelivery`), whatever the bus:
the in-memory one fires it at once, a networked one when the broker has
answered.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from typing import Any, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._bus import BusDelivery, TopicHistory
from .._chain import PipeInput
from .._errors import BadRequest, PayloadTooLarge, PipecometError, ServiceUnavailable
from .._events import EventKeeper
from .._interfaces import IBus, IBusReceiver, IHistoryBus
from .._json import dumps
from ._config import END_EVENT, EVENT_RE, RESERVED_EVENTS, TOPIC_RE, CometConfig, limits_for
from ._subscription import End, Subscription
from ._topics import Topic, parse_cursor

__all__ = ["CometHub", "CometService", "CometStats", "Published"]

log = Logger()

TRANSPORTS = ("sse", "ndjson", "longpoll")


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


@implementer(IBusReceiver)
class CometHub:
    """
    The topics, subscriptions and figures of comet push in one process.
    """

    def __init__(self, reactor: IReactorTime, keeper: EventKeeper, bus: IBus,
                 config: CometConfig) -> None:
        self.reactor = reactor
        self.keeper = keeper
        self.bus = bus
        self.config = config
        self.topics: dict[str, Topic] = {}
        self._streams: dict[Subscription, None] = {}
        self._polls: dict[Subscription, None] = {}
        self._idem: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self._heartbeat: IDelayedCall | None = None
        # A bus that keeps the history (Redis) numbers the messages; the
        # topics here are then a cache of it, loaded before they serve.
        self._history: IHistoryBus | None = bus if IHistoryBus.providedBy(bus) else None
        self.history_bus = self._history is not None
        self.closing = False
        self.bus_ok = True
        self.connections = 0
        self.stats = CometStats()

    # -- lifecycle

    def start(self) -> None:
        self.closing = False
        self.bus.add_receiver(self)
        if self._heartbeat is None:
            self._heartbeat = self.reactor.callLater(self.config.heartbeat, self._beat)

    def stop(self) -> None:
        """
        Graceful shutdown: every held request gets a final event saying
        when to reconnect (spread over ``retry`` .. 2×``retry``), then closes.
        """
        self.closing = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        retry = self.config.retry
        for sub in list(self._streams) + list(self._polls):
            sub.shutdown(round(retry * (1 + random.random()), 3))
        self.bus.remove_receiver(self)
        for t in list(self.topics.values()):
            t.close()

    def _beat(self) -> None:
        self._heartbeat = self.reactor.callLater(self.config.heartbeat, self._beat)
        for sub in list(self._streams):
            sub.heartbeat()

    # -- topics

    def _topic(self, name: str) -> Topic:
        t = self.topics.get(name)
        if t is None:
            t = self.topics[name] = Topic(self.reactor, name, limits_for(self.config, name),
                                          self._maybe_forget, loaded=not self.history_bus)
        return t

    def _maybe_forget(self, t: Topic) -> None:
        """
        A topic with no subscriber and no history is forgotten after
        ``history_age`` idle seconds (its epoch with it): kept meanwhile so
        that a client between two polls resumes without a reset.
        """
        if t.subscribers == 0 and not t.history and t.idle is None:
            t.idle = self.reactor.callLater(t.limits.history_age, self._forget, t)

    def _forget(self, t: Topic) -> None:
        t.idle = None
        if t.subscribers == 0 and not t.history and self.topics.get(t.name) is t:
            t.close()
            del self.topics[t.name]

    def _reject(self, error: PipecometError) -> PipecometError:
        self.stats.rejected[error.code] = self.stats.rejected.get(error.code, 0) + 1
        return error

    def check_topic(self, name: str) -> None:
        if not TOPIC_RE.match(name):
            raise self._reject(BadRequest(
                "topic names are 1-100 of A-Z a-z 0-9 _ . -", code="bad_topic"))

    # -- publishing

    def publish(self, topic: str, data: Any, event: str = "message",
                key: str | None = None) -> Deferred[Published]:
        """
        Publish ``data`` (JSON-able) on ``topic``: a Deferred of
        :class:`Published` (see :meth:`publish_json`).
        """
        return self.publish_json(topic, dumps(data), event, key)

    def publish_json(self, topic: str, data: bytes, event: str = "message",
                     key: str | None = None) -> Deferred[Published]:
        """
        Publish ``data``, already compact JSON text.  Returns a Deferred of
        :class:`Published` as the bus reports it: with the in-memory bus
        ``delivered`` counts the subscribers reached (it fires at once),
        with Redis the serving processes reached.  Raises 400 for a bad
        topic or event name, 413 past ``max_message_bytes``, 503 when a new
        topic would pass ``max_topics``; the Deferred fails with 503
        ``bus_unavailable`` when the bus cannot take the message.
        """
        self.check_topic(topic)
        if event != "message" and (not EVENT_RE.match(event) or event in RESERVED_EVENTS
                                   or event == END_EVENT):
            raise self._reject(BadRequest(f"event name {event[:64]!r} is not allowed",
                                          code="bad_event"))
        if len(data) > self.config.max_message_bytes:
            raise self._reject(PayloadTooLarge(
                f"message of {len(data)} bytes; the limit is {self.config.max_message_bytes}",
                code="message_too_large"))
        if key is not None and not self.history_bus:
            seen = self._seen(topic, key)
            if seen is not None:
                self.stats.duplicates += 1
                return succeed(Published(topic, seen, 0, True))
        if topic not in self.topics and len(self.topics) >= self.config.max_topics \
                and not self.history_bus:
            raise self._reject(ServiceUnavailable(
                f"{len(self.topics)} topics are alive; the limit is {self.config.max_topics}",
                code="too_many_topics", retry_after=self.config.retry))

        def done(result: BusDelivery) -> Published:
            if result.duplicate and self.history_bus:
                self.stats.duplicates += 1
            return Published(topic, result.id, result.delivered, result.duplicate)

        def failed(f: Failure) -> Failure:
            if isinstance(f.value, PipecometError):
                self._reject(f.value)
            return f

        return self.bus.publish(topic, event, data, key).addCallbacks(done, failed)

    def complete(self, topic: str, data: Any = None) -> Deferred[Published]:
        """
        The end event of ``topic``: every subscriber gets ``end`` and its
        request closes.  A Deferred of :class:`Published` as the bus reports
        it (``delivered``: the subscribers reached with the in-memory bus,
        the processes with Redis; ``id`` is None); a bus that cannot take
        it is logged and counts as 0 reached.
        """
        self.check_topic(topic)

        def failed(f: Failure) -> Published:
            log.warn("comet end of {topic} not published: {error}", topic=topic, error=f.value)
            return Published(topic, None, 0)

        return self.bus.publish(topic, END_EVENT, dumps(data)).addCallbacks(
            lambda done: Published(topic, None, done.delivered), failed)

    def _seen(self, topic: str, key: str) -> str | None:
        idem = self._idem
        now = self.reactor.seconds()
        # Keys expire in insertion order: stop at the first one still fresh.
        while idem:
            first = next(iter(idem.values()))
            if first[0] > now:
                break
            idem.popitem(last=False)
        hit = idem.get((topic, key))
        return hit[1] if hit is not None else None

    # -- IBusReceiver

    def bus_message(self, topic: str, event: str, data: bytes, key: str | None,
                    id: str | None = None) -> BusDelivery | None:
        if event == END_EVENT:
            try:
                value = json.loads(data)
            except ValueError:
                value = None
            return BusDelivery(None, self.keeper.complete(("comet", topic),
                                                          End(topic=topic, data=value)))
        if id is not None:
            self._numbered(topic, id, event, data)
            return None
        if key is not None:
            seen = self._seen(topic, key)
            if seen is not None:
                self.stats.duplicates += 1
                return BusDelivery(seen, 0, True)
        t = self._topic(topic)
        msg = t.append(event, data, self.reactor.seconds())
        self.stats.published += 1
        if key is not None:
            idem = self._idem
            idem[(topic, key)] = (self.reactor.seconds() + self.config.idempotency_ttl, msg.id)
            while len(idem) > self.config.idempotency_keys:
                idem.popitem(last=False)
        reached = self.keeper.fire(t.key, msg)
        self.stats.delivered += reached
        if t.subscribers == 0 and not t.history:
            self._maybe_forget(t)
        return BusDelivery(msg.id, reached)

    def bus_down(self, reason: str) -> None:
        if not self.bus_ok:
            return
        self.bus_ok = False
        self.stats.bus_drops += 1
        log.warn("comet bus down: {reason}", reason=reason)

    def bus_up(self) -> None:
        if self.bus_ok:
            return
        self.bus_ok = True
        if self.history_bus:
            # The bus kept what was published meanwhile: each topic held
            # here catches up from it (missed messages, or a gap/reset
            # event for what it no longer has).
            for t in list(self.topics.values()):
                if t.loaded and t.waiting is None:
                    self._load(t).addErrback(lambda f: None)
            return
        # Messages published elsewhere while the broker was away never
        # reached this process: say so to every subscriber, never silently.
        for sub in list(self._streams):
            for t in sub.objs:
                sub.send_control("gap", {"topic": t.name, "reason": "bus", "missed": None})
        for sub in list(self._polls):
            sub.answer_poll([], [{"topic": t.name, "reason": "bus", "missed": None}
                                 for t in sub.objs])

    # -- a bus that keeps the history (Redis)

    def load_topics(self, topics: Sequence[Topic]) -> Deferred[None] | None:
        """
        None when every topic can serve now; else a Deferred that fires
        when they are loaded from the bus.  Raises 503 ``bus_unavailable``
        while the bus is down (subscribers already held stay).
        """
        if not self.history_bus:
            return None
        if not self.bus_ok:
            raise self._reject(ServiceUnavailable("the comet bus is unavailable",
                                                  code="bus_unavailable",
                                                  retry_after=self.config.retry))
        waits = [self._load(t) for t in topics if not t.loaded or t.waiting is not None]
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

    def _load(self, t: Topic) -> Deferred[None]:
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

        assert self._history is not None, "only a history bus loads topics"
        self._history.load(t.name, t.limits.history_count).addCallbacks(loaded, failed)
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
            t.history.clear()
            t.bytes = 0
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
        for epoch, offset, event, data in early:
            self._receive(t, epoch, offset, event, data, self.reactor.seconds())

    def _numbered(self, topic: str, id: str, event: str, data: bytes) -> None:
        t = self.topics.get(topic)
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
            self._load(t).addErrback(lambda f: None)
            return
        self._receive(t, epoch, off, event, data, self.reactor.seconds())

    def _receive(self, t: Topic, epoch: str, offset: int, event: str, data: bytes,
                 now: float) -> None:
        if epoch != t.epoch:
            self._reset(t, epoch, offset - 1)
        elif offset <= t.last_offset:
            return  # already here (replayed and live both)
        elif offset > t.last_offset + 1:
            self._gap(t, offset - 1)
        msg = t.append(event, data, now, offset)
        self.stats.published += 1
        self.stats.delivered += self.keeper.fire(t.key, msg)

    def _reset(self, t: Topic, epoch: str, last: int) -> None:
        """
        The bus lost the topic's history and started a new epoch: say so.
        """
        old = t.id_at(t.last_offset)
        t.epoch = epoch
        t.history.clear()
        t.bytes = 0
        t.last_offset = last
        self.stats.resets += 1
        self._tell(t, "reset", {"topic": t.name, "reason": "reset", "from": old,
                                "resumed_from": t.id_at(last), "epoch": epoch}, last)

    def _gap(self, t: Topic, upto: int) -> None:
        """
        Offsets ``t.last_offset + 1 .. upto`` are gone for good: say so.
        """
        missed = upto - t.last_offset
        self.stats.gaps += 1
        self._tell(t, "gap", {"topic": t.name, "reason": "bus", "from": t.id_at(t.last_offset),
                              "resumed_from": t.id_at(upto), "missed": missed}, upto)
        # The local history stays contiguous: it restarts after the gap.
        t.history.clear()
        t.bytes = 0
        t.last_offset = upto

    def _tell(self, t: Topic, name: str, fields: dict[str, Any], pos: int) -> None:
        for sub in list(self._streams):
            if t in sub.objs:
                sub.set_pos(t.name, pos)
                sub.send_control(name, fields)
        for sub in list(self._polls):
            if t in sub.objs and sub.event is not None:
                sub.set_pos(t.name, pos)
                sub.answer_poll([], [fields])

    # -- subscribing

    def subscription(self, inp: PipeInput, topics: Sequence[str]) -> Subscription:
        """
        A subscription of ``inp``'s request to ``topics``, after the limits
        and the request's cursor (``Last-Event-ID`` header, then
        ``last_event_id=``, then ``since=``), ``last=1`` and ``timeout=``.
        """
        cfg = self.config
        topics = tuple(dict.fromkeys(topics))
        if not topics:
            raise self._reject(BadRequest("no topic given", code="bad_topic"))
        if len(topics) > cfg.max_topics_per_connection:
            raise self._reject(BadRequest(
                f"{len(topics)} topics asked; the limit is {cfg.max_topics_per_connection}",
                code="too_many_topics_per_connection"))
        for name in topics:
            self.check_topic(name)
        if self.closing:
            raise self._reject(ServiceUnavailable("the server is shutting down",
                                                  code="shutting_down", retry_after=cfg.retry))
        if self.connections >= cfg.max_connections:
            raise self._reject(ServiceUnavailable(
                f"{self.connections} comet connections are held; the limit is "
                f"{cfg.max_connections}", code="too_many_connections", retry_after=cfg.retry))
        new = 0
        for name in topics:
            t = self.topics.get(name)
            if t is None:
                new += 1
            elif t.subscribers >= cfg.max_connections_per_topic:
                raise self._reject(ServiceUnavailable(
                    f"topic {name!r} has {t.subscribers} subscribers; the limit is "
                    f"{cfg.max_connections_per_topic}", code="topic_full",
                    retry_after=cfg.retry))
        if new and len(self.topics) + new > cfg.max_topics:
            raise self._reject(ServiceUnavailable(
                f"{len(self.topics)} topics are alive; the limit is {cfg.max_topics}",
                code="too_many_topics", retry_after=cfg.retry))
        q = inp.query
        text = inp.header("last-event-id")
        if text is None:
            text = q.get("last_event_id")
        if text is None:
            text = q.get("since")
        cursors = parse_cursor(text, topics) if text is not None else None
        last = q.get("last", "") in ("1", "true", "yes")
        timeout = None
        if "timeout" in q:
            try:
                timeout = float(q["timeout"])
            except ValueError:
                timeout = -1.0
            if not (timeout > 0):
                raise self._reject(BadRequest("timeout must be a positive number of seconds",
                                              code="bad_timeout"))
            timeout = min(timeout, cfg.longpoll_max_timeout if cfg.max_lifetime == 0
                          else max(cfg.longpoll_max_timeout, cfg.max_lifetime))
        return Subscription(self, inp.request, topics, cursors, last, timeout)

    def _opened(self, sub: Subscription) -> None:
        self.connections += 1
        self.stats.opened[sub.transport] += 1
        if sub.transport == "longpoll":
            self._polls[sub] = None
            if sub.timeout is not None:
                sub.timeout = min(sub.timeout, self.config.longpoll_max_timeout)
        objs = []
        for name in sub.topics:
            t = self._topic(name)
            t.busy()
            t.subscribers += 1
            objs.append(t)
        sub.objs = tuple(objs)
        sub.pos = [0] * len(objs)

    def _closed(self, sub: Subscription) -> None:
        self.connections -= 1
        self._streams.pop(sub, None)
        self._polls.pop(sub, None)
        for t in sub.objs:
            t.subscribers -= 1
            if t.subscribers == 0 and not t.history:
                self._maybe_forget(t)

    # -- figures

    def status(self) -> dict[str, Any]:
        by_kind = dict.fromkeys(TRANSPORTS, 0)
        for sub in self._streams:
            by_kind[sub.transport] += 1
        by_kind["longpoll"] = len(self._polls)
        busiest = sorted(self.topics.values(), key=lambda t: -t.subscribers)[:50]
        return {
            "connections": self.connections,
            "connections_by_transport": by_kind,
            "opened_by_transport": dict(self.stats.opened),
            "topics": len(self.topics),
            "waiters_by_topic": {t.name: t.subscribers for t in busiest if t.subscribers},
            "history_messages": sum(len(t.history) for t in self.topics.values()),
            "history_bytes": sum(t.bytes for t in self.topics.values()),
            "published": self.stats.published,
            "delivered": self.stats.delivered,
            "dropped": self.stats.dropped,
            "duplicates": self.stats.duplicates,
            "slow_disconnects": self.stats.slow_disconnects,
            "resume_hits": self.stats.resume_hits,
            "gaps": self.stats.gaps,
            "resets": self.stats.resets,
            "lifetime_ends": self.stats.lifetime_ends,
            "rejected": dict(self.stats.rejected),
            "idempotency_keys": len(self._idem),
            "bus_connected": self.bus_ok,
            "bus_drops": self.stats.bus_drops,
            "closing": self.closing,
        }


class CometService(Service):
    """
    Starts the hub's heartbeats with the app; on stop, tells every held
    client when to reconnect and closes it.
    """

    name = "comet"

    def __init__(self, hub: CometHub) -> None:
        self.hub = hub

    def startService(self) -> None:
        super().startService()
        self.hub.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.hub.stop()
        return succeed(None)
