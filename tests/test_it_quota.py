"""
Integration tests of the quota pool: real HTTP through a real server on
127.0.0.1 and real pool threads.  Blocking pipes wait on gates the test
opens, so no test depends on how fast the machine is; bounded polls of
``/_pipecomet/status`` wait for the server to reach a state.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.client import HTTPConnectionPool

from pipecomet import App, Config, Pipe
from .support import TwistdProcess, within

GATES: dict[str, threading.Event] = {}


def gate(name: str) -> threading.Event:
    return GATES.setdefault(name, threading.Event())


def blocking(inp: Any, ctx: Any, res: Any) -> dict[str, Any]:
    name = inp.query["gate"]
    # Bounded, so a failing test cannot leave a thread behind for ever.
    gate(name).wait(30)
    return {"gate": name, "thread": threading.current_thread().name}


def record_thread(key: str) -> Any:
    def pipe(inp: Any, ctx: Any, res: Any) -> int:
        ctx.setdefault("threads", {})[key] = threading.get_ident()
        return threading.get_ident()

    pipe.__name__ = key
    return pipe


QUOTA = {
    "size": 4,
    "retry_after": 2.0,
    "categories": {
        "full": {"limit": 1, "queue": 1, "retry_after": 3},
        "qt": {"limit": 1, "queue": 5, "queue_timeout": 0.3},
        "ex": {"limit": 1, "queue": 5, "timeout": 0.3},
        "cx": {"limit": 1, "queue": 5},
        "mode": {"limit": 1},
    },
}


class Server:
    def __init__(self) -> None:
        self.app = App(reactor=reactor, name="quota-it")
        for cat in QUOTA["categories"]:
            if cat != "mode":
                self.app.route(f"/block/{cat}", [Pipe(blocking, name="blocking", run="thread",
                                                      category=cat)])
        self.app.route("/mode", [
            Pipe(record_thread("before"), name="before"),
            Pipe(record_thread("t1"), name="t1", run="thread", category="mode"),
            Pipe(record_thread("t2"), name="t2", run="thread", category="mode"),
            Pipe(record_thread("after"), name="after"),
            Pipe(lambda inp, ctx, res: ctx["threads"], name="report"),
        ])
        self.app.configure(Config.from_dict({"quota": QUOTA}))
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.app.service.startService()
        self.port = reactor.listenTCP(0, self.app.site(), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        yield None
        return self

    @defer.inlineCallbacks
    def stop(self) -> Any:
        for g in GATES.values():
            g.set()
        yield self.port.stopListening()
        yield self.app.service.stopService()
        yield self.pool.closeCachedConnections()
        GATES.clear()

    def get(self, path: str) -> Any:
        return within(treq.get(self.base + path, pool=self.pool), f"GET {path}")

    @defer.inlineCallbacks
    def status(self, category: str) -> Any:
        r = yield self.get("/_pipecomet/status")
        body = yield within(r.json())
        return body["quota"]["categories"][category]

    @defer.inlineCallbacks
    def wait_for(self, category: str, **want: int) -> Any:
        """
        Poll the status endpoint until the category shows ``want``.
        """
        figures = None
        for _ in range(500):
            figures = yield self.status(category)
            if all(figures[k] == v for k, v in want.items()):
                return figures
            yield task.deferLater(reactor, 0.02, lambda: None)
        raise AssertionError(f"{category}: wanted {want}, status shows {figures}")


@pytest_twisted.inlineCallbacks
def test_queue_full_is_503_with_retry_after() -> Any:
    server = yield Server().start()
    try:
        first = server.get("/block/full?gate=f1")
        yield server.wait_for("full", running=1)
        second = server.get("/block/full?gate=f1")
        yield server.wait_for("full", queued=1)
        third = yield server.get("/block/full?gate=f1")
        assert third.code == 503
        assert third.headers.getRawHeaders("retry-after") == ["3"]
        body = yield within(third.json())
        assert body["error"]["code"] == "queue_full"
        assert body["error"]["category"] == "full"
        assert set(body["error"]) >= {"code", "message", "id"}
        gate("f1").set()
        for d in (first, second):
            r = yield d
            assert r.code == 200
            assert (yield within(r.json()))["gate"] == "f1"
        figures = yield server.wait_for("full", completed=2)
        assert (figures["rejected"], figures["queued"], figures["threads"]) == (1, 0, 0)
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_queue_timeout_is_503() -> Any:
    server = yield Server().start()
    try:
        first = server.get("/block/qt?gate=q1")
        yield server.wait_for("qt", running=1)
        late = yield server.get("/block/qt?gate=q1")
        assert late.code == 503
        assert late.headers.hasHeader("retry-after")
        body = yield within(late.json())
        assert body["error"]["code"] == "queue_timeout"
        figures = yield server.status("qt")
        assert (figures["queue_timeouts"], figures["queued"], figures["running"]) == (1, 0, 1)
        assert figures["queue_wait"]["count"] == 1  # only the first one started
        gate("q1").set()
        r = yield first
        assert r.code == 200
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_execution_timeout_is_504_and_the_zombie_keeps_its_thread() -> Any:
    server = yield Server().start()
    try:
        r = yield server.get("/block/ex?gate=e1")
        assert r.code == 504
        body = yield within(r.json())
        assert body["error"]["code"] == "execution_timeout"
        figures = yield server.status("ex")
        assert (figures["zombies"], figures["threads"], figures["running"]) == (1, 1, 0)
        assert figures["execution_timeouts"] == 1
        # The zombie still holds the category's only thread: the next call waits.
        gate("e2").set()
        nxt = server.get("/block/ex?gate=e2")
        yield server.wait_for("ex", queued=1)
        gate("e1").set()  # the zombie's thread returns; the waiting call runs
        r = yield nxt
        assert r.code == 200
        figures = yield server.wait_for("ex", zombies=0, threads=0)
        assert (figures["zombies_returned"], figures["completed"]) == (1, 1)
    finally:
        yield server.stop()


class RawClient(Protocol):
    def __init__(self, path: str) -> None:
        self.path = path

    def connectionMade(self) -> None:
        self.transport.write(f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())


@pytest_twisted.inlineCallbacks
def test_client_disconnect_removes_its_queued_job() -> Any:
    server = yield Server().start()
    try:
        first = server.get("/block/cx?gate=c1")
        yield server.wait_for("cx", running=1)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port.getHost().port)
        client = yield connectProtocol(endpoint, RawClient("/block/cx?gate=c1"))
        yield server.wait_for("cx", queued=1)
        # A reset, as from a client killed mid-call.  (A FIN alone is read
        # by the lazy channel as a half-close: it answers, then closes.)
        client.transport.abortConnection()
        figures = yield server.wait_for("cx", queued=0)
        assert figures["cancelled"] == 1
        assert figures["started"] == 1  # the gone client's job never ran
        gate("c1").set()
        r = yield first
        assert r.code == 200
        figures = yield server.wait_for("cx", completed=1, threads=0)
        assert figures["started"] == 1
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_async_mode_runs_thread_pipes_as_one_job_then_returns_to_the_reactor() -> Any:
    server = yield Server().start()
    try:
        r = yield server.get("/mode")
        assert r.code == 200
        threads = yield within(r.json())
        reactor_thread = threading.get_ident()
        assert threads["before"] == threads["after"] == reactor_thread
        assert threads["t1"] == threads["t2"] != reactor_thread
        figures = yield server.status("mode")
        assert (figures["started"], figures["completed"]) == (1, 1)
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_demo_flood_of_slow_calls_gets_503_while_fast_answers() -> Any:
    """
    The demo gateway under ``twistd -n pipecomet`` (demo.toml: ``slow``
    limit 4, queue 8; ``fast`` reserve 4): 120 concurrent slow calls fill
    ``slow``'s threads and queue, the rest get 503 at once, and fast calls
    are served from their own threads while every slow thread is still
    held — shown by the server's figures, not by timing.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    server = yield TwistdProcess().start()
    base = f"http://127.0.0.1:{server.port}"

    @defer.inlineCallbacks
    def status() -> Any:
        r = yield within(treq.get(f"{base}/_pipecomet/status", pool=pool), "the status")
        return (yield within(r.json()))["quota"]["categories"]

    slow: list[defer.Deferred] = []
    try:
        # ms=10000 (the most the demo allows): no slow call ends while the
        # test looks, so "all slow threads held" is a state, not a race.
        answered: list[Any] = []

        def arrived(r: Any) -> Any:
            answered.append(r)
            return r

        slow = [within(treq.get(f"{base}/api/slow.get?app_key=demo-key&ms=10000", pool=pool),
                       "a slow call").addCallback(arrived)
                for _ in range(120)]
        figures = None
        for _ in range(1500):
            figures = (yield status())["slow"]
            if figures["submitted"] == 120:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        assert figures["submitted"] == 120, figures
        limit, queue = figures["limit"], figures["queue_limit"]
        assert (figures["running"], figures["queued"], figures["rejected"]) == \
            (limit, queue, 120 - limit - queue), figures
        for _ in range(1500):
            if len(answered) >= 120 - limit - queue:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        assert len(answered) == 120 - limit - queue
        for r in list(answered):
            assert r.code == 503 and r.headers.hasHeader("retry-after")
            assert (yield within(r.json()))["error"]["code"] == "queue_full"
        fast = yield defer.gatherResults(
            [within(treq.get(f"{base}/api/fast.get?app_key=demo-key", pool=pool), "a fast call")
             for _ in range(8)])
        for r in fast:
            assert r.code == 200, (yield within(r.text()))
            assert (yield within(r.json()))["category"] == "fast"
        after = yield status()
        # Every slow thread is still held and no slow call has ended: the
        # fast calls did not wait for one.
        assert (after["slow"]["threads"], after["slow"]["completed"]) == (limit, 0), after["slow"]
        assert after["slow"]["zombies_returned"] == 0
        f = after["fast"]
        assert (f["started"], f["completed"], f["queue_timeouts"], f["rejected"]) == (8, 8, 0, 0), f
    finally:
        yield server.stop()
        yield defer.DeferredList(slow, consumeErrors=True)
        yield pool.closeCachedConnections()
