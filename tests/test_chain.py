"""
Unit tests of the chain runner: order, context, skips, early answers,
Deferred and coroutine pipes, errors, parallel branches, cancellation.
In memory, on a fake clock; they run under trial and pytest.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from pipecomet import (
    Answer,
    App,
    BadRequest,
    Chain,
    Parallel,
    Pipe,
    SkipRest,
    pipe,
)
from pipecomet.testing import MemoryClient, make_clock


def sleep(clock, seconds, value):
    d = Deferred(lambda d: call.cancel())
    call = clock.callLater(seconds, d.callback, value)
    return d


class ChainTests(SynchronousTestCase):
    def setUp(self):
        self.clock = make_clock()
        self.app = App(reactor=self.clock)
        self.client = MemoryClient(self.app)
        self.ran: list[str] = []

    def step(self, name, value=None, **kw):
        def f(inp, ctx, res):
            self.ran.append(name)
            return name if value is None else value(inp, ctx, res)

        return Pipe(f, name=name, **kw)

    def test_order_and_results(self):
        """
        Pipes run in order; each sees the results before it; the last
        result is the response.
        """
        self.app.route("/t", [
            self.step("a"),
            self.step("b", lambda i, c, r: r["a"] + "+b"),
            self.step("c", lambda i, c, r: {"seen": dict(r), "last": r.last}),
        ])
        call = self.client.get("/t")
        self.assertEqual(self.ran, ["a", "b", "c"])
        self.assertEqual(call.status, 200)
        self.assertEqual(call.json(), {"seen": {"a": "a", "b": "a+b"}, "last": "a+b"})

    def test_context_is_per_request(self):
        """
        Context data set by one pipe is seen by later pipes of the same
        request, never by another request.
        """
        def first(inp, ctx, res):
            self.assertNotIn("user", ctx)
            ctx["user"] = inp.query["u"]

        def second(inp, ctx, res):
            return ctx["user"]

        self.app.route("/t", [pipe(first), pipe(second)])
        self.assertEqual(self.client.get("/t?u=ann").json(), "ann")
        self.assertEqual(self.client.get("/t?u=bob").json(), "bob")

    def test_skip_condition(self):
        """
        A pipe whose condition on earlier results holds does not run.
        """
        self.app.route("/t", [
            self.step("a", lambda i, c, r: i.query.get("cached")),
            self.step("backend", skip_if=lambda r, c: r["a"] is not None),
            self.step("out", lambda i, c, r: r.get("backend", r["a"])),
        ])
        self.assertEqual(self.client.get("/t?cached=hit").json(), "hit")
        self.assertEqual(self.ran, ["a", "out"])
        self.ran.clear()
        self.assertEqual(self.client.get("/t").json(), "backend")
        self.assertEqual(self.ran, ["a", "backend", "out"])

    def test_early_answer(self):
        """
        Answer ends the chain with its own status, headers and body.
        """
        self.app.route("/t", [
            self.step("a", lambda i, c, r: Answer(b"early", status=202, headers={"X-Why": "test"},
                                                  content_type="text/plain")),
            self.step("never"),
        ])
        call = self.client.get("/t")
        self.assertEqual((call.status, call.body), (202, b"early"))
        self.assertEqual(call.header("x-why"), "test")
        self.assertEqual(call.header("content-type"), "text/plain")
        self.assertEqual(self.ran, ["a"])

    def test_skip_rest(self):
        """
        SkipRest ends the chain; its value is the response.
        """
        self.app.route("/t", [self.step("a", lambda i, c, r: SkipRest({"short": True})),
                              self.step("never")])
        self.assertEqual(self.client.get("/t").json(), {"short": True})
        self.assertEqual(self.ran, ["a"])

    def test_deferred_pipe(self):
        """
        A pipe returning a Deferred holds the chain until it fires.
        """
        self.app.route("/t", [
            self.step("wait", lambda i, c, r: sleep(self.clock, 1.0, "slow")),
            self.step("after", lambda i, c, r: r["wait"] + "!"),
        ])
        call = self.client.get("/t")
        self.assertFalse(call.started)
        self.assertEqual(self.ran, ["wait"])
        self.client.advance(1.0)
        self.assertEqual(call.json(), "slow!")
        self.assertEqual(self.ran, ["wait", "after"])

    def test_coroutine_pipe(self):
        """
        An ``async def`` pipe is awaited like a Deferred.
        """
        async def fetch(inp, ctx, res):
            value = await sleep(self.clock, 0.5, 21)
            return value * 2

        self.app.route("/t", [Pipe(fetch)])
        call = self.client.get("/t")
        self.client.advance(0.5)
        self.assertEqual(call.json(), 42)

    def test_deferred_answer(self):
        """
        A Deferred may fire with an Answer, which ends the chain.
        """
        self.app.route("/t", [
            self.step("a", lambda i, c, r: sleep(self.clock, 0.1, Answer("done", status=201))),
            self.step("never"),
        ])
        call = self.client.get("/t")
        self.client.advance(0.1)
        self.assertEqual((call.status, call.body), (201, b"done"))
        self.assertEqual(self.ran, ["a"])

    def test_pipe_timeout(self):
        """
        An inline Deferred past the pipe's timeout gives 504 and is cancelled.
        """
        cancelled = []
        self.app.route("/t", [
            self.step("slow", lambda i, c, r: Deferred(cancelled.append), timeout=2.0),
            self.step("never"),
        ])
        call = self.client.get("/t")
        self.client.advance(2.0)
        self.assertEqual(call.status, 504)
        self.assertEqual(call.json()["error"]["code"], "timeout")
        self.assertEqual(len(cancelled), 1)
        self.assertEqual(self.ran, ["slow"])

    def test_pipecomet_error(self):
        """
        A raised PipecometError gives its status and the JSON error shape.
        """
        def check(inp, ctx, res):
            raise BadRequest("n must be a number", code="invalid_parameter", details={"param": "n"})

        self.app.route("/t", [pipe(check), self.step("never")])
        call = self.client.get("/t")
        self.assertEqual(call.status, 400)
        error = call.json()["error"]
        self.assertEqual(error["code"], "invalid_parameter")
        self.assertEqual(error["message"], "n must be a number")
        self.assertEqual(error["param"], "n")
        self.assertTrue(error["id"])
        self.assertEqual(self.ran, [])

    def test_unexpected_error(self):
        """
        Any other exception gives 500 with an id and no details; the log
        has the traceback under the same id.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def broken(inp, ctx, res):
            raise KeyError("secret-internal-detail")

        self.app.route("/t", [pipe(broken)])
        call = self.client.get("/t")
        self.assertEqual(call.status, 500)
        self.assertNotIn(b"secret-internal-detail", call.body)
        self.assertNotIn(b"Traceback", call.body)
        error_id = call.json()["error"]["id"]
        logged = [e for e in events if e.get("error_id") == error_id]
        self.assertEqual(len(logged), 1)
        self.assertIn("secret-internal-detail", str(logged[0]["log_failure"].value))
        self.flushLoggedErrors(KeyError)

    def test_failed_deferred(self):
        """
        A Deferred that fails with a PipecometError maps like a raise.
        """
        def later(inp, ctx, res):
            d = Deferred()
            self.clock.callLater(0.2, d.errback, BadRequest("late", code="late"))
            return d

        self.app.route("/t", [pipe(later)])
        call = self.client.get("/t")
        self.client.advance(0.2)
        self.assertEqual((call.status, call.json()["error"]["code"]), (400, "late"))

    def test_chain_declared_once(self):
        """
        A chain is compiled once and shared; duplicate names are refused.
        """
        chain = Chain([self.step("a"), self.step("b")])
        self.app.route("/one", chain)
        self.app.route("/two", chain)
        self.assertEqual(self.client.get("/one").json(), "b")
        self.assertEqual(self.client.get("/two").json(), "b")
        with self.assertRaises(ValueError):
            Chain([self.step("a"), self.step("a")])

    def test_disconnect_cancels(self):
        """
        A client that goes away cancels the pending Deferred, and no later
        pipe runs.
        """
        cancelled = []
        self.app.route("/t", [
            self.step("wait", lambda i, c, r: Deferred(cancelled.append)),
            self.step("later"),
        ])
        call = self.client.get("/t")
        self.assertEqual(self.ran, ["wait"])
        self.client.disconnect(call)
        self.assertEqual(len(cancelled), 1)
        self.client.advance(10)
        self.assertEqual(self.ran, ["wait"])


