"""
Comet push: topics with bounded history, subscriptions served as SSE,
long-poll or NDJSON, resume without loss, flow control, publishing.

A publish goes through the bus (:mod:`pipecomet._bus`) to the
:class:`CometHub` of every process.  The hub gives the message its id
``epoch:offset`` in its topic, keeps it in the topic's bounded history
(count, bytes, age) and fires the topic's key in the
:class:`~pipecomet._events.EventKeeper`; each waiting :class:`Subscription`
is an event listener there and writes the message to its client.  A
message's bytes are encoded once per framing and the same bytes object is
written to every connection.

Resuming is exact: a subscription given a cursor (``Last-Event-ID``,
``last_event_id=`` or ``since=``) replays the history after it and starts
listening in the same reactor turn, so nothing falls between replay and
live.  A cursor older than the history, or from another epoch, gives an
explicit ``gap`` or ``reset`` event and the ``Pipecomet-Resume`` headers,
never a silent loss.

Each streaming connection is a push producer on its request: when the
socket's send buffer is full Twisted pauses it, messages queue on the
connection up to ``buffer_bytes``, and past that the client is cut off as
slow (or, with the ``drop`` policy, the oldest queued messages are dropped
and a ``gap`` event says so).  Held requests are exempt from twisted.web's
idle timeout; heartbeats keep proxies from closing them and make a dead
peer show up as a write error.
"""

from __future__ import annotations

import hmac
import json
import os
import random
import re
from collections import OrderedDict, deque
from typing import Any, Iterable, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from ._bus import MemoryBus
from ._chain import Pipe, Stream, as_pipecomet_error
from ._errors import (
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    PipecometError,
    ServiceUnavailable,
    Unauthorized,
)
from ._events import Event, EventKeeper, EventListener
from ._interfaces import IBusReceiver, IHistoryBus
from ._lazy._parsers import decode_json
from ._responders import dumps, send_error
from ._twcompat import request_gone, transport_pending

__all__ = [
    "CometConfig",
    "TopicConfig",
    "CometHub",
    "CometService",
    "Message",
    "Published",
    "Subscription",
    "install",
    "publish_pipes",
    "format_cursor",
    "parse_cursor",
    "RESERVED_EVENTS",
]

log = Logger()

_v = attrs.validators

TOPIC_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
EVENT_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_EPOCH_RE = re.compile(r"^[0-9a-f]{1,32}$")

#: Event names the hub sends itself; a publish may not use them.
RESERVED_EVENTS = frozenset({"gap", "reset", "end", "reconnect", "shutdown", "heartbeat", "timeout"})
_END_EVENT = "pipecomet.end"

SLOW_POLICIES = ("disconnect", "drop")


# ---------------------------------------------------------------------------
# Configuration


def _opt(validator: Any) -> Any:
    return _v.optional(validator)


@attrs.frozen
class TopicConfig:
    """
    ``[comet.topics."<name>"]``: per-topic overrides (a name ending in
    ``*`` matches a prefix).  Unset keys take the ``[comet]`` value.
    """

    history_count: int | None = attrs.field(default=None, validator=_opt(_v.ge(0)))
    history_bytes: int | None = attrs.field(default=None, validator=_opt(_v.ge(0)))
    history_age: float | None = attrs.field(default=None, validator=_opt(_v.gt(0)))
    slow_policy: str | None = attrs.field(default=None, validator=_opt(_v.in_(SLOW_POLICIES)))


@attrs.frozen
class CometConfig:
    """
    ``[comet]``: comet push.

    :ivar publish_token: bearer token of ``POST /_pipecomet/publish/{topic}``;
        empty disables publishing over HTTP (403).
    :ivar heartbeat: seconds between comment heartbeats on streams.
    :ivar retry: seconds a client waits before reconnecting (SSE ``retry:``).
    :ivar longpoll_timeout: seconds a long-poll is held by default.
    :ivar longpoll_max_timeout: cap on a client's ``timeout=``.
    :ivar longpoll_batch: most messages in one long-poll answer.
    :ivar max_lifetime: seconds a stream lives before it is told to
        reconnect (0: forever); shortened by up to ``lifetime_jitter`` of it
        so that clients do not come back all at once.
    :ivar buffer_bytes: bytes a connection may queue while its client is
        not reading, beyond the socket's own buffer.
    :ivar slow_policy: ``disconnect`` a client past ``buffer_bytes``, or
        ``drop`` its oldest queued messages and send a gap event.
    :ivar max_connections: held comet requests in all (503).
    :ivar max_connections_per_topic: subscribers of one topic (503).
    :ivar max_topics_per_connection: topics one request may ask for (400).
    :ivar max_topics: topics alive at once (503).
    :ivar max_message_bytes: largest published payload (413).
    :ivar history_count: messages kept per topic for resume.
    :ivar history_bytes: bytes kept per topic.
    :ivar history_age: seconds a message is kept.
    :ivar idempotency_ttl: seconds an idempotency key is remembered.
    :ivar idempotency_keys: most keys remembered.
    :ivar topics: per-topic overrides.
    """

    publish_token: str = attrs.field(default="", validator=_v.instance_of(str))
    heartbeat: float = attrs.field(default=15.0, converter=float, validator=_v.gt(0))
    retry: float = attrs.field(default=2.0, converter=float, validator=_v.gt(0))
    longpoll_timeout: float = attrs.field(default=30.0, converter=float, validator=_v.gt(0))
    longpoll_max_timeout: float = attrs.field(default=120.0, converter=float, validator=_v.gt(0))
    longpoll_batch: int = attrs.field(default=500, validator=[_v.instance_of(int), _v.gt(0)])
    max_lifetime: float = attrs.field(default=3600.0, converter=float, validator=_v.ge(0))
    lifetime_jitter: float = attrs.field(default=0.1, converter=float,
                                         validator=[_v.ge(0), _v.lt(1)])
    buffer_bytes: int = attrs.field(default=256 * 1024, validator=[_v.instance_of(int), _v.gt(0)])
    slow_policy: str = attrs.field(default="disconnect", validator=_v.in_(SLOW_POLICIES))
    max_connections: int = attrs.field(default=10_000, validator=[_v.instance_of(int), _v.gt(0)])
    max_connections_per_topic: int = attrs.field(default=10_000,
                                                 validator=[_v.instance_of(int), _v.gt(0)])
    max_topics_per_connection: int = attrs.field(default=8,
                                                 validator=[_v.instance_of(int), _v.gt(0)])
    max_topics: int = attrs.field(default=10_000, validator=[_v.instance_of(int), _v.gt(0)])
    max_message_bytes: int = attrs.field(default=64 * 1024,
                                         validator=[_v.instance_of(int), _v.gt(0)])
    history_count: int = attrs.field(default=1000, validator=[_v.instance_of(int), _v.ge(0)])
    history_bytes: int = attrs.field(default=1024 * 1024, validator=[_v.instance_of(int), _v.ge(0)])
    history_age: float = attrs.field(default=300.0, converter=float, validator=_v.gt(0))
    idempotency_ttl: float = attrs.field(default=300.0, converter=float, validator=_v.gt(0))
    idempotency_keys: int = attrs.field(default=100_000, validator=[_v.instance_of(int), _v.gt(0)])
    topics: dict[str, TopicConfig] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.longpoll_timeout > self.longpoll_max_timeout:
            raise ValueError("longpoll_timeout: must be <= longpoll_max_timeout")


