"""
A lean HTTP/1.1 client connection: one request at a time on a kept-alive
TCP connection, responses parsed by ``httptools`` (llhttp, the parser
uvicorn uses).

The connection knows nothing of pools, deadlines or retries.  It writes one
request and reports what comes back to a *listener* (the call that owns the
connection for now) through five methods: ``response_started``,
``body_data``, ``response_done``, ``failed`` and nothing else, so the
per-call cost is a few method calls and no Deferred.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol as TypingProtocol, cast

import httptools
from twisted.internet.interfaces import IConsumer, IProducer, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from .._twcompat import send_now
from ._errors import ConnectionFailed

if TYPE_CHECKING:
    from ._pool import EndpointPool

__all__ = ["ResponseListener", "ClientConnection", "build_head", "header_lines"]


class ResponseListener(TypingProtocol):
    """
    What a :class:`ClientConnection` reports to while it carries a call.
    """

    def response_started(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def body_data(self, data: bytes) -> None: ...
    def response_done(self, keep_alive: bool) -> None: ...
    def failed(self, error: ConnectionFailed) -> None: ...


class TCPTransport(TypingProtocol):
    """
    What a client connection uses of its TCP transport (``ITCPTransport``,
    ``IConsumer`` and ``IPushProducer`` of Twisted's ``tcp.Client``).
    """

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: IProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


def header_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    """
    ``Name: value\\r\\n`` lines of ``headers``; ValueError for a CR or LF
    in a name or value (header injection).
    """
    parts = []
    for name, value in headers:
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name or not name:
            raise ValueError("header names and values may not contain CR or LF")
        parts += [name, b": ", value, b"\r\n"]
    return b"".join(parts)


def build_head(method: bytes, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]] | bytes,
               body_length: int | None, chunked: bool = False) -> bytes:
    """
    The request line and headers, ready to write.

    :param headers: pairs, or lines already made by :func:`header_lines`.
    :param body_length: sent as ``Content-Length`` when not None.
    :param chunked: send ``Transfer-Encoding: chunked`` (a body of unknown
        length).
    """
    if not isinstance(headers, bytes):
        headers = header_lines(headers)
    if body_length is not None:
        end = b"Content-Length: %d\r\n\r\n" % body_length
    elif chunked:
        end = b"Transfer-Encoding: chunked\r\n\r\n"
    else:
        end = b"\r\n"
    return b"".join((method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n", headers, end))


@implementer(IConsumer)
class _ChunkedConsumer:
    """
    The consumer a streamed request body (an ``IBodyProducer``) writes to:
    frames each write as a chunk when the length is unknown.
    """

    def __init__(self, transport: TCPTransport, chunked: bool) -> None:
        self.transport = transport
        self.chunked = chunked

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.chunked:
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.transport.write(data)


class ClientConnection(Protocol):
    """
    One TCP connection to one endpoint.

    :ivar owner: the endpoint pool (``connection_lost(conn)`` is called on it
        when the connection goes).
    :ivar created: reactor time the connection was made.
    :ivar idle_since: reactor time it was last handed back.
    :ivar calls: requests sent on it so far (more than 0: it is a reused,
        kept-alive connection).
    """

    def __init__(self, owner: EndpointPool, created: float) -> None:
        self.owner = owner
        self.created = created
        self.idle_since = created
        self.calls = 0
        self.listener: ResponseListener | None = None
        self.closed = False
        self.tcp: TCPTransport | None = None
        #: A streamed request body is still being written.
        self.sending = False
        self._parser = httptools.HttpResponseParser(self)
        self._head = False
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._answered = False
        self._started = False
        self._until_close = False
        self._complete = False
        self._extra = False
        self._reused = False
        self._keep = False

    def connectionMade(self) -> None:
        transport = self.transport
        self.tcp = cast(TCPTransport, transport)
        if ITCPTransport.providedBy(transport):
            # A request goes out in one write; never hold it for an ACK.
            transport.setTcpNoDelay(True)

    # -- sending

    def send(self, listener: ResponseListener, head: bytes,
             body: bytes | IBodyProducer | None = None,
             is_head: bool = False) -> None:
        """
        Write a request (``head`` from :func:`build_head`) and report its
        response to ``listener``.

        :param body: bytes sent after the head, or an ``IBodyProducer``
            (a ``length`` of ``UNKNOWN_LENGTH`` means the head asked for
            chunked encoding).
        """
        self.listener = listener
        self._reused = self.calls > 0
        self.calls += 1
        self._head = is_head
        self._status = 0
        self._headers = []
        self._answered = False
        self._started = False
        self._until_close = False
        self._complete = False
        transport = self.tcp
        if self.closed or transport is None:
            # Lost while idle and not noticed yet: nothing was sent.
            self.listener = None
            listener.failed(ConnectionFailed("connection closed before sending",
                                             reused=self._reused, sent=False))
            return
        if body is None or isinstance(body, bytes):
            data = head + body if body else head
            # Straight to the socket when nothing waits before it: one
            # system call, not a reactor turn and two epoll changes.
            taken = send_now(transport, data)
            if taken < len(data):
                transport.write(data[taken:] if taken else data)
            return
        transport.write(head)
        chunked = body.length is UNKNOWN_LENGTH
        consumer = _ChunkedConsumer(transport, chunked)
        self.sending = True
        d = body.startProducing(consumer)

        def sent(_: object) -> None:
            self.sending = False
            if chunked and not self.closed and self.listener is listener:
                transport.write(b"0\r\n\r\n")

        def not_sent(f: Failure) -> None:
            self.sending = False
            if not self.closed and self.listener in (listener, None):
                self.abort()

        d.addCallbacks(sent, not_sent)

    # -- flow control and closing

    def pause(self) -> None:
        if self.tcp is not None and not self.closed:
            self.tcp.pauseProducing()

    def resume(self) -> None:
        if self.tcp is not None and not self.closed:
            self.tcp.resumeProducing()

    def abort(self) -> None:
        """
        Close at once (a call given up, a protocol error, a stale
        connection): never reused, whatever was in flight is dropped.
        """
        self.listener = None
        if not self.closed and self.tcp is not None:
            self.closed = True
            self.tcp.abortConnection()

    def close(self) -> None:
        """
        Close an idle connection politely.
        """
        self.listener = None
        if not self.closed and self.tcp is not None:
            self.closed = True
            self.tcp.loseConnection()

    # -- Protocol

    def dataReceived(self, data: bytes) -> None:
        listener = self.listener
        if listener is None:
            # Bytes nobody asked for (or after a call was given up): the
            # connection cannot be trusted for another request.
            self.abort()
            return
        self._answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("protocol error: unexpected upgrade")
            return
        except httptools.HttpParserError as e:
            self._fail(f"protocol error: {e}")
            return
        if self._complete:
            self._finish(self._keep and not self._extra)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        listener = self.listener
        if listener is not None:
            if self._started and self._until_close and not self._complete:
                # A body delimited by the end of the connection.
                self._finish(False)
            else:
                self.listener = None
                listener.failed(ConnectionFailed(
                    "connection lost" if self._answered else "connection closed without answer",
                    answered=self._answered, reused=self._reused))
        self.owner.connection_lost(self)

    def _fail(self, reason: str) -> None:
        listener = self.listener
        self.abort()
        if listener is not None:
            listener.failed(ConnectionFailed(reason, answered=True, reused=self._reused))

    def _finish(self, keep_alive: bool) -> None:
        listener = self.listener
        self.listener = None
        if self.sending:
            # Answered before its body was all sent (the backend did not
            # wait for it): the rest would be read as the next request.
            keep_alive = False
        if not keep_alive:
            self.abort()
        if listener is not None:
            listener.response_done(keep_alive and not self.closed)

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self._complete:
            # A second response in one read: the backend is not speaking
            # our one-request-at-a-time HTTP.
            self._extra = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            # 100 Continue and friends: wait for the real answer.
            self._headers = []
            return
        self._status = status
        self._started = True
        self._keep = self._parser.should_keep_alive()
        headers = self._headers
        if not (self._head or status in (204, 304)):
            length = chunked = False
            for name, value in headers:
                if name == b"content-length":
                    length = True
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            self._until_close = not (length or chunked)
        listener = self.listener
        if listener is not None:
            listener.response_started(status, headers)
        if self._head and self.listener is listener:
            # llhttp does not know the request was HEAD and would wait for
            # Content-Length bytes that never come: the answer is complete,
            # and the next one gets a fresh parser.
            self._parser = httptools.HttpResponseParser(self)
            self._complete = True

    def on_body(self, body: bytes) -> None:
        listener = self.listener
        if listener is not None and not self._complete:
            listener.body_data(body)

    def on_message_complete(self) -> None:
        if self._status:
            self._complete = True
