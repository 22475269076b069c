"""
Comet push over real sockets on 127.0.0.1: per-transport timeouts,
cancellation on disconnect, resume exactly once, gaps, a slow reader cut
off with the server's buffer under its bound, the idle timeout not cutting
held requests, publish auth and idempotency, every limit's status and JSON
error, graceful shutdown, and 10,000 connect/disconnect cycles that leave
nothing behind.

The server runs in the test's reactor (pytest-twisted) so that the tests
can read the hub's books directly; the clients are pipecomet's own
:class:`~pipecomet.client.CometClient`, treq and raw TCP protocols.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from pipecomet import App, Config
from pipecomet._events import Condition
from pipecomet.client import CometClient

from .support import fetch, within

TOKEN = "it-token"


def serve(comet: dict[str, Any] | None = None, server: dict[str, Any] | None = None):
    app = App(reactor=reactor)
    app.route("/comet/<topic>", [Condition(lambda i, c, r: i.path_params["topic"].split(","),
                                           mode="many")],
              responders=("sse", "json", "ndjson", "longpoll"))
    cfg = {"comet": {"publish_token": TOKEN, "retry": 0.05, **(comet or {})}}
    if server:
        cfg["server"] = server
    app.configure(Config.from_dict(cfg))
    app.service.startService()
    port = reactor.listenTCP(0, app.site(), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    return app, port, base


@defer.inlineCallbacks
def close(app: App, port: Any) -> Any:
    yield within(app.service.stopService(), "the server to stop")
    yield within(port.stopListening(), "the port to close")


def books(app: App) -> Any:
    return app.runtime.events, app.runtime.comet


@defer.inlineCallbacks
def wait_until(pred: Any, limit: float = 10.0, what: str = "condition") -> Any:
    """
    Poll a condition of the test itself (not a performance bound): fail
    after ``limit`` seconds so that a broken build cannot hang the suite.
    """
    waited = 0.0
    while not pred():
        if waited > limit:
            raise AssertionError(f"timed out waiting for {what}")
        yield task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


def error_of(body: bytes) -> dict[str, Any]:
    err = json.loads(body)["error"]
    assert err["message"] and err["id"]
    return err


@pytest_twisted.inlineCallbacks
def test_timeout_per_transport_and_cancel_on_disconnect():
    app, port, base = serve({"max_lifetime": 0})
    keeper, hub = books(app)
    try:
        # Each transport ends a held request at its timeout, not with an error.
        got = {}
        for transport in ("sse", "ndjson", "longpoll"):
            url = f"{base}/comet/news?timeout=0.3&transport={transport}&since=0"
            resp, body = yield fetch("GET", url)
            got[transport] = (resp.code, body)
        assert got["longpoll"][0] == 200
        assert json.loads(got["longpoll"][1])["messages"] == []
        assert b"event: reconnect" in got["sse"][1]
        assert json.loads(got["ndjson"][1].splitlines()[-1])["event"] == "reconnect"
        # Held subscribers of every kind, then the clients go away.
        clients = [CometClient(f"{base}/comet/news", transport=t, reactor=reactor).start()
                   for t in ("sse", "ndjson", "longpoll", "sse", "ndjson")]
        yield wait_until(lambda: len(hub._streams) == 4 and len(hub._polls) == 1,
                         what="5 held subscribers")
        assert keeper.waiters() == 5
        for c in clients:
            yield within(c.stop(), "a client to stop")
        yield wait_until(lambda: keeper.waiters() == 0, what="waiters back to 0")
        assert keeper.timers == 0
        assert hub.connections == 0
    finally:
        yield close(app, port)


@pytest_twisted.inlineCallbacks
def test_resume_exactly_once_across_a_drop():
    app, port, base = serve()
    keeper, hub = books(app)
    clients = []
    try:
        for transport in ("sse", "ndjson", "longpoll"):
            c = CometClient(f"{base}/comet/feed", transport=transport, reactor=reactor,
                            poll_timeout=5)
            clients.append(c.start())
        yield wait_until(lambda: len(hub._streams) == 2 and len(hub._polls) == 1,
                         what="3 subscribers")
        for n in range(5):
            hub.publish("feed", n)
        yield wait_until(lambda: all(len(c.messages) == 5 for c in clients), what="5 messages")
        yield wait_until(lambda: len(hub._polls) == 1, what="poll held again")
        # Drop every connection from the server side, publish during the gap.
        for sub in list(hub._streams) + list(hub._polls):
            sub.request.channel.transport.abortConnection()
        for n in range(5, 10):
            hub.publish("feed", n)
        yield task.deferLater(reactor, 0.01, lambda: None)
        for n in range(10, 12):
            hub.publish("feed", n)
        yield wait_until(lambda: all(len(c.messages) >= 12 for c in clients), what="12 messages")
        for c in clients:
            assert [m["data"] for m in c.messages] == list(range(12)), c.transport
            assert c.connects >= 2
        assert hub.stats.resume_hits >= 2
    finally:
        for c in clients:
            yield within(c.stop(), "a client to stop")
        yield close(app, port)


@pytest_twisted.inlineCallbacks
def test_cursor_older_than_history_gives_a_gap():
    app, port, base = serve({"history_count": 3})
    keeper, hub = books(app)
    try:
        first = CometClient(f"{base}/comet/g", reactor=reactor).start()
        yield wait_until(lambda: hub.connections == 1, what="subscriber")
        hub.publish("g", 0)
        yield within(first.wait_for(1), "the first message")
        yield within(first.stop(), "the client to stop")
        for n in range(1, 10):
            hub.publish("g", n)
        again = CometClient(f"{base}/comet/g", reactor=reactor, cursor=first.cursor).start()
        yield within(again.wait_for(3), "three messages after the gap")
        assert [m["data"] for m in again.messages] == [7, 8, 9]
        gaps = [f for name, f in again.events if name == "gap"]
        assert len(gaps) == 1 and gaps[0]["missed"] == 6
        yield within(again.stop(), "the client to stop")
    finally:
        yield close(app, port)


class _Stalled(protocol.Protocol):
    """
    Sends a request, then stops reading: a client that hangs.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = 0
        self.lost = defer.Deferred()

    def connectionMade(self) -> None:
        sock = self.transport.getHandle()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.transport.pauseProducing()

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