@attrs.frozen
class _Limits:
    history_count: int
    history_bytes: int
    history_age: float
    drop: bool


def _limits_for(config: CometConfig, name: str) -> _Limits:
    over = config.topics.get(name)
    if over is None:
        best = ""
        for pattern, tc in config.topics.items():
            if pattern.endswith("*") and name.startswith(pattern[:-1]) and len(pattern) > len(best):
                best, over = pattern, tc

    def pick(field: str) -> Any:
        v = getattr(over, field, None) if over is not None else None
        return getattr(config, field) if v is None else v

    return _Limits(pick("history_count"), pick("history_bytes"), pick("history_age"),
                   pick("slow_policy") == "drop")


# ---------------------------------------------------------------------------
# Messages and topics


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


# Framings a subscription writes in; a message caches its bytes per framing.
SSE, SSE_CHUNKED, ND, ND_CHUNKED = 0, 1, 2, 3


class Message:
    """
    One published message.  ``data`` is its payload as compact JSON text;
    ``id`` is ``epoch:offset`` in its topic.
    """

    __slots__ = ("topic", "offset", "id", "event", "data", "time", "size", "_frames", "_lp")

    def __init__(self, topic: str, offset: int, id: str, event: str, data: bytes,
                 time: float) -> None:
        self.topic = topic
        self.offset = offset
        self.id = id
        self.event = event
        self.data = data
        self.time = time
        # What the history counts: payload plus the per-message overhead.
        self.size = len(data) + 160
        self._frames: list[bytes | None] | None = None
        self._lp: bytes | None = None

    def envelope(self) -> bytes:
        """
        The JSON record of NDJSON and long-poll: topic, id, event, data.
        """
        return (b'{"topic":' + dumps(self.topic) + b',"id":"' + self.id.encode("ascii")
                + b'","event":' + dumps(self.event) + b',"data":' + self.data + b"}")

    def sse(self) -> bytes:
        ev = b"" if self.event == "message" else b"event: " + self.event.encode("ascii") + b"\n"
        return b"id: " + self.id.encode("ascii") + b"\n" + ev + b"data: " + self.data + b"\n\n"

    def frame(self, fmt: int) -> bytes:
        """
        This message's bytes in framing ``fmt``, encoded once for all.
        """
        frames = self._frames
        if frames is None:
            frames = self._frames = [None, None, None, None]
        out = frames[fmt]
        if out is None:
            if fmt == SSE:
                out = self.sse()
            elif fmt == SSE_CHUNKED:
                out = _chunk(self.frame(SSE))
            elif fmt == ND:
                out = self.envelope() + b"\n"
            else:
                out = _chunk(self.frame(ND))
            frames[fmt] = out
        return out

    def longpoll_body(self) -> bytes:
        """
        The long-poll answer carrying only this message, shared by every
        single-topic poller waiting at the head.
        """
        if self._lp is None:
            self._lp = (b'{"messages":[' + self.envelope() + b'],"events":[],"cursor":"'
                        + self.id.encode("ascii") + b'"}')
        return self._lp


class Topic:
    """
    A topic's ids and bounded history.  Old messages leave by count and
    bytes on append, and by age through one timed call at the oldest
    message's expiry (messages are in time order: nothing is scanned).
    """

    __slots__ = ("hub", "name", "key", "epoch", "last_offset", "history", "bytes",
                 "subscribers", "timer", "idle", "limits", "evicted", "loaded", "waiting",
                 "early")

    def __init__(self, hub: CometHub, name: str, limits: _Limits, loaded: bool = True) -> None:
        self.hub = hub
        self.name = name
        # The topic's key in the EventKeeper, shared by all its waiters.
        self.key = ("comet", name)
        self.epoch = os.urandom(4).hex()
        self.last_offset = 0
        self.history: deque[Message] = deque()
        self.bytes = 0
        self.subscribers = 0
        self.timer: Any = None
        self.idle: Any = None
        self.limits = limits
        self.evicted = 0
        # With a bus that keeps the history (Redis), a topic is loaded from
        # it before it serves; ``waiting`` holds the Deferreds of a load in
        # progress and ``early`` the messages that arrived meanwhile.
        self.loaded = loaded
        self.waiting: list[Deferred] | None = None
        self.early: list[tuple[str, int, str, bytes]] = []

    @property
    def first_offset(self) -> int:
        """
        Offset of the oldest message kept (``last_offset + 1`` when none).
        """
        return self.history[0].offset if self.history else self.last_offset + 1

    def id_at(self, offset: int) -> str:
        return f"{self.epoch}:{offset}"

    def append(self, event: str, data: bytes, now: float, offset: int | None = None) -> Message:
        self.busy()
        self.last_offset = self.last_offset + 1 if offset is None else offset
        msg = Message(self.name, self.last_offset, f"{self.epoch}:{self.last_offset}", event,
                      data, now)
        lim = self.limits
        if lim.history_count == 0 or msg.size > lim.history_bytes:
            return msg
        h = self.history
        h.append(msg)
        self.bytes += msg.size
        while len(h) > lim.history_count or self.bytes > lim.history_bytes:
            self.bytes -= h.popleft().size
            self.evicted += 1
        if self.timer is None:
            self.timer = self.hub.reactor.callLater(lim.history_age, self._expire)
        return msg

    def _expire(self) -> None:
        self.timer = None
        now = self.hub.reactor.seconds()
        age = self.limits.history_age
        h = self.history
        while h and h[0].time + age <= now:
            self.bytes -= h.popleft().size
            self.evicted += 1
        if h:
            self.timer = self.hub.reactor.callLater(h[0].time + age - now, self._expire)
        else:
            self.hub._maybe_forget(self)

    def after(self, offset: int, limit: int | None = None) -> list[Message]:
        """
        Kept messages with an offset above ``offset``, oldest first.
        """
        h = self.history
        if not h:
            return []
        start = max(0, offset + 1 - h[0].offset)
        end = len(h) if limit is None else min(len(h), start + limit)
        if start >= end:
            return []
        if start == 0 and end == len(h):
            return list(h)
        return [h[i] for i in range(start, end)]

    def busy(self) -> None:
        """
        The topic is in use again: it is not to be forgotten.
        """
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None

    def close(self) -> None:
        self.busy()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


# ---------------------------------------------------------------------------
# Cursors


def format_cursor(positions: Sequence[tuple[str, str, int]], single: bool) -> str:
    """
    ``epoch:offset`` for one topic, ``topic:epoch:offset,...`` for several.
    """
    if single:
        _, epoch, offset = positions[0]
        return f"{epoch}:{offset}"
    return ",".join(f"{t}:{e}:{o}" for t, e, o in positions)


