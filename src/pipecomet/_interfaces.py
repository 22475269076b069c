"""
The seams of pipecomet that have more than one implementation or that tests
replace, as zope.interface interfaces in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from ._bus import BusDelivery, TopicHistory

__all__ = ["IBus", "IBusReceiver", "IHistoryBus"]


class IBusReceiver(Interface):
    """
    What a bus delivers to: in pipecomet, the comet hub of one process.
    """

    def bus_message(topic: str, event: str, data: bytes, key: str | None,
                    id: str | None = None) -> BusDelivery | None:
        """
        A message published on ``topic`` reached this process.

        :param event: the event name (``"message"`` by default).
        :param data: the payload as JSON text (UTF-8).
        :param key: the publisher's idempotency key, or None.
        :param id: ``epoch:offset`` when the bus numbers the messages
            itself (a bus that holds the history, :class:`IHistoryBus`);
            None when the receiver numbers them.
        :return: what the publish did in this process (the in-memory bus
            passes it back to the publisher), or None.
        """

    def bus_down(reason: str) -> None:
        """
        The bus lost its broker: messages published meanwhile may not
        arrive.  The receiver tells its subscribers (a gap) when it is back.
        """

    def bus_up() -> None:
        """
        The bus is connected (again).
        """


class IBus(Interface):
    """
    Publish/subscribe between the processes and hosts that serve one app.

    The in-memory bus (:class:`pipecomet._bus.MemoryBus`) connects one
    process to itself and is never down; a broker-backed bus (Redis) may
    drop and reconnect, and says so through :meth:`IBusReceiver.bus_down`
    and :meth:`IBusReceiver.bus_up`.
    """

    connected = Attribute("True while messages published now reach every receiver.")

    def publish(topic: str, event: str, data: bytes,
                key: str | None = None) -> Deferred[BusDelivery]:
        """
        Send a message to every receiver (this process included).

        :return: a Deferred of a :class:`pipecomet._bus.BusDelivery` (the
            message's id, how many it reached, whether it was a retry
            already stored) that fires once the bus accepted the message
            (the in-memory bus delivers before it returns and fires at once);
            it fails with a 503 ``bus_unavailable`` when the bus cannot take
            it (broker down).
        """

    def add_receiver(receiver: IBusReceiver) -> None:
        """
        Deliver every message from now on to ``receiver``.
        """

    def remove_receiver(receiver: IBusReceiver) -> None:
        """
        Stop delivering to ``receiver``.
        """

    def status() -> dict:
        """
        Live figures for ``/_pipecomet/status``.
        """


class IHistoryBus(IBus):
    """
    A bus that numbers the messages and keeps each topic's history itself
    (Redis), so that a client resumes on any process or host.  A receiver
    loads a topic from it before serving the topic's first subscriber, and
    again after the bus comes back from a drop.
    """

    def set_limits(limits: Callable[[str], tuple[int, float, float]]) -> None:
        """
        ``limits(topic)`` → ``(history_count, history_age, idempotency_ttl)``:
        the bounds the bus keeps each topic's history and keys within (the
        comet installer hands in the ``[comet]`` table's).
        """

    def load(topic: str, count: int) -> Deferred[TopicHistory]:
        """
        The topic's epoch, last offset and its newest ``count`` messages.

        :return: a Deferred of a :class:`pipecomet._bus.TopicHistory`.
        """
