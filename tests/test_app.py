"""
Unit tests of the app layer (routing, responders, Klein, config) and the
demo gateway's steps, in memory on a fake clock.
"""

from __future__ import annotations

import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from pipecomet import App, Config, ConfigError, Parallel, Pipe, load_config
from pipecomet.demo import make_app
from pipecomet.demo._gateway import SEARCH_LATENCIES, TokenBucket, to_xml
from pipecomet.testing import MemoryClient, make_clock


class RoutingTests(SynchronousTestCase):
    def setUp(self):
        self.clock = make_clock()
        self.app = App(reactor=self.clock)
        self.client = MemoryClient(self.app)

    def test_path_and_query_params(self):
        self.app.route("/items/<int:item>", [
            Pipe(lambda i, c, r: {"item": i.path_params["item"], "q": i.query, "all": i.query_all},
                 name="show")])
        call = self.client.get("/items/42?a=1&a=2&b=x")
        self.assertEqual(call.json(), {"item": 42, "q": {"a": "1", "b": "x"},
                                       "all": {"a": ["1", "2"], "b": ["x"]}})

    def test_percent_encoded_utf8_query(self):
        """
        Encoded and raw UTF-8 and undecodable bytes in the query never give
        a 500.
        """
        self.app.route("/q", [Pipe(lambda i, c, r: i.query_all, name="q")])
        self.assertEqual(self.client.get("/q?q=%E4%B8%AD&p=a+b%20c").json(),
                         {"q": ["中"], "p": ["a b c"]})
        call = self.client.get("/q?bad=%FF%FE&ok=1")
        self.assertEqual(call.status, 200)
        self.assertEqual(call.json()["ok"], ["1"])

    def test_not_found_json(self):
        call = self.client.get("/nowhere")
        self.assertEqual(call.status, 404)
        self.assertEqual(call.header("content-type"), "application/json")
        self.assertEqual(call.json()["error"]["code"], "not_found")

    def test_method_not_allowed(self):
        self.app.route("/only-get", [Pipe(lambda i, c, r: 1, name="one")])
        call = self.client.post("/only-get")
        self.assertEqual(call.status, 405)
        self.assertEqual(call.json()["error"]["code"], "method_not_allowed")

    def test_methods(self):
        self.app.route("/both", [Pipe(lambda i, c, r: i.method, name="m")], methods=("GET", "POST"))
        self.assertEqual(self.client.get("/both").json(), "GET")
        self.assertEqual(self.client.post("/both").json(), "POST")

    def test_plain_klein_route_beside_chains(self):
        """
        Plain Klein handlers are served next to chain routes.
        """
        self.app.route("/chain", [Pipe(lambda i, c, r: "chain", name="c")])

        @self.app.klein_route("/plain")
        def plain(request):
            return b"plain klein"

        self.assertEqual(self.client.get("/plain").body, b"plain klein")
        self.assertEqual(self.client.get("/chain").json(), "chain")
        missing = self.client.get("/neither")
        self.assertEqual(missing.status, 404)
        self.assertEqual(missing.json()["error"]["code"], "not_found")

    def test_chain_served_through_klein_resource(self):
        """
        A chain route also works when served by the wrapped Klein app.
        """
        from treq.testing import StubTreq

        self.app.route("/k/<name>", [Pipe(lambda i, c, r: i.path_params["name"], name="n")])
        stub = StubTreq(self.app.mount_in_klein().resource())
        response = self.successResultOf(stub.get("http://x/k/abc"))
        self.assertEqual(self.successResultOf(response.json()), "abc")

    def test_responder_choice(self):
        self.app.route("/p", [Parallel([Pipe(lambda i, c, r: 1, name="b")])])
        self.assertEqual(self.client.get("/p").header("content-type"), "application/json")
        self.assertEqual(self.client.get("/p", headers={"accept": "text/event-stream"})
                         .header("content-type"), "text/event-stream")
        self.assertEqual(self.client.get("/p", headers={"accept": "text/html, application/x-ndjson;q=0.9"})
                         .header("content-type"), "application/x-ndjson")
        self.assertEqual(self.client.get("/p?transport=ndjson").header("content-type"),
                         "application/x-ndjson")

    def test_unknown_responder(self):
        with self.assertRaises(ValueError):
            self.app.route("/x", [Pipe(lambda i, c, r: 1, name="one")], responders=("telepathy",))

    def test_status_endpoint(self):
        self.app.runtime.status_sources["thing"] = lambda: {"n": 3}
        self.assertEqual(self.client.get("/_pipecomet/status").json(),
                         {"app": "pipecomet", "thing": {"n": 3}})

    def test_thread_pipe_without_pool_fails_check(self):
        self.app.route("/t", [Pipe(lambda i, c, r: 1, name="blocking", run="thread", category="db")])
        with self.assertRaises(ConfigError) as e:
            self.app.check()
        self.assertIn("blocking", str(e.exception))

    def test_body_params(self):
        def both(inp, ctx, res):
            return inp.param("a").addCallback(lambda a: inp.param("b").addCallback(
                lambda b: {"a": a, "b": b}))

        self.app.route("/f", [Pipe(both)], methods=("POST",))
        call = self.client.post("/f?a=q", data={"b": "form"})
        self.assertEqual(call.json(), {"a": "q", "b": "form"})
        missing = self.client.post("/f?a=q", data={"c": "x"})
        self.assertEqual(missing.status, 400)
        self.assertEqual(missing.json()["error"]["code"], "missing_parameter")