def parse_cursor(text: str, topics: Sequence[str]) -> dict[str, tuple[str, int]]:
    """
    Read a cursor into ``{topic: (epoch, offset)}``.  ``0`` means "from the
    start of every topic's history" (epoch ``""``).  Raises 400
    ``bad_cursor`` on anything malformed.
    """
    text = text.strip()
    if text in ("", "0"):
        return {t: ("", 0) for t in topics}
    out: dict[str, tuple[str, int]] = {}
    for entry in text.split(","):
        parts = entry.strip().split(":")
        if len(parts) == 2 and len(topics) == 1:
            topic, epoch, offset = topics[0], parts[0], parts[1]
        elif len(parts) == 3:
            topic, epoch, offset = parts
        else:
            raise BadRequest(f"malformed cursor {text[:80]!r}", code="bad_cursor")
        # isdigit() alone takes any Unicode digit ("٣" is 3): ASCII only.
        if (not _EPOCH_RE.match(epoch) or not offset.isascii() or not offset.isdigit()
                or len(offset) > 18):
            raise BadRequest(f"malformed cursor {text[:80]!r}", code="bad_cursor")
        if topic in topics:
            out[topic] = (epoch, int(offset))
    return out


# ---------------------------------------------------------------------------
# Subscriptions (the many-mode condition pipe's stream)

_RESUME_RANK = {"live": 0, "last": 1, "ok": 2, "gap": 3, "reset": 4}


