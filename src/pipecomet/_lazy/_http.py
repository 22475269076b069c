"""
The HTTP side of lazy parsing: a channel, a request and a site.

twisted.web reads a request's whole body before the resource sees it.
:class:`LazyRequest` instead starts a chain route's pipes as soon as the
headers are in and feeds the body to a :class:`~._body.LazyBody` while it
arrives.  A response finished before the body ended stops the reading:
the transport is paused, the response goes out with ``Connection: close``,
the write side is shut down and the connection is dropped after
``linger`` seconds, so a big body is never read just to be thrown away.

:class:`LazyChannel` adds what twisted.web leaves to the application:
JSON 431 for headers over the limits, 408 for headers or bodies that take
too long, ``100 Continue`` sent only once a pipe waits on the body, and a
400 for a body cut off by a client half-close.  Requests for anything
other than a chain route keep twisted.web/Klein semantics (buffered body,
``process()``), held to the same limits.
"""

from __future__ import annotations

import enum
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.http import parse_qs
from zope.interface import implementer

from .._errors import (
    BadRequest,
    HeadersTooLarge,
    InternalError,
    PayloadTooLarge,
    PipecometError,
    RequestTimeout,
    error_body,
)
from .._responders import send_error
from ._body import LazyBody
from ._config import LimitsConfig

__all__ = ["LazyChannel", "LazyRequest", "LazySite", "LazyStats", "Phase"]

log = Logger()


@attrs.define
class LazyStats:
    """
    Live figures shown under ``lazy`` in ``/_pipecomet/status``.
    """

    bytes_received: int = 0
    body_bytes_read: int = 0
    requests_lazy: int = 0
    requests_buffered: int = 0
    answered_before_body_end: int = 0
    rejected_413: int = 0
    rejected_431: int = 0
    rejected_408: int = 0
    rejected_400: int = 0

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


class Phase(enum.Enum):
    """
    Where a connection is in its current request.
    """

    IDLE = "idle"          # between requests
    HEAD = "head"          # request line and headers arriving
    BODY = "body"          # body arriving
    HANDLING = "handling"  # body complete, response being made
    CLOSING = "closing"    # answered early or refused: nothing more is read


_PHASES: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.HEAD, Phase.CLOSING}),
    Phase.HEAD: frozenset({Phase.BODY, Phase.HANDLING, Phase.CLOSING}),
    Phase.BODY: frozenset({Phase.HANDLING, Phase.CLOSING}),
    Phase.HANDLING: frozenset({Phase.IDLE, Phase.CLOSING}),
    Phase.CLOSING: frozenset({Phase.CLOSING}),
}


def _raw_response(error: PipecometError) -> bytes:
    """
    A whole HTTP/1.1 response for an error found before there is a request
    object able to answer (headers too large or too slow).
    """
    body = error_body(error)
    reason = http.RESPONSES.get(error.status, b"Error")
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (error.status, reason),
        b"Content-Type: application/json\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Connection: close\r\n\r\n",
        body,
    ])


