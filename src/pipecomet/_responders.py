"""
Responders: how a chain's outcomes reach the client.

A responder is the :class:`~pipecomet._chain.ChainSink` of one request.
``json`` sends one body when everything is in; ``ndjson`` and ``sse`` write
each result (the main chain's and every branch's) the moment it is ready.
The route says which responders it offers; the client picks with ``Accept``
or ``transport=``.  Finishing is idempotent and a gone client is never
written to.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from ._chain import Answer, ChainSink, as_pipecomet_error
from ._errors import PipecometError, error_response
from ._twcompat import request_gone as _gone
from ._observe._requests import note_error

__all__ = [
    "Responder",
    "JSONResponder",
    "NDJSONResponder",
    "SSEResponder",
    "RESPONDERS",
    "MEDIA_TYPES",
    "choose_responder",
    "dumps",
    "send_error",
]

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def dumps(value: Any) -> bytes:
    """
    Compact JSON as UTF-8 bytes; objects JSON does not know become strings.
    """
    return _encoder.encode(value).encode("utf-8")


class _Unserialisable(Exception):
    """
    A value could not be encoded; ``error`` is the logged 500 to send.
    """

    def __init__(self, error: PipecometError) -> None:
        super().__init__(error.message)
        self.error = error


def _encode(value: Any) -> bytes:
    """
    :func:`dumps`, with a value JSON cannot carry (a lone surrogate, a
    cycle...) logged and raised as :class:`_Unserialisable`: the client
    gets a 500 with the logged id at once instead of no answer.
    """
    try:
        return dumps(value)
    except Exception as e:
        raise _Unserialisable(as_pipecomet_error(e, "serialising the response")) from None


def send_error(request: Any, error: PipecometError) -> None:
    """
    Send ``error`` as the whole response, if nothing was sent yet.
    """
    if _gone(request):
        return
    if request.startedWriting:
        # Too late for a status: end the stream, the client sees it cut.
        request.finish()
        return
    note_error(request, error)  # the access log and the figures show code and id
    request.write(error_response(request, error))
    request.finish()


class Responder(ChainSink):
    """
    Base: the whole-body paths (``answer``, ``error``) every responder shares.
    """

    name = "base"
    __slots__ = ("request",)

    def __init__(self, request: Any) -> None:
        self.request = request

    def _send(self, status: int, content_type: bytes, body: bytes,
              headers: Any = None) -> None:
        request = self.request
        if _gone(request):
            return
        request.setResponseCode(status)
        if headers:
            for k, v in headers.items():
                request.setHeader(k, v)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def answer(self, answer: Answer) -> None:
        body = answer.body
        if isinstance(body, bytes):
            ctype = answer.content_type or "application/octet-stream"
        elif isinstance(body, str):
            body = body.encode("utf-8")
            ctype = answer.content_type or "text/plain; charset=utf-8"
        else:
            try:
                body = _encode(body)
            except _Unserialisable as e:
                send_error(self.request, e.error)
                return
            ctype = answer.content_type or "application/json"
        self._send(answer.status, ctype.encode("ascii"), body, answer.headers)

    def error(self, error: PipecometError) -> None:
        send_error(self.request, error)

    def result(self, value: Any) -> None:
        if isinstance(value, bytes):
            self._send(200, b"application/octet-stream", value)
            return
        try:
            body = _encode(value)
        except _Unserialisable as e:
            send_error(self.request, e.error)
            return
        self._send(200, b"application/json", body)

    def stream(self, stream: Any) -> None:
        """
        A condition pipe's stream (:class:`~pipecomet._chain.Stream`) writes
        to the request itself, framed for this responder's ``name``: the
        ``json`` responder gives long-poll, ``sse`` and ``ndjson`` streams.
        """
        stream.serve(self)


class JSONResponder(Responder):
    """
    One JSON body.  With branches: ``{"results": {name: value},
    "errors": {name: error}}``, sent when the last one is in.
    """

    name = "json"
    __slots__ = ("_results", "_errors")

    def __init__(self, request: Any) -> None:
        super().__init__(request)
        self._results: dict[str, Any] = {}
        self._errors: dict[str, Any] = {}

    def part(self, name: str, value: Any) -> None:
        self._results[name] = value

    def part_error(self, name: str, error: PipecometError) -> None:
        self._errors[name] = error.to_json()

    def close(self) -> None:
        try:
            body = _encode({"results": self._results, "errors": self._errors})
        except _Unserialisable as e:
            send_error(self.request, e.error)
            return
        self._send(200, b"application/json", body)


class _StreamResponder(Responder):
    """
    A stream of records, written as they come; headers go out with the
    first record, so an error before it still gets its proper status.
    """

    content_type = b""
    __slots__ = ("_started",)

    def __init__(self, request: Any) -> None:
        super().__init__(request)
        self._started = False

    def _headers(self) -> None:
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")

    def write_record(self, kind: str, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def _write(self, data: bytes) -> None:
        request = self.request
        if _gone(request):
            return
        if not self._started:
            self._started = True
            self._headers()
        request.write(data)

    def part(self, name: str, value: Any) -> None:
        try:
            self.write_record("result", {"name": name, "result": value})
        except _Unserialisable as e:
            self.write_record("error", {"name": name, "error": e.error.to_json()})

    def part_error(self, name: str, error: PipecometError) -> None:
        self.write_record("error", {"name": name, "error": error.to_json()})

    def result(self, value: Any) -> None:
        self.part("main", value)
        self.close()

    def error(self, error: PipecometError) -> None:
        if not self._started:
            send_error(self.request, error)
            return
        self.part_error("main", error)
        self.close()

    def close(self) -> None:
        request = self.request
        if _gone(request):
            return
        if not self._started:
            self._started = True
            self._headers()
        request.finish()


class NDJSONResponder(_StreamResponder):
    """
    One JSON object per line: ``{"name": ..., "result": ...}`` or
    ``{"name": ..., "error": {...}}``.
    """

    name = "ndjson"
    content_type = b"application/x-ndjson"
    __slots__ = ()

    def write_record(self, kind: str, record: dict[str, Any]) -> None:
        self._write(_encode(record) + b"\n")


class SSEResponder(_StreamResponder):
    """
    Server-Sent Events: ``event: result`` or ``event: error`` with the same
    JSON records as NDJSON in ``data:``.
    """

    name = "sse"
    content_type = b"text/event-stream"
    __slots__ = ()

    def write_record(self, kind: str, record: dict[str, Any]) -> None:
        self._write(b"event: " + kind.encode("ascii") + b"\ndata: " + _encode(record) + b"\n\n")


#: Responder name → class.  Parts that add transports register here.
RESPONDERS: dict[str, Callable[[Any], Responder]] = {
    "json": JSONResponder,
    "ndjson": NDJSONResponder,
    "sse": SSEResponder,
    # A stream served by the JSON responder is a long-poll (pipecomet._comet).
    "longpoll": JSONResponder,
}

#: Media type in ``Accept`` → responder name.
MEDIA_TYPES: dict[bytes, str] = {
    b"text/event-stream": "sse",
    b"application/x-ndjson": "ndjson",
    b"application/json": "json",
}


def choose_responder(request: Any, offered: tuple[str, ...]) -> str:
    """
    The responder for ``request`` among ``offered`` (first is the default):
    ``transport=`` wins, then the first ``Accept`` media type offered.
    """
    if len(offered) == 1:
        return offered[0]
    args = request.args
    if b"transport" in args:
        wanted = args[b"transport"][0].decode("ascii", "replace")
        if wanted in offered:
            return wanted
    accept = request.requestHeaders.getRawHeaders(b"accept")
    if accept:
        for item in b",".join(accept).split(b","):
            media = item.split(b";", 1)[0].strip().lower()
            name = MEDIA_TYPES.get(media)
            if name is not None and name in offered:
                return name
    return offered[0]
