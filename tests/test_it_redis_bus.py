"""
The Redis bus against a real ``redis-server`` on 127.0.0.1: two apps in
this reactor, each with its own hub and its own connections to Redis,
stand for two processes or two hosts.  A publish on one reaches the
subscribers of the other; a client resumes exactly once on the other;
last-value and idempotency hold across them; Redis lost while serving
answers publishes 503 ``bus_unavailable`` while subscribers stay, and
after it is back they get what they missed, or a ``reset`` when Redis lost
the history; nothing is delivered twice.  The property of
``test_history_bus`` (random interleavings of publishes, disconnects,
reconnects and bus drops: exactly once or an explicit gap) runs here
against the real bus and server, with a bounded number of examples.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task

from pipecomet import App, Config
from pipecomet._events import Condition
from pipecomet.client import CometClient

from ._redis import RedisServer
from .support import fetch

TOKEN = "it-token"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: Any) -> Any:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def serve(url: str, comet: dict[str, Any] | None = None,
          bus: dict[str, Any] | None = None) -> Any:
    app = App(reactor=reactor)
    app.route("/comet/<topic>", [Condition(lambda i, c, r: i.path_params["topic"].split(","),
                                           mode="many")],
              responders=("sse", "json", "ndjson", "longpoll"))
    cfg = {"comet": {"publish_token": TOKEN, "retry": 0.05, **(comet or {})},
           "bus": {"kind": "redis", "url": url, "reconnect_min": 0.05, "reconnect_max": 0.2,
                   "command_timeout": 5, **(bus or {})}}
    app.configure(Config.from_dict(cfg))
    app.service.startService()
    port = reactor.listenTCP(0, app.site(), interface="127.0.0.1")
    return app, port, f"http://127.0.0.1:{port.getHost().port}"


@defer.inlineCallbacks
def close(app: App, port: Any) -> Any:
    yield app.service.stopService()
    yield port.stopListening()


@defer.inlineCallbacks
def wait_until(pred: Any, limit: float = 15.0, what: str = "condition") -> Any:
    """
    Poll a condition of the test itself (not a performance bound): fail
    after ``limit`` seconds so that a broken build cannot hang the suite.
    """
    waited = 0.0
    while not pred():
        if waited > limit:
            raise AssertionError(f"timed out waiting for {what}")
        yield task.deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


@defer.inlineCallbacks
def publish(base: str, topic: str, data: Any, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    resp, body = yield fetch("POST", f"{base}/_pipecomet/publish/{topic}",
                             data=json.dumps(data).encode(), headers=headers)
    return resp.code, json.loads(body), resp.headers


def hub_of(app: App) -> Any:
    return app.runtime.comet


def bus_of(app: App) -> Any:
    return app.runtime.bus


@pytest_twisted.inlineCallbacks
def test_publish_on_one_reaches_the_other_and_resume_there(redis_server: RedisServer):
    a, pa, base_a = serve(redis_server.url)
    b, pb, base_b = serve(redis_server.url)
    clients = []
    try:
        yield wait_until(lambda: bus_of(a).connected and bus_of(b).connected, what="bus up")
        subs = {t: CometClient(f"{base_a}/comet/cross", transport=t, reactor=reactor,
                               poll_timeout=5).start() for t in ("sse", "ndjson", "longpoll")}
        clients.extend(subs.values())
        yield wait_until(lambda: hub_of(a).connections == 3, what="3 subscribers on a")
        ids = []
        for n in range(5):
            code, body, _ = yield publish(base_b, "cross", {"n": n})
            assert code == 200, body
            ids.append(body["id"])
        # Offsets are given out by Redis: one sequence whoever publishes.
        assert [int(i.split(":")[1]) for i in ids] == [1, 2, 3, 4, 5]
        yield wait_until(lambda: all(len(c.messages) == 5 for c in subs.values()),
                         what="5 messages on a")
        for c in subs.values():
            assert [m["data"]["n"] for m in c.messages] == list(range(5))
            assert [m["id"] for m in c.messages] == ids
        # The SSE client leaves a; more is published; it comes back on b.
        sse = subs["sse"]
        cursor = sse.cursor
        yield sse.stop()
        clients.remove(sse)
        for n in range(5, 9):
            yield publish(base_a, "cross", {"n": n})
        again = CometClient(f"{base_b}/comet/cross", reactor=reactor, cursor=cursor).start()
        clients.append(again)
        yield again.wait_for(4)
        code, body, _ = yield publish(base_a, "cross", {"n": 9})
        yield wait_until(lambda: len(again.messages) == 5, what="live message on b")
        assert [m["data"]["n"] for m in again.messages] == [5, 6, 7, 8, 9]
        assert not again.events or all(name not in ("gap", "reset") for name, _ in again.events)
        assert hub_of(b).stats.resume_hits >= 1
        # Last-value mode on the other process: the newest message at once.
        resp, raw = yield fetch("GET", f"{base_b}/comet/cross?transport=longpoll&last=1")
        last = json.loads(raw)
        assert [m["data"]["n"] for m in last["messages"]] == [9]
    finally:
        for c in clients:
            yield c.stop()
        yield close(a, pa)
        yield close(b, pb)


@pytest_twisted.inlineCallbacks
def test_idempotency_key_holds_across_processes(redis_server: RedisServer):
    a, pa, base_a = serve(redis_server.url)
    b, pb, base_b = serve(redis_server.url)
    try:
        yield wait_until(lambda: bus_of(a).connected and bus_of(b).connected, what="bus up")
        code1, first, _ = yield publish(base_a, "idem", {"x": 1}, key="k-1")
        code2, second, _ = yield publish(base_b, "idem", {"x": 1}, key="k-1")
        assert code1 == code2 == 200
        assert first["duplicate"] is False and second["duplicate"] is True
        assert second["id"] == first["id"]
        code3, third, _ = yield publish(base_b, "idem", {"x": 2}, key="k-2")
        assert third["id"].split(":")[1] == str(int(first["id"].split(":")[1]) + 1)
    finally:
        yield close(a, pa)
        yield close(b, pb)


@pytest_twisted.inlineCallbacks
def test_connection_drop_replays_what_was_missed_exactly_once(redis_server: RedisServer):
    # a reconnects slowly enough that b publishes while a is away.
    a, pa, base_a = serve(redis_server.url, bus={"reconnect_min": 0.5, "reconnect_max": 0.5})
    b, pb, base_b = serve(redis_server.url)
    clients = []
    try:
        yield wait_until(lambda: bus_of(a).connected and bus_of(b).connected, what="bus up")
        subs = [CometClient(f"{base_a}/comet/drop", transport=t, reactor=reactor,
                            poll_timeout=5).start() for t in ("sse", "ndjson", "longpoll")]
        clients.extend(subs)
        yield wait_until(lambda: hub_of(a).connections == 3, what="subscribers")
        for n in range(3):
            yield publish(base_b, "drop", n)
        yield wait_until(lambda: all(len(c.messages) == 3 for c in subs), what="3 messages")
        # Cut a's two connections from the Redis side.
        bus = bus_of(a)
        for conn in (bus._cmd, bus._sub):
            addr = conn.transport.getHost()
            assert redis_server.command("CLIENT", "KILL", f"127.0.0.1:{addr.port}") == b"+OK\r\n"
        yield wait_until(lambda: not hub_of(a).bus_ok, what="a hears the drop")
        code, body, headers = yield publish(base_a, "drop", 99)
        assert code == 503 and body["error"]["code"] == "bus_unavailable"
        assert headers.getRawHeaders("retry-after")
        for n in range(3, 7):
            code, _, _ = yield publish(base_b, "drop", n)
            assert code == 200
        yield wait_until(lambda: bus.connected, what="a reconnects")
        for n in range(7, 9):
            yield publish(base_b, "drop", n)
        yield wait_until(lambda: all(len(c.messages) >= 9 for c in subs), what="9 messages")
        yield task.deferLater(reactor, 0.2, lambda: None)
        for c in subs:
            assert [m["data"] for m in c.messages] == list(range(9)), c.transport
            assert all(name not in ("gap", "reset") for name, _ in c.events), c.events
        assert hub_of(a).status()["bus_drops"] >= 1
        assert bus.status()["drops"] == 1
    finally:
        for c in clients:
            yield c.stop()
        yield close(a, pa)
        yield close(b, pb)


@pytest_twisted.inlineCallbacks
def test_redis_killed_and_restarted_gives_a_reset_never_a_duplicate(tmp_path: Any):
    server = RedisServer(tmp_path / "r1")
    yield defer.maybeDeferred(server.start)
    a, pa, base_a = serve(server.url)
    b, pb, base_b = serve(server.url)
    clients = []
    try:
        yield wait_until(lambda: bus_of(a).connected and bus_of(b).connected, what="bus up")
        subs = [CometClient(f"{base_a}/comet/k", transport=t, reactor=reactor,
                            poll_timeout=5).start() for t in ("sse", "ndjson", "longpoll")]
        clients.extend(subs)
        yield wait_until(lambda: hub_of(a).connections == 3, what="subscribers")
        for n in range(3):
            yield publish(base_b, "k", n)
        yield wait_until(lambda: all(len(c.messages) == 3 for c in subs), what="3 messages")
        server.kill()
        yield wait_until(lambda: not bus_of(a).connected and not bus_of(b).connected,
                         what="both hear Redis gone")
        code, body, headers = yield publish(base_b, "k", 100)
        assert code == 503 and body["error"]["code"] == "bus_unavailable"
        assert headers.getRawHeaders("retry-after") == ["1"]
        # A new subscriber is told to come back; the streams held stay
        # connected (a long-poll between two polls may be told to come back).
        resp, raw = yield fetch("GET", f"{base_a}/comet/k?transport=longpoll")
        assert resp.code == 503
        assert json.loads(raw)["error"]["code"] == "bus_unavailable"
        assert len(hub_of(a)._streams) == 2
        yield defer.maybeDeferred(server.start)
        yield wait_until(lambda: bus_of(a).connected and bus_of(b).connected, what="reconnect")
        for n in range(3, 6):
            code, body, _ = yield publish(base_b, "k", n)
            assert code == 200, body
        yield wait_until(lambda: all(len(c.messages) == 6 for c in subs), what="6 messages")
        for c in subs:
            assert [m["data"] for m in c.messages] == list(range(6)), c.transport
            assert [name for name, _ in c.events if name in ("gap", "reset")] == ["reset"], \
                (c.transport, c.events)
        ids = [m["id"] for m in subs[0].messages]
        assert ids[2].split(":")[0] != ids[3].split(":")[0]  # a new epoch
        assert ids[3].endswith(":1")
    finally:
        for c in clients:
            yield c.stop()
        yield close(a, pa)
        yield close(b, pb)
        server.stop()


@pytest_twisted.inlineCallbacks
def test_redis_down_at_start_with_serve_answers_503_then_works(tmp_path: Any):
    server = RedisServer(tmp_path / "r2")
    a, pa, base_a = serve(server.url, bus={"on_unavailable": "serve"})
    try:
        code, body, headers = yield publish(base_a, "late", 1)
        assert code == 503 and body["error"]["code"] == "bus_unavailable"
        resp, _ = yield fetch("GET", f"{base_a}/comet/late?transport=longpoll")
        assert resp.code == 503
        _, raw = yield fetch("GET", f"{base_a}/_pipecomet/status")
        status = json.loads(raw)
        assert status["bus"]["connected"] is False and status["bus"]["last_error"]
        yield defer.maybeDeferred(server.start)
        yield wait_until(lambda: bus_of(a).connected, what="connects once Redis is there")
        code, body, _ = yield publish(base_a, "late", 1)
        assert code == 200 and body["id"].endswith(":1")
    finally:
        yield close(a, pa)
        server.stop()


# -- random interleavings against the real Redis bus


INTERLEAVINGS = st.lists(
    st.one_of(st.tuples(st.just("publish"), st.integers(1, 4)),
              st.just(("disconnect",)), st.just(("reconnect",)),
              st.just(("drop",)), st.just(("flush",))),
    max_size=12)


@pytest.fixture(scope="module")
def redis_pair(redis_server: RedisServer) -> Any:
    """
    Two apps on the one real Redis, as two processes: ``a`` serves the
    subscriber, ``b`` publishes; topics ``short-*`` keep 4 messages.
    """
    comet = {"topics": {"short*": {"history_count": 4}}}
    a, pa, base_a = serve(redis_server.url, comet=comet)
    b, pb, base_b = serve(redis_server.url, comet=comet)
    pytest_twisted.blockon(wait_until(lambda: bus_of(a).connected and bus_of(b).connected,
                                      what="bus up"))
    yield a, base_a, b
    pytest_twisted.blockon(close(a, pa))
    pytest_twisted.blockon(close(b, pb))


@defer.inlineCallbacks
def _interleaving(redis_server: RedisServer, a: App, base_a: str, b: App, ops: list[Any],
                  transport: str, topic: str) -> Any:
    """
    Run ``ops`` and return (published, received, declared missing).
    """
    # The client starts from the id of a first message: from then on every
    # message is owed to it, exactly once, or declared missing.
    first = yield hub_of(b).publish(topic, 0)
    cursor: str | None = first.id
    published: list[int] = []
    received: list[int] = []
    missing = 0
    client: CometClient | None = None

    def start() -> CometClient:
        return CometClient(f"{base_a}/comet/{topic}", transport=transport, reactor=reactor,
                           cursor=cursor, poll_timeout=5, max_backoff=1.0).start()

    @defer.inlineCallbacks
    def stop(c: CometClient) -> Any:
        nonlocal missing, cursor
        yield c.stop()
        received.extend(m["data"] for m in c.messages)
        missing += sum(f.get("missed", 0) for name, f in c.events if name in ("gap", "reset"))
        cursor = c.cursor

    def seen(c: CometClient | None) -> tuple[int, int]:
        if c is None:
            return len(received), missing
        return (len(received) + len(c.messages),
                missing + sum(f.get("missed", 0) for n, f in c.events if n in ("gap", "reset")))

    client = start()
    try:
        for op in ops:
            if op[0] == "publish":
                for _ in range(op[1]):
                    n = len(published) + 1
                    published.append(n)
                    yield hub_of(b).publish(topic, n)
            elif op[0] == "disconnect" and client is not None:
                yield stop(client)
                client = None
            elif op[0] == "reconnect" and client is None:
                client = start()
            elif op[0] == "drop" and bus_of(a).connected:
                # Cut a's connections from the Redis side; it reconnects by itself.
                bus = bus_of(a)
                for conn in (bus._cmd, bus._sub):
                    if conn is not None and conn.transport is not None:
                        redis_server.command("CLIENT", "KILL",
                                             f"127.0.0.1:{conn.transport.getHost().port}")
            elif op[0] == "flush":
                yield task.deferLater(reactor, 0.05, lambda: None)
        if client is None:
            client = start()
        yield wait_until(lambda: sum(seen(client)) >= len(published), limit=30,
                         what=f"{len(published)} messages received or declared missing")
        # A moment more: a duplicate or a late extra would show now.
        yield task.deferLater(reactor, 0.2, lambda: None)
    finally:
        if client is not None:
            yield stop(client)
    return published, received, missing


@settings(max_examples=12, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=INTERLEAVINGS, history=st.sampled_from(["short", "long"]),
       transport=st.sampled_from(["sse", "ndjson", "longpoll"]))
def test_interleavings_on_real_redis_exactly_once_or_explicit_gap(
        redis_server: RedisServer, redis_pair: Any, ops: list[Any], history: str,
        transport: str) -> Any:
    """
    Publishes from another process, client disconnects and reconnects (on
    its cursor) and Redis connection drops, in any order, through the real
    Redis bus: every message arrives at most once and in order, and every
    one not received is declared by a gap.
    """
    a, base_a, b = redis_pair
    topic = f"{history}-{uuid.uuid4().hex[:12]}"

    def check(outcome: tuple[list[int], list[int], int]) -> None:
        published, received, missing = outcome
        assert received == sorted(set(received)), received
        assert len(received) + missing == len(published), (received, missing, published)
        if history == "long":
            assert received == published

    # pytest-twisted runs each example in the reactor's greenlet and waits
    # for the Deferred it returns.
    return _interleaving(redis_server, a, base_a, b, ops, transport, topic).addCallback(check)