@pytest_twisted.inlineCallbacks
def test_slow_reader_is_cut_off_with_bounded_buffer():
    limit = 64 * 1024
    app, port, base = serve({"buffer_bytes": limit, "max_message_bytes": 32 * 1024})
    keeper, hub = books(app)
    try:
        ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        stalled = yield within(connectProtocol(
            ep, _Stalled(b"GET /comet/big HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")),
            "a connection")
        yield wait_until(lambda: len(hub._streams) == 1, what="stream")
        sub = next(iter(hub._streams))
        peak = 0
        payload = "x" * 16_000
        frame = 16_100
        for n in range(2000):
            hub.publish("big", payload)
            if not sub.open:
                break
            peak = max(peak, sub.buffered())
            if n % 20 == 0:
                yield task.deferLater(reactor, 0, lambda: None)
        assert hub.stats.slow_disconnects == 1
        # Our queue never passed the bound; the socket buffer Twisted keeps
        # is bounded by its own high-water mark (it pauses us past it).
        assert sub.queued == 0
        assert peak <= limit + 65536 + 2 * frame, peak
        # A paused client notices the reset only once it reads again.
        stalled.dataReceived = lambda data: None
        stalled.transport.resumeProducing()
        yield wait_until(lambda: stalled.lost.called, what="client cut off")
        assert keeper.waiters() == 0 and hub.connections == 0
        # Drop policy: the same client keeps its connection and gets a gap.
    finally:
        yield close(app, port)


@pytest_twisted.inlineCallbacks
def test_drop_policy_keeps_the_client_with_a_gap_event():
    limit = 32 * 1024
    app, port, base = serve({"buffer_bytes": limit, "slow_policy": "drop"})
    keeper, hub = books(app)
    try:
        ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        stalled = yield within(connectProtocol(
            ep, _Stalled(b"GET /comet/d HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")),
            "a connection")
        yield wait_until(lambda: len(hub._streams) == 1, what="stream")
        sub = next(iter(hub._streams))
        for n in range(600):
            hub.publish("d", "y" * 8000)
            assert sub.queued <= limit
            if n % 20 == 0:
                yield task.deferLater(reactor, 0, lambda: None)
        assert sub.open and hub.stats.dropped > 0 and hub.stats.slow_disconnects == 0
        # The client reads again: it gets a gap event, then the newest messages.
        got = []
        stalled.dataReceived = lambda data: got.append(data)
        # Read at full speed now (the tiny receive window made it slow).
        stalled.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        stalled.transport.resumeProducing()
        yield wait_until(lambda: b"event: gap" in b"".join(got), what="gap event")
        stalled.transport.loseConnection()
        yield wait_until(lambda: stalled.lost.called, what="client closed")
        yield wait_until(lambda: keeper.waiters() == 0, what="released")
    finally:
        yield close(app, port)