class ParallelTests(SynchronousTestCase):
    def setUp(self):
        self.clock = make_clock()
        self.app = App(reactor=self.clock)
        self.client = MemoryClient(self.app)

    def branch(self, name, delay, value=None, error=None):
        def f(inp, ctx, res):
            if error is not None:
                d = Deferred()
                self.clock.callLater(delay, d.errback, error)
                return d
            return sleep(self.clock, delay, value if value is not None else name)

        return Pipe(f, name=name)

    def route(self, timeout=None, branches=None):
        branches = branches or [self.branch("fast", 0.1), self.branch("mid", 0.5),
                                self.branch("slow", 2.0)]
        self.app.route("/p", [
            Pipe(lambda i, c, r: "q", name="query"),
            Parallel(branches, timeout=timeout),
            Pipe(lambda i, c, r: {"main": r["query"]}, name="summary"),
        ])

    def test_stream_in_a_branch_is_refused(self):
        """
        A branch cannot stream: a Stream its pipe returns is cancelled and
        the branch ends with a 500 ``internal_error`` record; the rest of
        the response goes on.
        """
        from pipecomet._chain import Stream

        class Held(Stream):
            cancelled = 0

            def cancel(self):
                Held.cancelled += 1

            def when_done(self):
                return Deferred()

            def serve(self, sink):
                raise AssertionError("a branch's stream was served")

        self.route(branches=[Pipe(lambda i, c, r: Held(), name="held"), self.branch("fast", 0.1)])
        call = self.client.get("/p")
        self.client.advance(0.1)
        self.assertTrue(call.done)
        body = call.json()
        self.assertEqual(body["results"], {"main": {"main": "q"}, "fast": "fast"})
        self.assertEqual(body["errors"]["held"]["code"], "internal_error")
        self.assertEqual(Held.cancelled, 1)

    def test_partial_results_stream(self):
        """
        NDJSON: each result is written as it completes; the response ends
        after the last branch.
        """
        self.route()
        call = self.client.get("/p", headers={"accept": "application/x-ndjson"})
        self.assertEqual(call.status, 200)
        self.assertEqual(call.header("content-type"), "application/x-ndjson")
        self.assertEqual([l["name"] for l in call.lines()], ["main"])
        self.client.advance(0.1)
        self.assertEqual([l["name"] for l in call.lines()], ["main", "fast"])
        self.assertFalse(call.done)
        self.client.advance(0.4)
        self.assertEqual([l["name"] for l in call.lines()], ["main", "fast", "mid"])
        self.assertFalse(call.done)
        self.client.advance(1.5)
        self.assertEqual(call.lines()[-1], {"name": "slow", "result": "slow"})
        self.assertTrue(call.done)
        self.assertEqual(call.lines()[0], {"name": "main", "result": {"main": "q"}})

    def test_sse(self):
        """
        SSE carries the same records as events.
        """
        self.route()
        call = self.client.get("/p?transport=sse")
        self.client.advance(3)
        self.assertEqual(call.header("content-type"), "text/event-stream")
        self.assertEqual(call.header("cache-control"), "no-cache")
        events = call.events()
        self.assertEqual([e["event"] for e in events], ["result"] * 4)
        self.assertIn('"name":"slow"', events[-1]["data"])

    def test_json_collects(self):
        """
        The JSON responder sends everything at once when the last is in.
        """
        self.route()
        call = self.client.get("/p")
        self.client.advance(1.0)
        self.assertFalse(call.started)
        self.client.advance(1.0)
        self.assertEqual(call.json(), {
            "results": {"main": {"main": "q"}, "fast": "fast", "mid": "mid", "slow": "slow"},
            "errors": {},
        })

    def test_branch_error_record(self):
        """
        A failing branch yields an error record; the others go on.
        """
        self.route(branches=[self.branch("ok", 0.1),
                             self.branch("bad", 0.2, error=BadRequest("no", code="bad_branch")),
                             self.branch("late", 0.3)])
        call = self.client.get("/p", headers={"accept": "application/x-ndjson"})
        self.client.advance(1)
        lines = {l["name"]: l for l in call.lines()}
        self.assertEqual(lines["bad"]["error"]["code"], "bad_branch")
        self.assertEqual(lines["late"]["result"], "late")
        self.assertTrue(call.done)

    def test_branch_timeout(self):
        """
        A branch past the per-branch timeout is cancelled and reported with
        code ``timeout``; faster branches are unaffected.
        """
        cancelled = []

        def hang(inp, ctx, res):
            return Deferred(cancelled.append)

        self.route(timeout=1.0, branches=[self.branch("fast", 0.1), Pipe(hang, name="hang")])
        call = self.client.get("/p", headers={"accept": "application/x-ndjson"})
        self.client.advance(0.5)
        self.assertFalse(call.done)
        self.client.advance(0.5)
        lines = {l["name"]: l for l in call.lines()}
        self.assertEqual(lines["fast"]["result"], "fast")
        self.assertEqual(lines["hang"]["error"]["code"], "timeout")
        self.assertEqual(len(cancelled), 1)
        self.assertTrue(call.done)

    def test_main_error_after_fanout(self):
        """
        A main-chain failure after the fan-out is a record; branches still
        report.
        """
        def boom(inp, ctx, res):
            raise BadRequest("main broke", code="main_broke")

        self.app.route("/p", [Parallel([self.branch("b", 0.2)]), Pipe(boom)])
        call = self.client.get("/p", headers={"accept": "application/x-ndjson"})
        self.client.advance(0.2)
        lines = {l["name"]: l for l in call.lines()}
        self.assertEqual(lines["main"]["error"]["code"], "main_broke")
        self.assertEqual(lines["b"]["result"], "b")
        self.assertTrue(call.done)

    def test_error_before_fanout_keeps_status(self):
        """
        An error before anything was streamed is a normal error response.
        """
        def deny(inp, ctx, res):
            raise BadRequest("denied", code="denied")

        self.app.route("/p", [Pipe(deny), Parallel([self.branch("b", 0.2)])])
        call = self.client.get("/p", headers={"accept": "application/x-ndjson"})
        self.assertEqual(call.status, 400)
        self.assertEqual(call.json()["error"]["code"], "denied")

    def test_disconnect_cancels_branches(self):
        """
        A client gone mid-stream cancels every pending branch.
        """
        cancelled = []

        def hang(name):
            return Pipe(lambda i, c, r: Deferred(lambda d: cancelled.append(name)), name=name)

        self.route(branches=[self.branch("fast", 0.1), hang("h1"), hang("h2")])
        call = self.client.get("/p", headers={"accept": "application/x-ndjson"})
        self.client.advance(0.1)
        self.client.disconnect(call)
        self.assertEqual(sorted(cancelled), ["h1", "h2"])

    def test_branch_names_checked(self):
        with self.assertRaises(ValueError):
            Parallel([self.branch("a", 1), self.branch("a", 2)])
        with self.assertRaises(ValueError):
            Parallel([self.branch("main", 1)])

    def test_branch_sub_chain(self):
        """
        A branch may be a chain of several pipes with its own results.
        """
        sub = Chain([Pipe(lambda i, c, r: 2, name="two"),
                     Pipe(lambda i, c, r: r["two"] * r["query"].count("q"), name="times")],
                    name="sub")
        self.route(branches=[sub])
        call = self.client.get("/p", headers={"accept": "application/x-ndjson"})
        self.assertEqual({l["name"]: l["result"] for l in call.lines()},
                         {"main": {"main": "q"}, "sub": 2})


