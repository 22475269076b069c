"""
Responders: how a chain's outcomes reach the client, and the wire format of
every response.

A responder is the :class:`~pipecomet._interfaces.IChainSink` of one request.
``json`` sends one body when everything is in; ``ndjson`` and ``sse`` write
each result (the main chain's and every branch's) the moment it is ready.
The route says which responders it offers; the client picks with ``Accept``
or ``transport=``.  Finishing is idempotent and a gone client is never
written to.

Each responder is also the :class:`~pipecomet._comet.IStreamSink` of a comet
subscription (a many-mode condition pipe's stream) on its request: ``sse``
and ``ndjson`` stream frames, ``json`` (also offered as ``longpoll``)
answers as a long-poll.  The subscription says what to send; the responder
frames it and writes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, cast, runtime_checkable

from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.web.http import HTTPChannel, Request
from twisted.web.iweb import IRequest
from zope.interface import implementer

from ._chain import Answer, Stream, as_pipecomet_error, refuse_stream
from ._comet._interfaces import IStreamSink
from ._errors import PipecometError, error_response
from ._interfaces import IChainSink
from ._json import dumps
from ._sse import HEARTBEAT, encode_event
from ._twcompat import request_gone as _gone
from ._twcompat import transport_pending
from ._observe._requests import note_error

if TYPE_CHECKING:
    from ._comet._topics import Message

__all__ = [
    "Responder",
    "JSONResponder",
    "NDJSONResponder",
    "SSEResponder",
    "RESPONDERS",
    "MEDIA_TYPES",
    "LongPollResponder",
    "choose_responder",
    "dumps",
    "send_error",
    "envelope",
]


class _Unserialisable(Exception):
    """
    A value could not be encoded; ``error`` is the logged 500 to send.
    """

    def __init__(self, error: PipecometError) -> None:
        super().__init__(error.message)
        self.error = error


def _encode(value: object) -> bytes:
    """
    :func:`dumps`, with a value JSON cannot carry (a lone surrogate, a
    cycle...) logged and raised as :class:`_Unserialisable`: the client
    gets a 500 with the logged id at once instead of no answer.
    """
    try:
        return dumps(value)
    except Exception as e:
        raise _Unserialisable(as_pipecomet_error(e, "serialising the response")) from None


def web_request(request: IRequest | Request) -> Request:
    """
    ``request`` as the twisted.web ``Request`` it is on every server path
    (pipecomet's own protocol's request is one too): the responders write
    through its channel side (``startedWriting``, ``channel``, producers),
    which ``IRequest`` does not describe.
    """
    if not isinstance(request, Request):
        raise TypeError(f"a responder needs a twisted.web Request, not {type(request)!r}")
    return request


def send_error(to: IRequest | Request, error: PipecometError) -> None:
    """
    Send ``error`` as the whole response to the request ``to``, if
    nothing was sent yet.
    """
    request = web_request(to)
    if _gone(request):
        return
    if request.startedWriting:
        # Too late for a status: end the stream, the client sees it cut.
        request.finish()
        return
    note_error(request, error)  # the access log and the figures show code and id
    request.write(error_response(request, error))
    request.finish()


# ---------------------------------------------------------------------------
# Comet frames.  A message's frame is encoded once per framing and cached on
# the message (``Message.frame(slot, encoder)``), so the same bytes object
# is written to every connection that frames it the same way.

SSE, SSE_CHUNKED, NDJSON, NDJSON_CHUNKED, POLL_ONE = range(5)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def envelope(m: Message) -> bytes:
    """
    The JSON record of a message in NDJSON and long-poll (and in SSE when a
    subscription has several topics): topic, id, event, data.
    """
    return (b'{"topic":' + dumps(m.topic) + b',"id":"' + m.id.encode("ascii")
            + b'","event":' + dumps(m.event) + b',"data":' + m.data + b"}")


def _sse_message(m: Message) -> bytes:
    return encode_event(m.data, None if m.event == "message" else m.event, id=m.id)


def _sse_message_chunked(m: Message) -> bytes:
    return _chunk(m.frame(SSE, _sse_message))


def _ndjson_message(m: Message) -> bytes:
    return envelope(m) + b"\n"


def _ndjson_message_chunked(m: Message) -> bytes:
    return _chunk(m.frame(NDJSON, _ndjson_message))


def _poll_one(m: Message) -> bytes:
    # The long-poll answer carrying only this message, shared by every
    # single-topic poller waiting at the head.
    return (b'{"messages":[' + envelope(m) + b'],"events":[],"cursor":"'
            + m.id.encode("ascii") + b'"}')


_MESSAGE_ENCODERS: tuple[Callable[[Message], bytes], ...] = (
    _sse_message, _sse_message_chunked, _ndjson_message, _ndjson_message_chunked, _poll_one)

#: Header values of a long-poll answer (setRawHeaders copies them).
_JSON = (b"application/json",)
_NO_CACHE = (b"no-cache",)

_ND_HEARTBEAT = b'{"event":"heartbeat"}\n'
_HEARTBEATS = (HEARTBEAT, _chunk(HEARTBEAT), _ND_HEARTBEAT, _chunk(_ND_HEARTBEAT))


def _hold(request: Request) -> None:
    """
    Exempt a held request from the idle timeout (Twisted #9532, #12498):
    pipecomet's protocol through ``request.hold()`` (a client EOF then
    means the client has gone), twisted.web's channel through its
    ``setTimeout(None)``.
    """
    hold = getattr(request, "hold", None)
    if hold is not None:
        hold()
    else:
        request.channel.setTimeout(None)


@runtime_checkable
class _FrameWriter(Protocol):
    """
    What a held stream writes its frames with: pipecomet's own request, or
    :class:`_ChannelFrames` on twisted.web's channel.
    """

    def write_frame(self, data: bytes) -> bool:
        """
        Write ``data`` (True), or nothing while the client is not reading
        (False).
        """


class _ChannelFrames:
    """
    Frame writer for a request on twisted.web's own channel: its write,
    refused while the transport has paused it.
    """

    __slots__ = ("channel",)

    def __init__(self, channel: HTTPChannel) -> None:
        self.channel = channel

    def write_frame(self, data: bytes) -> bool:
        channel = self.channel
        if getattr(channel.transport, "producerPaused", False):
            return False
        channel.write(data)
        return True


def _frame_writer(request: Request) -> _FrameWriter:
    """
    The frame writer of a stream on ``request``: pipecomet's own request
    (its ``write_frame`` sends the frame to the socket at once when nothing
    waits before it, one syscall, and costs a held stream nothing more), or
    a :class:`_ChannelFrames` on twisted.web's channel.
    """
    if isinstance(request, _FrameWriter):
        return request
    return _ChannelFrames(request.channel)


def _resume_headers(request: Request, cursor: str, resume: str) -> None:
    request.setHeader(b"pipecomet-resume", resume.encode("ascii"))
    request.setHeader(b"pipecomet-resumed-from", cursor.encode("ascii"))


# ---------------------------------------------------------------------------
# Responders


class Responder:
    """
    Base: the whole-body paths (``answer``, ``error``) every responder shares.
    """

    name = "base"
    __slots__ = ("request",)

    def __init__(self, request: IRequest) -> None:
        self.request = web_request(request)

    def _send(self, status: int, content_type: bytes, body: bytes,
              headers: Mapping[str, str] | None = None) -> None:
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

    def result(self, value: object) -> None:
        if isinstance(value, bytes):
            self._send(200, b"application/octet-stream", value)
            return
        try:
            body = _encode(value)
        except _Unserialisable as e:
            send_error(self.request, e.error)
            return
        self._send(200, b"application/json", body)

    def stream(self, stream: Stream) -> None:
        """
        A condition pipe's stream (a comet subscription) is served with this
        responder as its :class:`~pipecomet._comet.IStreamSink`: ``json``
        answers it as a long-poll, ``sse`` and ``ndjson`` stream it.
        """
        if not IStreamSink.providedBy(self):
            refuse_stream(stream, self.error)
            return
        stream.serve(self)

    # -- IStreamSink, the parts every transport shares

    def gone(self) -> bool:
        return _gone(self.request)

    def fail(self, error: PipecometError) -> None:
        send_error(self.request, error)

    def abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            # TCP, TLS and UNIX stream transports all abort as TCP's does.
            cast(ITCPTransport, transport).abortConnection()

    def hold(self) -> None:
        if getattr(self.request, "channel", None) is not None:
            _hold(self.request)


@implementer(IChainSink, IStreamSink)
class JSONResponder(Responder):
    """
    One JSON body.  With branches: ``{"results": {name: value},
    "errors": {name: error}}``, sent when the last one is in.

    As a stream sink it serves a comet subscription as a long-poll: one
    answer ``{"messages": [...], "events": [...], "cursor": ...}`` per
    request.
    """

    name = "json"
    transport = "longpoll"
    held = False
    # The branch results and errors are made when the first comes (a held
    # long-poll never has any).
    __slots__ = ("_results", "_errors")

    def __init__(self, request: IRequest) -> None:
        super().__init__(request)
        self._results: dict[str, object] | None = None
        self._errors: dict[str, object] | None = None

    def part(self, name: str, value: object) -> None:
        if self._results is None:
            self._results = {}
        self._results[name] = value

    def part_error(self, name: str, error: PipecometError) -> None:
        if self._errors is None:
            self._errors = {}
        self._errors[name] = error.to_json()

    def close(self) -> None:
        try:
            body = _encode({"results": self._results or {}, "errors": self._errors or {}})
        except _Unserialisable as e:
            send_error(self.request, e.error)
            return
        self._send(200, b"application/json", body)

    # -- IStreamSink: a long-poll

    def start(self, cursor: str, resume: str, retry: float) -> bool:
        # Set now, not with the answer: a publish answers thousands of polls
        # at once, and every header set then is on the fan-out's path.
        _resume_headers(self.request, cursor, resume)
        return True

    def message(self, message: Message, cursor: str | None) -> bytes:
        return envelope(message)

    def control(self, name: str, fields: dict[str, Any], retry: float | None = None) -> bytes:
        return dumps(fields)

    def heartbeat(self) -> bytes:
        return b""  # a waiting poll sends nothing until its answer

    def write(self, frame: bytes) -> bool:
        return False  # a long-poll takes no frames: everything is in its answer

    def write_through(self, frames: list[bytes]) -> None:
        pass

    def pending(self) -> int:
        return 0

    def register_producer(self, producer: IPushProducer) -> None:
        pass

    def unregister_producer(self, producer: IPushProducer) -> None:
        pass

    def end(self, final: bytes | None) -> None:
        # A long-poll's last word is its answer: nothing more to write.
        if not _gone(self.request):
            self.request.finish()

    def answer_poll(self, messages: Sequence[Message], events: Sequence[dict[str, Any]],
                    cursor: str, extra: dict[str, Any] | None = None,
                    retry_after: float | None = None) -> None:
        """
        The one answer of a long-poll (see :meth:`IStreamSink.answer_poll`).
        """
        request = self.request
        if _gone(request):
            return
        if len(messages) == 1 and not events and extra is None and cursor == messages[0].id:
            body = messages[0].frame(POLL_ONE, _poll_one)
        else:
            body = (b'{"messages":[' + b",".join(envelope(m) for m in messages)
                    + b'],"events":' + dumps(events) + b',"cursor":' + dumps(cursor))
            if extra:
                body += b"," + dumps(extra)[1:-1]
            body += b"}"
        request.setResponseCode(200)
        # Straight into the response's Headers (canonical names): a publish
        # answers every held poll at once, and this is on that path.
        headers = request.responseHeaders
        headers.setRawHeaders(b"Content-Type", _JSON)
        headers.setRawHeaders(b"Cache-Control", _NO_CACHE)
        if retry_after is not None:
            headers.setRawHeaders(b"Retry-After", [b"%d" % max(1, round(retry_after))])
        headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        request.write(body)
        request.finish()


class LongPollResponder(JSONResponder):
    """
    The ``longpoll`` transport: the JSON responder under the name a client
    asks for with ``transport=longpoll``.
    """

    name = "longpoll"
    __slots__ = ()


@implementer(IChainSink)
class _StreamResponder(Responder):
    """
    A stream of records, written as they come; headers go out with the
    first record, so an error before it still gets its proper status.

    As a stream sink it holds the response open and writes a comet
    subscription's frames as they come.
    """

    content_type = b""
    held = True
    # Frame cache slots of a message: plain and chunked framing.
    _slots: tuple[int, int] = (SSE, SSE_CHUNKED)
    __slots__ = ("_started", "_framing", "_writer")

    def __init__(self, request: IRequest) -> None:
        super().__init__(request)
        self._started = False
        self._framing = self._slots[0]
        self._writer: _FrameWriter | None = None

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

    def part(self, name: str, value: object) -> None:
        try:
            self.write_record("result", {"name": name, "result": value})
        except _Unserialisable as e:
            self.write_record("error", {"name": name, "error": e.error.to_json()})

    def part_error(self, name: str, error: PipecometError) -> None:
        self.write_record("error", {"name": name, "error": error.to_json()})

    def result(self, value: object) -> None:
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

    # -- IStreamSink: a held stream

    def _opening(self, cursor: str, resume: str, retry: float) -> bytes:
        raise NotImplementedError

    def control(self, name: str, fields: dict[str, Any], retry: float | None = None) -> bytes:
        raise NotImplementedError

    def start(self, cursor: str, resume: str, retry: float) -> bool:
        req = self.request
        if getattr(req, "channel", None) is None:  # the client left before we started
            return False
        self._writer = _frame_writer(req)
        self._started = True
        self._headers()
        _resume_headers(req, cursor, resume)
        # A held response must not be cut by the idle timeout: the
        # heartbeats are its activity.
        _hold(req)
        transport = req.transport
        if transport is not None and hasattr(transport, "setTcpKeepAlive"):
            transport.setTcpKeepAlive(True)
        # The first write sends the headers and tells us the framing.
        req.write(self._opening(cursor, resume, retry))
        # The headers are on the wire: a held request need not keep them.
        headers = req.responseHeaders
        for name, _ in list(headers.getAllRawHeaders()):
            headers.removeHeader(name)
        self._framing = self._slots[1] if getattr(req, "chunked", False) else self._slots[0]
        return True

    def _frame(self, data: bytes) -> bytes:
        return _chunk(data) if self._framing != self._slots[0] else data

    def message(self, message: Message, cursor: str | None) -> bytes:
        slot = self._framing
        return message.frame(slot, _MESSAGE_ENCODERS[slot])

    def heartbeat(self) -> bytes:
        return _HEARTBEATS[self._framing]

    def write(self, frame: bytes) -> bool:
        assert self._writer is not None, "write() before start()"
        return self._writer.write_frame(frame)

    def write_through(self, frames: list[bytes]) -> None:
        channel = self.request.channel
        if len(frames) == 1:
            channel.write(frames[0])
        else:
            channel.writeSequence(frames)

    def pending(self) -> int:
        req = self.request
        pending = getattr(req, "pending_bytes", None)
        if pending is not None:
            return int(pending())
        return transport_pending(req.transport)

    def register_producer(self, producer: IPushProducer) -> None:
        req = self.request
        if req.producer is None:
            req.registerProducer(producer, True)

    def unregister_producer(self, producer: IPushProducer) -> None:
        req = self.request
        if req.producer is producer and getattr(req, "channel", None) is not None:
            req.unregisterProducer()

    def end(self, final: bytes | None) -> None:
        req = self.request
        if _gone(req):
            return
        if final is not None:
            req.channel.write(final)
        req.finish()

    def answer_poll(self, messages: Sequence[Message], events: Sequence[dict[str, Any]],
                    cursor: str, extra: dict[str, Any] | None = None,
                    retry_after: float | None = None) -> None:
        """
        :meth:`IStreamSink.answer_poll` on a held stream: the events and
        messages as frames, ``extra``'s ``end`` or ``shutdown`` as the last
        one, then the end of the response.
        """
        frames = [self.control("reset" if ev.get("reason") == "reset" else "gap", ev)
                  for ev in events]
        # A cursor of several topics has one entry per topic; one topic's
        # messages carry their own ids (the shared frame).
        several = cursor if "," in cursor else None
        frames += [self.message(m, several) for m in messages]
        final = None
        for name, fields in (extra or {}).items():
            final = self.control(name, fields, retry_after)
        if frames:
            self.write_through(frames)
        self.end(final)


@implementer(IStreamSink)
class NDJSONResponder(_StreamResponder):
    """
    One JSON object per line: ``{"name": ..., "result": ...}`` or
    ``{"name": ..., "error": {...}}``.  A comet stream's lines are message
    envelopes and ``{"event": name, ...}`` control records.
    """

    name = "ndjson"
    transport = "ndjson"
    content_type = b"application/x-ndjson"
    _slots = (NDJSON, NDJSON_CHUNKED)
    __slots__ = ()

    def write_record(self, kind: str, record: dict[str, Any]) -> None:
        self._write(_encode(record) + b"\n")

    def _opening(self, cursor: str, resume: str, retry: float) -> bytes:
        return dumps({"event": "open", "cursor": cursor, "resume": resume}) + b"\n"

    def control(self, name: str, fields: dict[str, Any], retry: float | None = None) -> bytes:
        return self._frame(dumps({"event": name, **fields}) + b"\n")


@implementer(IStreamSink)
class SSEResponder(_StreamResponder):
    """
    Server-Sent Events: ``event: result`` or ``event: error`` with the same
    JSON records as NDJSON in ``data:``.  A comet stream's events carry the
    message id as ``id:`` (the cursor, with several topics) and control
    events under their reserved names.
    """

    name = "sse"
    transport = "sse"
    content_type = b"text/event-stream"
    _slots = (SSE, SSE_CHUNKED)
    __slots__ = ()

    def write_record(self, kind: str, record: dict[str, Any]) -> None:
        self._write(encode_event(_encode(record), kind))

    def _opening(self, cursor: str, resume: str, retry: float) -> bytes:
        # The head carries the cursor the stream starts from, so a client
        # that gets no message before it drops still resumes without loss.
        # It is an event with data: clients (the npm eventsource among
        # them) record an id only from an event they dispatch, and one
        # without data is never dispatched.
        opening = dumps({"event": "open", "cursor": cursor, "resume": resume})
        return encode_event(opening, "open", id=cursor, retry=retry)

    def message(self, message: Message, cursor: str | None) -> bytes:
        if cursor is None:
            slot = self._framing
            return message.frame(slot, _MESSAGE_ENCODERS[slot])
        return self._frame(encode_event(envelope(message), message.event, id=cursor))

    def control(self, name: str, fields: dict[str, Any], retry: float | None = None) -> bytes:
        return self._frame(encode_event(dumps(fields), name, retry=retry))


#: Responder name → class.  Parts that add transports register here.
RESPONDERS: dict[str, Callable[[IRequest], IChainSink]] = {
    "json": JSONResponder,
    "ndjson": NDJSONResponder,
    "sse": SSEResponder,
    "longpoll": LongPollResponder,
}

#: Media type in ``Accept`` → responder name.
MEDIA_TYPES: dict[bytes, str] = {
    b"text/event-stream": "sse",
    b"application/x-ndjson": "ndjson",
    b"application/json": "json",
}


def choose_responder(request: IRequest, offered: tuple[str, ...]) -> str:
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
