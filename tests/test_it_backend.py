"""
Integration tests of the backend client: a real pipecomet gateway and real
backend servers, all on 127.0.0.1 and started by each test (twisted.web
resources, raw TCP servers that misbehave, closed ports).  Every failure is
checked as the client of the gateway sees it: status, ``Retry-After`` and
the JSON error body.  Waits are on events the test controls; the deadline
tests use short real deadlines but assert statuses, never durations.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.web import resource, server
from twisted.web.client import HTTPConnectionPool

from pipecomet import App, Config, Pipe, call, proxy
from pipecomet._backend import Endpoint, StaticDiscovery
from pipecomet._twcompat import transport_pending

from .support import within

pytestmark = pytest.mark.timeout(60)


# -- backends -----------------------------------------------------------------


class Backend(resource.Resource):
    """
    A well-behaved backend with a few paths that misbehave on request.
    """

    isLeaf = True

    def __init__(self, name: str = "b") -> None:
        super().__init__()
        self.name = name
        self.seen: list[dict[str, Any]] = []
        self.held: list[Any] = []
        self.gone: list[str] = []
        self.arrived: defer.Deferred | None = None

    def wait_arrival(self) -> defer.Deferred:
        self.arrived = defer.Deferred()
        return self.arrived

    def render(self, request: Any) -> Any:
        path = request.path.decode()
        body = request.content.read()
        seen = {
            "backend": self.name,
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "deadline": (request.getHeader(b"x-request-deadline-ms") or b"").decode(),
            "headers": {k.decode().lower(): [x.decode() for x in v]
                        for k, v in request.requestHeaders.getAllRawHeaders()},
            "body": body.decode("latin-1"),
        }
        self.seen.append(seen)
        if self.arrived is not None:
            d, self.arrived = self.arrived, None
            reactor.callLater(0, d.callback, seen)
        if path == "/hold":
            # Answered when the test says so; a client that goes is noted.
            self.held.append(request)
            request.notifyFinish().addErrback(lambda f: self.gone.append(seen["uri"]))
            return server.NOT_DONE_YET
        if path == "/big":
            n = int(request.args[b"n"][0])
            request.setHeader(b"content-type", b"application/octet-stream")
            return b"x" * n
        if path == "/kill":
            request.setHeader(b"content-length", b"1000")
            request.write(b"partial")
            # The process dies: the kernel closes its socket after the bytes.
            request.channel.transport.loseConnection()
            return server.NOT_DONE_YET
        if path == "/kill-early":
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET
        if path.startswith("/status/"):
            request.setResponseCode(int(path.rsplit("/", 1)[1]))
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-backend", self.name.encode())
        return json.dumps(seen).encode()

    def release(self) -> None:
        held, self.held = self.held, []
        for request in held:
            if not request.finished and not request._disconnected:
                request.setHeader(b"content-type", b"application/json")
                request.write(json.dumps({"backend": self.name, "held": True}).encode())
                request.finish()


class Garbage(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"this is not HTTP at all\r\n\r\n")


class ClosesSecondRequest(Protocol):
    """
    Answers the first request of a connection with keep-alive, then closes
    the connection when the second one arrives without answering it: what a
    client sees when a backend drops an idle connection just as it is
    reused.
    """

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.requests = 0

    def dataReceived(self, data: bytes) -> None:
        self.requests += data.count(b"HTTP/1.1\r\n")
        if self.requests == 1:
            body = b'{"ok":true}'
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        else:
            self.transport.loseConnection()


def listen(factory: Any) -> Any:
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


def endpoint_of(port: Any) -> Endpoint:
    return Endpoint("127.0.0.1", port.getHost().port)


def closed_port() -> int:
    p = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = p.getHost().port
    p.stopListening()
    return number


# -- the gateway ----------------------------------------------------------------


class Gateway:
    """
    A pipecomet app with one backend service ``svc`` (static discovery
    replaced by a StaticDiscovery the test controls) on a real port.
    """

    def __init__(self, endpoints: list[Endpoint], limits: dict[str, Any] | None = None,
                 **service: Any) -> None:
        # A generous deadline unless the test is about deadlines: the
        # machine may be busy.
        table = {"discovery": {"endpoints": []}, "timeout": 20.0, **service}
        self.app = App(reactor=reactor, name="backend-it")
        self.app.route("/one/<path:rest>", [Pipe(self._one, name="one")])
        self.app.route("/call/<id>", [call("svc", "GET", "/users/{id}", params=["x"])])
        self.app.route("/status/<code>", [call("svc", "GET", "/status/{code}")])
        self.app.route("/proxy/<path:rest>", [proxy("svc", strip_prefix="/proxy")],
                       methods=["GET", "POST", "PUT", "DELETE", "HEAD"])
        self.app.configure(Config.from_dict({"backends": {"svc": table}, "limits": limits or {}}))
        self.service = self.app.runtime.backends.get("svc")
        self.discovery = self.service.discovery
        assert isinstance(self.discovery, StaticDiscovery)
        self.discovery.set(endpoints)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def _one(self, inp: Any, ctx: Any, res: Any) -> Any:
        resp = await ctx.backend("svc").get("/" + inp.path_params["rest"], params=inp.query)
        body = await resp.json() if resp.content_type == "application/json" else (await resp.body()).decode()
        return {"status": resp.status, "body": body}

    def start(self) -> Gateway:
        self.app.service.startService()
        self.port = reactor.listenTCP(0, self.app.site(), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        return self

    async def stop(self) -> None:
        await self.port.stopListening()
        await self.app.service.stopService()
        await self.pool.closeCachedConnections()

    def get(self, path: str, **kw: Any) -> Any:
        return within(treq.get(self.base + path, pool=self.pool, **kw), f"GET {path}")

    def request(self, method: str, path: str, **kw: Any) -> Any:
        return within(treq.request(method, self.base + path, pool=self.pool, **kw),
                      f"{method} {path}")

    def status(self) -> dict[str, Any]:
        return self.service.status()


async def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.code == status, (response.code, await within(response.text()))
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    body = await within(response.json())
    assert set(body["error"]) >= {"code", "message", "id"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["service"] == "svc"
    assert "127.0.0.1" not in json.dumps(body), body  # the address stays in the log
    return body["error"]


async def until(check: Any, what: str) -> None:
    for _ in range(1000):
        if check():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"never happened: {what}")


# -- tests ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_calls_reach_the_backend_with_the_deadline_and_keep_connections() -> None:
    backend = Backend()
    port = listen(server.Site(backend))
    gw = Gateway([endpoint_of(port)], timeout=4.0).start()
    try:
        for i in range(3):
            r = await gw.get(f"/call/{i}?x=1&y=2")
            assert r.code == 200
            body = await within(r.json())
            assert body["uri"] == f"/users/{i}?x=1"
            assert 0 < int(body["deadline"]) <= 4000
            # The request id the client got goes to the backend, with a
            # traceparent whose trace-id is that id and whose parent-id is new.
            (rid,) = r.headers.getRawHeaders("x-request-id")
            assert body["headers"]["x-request-id"] == [rid]
            (parent,) = body["headers"]["traceparent"]
            version, trace_id, span_id, flags = parent.split("-")
            assert (version, trace_id, flags) == ("00", rid, "01")
            assert len(span_id) == 16
        pool = gw.status()["endpoints"][0]["pool"]
        assert (pool["connects"], pool["idle"]) == (1, 1)  # one kept-alive connection
        r = await gw.get("/one/status/404")
        assert r.code == 200  # a backend's own 4xx reaches the pipe
        assert (await within(r.json()))["status"] == 404
    finally:
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_call_pipe_passes_a_backend_error_status_through() -> None:
    backend = Backend()
    port = listen(server.Site(backend))
    gw = Gateway([endpoint_of(port)]).start()
    try:
        r = await gw.get("/status/404")
        assert r.code == 404  # the backend's own answer, not an error of ours
        assert (await within(r.json()))["uri"] == "/status/404"
        r = await gw.get("/call/a%20b")
        assert (await within(r.json()))["uri"] == "/users/a%2520b"  # the path value, percent-encoded
    finally:
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_backend_killed_mid_call_is_502() -> None:
    backend = Backend()
    port = listen(server.Site(backend))
    gw = Gateway([endpoint_of(port)]).start()
    try:
        r = await gw.get("/one/kill")
        await error_of(r, 502, "backend_error")
        assert len(backend.seen) == 1  # answered in part: never replayed
        r = await gw.get("/one/kill-early")
        await error_of(r, 502, "backend_error")
        # Nothing answered and GET is idempotent: 1 call + 2 retries.
        assert len(backend.seen) == 4
        assert gw.status()["retries"] == 2
    finally:
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_deadline_is_504_and_the_backend_sees_the_deadline_header() -> None:
    backend = Backend()
    port = listen(server.Site(backend))
    gw = Gateway([endpoint_of(port)], timeout=1.5).start()
    try:
        r = await gw.get("/one/hold")
        await error_of(r, 504, "backend_timeout")
        assert 0 <= int(backend.seen[0]["deadline"]) <= 1500
        await until(lambda: backend.gone == ["/hold"], "backend sees the call given up")
        assert gw.status()["failures"]["backend_timeout"] == 1
    finally:
        backend.release()
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_kept_connection_closed_by_the_backend_is_retried_once_on_a_fresh_one() -> None:
    factory = Factory.forProtocol(ClosesSecondRequest)
    factory.connections = 0
    port = listen(factory)
    gw = Gateway([endpoint_of(port)], retry={"retries": 0}).start()
    try:
        for _ in range(3):
            r = await gw.get("/one/x")
            assert r.code == 200, await within(r.text())
            assert (await within(r.json()))["body"] == {"ok": True}
        status = gw.status()
        assert status["safe_retries"] == 2
        assert status["retries"] == 0  # the safe retry spends no budget
        assert factory.connections == 3
    finally:
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_idle_connections_closed_by_the_backend_are_dropped() -> None:
    backend = Backend()
    site = server.Site(backend, timeout=0.05)  # the backend drops idle connections
    port = listen(site)
    gw = Gateway([endpoint_of(port)]).start()
    try:
        r = await gw.get("/call/1")
        assert r.code == 200
        await until(lambda: gw.status()["endpoints"][0]["pool"]["idle"] == 0, "idle dropped")
        r = await gw.get("/call/2")
        assert r.code == 200
        assert gw.status()["endpoints"][0]["pool"]["connects"] == 2
    finally:
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_garbage_answer_is_502() -> None:
    port = listen(Factory.forProtocol(Garbage))
    gw = Gateway([endpoint_of(port)], retry={"retries": 0}).start()
    try:
        r = await gw.get("/one/x")
        await error_of(r, 502, "backend_error")
    finally:
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_refused_is_502_then_the_endpoint_is_ejected() -> None:
    backend = Backend("good")
    port = listen(server.Site(backend))
    bad = Endpoint("127.0.0.1", closed_port())
    gw = Gateway([bad], retry={"retries": 0},
                 balancer={"failures": 2, "ejection_base": 60.0, "max_ejected_share": 1.0,
                           "panic_threshold": 0.0}).start()
    try:
        for _ in range(2):
            r = await gw.get("/one/x")
            await error_of(r, 502, "backend_error")
        states = {e["address"]: e for e in gw.status()["endpoints"]}
        assert states[bad.address]["ejected"] is True
        r = await gw.get("/one/x")
        await error_of(r, 503, "no_backend")  # its only endpoint is out
        gw.discovery.set([bad, endpoint_of(port)])
        for _ in range(5):
            r = await gw.get("/one/x")
            assert r.code == 200
        assert len(backend.seen) == 5  # every call went to the good one
        assert gw.status()["endpoints"][0]["calls"] == 2
    finally:
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_refused_idempotent_call_is_retried_on_another_endpoint() -> None:
    backend = Backend("good")
    port = listen(server.Site(backend))
    bad = Endpoint("127.0.0.1", closed_port())
    gw = Gateway([bad, endpoint_of(port)], retry={"retries": 2}).start()
    try:
        for _ in range(10):
            r = await gw.get("/one/x")
            assert r.code == 200
        assert gw.status()["endpoints"][0]["errors"] + gw.status()["endpoints"][1]["errors"] >= 1
    finally:
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_pool_cap_and_full_queue_is_503_backend_busy() -> None:
    backend = Backend()
    port = listen(server.Site(backend))
    gw = Gateway([endpoint_of(port)], retry_after=3.0,
                 pool={"max_connections": 1, "queue": 1, "queue_timeout": 30.0}).start()
    try:
        arrived = backend.wait_arrival()
        first = gw.get("/one/hold")
        await arrived
        second = gw.get("/one/hold")
        await until(lambda: gw.status()["endpoints"][0]["pool"]["waiting"] == 1, "second queued")
        r = await gw.get("/one/hold")
        error = await error_of(r, 503, "backend_busy")
        assert r.headers.getRawHeaders("retry-after") == ["3"]
        assert error["service"] == "svc"
        backend.release()
        r1 = await first
        assert r1.code == 200
        await until(lambda: len(backend.held) == 1, "second call reached the backend")
        backend.release()
        r2 = await second
        assert r2.code == 200
        pool = gw.status()["endpoints"][0]["pool"]
        assert (pool["connects"], pool["rejected_busy"]) == (1, 1)
    finally:
        backend.release()
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_queue_timeout_is_503() -> None:
    backend = Backend()
    port = listen(server.Site(backend))
    gw = Gateway([endpoint_of(port)],
                 pool={"max_connections": 1, "queue": 5, "queue_timeout": 0.2}).start()
    try:
        arrived = backend.wait_arrival()
        first = gw.get("/one/hold")
        await arrived
        r = await gw.get("/one/hold")
        await error_of(r, 503, "backend_queue_timeout")
        assert r.headers.hasHeader("retry-after")
        backend.release()
        assert (await first).code == 200
    finally:
        backend.release()
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_response_too_large_is_502() -> None:
    backend = Backend()
    port = listen(server.Site(backend))
    gw = Gateway([endpoint_of(port)], max_response_bytes=10_000, buffer_bytes=1000).start()
    try:
        r = await gw.get("/one/big?n=10000")
        assert r.code == 200
        r = await gw.get("/one/big?n=10001")
        await error_of(r, 502, "backend_response_too_large")
    finally:
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_no_endpoint_is_503_no_backend() -> None:
    gw = Gateway([]).start()
    try:
        r = await gw.get("/one/x")
        await error_of(r, 503, "no_backend")
        assert r.headers.getRawHeaders("retry-after") == ["1"]
    finally:
        await gw.stop()


class OneRequest(Protocol):
    def __init__(self, path: bytes) -> None:
        self.path = path

    def connectionMade(self) -> None:
        self.transport.write(b"GET " + self.path + b" HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_the_backend_call() -> None:
    backend = Backend()
    port = listen(server.Site(backend))
    gw = Gateway([endpoint_of(port)], timeout=30.0).start()
    try:
        arrived = backend.wait_arrival()
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port.getHost().port), OneRequest(b"/one/hold"))
        await arrived
        client.transport.loseConnection()
        await until(lambda: backend.gone == ["/hold"], "the backend sees its connection closed")
        status = gw.status()
        assert status["failures"]["cancelled"] == 1
        assert status["in_flight"] == 0
        pool = status["endpoints"][0]["pool"]
        assert (pool["busy"], pool["idle"]) == (0, 0)  # closed, never reused mid-response
    finally:
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_removed_endpoint_gets_no_new_calls_and_drains() -> None:
    a, b = Backend("a"), Backend("b")
    pa, pb = listen(server.Site(a)), listen(server.Site(b))
    gw = Gateway([endpoint_of(pa)], timeout=30.0).start()
    try:
        arrived = a.wait_arrival()
        held = gw.get("/one/hold")
        await arrived
        gw.discovery.set([endpoint_of(pb)])
        status = gw.status()
        assert [e["address"] for e in status["draining"]] == [endpoint_of(pa).address]
        for _ in range(4):
            r = await gw.get("/one/x")
            assert (await within(r.json()))["body"]["backend"] == "b"
        a.release()
        r = await held
        assert (await within(r.json()))["body"] == {"backend": "a", "held": True}
        await until(lambda: gw.status()["draining"] == [], "drained endpoint dropped")
    finally:
        a.release()
        await gw.stop()
        await pa.stopListening()
        await pb.stopListening()


@pytest_twisted.ensureDeferred
async def test_proxy_forwards_the_request_and_streams_the_answer() -> None:
    backend = Backend()
    port = listen(server.Site(backend))
    gw = Gateway([endpoint_of(port)]).start()
    try:
        r = await gw.request("POST", "/proxy/users/7?a=1&b=2", data=b"hello",
                             headers={"X-Custom": "yes", "Connection": "keep-alive, X-Hop",
                                      "X-Hop": "drop-me", "Content-Type": "text/plain",
                                      "X-Request-Id": "proxy-trace-1",
                                      "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
        assert r.code == 200
        assert r.headers.getRawHeaders("x-backend") == ["b"]
        body = await within(r.json())
        assert (body["method"], body["uri"], body["body"]) == ("POST", "/users/7?a=1&b=2", "hello")
        headers = body["headers"]
        assert headers["x-custom"] == ["yes"]
        assert "x-hop" not in headers
        assert headers["x-forwarded-for"] == ["127.0.0.1"]
        assert headers["x-forwarded-proto"] == ["http"]
        assert headers["x-forwarded-host"][0].startswith("127.0.0.1:")
        # The request's id goes on, with a traceparent of this call (the
        # client's X-Request-Id wins over its traceparent's trace-id).
        assert headers["x-request-id"] == ["proxy-trace-1"]
        (parent,) = headers["traceparent"]
        assert parent.startswith("00-") and parent.endswith("-01")
        assert parent.split("-")[2] != "cd" * 8
        r = await gw.request("GET", "/proxy/status/418")
        assert r.code == 418
        r = await gw.request("GET", "/proxy/big?n=3000000")
        assert r.code == 200
        assert len(await within(r.content())) == 3_000_000
        r = await gw.request("HEAD", "/proxy/users/1")
        assert r.code == 200
    finally:
        await gw.stop()
        await port.stopListening()


class RecordingBackend(Protocol):
    """
    A raw backend that records what arrives and answers 200 once a request
    (head and body) is complete: Content-Length bodies or chunked ones.
    """

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if not sep:
            return
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            complete = body.endswith(b"0\r\n\r\n")
        else:
            length = int(lower.split(b"content-length: ")[1].split(b"\r\n")[0])
            complete = len(body) >= length
        if complete:
            answer = b'{"got":%d}' % len(body)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class RawClient(Protocol):
    def connectionMade(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


def recording_backend() -> tuple[Any, list[RecordingBackend]]:
    factory = Factory.forProtocol(RecordingBackend)
    factory.connections = []  # type: ignore[attr-defined]
    return listen(factory), factory.connections  # type: ignore[attr-defined]


async def raw_client(gw: Gateway) -> RawClient:
    return await connectProtocol(  # type: ignore[no-any-return]
        TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port.getHost().port), RawClient())


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_proxy_streams_the_request_body_as_it_arrives(chunked: bool) -> None:
    port, conns = recording_backend()
    gw = Gateway([endpoint_of(port)]).start()
    try:
        client = await raw_client(gw)
        first, rest = b"a" * 5000, b"b" * 7000
        if chunked:
            client.transport.write(b"POST /proxy/up HTTP/1.1\r\nHost: gw\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n"
                                   b"%x\r\n%s\r\n" % (len(first), first))
        else:
            client.transport.write(b"POST /proxy/up HTTP/1.1\r\nHost: gw\r\n"
                                   b"Content-Length: %d\r\n\r\n%s" % (len(first) + len(rest), first))
        # The first part reaches the backend while the client still holds
        # the rest: the body is streamed, not read whole first.
        await until(lambda: conns and first in conns[0].data, "the first part at the backend")
        head = conns[0].data.split(b"\r\n\r\n")[0].lower()
        assert (b"transfer-encoding: chunked" in head) is chunked
        assert (b"content-length: 12000" in head) is not chunked
        if chunked:
            client.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        else:
            client.transport.write(rest)
        await until(lambda: b"\r\n\r\n" in client.data and client.data.endswith(b"}"),
                    "the answer at the client")
        assert client.data.startswith(b"HTTP/1.1 200 ")
        received = conns[0].data.split(b"\r\n\r\n", 1)[1]
        if chunked:
            assert received == (b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                                % (len(first), first, len(rest), rest))
        else:
            assert received == first + rest
        client.transport.loseConnection()
    finally:
        await gw.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_proxy_streamed_body_over_the_limit_is_413_and_the_backend_call_is_cut() -> None:
    port, conns = recording_backend()
    gw = Gateway([endpoint_of(port)], limits={"max_body_bytes": 1000}).start()
    try:
        client = await raw_client(gw)
        client.transport.write(b"POST /proxy/up HTTP/1.1\r\nHost: gw\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n"
                               b"258\r\n" + b"a" * 600 + b"\r\n")
        await until(lambda: conns and b"a" * 600 in conns[0].data, "the first chunk at the backend")
        client.transport.write(b"258\r\n" + b"b" * 600 + b"\r\n")
        await until(lambda: b"\r\n\r\n" in client.data and client.data.rstrip().endswith(b"}"),
                    "the 413 at the client")
        assert client.data.startswith(b"HTTP/1.1 413 "), client.data[:200]
        error = json.loads(client.data.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "body_too_large"
        assert set(error) >= {"code", "message", "id"}
        # The half-sent request never completes at the backend: its
        # connection is cut, and the call is not counted as in flight.
        await until(lambda: conns[0].lost, "the backend connection closed")
        assert b"b" * 600 not in conns[0].data
        assert not conns[0].data.endswith(b"0\r\n\r\n")
        await until(lambda: gw.status()["in_flight"] == 0, "no call in flight")
        client.transport.loseConnection()
    finally:
        await gw.stop()
        await port.stopListening()


class SlowReader(Protocol):
    """
    A backend that does not read until told to (``resume()``), then counts
    the body of one Content-Length request and answers 200.
    """

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.head = b""
        self.length = -1
        self.got = 0
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.length < 0:
            self.head += data
            head, sep, rest = self.head.partition(b"\r\n\r\n")
            if not sep:
                return
            self.length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            data = rest
        self.got += len(data)
        if self.got == self.length:
            answer = b'{"got":%d}' % self.got
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))


@pytest_twisted.ensureDeferred
async def test_proxy_stops_reading_the_client_while_the_backend_does_not_read() -> None:
    factory = Factory.forProtocol(SlowReader)
    factory.connections = []  # type: ignore[attr-defined]
    port = listen(factory)
    conns: list[SlowReader] = factory.connections  # type: ignore[attr-defined]
    size = 64 * 2**20
    gw = Gateway([endpoint_of(port)], limits={"max_body_bytes": 2 * size}).start()
    try:
        client = await raw_client(gw)
        client.transport.write(b"POST /proxy/up HTTP/1.1\r\nHost: gw\r\n"
                               b"Content-Length: %d\r\n\r\n" % size)
        client.transport.write(b"x" * size)
        await until(lambda: bool(conns), "the backend connection")
        # Flow control: with every buffer on the way full, the gateway
        # leaves the rest with the client (it neither reads nor keeps it).
        seen: list[int] = []

        def stuck() -> bool:
            seen.append(transport_pending(client.transport))
            return len(seen) > 20 and seen[-1] > 0 and len(set(seen[-20:])) == 1

        await until(stuck, "the client's unsent bytes to stop draining")
        conns[0].resume()
        await until(lambda: client.data.endswith(b"}"), "the answer at the client")
        assert client.data.startswith(b"HTTP/1.1 200 ")
        assert client.data.endswith(b'{"got":%d}' % size)
        client.transport.loseConnection()
    finally:
        await gw.stop()
        await port.stopListening()


class AnswersAtOnce(RecordingBackend):
    """
    Answers 200 as soon as a request's head is in, without waiting for its
    body (as a backend refusing an upload does).
    """

    def dataReceived(self, data: bytes) -> None:
        before = self.data
        self.data += data
        if b"\r\n\r\n" in self.data and b"\r\n\r\n" not in before:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest_twisted.ensureDeferred
async def test_a_connection_answered_before_its_body_was_sent_is_not_reused() -> None:
    factory = Factory.forProtocol(AnswersAtOnce)
    factory.connections = []  # type: ignore[attr-defined]
    port = listen(factory)
    conns: list[AnswersAtOnce] = factory.connections  # type: ignore[attr-defined]
    gw = Gateway([endpoint_of(port)]).start()
    try:
        client = await raw_client(gw)
        client.transport.write(b"POST /proxy/up HTTP/1.1\r\nHost: gw\r\n"
                               b"Content-Length: 10000\r\n\r\n" + b"a" * 4000)
        await until(lambda: client.data.endswith(b"ok"), "the early answer at the client")
        assert client.data.startswith(b"HTTP/1.1 200 ")
        # The rest of that body must not reach the backend as the start of
        # another request: the connection is closed, never pooled.
        await until(lambda: conns[0].lost, "the backend connection closed")
        pool = gw.status()["endpoints"][0]["pool"]
        assert pool["idle"] == 0
        client.transport.loseConnection()
        r = await gw.request("GET", "/proxy/next")
        assert r.code == 200
        assert len(conns) == 2  # a fresh connection for the next call
        assert conns[1].data.startswith(b"GET /next HTTP/1.1\r\n")
    finally:
        await gw.stop()
        await port.stopListening()


def test_undeclared_service_fails_at_start() -> None:
    from pipecomet import ConfigError

    app = App(reactor=reactor)
    app.route("/x", [call("nope", "GET", "/x")])
    with pytest.raises(ConfigError, match="unknown backend service 'nope'"):
        app.configure(Config.from_dict({"backends": {"svc": {}}}))


@pytest_twisted.ensureDeferred
async def test_demo_gateway_calls_its_own_backends() -> None:
    from pipecomet.demo import make_app

    app = make_app(reactor=reactor)
    app.service.startService()
    port = reactor.listenTCP(0, app.site(), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        served = set()
        for _ in range(12):
            r = await within(treq.get(base + "/api/user.get?app_key=demo-key&id=3", pool=pool))
            assert r.code == 200
            body = await within(r.json())
            assert body["data"] == {"id": 3, "name": "dev", "email": "dev3@example.com"}
            served.add(body["served_by"])
        assert len(served) >= 2  # balanced over the instances
        r = await within(treq.get(base + "/api/user.get?app_key=demo-key&id=x", pool=pool))
        assert r.code == 400
        r = await within(treq.get(base + "/api/profile.get?app_key=demo-key&id=4", pool=pool,
                                  headers={"accept": "application/x-ndjson"}))
        assert r.headers.getRawHeaders("content-type") == ["application/x-ndjson"]
        lines = [json.loads(x) for x in (await within(r.content())).splitlines()]
        names = {x["name"] for x in lines}
        assert names == {"main", "user", "orders"}
        by = {x["name"]: x.get("result") for x in lines}
        assert by["user"]["data"]["id"] == 4
        assert by["orders"]["data"][0]["user"] == 4
        r = await within(treq.get(base + "/backend/users/users/5?x=1", pool=pool))
        assert r.code == 200
        assert (await within(r.json()))["data"]["id"] == 5
        r = await within(treq.post(base + "/backend/users/anything?y=2", data=b"abc", pool=pool))
        echo = await within(r.json())
        assert (echo["method"], echo["uri"], echo["body"]) == ("POST", "/anything?y=2", "abc")
        assert echo["forwarded_for"] == "127.0.0.1"
        r = await within(treq.get(base + "/_pipecomet/status", pool=pool))
        status = (await within(r.json()))["backends"]
        assert len(status["users"]["endpoints"]) == 3
        assert len(status["orders"]["endpoints"]) == 2
    finally:
        await port.stopListening()
        await app.service.stopService()
        await pool.closeCachedConnections()