@implementer(IHalfCloseableProtocol)
class LazyChannel(http.HTTPChannel):
    """
    An ``HTTPChannel`` that enforces the ``[limits]`` header and time
    limits with JSON errors and lets a :class:`LazyRequest` decide when to
    send ``100 Continue``.
    """

    phase = Phase.IDLE
    _timer: Any = None
    _linger_call: Any = None

    # -- setup

    def connectionMade(self) -> None:
        limits: LimitsConfig = self.site.limits
        # twisted.web's own checks stay as a backstop; ours answer first.
        self.totalHeadersSize = limits.max_header_bytes
        self.maxHeaders = limits.max_headers
        self.MAX_LENGTH = limits.max_header_bytes + 2
        super().connectionMade()

    def _move(self, new: Phase) -> None:
        if new not in _PHASES[self.phase]:
            raise RuntimeError(f"connection cannot go from {self.phase.value} to {new.value}")
        self.phase = new

    def _set_timer(self, seconds: float | None, fire: Any = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.callLater(seconds, fire) if seconds is not None else None

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        self.site.stats.bytes_received += len(data)
        if self.phase is Phase.CLOSING:
            return
        if self.phase is Phase.IDLE and not self._handlingRequest:
            self._move(Phase.HEAD)
            self._set_timer(self.site.limits.header_timeout, self._header_timed_out)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.phase is Phase.CLOSING:
            return
        super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if self.phase is Phase.CLOSING:
            return
        super().rawDataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(HeadersTooLarge(
            f"a header line is longer than {self.site.limits.max_header_bytes} bytes",
            code="header_too_large"))

    def allHeadersReceived(self) -> None:
        req = self.requests[-1]
        req.parseCookies()
        self.persistent = self.checkPersistence(req, self._version)
        req.gotLength(self.length)
        if self.phase is Phase.CLOSING:
            return
        if self.length == 0:
            self._move(Phase.HANDLING)
            self._set_timer(None)
        else:
            self._move(Phase.BODY)
            self._set_timer(self.site.limits.body_timeout, self._body_timed_out)
        expect = req.requestHeaders.getRawHeaders(b"Expect")
        wants_continue = (expect and expect[0].lower() == b"100-continue"
                          and self._version == b"HTTP/1.1")
        if wants_continue and not getattr(req, "defers_continue", False):
            self._send100Continue()
        start = getattr(req, "start_lazy", None)
        if start is not None:
            start(bool(wants_continue))

    def allContentReceived(self) -> None:
        if self.phase is Phase.CLOSING:
            return
        self._set_timer(None)
        if self.phase is Phase.BODY:
            self._move(Phase.HANDLING)
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if self.phase is not Phase.CLOSING:
            self._move(Phase.IDLE)
        # May read the next pipelined request, moving the phase again.
        super().requestDone(request)

    # -- half-close: a client that shuts its side mid-body cut the body off

    def readConnectionLost(self) -> None:
        if self.phase is Phase.BODY and self.requests:
            self.requests[-1].reject(BadRequest(
                "the client closed its side before the body was complete",
                code="truncated_body"))
            return
        if self.phase is Phase.HANDLING and self.requests:
            # A full close looks the same as a half-close here; twisted.web
            # takes EOF as "client gone" and so do we, so that the chain is
            # cancelled (held comet requests above all).
            self.transport.abortConnection()
            return
        self.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def resumeProducing(self) -> None:
        if self.phase is Phase.CLOSING:
            # The transport drained our response; we still read nothing.
            self._waitingForTransport = False
            if self._requestProducer is not None:
                self._requestProducer.resumeProducing()
            return
        super().resumeProducing()

    # -- refusing

    def _header_timed_out(self) -> None:
        self._timer = None
        self._refuse(RequestTimeout(
            f"request headers not received within {self.site.limits.header_timeout}s",
            code="header_timeout"))

    def _body_timed_out(self) -> None:
        self._timer = None
        if self.phase is Phase.BODY and self.requests:
            self.requests[-1].reject(RequestTimeout(
                f"request body not received within {self.site.limits.body_timeout}s",
                code="body_timeout"))

    def timeoutConnection(self) -> None:
        # The idle timeout ([server] idle_timeout) caught a client that went
        # silent mid-request: it gets the same 408 as a missed deadline.
        if self.phase is Phase.HEAD:
            self._refuse(RequestTimeout(f"no request data for {self.timeOut}s",
                                        code="header_timeout"))
            return
        if self.phase is Phase.BODY and self.requests and not self.requests[-1].finished:
            self.requests[-1].reject(RequestTimeout(f"no body data for {self.timeOut}s",
                                                    code="body_timeout"))
            return
        super().timeoutConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        limits = self.site.limits
        error: PipecometError
        if self._receivedHeaderSize > self.totalHeadersSize:
            error = HeadersTooLarge(f"request headers larger than {limits.max_header_bytes} bytes",
                                    code="header_too_large")
        elif self._receivedHeaderCount > self.maxHeaders:
            error = HeadersTooLarge(f"more than {limits.max_headers} request headers",
                                    code="too_many_headers")
        elif self.phase is Phase.BODY and self._transferDecoder is not None:
            error = BadRequest("malformed chunked transfer encoding", code="bad_chunked_encoding")
        else:
            error = BadRequest("malformed request line or header", code="bad_request")
        if self.phase in (Phase.BODY, Phase.HANDLING) and self.requests:
            req = self.requests[-1]
            if not req.finished:
                req.reject(error)
                return
        self._refuse(error)

    def _refuse(self, error: PipecometError) -> None:
        """
        Answer ``error`` on the bare connection and close it.
        """
        if self.phase is Phase.CLOSING:
            return
        self.site.stats_refused(error)
        self.transport.write(_raw_response(error))
        self.close_early()

    def close_early(self) -> None:
        """
        Stop reading, send what was written, then drop the connection after
        ``linger`` seconds (a half-close lets the client read the answer
        instead of getting a reset for the body it is still sending).
        """
        if self.phase is Phase.CLOSING:
            return
        self._move(Phase.CLOSING)
        self._set_timer(None)
        self.setTimeout(None)
        self.persistent = False
        transport = self.transport
        if transport is None:
            return
        transport.pauseProducing()
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
            self._linger_call = self.callLater(self.site.limits.linger, transport.abortConnection)
        else:
            transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self._set_timer(None)
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._linger_call = None
        super().connectionLost(reason)


class LazyRequest(server.Request):
    """
    A request that runs a chain route while its body arrives.

    After the headers, the route is looked up; when the site's limits say
    ``lazy`` and the request has a body, its chain starts at once with a
    :class:`~._body.LazyBody` as ``pipecomet_body``.  Otherwise the
    request is buffered and processed as twisted.web does.
    """

    # Slots, not instance attributes: CPython keeps instance attributes on a
    # key table shared by the class only up to 30 names; twisted.web's
    # Request uses most of them, and ours in the instance dict gave held
    # requests a dict of their own (~1.3 KB more per connection).
    __slots__ = ("pipecomet_body", "defers_continue", "_lazy", "_complete", "_received",
                 "_cleanup_pending", "_run", "_continue_sent", "_expect_continue",
                 "_length", "_route")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.pipecomet_body: LazyBody | None = None
        self.defers_continue = False
        self._lazy = False
        self._complete = False
        self._received = 0
        self._cleanup_pending = False
        self._run: Any = None
        self._continue_sent = False
        self._expect_continue = False
        super().__init__(*args, **kwargs)

    # -- called by the channel

    def _prepare(self) -> None:
        """
        What ``requestReceived`` and ``process`` set, taken from the
        channel once the headers are in.
        """
        ch = self.channel
        self.method, self.uri, self.clientproto = ch._command, ch._path, ch._version
        self.args = {}
        path, sep, argstring = self.uri.partition(b"?")
        self.path = path
        if sep:
            self.args = parse_qs(argstring, 1)
        self.site = ch.site
        self.setHeader(b"Server", server.version)
        self.setHeader(b"Date", http.datetimeToString())
        self.prepath = []
        self.postpath = [unquote_to_bytes(p) for p in self.path[1:].split(b"/")]

    def gotLength(self, length: int | None) -> None:
        site = self.channel.site
        limits: LimitsConfig = site.limits
        self._length = length
        if length is not None and length > limits.max_body_bytes:
            self._prepare()
            self.content = None
            self.reject(PayloadTooLarge(
                f"body of {length} bytes is larger than the limit of {limits.max_body_bytes}",
                code="body_too_large", details={"limit": limits.max_body_bytes}))
            return
        if limits.lazy and length != 0:
            self._prepare()
            found = site.find_route(self)
            if found is not None:
                self._route = found
                try:
                    self.pipecomet_body = LazyBody(limits, self.getHeader(b"content-type"),
                                                   self._wants_body)
                except PipecometError as e:
                    self.content = None
                    self.reject(e)
                    return
                self._lazy = True
                self.defers_continue = True
                self.content = self.pipecomet_body.raw
                site.stats.requests_lazy += 1
                return
        site.stats.requests_buffered += 1
        super().gotLength(length)

    def start_lazy(self, expect_continue: bool) -> None:
        """
        The headers are done: run the route's chain (lazy requests only).
        """
        if not self._lazy or self.finished:
            return
        self._expect_continue = expect_continue
        route, params = self._route
        self._route = None
        try:
            self._run = route.serve(self, params)
        except Exception:
            err = InternalError()
            log.failure("starting route {path} failed (error id {error_id})",
                        path=route.path, error_id=err.error_id)
            self.reject(err)

    def _wants_body(self) -> None:
        # A pipe waits on the body: now the client may send it.
        if (self._expect_continue and not self._continue_sent and not self.startedWriting
                and not self.finished and not self._disconnected):
            self._continue_sent = True
            self.channel._send100Continue()

    def handleContentChunk(self, data: bytes) -> None:
        site = self.channel.site
        self._received += len(data)
        site.stats.body_bytes_read += len(data)
        if self.finished:
            # Answered already; these bytes were in hand with the rest.
            return
        limit = site.limits.max_body_bytes
        if self._received > limit:
            self.reject(PayloadTooLarge(f"body larger than the limit of {limit} bytes",
                                        code="body_too_large", details={"limit": limit}))
            return
        if not self._lazy:
            if self.content is not None:
                self.content.write(data)
            return
        body = self.pipecomet_body
        try:
            body.feed(data)
        except PipecometError as e:
            self.reject(e)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._complete = True
        if self.finished:
            # Answered while the last bytes were in hand: release the
            # channel for the next request now.
            if self._cleanup_pending:
                self._cleanup_pending = False
                self._cleanup()
            return
        if not self._lazy:
            super().requestReceived(command, path, version)
            return
        try:
            self.pipecomet_body.finish()
        except PipecometError as e:
            self.reject(e)

    # -- answering

    def reject(self, error: PipecometError) -> None:
        """
        Answer ``error`` now (the chain is cancelled, the body fails) and,
        if the body is not complete, stop reading it.
        """
        body = self.pipecomet_body
        if body is not None:
            body.fail(error)
        if self.finished or self._disconnected:
            return
        if self._lazy:
            # A run held by hold_run() (not lazy) is cancelled on disconnect
            # only, as a notifyFinish() errback would.
            run, self._run = self._run, None
            if run is not None:
                run.cancel()
        if self.channel is not None:
            self.channel.site.stats_refused(error)
        if self.clientproto == http.Request.clientproto:
            self._prepare()
        send_error(self, error)

    def _early(self) -> bool:
        """
        True when the response is ending before the channel has the whole
        body: the connection will close.
        """
        ch = self.channel
        if self._complete or ch is None:
            return False
        length = getattr(self, "_length", None)
        if length is None:
            return True
        # Bytes the channel holds but has not handed over yet count as in.
        pending = len(getattr(ch, "_buffer", b"")) if getattr(ch, "line_mode", 0) else 0
        return self._received + pending < length

    def write(self, data: bytes) -> None:
        if not self.startedWriting and self._early():
            # The rest of the body will not be read: say so.
            self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            self.channel.persistent = False
        super().write(data)

    def _cleanup(self) -> None:
        if self._complete or self.channel is None:
            super()._cleanup()
            if self.pipecomet_body is not None:
                self.pipecomet_body.close()
            return
        # Finished before requestReceived: the channel is still reading
        # this request's body.
        notifications, self.notifications = self.notifications, []
        for d in notifications:
            d.callback(None)
        if not self._early():
            # Every byte is in; the channel calls requestReceived next.
            self._cleanup_pending = True
            return
        self.channel.site.stats.answered_before_body_end += 1
        self.channel.close_early()

    def hold_run(self, run: Any) -> bool:
        """
        Cancel ``run`` when the client goes, as a ``notifyFinish()``
        errback would, without a Deferred and its callbacks kept for the
        life of the request (a held comet request lives for hours).  Only
        for requests that are not lazy (those have ``_run`` already) and
        still connected; False when the caller must watch by itself.
        """
        if self._lazy or self._run is not None or self.finished or self._disconnected:
            return False
        self._run = run
        return True

    def connectionLost(self, reason: Any) -> None:
        run, self._run = self._run, None
        super().connectionLost(reason)
        body = self.pipecomet_body
        if body is not None:
            body.fail(BadRequest("the client went away", code="client_gone"))
            body.close()
        if run is not None:
            run.cancel()


class LazySite(server.Site):
    """
    A ``Site`` whose requests are :class:`LazyRequest` on a
    :class:`LazyChannel`.

    :param resource: the root resource (a ``PipecometResource`` for chain
        routes to be served lazily).
    :param limits: the ``[limits]`` table.
    :param stats: where the figures go.
    """

    protocol = LazyChannel  # type: ignore[assignment]
    requestFactory = LazyRequest

    def __init__(self, resource: Any, *, limits: LimitsConfig, stats: LazyStats | None = None,
                 **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.limits = limits
        self.stats = stats if stats is not None else LazyStats()
        self._app = getattr(resource, "app", None)

    def find_route(self, request: LazyRequest) -> tuple[Any, Any] | None:
        """
        The chain route and path parameters for ``request``, or None when
        it is not a chain route of this site's app.
        """
        app = self._app
        if app is None:
            return None
        by_method = app._exact.get(request.path)
        if by_method is not None:
            route = by_method.get(request.method)
            if route is not None:
                return route, None
        return app._match(request)

    def stats_refused(self, error: PipecometError) -> None:
        name = f"rejected_{error.status}"
        if hasattr(self.stats, name):
            setattr(self.stats, name, getattr(self.stats, name) + 1)