@implementer(IPushProducer)
class Subscription(Stream, EventListener):
    """
    One client's subscription to one or more topics, held on its request.

    Made by :meth:`CometHub.subscription` (checks and parameters), served by
    the responder the client chose (:meth:`serve`): ``sse`` and ``ndjson``
    stream, ``json`` answers as a long-poll.  It is the event listener of
    its :class:`~pipecomet._events.Event` and the push producer of its
    request.
    """

    __slots__ = ("hub", "request", "topics", "cursors", "last", "timeout", "kind", "fmt",
                 "event", "queue", "queued", "paused", "open", "pos", "objs", "done",
                 "channel", "drop", "dropped", "started", "resume")

    def __init__(self, hub: CometHub, request: Any, topics: Sequence[str],
                 cursors: dict[str, tuple[str, int]] | None, last: bool,
                 timeout: float | None) -> None:
        self.hub = hub
        self.request = request
        self.topics = topics
        self.cursors = cursors
        self.last = last
        self.timeout = timeout
        self.kind = ""
        self.fmt = SSE
        self.event: Event | None = None
        self.queue: deque[tuple[bytes, Message | None]] | None = None
        self.queued = 0
        self.paused = False
        self.open = False
        # Offsets reached per topic, in the order of ``objs``.
        self.pos: list[int] = []
        self.objs: tuple[Topic, ...] = ()
        self.done: Deferred | None = None
        # A stream's frame writer, ``writer(frame) -> bool`` (_frame_writer).
        self.channel: Any = None
        self.drop = False
        self.dropped: dict[str, list[int]] | None = None
        self.started = False
        self.resume = "live"

    # -- Stream

    def when_done(self) -> Deferred:
        if self.done is None:
            self.done = Deferred()
            if self.started and not self.open:
                self.done.callback(None)
        return self.done

    def cancel(self) -> None:
        """
        The client went away: let go of everything now.
        """
        self._close(None)

    def serve(self, responder: Any) -> None:
        """
        Start serving on the responder's request, framed for its name.
        """
        name = responder.name
        kind = "sse" if name == "sse" else "ndjson" if name == "ndjson" else "longpoll"
        self.kind = kind
        self.started = True
        self.open = True
        self.hub._opened(self)
        try:
            loading = self.hub.load_topics(self.objs)
        except Exception as e:
            self._serve_error(e)
            return
        if loading is not None:
            loading.addCallbacks(lambda _: self._serve_now() if self.open else None,
                                 lambda f: self._serve_error(f.value) if self.open else None)
            return
        self._serve_now()

    def _serve_now(self) -> None:
        kind = self.kind
        try:
            replay, control = self._resolve()
            if kind == "longpoll":
                self._serve_longpoll(replay, control)
            else:
                self._serve_stream(replay, control)
            self.cursors = None  # resolved: the positions are in ``pos`` now
        except Exception as e:
            self._serve_error(e)

    def _serve_error(self, e: BaseException) -> None:
        error = as_pipecomet_error(e, "comet subscription")
        self._close(None)
        if not self._gone():
            if self.request.startedWriting:
                self.request.finish()
            else:
                send_error(self.request, error)

    # -- resolving the cursor against the histories

    def _resolve(self) -> tuple[list[Message], list[dict[str, Any]]]:
        """
        Messages to replay and control events (gap/reset), per topic; sets
        the positions the live stream goes on from.
        """
        replay: list[Message] = []
        control: list[dict[str, Any]] = []
        worst = "live"
        for t in self.objs:
            status, msgs, ev = self._resolve_topic(t)
            if _RESUME_RANK[status] > _RESUME_RANK[worst]:
                worst = status
            if ev is not None:
                control.append(ev)
            replay.extend(msgs)
        self.resume = worst
        hub = self.hub
        if worst in ("ok",):
            hub.resume_hits += 1
        elif worst == "gap":
            hub.gaps += 1
        elif worst == "reset":
            hub.resets += 1
        if len(self.objs) > 1:
            replay.sort(key=lambda m: m.time)
        return replay, control

    def _resolve_topic(self, t: Topic) -> tuple[str, list[Message], dict[str, Any] | None]:
        cur = self.cursors.get(t.name) if self.cursors is not None else None
        first = t.first_offset
        if cur is None:
            if self.last and t.history and t.history[-1].offset == t.last_offset:
                self._set_pos(t.name, t.last_offset - 1)
                return "last", [t.history[-1]], None
            self._set_pos(t.name, t.last_offset)
            return "live", [], None
        epoch, offset = cur
        if epoch == "" and offset == 0:  # "from the start of the history"
            self._set_pos(t.name, first - 1)
            return "ok", t.after(first - 1), None
        if epoch != t.epoch or offset > t.last_offset:
            self._set_pos(t.name, first - 1)
            ev = {"topic": t.name, "reason": "reset", "from": f"{epoch}:{offset}",
                  "resumed_from": t.id_at(first - 1), "epoch": t.epoch}
            return "reset", t.after(first - 1), ev
        if offset + 1 < first:
            self._set_pos(t.name, first - 1)
            ev = {"topic": t.name, "reason": "expired", "from": t.id_at(offset),
                  "resumed_from": t.id_at(first - 1), "missed": first - 1 - offset}
            return "gap", t.after(first - 1), ev
        self._set_pos(t.name, offset)
        return "ok", t.after(offset), None

    def cursor(self) -> str:
        """
        Where this subscription is now, as a cursor to resume from.
        """
        return format_cursor([(t.name, t.epoch, o) for t, o in zip(self.objs, self.pos)],
                             len(self.objs) == 1)

    def _set_pos(self, topic: str, offset: int) -> None:
        objs = self.objs
        if len(objs) == 1:
            self.pos[0] = offset
            return
        for i, t in enumerate(objs):
            if t.name == topic:
                self.pos[i] = offset
                return

    def _resume_headers(self, resumed_from: str) -> None:
        req = self.request
        req.setHeader(b"pipecomet-resume", self.resume.encode("ascii"))
        req.setHeader(b"pipecomet-resumed-from", resumed_from.encode("ascii"))

    # -- long-poll

    def _serve_longpoll(self, replay: list[Message], control: list[dict[str, Any]]) -> None:
        resumed_from = self.cursor()
        self._resume_headers(resumed_from)
        # A first poll without a cursor answers at once with one (the
        # handshake): held without it, a poll cut before its answer would
        # leave the client nowhere to resume from.
        if replay or control or self.cursors is None:
            batch = replay[: self.hub.config.longpoll_batch]
            for m in batch:
                self._set_pos(m.topic, m.offset)
            self._answer_poll(self._poll_body(batch, control))
            return
        timeout = self.timeout if self.timeout is not None else self.hub.config.longpoll_timeout
        if getattr(self.request, "channel", None) is not None:
            _hold(self.request)
        self.event = self.hub.keeper.listen([t.key for t in self.objs], self, timeout,
                                            many=True)

    def _poll_body(self, batch: Iterable[Message], control: list[dict[str, Any]],
                   extra: dict[str, Any] | None = None) -> bytes:
        body = (b'{"messages":[' + b",".join(m.envelope() for m in batch) + b'],"events":'
                + dumps(control) + b',"cursor":' + dumps(self.cursor()))
        if extra:
            body += b"," + dumps(extra)[1:-1]
        return body + b"}"

    def _answer_poll(self, body: bytes, status: int = 200, headers: Any = None) -> None:
        req = self.request
        self._release()
        if not self._gone():
            req.setResponseCode(status)
            req.setHeader(b"content-type", b"application/json")
            req.setHeader(b"cache-control", b"no-cache")
            if headers:
                for k, v in headers.items():
                    req.setHeader(k, v)
            req.setHeader(b"content-length", b"%d" % len(body))
            req.write(body)
            req.finish()
        self._done()

    # -- streams

    def _serve_stream(self, replay: list[Message], control: list[dict[str, Any]]) -> None:
        req = self.request
        hub = self.hub
        if getattr(req, "channel", None) is None:  # the client left before we started
            self._close(None)
            return
        self.channel = _frame_writer(req)
        self.drop = all(t.limits.drop for t in self.objs)
        sse = self.kind == "sse"
        req.setResponseCode(200)
        req.setHeader(b"content-type", b"text/event-stream" if sse else b"application/x-ndjson")
        req.setHeader(b"cache-control", b"no-cache")
        req.setHeader(b"x-accel-buffering", b"no")
        self._resume_headers(self.cursor())
        # A held response must not be cut by the idle timeout (Twisted
        # #9532, #12498): the heartbeats are its activity.
        _hold(req)
        transport = req.transport
        if transport is not None and hasattr(transport, "setTcpKeepAlive"):
            transport.setTcpKeepAlive(True)
        # The head carries the cursor the stream starts from, so a client
        # that gets no message before it drops still resumes without loss.
        # In SSE it is an event with data: clients (the npm eventsource
        # among them) record an id only from an event they dispatch, and
        # one without data is never dispatched.
        cursor = self.cursor()
        opening = dumps({"event": "open", "cursor": cursor, "resume": self.resume})
        if sse:
            head = (b"retry: %d\nid: %s\nevent: open\ndata: " % (int(hub.config.retry * 1000),
                                                                cursor.encode("ascii"))
                    + opening + b"\n\n")
        else:
            head = opening + b"\n"
        # The first write sends the headers and tells us the framing.
        req.write(head)
        # The headers are on the wire: a held request need not keep them.
        headers = req.responseHeaders
        for name, _ in list(headers.getAllRawHeaders()):
            headers.removeHeader(name)
        chunked = bool(getattr(req, "chunked", False))
        self.fmt = (SSE_CHUNKED if chunked else SSE) if sse else (ND_CHUNKED if chunked else ND)
        for ev in control:
            self.send(self._control("reset" if ev["reason"] == "reset" else "gap", ev))
        single = len(self.objs) == 1
        fmt = self.fmt
        for m in replay:
            if single:
                self.send(m.frame(fmt), m)
            else:
                self._set_pos(m.topic, m.offset)
                self.send(self._multi_frame(m), m)
        if single and replay:
            self.pos[0] = replay[-1].offset
        if not self.open:  # cut off while replaying
            return
        timeout = self._lifetime()
        self.event = hub.keeper.listen([t.key for t in self.objs], self, timeout,
                                       many=True)
        hub._streams[self] = None

    def _lifetime(self) -> float | None:
        cfg = self.hub.config
        life = cfg.max_lifetime or None
        if life is not None:
            life *= 1.0 - cfg.lifetime_jitter * random.random()
        if self.timeout is not None:
            life = self.timeout if life is None else min(life, self.timeout)
        return life

    def _frame(self, data: bytes) -> bytes:
        return _chunk(data) if self.fmt in (SSE_CHUNKED, ND_CHUNKED) else data

    def _control(self, name: str, fields: dict[str, Any], retry: float | None = None) -> bytes:
        if self.kind == "sse":
            out = b""
            if retry is not None:
                out = b"retry: %d\n" % int(retry * 1000)
            out += b"event: " + name.encode("ascii") + b"\ndata: " + dumps(fields) + b"\n\n"
        else:
            out = dumps({"event": name, **fields}) + b"\n"
        return self._frame(out)

    def _multi_frame(self, m: Message) -> bytes:
        if self.kind == "sse":
            env = m.envelope()
            out = (b"id: " + self.cursor().encode("ascii") + b"\nevent: "
                   + m.event.encode("ascii") + b"\ndata: " + env + b"\n\n")
            return self._frame(out)
        return m.frame(self.fmt)

    def heartbeat(self, sse_beat: bytes, nd_beat: bytes) -> None:
        self.send(sse_beat if self.kind == "sse" else nd_beat)

    def send(self, data: bytes, msg: Message | None = None) -> None:
        """
        Write ``data`` now, or queue it while the client is not reading;
        past ``buffer_bytes`` of queue the client is slow.
        """
        if not self.open:
            return
        if not self.paused and not self.queue:
            # pipecomet's protocol sends it to the socket at once when
            # nothing waits before it (one syscall); False: not reading.
            if self.channel(data):
                return
            self._backpressure()
        q = self.queue
        if q is None:
            q = self.queue = deque()
        q.append((data, msg))
        self.queued += len(data)
        limit = self.hub.config.buffer_bytes
        if self.queued <= limit:
            return
        if not self.drop:
            self._slow()
            return
        hub = self.hub
        while self.queued > limit and q:
            old, m = q.popleft()
            self.queued -= len(old)
            if m is not None:
                hub.dropped += 1
                if self.dropped is None:
                    self.dropped = {}
                span = self.dropped.get(m.topic)
                if span is None:
                    self.dropped[m.topic] = [m.offset, m.offset]
                else:
                    span[1] = m.offset

    def _backpressure(self) -> None:
        """
        The socket's buffer is full (Twisted paused the channel): become the
        channel's push producer now, so that Twisted resumes us when it
        drains.  Registering only here keeps the producer attributes off the
        thousands of channels whose clients keep up (each costs a dict
        resize, about 1.5 KiB per connection).
        """
        self.paused = True
        req = self.request
        if req.producer is None:
            req.registerProducer(self, True)

    def _slow(self) -> None:
        hub = self.hub
        hub.slow_disconnects += 1
        log.info("comet client too slow ({queued} bytes queued): disconnected",
                 queued=self.queued)
        transport = self.request.transport
        self._close(None)
        if transport is not None:
            transport.abortConnection()

    def buffered(self) -> int:
        """
        Bytes waiting for this client: our queue plus the socket's buffer.
        """
        req = self.request
        pending = getattr(req, "pending_bytes", None)
        if pending is not None:
            return self.queued + pending()
        return self.queued + transport_pending(req.transport)

    # -- IPushProducer

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.dropped:
            dropped, self.dropped = self.dropped, None
            for topic, (a, b) in dropped.items():
                t = self.hub.topics.get(topic)
                if t is not None:
                    self.request.channel.write(self._control("gap", {
                        "topic": topic, "reason": "slow", "from": t.id_at(a - 1),
                        "to": t.id_at(b), "missed": b - a + 1}))
        q = self.queue
        while q and not self.paused and self.open:
            data, _ = q.popleft()
            self.queued -= len(data)
            self.request.channel.write(data)

    def stopProducing(self) -> None:
        self.paused = True

    # -- EventListener

    def on_invoke(self, event: Event, msg: Message) -> None:
        if self.kind == "longpoll":
            event.complete(msg)
            return
        if len(self.objs) == 1:
            self.send(msg.frame(self.fmt), msg)
        else:
            self._set_pos(msg.topic, msg.offset)
            self.send(self._multi_frame(msg), msg)

    def on_complete(self, event: Event, value: Any) -> None:
        if isinstance(value, Message):  # a long-poll answered by a publish
            self._set_pos(value.topic, value.offset)
            if len(self.objs) == 1:
                self._answer_poll(value.longpoll_body())
            else:
                self._answer_poll(self._poll_body([value], []))
            return
        # The end event: the topic is over.
        fields = {"topic": value.get("topic"), "data": value.get("data")}
        if self.kind == "longpoll":
            self._answer_poll(self._poll_body([], [], {"end": fields}))
        else:
            self._close(self._control("end", fields))

    def on_timeout(self, event: Event) -> None:
        if self.kind == "longpoll":
            self._answer_poll(self._poll_body([], []))
            return
        cfg = self.hub.config
        self.hub.lifetime_ends += 1
        self._close(self._control("reconnect", {"reconnect_after": cfg.retry,
                                                "cursor": self.cursor()}, retry=cfg.retry))

    def on_cancel(self, event: Event) -> None:
        pass

    # -- ending

    def shutdown(self, reconnect_after: float) -> None:
        """
        The server is stopping: tell the client when to come back, then close.
        """
        if not self.open:
            return
        if self.kind == "longpoll":
            self._answer_poll(self._poll_body([], [], {"shutdown": {
                "reconnect_after": reconnect_after}}), 200,
                {b"retry-after": b"%d" % max(1, round(reconnect_after))})
            return
        self._close(self._control("shutdown", {"reconnect_after": reconnect_after,
                                               "cursor": self.cursor()}, retry=reconnect_after))

    def _gone(self) -> bool:
        return request_gone(self.request)

    def _release(self) -> None:
        if not self.open:
            return
        self.open = False
        if self.event is not None:
            self.event.cancel()
        self.hub._closed(self)

    def _close(self, final: bytes | None) -> None:
        """
        End the subscription; with ``final``, write it (after anything
        queued) and finish the response.
        """
        if not self.open:
            return
        self._release()
        req = self.request
        if self.kind != "longpoll" and self.started:
            if req.producer is self and getattr(req, "channel", None) is not None:
                req.unregisterProducer()
            if final is not None and not self._gone():
                q, self.queue = self.queue, None
                if q:
                    req.channel.writeSequence([d for d, _ in q])
                self.queued = 0
                req.channel.write(final)
                req.finish()
        self.queue = None
        self.queued = 0
        self._done()

    def _done(self) -> None:
        d = self.done
        if d is not None and not d.called:
            d.callback(None)


