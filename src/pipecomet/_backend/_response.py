"""
A backend's answer as a pipe sees it: status, headers and a body that is
either complete already or still arriving.
"""

from __future__ import annotations

import json as _json
from typing import TYPE_CHECKING, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

if TYPE_CHECKING:
    from ._service import _Call

__all__ = ["Response"]


@implementer(IPushProducer)
class Response:
    """
    The status, headers and body of one backend call.

    ``await resp.json()`` / ``resp.text()`` / ``resp.body()`` read the whole
    body (bounded by the service's ``max_response_bytes``);
    ``resp.deliver(write)`` streams it chunk by chunk instead.  A body up to
    the service's ``buffer_bytes`` is complete before the call returns, so
    reading it costs nothing more.

    :ivar status: the HTTP status code; a backend's own 4xx/5xx is a
        response like any other.
    :ivar service: the service's name.
    """

    __slots__ = ("status", "service", "raw_headers", "_chunks", "_size", "_complete", "_error",
                 "_waiters", "_write", "_end", "_call", "_paused", "_limit", "_headers")

    def __init__(self, service: str, status: int, raw_headers: list[tuple[bytes, bytes]],
                 limit: int) -> None:
        self.service = service
        self.status = status
        self.raw_headers = raw_headers
        self._chunks: list[bytes] = []
        self._size = 0
        self._complete = False
        self._error: Failure | None = None
        self._waiters: list[Deferred] = []
        self._write: Callable[[bytes], object] | None = None
        self._end: Deferred | None = None
        self._call: _Call | None = None
        self._paused = False
        self._limit = limit
        self._headers: Headers | None = None

    def __repr__(self) -> str:
        return f"<Response {self.service} {self.status}>"

    # -- reading

    @property
    def ok(self) -> bool:
        """
        True for a 2xx status.
        """
        return 200 <= self.status < 300

    @property
    def complete(self) -> bool:
        """
        True once the whole body has arrived.
        """
        return self._complete

    def header(self, name: str, default: str | None = None) -> str | None:
        """
        The first value of header ``name`` (any case), decoded as Latin-1.
        """
        key = name.lower().encode("latin-1")
        for k, value in self.raw_headers:
            if k == key:
                return value.decode("latin-1")
        return default

    @property
    def headers(self) -> Headers:
        """
        All headers as ``twisted.web.http_headers.Headers``.
        """
        if self._headers is None:
            h = Headers()
            for k, value in self.raw_headers:
                h.addRawHeader(k, value)
            self._headers = h
        return self._headers

    @property
    def content_type(self) -> str:
        return (self.header("content-type") or "").split(";", 1)[0].strip().lower()

    def body(self) -> Deferred:
        """
        A Deferred of the whole body as bytes.
        """
        if self._complete:
            if len(self._chunks) > 1:
                self._chunks = [b"".join(self._chunks)]
            return succeed(self._chunks[0] if self._chunks else b"")
        if self._error is not None:
            return fail(self._error)
        if self._write is not None:
            raise RuntimeError("the body is being streamed with deliver()")
        d: Deferred = Deferred()
        self._waiters.append(d)
        self._resume()
        return d

    def text(self, encoding: str = "utf-8") -> Deferred:
        """
        A Deferred of the body decoded (bad bytes replaced).
        """
        return self.body().addCallback(lambda b: b.decode(encoding, "replace"))

    def json(self) -> Deferred:
        """
        A Deferred of the body decoded as JSON.
        """
        return self.body().addCallback(_json.loads)

    def deliver(self, write: Callable[[bytes], object]) -> Deferred[None]:
        """
        Stream the body: ``write(chunk)`` for what arrived so far and for
        every chunk after; the Deferred fires when the body is complete (or
        fails with the call's error).  Use :meth:`pauseProducing` /
        :meth:`resumeProducing` to slow the backend down.
        """
        if self._waiters or self._write is not None:
            raise RuntimeError("the body is already being read")
        self._end = Deferred()
        chunks, self._chunks = self._chunks, []
        for chunk in chunks:
            write(chunk)
        self._write = write
        end = self._end
        if self._complete:
            self._end = None
            end.callback(None)
        elif self._error is not None:
            self._end = None
            end.errback(self._error)
        else:
            self._resume()
        return end

    # -- IPushProducer, for a consumer of deliver()

    def pauseProducing(self) -> None:
        self._paused = True
        if self._call is not None:
            self._call.pause()

    def resumeProducing(self) -> None:
        self._paused = False
        self._resume()

    def stopProducing(self) -> None:
        self.abort()

    def abort(self) -> None:
        """
        Give up the rest of the body: the connection is closed, never reused.
        """
        call, self._call = self._call, None
        if call is not None and not self._complete:
            call.abort_body()

    # -- fed by the call

    def _resume(self) -> None:
        if self._call is not None and not self._paused:
            self._call.resume()

    def _feed(self, data: bytes) -> bool:
        """
        Take body bytes; False when the body grew past the limit.
        """
        self._size += len(data)
        if self._size > self._limit:
            return False
        write = self._write
        if write is not None:
            write(data)
        else:
            self._chunks.append(data)
        return True

    def _done(self) -> None:
        self._complete = True
        self._call = None
        waiters, self._waiters = self._waiters, []
        if waiters:
            body = b"".join(self._chunks)
            self._chunks = [body]
            for d in waiters:
                d.callback(body)
        end, self._end = self._end, None
        if end is not None:
            end.callback(None)

    def _fail(self, error: Exception) -> None:
        if self._complete or self._error is not None:
            return
        self._error = Failure(error)
        self._call = None
        self._chunks = []
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(self._error)
        end, self._end = self._end, None
        if end is not None:
            end.errback(self._error)
