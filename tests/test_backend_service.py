"""
Unit tests of backend calls through an app on fake time: the gateway is
driven by a MemoryClient, the backends are StringTransports the test
accepts, answers, refuses or leaves silent on a MemoryReactorClock.  Every
limit is checked as the client sees it (status, Retry-After, JSON body).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pipecomet import App, Config, ConfigError, Pipe, call
from pipecomet._backend import BackendsConfig
from pipecomet.testing import MemoryClient

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"id\": 123}"


class Backends:
    """
    The connections the gateway opened, in order; the test plays the
    backend on each.
    """

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self.reactor = reactor
        self.taken = 0

    def pending(self) -> int:
        return len(self.reactor.tcpClients) - self.taken

    def accept(self) -> tuple[Any, StringTransport]:
        host, port, factory, timeout, _ = self.reactor.tcpClients[self.taken]
        self.taken += 1
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def refuse(self) -> None:
        factory = self.reactor.tcpClients[self.taken][2]
        connector = self.reactor.connectors[self.taken]
        self.taken += 1
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))


def gateway(endpoints: tuple[str, ...] = ("127.0.0.1:9001",), **service: Any) -> tuple[Any, MemoryClient, Backends]:
    reactor = MemoryReactorClock()
    app = App(reactor=reactor)

    async def one(inp: Any, ctx: Any, res: Any) -> Any:
        resp = await ctx.backend("users").get("/users/" + inp.query["id"])
        return {"status": resp.status, "body": await resp.json()}

    app.route("/one", [Pipe(one, name="one")])
    app.route("/u/<id>", [call("users", "GET", "/users/{id}")])
    app.configure(Config.from_dict({"backends": {"users": {
        "discovery": {"endpoints": list(endpoints)}, **service}}}))
    return app, MemoryClient(app), Backends(reactor)


def error(test: SynchronousTestCase, call_: Any, status: int, code: str) -> dict[str, Any]:
    test.assertTrue(call_.done)
    test.assertEqual(call_.status, status)
    body = call_.json()["error"]
    test.assertEqual(body["code"], code)
    test.assertEqual(body["service"], "users")
    test.assertTrue(body["id"] and body["message"])
    test.assertNotIn("9001", call_.body.decode())
    return body


class CallTests(SynchronousTestCase):
    def test_call_sends_the_deadline_and_reuses_the_connection(self) -> None:
        app, client, backends = gateway(timeout=2.5)
        c = client.get("/u/7")
        proto, transport = backends.accept()
        request = transport.value()
        self.assertTrue(request.startswith(b"GET /users/7 HTTP/1.1\r\nHost: 127.0.0.1:9001\r\n"))
        self.assertIn(b"X-Request-Deadline-Ms: 2500\r\n", request)
        proto.dataReceived(OK)
        client.flush()
        self.assertEqual((c.status, c.json()), (200, {"id": 123}))
        transport.clear()
        client.advance(1.0)
        c = client.get("/u/8")
        self.assertEqual(backends.pending(), 0)  # the kept connection is used
        self.assertIn(b"GET /users/8 ", transport.value())
        proto.dataReceived(OK)
        client.flush()
        self.assertEqual(c.status, 200)

    def test_deadline_header_counts_down_while_waiting(self) -> None:
        app, client, backends = gateway(timeout=2.0)
        client.get("/u/1")
        client.advance(0.5)
        _, transport = backends.accept()
        self.assertIn(b"X-Request-Deadline-Ms: 1500\r\n", transport.value())

    def test_deadline_is_504_and_closes_the_connection(self) -> None:
        app, client, backends = gateway(timeout=1.0)
        c = client.get("/u/1")
        proto, transport = backends.accept()
        client.advance(0.999)
        self.assertFalse(c.done)
        client.advance(0.001)
        error(self, c, 504, "backend_timeout")
        self.assertTrue(transport.disconnecting)
        status = app.runtime.backends.get("users").status()
        self.assertEqual(status["failures"]["backend_timeout"], 1)
        self.assertEqual(status["endpoints"][0]["pool"]["busy"], 0)

    def test_full_queue_is_503_backend_busy(self) -> None:
        app, client, backends = gateway(pool={"max_connections": 1, "queue": 1}, retry_after=4.0)
        first = client.get("/u/1")
        second = client.get("/u/2")
        third = client.get("/u/3")
        error(self, third, 503, "backend_busy")
        self.assertEqual(third.header("retry-after"), "4")
        self.assertEqual(backends.pending(), 1)  # the cap: one connection
        proto, transport = backends.accept()
        proto.dataReceived(OK)
        client.flush()
        self.assertEqual(first.status, 200)
        self.assertIn(b"GET /users/2 ", transport.value())  # handed to the waiter
        proto.dataReceived(OK)
        client.flush()
        self.assertEqual(second.status, 200)

    def test_queue_timeout_is_503(self) -> None:
        app, client, backends = gateway(pool={"max_connections": 1, "queue": 5,
                                              "queue_timeout": 0.5}, timeout=5.0)
        client.get("/u/1")
        backends.accept()
        waiting = client.get("/u/2")
        client.advance(0.5)
        body = error(self, waiting, 503, "backend_queue_timeout")
        self.assertIn("0.5", body["message"])
        self.assertEqual(waiting.header("retry-after"), "1")

    def test_deadline_before_queue_timeout_is_504(self) -> None:
        app, client, backends = gateway(pool={"max_connections": 1, "queue_timeout": 5.0},
                                        timeout=1.0)
        client.get("/u/1")
        backends.accept()
        waiting = client.get("/u/2")
        client.advance(1.0)
        error(self, waiting, 504, "backend_timeout")
        pool = app.runtime.backends.get("users").balancer.active[0].pool
        self.assertEqual(len(pool.queue), 0)

    def test_response_too_large_is_502(self) -> None:
        app, client, backends = gateway(max_response_bytes=10, buffer_bytes=4)
        c = client.get("/u/1")
        proto, transport = backends.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"id\": 123}")
        client.flush()
        error(self, c, 502, "backend_response_too_large")
        self.assertTrue(transport.disconnecting)

    def test_no_endpoint_is_503(self) -> None:
        app, client, backends = gateway(endpoints=(), retry_after=2.0)
        c = client.get("/u/1")
        error(self, c, 503, "no_backend")
        self.assertEqual(c.header("retry-after"), "2")

    def test_refused_is_502_and_ejects_after_consecutive_failures(self) -> None:
        app, client, backends = gateway(retry={"retries": 0},
                                        balancer={"failures": 2, "max_ejected_share": 1.0,
                                                  "panic_threshold": 0.0,
                                                  "ejection_base": 10.0})
        svc = app.runtime.backends.get("users")
        for _ in range(2):
            c = client.get("/u/1")
            backends.refuse()
            client.flush()
            error(self, c, 502, "backend_error")
        self.assertTrue(svc.status()["endpoints"][0]["ejected"])
        c = client.get("/u/1")
        error(self, c, 503, "no_backend")  # the only endpoint is out
        self.assertEqual(backends.pending(), 0)
        client.advance(15.0)  # past the longest jittered first ejection
        c = client.get("/u/1")
        proto, _ = backends.accept()
        proto.dataReceived(OK)
        client.flush()
        self.assertEqual(c.status, 200)
        self.assertFalse(svc.status()["endpoints"][0]["ejected"])

    def test_refused_get_is_retried_on_the_other_endpoint(self) -> None:
        app, client, backends = gateway(endpoints=("127.0.0.1:9001", "127.0.0.1:9002"))
        c = client.get("/u/1")
        first_port = backends.reactor.tcpClients[0][1]
        backends.refuse()
        self.assertNotEqual(backends.reactor.tcpClients[1][1], first_port)
        proto, _ = backends.accept()
        proto.dataReceived(OK)
        client.flush()
        self.assertEqual(c.status, 200)
        self.assertEqual(app.runtime.backends.get("users").retries, 1)

    def test_retries_stop_when_the_budget_is_spent(self) -> None:
        app, client, backends = gateway(retry={"retries": 5, "budget_ratio": 0.0,
                                               "budget_min_per_second": 0.1,
                                               "budget_window": 10.0},
                                        balancer={"failures": 100})
        c = client.get("/u/1")
        backends.refuse()  # first attempt
        backends.refuse()  # the one retry the budget holds (0.1/s × 10 s)
        client.flush()
        error(self, c, 502, "backend_error")
        self.assertEqual(backends.pending(), 0)
        svc = app.runtime.backends.get("users")
        self.assertEqual((svc.retries, svc.budget.refused), (1, 1))

    def test_client_disconnect_closes_the_backend_connection(self) -> None:
        app, client, backends = gateway()
        c = client.get("/u/1")
        proto, transport = backends.accept()
        client.disconnect(c)
        self.assertTrue(transport.disconnecting)
        svc = app.runtime.backends.get("users")
        self.assertEqual((svc.in_flight, svc.failures["cancelled"]), (0, 1))
        self.assertEqual(svc.balancer.active[0].outstanding, 0)

    def test_client_disconnect_leaves_the_queue(self) -> None:
        app, client, backends = gateway(pool={"max_connections": 1})
        client.get("/u/1")
        backends.accept()
        waiting = client.get("/u/2")
        pool = app.runtime.backends.get("users").balancer.active[0].pool
        self.assertEqual(len(pool.queue), 1)
        client.disconnect(waiting)
        self.assertEqual(len(pool.queue), 0)

    def test_calls_waiting_on_a_removed_endpoint_go_elsewhere(self) -> None:
        app, client, backends = gateway(pool={"max_connections": 1}, retry={"retries": 0})
        svc = app.runtime.backends.get("users")
        first = client.get("/u/1")
        proto, transport = backends.accept()
        waiting = client.get("/u/2")
        from pipecomet._backend import Endpoint

        svc.discovery.set([Endpoint("127.0.0.1", 9002)])
        self.assertEqual(len(backends.reactor.tcpClients), 2)  # the waiter moved on
        self.assertEqual(backends.reactor.tcpClients[1][1], 9002)
        proto2, transport2 = backends.accept()
        self.assertIn(b"GET /users/2 ", transport2.value())
        proto2.dataReceived(OK)
        client.flush()
        self.assertEqual(waiting.status, 200)
        proto.dataReceived(OK)  # the call in flight on the removed endpoint finishes
        client.flush()
        self.assertEqual(first.status, 200)
        self.assertTrue(transport.disconnecting)  # and its connection is not kept
        self.assertEqual(svc.status()["draining"], [])

    def test_idle_connections_are_closed_after_idle_timeout(self) -> None:
        app, client, backends = gateway(pool={"idle_timeout": 4.0})
        app.service.startService()
        c = client.get("/u/1")
        proto, transport = backends.accept()
        proto.dataReceived(OK)
        client.flush()
        self.assertEqual(c.status, 200)
        client.advance(3.0)
        self.assertFalse(transport.disconnecting)
        client.advance(2.0)
        self.assertTrue(transport.disconnecting)
        app.service.stopService()

    def test_old_connections_are_not_reused(self) -> None:
        app, client, backends = gateway(pool={"max_lifetime": 10.0}, timeout=20.0)
        c = client.get("/u/1")
        proto, transport = backends.accept()
        client.advance(11.0)
        proto.dataReceived(OK)
        client.flush()
        self.assertEqual(c.status, 200)
        self.assertTrue(transport.disconnecting)  # past its lifetime when handed back

    def test_backend_status_is_answered_not_raised(self) -> None:
        app, client, backends = gateway()
        c = client.get("/one?id=5")
        proto, _ = backends.accept()
        proto.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 2\r\n\r\n{}")
        client.flush()
        self.assertEqual((c.status, c.json()), (200, {"status": 404, "body": {}}))
        c = client.get("/u/5")
        proto.dataReceived(b"HTTP/1.1 409 Conflict\r\nContent-Type: text/plain\r\n"
                           b"Content-Length: 4\r\n\r\nnope")
        client.flush()
        self.assertEqual((c.status, c.body, c.header("content-type")), (409, b"nope", "text/plain"))

    def test_status_shows_backends(self) -> None:
        app, client, backends = gateway()
        c = client.get("/_pipecomet/status")
        figures = c.json()["backends"]["users"]
        self.assertEqual(figures["discovery"]["kind"], "static")
        self.assertEqual(figures["endpoints"][0]["address"], "127.0.0.1:9001")
        self.assertIn("retry_budget", figures)


class ConfigTests(SynchronousTestCase):
    def test_bad_values_name_the_key(self) -> None:
        with self.assertRaises(ConfigError) as e:
            Config.from_dict({"backends": {"users": {"pool": {"max_connections": 0}}}})
        self.assertIn("backends.users.pool", str(e.exception))
        self.assertIn("max_connections", str(e.exception))
        with self.assertRaises(ConfigError) as e:
            Config.from_dict({"backends": {"users": {"discovery": {
                "endpoints": ["nope"]}}}})
        self.assertIn("backends.users.discovery", str(e.exception))
        with self.assertRaises(ConfigError):
            Config.from_dict({"backends": {"users": {"tiemout": 1}}})

    def test_services_are_named_tables_of_backends(self) -> None:
        # [backends.NAME], as docs/backends.md and the demo config write it.
        config = Config.from_dict({"backends": {
            "users": {"timeout": 2.0, "pool": {"max_connections": 3}},
            "orders": {"discovery": {"endpoints": ["127.0.0.1:9002"]}}}})
        services = config.backends.services
        self.assertEqual(sorted(services), ["orders", "users"])
        self.assertEqual(services["users"].timeout, 2.0)
        self.assertEqual(services["users"].pool.max_connections, 3)
        self.assertEqual(services["orders"].discovery.endpoints, ["127.0.0.1:9002"])
        with self.assertRaises(ConfigError) as e:
            Config.from_dict({"backends": {"users": 3}})
        self.assertIn("backends.users", str(e.exception))

    def test_default_is_no_service(self) -> None:
        self.assertEqual(Config().backends, BackendsConfig())

    def test_undeclared_service_fails_at_start(self) -> None:
        app = App(reactor=MemoryReactorClock())
        app.route("/x", [call("orders", "GET", "/x")])
        with self.assertRaises(ConfigError) as e:
            app.configure(Config())
        self.assertIn("unknown backend service 'orders'", str(e.exception))


class StreamingTests(SynchronousTestCase):
    """
    A large answer is handed over as it arrives; nobody reading pauses the
    backend.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        app = App(reactor=self.reactor)
        app.configure(Config.from_dict({"backends": {"users": {
            "discovery": {"endpoints": ["127.0.0.1:9001"]}, "buffer_bytes": 4}}}))
        self.svc = app.runtime.backends.get("users")
        self.backends = Backends(self.reactor)

    def test_large_body_streams_and_pauses_without_a_reader(self) -> None:
        got: list[Any] = []
        self.svc.get("/big").addCallback(got.append)
        proto, transport = self.backends.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.assertEqual(got, [])  # 3 bytes: still under buffer_bytes
        proto.dataReceived(b"de")
        [resp] = got  # handed over before the body is complete
        self.assertFalse(resp.complete)
        self.assertEqual(transport.producerState, "paused")  # nobody reads yet
        chunks: list[bytes] = []
        ended: list[Any] = []
        resp.deliver(chunks.append).addCallback(ended.append)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(b"".join(chunks), b"abcde")
        proto.dataReceived(b"fghij")
        self.assertEqual((b"".join(chunks), ended, resp.complete), (b"abcdefghij", [None], True))

    def test_body_of_a_streamed_answer(self) -> None:
        got: list[Any] = []
        self.svc.get("/big").addCallback(got.append)
        proto, transport = self.backends.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        [resp] = got
        body: list[bytes] = []
        resp.body().addCallback(body.append)
        proto.dataReceived(b"6\r\n world\r\n0\r\n\r\n")
        self.assertEqual(body, [b"hello world"])

    def test_abandoning_a_streamed_body_closes_the_connection(self) -> None:
        got: list[Any] = []
        self.svc.get("/big").addCallback(got.append)
        proto, transport = self.backends.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        [resp] = got
        resp.abort()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.svc.in_flight, 0)
        pool = self.svc.balancer.active[0].pool
        self.assertEqual((pool.busy, len(pool.idle)), (0, 0))