def _hold(request: Any) -> None:
    """
    Exempt a held request from the idle timeout: pipecomet's protocol
    through ``request.hold()`` (a client EOF then means the client has
    gone), twisted.web's channel through its ``setTimeout(None)``.
    """
    hold = getattr(request, "hold", None)
    if hold is not None:
        hold()
    else:
        request.channel.setTimeout(None)


class _ChannelFrames:
    """
    Frame writer for a request on twisted.web's own channel: its write,
    refused while the transport has paused it.
    """

    __slots__ = ("channel",)

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    def __call__(self, data: bytes) -> bool:
        channel = self.channel
        if getattr(channel.transport, "producerPaused", False):
            return False
        channel.write(data)
        return True


def _frame_writer(request: Any) -> Any:
    """
    ``writer(frame) -> bool`` for a stream on ``request`` (True: written;
    False: the client is not reading, nothing was written).
    """
    write_frame = getattr(request, "write_frame", None)
    if write_frame is not None:
        return write_frame
    return _ChannelFrames(request.channel)


class _End(dict):
    """
    The value an end event completes subscriptions with.
    """


# ---------------------------------------------------------------------------
# The hub


@attrs.frozen
class Published:
    """
    What a publish did: the message's ``id``, how many subscribers it
    reached in this process, and whether it was a retry already stored.
    """

    topic: str
    id: str | None
    delivered: int
    duplicate: bool = False


