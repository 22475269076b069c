"""
The comet hub of one process: the registry of its topics and held
subscriptions, its lifecycle (heartbeats, the farewell at shutdown), and the
bus's receiver on which publishes arrive.

A publish goes through the bus (:mod:`pipecomet._bus`) to the hub of every
process.  The hub gives the message its id ``epoch:offset`` in its topic,
keeps it in the topic's bounded history (count, bytes, age) and fires the
topic's key in the :class:`~pipecomet._events.EventKeeper`; each waiting
:class:`~pipecomet._comet.Subscription` is an event listener there and
sends the message to its client.  The Deferred a publish returns is the
bus's own report (:class:`~pipecomet._bus.BusDelivery`), whatever the bus:
the in-memory one fires it at once, a networked one when the broker has
answered.

Its parts live beside it: who may subscribe and what a request asks for in
:mod:`~pipecomet._comet._admission`, the publish checks, results and
idempotency keys in :mod:`~pipecomet._comet._publishing`, topics kept by a
bus that keeps the history in :mod:`~pipecomet._comet._history`, the counts
and the status in :mod:`~pipecomet._comet._stats`.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Any, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._bus import BusDelivery
from .._chain import PipeInput
from .._errors import PipecometError, ServiceUnavailable
from .._events import EventKeeper
from .._interfaces import IBus, IBusReceiver, IHistoryBus
from .._json import dumps
from ._admission import check_room, read_request
from ._config import END_EVENT, CometConfig, limits_for
from ._history import HistoryFollower
from ._publishing import IdempotencyKeys, Published, check_message, check_topic
from ._stats import CometStats, status
from ._subscription import End, Subscription
from ._topics import Message, Topic

if TYPE_CHECKING:
    from .._json import JSON

__all__ = ["CometHub", "CometService"]

log = Logger()


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
        self._idem = IdempotencyKeys(reactor, config.idempotency_ttl, config.idempotency_keys)
        self._heartbeat: IDelayedCall | None = None
        # A bus that keeps the history (Redis) numbers the messages; the
        # topics here are then a cache of it, loaded before they serve.
        self._history = HistoryFollower(self, bus) if IHistoryBus.providedBy(bus) else None
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
        Graceful shutdown, the farewell: every held request gets a final
        event saying when to reconnect (spread over ``retry`` ..
        2×``retry``) and, on a stream, the cursor to resume from; then it
        closes.
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

    def check_topic(self, name: str) -> None:
        """
        Raise (and count) 400 ``bad_topic`` unless ``name`` is a topic name.
        """
        try:
            check_topic(name)
        except PipecometError as e:
            raise self.stats.reject(e) from None

    # -- publishing

    def publish(self, topic: str, data: object, event: str = "message",
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
        try:
            check_topic(topic)
            check_message(event, data, self.config.max_message_bytes)
        except PipecometError as e:
            raise self.stats.reject(e) from None
        if key is not None and not self.history_bus:
            seen = self._idem.seen(topic, key)
            if seen is not None:
                self.stats.duplicates += 1
                return succeed(Published(topic, seen, 0, True))
        if topic not in self.topics and len(self.topics) >= self.config.max_topics \
                and not self.history_bus:
            raise self.stats.reject(ServiceUnavailable(
                f"{len(self.topics)} topics are alive; the limit is {self.config.max_topics}",
                code="too_many_topics", retry_after=self.config.retry))

        def done(result: BusDelivery) -> Published:
            if result.duplicate and self.history_bus:
                self.stats.duplicates += 1
            return Published(topic, result.id, result.delivered, result.duplicate)

        def failed(f: Failure) -> Failure:
            if isinstance(f.value, PipecometError):
                self.stats.reject(f.value)
            return f

        return self.bus.publish(topic, event, data, key).addCallbacks(done, failed)

    def complete(self, topic: str, data: object = None) -> Deferred[Published]:
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
            assert self._history is not None, "only a history bus numbers messages"
            self._history.numbered(topic, id, event, data)
            return None
        idem = self._idem
        if key is not None:
            seen = idem.seen(topic, key)
            if seen is not None:
                self.stats.duplicates += 1
                return BusDelivery(seen, 0, True)
        t = self._topic(topic)
        msg = t.append(event, data, self.reactor.seconds())
        if key is not None:
            idem.remember(topic, key, msg.id)
        reached = self.deliver(t, msg)
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
        if self._history is not None:
            # The bus kept what was published meanwhile.
            self._history.catch_up()
            return
        # Messages published elsewhere while the broker was away never
        # reached this process: say so to every subscriber, never silently.
        for sub in list(self._streams):
            for t in sub.objs:
                sub.send_control("gap", {"topic": t.name, "reason": "bus", "missed": None})
        for sub in list(self._polls):
            sub.answer_poll([], [{"topic": t.name, "reason": "bus", "missed": None}
                                 for t in sub.objs])

    # -- delivering

    def deliver(self, t: Topic, msg: Message) -> int:
        """
        ``msg``, stored in ``t``, goes to every subscriber waiting on it:
        the number reached.
        """
        self.stats.published += 1
        reached = self.keeper.fire(t.key, msg)
        self.stats.delivered += reached
        return reached

    def tell(self, t: Topic, name: str, fields: dict[str, Any], pos: int) -> None:
        """
        Send the control event ``name`` to every subscriber of ``t``, whose
        position there is now ``pos``.
        """
        for sub in list(self._streams):
            if t in sub.objs:
                sub.set_pos(t.name, pos)
                sub.send_control(name, fields)
        for sub in list(self._polls):
            if t in sub.objs and sub.event is not None:
                sub.set_pos(t.name, pos)
                sub.answer_poll([], [fields])

    def load_topics(self, topics: Sequence[Topic]) -> Deferred[None] | None:
        """
        None when every topic can serve now; else (a bus that keeps the
        history) a Deferred that fires when they are loaded from the bus.
        Raises 503 ``bus_unavailable`` while that bus is down.
        """
        if self._history is None:
            return None
        return self._history.load_topics(topics)

    # -- subscribing

    def subscription(self, inp: PipeInput, topics: Sequence[str]) -> Subscription:
        """
        A subscription of ``inp``'s request to ``topics``, after the limits
        and the request's cursor (``Last-Event-ID`` header, then
        ``last_event_id=``, then ``since=``), ``last=1`` and ``timeout=``
        (see :mod:`~pipecomet._comet._admission`); a refusal is counted.
        """
        try:
            asked = read_request(inp, topics, self.config)
            check_room(self.config, asked.topics, self.topics, self.connections, self.closing)
        except PipecometError as e:
            raise self.stats.reject(e) from None
        return Subscription(self, inp.request, asked.topics, asked.cursors, asked.last,
                            asked.timeout)

    def opened(self, sub: Subscription) -> None:
        """
        ``sub`` is served: count it and tie it to its topics.
        """
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
        # One topic's tuple is shared by its subscribers.
        sub.objs = objs[0].alone if len(objs) == 1 else tuple(objs)
        sub.pos = [0] * len(objs)

    def streaming(self, sub: Subscription) -> None:
        """
        ``sub`` streams (its replay is out): it gets heartbeats and the
        farewell.
        """
        self._streams[sub] = None

    def closed(self, sub: Subscription) -> None:
        """
        ``sub`` has ended: let go of it.
        """
        self.connections -= 1
        self._streams.pop(sub, None)
        self._polls.pop(sub, None)
        for t in sub.objs:
            t.subscribers -= 1
            if t.subscribers == 0 and not t.history:
                self._maybe_forget(t)

    # -- figures

    def status(self) -> dict[str, JSON]:
        return status(self)


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
