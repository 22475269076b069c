"""
Flow control of one held stream: frames go to the client now, or queue
while it is not reading; past ``buffer_bytes`` it is slow.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from ._interfaces import IStreamSink
from ._topics import Message

if TYPE_CHECKING:
    from ._subscription import Subscription

__all__ = ["FlowControl"]


@implementer(IPushProducer)
class FlowControl:
    """
    The write side of a held stream once its client has stopped reading,
    and the push producer of its request.

    Made by the subscription the first time its sink refuses a frame (a
    client that keeps up never costs one): frames queue here up to
    ``limit`` bytes while Twisted has the connection paused, and past that
    the client is slow:
    cut off (:meth:`Subscription.slow`), or with ``drop`` its oldest queued
    messages are dropped and a ``gap`` event says so when it reads again.

    :param owner: the subscription, told when the client is too slow and
        asked for the gap frames of what was dropped.
    """

    __slots__ = ("owner", "sink", "limit", "drop", "queue", "queued", "paused", "dropped")

    def __init__(self, owner: Subscription, sink: IStreamSink, limit: int, drop: bool) -> None:
        self.owner = owner
        self.sink = sink
        self.limit = limit
        self.drop = drop
        self.queue: deque[tuple[bytes, Message | None]] | None = None
        self.queued = 0
        self.paused = False
        # Offsets dropped per topic: [first, last].
        self.dropped: dict[str, list[int]] | None = None

    def send(self, data: bytes, msg: Message | None = None) -> None:
        """
        Write ``data`` now, or queue it while the client is not reading.
        """
        if not self.paused and not self.queue:
            if self.sink.write(data):
                return
            self.backpressure()
        self.enqueue(data, msg)

    def enqueue(self, data: bytes, msg: Message | None) -> None:
        """
        Queue ``data`` (the frame of ``msg``, if a message) behind the
        others; past ``limit`` the client is slow.
        """
        q = self.queue
        if q is None:
            q = self.queue = deque()
        q.append((data, msg))
        self.queued += len(data)
        limit = self.limit
        if self.queued <= limit:
            return
        if not self.drop:
            self.owner.slow()
            return
        stats = self.owner.hub.stats
        while self.queued > limit and q:
            old, m = q.popleft()
            self.queued -= len(old)
            if m is not None:
                stats.dropped += 1
                if self.dropped is None:
                    self.dropped = {}
                span = self.dropped.get(m.topic)
                if span is None:
                    self.dropped[m.topic] = [m.offset, m.offset]
                else:
                    span[1] = m.offset

    def backpressure(self) -> None:
        """
        The socket's buffer is full (Twisted paused the channel): become the
        request's push producer now, so that Twisted resumes us when it
        drains.  Registering only here keeps the producer attributes off the
        thousands of channels whose clients keep up (each costs a dict
        resize, about 1.5 KiB per connection).
        """
        self.paused = True
        self.sink.register_producer(self)

    def take(self) -> list[bytes]:
        """
        Empty the queue: the frames still waiting, oldest first, after the
        ``gap`` frames of what was dropped (the stream's last frame is
        about to follow them, and its cursor is past the dropped ones).
        """
        q, self.queue = self.queue, None
        self.queued = 0
        out: list[bytes] = []
        if self.dropped:
            dropped, self.dropped = self.dropped, None
            out = self.owner.dropped_gaps(dropped)
        if q:
            out.extend(d for d, _ in q)
        return out

    def buffered(self) -> int:
        """
        Bytes waiting for this client: the queue plus the socket's buffer.
        """
        return self.queued + self.sink.pending()

    def release(self) -> None:
        """
        The stream is over: stop being the request's producer.
        """
        self.sink.unregister_producer(self)

    # -- IPushProducer

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.dropped:
            dropped, self.dropped = self.dropped, None
            gaps = self.owner.dropped_gaps(dropped)
            if gaps:
                self.sink.write_through(gaps)
        q = self.queue
        owner = self.owner
        while q and not self.paused and owner.open:
            data, _ = q.popleft()
            self.queued -= len(data)
            self.sink.write_through([data])

    def stopProducing(self) -> None:
        self.paused = True