@implementer(IBusReceiver)
class CometHub:
    """
    The topics, subscriptions and figures of comet push in one process.
    """

    def __init__(self, reactor: Any, keeper: EventKeeper, bus: Any, config: CometConfig) -> None:
        self.reactor = reactor
        self.keeper = keeper
        self.bus = bus
        self.config = config
        self.topics: dict[str, Topic] = {}
        self._streams: dict[Subscription, None] = {}
        self._polls: dict[Subscription, None] = {}
        self._idem: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self._heartbeat: Any = None
        # A bus that keeps the history (Redis) numbers the messages; the
        # topics here are then a cache of it, loaded before they serve.
        self.history_bus = IHistoryBus.providedBy(bus)
        self.closing = False
        self.bus_ok = True
        self.bus_drops = 0
        self.connections = 0
        self.opened = {"sse": 0, "ndjson": 0, "longpoll": 0}
        self.published = 0
        self.delivered = 0
        self.dropped = 0
        self.duplicates = 0
        self.slow_disconnects = 0
        self.resume_hits = 0
        self.gaps = 0
        self.resets = 0
        self.lifetime_ends = 0
        self.rejected: dict[str, int] = {}

    # -- lifecycle

    def start(self) -> None:
        self.closing = False
        self.bus.add_receiver(self)
        if self._heartbeat is None:
            self._heartbeat = self.reactor.callLater(self.config.heartbeat, self._beat)

    def stop(self) -> None:
        """
        Graceful shutdown: every held request gets a final event saying
        when to reconnect (spread over ``retry`` .. 2×``retry``), then closes.
        """
        self.closing = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        retry = self.config.retry
        for sub in list(self._streams) + list(self._polls):
            sub.shutdown(round(retry * (1 + random.random()), 3))
        self.bus.remove_receiver(self)
        for t in list(self.topics.values()):
            t.close()

    def _beat(self) -> None:
        self._heartbeat = self.reactor.callLater(self.config.heartbeat, self._beat)
        sse_beat, nd_beat = b": heartbeat\n\n", b'{"event":"heartbeat"}\n'
        beats = {SSE: sse_beat, SSE_CHUNKED: _chunk(sse_beat), ND: nd_beat,
                 ND_CHUNKED: _chunk(nd_beat)}
        for sub in list(self._streams):
            sub.send(beats[sub.fmt])

    # -- topics

    def _topic(self, name: str) -> Topic:
        t = self.topics.get(name)
        if t is None:
            t = self.topics[name] = Topic(self, name, _limits_for(self.config, name),
                                          loaded=not self.history_bus)
        return t

    def _maybe_forget(self, t: Topic) -> None:
        """
        A topic with no subscriber and no history is forgotten after
        ``history_age`` idle seconds (its epoch with it): kept meanwhile so
        that a client between two polls resumes without a reset.
        """
        if t.subscribers == 0 and not t.history and t.idle is None:
            t.idle = self.reactor.callLater(t.limits.history_age, self._forget, t)

    def _forget(self, t: Topic) -> None:
        t.idle = None
        if t.subscribers == 0 and not t.history and self.topics.get(t.name) is t:
            t.close()
            del self.topics[t.name]

    def _reject(self, error: PipecometError) -> PipecometError:
        self.rejected[error.code] = self.rejected.get(error.code, 0) + 1
        return error

    def check_topic(self, name: str) -> None:
        if not TOPIC_RE.match(name):
            raise self._reject(BadRequest(
                "topic names are 1-100 of A-Z a-z 0-9 _ . -", code="bad_topic"))

    # -- publishing

    def publish(self, topic: str, data: Any, event: str = "message",
                key: str | None = None) -> Deferred:
        """
        Publish ``data`` (JSON-able) on ``topic``: a Deferred of
        :class:`Published` (see :meth:`publish_json`).
        """
        return self.publish_json(topic, dumps(data), event, key)

    def publish_json(self, topic: str, data: bytes, event: str = "message",
                     key: str | None = None) -> Deferred:
        """
        Publish ``data``, already compact JSON text.  Returns a Deferred of
        :class:`Published` as the bus reports it: with the in-memory bus
        ``delivered`` counts the subscribers reached (it fires at once),
        with Redis the serving processes reached.  Raises 400 for a bad
        topic or event name, 413 past ``max_message_bytes``, 503 when a new
        topic would pass ``max_topics``; the Deferred fails with 503
        ``bus_unavailable`` when the bus cannot take the message.
        """
        self.check_topic(topic)
        if event != "message" and (not EVENT_RE.match(event) or event in RESERVED_EVENTS
                                   or event == _END_EVENT):
            raise self._reject(BadRequest(f"event name {event[:64]!r} is not allowed",
                                          code="bad_event"))
        if len(data) > self.config.max_message_bytes:
            raise self._reject(PayloadTooLarge(
                f"message of {len(data)} bytes; the limit is {self.config.max_message_bytes}",
                code="message_too_large"))
        if key is not None and not self.history_bus:
            seen = self._seen(topic, key)
            if seen is not None:
                self.duplicates += 1
                return succeed(Published(topic, seen, 0, True))
        if topic not in self.topics and len(self.topics) >= self.config.max_topics \
                and not self.history_bus:
            raise self._reject(ServiceUnavailable(
                f"{len(self.topics)} topics are alive; the limit is {self.config.max_topics}",
                code="too_many_topics", retry_after=self.config.retry))

        def done(result: Any) -> Published:
            if result.duplicate and self.history_bus:
                self.duplicates += 1
            return Published(topic, result.id, result.delivered, result.duplicate)

        def failed(f: Any) -> Any:
            if isinstance(f.value, PipecometError):
                self._reject(f.value)
            return f

        return self.bus.publish(topic, event, data, key).addCallbacks(done, failed)

    def complete(self, topic: str, data: Any = None) -> int:
        """
        The end event of ``topic``: every subscriber gets ``end`` and its
        request closes.  Returns how many were reached in this process.
        """
        self.check_topic(topic)
        before = self.keeper.completed
        self.bus.publish(topic, _END_EVENT, dumps(data)).addErrback(
            lambda f: log.warn("comet end of {topic} not published: {error}", topic=topic,
                               error=f.value))
        return self.keeper.completed - before

    def _seen(self, topic: str, key: str) -> str | None:
        idem = self._idem
        now = self.reactor.seconds()
        # Keys expire in insertion order: stop at the first one still fresh.
        while idem:
            first = next(iter(idem.values()))
            if first[0] > now:
                break
            idem.popitem(last=False)
        hit = idem.get((topic, key))
        return hit[1] if hit is not None else None

    # -- IBusReceiver

    def bus_message(self, topic: str, event: str, data: bytes, key: str | None,
                    id: str | None = None) -> Published | None:
        if event == _END_EVENT:
            try:
                value = json.loads(data)
            except ValueError:
                value = None
            self.keeper.complete(("comet", topic), _End(topic=topic, data=value))
            return None
        if id is not None:
            self._numbered(topic, id, event, data)
            return None
        if key is not None:
            seen = self._seen(topic, key)
            if seen is not None:
                self.duplicates += 1
                return Published(topic, seen, 0, True)
        t = self._topic(topic)
        msg = t.append(event, data, self.reactor.seconds())
        self.published += 1
        if key is not None:
            idem = self._idem
            idem[(topic, key)] = (self.reactor.seconds() + self.config.idempotency_ttl, msg.id)
            while len(idem) > self.config.idempotency_keys:
                idem.popitem(last=False)
        reached = self.keeper.fire(t.key, msg)
        self.delivered += reached
        if t.subscribers == 0 and not t.history:
            self._maybe_forget(t)
        return Published(topic, msg.id, reached)

    def bus_down(self, reason: str) -> None:
        if not self.bus_ok:
            return
        self.bus_ok = False
        self.bus_drops += 1
        log.warn("comet bus down: {reason}", reason=reason)

    def bus_up(self) -> None:
        if self.bus_ok:
            return
        self.bus_ok = True
        if self.history_bus:
            # The bus kept what was published meanwhile: each topic held
            # here catches up from it (missed messages, or a gap/reset
            # event for what it no longer has).
            for t in list(self.topics.values()):
                if t.loaded and t.waiting is None:
                    self._load(t).addErrback(lambda f: None)
            return
        # Messages published elsewhere while the broker was away never
        # reached this process: say so to every subscriber, never silently.
        for sub in list(self._streams):
            for t in sub.objs:
                sub.send(sub._control("gap", {"topic": t.name, "reason": "bus",
                                              "missed": None}))
        for sub in list(self._polls):
            sub._answer_poll(sub._poll_body([], [{"topic": t.name, "reason": "bus",
                                                  "missed": None} for t in sub.objs]))

    # -- a bus that keeps the history (Redis)

    def load_topics(self, topics: Sequence[Topic]) -> Deferred | None:
        """
        None when every topic can serve now; else a Deferred that fires
        when they are loaded from the bus.  Raises 503 ``bus_unavailable``
        while the bus is down (subscribers already held stay).
        """
        if not self.history_bus:
            return None
        if not self.bus_ok:
            raise self._reject(ServiceUnavailable("the comet bus is unavailable",
                                                  code="bus_unavailable",
                                                  retry_after=self.config.retry))
        waits = [self._load(t) for t in topics if not t.loaded or t.waiting is not None]
        if not waits:
            return None
        return gatherResults(waits, consumeErrors=True).addErrback(lambda f: f.value.subFailure)

    def _load(self, t: Topic) -> Deferred:
        d: Deferred = Deferred()
        if t.waiting is not None:
            t.waiting.append(d)
            return d
        t.waiting = [d]

        def loaded(history: Any) -> None:
            waiting, t.waiting = t.waiting or [], None
            self._sync(t, history)
            for w in waiting:
                w.callback(None)

        def failed(f: Any) -> None:
            waiting, t.waiting = t.waiting or [], None
            t.early = []
            for w in waiting:
                w.errback(f)

        self.bus.load(t.name, t.limits.history_count).addCallbacks(loaded, failed)
        return d

    def _sync(self, t: Topic, history: Any) -> None:
        """
        Bring ``t`` in line with the bus's copy: the first load takes it
        as is; a later one (after a drop) delivers what was missed, or
        says what is gone (``gap``) or that the epoch changed (``reset``).
        """
        msgs = history.messages
        if not t.loaded:
            t.loaded = True
            t.epoch = history.epoch
            t.history.clear()
            t.bytes = 0
            first = msgs[0].offset if msgs else history.last_offset + 1
            t.last_offset = first - 1
            for m in msgs:
                t.append(m.event, m.data, m.time, m.offset)
            t.last_offset = history.last_offset
        else:
            if history.epoch != t.epoch and not msgs:
                self._reset(t, history.epoch, history.last_offset)
            for m in msgs:
                self._receive(t, history.epoch, m.offset, m.event, m.data, m.time)
            if history.last_offset > t.last_offset:
                self._gap(t, history.last_offset)
        early, t.early = t.early, []
        for epoch, offset, event, data in early:
            self._receive(t, epoch, offset, event, data, self.reactor.seconds())

    def _numbered(self, topic: str, id: str, event: str, data: bytes) -> None:
        t = self.topics.get(topic)
        if t is None:
            return  # not held here: the bus keeps its history
        epoch, _, offset = id.partition(":")
        if not t.loaded or t.waiting is not None:
            t.early.append((epoch, int(offset), event, data))
            return
        off = int(offset)
        if epoch == t.epoch and off > t.last_offset + 1:
            # Messages between went past us: the bus may still have them.
            t.early.append((epoch, off, event, data))
            self._load(t).addErrback(lambda f: None)
            return
        self._receive(t, epoch, off, event, data, self.reactor.seconds())

    def _receive(self, t: Topic, epoch: str, offset: int, event: str, data: bytes,
                 now: float) -> None:
        if epoch != t.epoch:
            self._reset(t, epoch, offset - 1)
        elif offset <= t.last_offset:
            return  # already here (replayed and live both)
        elif offset > t.last_offset + 1:
            self._gap(t, offset - 1)
        msg = t.append(event, data, now, offset)
        self.published += 1
        self.delivered += self.keeper.fire(t.key, msg)

    def _reset(self, t: Topic, epoch: str, last: int) -> None:
        """
        The bus lost the topic's history and started a new epoch: say so.
        """
        old = t.id_at(t.last_offset)
        t.epoch = epoch
        t.history.clear()
        t.bytes = 0
        t.last_offset = last
        self.resets += 1
        self._tell(t, "reset", {"topic": t.name, "reason": "reset", "from": old,
                                "resumed_from": t.id_at(last), "epoch": epoch}, last)

    def _gap(self, t: Topic, upto: int) -> None:
        """
        Offsets ``t.last_offset + 1 .. upto`` are gone for good: say so.
        """
        missed = upto - t.last_offset
        self.gaps += 1
        self._tell(t, "gap", {"topic": t.name, "reason": "bus", "from": t.id_at(t.last_offset),
                              "resumed_from": t.id_at(upto), "missed": missed}, upto)
        # The local history stays contiguous: it restarts after the gap.
        t.history.clear()
        t.bytes = 0
        t.last_offset = upto

    def _tell(self, t: Topic, name: str, fields: dict[str, Any], pos: int) -> None:
        for sub in list(self._streams):
            if t in sub.objs:
                sub._set_pos(t.name, pos)
                sub.send(sub._control(name, fields))
        for sub in list(self._polls):
            if t in sub.objs and sub.event is not None:
                sub._set_pos(t.name, pos)
                sub._answer_poll(sub._poll_body([], [fields]))

    # -- subscribing

    def subscription(self, inp: Any, topics: Sequence[str]) -> Subscription:
        """
        A subscription of ``inp``'s request to ``topics``, after the limits
        and the request's cursor (``Last-Event-ID`` header, then
        ``last_event_id=``, then ``since=``), ``last=1`` and ``timeout=``.
        """
        cfg = self.config
        topics = tuple(dict.fromkeys(topics))
        if not topics:
            raise self._reject(BadRequest("no topic given", code="bad_topic"))
        if len(topics) > cfg.max_topics_per_connection:
            raise self._reject(BadRequest(
                f"{len(topics)} topics asked; the limit is {cfg.max_topics_per_connection}",
                code="too_many_topics_per_connection"))
        for t in topics:
            self.check_topic(t)
        if self.closing:
            raise self._reject(ServiceUnavailable("the server is shutting down",
                                                  code="shutting_down", retry_after=cfg.retry))
        if self.connections >= cfg.max_connections:
            raise self._reject(ServiceUnavailable(
                f"{self.connections} comet connections are held; the limit is "
                f"{cfg.max_connections}", code="too_many_connections", retry_after=cfg.retry))
        new = 0
        for name in topics:
            t = self.topics.get(name)
            if t is None:
                new += 1
            elif t.subscribers >= cfg.max_connections_per_topic:
                raise self._reject(ServiceUnavailable(
                    f"topic {name!r} has {t.subscribers} subscribers; the limit is "
                    f"{cfg.max_connections_per_topic}", code="topic_full",
                    retry_after=cfg.retry))
        if new and len(self.topics) + new > cfg.max_topics:
            raise self._reject(ServiceUnavailable(
                f"{len(self.topics)} topics are alive; the limit is {cfg.max_topics}",
                code="too_many_topics", retry_after=cfg.retry))
        q = inp.query
        text = inp.header("last-event-id")
        if text is None:
            text = q.get("last_event_id")
        if text is None:
            text = q.get("since")
        cursors = parse_cursor(text, topics) if text is not None else None
        last = q.get("last", "") in ("1", "true", "yes")
        timeout = None
        if "timeout" in q:
            try:
                timeout = float(q["timeout"])
            except ValueError:
                timeout = -1.0
            if not (timeout > 0):
                raise self._reject(BadRequest("timeout must be a positive number of seconds",
                                              code="bad_timeout"))
            timeout = min(timeout, cfg.longpoll_max_timeout if cfg.max_lifetime == 0
                          else max(cfg.longpoll_max_timeout, cfg.max_lifetime))
        return Subscription(self, inp.request, topics, cursors, last, timeout)

    def _opened(self, sub: Subscription) -> None:
        self.connections += 1
        self.opened[sub.kind] += 1
        if sub.kind == "longpoll":
            self._polls[sub] = None
            if sub.timeout is not None:
                sub.timeout = min(sub.timeout, self.config.longpoll_max_timeout)
        objs = []
        for name in sub.topics:
            t = self._topic(name)
            t.busy()
            t.subscribers += 1
            objs.append(t)
        sub.objs = tuple(objs)
        sub.pos = [0] * len(objs)

    def _closed(self, sub: Subscription) -> None:
        self.connections -= 1
        self._streams.pop(sub, None)
        self._polls.pop(sub, None)
        for t in sub.objs:
            t.subscribers -= 1
            if t.subscribers == 0 and not t.history:
                self._maybe_forget(t)

    # -- figures

    def status(self) -> dict[str, Any]:
        by_kind = {"sse": 0, "ndjson": 0, "longpoll": 0}
        for sub in self._streams:
            by_kind[sub.kind] += 1
        by_kind["longpoll"] = len(self._polls)
        busiest = sorted(self.topics.values(), key=lambda t: -t.subscribers)[:50]
        return {
            "connections": self.connections,
            "connections_by_transport": by_kind,
            "opened_by_transport": dict(self.opened),
            "topics": len(self.topics),
            "waiters_by_topic": {t.name: t.subscribers for t in busiest if t.subscribers},
            "history_messages": sum(len(t.history) for t in self.topics.values()),
            "history_bytes": sum(t.bytes for t in self.topics.values()),
            "published": self.published,
            "delivered": self.delivered,
            "dropped": self.dropped,
            "duplicates": self.duplicates,
            "slow_disconnects": self.slow_disconnects,
            "resume_hits": self.resume_hits,
            "gaps": self.gaps,
            "resets": self.resets,
            "lifetime_ends": self.lifetime_ends,
            "rejected": dict(self.rejected),
            "idempotency_keys": len(self._idem),
            "bus_connected": self.bus_ok,
            "bus_drops": self.bus_drops,
            "closing": self.closing,
        }


