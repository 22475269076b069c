"""
pipecomet's HTTP/1.1 server protocol, on the llhttp parser (``httptools``).

:class:`HTTP11Protocol` is a plain ``Protocol`` over any stream transport
(TCP, TLS through the ``ssl:`` endpoint, UNIX).  It parses with
``httptools.HttpRequestParser`` and serves one request at a time, in
order: pipelined requests are parsed as they arrive and wait, headers and
body bytes in hand, until the response before them is finished; past a
bound the transport stops being read.  It is the channel of its requests
(``writeHeaders``, ``write``, ``requestDone``, ``registerProducer``...),
and the push producer of its transport: when the client stops reading,
the response's producer is paused and so is the reading of requests.

Limits come from ``[limits]``; a request refused before it has a request
object (headers too large or too slow, malformed framing) is answered on
the bare connection with the JSON error body and the connection closed.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Iterable, Protocol as TypingProtocol, Union, cast

import httptools
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProducer,
    IPullProducer,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from zope.interface import implementer

from .._errors import (
    BadRequest,
    HeadersTooLarge,
    PayloadTooLarge,
    PipecometError,
    RequestTimeout,
    error_body,
)
from .._twcompat import send_now, transport_pending

if TYPE_CHECKING:
    from ._request import Request
    from ._site import Site

__all__ = ["HTTP11Protocol", "Phase"]

#: A response's producer: push (paused and resumed with the transport) or pull.
_Producer = Union[IPushProducer, "IPullProducer"]

log = Logger()

_SERVER_LINE = b"Server: " + server.version + b"\r\n"
#: Response headers the protocol writes itself unless the response has them.
_WATCHED = frozenset((b"Connection", b"Server", b"Date"))

# Reasons the transport is not read (bits).
_WRITE_BLOCKED, _QUEUE_FULL, _CLOSING, _BODY_BLOCKED = 1, 2, 4, 8


class StreamTransport(TypingProtocol):
    """
    What the protocol uses of its transport: ``ITransport`` with the
    ``IConsumer``/``IPushProducer`` methods and ``abortConnection`` that
    every Twisted stream transport (TCP, TLS, UNIX) has.
    """

    def write(self, data: bytes) -> None: ...

    def writeSequence(self, data: Iterable[bytes]) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def getPeer(self) -> IAddress: ...

    def getHost(self) -> IAddress: ...

    def registerProducer(self, producer: IProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


class Phase(enum.Enum):
    """
    Where a connection is: what it waits for from the client.
    """

    IDLE = "idle"          # between requests
    HEAD = "head"          # request line and headers arriving
    BODY = "body"          # body arriving
    HANDLING = "handling"  # every byte is in, a response is being made
    CLOSING = "closing"    # answered early or refused: nothing more is read


class _Message:
    """
    One parsed request message, before and while it is served.
    """

    __slots__ = ("url", "headers", "head_size", "method", "version", "keep_alive",
                 "length", "expect_continue", "chunks", "queued_bytes", "complete",
                 "request", "error", "cookies", "request_id", "traceparent", "user_agent",
                 "referer")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.method = b""
        self.version = b"HTTP/1.1"
        self.keep_alive = True
        self.length: int | None = 0
        self.expect_continue = False
        self.chunks: list[bytes] | None = None
        self.queued_bytes = 0
        self.complete = False
        self.request: Request | None = None
        self.error: PipecometError | None = None
        self.cookies = False  # a Cookie header came
        # The first X-Request-Id and traceparent values (the request observer's).
        self.request_id: bytes | None = None
        self.traceparent: bytes | None = None
        # The first User-Agent and Referer values (the access log's).
        self.user_agent: bytes | None = None
        self.referer: bytes | None = None


def raw_response(error: PipecometError) -> bytes:
    """
    A whole HTTP/1.1 response for an error found before there is a
    request object able to answer it.
    """
    body = error_body(error)
    reason = http.RESPONSES.get(error.status, b"Error")
    extra = b"".join(k.encode("latin-1") + b": " + v.encode("latin-1") + b"\r\n"
                     for k, v in error.headers.items())
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (error.status, reason),
        b"Content-Type: application/json\r\n",
        b"Content-Length: %d\r\n" % len(body),
        extra,
        b"Connection: close\r\n\r\n",
        body,
    ])


_PARSE_ERRORS: tuple[tuple[str, str, str], ...] = (
    # (part of llhttp's reason, our code, message), first match wins
    ("can't be present with", "conflicting_framing",
     "Content-Length and Transfer-Encoding must not come together"),
    ("Content-Length", "bad_content_length", "invalid or repeated Content-Length"),
    ("Transfer-Encoding", "bad_transfer_encoding",
     "Transfer-Encoding must end with chunked, once"),
    ("Chunk size", "bad_chunked_encoding", "malformed chunked transfer encoding"),
    ("chunk", "bad_chunked_encoding", "malformed chunked transfer encoding"),
    ("expected CR", "bad_line_ending", "lines must end with CRLF"),
    ("Expected CRLF", "bad_line_ending", "lines must end with CRLF"),
    ("Expected LF", "bad_line_ending", "lines must end with CRLF"),
    ("Invalid header token", "bad_header", "invalid character in a header name"),
    ("header field", "bad_header", "invalid character in a header name"),
    ("header value", "bad_header", "invalid header value, or obs-fold line folding"),
    ("method", "bad_method", "unknown or malformed method"),
    ("url", "bad_target", "malformed request target"),
    ("version", "bad_version", "malformed HTTP version"),
)


def parse_error(exc: Exception, in_body: bool) -> BadRequest:
    """
    The 400 for an llhttp parse error, with a code naming the problem.
    """
    reason = str(exc)
    low = reason.lower()
    for part, code, message in _PARSE_ERRORS:
        if part.lower() in low:
            return BadRequest(message, code=code, details={"parser": reason})
    if in_body:
        return BadRequest("malformed chunked transfer encoding", code="bad_chunked_encoding",
                          details={"parser": reason})
    return BadRequest("malformed request line or header", code="bad_request",
                      details={"parser": reason})


class _Refusal(Exception):
    """
    Raised from a parser callback to stop parsing with ``error``.
    """

    def __init__(self, error: PipecometError) -> None:
        super().__init__(error)
        self.error = error


@implementer(IPushProducer, IHalfCloseableProtocol)
class HTTP11Protocol(Protocol):
    """
    One HTTP/1.1 connection.

    :param site: the :class:`~._site.Site` (limits, figures, routes, log).
    """

    # Slots: a held comet connection keeps this object for hours; its
    # attributes in an instance dict past 30 names cost a dict of its own.
    __slots__ = ("site", "limits", "reactor", "phase", "_parser", "_parsing", "_active", "_queue",
                 "_queued_bytes", "_paused", "_feeding", "_advancing", "_persistent", "_held",
                 "_eof", "_producer", "_streaming", "_head_timer", "_body_timer", "_idle_timer",
                 "_linger_call", "_idle_timeout", "_last", "_begun", "_completed", "_feed_body",
                 "_head_bytes", "_peer", "_host", "_head", "_chunk_data", "_tail", "_draining")

    def __init__(self, site: Site) -> None:
        self.site = self.factory = site
        self.limits = site.limits
        self.reactor = site.reactor
        self.phase = Phase.IDLE
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._parsing: _Message | None = None  # the message the parser is in
        self._active: _Message | None = None   # the message being answered
        # Parsed messages (or an error) waiting; a list, not a deque: it is
        # short, and an idle deque holds a 0.5 KiB block per connection.
        self._queue: list[_Message | PipecometError] = []
        self._queued_bytes = 0
        self._paused = 0
        self._feeding = False
        self._advancing = False
        self._persistent = True
        self._held = False
        self._eof = False
        self._producer: _Producer | None = None
        self._streaming = True
        self._head_timer: IDelayedCall | None = None
        self._body_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._linger_call: IDelayedCall | None = None
        self._idle_timeout: float | None = None
        self._last = 0.0  # when bytes last came in
        self._begun = False  # a message began in the current feed
        self._completed = False  # a message completed in the current feed
        self._feed_body = 0  # body bytes of the current feed before a message began
        self._head_bytes = 0
        self._peer: IAddress | None = None
        self._host: IAddress | None = None
        self._head: bytes | None = None  # a response head not written yet
        # Body bytes after the chunk-size line parsed last in this read
        # (-1: no chunk open from this read); the bytes of the read before
        # it hold that line (see _check_chunk).
        self._chunk_data = -1
        self._tail = b""  # the end of the last read, while a chunked body is parsed
        self._draining = False  # the server is stopping (drain)

    # -- the connection

    @property
    def _stream(self) -> StreamTransport:
        # The transport as the stream transport it is (connected only).
        assert self.transport is not None, "not connected"
        return cast(StreamTransport, self.transport)

    def connectionMade(self) -> None:
        transport = self._stream
        self._peer = transport.getPeer()
        self._host = transport.getHost()
        transport.registerProducer(self, True)
        self._idle_timeout = self.site.timeOut
        self._arm_idle()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.phase = Phase.CLOSING
        for name in ("_head_timer", "_body_timer", "_idle_timer", "_linger_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        self._queue.clear()
        active, self._active = self._active, None
        if active is not None and active.request is not None:
            active.request.connectionLost(reason)
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.stopProducing()
            except Exception:
                log.failure("stopping the response producer failed")

    def getPeer(self) -> IAddress | None:
        return self._peer

    def getHost(self) -> IAddress | None:
        return self._host

    def isSecure(self) -> bool:
        return ISSLTransport.providedBy(self.transport)

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        self.site.stats.bytes_received += len(data)
        if self.phase is Phase.CLOSING:
            return
        self._last = self.reactor.seconds()
        self._feeding = True
        self._begun = self._completed = False
        self._feed_body = 0
        parser = self._parser
        if parser is None:  # dropped while a response was held
            parser = self._parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(data)
            if self._chunk_data >= 0:
                self._check_chunk(data)
            m = self._parsing
            if m is not None and m.length is None:
                # A chunk-size line may be split between reads.
                self._tail = (data[-_TAIL:] if len(data) >= _TAIL
                              else (self._tail + data)[-_TAIL:])
            elif self._tail:
                self._tail = b""
        except httptools.HttpParserUpgrade as e:
            self._upgrade(data, e.args[0] if e.args else len(data))
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _Refusal):
                self._parse_failed(cause.error)
            else:
                log.failure("HTTP parser callback failed",
                            Failure(cause) if isinstance(cause, BaseException) else None)
                self._parse_failed(BadRequest("the request could not be read",
                                              code="bad_request"))
        except httptools.HttpParserError as e:
            self._parse_failed(parse_error(e, self.phase is Phase.BODY))
        finally:
            self._feeding = False
        self._after_feed(len(data))

    def _upgrade(self, data: bytes, offset: int) -> None:
        m = self._active if self._active is not None else (self._queue[-1] if self._queue else None)
        if m is not None and not isinstance(m, PipecometError) and m.method == b"CONNECT":
            return  # answered 405 at dispatch; the connection then closes
        # An Upgrade request is served as a plain request (no upgrade is
        # offered); the bytes after it are the next request.
        rest = data[offset:]
        if rest and self.phase is not Phase.CLOSING:
            self.dataReceived(rest)

    def _after_feed(self, n: int) -> None:
        if self.phase is Phase.CLOSING:
            return
        m = self._parsing
        if m is not None and m.request is not None and m.request.finished and not m.complete:
            # Answered while the body was still arriving, and the rest of it
            # was not in this read: stop reading it.
            self.site.stats.answered_before_body_end += 1
            self.close_early()
            return
        if m is None:
            self._head_bytes = 0
            return
        if self.phase is Phase.HEAD or (m.method == b"" and not m.complete):
            # Head bytes in hand: what the parser has not reported yet counts
            # against the limit too (one huge header line never completes).
            if self._begun:
                self._head_bytes = 0 if self._completed else max(0, n - self._feed_body)
            else:
                self._head_bytes += n
            limit = self.limits.max_header_bytes
            if self._head_bytes > limit and self._head_bytes > m.head_size:
                self._parse_failed(HeadersTooLarge(
                    f"request headers larger than {limit} bytes", code="header_too_large"))
                return
            if self._head_timer is None:
                self._head_timer = self.reactor.callLater(
                    self.limits.header_timeout, self._header_timed_out, m)
        elif not m.complete and self._body_timer is None and m.method:
            self._body_timer = self.reactor.callLater(
                self.limits.body_timeout, self._body_timed_out, m)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._parsing = _Message()
        self._begun = True
        self._head_bytes = 0
        if self._active is None and not self._queue:
            self.phase = Phase.HEAD

    def on_url(self, url: bytes) -> None:
        m = self._parsing
        assert m is not None  # the parser is in a message
        m.url += url
        m.head_size += len(url)
        if m.head_size > self.limits.max_header_bytes:
            raise _Refusal(HeadersTooLarge(
                f"request line longer than {self.limits.max_header_bytes} bytes",
                code="header_too_large"))

    def on_header(self, name: bytes, value: bytes) -> None:
        m = self._parsing
        assert m is not None  # the parser is in a message
        m.headers.append((name, value))
        m.head_size += len(name) + len(value) + 4
        limits = self.limits
        if m.head_size > limits.max_header_bytes:
            raise _Refusal(HeadersTooLarge(
                f"request headers larger than {limits.max_header_bytes} bytes",
                code="header_too_large"))
        if len(m.headers) > limits.max_headers:
            raise _Refusal(HeadersTooLarge(f"more than {limits.max_headers} request headers",
                                           code="too_many_headers"))

    def on_headers_complete(self) -> None:
        m = self._parsing
        assert m is not None  # the parser is in a message
        parser = self._parser
        assert parser is not None  # it is parsing
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None
        self._head_bytes = 0
        m.method = parser.get_method()
        version = parser.get_http_version()
        if version == "1.1":
            m.version = b"HTTP/1.1"
        elif version == "1.0":
            m.version = b"HTTP/1.0"
        else:
            raise _Refusal(BadRequest(f"HTTP/{version} is not served here; use HTTP/1.1",
                                      code="bad_version", status=505))
        m.keep_alive = parser.should_keep_alive()
        length: int | None = 0
        hosts = 0
        for name, value in m.headers:
            n = len(name)
            if n == 14 and name.lower() == b"content-length":
                length = int(value)
            elif n == 17 and name.lower() == b"transfer-encoding":
                length = None
            elif n == 4 and name.lower() == b"host":
                hosts += 1
            elif n == 6:
                low = name.lower()
                if low == b"cookie":
                    m.cookies = True
                elif low == b"expect" and value.lower() == b"100-continue":
                    m.expect_continue = m.version == b"HTTP/1.1"
            elif n == 12 and m.request_id is None and name.lower() == b"x-request-id":
                m.request_id = value
            elif n == 11 and m.traceparent is None and name.lower() == b"traceparent":
                m.traceparent = value
            elif n == 10 and m.user_agent is None and name.lower() == b"user-agent":
                m.user_agent = value
            elif n == 7 and m.referer is None and name.lower() == b"referer":
                m.referer = value
        m.length = length
        busy = self._active is not None or bool(self._queue)
        if busy and length is not None and length > self.limits.max_body_bytes:
            # Waiting behind another answer: refused in its turn, and its
            # body is not read.
            raise _Refusal(PayloadTooLarge(
                f"body of {length} bytes is larger than the limit of "
                f"{self.limits.max_body_bytes}", code="body_too_large",
                details={"limit": self.limits.max_body_bytes}))
        if hosts > 1 or (hosts == 0 and m.version == b"HTTP/1.1"):
            m.error = BadRequest("an HTTP/1.1 request needs exactly one Host header",
                                 code="missing_host" if hosts == 0 else "duplicate_host")
        elif m.method == b"CONNECT":
            m.error = BadRequest("CONNECT is not served here", code="method_not_allowed",
                                 status=405)
            m.keep_alive = False
        if busy:
            self._enqueue(m)
        else:
            self._dispatch(m)

    def on_body(self, data: bytes) -> None:
        m = self._parsing
        assert m is not None  # the parser is in a message
        if self._chunk_data >= 0:
            self._chunk_data += len(data)
        if m.request is not None:
            m.request.body_chunk(data)
            return
        if self._feeding and not self._begun:
            self._feed_body += len(data)
        # Waiting behind another response: hold the bytes (bounded).
        if m.chunks is None:
            m.chunks = []
        m.chunks.append(data)
        m.queued_bytes += len(data)
        self._queued_bytes += len(data)
        if m.queued_bytes > self.limits.max_body_bytes:
            raise _Refusal(PayloadTooLarge(
                f"body larger than the limit of {self.limits.max_body_bytes} bytes",
                code="body_too_large", details={"limit": self.limits.max_body_bytes}))
        if self._queued_bytes > self.limits.max_pipelined_bytes:
            self._pause(_QUEUE_FULL)

    def on_chunk_header(self) -> None:
        self._chunk_data = 0

    def on_chunk_complete(self) -> None:
        self._chunk_data = -1

    def _check_chunk(self, data: bytes) -> None:
        """
        A chunk-size line was parsed in this read and its chunk is not
        complete: refuse it now when the size it declares takes the body
        past ``max_body_bytes``, before its data arrives.  llhttp does not
        report the size, but every byte of the read after that line was
        the chunk's data (counted by ``on_body``), so the line is the one
        ending just before them.
        """
        after = self._chunk_data
        self._chunk_data = -1
        m = self._parsing
        if m is None:
            return
        end = len(data) - after  # just past the line's LF
        start = data.rfind(b"\n", 0, max(end - 1, 0)) + 1
        if start:
            line = data[start:end]
        else:  # it began in an earlier read
            head = self._tail + data[:end]
            line = head[head.rfind(b"\n", 0, len(head) - 1) + 1:]
        size = _chunk_size(line)
        if size is None:
            return
        limit = self.limits.max_body_bytes
        req = m.request
        before = (req.received if req is not None else m.queued_bytes) - after
        if before + size <= limit:
            return
        error = PayloadTooLarge(
            f"a chunk of {size} bytes takes the body past the limit of {limit} bytes",
            code="body_too_large", details={"limit": limit})
        if req is not None:
            if not req.finished:
                req.reject(error)
        else:
            self._parse_failed(error)

    def on_message_complete(self) -> None:
        m = self._parsing
        assert m is not None  # the parser is in a message
        self._parsing = None
        self._completed = True
        m.complete = True
        if self._body_timer is not None:
            if self._body_timer.active():
                self._body_timer.cancel()
            self._body_timer = None
        if m is self._active:
            self.phase = Phase.HANDLING
            req = m.request
            if req is not None:
                if req.finished:
                    # Answered while its last bytes were in hand: go on.
                    self._request_finished(m)
                else:
                    req.body_complete()

    # -- serving messages in order

    def _enqueue(self, m: _Message) -> None:
        self._queue.append(m)
        if len(self._queue) >= self.limits.max_pipelined:
            self._pause(_QUEUE_FULL)

    def _dispatch(self, m: _Message) -> None:
        """
        Start answering ``m`` (nothing else is being answered).
        """
        self._active = m
        self._persistent = m.keep_alive
        self.phase = (Phase.HANDLING if m.complete else
                      Phase.BODY if m.method else Phase.HEAD)
        req = self.site.requestFactory(self, m)
        m.request = req
        target = m.url
        if target[:1] != b"/":
            target = _origin_form(target)
        headers = req.requestHeaders
        for name, value in m.headers:
            headers.addRawHeader(name, value)
        # The request has them now; a held request keeps its message.
        m.headers = ()  # type: ignore[assignment]
        m.url = b""
        req.prepare(m.method, target, m.version)
        if m.error is not None:
            req.reject(m.error)
            return
        if m.cookies:
            req.parseCookies()  # (received_cookies is {} without a Cookie header)
        req.start(m.length, m.expect_continue)
        if req.finished:
            return
        chunks, m.chunks = m.chunks, None
        if chunks:
            self._queued_bytes -= m.queued_bytes
            m.queued_bytes = 0
            # One piece: every byte of it is in hand at once.
            req.body_chunk(b"".join(chunks))
            if req.finished:
                return
        if m.complete:
            self.phase = Phase.HANDLING
            req.body_complete()

    def _advance(self) -> None:
        """
        Answer the waiting messages in order while none is being answered.
        """
        if self._advancing:
            return
        self._advancing = True
        try:
            while self._active is None and self._queue and self.phase is not Phase.CLOSING:
                m = self._queue.pop(0)
                if isinstance(m, PipecometError):
                    self._refuse(m)
                    return
                self._dispatch(m)
        finally:
            self._advancing = False
        if self.phase is Phase.CLOSING:
            return
        limits = self.limits
        if self._paused & _QUEUE_FULL and len(self._queue) <= limits.max_pipelined // 2 \
                and self._queued_bytes <= limits.max_pipelined_bytes // 2:
            self._resume(_QUEUE_FULL)
        if self._active is None and not self._queue:
            if self._eof:
                self._stream.loseConnection()
                return
            p = self._parsing
            self.phase = (Phase.IDLE if p is None else
                          Phase.HEAD if not p.method else Phase.BODY)

    def _request_finished(self, m: _Message) -> None:
        req = m.request
        # The message and its request refer to each other: let go of the
        # request here so both are freed by reference counting, not left
        # to the cyclic GC (a dozen objects a request).
        m.request = None
        assert req is not None  # a message being finished has its request
        req.release()
        if self._active is m:
            self._active = None
            self._resume(_BODY_BLOCKED)
        if self._held:
            self._held = False
            if self._idle_timer is None and self.phase is not Phase.CLOSING:
                self._arm_idle()
        if not self._persistent:
            self._close_after_response()
            return
        self._advance()

    # -- the channel interface twisted.web's Request calls

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        m = self._active
        persistent = self._persistent and self.phase is not Phase.CLOSING
        if self._draining and not self._queue:
            persistent = False  # the last request in hand: its answer closes
        if persistent and m is not None and not m.complete:
            req = m.request
            if m.length is None or req is None or req.received < m.length:
                # Answered before the body is in: the rest of it will not
                # be read, so the connection closes after this answer.
                persistent = False
        close_value = None
        server = date = True
        out = [b"HTTP/1.1 ", code, b" ", reason, b"\r\n"]
        # Names come in canonical capitalization (Headers.getAllRawHeaders).
        for name, values in headers.getAllRawHeaders():
            if name in _WATCHED:
                if name == b"Connection":
                    close_value = values
                elif name == b"Server":
                    server = False
                else:
                    date = False
            for v in values:
                out += (name, b": ", v, b"\r\n")
        if server:
            out.append(_SERVER_LINE)
        if date:
            out += (b"Date: ", self.site.date(), b"\r\n")
        if close_value is not None and any(b"close" in v.lower() for v in close_value):
            persistent = False
        if persistent and m is not None and m.version == b"HTTP/1.0":
            # Keep-alive for 1.0 only with a length the client can frame by.
            if headers.hasHeader(b"content-length") or m.method == b"HEAD" \
                    or int(code) in http.NO_BODY_CODES:
                if close_value is None:
                    out.append(b"Connection: keep-alive\r\n")
            else:
                persistent = False
        if not persistent and close_value is None:
            out.append(b"Connection: close\r\n")
        self._persistent = persistent
        out.append(b"\r\n")
        # Held until the first body bytes (or the end): head and body leave
        # in one write.
        self._head = b"".join(out)

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        self._send(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._send(head + b"".join(data))
        else:
            self._send(b"".join(data))

    def _send(self, data: bytes) -> None:
        # Straight to the socket when nothing waits in the transport's
        # buffer: one send() instead of Twisted's buffer, two epoll_ctl
        # calls and one more reactor turn per response.
        transport = cast(StreamTransport, self.transport)
        sent = send_now(transport, data)
        if sent < len(data):
            transport.write(data[sent:] if sent else data)

    def _flush(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._send(head)

    def requestDone(self, request: Request) -> None:
        self._flush()
        request.done()  # its figures and access log line, before the next is served
        m = self._active
        if m is None or m.request is not request:
            return
        if not m.complete:
            if self._feeding:
                # The rest of the body may be in this very read: decided
                # when it ends (on_message_complete or _after_feed).
                return
            self.site.stats.answered_before_body_end += 1
            request.release(force=True)
            self._active = None
            self.close_early()
            return
        self._request_finished(m)

    def registerProducer(self, producer: _Producer, streaming: bool) -> None:
        self._flush()
        if self._producer is not None:
            raise ValueError(f"registering producer {producer} before previous one "
                             f"({self._producer}) was unregistered")
        self._producer = producer
        self._streaming = bool(streaming)
        if not streaming:
            # A pull producer is driven by the transport itself.
            self._stream.unregisterProducer()
            self._stream.registerProducer(producer, False)
        elif self._paused & _WRITE_BLOCKED:
            cast(IPushProducer, producer).pauseProducing()  # streaming: a push producer

    def unregisterProducer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None and not self._streaming:
            self._streaming = True
            if self.transport is not None and self.connected:
                self._stream.unregisterProducer()
                self._stream.registerProducer(self, True)

    def loseConnection(self) -> None:
        self._flush()
        self._close_after_response()

    def send_continue(self, request: Request) -> None:
        """
        Send ``100 Continue`` for ``request`` (the one being answered).
        """
        m = self._active
        if m is not None and m.request is request and not m.complete \
                and self.phase is not Phase.CLOSING:
            self._stream.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- comet frames

    def write_frame(self, data: bytes) -> bool:
        """
        Write body bytes of the response being answered, sending them to
        the socket at once when nothing waits before them (one system call
        instead of three).  False, writing nothing, while the client does
        not read (the transport paused us).
        """
        if self._paused & _WRITE_BLOCKED:
            return False
        if self.transport is None:
            return True
        self.write(data)
        return True

    def pending_bytes(self) -> int:
        """
        Bytes written that the transport has not handed to the kernel yet
        (0 where that is not known).
        """
        return transport_pending(self.transport) if self.transport is not None else 0

    def hold(self) -> None:
        """
        The response being answered is held open (comet): no idle timeout.
        What only reading needs is let go until the client sends again
        (the parser, between messages, is made anew then): a held
        connection may live for hours, and there are many.
        """
        self._held = True
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._parsing is None and not self._queue:
            self._parser = None

    def drain(self) -> None:
        """
        The server is stopping and no longer accepts.  The next response
        written with no other request in hand behind it (pipelined ones
        are answered first) says ``Connection: close``, and the connection
        closes after it: the client sends its next request on a new
        connection, to another process.  A connection with nothing in
        flight stays open: a request may already be on its way, and a
        close under it would fail it; what is left is closed when the
        server's grace period ends.
        """
        self._draining = True

    def setTimeout(self, seconds: float | None) -> None:
        """
        ``[server] idle_timeout`` for this connection (None: none).
        """
        if seconds is None:
            self.hold()
            return
        self._idle_timeout = seconds
        self._arm_idle()

    def pause_body(self) -> None:
        """
        Stop reading the request body for now (whoever takes it, e.g. a
        backend it is forwarded to, is not keeping up).
        """
        self._pause(_BODY_BLOCKED)

    def resume_body(self) -> None:
        """
        Read the request body again (also done when the request ends).
        """
        self._resume(_BODY_BLOCKED)

    # -- IPushProducer: the transport's write buffer

    def pauseProducing(self) -> None:
        self._pause(_WRITE_BLOCKED)
        if self._producer is not None and self._streaming:
            cast(IPushProducer, self._producer).pauseProducing()  # streaming: push

    def resumeProducing(self) -> None:
        self._resume(_WRITE_BLOCKED)
        if self._producer is not None and self._streaming:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    def _pause(self, reason: int) -> None:
        was = self._paused
        self._paused |= reason
        if not was and self.transport is not None:
            self._stream.pauseProducing()

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None:
            self._stream.resumeProducing()

    # -- IHalfCloseableProtocol

    def readConnectionLost(self) -> None:
        m = self._active
        if self.phase is Phase.CLOSING:
            return
        if m is not None and not m.complete and m.request is not None \
                and not m.request.finished:
            m.request.reject(BadRequest(
                "the client closed its side before the body was complete",
                code="truncated_body"))
            return
        if self._queue:
            # Requests it sent before its FIN are still answered.
            self._eof = True
            return
        if m is not None:
            # A full close looks the same as a half-close; as twisted.web
            # does, EOF means the client has gone: cancel what serves it.
            self._stream.abortConnection()
            return
        self._stream.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    # -- timers

    def _arm_idle(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        if self._idle_timeout:
            self._last = self.reactor.seconds()
            self._idle_timer = self.reactor.callLater(self._idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        # One timer per connection, re-armed for what is left rather than
        # reset on every read.
        self._idle_timer = None
        if self.phase is Phase.CLOSING or not self._idle_timeout:
            return
        waiting_for_client = self._active is None or self.phase in (Phase.HEAD, Phase.BODY)
        left = self._last + self._idle_timeout - self.reactor.seconds()
        if left > 0 or self._held or not waiting_for_client:
            delay = left if left > 0 else self._idle_timeout
            self._idle_timer = self.reactor.callLater(delay, self._idle_check)
            return
        if self._parsing is not None and self._parsing.method == b"" and self._active is None:
            self._refuse(RequestTimeout(f"no request data for {self._idle_timeout}s",
                                        code="header_timeout"))
            return
        m = self._active
        if m is not None and not m.complete and m.request is not None:
            m.request.reject(RequestTimeout(f"no body data for {self._idle_timeout}s",
                                            code="body_timeout"))
            return
        if self._parsing is not None:
            self._refuse(RequestTimeout(f"no request data for {self._idle_timeout}s",
                                        code="header_timeout"))
            return
        self._stream.loseConnection()

    def _header_timed_out(self, m: _Message) -> None:
        self._head_timer = None
        if m is not self._parsing or self.phase is Phase.CLOSING:
            return
        error = RequestTimeout(
            f"request headers not received within {self.limits.header_timeout}s",
            code="header_timeout")
        self._parse_failed(error)

    def _body_timed_out(self, m: _Message) -> None:
        self._body_timer = None
        if m.complete or self.phase is Phase.CLOSING:
            return
        error = RequestTimeout(f"request body not received within {self.limits.body_timeout}s",
                               code="body_timeout")
        if m.request is not None and not m.request.finished:
            m.request.reject(error)
        else:
            self._parse_failed(error)

    # -- refusing and closing

    def _parse_failed(self, error: PipecometError) -> None:
        """
        The message being parsed cannot be read on (bad framing, limits,
        timeouts): answer ``error`` in its turn; nothing after it is read.
        """
        if self.phase is Phase.CLOSING:
            return
        self._pause(_CLOSING)
        m = self._parsing
        self._parsing = None
        if m is not None and m.request is not None:
            # It is being answered: it gets the error (its body failed).
            if not m.request.finished:
                m.request.reject(error)
            if self.phase is not Phase.CLOSING:
                self.close_early()
            return
        if m is not None and m in self._queue:
            self._queue.remove(m)
        if self._active is None and not self._queue:
            self._refuse(error)
        else:
            self._queue.append(error)  # answered in its turn, then the connection closes

    def _refuse(self, error: PipecometError) -> None:
        """
        Answer ``error`` on the bare connection and close it.
        """
        if self.phase is Phase.CLOSING:
            return
        self.site.stats_refused(error)
        self._stream.write(raw_response(error))
        self.close_early()

    def _close_after_response(self) -> None:
        if self.phase is Phase.CLOSING:
            return
        self.phase = Phase.CLOSING
        self._pause(_CLOSING)
        if self.transport is not None:
            self._let_go()
            self._stream.loseConnection()

    def _let_go(self) -> None:
        # A transport with a producer registered waits for it to go before
        # it closes (TLS sends no close_notify until then).
        self._producer = None
        self._streaming = True
        self._stream.unregisterProducer()

    def close_early(self) -> None:
        """
        Stop reading, send what was written, then drop the connection
        after ``linger`` seconds.  On TCP the write side is shut first (a
        FIN), so the client reads the answer instead of a reset for the
        body it is still sending; on TLS the connection is closed with a
        ``close_notify`` after the answer.
        """
        if self.phase is Phase.CLOSING and self._linger_call is not None:
            return
        self.phase = Phase.CLOSING
        for name in ("_head_timer", "_body_timer"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        self._persistent = False
        if self.transport is None:
            return
        transport = self._stream
        self._pause(_CLOSING)
        self._let_go()
        half_close = getattr(transport, "loseWriteConnection", None)
        if ISSLTransport.providedBy(transport) or half_close is None:
            transport.loseConnection()
        else:
            half_close()
        self._linger_call = self.reactor.callLater(self.limits.linger, transport.abortConnection)


#: How much of a read is kept for a chunk-size line split between reads.
_TAIL = 1024
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _chunk_size(line: bytes) -> int | None:
    """
    The size a chunk-size line (``1a2b;ext=v``) declares, or None when it
    cannot be read (llhttp has checked it; an unreadable line here only
    means part of it is not in hand).
    """
    n = 0
    for byte in line:
        if byte not in _HEX:
            break
        n += 1
    return int(line[:n], 16) if n else None


def _origin_form(target: bytes) -> bytes:
    """
    The path and query of an absolute-form target (``http://h/p?q``);
    ``*`` and origin-form targets are returned as they are.
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep:
        return target
    slash = rest.find(b"/")
    query = rest.find(b"?")
    if slash < 0 or (0 <= query < slash):
        return b"/" + rest[query:] if query >= 0 else b"/"
    return rest[slash:]
