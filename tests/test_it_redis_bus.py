"""
The Redis bus against a real ``redis-server`` on 127.0.0.1: two apps in
this reactor, each with its own hub and its own connections to Redis,
stand for two processes or two hosts.  A publish on one reaches the
subscribers of the other; a client resumes exactly once on the other;
last-value and idempotency hold across them; Redis lost while serving
answers publishes 503 ``bus_unavailable`` while subscribers stay, and
after it is back they get what they missed, or a ``reset`` when Redis lost
the history; nothing is delivered twice.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task

from pipecomet import App, Config
from pipecomet._events import Condition
from pipecomet.client import CometClient

from ._redis import RedisServer

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
    resp = yield treq.post(f"{base}/_pipecomet/publish/{topic}", json.dumps(data).encode(),
                           headers=headers)
    body = yield treq.content(resp)
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
        resp = yield treq.get(f"{base_b}/comet/cross?transport=longpoll&last=1")
        last = json.loads((yield treq.content(resp)))
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
        resp = yield treq.get(f"{base_a}/comet/k?transport=longpoll")
        assert resp.code == 503
        assert json.loads((yield treq.content(resp)))["error"]["code"] == "bus_unavailable"
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
        resp = yield treq.get(f"{base_a}/comet/late?transport=longpoll")
        assert resp.code == 503
        status = json.loads((yield treq.content((yield treq.get(f"{base_a}/_pipecomet/status")))))
        assert status["bus"]["connected"] is False and status["bus"]["last_error"]
        yield defer.maybeDeferred(server.start)
        yield wait_until(lambda: bus_of(a).connected, what="connects once Redis is there")
        code, body, _ = yield publish(base_a, "late", 1)
        assert code == 200 and body["id"].endswith(":1")
    finally:
        yield close(a, pa)
        server.stop()