@pytest_twisted.inlineCallbacks
def test_idle_timeout_does_not_cut_held_requests():
    app, port, base = serve({"heartbeat": 0.2}, server={"idle_timeout": 0.3})
    keeper, hub = books(app)
    try:
        resp, raw = yield fetch("GET", f"{base}/comet/slow?transport=longpoll&timeout=1.0&since=0")
        body = json.loads(raw)
        assert resp.code == 200 and body["messages"] == []
        resp, text = yield fetch("GET", f"{base}/comet/slow?timeout=1.0", unbuffered=True)
        assert b": heartbeat" in text and b"event: reconnect" in text
    finally:
        yield close(app, port)


@pytest_twisted.inlineCallbacks
def test_publish_auth_idempotency_and_limits():
    app, port, base = serve({"max_message_bytes": 200, "max_connections": 3,
                             "max_connections_per_topic": 2, "max_topics_per_connection": 2,
                             "max_topics": 3})
    keeper, hub = books(app)
    url = f"{base}/_pipecomet/publish/lim"
    auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    clients = []
    try:
        r, body = yield fetch("POST", url, data=b"1")
        assert r.code == 401 and error_of(body)["code"] == "missing_token"
        assert r.headers.getRawHeaders("www-authenticate")
        r, body = yield fetch("POST", url, data=b"1", headers={"authorization": "Bearer nope"})
        assert r.code == 403 and error_of(body)["code"] == "bad_token"
        r, body = yield fetch("POST", url, data=b"1" * 201, headers=auth)
        assert r.code == 413 and error_of(body)["code"] == "message_too_large"
        keyed = {**auth, "idempotency-key": "retry-1"}
        r1, raw1 = yield fetch("POST", url, data=b'{"v":1}', headers=keyed)
        r2, raw2 = yield fetch("POST", url, data=b'{"v":1}', headers=keyed)
        b1, b2 = json.loads(raw1), json.loads(raw2)
        assert r1.code == r2.code == 200 and b1["id"] == b2["id"] and b2["duplicate"]
        assert len(hub.topics["lim"].history) == 1
        # Connection limits: per topic, in all, topics per connection, topics alive.
        for _ in range(2):
            clients.append(CometClient(f"{base}/comet/a", reactor=reactor,
                                       reconnect=False).start())
        yield wait_until(lambda: hub.connections == 2, what="2 connections")
        r, body = yield fetch("GET", f"{base}/comet/a")
        assert r.code == 503 and error_of(body)["code"] == "topic_full"
        assert r.headers.getRawHeaders("retry-after")
        r, body = yield fetch("GET", f"{base}/comet/b,c,d")
        assert r.code == 400
        assert error_of(body)["code"] == "too_many_topics_per_connection"
        r, body = yield fetch("GET", f"{base}/comet/x1,x2")
        assert r.code == 503 and error_of(body)["code"] == "too_many_topics"
        clients.append(CometClient(f"{base}/comet/lim", reactor=reactor,
                                   reconnect=False).start())
        yield wait_until(lambda: hub.connections == 3, what="3 connections")
        r, body = yield fetch("GET", f"{base}/comet/lim")
        assert r.code == 503
        assert error_of(body)["code"] == "too_many_connections"
        r, body = yield fetch("GET", f"{base}/comet/bad%20topic")
        assert r.code == 400 and error_of(body)["code"] == "bad_topic"
        r, body = yield fetch("GET", f"{base}/comet/lim?since=not-a-cursor")
        assert r.code in (400, 503)
        assert hub.stats.rejected["topic_full"] == 1
    finally:
        for c in clients:
            yield within(c.stop(), "a client to stop")
        yield close(app, port)


