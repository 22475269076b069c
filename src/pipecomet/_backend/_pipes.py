"""
Declarative backend pipes: :func:`call` (one call, its answer as the pipe's
result) and :func:`proxy` (forward the request, stream the answer back).
"""

from __future__ import annotations

import json as _json
import string
from typing import TYPE_CHECKING, Any, Sequence, TypeVar, cast
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from .._chain import Answer, Pipe, PipeContext, PipeInput, PipeResult, SkipIf, Stream
from .._errors import BadRequest
from .._observe._requests import trace_headers
from .._twcompat import request_gone
from ._response import Response

_T = TypeVar("_T")

if TYPE_CHECKING:
    from .._comet import IStreamSink
    from .._json import JSON
    from .._responders import Responder
    # (Imported where used: pipecomet._http imports the app, which imports this.)
    from .._http._request import Request
    from .._lazy._body import LazyBody

__all__ = ["BackendPipe", "call", "proxy", "HOP_BY_HOP"]

#: Headers that belong to one connection, never forwarded (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
})


#: Headers a proxied request gets from pipecomet, not from the client.
_TRACE = frozenset({b"x-request-id", b"traceparent"})


class BackendPipe:
    """
    Base of the pipe functions that call a backend service; ``App.check()``
    finds them to fail at start when the service is not declared.

    :ivar service: the backend service's name.
    """

    service: str = ""

    def __call__(self, inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Deferred[Any]:
        raise NotImplementedError


class _Call(BackendPipe):
    def __init__(self, service: str, method: str, path: str, params: Sequence[str],
                 send_body: bool, timeout: float | None, raw: bool) -> None:
        self.service = service
        self.method = method.upper()
        self.path = path
        self.fields = [f for _, f, _, _ in string.Formatter().parse(path) if f]
        self.params = tuple(params)
        self.send_body = send_body
        self.timeout = timeout
        self.raw = raw

    def _value(self, inp: PipeInput, name: str) -> str:
        if name in inp.path_params:
            return str(inp.path_params[name])
        query = inp.query
        if name in query:
            return query[name]
        raise BadRequest(f"missing parameter {name!r}", code="missing_parameter",
                         details={"param": name})

    def __call__(self, inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Deferred:
        service = ctx.backend(self.service)
        values = {f: quote(self._value(inp, f), safe="") for f in self.fields}
        path = self.path.format(**values) if values else self.path
        query = inp.query
        params = [(p, query[p]) for p in self.params if p in query]
        # The request's id and a W3C traceparent go with every call.
        headers = trace_headers(ctx)
        if self.send_body:
            ctype = inp.header("content-type")
            if ctype:
                headers["Content-Type"] = ctype

            def send(body: bytes) -> Deferred[Response]:
                return service.request(self.method, path, params=params, data=body,
                                       headers=headers, timeout=self.timeout)

            d = inp.body().addCallback(send)
        else:
            d = service.request(self.method, path, params=params, headers=headers,
                                timeout=self.timeout)
        return d if self.raw else d.addCallback(_result)


def _result(resp: Response) -> Deferred[JSON | bytes | Answer]:
    def decode(body: bytes) -> JSON | bytes | Answer:
        ctype = resp.content_type
        if not resp.ok:
            return Answer(body, status=resp.status,
                          content_type=resp.header("content-type") or "application/octet-stream")
        if ctype == "application/json" or ctype.endswith("+json"):
            return _json.loads(body) if body else None
        if ctype.startswith("text/"):
            return body.decode("utf-8", "replace")
        return body

    return resp.body().addCallback(decode)


def call(service: str, method: str, path: str, *, name: str = "", params: Sequence[str] = (),
         body: bool = False, timeout: float | None = None, raw: bool = False,
         skip_if: SkipIf | None = None) -> Pipe:
    """
    A pipe that makes one call to ``service``.

    :param path: path template; ``{name}`` fields are filled from the route's
        path parameters, then from the query (400 ``missing_parameter``
        when neither has it), each percent-encoded.
    :param params: names of request query parameters passed on as the
        call's query.
    :param body: send the request's body (and its ``Content-Type``).
    :param timeout: the call's deadline (the service's ``timeout`` when None).
    :param raw: the pipe's result is the :class:`Response` itself; otherwise
        a 2xx body decoded (JSON, text or bytes) and any other status
        answered to the client as the backend sent it.
    """
    func = _Call(service, method, path, params, body, timeout, raw)
    return Pipe(func, name=name or f"{service}", skip_if=skip_if)


class _ProxiedStream(Stream):
    """
    A backend's answer streamed to the client: status, end-to-end headers,
    body as it comes (the backend is paused while the client is slow).
    """

    __slots__ = ("response", "request", "_done")

    def __init__(self, response: Response) -> None:
        self.response = response
        self.request: http.Request | None = None
        self._done: Deferred[None] = Deferred()

    def serve(self, responder: IStreamSink) -> None:
        # A stream is served by pipecomet's own responders, which all write
        # to a twisted.web request (``.request``, which IStreamSink does not
        # declare).
        request = self.request = cast("Responder", responder).request
        resp = self.response
        request.setResponseCode(resp.status)
        headers = request.responseHeaders
        for k, value in resp.raw_headers:
            if k not in HOP_BY_HOP:
                headers.addRawHeader(k, value)
        request.registerProducer(resp, True)
        resp.deliver(request.write).addCallbacks(self._ended, self._failed)

    def _ended(self, _: object) -> None:
        request = self.request
        assert request is not None  # set by serve()
        request.unregisterProducer()
        if not request_gone(request):
            request.finish()
        if not self._done.called:
            self._done.callback(None)

    def _failed(self, f: Failure) -> None:
        request = self.request
        assert request is not None  # set by serve()
        request.unregisterProducer()
        if not request_gone(request):
            # The status went out already: cut the connection so the client
            # sees a broken body rather than a short one.
            request.loseConnection()
        if not self._done.called:
            self._done.callback(None)

    def cancel(self) -> None:
        self.response.abort()
        if not self._done.called:
            self._done.callback(None)

    def when_done(self) -> Deferred:
        return self._done


@implementer(IBodyProducer)
class _StreamedRequestBody:
    """
    The incoming request's body forwarded to the backend as it arrives
    (nothing of it kept): the client's connection is not read while the
    backend's is full.  ``[limits] max_body_bytes`` still applies: a body
    over it is answered 413 and the backend connection is cut.

    :param request: the incoming request (paused and resumed).
    :param body: its lazy body.
    :param length: its ``Content-Length``; None when chunked (the
        backend then gets it chunked too).
    """

    def __init__(self, request: Request, body: LazyBody, length: int | None) -> None:
        self.request = request
        self.body = body
        self.length: int | object = length if length is not None else UNKNOWN_LENGTH
        self._consumer: IConsumer | None = None
        self._paused = False

    def startProducing(self, consumer: IConsumer) -> Deferred:
        self._consumer = consumer
        consumer.registerProducer(self, True)
        return self.body.stream_raw(self._write).addBoth(self._ended)

    def _write(self, data: bytes) -> None:
        consumer = self._consumer
        if consumer is not None:
            consumer.write(data)

    def _ended(self, result: _T) -> _T:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.unregisterProducer()
        self.resumeProducing()
        return result

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self.request.pause_body()

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self.request.resume_body()

    def stopProducing(self) -> None:
        # The backend connection is gone: the rest of the body goes nowhere.
        self._consumer = None
        self.resumeProducing()


class _Proxy(BackendPipe):
    def __init__(self, service: str, strip_prefix: str, add_prefix: str,
                 timeout: float | None) -> None:
        self.service = service
        self.strip = strip_prefix.rstrip("/").encode("utf-8")
        self.add = add_prefix.rstrip("/").encode("utf-8")
        self.timeout = timeout

    def __call__(self, inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Deferred:
        service = ctx.backend(self.service)
        request = inp.request
        target = request.uri
        if self.strip and target.startswith(self.strip):
            target = target[len(self.strip):]
        if not target.startswith(b"/"):
            target = b"/" + target
        target = self.add + target
        headers: list[tuple[bytes, bytes]] = []
        forwarded_for = b""
        host = b""
        connection_tokens: set[bytes] = set()
        for value in request.requestHeaders.getRawHeaders(b"connection", ()):
            connection_tokens.update(t.strip().lower() for t in value.split(b","))
        for k, values in request.requestHeaders.getAllRawHeaders():
            lk = k.lower()
            if (lk in HOP_BY_HOP or lk in connection_tokens or lk == b"content-length"
                    or lk in _TRACE):
                continue
            if lk == b"host":
                host = values[0]
                continue
            if lk == b"x-forwarded-for":
                forwarded_for = b", ".join(values)
                continue
            for value in values:
                headers.append((k, value))
        client = request.getClientAddress()
        peer = getattr(client, "host", "")
        peer_b = peer.encode("ascii") if isinstance(peer, str) else b""
        headers.append((b"X-Forwarded-For",
                        forwarded_for + b", " + peer_b if forwarded_for else peer_b))
        headers.append((b"X-Forwarded-Proto", b"https" if request.isSecure() else b"http"))
        if host:
            headers.append((b"X-Forwarded-Host", host))
        # The request's id (the client's, when it sent a valid one) and a
        # traceparent of this call, in place of the client's.
        headers.extend((k.encode("ascii"), v.encode("ascii"))
                       for k, v in trace_headers(ctx).items())
        method = request.method.decode("ascii")
        has_body = (request.requestHeaders.hasHeader(b"content-length")
                    or request.requestHeaders.hasHeader(b"transfer-encoding"))

        def send(body: bytes | _StreamedRequestBody | None) -> Deferred:
            return service.request(method, target, data=body, headers=headers,
                                   timeout=self.timeout, stream=True)

        if not has_body:
            d = send(None)
        else:
            from .._http._request import Request
            from .._lazy._body import LazyBody

            source = inp.body_source
            if isinstance(source, LazyBody) and isinstance(request, Request):
                # pipecomet's own protocol: the body streams as it comes.
                length = request.requestHeaders.getRawHeaders(b"content-length")
                d = send(_StreamedRequestBody(request, source,
                                              int(length[0]) if length else None))
            else:
                # twisted.web's channel (``[server] protocol = "twisted"``)
                # has the body whole already.
                d = inp.body().addCallback(send)
        return d.addCallback(_ProxiedStream)


def proxy(service: str, *, strip_prefix: str = "", add_prefix: str = "", name: str = "",
          timeout: float | None = None) -> Pipe:
    """
    A pipe that forwards the request to ``service`` and streams the answer
    back: method, path (``strip_prefix`` removed, ``add_prefix`` put in
    front), query, end-to-end headers, body; ``X-Forwarded-For``,
    ``-Proto`` and ``-Host`` added.  Route it with a path converter, e.g.
    ``app.route("/backend/users/<path:rest>", [proxy("users",
    strip_prefix="/backend/users")], methods=[...])``.
    """
    return Pipe(_Proxy(service, strip_prefix, add_prefix, timeout),
                name=name or f"proxy_{service}")