class CometService(Service):
    """
    Starts the hub's heartbeats with the app; on stop, tells every held
    client when to reconnect and closes it.
    """

    name = "comet"

    def __init__(self, hub: CometHub) -> None:
        self.hub = hub

    def startService(self) -> None:
        super().startService()
        self.hub.start()

    def stopService(self) -> Any:
        super().stopService()
        self.hub.stop()
        return succeed(None)


# ---------------------------------------------------------------------------
# Publishing over HTTP


def _check_token(hub: CometHub, inp: Any) -> None:
    token = hub.config.publish_token
    auth = inp.header("authorization")
    if not auth:
        raise hub._reject(Unauthorized("publishing needs Authorization: Bearer <token>",
                                       code="missing_token",
                                       headers={"WWW-Authenticate": 'Bearer realm="pipecomet"'}))
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise hub._reject(Unauthorized("publishing needs Authorization: Bearer <token>",
                                       code="missing_token",
                                       headers={"WWW-Authenticate": 'Bearer realm="pipecomet"'}))
    if not token:
        raise hub._reject(Forbidden("publishing over HTTP is disabled (no comet.publish_token)",
                                    code="publish_disabled"))
    if not hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8")):
        raise hub._reject(Forbidden("wrong publish token", code="bad_token"))


def _hub_of(ctx: Any) -> CometHub:
    keeper = ctx.runtime.events
    return keeper.comet