class StandInWorkers:
    """
    ``runtime.workers`` for a unit test: each call waits on a Deferred the
    test fires (the real pool is tested in test_workers_pool and, with
    real processes, in test_it_workers).
    """

    def __init__(self):
        self.calls = []
        self.cancelled = []

    def call(self, function, payload=None, timeout=None):
        d = Deferred(lambda d: self.cancelled.append(function))
        self.calls.append((function, payload, timeout, d))
        return d


class ProcessStageTests(SynchronousTestCase):
    """
    Process pipes in a chain: the payload is computed on the reactor, the
    worker's value is the pipe's result, a worker error is the pipe's
    error, and a disconnect cancels the call.
    """

    def setUp(self):
        self.clock = make_clock()
        self.app = App(reactor=self.clock)
        self.client = MemoryClient(self.app)
        self.workers = StandInWorkers()
        self.app.runtime.workers = self.workers

    def test_result_feeds_the_next_pipe(self):
        from pipecomet import process_pipe

        self.app.route("/t", [
            Pipe(lambda i, c, r: 20, name="n"),
            process_pipe("double", lambda i, c, r: {"n": r["n"]}, timeout=3.0),
            Pipe(lambda i, c, r: {"doubled": r["double"], "last": r.last}, name="out"),
        ])
        call = self.client.get("/t")
        [(function, payload, timeout, d)] = self.workers.calls
        self.assertEqual((function, payload, timeout), ("double", {"n": 20}, 3.0))
        self.assertFalse(call.started)
        d.callback(40)
        self.client.flush()
        self.assertEqual((call.status, call.json()), (200, {"doubled": 40, "last": 40}))

    def test_two_process_pipes_in_a_row(self):
        from pipecomet import process_pipe

        self.app.route("/t", [
            Pipe(lambda i, c, r: 1, name="one"),
            process_pipe("inc", name="first"),
            process_pipe("inc", name="second"),
        ])
        call = self.client.get("/t")
        self.assertEqual([c[1] for c in self.workers.calls], [1])
        self.workers.calls[0][3].callback(2)
        self.client.flush()
        self.assertEqual([c[1] for c in self.workers.calls], [1, 2])
        self.workers.calls[1][3].callback(3)
        self.client.flush()
        self.assertEqual(call.json(), 3)

    def test_skipped_process_pipe_calls_no_worker(self):
        from pipecomet import process_pipe

        self.app.route("/t", [
            Pipe(lambda i, c, r: "x", name="a"),
            process_pipe("never", skip_if=lambda r, c: True),
            Pipe(lambda i, c, r: r.last + "y", name="b"),
        ])
        call = self.client.get("/t")
        self.assertEqual((self.workers.calls, call.json()), ([], "xy"))

    def test_worker_error_is_the_pipes_error(self):
        from pipecomet import process_pipe

        self.app.route("/t", [process_pipe("boom"), Pipe(lambda i, c, r: "never", name="b")])
        call = self.client.get("/t")
        self.workers.calls[0][3].errback(BadRequest("bad payload", code="bad_payload"))
        self.client.flush()
        self.assertEqual(call.status, 400)
        self.assertEqual(call.json()["error"]["code"], "bad_payload")

    def test_disconnect_cancels_the_worker_call(self):
        from pipecomet import process_pipe

        ran = []
        self.app.route("/t", [process_pipe("slow"), Pipe(lambda i, c, r: ran.append(1), name="b")])
        call = self.client.get("/t")
        self.assertEqual(self.workers.cancelled, [])
        self.client.disconnect(call)
        self.assertEqual(self.workers.cancelled, ["slow"])
        self.client.advance(10)
        self.assertEqual(ran, [])

    def test_no_worker_pool_is_an_internal_error(self):
        from pipecomet import process_pipe

        self.app.runtime.workers = None
        self.app.route("/t", [process_pipe("f")])
        call = self.client.get("/t")
        self.assertEqual((call.status, call.json()["error"]["code"]), (500, "internal_error"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class RunEndTests(SynchronousTestCase):
    """
    ``when_done()`` of a run (``route.serve(request)``, as a Klein handler
    mounting a chain uses it) fires once the run has ended, whether it is
    asked before the end or after it, for every way a run ends.
    """

    def setUp(self):
        self.clock = make_clock()
        self.app = App(reactor=self.clock)
        self.client = MemoryClient(self.app)
        self.runs = []

    def serve(self, pipes, headers=None):
        """
        Mount ``pipes`` as a chain served from a plain Klein handler; the
        handler asks ``when_done()`` at once.  Returns (call, run).
        """
        route = self.app.route(f"/chain{len(self.runs)}", pipes)
        path = f"/k{len(self.runs)}"

        @self.app.klein_route(path)
        def handler(request):
            run = route.serve(request)
            self.runs.append(run)
            return run.when_done()

        call = self.client.get(path, headers=headers)
        return call, self.runs[-1]

    def assertEnded(self, run):
        self.assertIsNone(self.successResultOf(run.when_done()))

    def test_ended_at_once(self):
        endings = {
            "result": [Pipe(lambda i, c, r: {"v": 1}, name="a")],
            "answer": [Pipe(lambda i, c, r: Answer({"early": 1}, status=202), name="a"),
                       Pipe(lambda i, c, r: "never", name="b")],
            "skip": [Pipe(lambda i, c, r: SkipRest("s"), name="a"),
                     Pipe(lambda i, c, r: "never", name="b")],
            "error": [Pipe(lambda i, c, r: (_ for _ in ()).throw(BadRequest("no")), name="a")],
        }
        statuses = {}
        for kind, pipes in endings.items():
            call, run = self.serve(pipes)
            self.assertEnded(run)
            statuses[kind] = call.status
        self.assertEqual(statuses, {"result": 200, "answer": 202, "skip": 200, "error": 400})

    def test_ended_later(self):
        for kind, fire in (("result", lambda d: d.callback({"v": 1})),
                           ("answer", lambda d: d.callback(Answer({"a": 1}, status=201))),
                           ("skip", lambda d: d.callback(SkipRest(3))),
                           ("error", lambda d: d.errback(BadRequest("late")))):
            d = Deferred()
            call, run = self.serve([Pipe(lambda i, c, r, d=d: d, name="a"),
                                    Pipe(lambda i, c, r: {"after": r.last}, name="b")])
            self.assertNoResult(run.when_done())
            fire(d)
            self.client.flush()
            self.assertEnded(run)
            self.assertTrue(call.done, kind)

    def test_branches_end_the_run_with_the_last_of_them(self):
        slow, fast = Deferred(), Deferred()
        call, run = self.serve([
            Pipe(lambda i, c, r: "q", name="query"),
            Parallel([Pipe(lambda i, c, r: fast, name="fast"),
                      Pipe(lambda i, c, r: slow, name="slow")]),
            Pipe(lambda i, c, r: "main", name="summary"),
        ], headers={"accept": "application/x-ndjson"})
        self.assertNoResult(run.when_done())
        fast.callback("f")
        self.client.flush()
        self.assertNoResult(run.when_done())
        self.assertEqual([l["name"] for l in call.lines()], ["main", "fast"])
        slow.errback(BadRequest("slow failed"))
        self.client.flush()
        self.assertEnded(run)
        self.assertTrue(call.done)
        self.assertEqual([l["name"] for l in call.lines()], ["main", "fast", "slow"])
        self.assertEqual(call.lines()[-1]["error"]["code"], "bad_request")

    def test_main_error_waits_for_the_branches(self):
        branch, main = Deferred(), Deferred()
        call, run = self.serve([
            Parallel([Pipe(lambda i, c, r: branch, name="b")]),
            Pipe(lambda i, c, r: main, name="m"),
        ], headers={"accept": "application/x-ndjson"})
        main.errback(BadRequest("main failed"))
        self.client.flush()
        self.assertNoResult(run.when_done())
        self.assertEqual([l["name"] for l in call.lines()], ["main"])
        branch.callback("late but kept")
        self.client.flush()
        self.assertEnded(run)
        self.assertEqual(call.lines()[-1], {"name": "b", "result": "late but kept"})

    def test_an_answer_ends_the_run_and_its_branches(self):
        branch, main = Deferred(), Deferred()
        cancelled = []
        branch = Deferred(cancelled.append)
        call, run = self.serve([
            Parallel([Pipe(lambda i, c, r: branch, name="b")]),
            Pipe(lambda i, c, r: main, name="m"),
        ])
        main.callback(Answer({"stop": True}, status=409))
        self.client.flush()
        self.assertEnded(run)
        self.assertEqual((call.status, len(cancelled)), (409, 1))

    def test_a_disconnect_ends_the_run(self):
        cancelled = []
        call, run = self.serve([Pipe(lambda i, c, r: Deferred(cancelled.append), name="a")])
        self.assertNoResult(run.when_done())
        self.client.disconnect(call)
        self.assertEnded(run)
        self.assertEqual(len(cancelled), 1)

    def stream_run(self, ask_at_once):
        from pipecomet import Config
        from pipecomet._events import Condition

        route = self.app.route("/comet/<topic>", [
            Condition(lambda i, c, r: [i.path_params["topic"]], mode="many")],
            responders=("sse",))
        self.app.configure(Config.from_dict({"comet": {"publish_token": "t"}}))
        client = MemoryClient(self.app)

        @self.app.klein_route("/k")
        def handler(request):
            run = route.serve(request, {"topic": "news"})
            self.runs.append(run)
            return run.when_done() if ask_at_once else Deferred()

        call = client.get("/k?timeout=1.0", headers={"accept": "text/event-stream"})
        return client, call, self.runs[-1]

    def test_a_stream_ends_the_run_when_it_ends(self):
        client, call, run = self.stream_run(ask_at_once=True)
        client.advance(0.9)
        self.assertNoResult(run.when_done())
        client.advance(0.2)
        self.assertTrue(call.done)
        self.assertEqual(call.events()[-1]["event"], "reconnect")
        self.assertEnded(run)

    def test_a_stream_nobody_followed_is_over_when_asked_after(self):
        client, call, run = self.stream_run(ask_at_once=False)
        client.advance(1.1)
        self.assertTrue(call.done)
        self.assertEnded(run)


class UnexpectedErrorTests(SynchronousTestCase):
    """
    An unexpected error, raised or from a Deferred, is logged naming the
    pipe, the id the client got and the request's id; a CancelledError the
    client did not cause is such an error, not a silent end.
    """

    def setUp(self):
        self.clock = make_clock()
        self.app = App(reactor=self.clock)
        self.client = MemoryClient(self.app)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, call):
        error_id = call.json()["error"]["id"]
        return [(e["where"], e["request_id"]) for e in self.events
                if e.get("error_id") == error_id]

    def test_raised_and_deferred_errors_name_the_pipe_and_both_ids(self):
        from twisted.internet.defer import fail

        d = Deferred()
        self.app.route("/raise", [Pipe(lambda i, c, r: 1, name="ok"),
                                  Pipe(lambda i, c, r: {}["missing"], name="lookup")])
        self.app.route("/later", [Pipe(lambda i, c, r: d, name="waiter")])
        self.app.route("/failed", [Pipe(lambda i, c, r: fail(ValueError("v")), name="at_once")])
        raised = self.client.get("/raise", headers={"x-request-id": "req-one"})
        later = self.client.get("/later", headers={"x-request-id": "req-two"})
        d.errback(ZeroDivisionError())
        self.client.flush()
        failed = self.client.get("/failed", headers={"x-request-id": "req-three"})
        for call, where, rid in ((raised, "pipe 'lookup'", "req-one"),
                                 (later, "pipe 'waiter'", "req-two"),
                                 (failed, "pipe 'at_once'", "req-three")):
            self.assertEqual((call.status, call.json()["error"]["code"]), (500, "internal_error"))
            self.assertEqual(self.logged(call), [(where, rid)])
        self.flushLoggedErrors(KeyError, ZeroDivisionError, ValueError)

    def test_a_cancelled_error_not_caused_by_the_client_is_a_500(self):
        from twisted.internet.defer import CancelledError, fail

        self.app.route("/t", [Pipe(lambda i, c, r: fail(CancelledError()), name="inner")])
        call = self.client.get("/t", headers={"x-request-id": "req-c"})
        self.assertTrue(call.done)
        self.assertEqual(call.status, 500)
        self.assertEqual(self.logged(call), [("pipe 'inner'", "req-c")])
        self.flushLoggedErrors(CancelledError)

    def test_a_timeout_is_504_naming_the_pipe(self):
        self.app.route("/t", [Pipe(lambda i, c, r: Deferred(), name="slowpoke", timeout=2.0)])
        call = self.client.get("/t")
        self.client.advance(1.9)
        self.assertFalse(call.done)
        self.client.advance(0.1)
        err = call.json()["error"]
        self.assertEqual((call.status, err["code"], err["message"]),
                         (504, "timeout", "pipe 'slowpoke' timed out"))



class SkipContextTests(SynchronousTestCase):
    def test_skip_if_sees_the_context(self):
        app = App(reactor=make_clock())
        client = MemoryClient(app)
        app.route("/t", [
            Pipe(lambda i, c, r: "kept", name="a"),
            Pipe(lambda i, c, r: "skipped?", name="b",
                 skip_if=lambda r, c: c.request_id == "skip-b"),
        ])
        self.assertEqual(client.get("/t", headers={"x-request-id": "skip-b"}).json(), "kept")
        self.assertEqual(client.get("/t", headers={"x-request-id": "other"}).json(), "skipped?")
