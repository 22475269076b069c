"""
A consumer of pipecomet topics over SSE, long-poll or NDJSON, built on treq.

:class:`CometClient` subscribes, hands every message to a callback,
reconnects when the stream ends or fails (after the server's ``retry`` or
``reconnect_after``, with backoff on errors) and resumes from the last id it
saw, so that a client that stays subscribed receives every message once, in
order, or an explicit ``gap``/``reset`` event::

    client = CometClient("http://127.0.0.1:8080/comet/chat", transport="sse",
                         reactor=reactor, on_message=print)
    client.start()
    ...
    yield client.stop()

It is what pipecomet's own tests and benchmarks use.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, cast
from urllib.parse import urlencode, urlsplit, urlunsplit, parse_qsl

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from ._comet._config import RESERVED_EVENTS
from ._sse import SSEParser

if TYPE_CHECKING:
    from treq.client import HTTPClient

    from ._json import JSON

__all__ = ["CometClient", "SSEParser", "CometError"]

# Messages, events and records are JSON objects of the documented shapes
# (docs/comet.md), read as the server frames them: dict[str, Any], so that
# ``msg["data"]`` is the app's own value.

log = Logger()

TRANSPORTS = ("sse", "ndjson", "longpoll")
_ACCEPT = {"sse": "text/event-stream", "ndjson": "application/x-ndjson",
           "longpoll": "application/json"}
#: Reserved event names a client hands to ``on_event`` (heartbeats and
#: timeouts are not surfaced).
CONTROL = RESERVED_EVENTS - {"heartbeat", "timeout"}


class CometError(Exception):
    """
    The server refused the subscription (4xx): retrying would not help.
    """

    def __init__(self, status: int, body: JSON) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class _Body(Protocol):
    """
    Receives a response body chunk by chunk; ``stop()`` aborts it.
    """

    def __init__(self, feed: Callable[[bytes], None], finished: Deferred) -> None:
        self.feed = feed
        self.finished = finished

    def dataReceived(self, data: bytes) -> None:
        try:
            self.feed(data)
        except Exception:
            log.failure("comet client: message handler failed")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.finished.called:
            self.finished.callback(None)

    def stop(self) -> None:
        if self.transport is not None:
            # A response body's transport is its connection's producer.
            cast(IPushProducer, self.transport).stopProducing()


class CometClient:
    """
    Subscribe to ``url`` (``http://host/comet/topic``) and keep subscribed.

    :param transport: ``sse``, ``ndjson`` or ``longpoll``.
    :param on_message: ``f(message)`` with ``{"topic", "id", "event",
        "data"}``; without it messages collect in :attr:`messages`.
    :param on_event: ``f(name, fields)`` for ``gap``, ``reset``, ``end``,
        ``reconnect``, ``shutdown`` (also kept in :attr:`events`).
    :param cursor: resume from this id instead of from now.
    :param http: a ``treq.client.HTTPClient`` to share (one is made, with
        its own non-persistent pool, when None; :meth:`stop` closes it).
    :param poll_timeout: ``timeout=`` asked on each long-poll.
    :param reconnect: False to stop after the first stream ends.
    """

    def __init__(self, url: str, *, transport: str = "sse", reactor: IReactorTime | None = None,
                 on_message: Callable[[dict[str, Any]], None] | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 cursor: str | None = None, http: HTTPClient | None = None,
                 poll_timeout: float | None = None, reconnect: bool = True,
                 headers: dict[str, str] | None = None, max_backoff: float = 30.0) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}")
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.url = url
        self.transport = transport
        self.reactor = reactor
        self.on_message = on_message
        self.on_event = on_event
        self.cursor = cursor
        self.poll_timeout = poll_timeout
        self.reconnect = reconnect
        self.headers = dict(headers or {})
        self.max_backoff = max_backoff
        self.messages: list[dict[str, Any]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.connects = 0
        self.failures = 0
        self.error: Exception | None = None
        self.retry = 1.0
        self._own_pool = None
        if http is None:
            import treq.client
            from twisted.web.client import Agent, HTTPConnectionPool

            self._own_pool = HTTPConnectionPool(reactor, persistent=False)
            http = treq.client.HTTPClient(Agent(reactor, pool=self._own_pool))
        self.http = http
        self._running = False
        self._pending: Deferred | None = None
        self._body: _Body | None = None
        self._timer: IDelayedCall | None = None
        self._positions: dict[str, str] = {}
        self._waiters: list[tuple[int, Deferred]] = []
        self._stopped: Deferred | None = None
        self.open_responses = 0

    # -- control

    def start(self) -> CometClient:
        self._running = True
        self._connect()
        return self

    def stop(self) -> Deferred:
        """
        Stop for good: abort the stream or poll in flight, cancel the
        reconnect timer.
        """
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._body is not None:
            self._body.stop()
        if self._pending is not None:
            self._pending.cancel()
        for _, d in self._waiters:
            if not d.called:
                d.errback(Failure(RuntimeError("client stopped")))
        self._waiters = []
        if self._own_pool is not None:
            return self._own_pool.closeCachedConnections()
        return succeed(None)

    def wait_for(self, count: int) -> Deferred:
        """
        A Deferred that fires once :attr:`messages` holds ``count`` messages.
        """
        d: Deferred = Deferred()
        if len(self.messages) >= count:
            d.callback(self.messages)
        else:
            self._waiters.append((count, d))
        return d

    # -- connecting

    def _request_url(self) -> str:
        if self.transport != "longpoll":
            return self.url
        parts = urlsplit(self.url)
        q = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("since", "transport")]
        q.append(("transport", "longpoll"))
        if self.cursor is not None:
            q.append(("since", self.cursor))
        if self.poll_timeout is not None:
            q.append(("timeout", str(self.poll_timeout)))
        return urlunsplit(parts._replace(query=urlencode(q)))

    def _connect(self) -> None:
        self._timer = None
        if not self._running:
            return
        headers: dict[bytes | str, bytes | str] = {"accept": _ACCEPT[self.transport]}
        headers.update(self.headers)
        if self.cursor is not None and self.transport != "longpoll":
            headers["last-event-id"] = self.cursor
        self.connects += 1
        d = self.http.get(self._request_url(), headers=headers, unbuffered=True)
        self._pending = d
        d.addCallback(self._got_response)
        d.addErrback(self._failed)

    def _got_response(self, response: IResponse) -> Deferred[None] | None:
        self._pending = None
        if not self._running:
            body = _Body(lambda b: None, Deferred())
            response.deliverBody(body)
            body.stop()
            return None
        if response.code != 200:
            return self._refused(response)
        self.failures = 0
        self.open_responses += 1
        finished: Deferred[None] = Deferred()
        feed: Callable[[bytes], None]
        if self.transport == "sse":
            parser = SSEParser(self._sse_event, self._set_retry)
            feed = parser.feed
        elif self.transport == "ndjson":
            feed = self._ndjson_feed()
        else:
            chunks: list[bytes] = []
            feed = chunks.append
        self._body = _Body(feed, finished)
        response.deliverBody(self._body)

        def ended(_: object) -> None:
            self._body = None
            self.open_responses -= 1
            if self.transport == "longpoll":
                self._poll_answer(b"".join(chunks))
            else:
                self._again(self.retry)

        finished.addCallback(ended)
        return None

    def _refused(self, response: IResponse) -> Deferred[None]:
        import treq

        def body(raw: bytes) -> None:
            try:
                content: JSON = json.loads(raw)
            except ValueError:
                content = raw.decode("utf-8", "replace")
            if 400 <= response.code < 500 and response.code not in (408, 429):
                self.error = CometError(response.code, content)
                self._running = False
                self._fire_event("error", {"status": response.code, "body": content})
                return
            after = response.headers.getRawHeaders("retry-after")
            delay = float(after[0]) if after and after[0].isdigit() else self._backoff()
            self._again(delay)

        return treq.content(response).addCallback(body)

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        if not self._running:
            return
        self.failures += 1
        self._again(self._backoff())

    def _backoff(self) -> float:
        return min(self.max_backoff, self.retry * (2 ** min(self.failures, 10)))

    def _again(self, delay: float) -> None:
        if not self._running or not self.reconnect:
            self._running = False
            return
        self._timer = self.reactor.callLater(delay, self._connect)

    def _set_retry(self, ms: int) -> None:
        self.retry = ms / 1000.0

    # -- delivering

    def _deliver(self, msg: dict[str, Any]) -> None:
        if self.on_message is not None:
            self.on_message(msg)
        else:
            self.messages.append(msg)
            if self._waiters:
                n = len(self.messages)
                ready = [(c, d) for c, d in self._waiters if c <= n]
                self._waiters = [(c, d) for c, d in self._waiters if c > n]
                for _, d in ready:
                    d.callback(self.messages)

    def _fire_event(self, name: str, fields: dict[str, Any]) -> None:
        self.events.append((name, fields))
        if name in ("reconnect", "shutdown") and "reconnect_after" in fields:
            self.retry = float(fields["reconnect_after"])
        if name == "end":
            self.reconnect = False
        if self.on_event is not None:
            self.on_event(name, fields)

    def _sse_event(self, etype: str, data: str, last_id: str | None) -> None:
        if last_id is not None:
            self.cursor = last_id
        if etype == "open":
            # The stream's head: its id is the cursor to resume from.
            return
        try:
            value = json.loads(data)
        except ValueError:
            value = data
        if etype in CONTROL:
            self._fire_event(etype, value if isinstance(value, dict) else {"data": value})
            return
        if isinstance(value, dict) and "topic" in value and "data" in value and "id" in value \
                and "," in (last_id or ""):
            # A connection with several topics sends envelopes.
            self._deliver(value)
        else:
            self._deliver({"id": last_id, "event": etype, "data": value})

    def _ndjson_feed(self) -> Callable[[bytes], None]:
        buf = [b""]

        def feed(chunk: bytes) -> None:
            lines = (buf[0] + chunk).split(b"\n")
            buf[0] = lines.pop()
            for line in lines:
                if not line.strip():
                    continue
                rec = json.loads(line)
                self._record(rec)

        return feed

    def _record(self, rec: dict[str, Any]) -> None:
        ev = rec.get("event")
        if "id" in rec and "topic" in rec:
            self._positions[rec["topic"]] = rec["id"]
            if len(self._positions) == 1 and (self.cursor is None or "," not in self.cursor):
                self.cursor = rec["id"]
            else:
                self.cursor = ",".join(f"{t}:{i}" for t, i in self._positions.items())
            self._deliver(rec)
        elif ev == "open":
            self.cursor = rec["cursor"]
            self._positions = {}
            if "," in rec["cursor"]:
                for entry in rec["cursor"].split(","):
                    t, e, o = entry.split(":")
                    self._positions[t] = f"{e}:{o}"
        elif ev == "heartbeat":
            return
        elif ev in CONTROL:
            fields = {k: v for k, v in rec.items() if k != "event"}
            if "cursor" in fields:
                self.cursor = fields["cursor"]
            self._fire_event(ev, fields)

    def _poll_answer(self, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            self.failures += 1
            self._again(self._backoff())
            return
        for ev in body.get("events", ()):
            self._fire_event("reset" if ev.get("reason") == "reset" else "gap", ev)
        for m in body.get("messages", ()):
            self._deliver(m)
        self.cursor = body.get("cursor", self.cursor)
        if "end" in body:
            self._fire_event("end", body["end"])
        if "shutdown" in body:
            self._fire_event("shutdown", body["shutdown"])
            self._again(self.retry)
            return
        self._again(0)