class EndpointPoolTests(SynchronousTestCase):
    """
    The connections of one endpoint, as the gateway's calls see them:
    the queue's timer, lifetimes at their edge, a kept connection the
    backend closes, a connection handed from call to call.
    """

    def pool_status(self, app: Any) -> dict[str, Any]:
        return app.runtime.backends.get("users").status()["endpoints"][0]["pool"]

    def test_queue_timeout_message_and_figures(self) -> None:
        app, client, backends = gateway(pool={"max_connections": 1, "queue": 5,
                                              "queue_timeout": 0.25}, timeout=5.0)
        client.get("/u/1")
        backends.accept()
        waiting = client.get("/u/2")
        self.assertEqual(self.pool_status(app)["waiting"], 1)
        client.advance(0.249)
        self.assertFalse(waiting.done)
        client.advance(0.001)
        body = error(self, waiting, 503, "backend_queue_timeout")
        self.assertEqual(body["message"],
                         "backend service 'users': no connection free within 0.25s")
        s = self.pool_status(app)
        self.assertEqual((s["waiting"], s["queue_timeouts"], s["busy"]), (0, 1, 1))

    def test_a_waiter_that_leaves_takes_its_timer(self) -> None:
        app, client, backends = gateway(pool={"max_connections": 1, "queue_timeout": 0.5},
                                        timeout=5.0)
        client.get("/u/1")
        backends.accept()
        before = len(backends.reactor.getDelayedCalls())
        waiting = client.get("/u/2")
        self.assertEqual(len(backends.reactor.getDelayedCalls()), before + 2)  # deadline, queue
        client.disconnect(waiting)
        self.assertEqual(len(backends.reactor.getDelayedCalls()), before)
        client.advance(1.0)
        self.assertEqual(self.pool_status(app)["queue_timeouts"], 0)

    def test_a_connection_exactly_max_lifetime_old_is_not_kept(self) -> None:
        app, client, backends = gateway(pool={"max_lifetime": 10.0}, timeout=20.0)
        c = client.get("/u/1")
        proto, transport = backends.accept()
        client.advance(9.999)
        proto.dataReceived(OK)
        client.flush()
        self.assertEqual((c.status, transport.disconnecting), (200, False))
        client.advance(0.001)
        c = client.get("/u/2")  # the idle one is 10 s old now: a new connection
        self.assertTrue(transport.disconnecting)
        self.assertEqual(backends.pending(), 1)

    def test_a_connection_max_lifetime_old_when_its_call_ends_is_closed(self) -> None:
        app, client, backends = gateway(pool={"max_lifetime": 10.0}, timeout=20.0)
        c = client.get("/u/1")
        proto, transport = backends.accept()
        client.advance(10.0)
        proto.dataReceived(OK)
        client.flush()
        self.assertEqual((c.status, transport.disconnecting), (200, True))
        self.assertEqual(self.pool_status(app)["idle"], 0)

    def test_a_kept_connection_the_backend_closes_is_forgotten(self) -> None:
        from twisted.internet.error import ConnectionDone

        app, client, backends = gateway()
        c = client.get("/u/1")
        proto, transport = backends.accept()
        proto.dataReceived(OK)
        client.flush()
        self.assertEqual((c.status, self.pool_status(app)["idle"]), (200, 1))
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.pool_status(app)["idle"], 0)
        c = client.get("/u/2")
        self.assertEqual(backends.pending(), 1)
        proto2, transport2 = backends.accept()
        self.assertIn(b"GET /users/2 ", transport2.value())

    def test_waiters_beyond_the_cap_are_served_in_order(self) -> None:
        app, client, backends = gateway(pool={"max_connections": 1, "queue": 3}, timeout=30.0)
        calls = [client.get(f"/u/{n}") for n in range(1, 5)]
        # The first waits for the connection being made, three more in the queue.
        self.assertEqual(self.pool_status(app)["waiting"], 4)
        error(self, client.get("/u/5"), 503, "backend_busy")
        proto, transport = backends.accept()
        for n, c in enumerate(calls, 1):
            self.assertIn(b"GET /users/%d " % n, transport.value())
            transport.clear()
            proto.dataReceived(OK)
            client.flush()
            self.assertEqual(c.status, 200)
        s = self.pool_status(app)
        self.assertEqual((s["connects"], s["waiting"], s["busy"], s["idle"]), (1, 0, 0, 1))