class ConfigTests(SynchronousTestCase):
    def write(self, text):
        fd, path = tempfile.mkstemp(suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.addCleanup(os.unlink, path)
        return path

    def test_defaults(self):
        config = load_config(None)
        self.assertEqual(config.server.port, "tcp:8080")
        self.assertIn("demo-key", config.demo.keys)

    def test_values(self):
        config = load_config(self.write('[server]\nport = "tcp:9000"\n[demo.keys.k1]\nrate = 3\n'))
        self.assertEqual(config.server.port, "tcp:9000")
        self.assertEqual(config.demo.keys["k1"].rate, 3.0)

    def test_unknown_section(self):
        with self.assertRaises(ConfigError) as e:
            load_config(self.write("[serverr]\nport = 1\n"))
        self.assertIn("serverr", str(e.exception))

    def test_unknown_key(self):
        with self.assertRaises(ConfigError) as e:
            load_config(self.write('[server]\nprot = "tcp:1"\n'))
        self.assertIn("server.prot", str(e.exception))

    def test_nested_bad_value(self):
        with self.assertRaises(ConfigError) as e:
            load_config(self.write("[demo.keys.k1]\nrate = -1\n"))
        self.assertIn("demo.keys.k1", str(e.exception))
        self.assertIn("rate", str(e.exception))

    def test_wrong_type(self):
        with self.assertRaises(ConfigError) as e:
            load_config(self.write("[server]\nport = 8080\n"))
        self.assertIn("port", str(e.exception))

    def test_bad_toml(self):
        with self.assertRaises(ConfigError) as e:
            load_config(self.write("[server\n"))
        self.assertIn("not valid TOML", str(e.exception))

    def test_access_log(self):
        """
        ``server.access_log``: on by default (standard output), off, or a
        file of its own; written by the buffered access log
        (pipecomet._observe), never by twisted.web's line per request.
        """
        from pipecomet import App
        from pipecomet._app import _no_access_log

        off = App(reactor=make_clock()).configure(
            load_config(self.write('[server]\naccess_log = "off"\n')))
        self.assertIs(off.site().log, _no_access_log)
        self.assertIsNone(off.observer.access)
        path = self.write("")
        to_file = App(reactor=make_clock()).configure(
            load_config(self.write(f'[server]\naccess_log = "{path}"\n')))
        self.assertEqual(to_file.observer.access.writer.path, path)
        self.assertIs(to_file.site().log, _no_access_log)
        default = App(reactor=make_clock()).configure(load_config(None))
        self.assertEqual(default.observer.access.writer.path, "-")

    def test_missing_file(self):
        with self.assertRaises(ConfigError):
            load_config("/nonexistent/pipecomet.toml")


class DemoTests(SynchronousTestCase):
    def setUp(self):
        self.clock = make_clock()
        self.app = make_app(reactor=self.clock)
        self.client = MemoryClient(self.app)

    def test_time(self):
        call = self.client.get("/api/time.get?app_key=demo-key")
        self.assertEqual(call.status, 200)
        self.assertEqual(call.json()["epoch"], self.clock.seconds())

    def test_time_xml(self):
        call = self.client.get("/api/time.get?app_key=demo-key&format=xml&tz=9")
        self.assertEqual(call.header("content-type"), "application/xml; charset=utf-8")
        self.assertIn(b"+09:00</time>", call.body)
        self.assertTrue(call.body.startswith(b"<?xml"))

    def test_app_key_missing_and_unknown(self):
        call = self.client.get("/api/time.get")
        self.assertEqual((call.status, call.json()["error"]["code"]), (401, "missing_app_key"))
        call = self.client.get("/api/time.get?app_key=nope")
        self.assertEqual((call.status, call.json()["error"]["code"]), (403, "invalid_app_key"))

    def test_validation(self):
        for query, param in [("format=yaml", "format"), ("tz=abc", "tz"), ("tz=20", "tz")]:
            call = self.client.get(f"/api/time.get?app_key=demo-key&{query}")
            self.assertEqual(call.status, 400, query)
            self.assertEqual(call.json()["error"]["param"], param)

    def test_unknown_api(self):
        call = self.client.get("/api/nothing.get?app_key=demo-key")
        self.assertEqual((call.status, call.json()["error"]["code"]), (400, "unknown_api"))

    def test_rate_limit(self):
        """
        demo-limited gets 5 requests a second, then 429 with Retry-After;
        a second later it is served again.  demo-key is not limited by that.
        """
        codes = [self.client.get("/api/time.get?app_key=demo-limited").status for _ in range(7)]
        self.assertEqual(codes, [200] * 5 + [429] * 2)
        call = self.client.get("/api/time.get?app_key=demo-limited")
        self.assertEqual(call.header("retry-after"), "1")
        self.assertEqual(call.json()["error"]["code"], "rate_limited")
        self.assertEqual(self.client.get("/api/time.get?app_key=demo-key").status, 200)
        self.clock.advance(1.0)
        self.assertEqual(self.client.get("/api/time.get?app_key=demo-limited").status, 200)

    def test_rate_limit_burst_after_idle_is_the_capacity(self):
        """
        A key idle for an hour gets its configured burst (5), then 429: the
        bucket does not bank the idle hour.
        """
        self.assertEqual(self.client.get("/api/time.get?app_key=demo-limited").status, 200)
        self.clock.advance(3600.0)
        codes = [self.client.get("/api/time.get?app_key=demo-limited").status for _ in range(8)]
        self.assertEqual(codes, [200] * 5 + [429] * 3)

    def test_echo(self):
        call = self.client.post("/api/echo?app_key=demo-key&x=1", data={"y": "2"})
        self.assertEqual(call.json(), {"method": "POST", "query": {"app_key": ["demo-key"], "x": ["1"]},
                                       "form": {"y": ["2"]}})

    def test_search_streams(self):
        call = self.client.get("/api/search?app_key=demo-key&q=cats",
                               headers={"accept": "application/x-ndjson"})
        self.assertEqual([l["name"] for l in call.lines()], ["main"])
        self.client.advance(SEARCH_LATENCIES["news"])
        self.assertEqual([l["name"] for l in call.lines()], ["main", "web", "news"])
        self.assertFalse(call.done)
        self.client.advance(SEARCH_LATENCIES["images"])
        self.assertEqual([l["name"] for l in call.lines()], ["main", "web", "news", "images"])
        self.assertTrue(call.done)

    def test_search_needs_q(self):
        call = self.client.get("/api/search?app_key=demo-key")
        self.assertEqual((call.status, call.json()["error"]["code"]), (400, "missing_parameter"))


class PieceTests(SynchronousTestCase):
    def test_token_bucket(self):
        bucket = TokenBucket(rate=2.0, capacity=2.0, now=0.0)
        self.assertEqual([bucket.take(0.0), bucket.take(0.0)], [0.0, 0.0])
        self.assertAlmostEqual(bucket.take(0.0), 0.5)
        self.assertEqual(bucket.take(0.5), 0.0)

    def test_token_bucket_is_capped_while_idle(self):
        """
        An idle bucket saves up at most ``capacity`` tokens: after an hour
        without calls the burst is ``capacity``, not an hour's worth.
        """
        bucket = TokenBucket(rate=2.0, capacity=3.0, now=0.0)
        grants = [bucket.take(3600.0) for _ in range(5)]
        self.assertEqual(grants[:3], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(grants[3], 0.5)
        self.assertAlmostEqual(grants[4], 0.5)

    def test_to_xml(self):
        self.assertEqual(to_xml({"a": [1, "<b>"], "n": None}),
                         "<response><a><item>1</item><item>&lt;b&gt;</item></a><n></n></response>")


class StartCheckTests(SynchronousTestCase):
    """
    A route that needs a part which is not there fails the start
    (``App.check``, run by ``configure``), naming the route and the pipe.
    """

    def setUp(self):
        from pipecomet import Condition

        self.Condition = Condition
        self.app = App(reactor=make_clock())

    def test_stream_condition_without_comet_hub(self):
        self.app.route("/c/<topic>", [self.Condition("{topic}", mode="many", name="sub")],
                       responders=("sse",))
        with self.assertRaises(ConfigError) as e:
            self.app.check()
        self.assertIn("/c/<topic>", str(e.exception))
        self.assertIn("'sub'", str(e.exception))
        self.assertIn("no comet hub", str(e.exception))

    def test_once_condition_without_event_keeper(self):
        self.app.route("/job", [self.Condition("job", name="wait")])
        with self.assertRaises(ConfigError) as e:
            self.app.check()
        self.assertIn("no event keeper", str(e.exception))

    def test_unknown_quota_category_fails_alike(self):
        self.app.route("/t", [Pipe(lambda i, c, r: 1, name="t", run="thread", category="nope")])
        with self.assertRaises(ConfigError) as e:
            self.app.configure(Config())
        self.assertIn("unknown quota category 'nope'", str(e.exception))

    def test_configured_comet_passes(self):
        self.app.route("/c/<topic>", [self.Condition("{topic}", mode="many", name="sub")],
                       responders=("sse",))
        self.app.route("/job", [self.Condition("job", name="wait")])
        self.app.configure(Config())
        self.assertIsNotNone(self.app.runtime.comet)


class ChainRequestTests(SynchronousTestCase):
    """
    Per-request state is reached by adaptation (``IChainRequest``), as
    Klein's ``IKleinRequest``: pipecomet's request provides it, any other
    twisted.web request is adapted to a buffered one.
    """

    def test_plain_twisted_request_is_adapted(self):
        from twisted.web.server import Request
        from twisted.web.test.requesthelper import DummyChannel

        from pipecomet._chain import BufferedBody
        from pipecomet.interfaces import IChainRequest

        request = Request(DummyChannel())
        state = IChainRequest(request)
        self.assertIsInstance(state.body_source(), BufferedBody)
        self.assertFalse(state.hold_run(object()))

    def test_own_request_provides_it(self):
        from pipecomet._http import Request
        from pipecomet.interfaces import IChainRequest

        self.assertTrue(IChainRequest.implementedBy(Request))


class UnconfiguredAppTests(SynchronousTestCase):
    def test_timed_pipe_without_reactor_or_configure(self):
        """
        An app given no reactor and never configured, served through its
        resource (mounted elsewhere, or by StubTreq), times its pipes on the
        global reactor: the runtime looks it up on first use (it used to be
        None there, and a pipe with a timeout answered 500).
        """
        from treq.testing import StubTreq
        from twisted.internet.defer import succeed

        app = App()
        app.route("/t", [Pipe(lambda i, c, r: succeed("ok"), name="t", timeout=5)])
        stub = StubTreq(app.resource())
        response = self.successResultOf(stub.get("http://example.test/t"))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(stub.json_content(response)), "ok")

    def test_runtime_reactor_can_be_set_after_the_app_is_made(self):
        """
        ``app.runtime.reactor = r`` (as the benchmarks' servers do) gives
        the app that reactor: the first-use lookup only fills a gap.
        """
        from twisted.internet.task import Clock

        app = App()
        clock = Clock()
        app.runtime.reactor = clock
        self.assertIs(app.runtime.reactor, clock)
        self.assertIs(app.reactor, clock)

    def test_context_without_runtime(self):
        """
        A PipeContext made without a runtime (a pipe's own unit test) has an
        empty one: no parts, an empty configuration.
        """
        from pipecomet import PipeContext

        ctx = PipeContext()
        self.assertIsNone(ctx.runtime.quota)
        self.assertIsInstance(ctx.runtime.config, Config)
