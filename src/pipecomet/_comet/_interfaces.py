"""
The seam between a comet subscription and the wire: the stream sink, which
the responders implement (SSE, NDJSON, long-poll), one per held request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.interfaces import IPushProducer

    from .._errors import PipecometError
    from ._topics import Message

__all__ = ["IStreamSink"]


class IStreamSink(Interface):
    """
    Where one subscription's output goes, in the format its client chose.

    The subscription decides *what* the client gets (which messages, which
    control events, when the response ends); the sink decides how that
    looks on the wire and writes it to its request.  A *held* sink (SSE,
    NDJSON) carries many frames on one open response; a long-poll sink
    carries one answer per request.  Frames are bytes ready for the socket,
    so that flow control can queue them and one message's frame can be
    written to thousands of connections.
    """

    transport = Attribute("The transport served: 'sse', 'ndjson' or 'longpoll'.")
    held = Attribute("True: frames on one open response (SSE, NDJSON); "
                     "False: one answer (long-poll).")

    def start(cursor: str, resume: str, retry: float) -> bool:
        """
        Send the status and headers (``Pipecomet-Resume``,
        ``Pipecomet-Resumed-From``); a held sink also sends the opening
        frame (the cursor the stream starts from) and exempts the response
        from the idle timeout.

        :param cursor: where the subscription starts.
        :param resume: how it resumed: live, last, ok, gap or reset.
        :param retry: seconds a client waits before reconnecting (SSE
            ``retry:``).
        :return: False when the client left before anything was sent.
        """

    def hold() -> None:
        """
        The response waits (a long-poll with nothing to say yet): exempt it
        from the idle timeout.
        """

    def message(message: Message, cursor: str | None) -> bytes:
        """
        The frame of one message (its record, in a
        long-poll answer).

        :param cursor: the subscription's cursor after it when the
            subscription has several topics (the frame then carries its
            topic); None for one topic, whose frame is the same bytes for
            every subscriber.
        """

    def control(name: str, fields: dict[str, Any], retry: float | None = None) -> bytes:
        """
        The frame of a control event (one of
        :data:`~pipecomet._comet.RESERVED_EVENTS`).

        :param retry: seconds the client waits before reconnecting, when
            the event ends the stream.
        """

    def heartbeat() -> bytes:
        """
        A frame that carries nothing but keeps the connection busy.
        """

    def write(frame: bytes) -> bool:
        """
        Write ``frame`` now if the client is reading.

        :return: False, nothing written, while the socket's buffer is full
            (the caller queues it and becomes the request's producer).
        """

    def write_through(frames: list[bytes]) -> None:
        """
        Write ``frames`` whatever the socket's state (queued frames once the
        transport resumed the producer, or the last ones).
        """

    def pending() -> int:
        """
        Bytes written that the kernel has not taken yet (0 when unknown).
        """

    def register_producer(producer: IPushProducer) -> None:
        """
        Make ``producer`` (an ``IPushProducer``) the request's producer, if
        it has none.
        """

    def unregister_producer(producer: IPushProducer) -> None:
        """
        Let go of ``producer`` if it is the request's producer.
        """

    def end(final: bytes | None) -> None:
        """
        Write ``final`` (when given) and finish the response (a long-poll
        writes nothing more: its last word is :meth:`answer_poll`).
        """

    def answer_poll(messages: Sequence[Message], events: Sequence[dict[str, Any]], cursor: str,
                    extra: dict[str, Any] | None = None,
                    retry_after: float | None = None) -> None:
        """
        The whole answer of a long-poll: ``messages``, the control
        ``events`` (gap, reset), the ``cursor`` to poll from next, and
        ``extra`` top-level fields (``end``, ``shutdown``, with
        ``Retry-After: retry_after``); then finish.  A held sink writes them
        as frames and finishes.
        """

    def abort() -> None:
        """
        Cut the connection (a client too slow to keep up).
        """

    def fail(error: PipecometError) -> None:
        """
        Answer with the :class:`~pipecomet.PipecometError` ``error`` if
        nothing was sent yet, else end the response.
        """

    def gone() -> bool:
        """
        True once the response is finished or its client has left.
        """
