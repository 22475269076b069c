"""
The bus between the processes that serve one app, and its in-memory default.

The comet hub of each process is an :class:`~pipecomet._interfaces.IBusReceiver`:
a publish goes through the bus and comes back to every hub, which stores it
in its topic's history and pushes it to the subscribers.  The in-memory bus
serves one process; a broker-backed bus (Redis, a later part) implements the
same interface and reports drops and reconnects.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from ._interfaces import IBus, IBusReceiver

__all__ = ["MemoryBus"]


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
        for r in tuple(self._receivers):
            r.bus_message(topic, event, data, key)
        return succeed(None)

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
