"""
Unit tests of observability (pipecomet._observe): request ids, the
Prometheus figures and their access rule, the buffered access log, JSON
logs and the dashboard's snapshots and stream, in memory on a fake clock.
"""

from __future__ import annotations

import io
import json
import re

from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import Application
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from pipecomet import App, Config, ConfigError, Pipe, trace_headers
from pipecomet._observe import (
    AccessLog,
    AccessLogService,
    HTTPStats,
    JSONLineObserver,
    LagProbe,
    LoggingConfig,
    LoggingRoot,
    MemoryWriter,
    MetricsConfig,
    MetricsResource,
    PipecometCollector,
    make_registry,
    valid_request_id,
)
from pipecomet._observe._metrics import exposition, quantile
from pipecomet.testing import MemoryClient, make_clock


def scrape(client: MemoryClient, headers: dict[str, str] | None = None) -> dict[str, float]:
    """
    ``/_pipecomet/metrics`` parsed: ``'name{label="v",...}'`` → value
    (labels sorted), via prometheus_client's own parser.
    """
    call = client.get("/_pipecomet/metrics", headers=headers)
    assert call.status == 200, call.body
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(call.body.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def make(config: dict | None = None, clock: Clock | None = None) -> tuple[App, MemoryClient, Clock]:
    clock = clock or make_clock()
    app = App(reactor=clock, name="obs")
    slow: dict[str, Deferred] = {}

    def hello(inp, ctx, res):
        return {"rid": ctx.request_id}

    def wait(inp, ctx, res):
        d = Deferred()
        clock.callLater(0.3, d.callback, "late")
        return d

    def boom(inp, ctx, res):
        raise RuntimeError("kaboom")

    app.route("/hello", [Pipe(hello)])
    app.route("/wait", [Pipe(wait)])
    app.route("/boom", [Pipe(boom)])
    app.route("/items/<int:n>", [Pipe(lambda i, c, r: i.path_params["n"], name="item")])
    # A POST with a body is served lazily (the chain starts before the body is read).
    app.route("/upload", [Pipe(lambda i, c, r: i.body(), name="read"),
                          Pipe(lambda i, c, r: {"bytes": len(r.last), "rid": c.request_id},
                               name="size")], methods=("POST",))
    app.slow = slow  # type: ignore[attr-defined]
    app.configure(Config.from_dict({"server": {"access_log": "off"}, **(config or {})}))
    return app, MemoryClient(app), clock


class RequestIdTests(SynchronousTestCase):
    def setUp(self):
        self.app, self.client, self.clock = make()

    def test_valid_incoming_id_is_kept_echoed_and_given_to_pipes(self):
        call = self.client.get("/hello", headers={"x-request-id": "edge-42.a_b"})
        self.assertEqual(call.header("x-request-id"), "edge-42.a_b")
        self.assertEqual(call.json(), {"rid": "edge-42.a_b"})

    def test_invalid_or_missing_id_is_replaced(self):
        for bad in ("has space", "x" * 129, "semi;colon", ""):
            call = self.client.get("/hello", headers={"x-request-id": bad})
            rid = call.header("x-request-id")
            self.assertNotEqual(rid, bad)
            self.assertRegex(rid, r"^[0-9a-f]{32}$")
            self.assertEqual(call.json(), {"rid": rid})
        ids = {self.client.get("/hello").header("x-request-id") for _ in range(20)}
        self.assertEqual(len(ids), 20)

    def test_limits_of_a_valid_id(self):
        self.assertTrue(valid_request_id(b"a"))
        self.assertTrue(valid_request_id(b"A" * 128))
        self.assertFalse(valid_request_id(b"A" * 129))
        self.assertFalse(valid_request_id(b"a/b"))

    def test_traceparent_trace_id_becomes_the_request_id(self):
        tid = "4bf92f3577b34da6a3ce929d0e0e4736"
        call = self.client.get("/hello", headers={
            "traceparent": f"00-{tid}-00f067aa0ba902b7-01"})
        self.assertEqual(call.header("x-request-id"), tid)
        # An all-zero trace-id is invalid (W3C): a new id is made.
        call = self.client.get("/hello", headers={
            "traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"})
        self.assertNotEqual(call.header("x-request-id"), "0" * 32)

    def test_error_responses_carry_the_id_too(self):
        call = self.client.get("/nowhere", headers={"x-request-id": "r-404"})
        self.assertEqual(call.status, 404)
        self.assertEqual(call.header("x-request-id"), "r-404")

    def test_trace_headers(self):
        class Ctx:
            request_id = "4bf92f3577b34da6a3ce929d0e0e4736"

        h1, h2 = trace_headers(Ctx()), trace_headers(Ctx())
        self.assertEqual(h1["X-Request-Id"], Ctx.request_id)
        m = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", h1["traceparent"])
        self.assertIsNotNone(m)
        self.assertEqual(m.group(1), Ctx.request_id)
        # One trace, a new parent-id per backend call.
        self.assertNotEqual(h1["traceparent"], h2["traceparent"])
        Ctx.request_id = "edge-42"
        h = trace_headers(Ctx())
        tid = h["traceparent"].split("-")[1]
        self.assertRegex(tid, r"^[0-9a-f]{32}$")
        self.assertEqual(tid, trace_headers(Ctx())["traceparent"].split("-")[1])


class MetricsTests(SynchronousTestCase):
    def setUp(self):
        self.app, self.client, self.clock = make()

    def test_requests_by_route_method_status(self):
        for _ in range(3):
            self.client.get("/hello")
        self.client.get("/items/7")
        self.client.get("/items/8")
        self.client.post("/hello")
        self.client.get("/nowhere")
        m = scrape(self.client)
        self.assertEqual(m['pipecomet_http_requests_total{method="GET",route="/hello",status="200"}'], 3)
        self.assertEqual(m['pipecomet_http_requests_total{method="GET",route="/items/<int:n>",'
                           'status="200"}'], 2)
        self.assertEqual(m['pipecomet_http_requests_total{method="POST",route="<unmatched>",'
                           'status="405"}'], 1)
        self.assertEqual(m['pipecomet_http_requests_total{method="GET",route="<unmatched>",'
                           'status="404"}'], 1)
        self.assertEqual(m['pipecomet_http_errors_total{code="not_found"}'], 1)
        self.assertEqual(m['pipecomet_http_errors_total{code="method_not_allowed"}'], 1)

    def test_lazily_served_requests_are_counted_too(self):
        call = self.client.post("/upload", data=b"x" * 1000,
                                headers={"content-type": "application/octet-stream",
                                         "x-request-id": "up-1"})
        self.assertEqual(call.json(), {"bytes": 1000, "rid": "up-1"})
        self.assertEqual(call.header("x-request-id"), "up-1")
        m = scrape(self.client)
        self.assertEqual(m['pipecomet_http_requests_total{method="POST",route="/upload",'
                           'status="200"}'], 1)
        self.assertEqual(m['pipecomet_pipe_duration_seconds_count{pipe="read",route="/upload"}'], 1)

    def test_latency_histogram_and_pipe_time_follow_the_clock(self):
        call = self.client.get("/wait")
        self.assertFalse(call.done)
        m = scrape(self.client)
        # /wait and the scrape itself.
        self.assertEqual(m["pipecomet_http_requests_in_flight"], 2)
        self.client.advance(0.3)
        self.assertEqual(call.json(), "late")
        m = scrape(self.client)
        self.assertEqual(m["pipecomet_http_requests_in_flight"], 1)
        key = 'pipecomet_http_request_duration_seconds_bucket{le="%s",route="/wait"}'
        self.assertEqual(m[key % "0.25"], 0)
        self.assertEqual(m[key % "0.5"], 1)
        self.assertAlmostEqual(m['pipecomet_http_request_duration_seconds_sum{route="/wait"}'], 0.3)
        pkey = 'pipecomet_pipe_duration_seconds_bucket{le="%s",pipe="wait",route="/wait"}'
        self.assertEqual(m[pkey % "0.25"], 0)
        self.assertEqual(m[pkey % "0.5"], 1)

    def test_a_client_that_goes_is_499(self):
        call = self.client.get("/wait")
        self.client.disconnect(call)
        self.client.advance(1)
        m = scrape(self.client)
        self.assertEqual(m['pipecomet_http_requests_total{method="GET",route="/wait",status="499"}'], 1)
        self.assertEqual(m["pipecomet_http_requests_in_flight"], 1)  # the scrape

    def test_a_pending_request_is_followed_without_a_deferred(self):
        # pipecomet's own request calls the observer when it ends: no
        # notifyFinish() Deferred is kept for the life of a held request,
        # and the record is on the request, not in the module's table.
        from pipecomet._http import Request
        from pipecomet._observe import _requests

        seen = []
        original = Request.call_when_done

        def spy(request, hook, record):
            seen.append(request)
            return original(request, hook, record)

        Request.call_when_done = spy  # type: ignore[method-assign]
        try:
            call = self.client.get("/wait")
        finally:
            Request.call_when_done = original  # type: ignore[method-assign]
        (request,) = seen
        self.assertEqual(request.notifications, [])
        self.assertIsNotNone(request.pipecomet_record)
        self.assertNotIn(request, _requests._OPEN)
        self.client.advance(0.3)
        self.assertTrue(call.done)
        self.assertIsNone(request.pipecomet_record)
        m = scrape(self.client)
        self.assertEqual(m['pipecomet_http_requests_total{method="GET",route="/wait",status="200"}'], 1)

    def test_thread_pipes_are_timed_on_their_thread_and_counted_later(self):
        from pipecomet._quota import QuotaPool
        from pipecomet.testing import SynchronousThreadPool

        clock = make_clock()
        app = App(reactor=clock)

        def blocking(inp, ctx, res):
            clock.advance(0.2)  # the "thread" takes 200 ms
            return "done"

        app.route("/t", [Pipe(blocking, run="thread", category="default")])
        app.configure(Config.from_dict({"server": {"access_log": "off"}}))
        app.runtime.quota = QuotaPool(app.config.quota, clock,
                                      threadpool=SynchronousThreadPool(immediate=True))
        app.runtime.quota.startService()
        app.service.startService()
        self.addCleanup(app.service.stopService)
        client = MemoryClient(app)
        self.assertEqual(client.get("/t").json(), "done")
        times = app.observer.metrics.times
        key = ("/t", "blocking")
        # Handed over, not counted yet: counted by the next drain (every second).
        self.assertEqual(len(times._from_threads), 1)
        client.advance(1.0)
        self.assertEqual(times._from_threads, [])
        self.assertEqual(dict(times.hists[key].buckets())["0.25"], 1)
        m = scrape(client)
        self.assertEqual(m['pipecomet_pipe_duration_seconds_count{pipe="blocking",route="/t"}'], 1)

    def test_pipe_timing_can_be_turned_off(self):
        app, client, _ = make({"metrics": {"pipe_timing": False}})
        client.get("/hello")
        m = scrape(client)
        self.assertFalse([k for k in m if k.startswith("pipecomet_pipe_duration")])
        self.assertEqual(m['pipecomet_http_requests_total{method="GET",route="/hello",status="200"}'], 1)

    def test_metrics_off_means_no_route(self):
        app, client, _ = make({"metrics": {"enabled": False}})
        self.assertEqual(client.get("/_pipecomet/metrics").status, 404)
        self.assertEqual(client.get("/_pipecomet/dashboard").status, 404)

    def test_quota_and_comet_figures_from_their_status(self):
        m = scrape(self.client)
        # The default app has a quota pool (category "default") and a comet hub.
        self.assertEqual(m['pipecomet_quota_running{category="default"}'], 0)
        self.assertIn('pipecomet_quota_jobs_total{category="default",outcome="rejected"}', m)
        self.assertIn('pipecomet_quota_queue_wait_seconds_bucket{category="default",le="+Inf"}', m)
        self.assertEqual(m['pipecomet_comet_connections{transport="sse"}'], 0)
        self.assertEqual(m["pipecomet_comet_published_total"], 0)
        self.assertIn("pipecomet_bus_connected", m)
        self.assertIn("pipecomet_events_waiters", m)
        self.assertIn("pipecomet_lazy_requests_buffered_total", m)
        self.assertIn("pipecomet_process_cpu_seconds_total", m)

    def test_backends_collector_over_a_fake_status_source(self):
        status = {"users": {
            "endpoints": {
                "10.0.0.1:8080": {"calls": 12, "errors": {"timeout": 2, "refused": 1},
                                  "ejections": 1, "ejected": True, "pool_size": 4, "waiters": 0,
                                  "latency": {"count": 12, "sum": 0.6,
                                              "buckets": {"0.05": 10, "0.1": 12, "+Inf": 12}}},
                "10.0.0.2:8080": {"calls": 30, "errors": {}, "ejections": 0, "ejected": False,
                                  "pool_size": 4, "waiters": 2},
            },
            "waiters": 2, "name": "users"}}
        self.app.runtime.status_sources["backends"] = lambda: status
        m = scrape(self.client)
        self.assertEqual(m['pipecomet_backend_calls_total{endpoint="10.0.0.1:8080",service="users"}'], 12)
        self.assertEqual(m['pipecomet_backend_calls_total{endpoint="10.0.0.2:8080",service="users"}'], 30)
        self.assertEqual(m['pipecomet_backend_errors_total{endpoint="10.0.0.1:8080",kind="timeout",'
                           'service="users"}'], 2)
        self.assertEqual(m['pipecomet_backend_ejections_total{endpoint="10.0.0.1:8080",'
                           'service="users"}'], 1)
        self.assertEqual(m['pipecomet_backend_ejected{endpoint="10.0.0.1:8080",service="users"}'], 1)
        self.assertEqual(m['pipecomet_backend_pool_size{endpoint="10.0.0.2:8080",service="users"}'], 4)
        self.assertEqual(m['pipecomet_backend_waiters{endpoint="10.0.0.2:8080",service="users"}'], 2)
        self.assertEqual(m['pipecomet_backend_latency_seconds_bucket{endpoint="10.0.0.1:8080",'
                           'le="0.05",service="users"}'], 10)
        self.assertEqual(m['pipecomet_backend_service_waiters{service="users"}'], 2)

    def test_backends_collector_over_the_backend_clients_own_status(self):
        """
        The real backend client's status (endpoints as a list, each with its
        pool's figures) becomes per-endpoint and per-service series.
        """
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        app = App(reactor=reactor, name="obs-backends")
        app.configure(Config.from_dict({
            "server": {"access_log": "off"},
            "backends": {"users": {"discovery": {
                "endpoints": ["127.0.0.1:9001", "127.0.0.1:9002"]}}},
        }))
        app.service.startService()
        self.addCleanup(app.service.stopService)
        m = scrape(MemoryClient(app))
        for port in (9001, 9002):
            where = f'endpoint="127.0.0.1:{port}",service="users"'
            self.assertEqual(m[f"pipecomet_backend_calls_total{{{where}}}"], 0)
            self.assertEqual(m[f"pipecomet_backend_outstanding{{{where}}}"], 0)
            self.assertEqual(m[f"pipecomet_backend_pool_busy{{{where}}}"], 0)
            self.assertEqual(m[f"pipecomet_backend_pool_waiting{{{where}}}"], 0)
            self.assertEqual(m[f"pipecomet_backend_ejected{{{where}}}"], 0)
            self.assertEqual(m[f"pipecomet_backend_latency_seconds_count{{{where}}}"], 0)
        self.assertEqual(m['pipecomet_backend_service_calls_total{service="users"}'], 0)
        self.assertEqual(m['pipecomet_backend_service_failures_total{kind="backend_error",'
                           'service="users"}'], 0)
        self.assertEqual(m['pipecomet_backend_service_discovery{kind="endpoints",'
                           'service="users"}'], 2)

    def test_workers_figures_from_a_fake_pool_status(self):
        status = {"size": 2, "queued": 3, "queue_limit": 10, "in_flight": 1, "completed": 40,
                  "rejected": 2, "failed": {"crash": 1, "timeout": 2}, "restarts": 3,
                  "workers": [{"slot": 0, "in_flight": 1, "rss_bytes": 1000},
                              {"slot": 1, "in_flight": 0, "rss_bytes": 2000}]}
        self.app.runtime.status_sources["workers"] = lambda: status
        m = scrape(self.client)
        self.assertEqual(m["pipecomet_workers_busy"], 1)
        self.assertEqual(m["pipecomet_workers_queued"], 3)
        self.assertEqual(m['pipecomet_workers_calls_total{outcome="completed"}'], 40)
        self.assertEqual(m['pipecomet_workers_calls_total{outcome="timeout"}'], 2)
        self.assertEqual(m["pipecomet_workers_crashes_total"], 1)
        self.assertEqual(m["pipecomet_workers_restarts_total"], 3)
        self.assertEqual(m['pipecomet_workers_rss_bytes{slot="1"}'], 2000)

    def test_a_failing_status_source_does_not_break_the_scrape(self):
        def broken():
            raise RuntimeError("no figures")

        self.app.runtime.status_sources["quota"] = broken
        m = scrape(self.client)
        self.assertNotIn('pipecomet_quota_running{category="default"}', m)
        self.assertIn("pipecomet_http_requests_in_flight", m)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_registries_are_per_app(self):
        other, client2, _ = make()
        self.client.get("/hello")
        m2 = scrape(client2)
        self.assertNotIn('pipecomet_http_requests_total{method="GET",route="/hello",status="200"}', m2)
        self.assertIsNot(self.app.observer.metrics.registry, other.observer.metrics.registry)


class ReactorLagTests(SynchronousTestCase):
    def test_lag_is_how_late_the_timed_call_fired(self):
        clock = Clock()
        probe = LagProbe(clock, 0.5)
        probe.start()
        clock.advance(0.5)
        self.assertEqual(probe.last, 0.0)
        clock.advance(0.8)  # due at 1.0, fired at 1.3
        self.assertAlmostEqual(probe.last, 0.3)
        clock.advance(0.2)  # next due at 1.5: on time
        self.assertAlmostEqual(probe.last, 0.0)
        buckets = dict(probe.hist.buckets())
        self.assertEqual(buckets["0.25"], 2)
        self.assertEqual(buckets["0.5"], 3)
        self.assertAlmostEqual(probe.take_worst(), 0.3)
        self.assertEqual(probe.take_worst(), 0.0)
        probe.stop()
        self.assertFalse(clock.getDelayedCalls())

    def test_lag_histogram_is_exposed(self):
        app, client, clock = make()
        app.service.startService()
        self.addCleanup(app.service.stopService)
        clock.advance(0.5)
        clock.advance(0.6)  # 0.1 late
        m = scrape(client)
        self.assertEqual(m["pipecomet_reactor_lag_seconds_count"], 2)
        self.assertEqual(m['pipecomet_reactor_lag_seconds_bucket{le="0.05"}'], 1)
        self.assertEqual(m['pipecomet_reactor_lag_seconds_bucket{le="0.1"}'], 2)


class AccessRuleTests(SynchronousTestCase):
    def request(self, host: str, auth: str | None = None, query: bytes = b"") -> DummyRequest:
        req = DummyRequest([b""])
        req.client = IPv4Address("TCP", host, 40000)
        if auth:
            req.requestHeaders.setRawHeaders(b"authorization", [auth.encode()])
        if query:
            req.args = {b"token": [query]}
        return req

    def render(self, resource: MetricsResource, req: DummyRequest) -> tuple[int, bytes]:
        body = resource.render(req)
        return req.responseCode or 200, body

    def test_loopback_only_by_default(self):
        registry = make_registry(PipecometCollector(status_sources={}, stats=HTTPStats(),
                                                    times=None, lag=None), process=False)
        res = MetricsResource(registry)
        code, body = self.render(res, self.request("127.0.0.1"))
        self.assertEqual(code, 200)
        self.assertIn(b"pipecomet_http_requests_total", body)
        code, body = self.render(res, self.request("10.1.2.3"))
        self.assertEqual(code, 403)
        self.assertEqual(json.loads(body)["error"]["code"], "metrics_forbidden")
        self.assertEqual(self.render(res, self.request("::1"))[0], 200)
        self.assertEqual(self.render(res, self.request("::ffff:127.0.0.1"))[0], 200)

    def test_token(self):
        registry = make_registry(PipecometCollector(status_sources={}, stats=HTTPStats(),
                                                    times=None, lag=None), process=False)
        res = MetricsResource(registry, allow_loopback=False, token="s3cret")
        self.assertEqual(self.render(res, self.request("10.1.2.3", "Bearer s3cret"))[0], 200)
        self.assertEqual(self.render(res, self.request("10.1.2.3", "Bearer wrong"))[0], 403)
        self.assertEqual(self.render(res, self.request("10.1.2.3", "Basic s3cret"))[0], 403)
        # Loopback is not enough once allow_loopback is off.
        self.assertEqual(self.render(res, self.request("127.0.0.1"))[0], 403)
        # ?token= is for the dashboard's EventSource, not for the metrics resource.
        self.assertEqual(self.render(res, self.request("10.1.2.3", query=b"s3cret"))[0], 403)

    def test_app_routes_follow_the_config(self):
        app, client, _ = make({"metrics": {"allow_loopback": False, "token": "tok"}})
        call = client.get("/_pipecomet/metrics")
        self.assertEqual(call.status, 403)
        self.assertEqual(call.json()["error"]["code"], "metrics_forbidden")
        self.assertEqual(client.get("/_pipecomet/dashboard").status, 403)
        self.assertEqual(client.get("/_pipecomet/dashboard/stream").status, 403)
        self.assertEqual(client.get("/_pipecomet/metrics",
                                    headers={"authorization": "Bearer tok"}).status, 200)
        self.assertEqual(client.get("/_pipecomet/dashboard?token=tok").status, 200)
        # The page's static files hold no figures.
        self.assertEqual(client.get("/_pipecomet/dashboard/assets/dashboard.js").status, 200)


class AccessLogTests(SynchronousTestCase):
    def make(self, fmt: str = "text", **cfg) -> tuple[App, MemoryClient, Clock, MemoryWriter]:
        clock = make_clock()
        app, client, clock = make({"logging": {"access_format": fmt, **cfg}}, clock=clock)
        writer = MemoryWriter()
        access = AccessLog(writer, fmt, app.config.logging.access_buffer_bytes)
        app.observer.attach(clock, access=access)
        service = AccessLogService(access, clock, app.config.logging.access_flush_interval)
        service.startService()
        return app, client, clock, writer, service

    def test_text_lines_are_buffered_then_written_once_a_second(self):
        app, client, clock, writer, service = self.make()
        client.get("/hello?x=1", headers={"x-request-id": "rid-1", "user-agent": "ua/1"})
        client.get("/nowhere", headers={"x-request-id": "rid-2"})
        self.assertEqual(writer.chunks, [])
        clock.advance(1.0)
        self.assertEqual(len(writer.chunks), 1)  # one write for both lines
        first, second = writer.lines()
        self.assertRegex(first, r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] '
                                r'"GET /hello\?x=1 HTTP/1\.1" 200 \d+ "-" "ua/1" 0\.000000 rid-1 /hello$')
        self.assertRegex(second, r'" 404 \d+ .* rid-2 <unmatched> not_found:[0-9a-f]{16}$')

    def test_user_agent_and_referer_are_logged(self):
        # The first value of each, whatever the name's case; a quote in a
        # text line's field is written %22.
        app, client, clock, writer, service = self.make()
        client.get("/hello", headers={"User-Agent": "ua/2", "REFERER": 'http://r/"x"'})
        service.stopService()
        (line,) = writer.lines()
        self.assertIn('" 200 ', line)
        self.assertIn('"http://r/%22x%22" "ua/2"', line)
        app, client, clock, writer, service = self.make("json")
        client.get("/hello", headers={"user-agent": "ua/3", "referer": 'http://r/"y"'})
        service.stopService()
        (line,) = [json.loads(x) for x in writer.lines()]
        self.assertEqual((line["user_agent"], line["referer"]), ("ua/3", 'http://r/"y"'))

    def test_json_lines_carry_ids_route_status_duration_and_error(self):
        app, client, clock, writer, service = self.make("json")
        call = client.get("/boom", headers={"x-request-id": "rid-500"})
        self.flushLoggedErrors(RuntimeError)
        wait = client.get("/wait")
        client.advance(0.3)
        self.assertTrue(wait.done)
        service.stopService()  # flushes
        boom, waited = [json.loads(line) for line in writer.lines()]
        self.assertEqual(boom["request_id"], "rid-500")
        self.assertEqual(boom["route"], "/boom")
        self.assertEqual(boom["status"], 500)
        self.assertEqual(boom["error_code"], "internal_error")
        self.assertEqual(boom["error_id"], call.json()["error"]["id"])
        self.assertEqual(boom["method"], "GET")
        self.assertEqual(boom["remote"], "127.0.0.1")
        self.assertRegex(boom["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
        self.assertAlmostEqual(waited["duration"], 0.3)
        self.assertNotIn("error_code", waited)

    def test_lazily_served_posts_are_logged(self):
        app, client, clock, writer, service = self.make("json")
        call = client.post("/upload", data=b"abc", headers={"content-type": "text/plain"})
        self.assertEqual(call.json()["bytes"], 3)
        service.stopService()
        (line,) = [json.loads(x) for x in writer.lines()]
        self.assertEqual((line["method"], line["route"], line["status"]), ("POST", "/upload", 200))
        self.assertEqual(line["request_id"], call.header("x-request-id"))

    def test_a_full_buffer_is_written_at_once(self):
        app, client, clock, writer, service = self.make(access_buffer_bytes=200)
        client.get("/hello")
        self.assertEqual(writer.chunks, [])
        client.get("/hello")
        self.assertEqual(len(writer.lines()), 2)

    def test_tokens_in_the_query_are_not_logged(self):
        app, client, clock, writer, service = self.make()
        client.get("/_pipecomet/dashboard?token=s3cret&x=1")
        service.stopService()
        (line,) = writer.lines()
        self.assertNotIn("s3cret", line)
        self.assertIn("token=***&x=1", line)

    def test_lines_the_writer_refuses_are_dropped_and_counted(self):
        class Full(MemoryWriter):
            def write(self, data):
                return False

        access = AccessLog(Full(), "text", 1)
        app, client, clock = make()
        app.observer.attach(clock, access=access)
        client.get("/hello")
        client.get("/hello")
        self.assertEqual(access.status()["dropped"], 2)
        self.assertEqual(access.status()["lines"], 2)

    def test_twisted_web_per_request_log_is_not_used(self):
        from pipecomet._app import _no_access_log

        app, client, _ = make()
        self.assertIs(app.site().log, _no_access_log)

    def test_access_log_on_registers_its_figures(self):
        app = App(reactor=make_clock())
        app.configure(Config.from_dict({"server": {"access_log": "on"}}))
        self.assertIsNotNone(app.observer.access)
        self.assertIn("access_log", app.runtime.status_sources)
        off = App(reactor=make_clock()).configure(
            Config.from_dict({"server": {"access_log": "off"}}))
        self.assertIsNone(off.observer.access)


class JSONLogTests(SynchronousTestCase):
    def test_a_500_is_logged_with_the_ids_the_client_got(self):
        app, client, clock = make()
        out = io.StringIO()
        observer = JSONLineObserver(out)
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        call = client.get("/boom", headers={"x-request-id": "rid-json"})
        self.flushLoggedErrors(RuntimeError)
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        (rec,) = [r for r in records if r.get("error_id")]
        self.assertEqual(rec["error_id"], call.json()["error"]["id"])
        self.assertEqual(rec["request_id"], "rid-json")
        self.assertEqual(rec["level"], "critical")
        self.assertIn("unexpected error in pipe 'boom'", rec["message"])
        self.assertIn("RuntimeError: kaboom", rec["traceback"])
        self.assertEqual(rec["exception"], "RuntimeError: kaboom")

    def test_one_object_per_line_with_fields(self):
        out = io.StringIO()
        log = Logger(namespace="x.y", observer=JSONLineObserver(out))
        log.info("hello {who}", who="you", obj=object())
        log.warn("second\nline")
        first, second = out.getvalue().splitlines()
        one = json.loads(first)
        self.assertEqual(one["message"], "hello you")
        self.assertEqual(one["who"], "you")
        self.assertEqual(one["namespace"], "x.y")
        self.assertEqual(one["level"], "info")
        self.assertIn("object", one["obj"])
        self.assertEqual(json.loads(second)["message"], "second\nline")

    def test_logging_root_sets_the_applications_observer(self):
        observer = JSONLineObserver(io.StringIO())
        application = Application("t")
        LoggingRoot(observer).setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)

    def test_twistd_option(self):
        from pipecomet._service import Options, makeService

        opts = Options()
        opts.parseOptions(["--app", "pipecomet.demo:make_app", "--log-format", "json"])
        self.assertEqual(opts["app_object"].config.logging.format, "json")
        root = makeService(opts)
        self.assertIsInstance(root, LoggingRoot)
        root.observer.out.close()
        # A bad value stops the start (exit 1, the key named on stderr).
        import contextlib
        import io as _io

        err = _io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as e:
            Options().parseOptions(["--log-format", "xml"])
        self.assertEqual(e.exception.code, 1)
        self.assertIn("logging", err.getvalue())
        plain = Options()
        plain.parseOptions([])
        self.assertNotIsInstance(makeService(plain), LoggingRoot)


class ConfigTests(SynchronousTestCase):
    def test_sections(self):
        config = Config.from_dict({"metrics": {"token": "t", "allow_loopback": False},
                                   "logging": {"format": "json", "access_format": "text"}})
        self.assertEqual(config.metrics, MetricsConfig(token="t", allow_loopback=False))
        self.assertEqual(config.logging.access_line_format, "text")
        self.assertEqual(LoggingConfig(format="json").access_line_format, "json")

    def test_bad_values_name_the_key(self):
        for table, message in (({"metrics": {"lag_interval": 0}}, "lag_interval"),
                               ({"metrics": {"tokn": "x"}}, "metrics.tokn"),
                               ({"logging": {"format": "xml"}}, "format"),
                               ({"logging": {"access_buffer_bytes": 0}}, "access_buffer_bytes")):
            with self.assertRaises(ConfigError) as e:
                Config.from_dict(table)
            self.assertIn(message, str(e.exception))


class DashboardTests(SynchronousTestCase):
    def setUp(self):
        self.app, self.client, self.clock = make()
        self.app.service.startService()
        self.addCleanup(self.app.service.stopService)

    def test_page_and_assets_ship_in_the_package(self):
        page = self.client.get("/_pipecomet/dashboard")
        self.assertEqual(page.status, 200)
        self.assertEqual(page.header("content-type"), "text/html; charset=utf-8")
        for src in re.findall(rb'(?:src|href)="(/_pipecomet/dashboard/assets/[^"]+)"', page.body):
            self.assertEqual(self.client.get(src.decode()).status, 200, src)
        self.assertEqual(self.client.get("/_pipecomet/dashboard/assets/secret.py").status, 404)

    def test_stream_sends_history_then_a_snapshot_a_second(self):
        for _ in range(4):
            self.client.get("/hello")
        self.client.get("/nowhere")
        self.client.advance(1.0)
        stream = self.client.get("/_pipecomet/dashboard/stream")
        self.assertEqual(stream.header("content-type"), "text/event-stream")
        events = stream.events()
        self.assertEqual(events[0]["event"], "history")
        history = json.loads(events[0]["data"])
        self.assertEqual(history["app"], "obs")
        (snap,) = history["snapshots"]
        self.assertEqual(snap["rps"], 5.0)
        self.assertEqual(snap["status_rps"]["2xx"], 4.0)
        self.assertEqual(snap["status_rps"]["4xx"], 1.0)
        self.assertEqual(snap["errors_rps"], {"not_found": 1.0})
        self.assertIn("default", snap["quota"])
        self.assertEqual(snap["comet"]["connections"]["sse"], 0)
        wait = self.client.get("/wait")
        self.client.advance(0.3)
        self.assertTrue(wait.done)
        self.client.advance(0.7)
        events = stream.events()
        self.assertEqual([e["event"] for e in events], ["history", "snapshot"])
        snap = json.loads(events[1]["data"])
        self.assertEqual(snap["rps"], 1.0)
        # Percentiles over the last 5 snapshots: five quick requests and
        # one of 300 ms.
        self.assertLess(snap["latency_ms"]["p50"], 1)
        self.assertGreater(snap["latency_ms"]["p99"], 250)
        self.assertLessEqual(snap["latency_ms"]["p99"], 500)
        # The open stream is not a request in flight, nor in the figures.
        self.assertEqual(snap["in_flight"], 0)
        m = scrape(self.client)
        self.assertFalse([k for k in m if "dashboard/stream" in k and "requests_total" in k])

    def test_stream_ends_when_the_app_stops_and_viewers_are_limited(self):
        app, client, clock = make({"metrics": {"dashboard_viewers": 1}})
        app.service.startService()
        first = client.get("/_pipecomet/dashboard/stream")
        second = client.get("/_pipecomet/dashboard/stream")
        self.assertEqual(second.status, 503)
        self.assertEqual(second.json()["error"]["code"], "dashboard_busy")
        self.assertFalse(first.done)
        app.service.stopService()
        client.flush()
        self.assertTrue(first.done)
        self.assertEqual(app.observer.metrics.dashboard.viewers, set())

    def test_backends_in_the_snapshot(self):
        calls = {"n": 0}

        def backends():
            return {"users": {"endpoints": {"a:1": {"calls": calls["n"], "errors": {"timeout": 1}},
                                            "b:1": {"calls": 0, "ejected": True}}}}

        self.app.runtime.status_sources["backends"] = backends
        self.client.advance(1.0)
        calls["n"] = 10
        self.clock.advance(1.0)
        snap = self.app.observer.metrics.dashboard.history[-1]
        self.assertEqual(snap["backends"]["users"], {"endpoints": 2, "ejected": 1, "calls_rps": 10.0,
                                                     "errors_rps": 0.0, "waiters": 0.0})


class QuantileTests(SynchronousTestCase):
    def test_interpolates_inside_the_bucket(self):
        bounds = (0.1, 0.2, 0.4)
        self.assertIsNone(quantile(bounds, [0, 0, 0, 0], 0.5))
        self.assertAlmostEqual(quantile(bounds, [0, 10, 0, 0], 0.5), 0.15)
        self.assertAlmostEqual(quantile(bounds, [5, 0, 5, 0], 0.99), 0.2 + 0.2 * 0.98)
        self.assertEqual(quantile(bounds, [0, 0, 0, 3], 0.5), 0.4)

    def test_exposition_is_valid_text(self):
        stats = HTTPStats()
        reg = make_registry(PipecometCollector(status_sources={}, stats=stats, times=None,
                                               lag=None), process=False)
        families = {f.name for f in text_string_to_metric_families(exposition(reg).decode())}
        self.assertIn("pipecomet_http_requests", families)


class SeveralProcessesTests(SynchronousTestCase):
    """
    The scrape of a serving process among several (the supervisor's round
    faked; the real one is in test_supervisor and test_it_metrics_processes).
    """

    def test_every_process_is_labelled_and_the_silent_ones_are_down(self):
        a, ca, _ = make()
        b, cb, _ = make()
        cb.get("/hello")
        cb.get("/hello")
        ca.get("/hello")
        asked: list[float] = []
        pending: list[Deferred] = []

        def gather(timeout: float) -> Deferred:
            asked.append(timeout)
            d: Deferred = Deferred()
            pending.append(d)
            return d

        a.observer.metrics.serve_as_process(0, 3, gather)
        call = ca.get("/_pipecomet/metrics")
        self.assertEqual(asked, [2.0])  # [metrics] scrape_timeout
        pending[0].callback({"processes": {"0": a.observer.metrics.families(),
                                           "1": b.observer.metrics.families()},
                             "up": {"0": True, "1": True, "2": False},
                             "supervisor": {"processes": 3, "restarts": 4}})
        ca.flush()
        self.assertEqual(call.status, 200)
        got = {}
        for family in text_string_to_metric_families(call.body.decode()):
            for s in family.samples:
                got[(s.name, tuple(sorted(s.labels.items())))] = s.value
        hello = [("method", "GET"), ("route", "/hello"), ("status", "200")]
        self.assertEqual(got[("pipecomet_http_requests_total", (*hello[:1], ("process", "0"),
                                                                *hello[1:]))], 1)
        self.assertEqual(got[("pipecomet_http_requests_total", (*hello[:1], ("process", "1"),
                                                                *hello[1:]))], 2)
        self.assertEqual(got[("pipecomet_scrape_process_up", (("process", "2"),))], 0)
        self.assertEqual(got[("pipecomet_supervisor_restarts_total", ())], 4)
        self.assertFalse([k for k in got if not k[0].startswith("pipecomet_s")
                          and "process" not in dict(k[1])])

    def test_without_the_supervisor_a_process_answers_for_itself(self):
        a, ca, _ = make()
        a.observer.metrics.serve_as_process(3, 4, lambda timeout: Deferred.fromCoroutine(
            _none()))
        call = ca.get("/_pipecomet/metrics")
        self.assertEqual(call.status, 200)
        fams = {f.name: f for f in text_string_to_metric_families(call.body.decode())}
        self.assertEqual([(s.labels, s.value) for s in fams["pipecomet_scrape_process_up"].samples],
                         [({"process": "3"}, 1.0)])
        self.assertTrue(all(s.labels.get("process") == "3"
                            for s in fams["pipecomet_http_requests"].samples))


async def _none() -> None:
    return None


class DocsTests(SynchronousTestCase):
    def test_every_metric_is_in_docs_observability(self):
        """
        docs/observability.md names every metric family the collector makes
        (every part present, workers and backends from fake status sources).
        """
        from pathlib import Path

        app, client, _ = make()
        app.runtime.status_sources["workers"] = lambda: {
            "size": 1, "queued": 0, "queue_limit": 1, "in_flight": 0, "completed": 0,
            "rejected": 0, "failed": {}, "restarts": 0, "workers": [{"slot": 0, "rss_bytes": 1}]}
        app.runtime.status_sources["backends"] = lambda: {"users": {"waiters": 0, "endpoints": {
            "a:1": {"calls": 1, "errors": {"timeout": 1}, "ejections": 0, "ejected": False,
                    "pool_size": 1, "waiters": 0, "outstanding": 0,
                    "latency": {"count": 0, "sum": 0.0, "buckets": {"+Inf": 0}}}}}}
        app.runtime.status_sources["access_log"] = AccessLog(MemoryWriter()).status
        app.observer.metrics.collector.workers = lambda: 8192
        client.get("/hello")
        body = client.get("/_pipecomet/metrics").body.decode()
        names = {f.name + ("_total" if f.type == "counter" else "")
                 for f in text_string_to_metric_families(body)}
        doc = (Path(__file__).resolve().parent.parent / "docs" / "observability.md").read_text()
        missing = sorted(n for n in names if f"`{n}`" not in doc)
        self.assertEqual(missing, [])
        self.assertGreater(len(names), 60)