def _publish_auth(inp: Any, ctx: Any, res: Any) -> None:
    hub = _hub_of(ctx)
    _check_token(hub, inp)
    hub.check_topic(inp.path_params["topic"])
    length = inp.header("content-length")
    if length is not None and length.isdigit() and int(length) > hub.config.max_message_bytes:
        raise hub._reject(PayloadTooLarge(
            f"message of {length} bytes; the limit is {hub.config.max_message_bytes}",
            code="message_too_large"))
    return None


def _publish_body(inp: Any, ctx: Any, res: Any) -> Deferred:
    return inp.body()


def _publish_send(inp: Any, ctx: Any, res: Any) -> Any:
    hub = _hub_of(ctx)
    body: bytes = res.last or b""
    if len(body) > hub.config.max_message_bytes:
        raise hub._reject(PayloadTooLarge(
            f"message of {len(body)} bytes; the limit is {hub.config.max_message_bytes}",
            code="message_too_large"))
    ctype = (inp.header("content-type") or "").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            # NaN and Infinity are not JSON: subscribers' parsers would
            # choke on them.  Too deep or too long numbers are 400s too.
            data = dumps(decode_json(body))
        except BadRequest as e:
            raise hub._reject(BadRequest(f"the body is not valid JSON ({e.message})",
                                         code="invalid_json")) from None
    else:
        try:
            data = dumps(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise hub._reject(BadRequest("the body is not UTF-8 text",
                                         code="bad_encoding")) from None
    event = inp.query.get("event", "message")
    key = inp.header("idempotency-key") or inp.query.get("idempotency_key")
    if key is not None and not (0 < len(key) <= 200):
        raise hub._reject(BadRequest("idempotency key must be 1-200 characters",
                                     code="bad_idempotency_key"))
    return hub.publish_json(inp.path_params["topic"], data, event, key).addCallback(
        lambda done: {"topic": done.topic, "id": done.id, "delivered": done.delivered,
                      "duplicate": done.duplicate})


def publish_pipes() -> list[Pipe]:
    """
    The chain of ``POST /_pipecomet/publish/{topic}``: bearer token, topic
    and size checks before the body is read, then the publish.
    """
    return [Pipe(_publish_auth, name="publish_auth"), Pipe(_publish_body, name="publish_body"),
            Pipe(_publish_send, name="publish")]


def _bus_limits(config: CometConfig, name: str) -> tuple[int, float, float]:
    lim = _limits_for(config, name)
    return lim.history_count, lim.history_age, config.idempotency_ttl


def install(app: Any, config: CometConfig) -> None:
    """
    ``[comet]`` installer: the event keeper, the bus (in-memory unless one
    is set already), the hub with its service and status, and the publish
    route.
    """
    runtime = app.runtime
    keeper = runtime.events if runtime.events is not None else EventKeeper(app.reactor)
    if runtime.bus is None:
        runtime.bus = MemoryBus()
    if IHistoryBus.providedBy(runtime.bus):
        runtime.bus.set_limits(lambda name: _bus_limits(config, name))
    hub = CometHub(app.reactor, keeper, runtime.bus, config)
    keeper.comet = hub
    runtime.comet = hub
    runtime.events = keeper
    runtime.status_sources["comet"] = hub.status
    runtime.status_sources["events"] = keeper.status
    runtime.status_sources["bus"] = runtime.bus.status
    app.add_service(CometService(hub))
    if not any(r.path == "/_pipecomet/publish/<topic>" for r in app.routes):
        app.route("/_pipecomet/publish/<topic>", publish_pipes(), methods=("POST",))
