"""
The bus between the processes that serve one app, and its in-memory default.

The comet hub of each process is an :class:`~pipecomet._interfaces.IBusReceiver`:
a publish goes through the bus and comes back to every hub, which stores it
in its topic's history and pushes it to the subscribers.  The in-memory bus
serves one process; the Redis bus (:mod:`pipecomet._redis_bus`) implements
the same interface for many processes and hosts, keeps the history itself
(:class:`~pipecomet._interfaces.IHistoryBus`) and reports drops and
reconnects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from ._interfaces import Delivery, IBus, IBusReceiver

if TYPE_CHECKING:
    from ._app import App
    from ._redis_bus import RedisBus

__all__ = ["MemoryBus", "BusConfig", "BusDelivery", "TopicHistory", "StoredMessage", "install"]


@attrs.frozen
class BusDelivery:
    """
    What a publish did, as the bus reports it.

    :ivar id: the message's ``epoch:offset`` (None when it was not kept).
    :ivar delivered: with the in-memory bus, the subscribers reached; with
        Redis, the serving processes the message reached.
    :ivar duplicate: the idempotency key was seen: nothing was published
        and ``id`` is the first publish's.
    """

    id: str | None
    delivered: int
    duplicate: bool = False


@attrs.frozen
class StoredMessage:
    """
    One message of a topic's history as a bus keeps it.
    """

    offset: int
    event: str
    data: bytes
    time: float


@attrs.frozen
class TopicHistory:
    """
    A topic as a history-keeping bus holds it: its epoch, the last offset
    given out and the newest messages kept (oldest first, contiguous).
    """

    epoch: str
    last_offset: int
    messages: tuple[StoredMessage, ...]


@implementer(IBus)
class MemoryBus:
    """
    Delivers every publish synchronously to the receivers of this process.

    Delivery before ``publish`` returns keeps the in-process API simple: the
    caller learns at once how many subscribers were reached, and message
    order is publish order.
    """

    connected = True

    def __init__(self) -> None:
        self._receivers: list[IBusReceiver] = []
        self.published = 0

    def publish(self, topic: str, event: str, data: bytes, key: str | None = None) -> Deferred:
        self.published += 1
        first: Delivery | None = None
        delivered = 0
        for r in tuple(self._receivers):
            done = r.bus_message(topic, event, data, key)
            if done is not None:
                delivered += done.delivered
                if first is None:
                    first = done
        if first is None:
            return succeed(BusDelivery(None, 0))
        return succeed(BusDelivery(first.id, delivered, first.duplicate))

    def add_receiver(self, receiver: IBusReceiver) -> None:
        if receiver not in self._receivers:
            self._receivers.append(receiver)
            receiver.bus_up()

    def remove_receiver(self, receiver: IBusReceiver) -> None:
        if receiver in self._receivers:
            self._receivers.remove(receiver)

    def status(self) -> dict[str, Any]:
        return {"kind": "memory", "connected": True, "receivers": len(self._receivers),
                "published": self.published}


BUS_KINDS = ("memory", "redis")
ON_UNAVAILABLE = ("fail", "serve")

_v = attrs.validators


@attrs.frozen
class BusConfig:
    """
    ``[bus]``: how comet messages travel between the processes and hosts
    serving one app.

    :ivar kind: ``"memory"`` (one process) or ``"redis"`` (any number of
        processes and hosts; the history lives in Redis).
    :ivar url: ``redis://[:password@]host[:port][/db]`` or
        ``unix:///path/redis.sock[?db=N]``.
    :ivar prefix: prefix of every Redis key and of the pub/sub channel.
    :ivar on_unavailable: Redis unreachable at start: ``"fail"`` the start
        with a message naming the URL, or ``"serve"`` and answer 503
        ``bus_unavailable`` until it is reached.
    :ivar connect_timeout: seconds a connection attempt may take.
    :ivar command_timeout: seconds Redis may leave a command unanswered
        before the connection counts as lost.
    :ivar ping_interval: seconds between PINGs that find a hung server.
    :ivar reconnect_min: first delay before a reconnect (doubles per try).
    :ivar reconnect_max: longest delay between reconnects.
    :ivar retry_after: ``Retry-After`` seconds of a 503 ``bus_unavailable``.
    :ivar topic_ttl: seconds a topic's keys live in Redis after its last
        publish; past that its next publish starts a new epoch.
    """

    kind: str = attrs.field(default="memory", validator=_v.in_(BUS_KINDS))
    url: str = attrs.field(default="redis://127.0.0.1:6379/0", validator=_v.instance_of(str))
    prefix: str = attrs.field(default="pipecomet",
                              validator=[_v.instance_of(str), _v.matches_re(r"^[A-Za-z0-9_.\-]{1,64}$")])
    on_unavailable: str = attrs.field(default="fail", validator=_v.in_(ON_UNAVAILABLE))
    connect_timeout: float = attrs.field(default=5.0, converter=float, validator=_v.gt(0))
    command_timeout: float = attrs.field(default=5.0, converter=float, validator=_v.gt(0))
    ping_interval: float = attrs.field(default=5.0, converter=float, validator=_v.gt(0))
    reconnect_min: float = attrs.field(default=0.1, converter=float, validator=_v.gt(0))
    reconnect_max: float = attrs.field(default=5.0, converter=float, validator=_v.gt(0))
    retry_after: float = attrs.field(default=1.0, converter=float, validator=_v.gt(0))
    topic_ttl: float = attrs.field(default=86400.0, converter=float, validator=_v.ge(1))

    def __attrs_post_init__(self) -> None:
        if self.kind == "redis":
            from ._redis_bus import parse_url

            try:
                parse_url(self.url)
            except ValueError as e:
                raise ValueError(str(e)) from None
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min: must be <= reconnect_max")


class _BusService(Service):
    """
    Connects a broker-backed bus with the app and lets go of it on stop.
    """

    name = "bus"

    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus

    def startService(self) -> None:
        super().startService()
        self.bus.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.bus.stop()


def install(app: App, config: BusConfig) -> None:
    """
    ``[bus]`` installer: with ``kind = "redis"`` the app's bus is a
    :class:`~pipecomet._redis_bus.RedisBus` connected with the app (the
    comet installer, which runs after, uses it); the in-memory bus is the
    comet installer's default.
    """
    if config.kind != "redis" or app.runtime.bus is not None:
        return
    from ._redis_bus import RedisBus

    bus = RedisBus(app.reactor, config)
    app.runtime.bus = bus
    app.add_service(_BusService(bus))