@pytest_twisted.inlineCallbacks
def test_graceful_shutdown_event():
    app, port, base = serve({"retry": 1.0})
    keeper, hub = books(app)
    sse = CometClient(f"{base}/comet/s", reactor=reactor, reconnect=False).start()
    lp = CometClient(f"{base}/comet/s", transport="longpoll", reactor=reactor).start()
    try:
        yield wait_until(lambda: len(hub._streams) == 1 and len(hub._polls) == 1, what="held")
        yield within(app.service.stopService(), "the server to stop")
        yield wait_until(lambda: any(n == "shutdown" for n, _ in sse.events) and
                         any(n == "shutdown" for n, _ in lp.events), what="shutdown events")
        fields = dict(sse.events)["shutdown"]
        assert 1.0 <= fields["reconnect_after"] <= 2.0
        assert keeper.waiters() == 0
    finally:
        yield within(sse.stop(), "the SSE client to stop")
        yield within(lp.stop(), "the long-poll client to stop")
        yield within(port.stopListening(), "the port to close")


class _Cycle(protocol.Protocol):
    def __init__(self, request: bytes, done: defer.Deferred) -> None:
        self.request = request
        self.done = done

    def connectionMade(self) -> None:
        self.transport.write(self.request)
        # A held long-poll sends nothing: hang up a moment after asking;
        # streams hang up when their head arrives.
        self.timer = None
        if b"longpoll" in self.request:
            self.timer = reactor.callLater(0.02, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not self.done.called:
            self.done.callback(None)


class _CycleFactory(protocol.ClientFactory):
    def __init__(self, request: bytes, done: defer.Deferred) -> None:
        self.request = request
        self.done = done

    def buildProtocol(self, addr: Any) -> _Cycle:
        return _Cycle(self.request, self.done)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.done.errback(reason)


@pytest_twisted.inlineCallbacks
def test_ten_thousand_connect_disconnect_cycles_leave_nothing():
    app, port, base = serve({"history_count": 50, "history_bytes": 20_000,
                             "idempotency_keys": 100, "max_lifetime": 60.0,
                             "longpoll_timeout": 30.0})
    keeper, hub = books(app)
    calls_before = len(reactor.getDelayedCalls())
    number = port.getHost().port
    requests = [
        b"GET /comet/cyc%d HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n",
        b"GET /comet/cyc%d HTTP/1.1\r\nHost: x\r\nAccept: application/x-ndjson\r\n\r\n",
        b"GET /comet/cyc%d?transport=longpoll&since=0 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /comet/cyc%d,other HTTP/1.1\r\nHost: x\r\nLast-Event-ID: other:ab:1\r\n\r\n",
    ]
    cycles, concurrency = 10_000, 50
    peak = {"waiters": 0, "timers": 0}
    progress = {"n": 0}

    def one(n: int) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()
        req = requests[n % 4] % (n % 7)
        factory = _CycleFactory(req, done)
        reactor.connectTCP("127.0.0.1", number, factory)
        return done

    @defer.inlineCallbacks
    def worker(w: int) -> Any:
        for n in range(w, cycles, concurrency):
            if n % 97 == 0:
                hub.publish(f"cyc{n % 7}", {"n": n}, key=f"k{n}")
            d = one(n)
            peak["waiters"] = max(peak["waiters"], keeper.waiters())
            peak["timers"] = max(peak["timers"], keeper.timers)
            yield d
            progress["n"] += 1

    try:
        all_done = defer.gatherResults([worker(w) for w in range(concurrency)])
        # A bound for a broken build, not a performance target.
        yield within(all_done, "10,000 cycles", limit=240)
        assert progress["n"] == cycles
        yield wait_until(lambda: keeper.waiters() == 0, what="no waiter left")
        assert peak["waiters"] > 0  # the subscriptions were really held
        assert keeper.waiters() == 0 and keeper.timers == 0
        assert hub.connections == 0 and not hub._streams and not hub._polls
        assert hub.stats.opened["sse"] + hub.stats.opened["ndjson"] == cycles * 3 // 4
        assert hub.stats.opened["longpoll"] > 0
        for t in hub.topics.values():
            assert len(t.history) <= 50 and t.bytes <= 20_000
        assert len(hub._idem) <= 100
        # Timed calls left: at most the topics' expiry/idle timers.
        left = len(reactor.getDelayedCalls()) - calls_before
        assert left <= 2 * len(hub.topics), left
    finally:
        yield close(app, port)
