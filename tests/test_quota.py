"""
Unit tests of the quota thread pool: the admission rules on a fake clock and
a synchronous stand-in pool, the chain's thread stages through an in-memory
client, configuration errors, and a hypothesis model of the rules.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pipecomet import App, Config, ConfigError, Parallel, Pipe
from pipecomet._quota import (
    CategoryConfig,
    Distribution,
    ExecutionTimeout,
    PoolClosing,
    QueueFull,
    QueueTimeout,
    QuotaConfig,
    QuotaPool,
)
from pipecomet.testing import MemoryClient, SynchronousThreadPool, make_clock
from tests.conftest import examples


def make_pool(size: int, immediate: bool = False, **categories: dict[str, Any]) -> tuple[QuotaPool, SynchronousThreadPool, Any]:
    clock = make_clock()
    tp = SynchronousThreadPool(immediate=immediate)
    config = QuotaConfig(size=size, categories={n: CategoryConfig(**c) for n, c in categories.items()})
    pool = QuotaPool(config, clock, tp)
    pool.startService()
    return pool, tp, clock


class Outcomes:
    """
    Records what each Deferred gave, so a test can ask "ended how, how often".
    """

    def __init__(self) -> None:
        self.by_key: dict[Any, list[Any]] = {}

    def watch(self, key: Any, d: Any) -> Any:
        self.by_key[key] = []

        def record(result: Any) -> None:
            self.by_key[key].append(result)

        d.addBoth(record)
        return d

    def one(self, key: Any) -> Any:
        got = self.by_key[key]
        assert len(got) == 1, f"{key}: {got}"
        return got[0]

    def pending(self, key: Any) -> bool:
        return not self.by_key[key]


def error_of(result: Any) -> Any:
    assert isinstance(result, Failure), result
    return result.value


class ConfigTests(SynchronousTestCase):
    def test_reserves_over_size(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            Config.from_dict({"quota": {"size": 5, "categories": {
                "a": {"reserve": 4}, "b": {"reserve": 2}}}})
        self.assertIn("reserves add up to 6 (a=4, b=2), more than the pool size 5", str(cm.exception))

    def test_limit_over_size(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            Config.from_dict({"quota": {"size": 5, "categories": {"a": {"limit": 6}}}})
        self.assertIn("quota.categories.a.limit: 6 is more than the pool size 5", str(cm.exception))

    def test_reserve_over_limit(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            Config.from_dict({"quota": {"size": 5, "categories": {"a": {"reserve": 3, "limit": 2}}}})
        self.assertIn("quota.categories.a", str(cm.exception))
        self.assertIn("reserve (3) is more than limit (2)", str(cm.exception))

    def test_bad_values_name_the_key(self) -> None:
        cases = [
            ({"categories": {"a": {"queue": -1}}}, "queue"),
            ({"categories": {"a": {"queue": 1.5}}}, "queue: expected a whole number"),
            ({"categories": {"a": {"timeout": "x"}}}, "timeout: expected a number of seconds"),
            ({"categories": {"a": {"nonsense": 1}}}, "quota.categories.a.nonsense: unknown key"),
            ({"size": 0}, "size"),
            ({"categories": {}}, "at least one category"),
        ]
        for table, needle in cases:
            with self.assertRaises(ConfigError) as cm:
                Config.from_dict({"quota": table})
            self.assertIn(needle, str(cm.exception), table)

    def test_fully_reserved_pool_starves_the_rest(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            Config.from_dict({"quota": {"size": 2, "categories": {
                "a": {"reserve": 2}, "b": {}}}})
        self.assertIn("so b (no reserve) could never run", str(cm.exception))

    def test_zero_means_no_limit(self) -> None:
        c = Config.from_dict({"quota": {"categories": {"a": {"timeout": 0, "queue_timeout": 0}}}})
        self.assertIsNone(c.quota.categories["a"].timeout)
        self.assertIsNone(c.quota.categories["a"].queue_timeout)

    def test_unknown_category_on_a_pipe_fails_at_configure(self) -> None:
        app = App(reactor=make_clock())
        app.route("/x", [Pipe(lambda i, c, r: 1, name="blocking", run="thread", category="nope")])
        with self.assertRaises(ConfigError) as cm:
            app.configure(Config.from_dict({"quota": {"categories": {"slow": {}}}}))
        self.assertIn("pipe 'blocking' uses unknown quota category 'nope'", str(cm.exception))

    def test_unknown_category_in_a_branch_fails_at_configure(self) -> None:
        app = App(reactor=make_clock())
        app.route("/x", [Parallel([Pipe(lambda i, c, r: 1, name="b", run="thread", category="nope")])])
        with self.assertRaises(ConfigError):
            app.configure(Config.from_dict({"quota": {"categories": {"slow": {}}}}))

    def test_install(self) -> None:
        app = App(reactor=make_clock())
        app.configure(Config.from_dict({"quota": {"size": 3, "categories": {"s": {"limit": 2}}}}))
        pool = app.runtime.quota
        self.assertIsInstance(pool, QuotaPool)
        self.assertTrue(pool.has_category("s"))
        self.assertFalse(pool.has_category("t"))
        self.assertIn(pool, list(app.service))
        status = app.runtime.status()["quota"]
        self.assertEqual(status["size"], 3)
        self.assertEqual(status["categories"]["s"]["limit"], 2)


class AdmissionTests(SynchronousTestCase):
    def test_limit_then_queue_then_reject(self) -> None:
        pool, tp, clock = make_pool(4, a={"limit": 2, "queue": 1, "retry_after": 3})
        out = Outcomes()
        for i in range(4):
            out.watch(i, pool.run("a", lambda i=i: i))
        self.assertEqual(len(tp.running), 2)
        self.assertTrue(out.pending(2))
        err = error_of(out.one(3))
        self.assertIsInstance(err, QueueFull)
        self.assertEqual((err.status, err.code), (503, "queue_full"))
        self.assertEqual(err.headers["Retry-After"], "3")
        self.assertEqual(err.details, {"category": "a"})
        tp.finish(0)
        self.assertEqual(out.one(0), 0)
        self.assertEqual(len(tp.running), 2)  # job 2 took the freed thread
        tp.finish_all()
        self.assertEqual([out.one(i) for i in (1, 2)], [1, 2])
        s = pool.category_status("a")
        self.assertEqual((s["completed"], s["rejected"], s["submitted"], s["started"]), (3, 1, 4, 3))

    def test_queue_zero_rejects_when_no_thread(self) -> None:
        pool, tp, clock = make_pool(1, a={"queue": 0})
        out = Outcomes()
        out.watch(0, pool.run("a", lambda: 0))
        out.watch(1, pool.run("a", lambda: 1))
        self.assertIsInstance(error_of(out.one(1)), QueueFull)

    def test_queue_timeout(self) -> None:
        pool, tp, clock = make_pool(1, a={"queue_timeout": 2.0})
        out = Outcomes()
        out.watch(0, pool.run("a", lambda: 0))
        out.watch(1, pool.run("a", lambda: 1))
        clock.advance(1.9)
        self.assertTrue(out.pending(1))
        clock.advance(0.2)
        err = error_of(out.one(1))
        self.assertIsInstance(err, QueueTimeout)
        self.assertEqual((err.status, err.code), (503, "queue_timeout"))
        self.assertIn("Retry-After", err.headers)
        s = pool.category_status("a")
        self.assertEqual((s["queued"], s["queue_timeouts"]), (0, 1))
        tp.finish_all()
        self.assertEqual(out.one(0), 0)
        self.assertEqual(tp.running, [])

    def test_execution_timeout_keeps_counting_as_zombie(self) -> None:
        pool, tp, clock = make_pool(1, a={"timeout": 5.0})
        out = Outcomes()
        out.watch(0, pool.run("a", lambda: "late"))
        out.watch(1, pool.run("a", lambda: "next"))
        clock.advance(5.0)
        err = error_of(out.one(0))
        self.assertIsInstance(err, ExecutionTimeout)
        self.assertEqual((err.status, err.code), (504, "execution_timeout"))
        s = pool.category_status("a")
        self.assertEqual((s["zombies"], s["threads"], s["running"], s["queued"]), (1, 1, 0, 1))
        # The zombie still holds the only thread: the waiting job must wait.
        clock.advance(10.0)
        self.assertEqual(len(tp.running), 1)
        self.assertTrue(out.pending(1) or isinstance(error_of(out.one(1)), QueueTimeout))
        tp.finish(0)
        self.assertEqual(len(out.by_key[0]), 1)  # the late result is not delivered again
        s = pool.category_status("a")
        self.assertEqual((s["zombies"], s["zombies_returned"], s["execution_timeouts"]), (0, 1, 1))

    def test_timeout_errors_name_the_category(self) -> None:
        """
        Queue and execution timeouts: 503 / 504 naming the category and the
        limit, each timed-out running job a zombie of its own.
        """
        pool, tp, clock = make_pool(2, a={"limit": 2, "timeout": 1.5, "queue_timeout": 0.5,
                                          "retry_after": 4})
        out = Outcomes()
        for i in range(3):
            out.watch(i, pool.run("a", lambda i=i: i))
        clock.advance(0.5)
        err = error_of(out.one(2))
        self.assertIsInstance(err, QueueTimeout)
        self.assertEqual((err.status, err.details, err.headers["Retry-After"]),
                         (503, {"category": "a"}, "4"))
        self.assertEqual(err.message, "category 'a': no thread within 0.5s")
        clock.advance(1.0)
        for i in (0, 1):
            err = error_of(out.one(i))
            self.assertIsInstance(err, ExecutionTimeout)
            self.assertEqual((err.status, err.details), (504, {"category": "a"}))
            self.assertEqual(err.message, "category 'a': the job ran longer than 1.5s")
        s = pool.category_status("a")
        self.assertEqual((s["zombies"], s["threads"], s["execution_timeouts"],
                          s["queue_timeouts"]), (2, 2, 2, 1))
        tp.finish_all()
        s = pool.category_status("a")
        self.assertEqual((s["zombies"], s["zombies_returned"]), (0, 2))

    def test_zombie_then_waiting_job_starts(self) -> None:
        pool, tp, clock = make_pool(1, a={"timeout": 1.0, "queue_timeout": 100.0})
        out = Outcomes()
        out.watch(0, pool.run("a", lambda: 0))
        out.watch(1, pool.run("a", lambda: 1))
        clock.advance(1.0)
        self.assertEqual(len(tp.running), 1)
        tp.finish(0)  # the zombie's thread returns
        self.assertEqual(len(tp.running), 1)
        tp.finish(0)
        self.assertEqual(out.one(1), 1)

    def test_cancel_waiting_job_leaves_the_queue_at_once(self) -> None:
        pool, tp, clock = make_pool(1, a={})
        out = Outcomes()
        out.watch(0, pool.run("a", lambda: 0))
        d1 = out.watch(1, pool.run("a", lambda: 1))
        out.watch(2, pool.run("a", lambda: 2))
        self.assertEqual(pool.category_status("a")["queued"], 2)
        d1.cancel()
        self.assertIsInstance(error_of(out.one(1)), CancelledError)
        s = pool.category_status("a")
        self.assertEqual((s["queued"], s["cancelled"]), (1, 1))
        tp.finish_all()
        tp.finish_all()
        self.assertEqual((out.one(0), out.one(2)), (0, 2))
        self.assertEqual(pool.category_status("a")["started"], 2)
        # Its queue timer went with it.
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_running_job_is_a_zombie(self) -> None:
        pool, tp, clock = make_pool(1, a={})
        out = Outcomes()
        d = out.watch(0, pool.run("a", lambda: 0))
        d.cancel()
        self.assertIsInstance(error_of(out.one(0)), CancelledError)
        s = pool.category_status("a")
        self.assertEqual((s["zombies"], s["threads"], s["cancelled"]), (1, 1, 1))
        tp.finish(0)
        self.assertEqual(pool.category_status("a")["zombies"], 0)
        self.assertEqual(pool.busy, 0)

    def test_function_error_reaches_caller(self) -> None:
        pool, tp, clock = make_pool(1, immediate=True, a={})
        out = Outcomes()

        def boom() -> None:
            raise ZeroDivisionError()

        out.watch(0, pool.run("a", boom))
        error_of(out.one(0)).__class__ is ZeroDivisionError or self.fail()
        self.assertEqual(pool.category_status("a")["failed"], 1)

    def test_unknown_category_raises(self) -> None:
        pool, tp, clock = make_pool(1, a={})
        self.assertRaises(ValueError, pool.run, "b", lambda: 0)

    def test_reserve_is_kept_for_its_category(self) -> None:
        pool, tp, clock = make_pool(3, a={"reserve": 1}, b={})
        out = Outcomes()
        for i in range(3):
            out.watch(("b", i), pool.run("b", lambda: None))
        # b may use only the 2 threads a has not reserved.
        self.assertEqual(len(tp.running), 2)
        out.watch("a", pool.run("a", lambda: None))
        self.assertEqual(len(tp.running), 3)
        self.assertEqual(pool.free, 0)

    def test_reserved_category_starts_when_pool_looks_full(self) -> None:
        pool, tp, clock = make_pool(2, a={"reserve": 1, "limit": 2}, b={"reserve": 1, "limit": 2})
        out = Outcomes()
        out.watch(0, pool.run("a", lambda: None))
        out.watch(1, pool.run("a", lambda: None))  # a is at its reserve and nothing is free
        self.assertEqual(len(tp.running), 1)
        out.watch(2, pool.run("b", lambda: None))  # b's reserve is untouched
        self.assertEqual(len(tp.running), 2)

    def test_priority_decides_who_gets_a_freed_thread(self) -> None:
        pool, tp, clock = make_pool(1, low={"priority": 0}, high={"priority": 5})
        out = Outcomes()
        out.watch("first", pool.run("low", lambda: "first"))
        out.watch("low", pool.run("low", lambda: "low"))
        out.watch("high", pool.run("high", lambda: "high"))
        tp.finish(0)
        tp.finish(0)
        self.assertEqual(out.one("high"), "high")
        self.assertTrue(out.pending("low"))

    def test_worked_example(self) -> None:
        """
        docs/quota.md: pool 10, A reserve 4 limit 8, B reserve 2 limit 6.
        """
        pool, tp, clock = make_pool(10, A={"reserve": 4, "limit": 8, "queue": 2},
                                    B={"reserve": 2, "limit": 6, "queue": 2, "priority": 1})
        out = Outcomes()
        self.assertEqual((pool.status()["held"], pool.free), (6, 4))
        for i in range(9):
            out.watch(("A", i), pool.run("A", lambda: None))
        # A: 4 on its reserve + the 4 free threads; its 9th job waits at limit 8.
        self.assertEqual(pool.category_status("A")["threads"], 8)
        self.assertEqual(pool.category_status("A")["queued"], 1)
        self.assertEqual(pool.free, 0)
        for i in range(5):
            out.watch(("B", i), pool.run("B", lambda: None))
        # B: its 2 reserved threads at once, 2 wait, the 5th is rejected.
        s = pool.category_status("B")
        self.assertEqual((s["threads"], s["queued"], s["rejected"]), (2, 2, 1))
        self.assertIsInstance(error_of(out.one(("B", 4))), QueueFull)
        # One A job ends: A drops to 7 and frees a thread; B has the higher
        # priority, so B's first waiting job takes it.
        tp.finish(0)
        self.assertEqual(pool.category_status("B")["threads"], 3)
        self.assertEqual(pool.category_status("A")["threads"], 7)
        self.assertEqual(pool.category_status("A")["queued"], 1)
        # One B job ends: B is back at its reserve, one thread is free, and
        # B's last waiting job takes it; A's 9th still waits.
        tp.finish(len(tp.running) - 3)  # running: 7 A jobs, then B1, B2, B3
        s = pool.category_status("B")
        self.assertEqual((s["threads"], s["queued"]), (3, 0))
        self.assertEqual(pool.category_status("A")["queued"], 1)
        # The next A job to end frees a thread nobody else wants: A's 9th runs.
        tp.finish(0)
        s = pool.category_status("A")
        self.assertEqual((s["threads"], s["queued"]), (7, 0))
        self.assertEqual(pool.free, 0)

    def test_statistics(self) -> None:
        pool, tp, clock = make_pool(1, a={})
        pool.run("a", lambda: None)
        pool.run("a", lambda: None)
        clock.advance(0.2)
        tp.finish(0)  # first ran 0.2 s; second waited 0.2 s
        clock.advance(0.003)
        tp.finish(0)
        s = pool.category_status("a")
        self.assertEqual(s["queue_wait"]["count"], 2)
        self.assertAlmostEqual(s["queue_wait"]["p99"], 0.2, places=5)
        self.assertAlmostEqual(s["run_time"]["sum"], 0.203, places=5)
        self.assertEqual(s["run_time"]["buckets"]["0.005"], 1)
        self.assertEqual(s["run_time"]["buckets"]["+Inf"], 2)

    def test_distribution_quantiles(self) -> None:
        d = Distribution()
        self.assertIsNone(d.quantile(0.5))
        for v in [0.001] * 98 + [3.0, 40.0]:
            d.observe(v)
        self.assertEqual(d.quantile(0.5), 0.001)
        self.assertEqual(d.quantile(0.99), 5.0)
        self.assertEqual(d.quantile(1.0), 40.0)

    def test_stop_turns_waiting_and_new_jobs_away(self) -> None:
        pool, tp, clock = make_pool(1, a={})
        out = Outcomes()
        out.watch(0, pool.run("a", lambda: 0))
        out.watch(1, pool.run("a", lambda: 1))
        stopped = pool.stopService()
        err = error_of(out.one(1))
        self.assertIsInstance(err, PoolClosing)
        self.assertEqual((err.status, err.code), (503, "pool_closing"))
        out.watch(2, pool.run("a", lambda: 2))
        self.assertIsInstance(error_of(out.one(2)), PoolClosing)
        done = []
        stopped.addCallback(done.append)
        self.assertFalse(done)
        self.assertTrue(tp.started)
        tp.finish(0)  # the running job ends normally, then the threads stop
        self.assertEqual(out.one(0), 0)
        self.assertEqual(done, [None])
        self.assertFalse(tp.started)

    def test_stop_gives_up_on_hung_threads(self) -> None:
        pool, tp, clock = make_pool(1, a={})
        pool.run("a", lambda: 0).addErrback(lambda f: None)
        done = []
        pool.stopService().addCallback(done.append)
        clock.advance(pool.config.stop_timeout)
        self.assertEqual(done, [None])

    def test_stop_with_a_hung_real_thread_does_not_block(self) -> None:
        """
        A real ThreadPool with a thread that does not return: the stop
        ends after ``stop_timeout`` without joining on the caller's thread
        (public ``ThreadPool.stop()`` joins on a thread of its own), and
        the pool's threads are all gone once the hung one returns.
        """
        import threading

        from twisted.python.threadpool import ThreadPool

        from twisted.internet.interfaces import IReactorThreads
        from zope.interface import implementer

        @implementer(IReactorThreads)
        class Reactor(Clock):
            def __init__(self) -> None:
                super().__init__()
                self.from_threads: list[Any] = []

            def callFromThread(self, f: Any, *args: Any) -> None:
                self.from_threads.append((f, args))

        clock = Reactor()
        tp = ThreadPool(0, 2)
        pool = QuotaPool(QuotaConfig(size=2, categories={"a": CategoryConfig(reserve=0)}),
                         clock, tp)
        pool.startService()
        release = threading.Event()
        entered = threading.Event()

        def hang() -> int:
            entered.set()
            release.wait(30)
            return 1

        pool.run("a", hang).addErrback(lambda f: None)
        self.assertTrue(entered.wait(30))
        done: list[Any] = []
        pool.stopService().addCallback(done.append)
        self.assertEqual(done, [])
        clock.advance(pool.config.stop_timeout)
        self.assertEqual(done, [None])  # no join on this thread
        stopper = [t for t in threading.enumerate() if t.name == "pipecomet-quota-stop"]
        self.assertEqual(len(stopper), 1)
        self.assertTrue(stopper[0].is_alive())  # joining the hung thread
        release.set()
        stopper[0].join(30)
        self.assertFalse(stopper[0].is_alive())
        self.assertFalse([t for t in tp.threads if t.is_alive()])
        self.assertTrue(tp.joined)


class DemoIsolationTests(SynchronousTestCase):
    def test_slow_flood_never_queues_fast_calls(self) -> None:
        """
        The demo's own ``[quota]`` (demo.toml): 120 slow calls that never
        return hold ``slow``'s limit of threads and fill its queue, and fast
        calls still start at once, up to ``fast``'s limit, without one of
        them waiting in a queue.
        """
        from pipecomet import load_config
        from pipecomet.demo import DEMO_CONFIG

        config = load_config(DEMO_CONFIG).quota
        tp = SynchronousThreadPool()
        pool = QuotaPool(config, make_clock(), tp)
        pool.startService()
        slow = [pool.run("slow", lambda: None) for _ in range(120)]
        figures = pool.category_status("slow")
        limit, queue = figures["limit"], figures["queue_limit"]
        self.assertEqual((figures["running"], figures["queued"], figures["rejected"]),
                         (limit, queue, 120 - limit - queue))
        for d in slow[limit + queue:]:
            self.failureResultOf(d, QueueFull)
        fast_limit = pool.category_status("fast")["limit"]
        fast = [pool.run("fast", lambda: None) for _ in range(fast_limit)]
        figures = pool.category_status("fast")
        self.assertEqual((figures["running"], figures["queued"], figures["started"]),
                         (fast_limit, 0, fast_limit))
        self.assertEqual(figures["queue_wait"]["count"], fast_limit)
        self.assertEqual(figures["queue_wait"]["max"], 0)
        self.assertEqual(len(tp.running), limit + fast_limit)
        tp.finish_all()
        for d in fast + slow[: limit + queue]:
            self.successResultOf(d)


class ChainTests(SynchronousTestCase):
    """
    Thread stages of a chain served through an in-memory HTTP client.
    """

    def make(self, routes: Any, quota: dict[str, Any]) -> tuple[App, MemoryClient, SynchronousThreadPool]:
        clock = make_clock()
        app = App(reactor=clock)
        routes(app)
        config = Config.from_dict({"quota": quota})
        app.configure(config)
        tp = SynchronousThreadPool()
        pool = QuotaPool(config.quota, clock, tp)
        pool.startService()
        app.runtime.quota = pool
        app.runtime.status_sources["quota"] = pool.status
        return app, MemoryClient(app, clock), tp

    def test_consecutive_thread_pipes_are_one_job(self) -> None:
        seen = []

        def routes(app: App) -> None:
            app.route("/t", [
                Pipe(lambda i, c, r: seen.append("in1") or 1, name="in1"),
                Pipe(lambda i, c, r: seen.append("t1") or r["in1"] + 1, name="t1", run="thread", category="a"),
                Pipe(lambda i, c, r: seen.append("t2") or r["t1"] * 10, name="t2", run="thread", category="a"),
                Pipe(lambda i, c, r: seen.append("in2") or {"v": r["t2"]}, name="in2"),
            ])

        app, client, tp = self.make(routes, {"size": 2, "categories": {"a": {}}})
        call = client.get("/t")
        self.assertEqual(seen, ["in1"])
        self.assertEqual(len(tp.running), 1)  # t1 and t2: one pool job
        tp.finish(0)
        client.flush()
        self.assertEqual(seen, ["in1", "t1", "t2", "in2"])
        self.assertEqual(call.status, 200)
        self.assertEqual(call.json(), {"v": 20})
        self.assertEqual(app.runtime.quota.category_status("a")["started"], 1)

    def test_rejection_is_503_with_retry_after(self) -> None:
        def routes(app: App) -> None:
            app.route("/t", [Pipe(lambda i, c, r: "ok", name="t", run="thread", category="a")])

        app, client, tp = self.make(routes, {"size": 1, "categories": {"a": {"queue": 0, "retry_after": 2}}})
        first = client.get("/t")
        second = client.get("/t")
        self.assertEqual(second.status, 503)
        self.assertEqual(second.header("Retry-After"), "2")
        self.assertEqual(second.json()["error"]["code"], "queue_full")
        self.assertEqual(second.json()["error"]["category"], "a")
        tp.finish(0)
        client.flush()
        self.assertEqual(first.json(), "ok")

    def test_execution_timeout_is_504(self) -> None:
        def routes(app: App) -> None:
            app.route("/t", [Pipe(lambda i, c, r: "ok", name="t", run="thread", category="a")])

        app, client, tp = self.make(routes, {"size": 1, "categories": {"a": {"timeout": 3}}})
        call = client.get("/t")
        client.advance(3)
        self.assertEqual(call.status, 504)
        self.assertEqual(call.json()["error"]["code"], "execution_timeout")
        status = client.get("/_pipecomet/status")
        self.assertEqual(status.json()["quota"]["categories"]["a"]["zombies"], 1)
        tp.finish(0)
        status = client.get("/_pipecomet/status")
        self.assertEqual(status.json()["quota"]["categories"]["a"]["zombies"], 0)

    def test_disconnect_cancels_the_waiting_job(self) -> None:
        def routes(app: App) -> None:
            app.route("/t", [Pipe(lambda i, c, r: "ok", name="t", run="thread", category="a")])

        app, client, tp = self.make(routes, {"size": 1, "categories": {"a": {}}})
        client.get("/t")
        waiting = client.get("/t")
        self.assertEqual(app.runtime.quota.category_status("a")["queued"], 1)
        client.disconnect(waiting)
        s = app.runtime.quota.category_status("a")
        self.assertEqual((s["queued"], s["cancelled"]), (0, 1))

    def test_parallel_branches_on_the_pool(self) -> None:
        def routes(app: App) -> None:
            app.route("/p", [
                Pipe(lambda i, c, r: "m", name="m"),
                Parallel([
                    Pipe(lambda i, c, r: "x", name="x", run="thread", category="a"),
                    Pipe(lambda i, c, r: "y", name="y", run="thread", category="b"),
                ]),
            ])

        app, client, tp = self.make(routes, {"size": 2, "categories": {"a": {}, "b": {}}})
        call = client.get("/p")
        self.assertEqual(len(tp.running), 2)  # both branches hold a thread at once
        tp.finish_all()
        client.flush()
        self.assertEqual(call.json()["results"], {"main": "m", "x": "x", "y": "y"})


# ---------------------------------------------------------------------------
# The model test


@st.composite
def pool_configs(draw: Any) -> QuotaConfig:
    size = draw(st.integers(1, 8))
    count = draw(st.integers(3, 5))
    left = size
    reserves = []
    for i in range(count):
        reserves.append(draw(st.integers(0, min(left, 3))))
        left -= reserves[-1]
    if left == 0 and 0 in reserves:
        # A category without reserve in a fully reserved pool never runs
        # (a configuration error); give it one thread.
        reserves[reserves.index(max(reserves))] -= 1
    categories = {}
    for i, reserve in enumerate(reserves):
        categories[f"c{i}"] = CategoryConfig(
            reserve=reserve,
            limit=draw(st.integers(max(1, reserve), size)),
            queue=draw(st.integers(0, 4)),
            queue_timeout=draw(st.sampled_from([0, 1.0, 2.5])),
            timeout=draw(st.sampled_from([0, 1.5, 4.0])),
            priority=draw(st.integers(0, 2)),
        )
    return QuotaConfig(size=size, categories=categories)


operations = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 4)),
    st.tuples(st.just("finish"), st.integers(0, 99), st.booleans()),
    st.tuples(st.just("cancel"), st.integers(0, 99)),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 2.0])),
), max_size=80)


class Model:
    """
    Drives a pool and checks the rules against what is observed from the
    outside: which jobs the thread pool was given, which Deferreds fired.
    """

    def __init__(self, config: QuotaConfig) -> None:
        self.config = config
        self.clock = make_clock()
        self.tp = SynchronousThreadPool()
        self.pool = QuotaPool(config, self.clock, self.tp)
        self.pool.startService()
        self.names = list(config.categories)
        self.jobs: list[dict[str, Any]] = []
        self.start_order: dict[str, list[int]] = {n: [] for n in self.names}
        self.started: set[int] = set()

    def limit(self, c: str) -> int:
        limit = self.config.categories[c].limit
        return self.config.size if limit is None else limit

    def work(self, job_id: int) -> int:
        if self.jobs[job_id]["fail"]:
            raise RuntimeError(f"job {job_id} failed")
        return job_id

    def submit(self, c: str) -> None:
        job_id = len(self.jobs)
        waiting_before = self.waiting(c)
        job = {"cat": c, "outcomes": [], "fail": False, "submitted": self.clock.seconds()}
        self.jobs.append(job)
        d = self.pool.run(c, self.work, job_id)
        job["d"] = d
        d.addBoth(job["outcomes"].append)
        self.observe()
        if job["outcomes"] and isinstance(job["outcomes"][0], Failure) and \
                job["outcomes"][0].check(QueueFull):
            assert job_id not in self.started
            assert waiting_before == self.config.categories[c].queue, "rejected with room in the queue"

    def running(self) -> list[int]:
        return [args[0] for _, args, _, _ in self.tp.running]

    def busy(self, c: str) -> int:
        return sum(1 for j in self.running() if self.jobs[j]["cat"] == c)

    def waiting(self, c: str) -> int:
        return sum(1 for i, j in enumerate(self.jobs)
                   if j["cat"] == c and i not in self.started and not j["outcomes"])

    def observe(self) -> None:
        for job_id in self.running():
            if job_id not in self.started:
                self.started.add(job_id)
                self.start_order[self.jobs[job_id]["cat"]].append(job_id)

    def check(self) -> None:
        size = self.config.size
        running = self.running()
        assert len(running) <= size, "more threads than the pool has"
        held = sum(max(self.busy(c), self.config.categories[c].reserve) for c in self.names)
        status = self.pool.status()
        for c in self.names:
            rules = self.config.categories[c]
            busy, waiting = self.busy(c), self.waiting(c)
            assert busy <= self.limit(c), f"{c}: {busy} running over limit {self.limit(c)}"
            assert waiting <= rules.queue, f"{c}: {waiting} waiting over queue {rules.queue}"
            if waiting:
                assert busy >= rules.reserve, f"{c}: waits while below its reserve"
                assert not (busy < self.limit(c) and size - held > 0), \
                    f"{c}: waits while a thread it may use is free"
            order = self.start_order[c]
            assert order == sorted(order), f"{c}: not FIFO: {order}"
            figures = status["categories"][c]
            assert (figures["threads"], figures["queued"]) == (busy, waiting), (c, figures)
        for i, job in enumerate(self.jobs):
            assert len(job["outcomes"]) <= 1, f"job {i} ended {len(job['outcomes'])} times"
            if job["outcomes"] and isinstance(job["outcomes"][0], Failure) and \
                    job["outcomes"][0].check(QueueTimeout):
                waited = self.clock.seconds() - job["submitted"]
                assert waited >= self.config.categories[job["cat"]].queue_timeout

    def step(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "submit":
            self.submit(self.names[op[1] % len(self.names)])
        elif kind == "finish":
            if self.tp.running:
                index = op[1] % len(self.tp.running)
                self.jobs[self.running()[index]]["fail"] = op[2]
                self.tp.finish(index)
        elif kind == "cancel":
            if self.jobs:
                self.jobs[op[1] % len(self.jobs)]["d"].cancel()
        else:
            self.clock.advance(op[1])
        self.observe()
        self.check()

    def drain(self) -> None:
        for _ in range(1_000):
            if not self.tp.running and not any(self.waiting(c) for c in self.names):
                break
            if self.tp.running:
                self.tp.finish(0)
            else:
                self.clock.advance(1.0)
            self.observe()
            self.check()
        assert self.pool.busy == 0
        for i, job in enumerate(self.jobs):
            assert len(job["outcomes"]) == 1, f"job {i} ended {len(job['outcomes'])} times"
        status = self.pool.status()
        assert status["held"] == sum(c.reserve for c in self.config.categories.values())
        ended = ("completed", "failed", "rejected", "queue_timeouts", "execution_timeouts",
                 "cancelled", "closed")
        for c in self.names:
            figures = status["categories"][c]
            assert figures["zombies"] == 0
            assert sum(figures[k] for k in ended) == figures["submitted"], figures


class ModelTests(SynchronousTestCase):
    @settings(max_examples=examples("quota"))
    @given(config=pool_configs(), ops=operations)
    def test_rules_hold_for_any_sequence(self, config: QuotaConfig, ops: list[tuple[Any, ...]]) -> None:
        model = Model(config)
        for op in ops:
            model.step(op)
        model.drain()

    def test_model_catches_a_broken_rule(self) -> None:
        """
        The model is not vacuous: a pool that ignores reserves fails it.
        """
        config = QuotaConfig(size=2, categories={
            "c0": CategoryConfig(reserve=1, limit=2), "c1": CategoryConfig(), "c2": CategoryConfig()})
        model = Model(config)
        model.pool._may_start = lambda cat: cat.busy < cat.limit and model.pool._busy < 2  # type: ignore[method-assign]
        model.step(("submit", 1))
        model.step(("submit", 1))  # takes the thread c0 has reserved
        with self.assertRaises(AssertionError) as cm:
            model.step(("submit", 0))
        self.assertIn("c0: waits while below its reserve", str(cm.exception))


class AnswerTests(SynchronousTestCase):
    """
    What the caller and the operator are told: the refusals' messages,
    details and Retry-After, and the warning for a zombie that failed.
    """

    def test_queue_full_names_the_category(self) -> None:
        pool, tp, clock = make_pool(1, b={"queue": 0, "retry_after": 7})
        out = Outcomes()
        out.watch(0, pool.run("b", lambda: 0))
        out.watch(1, pool.run("b", lambda: 1))
        err = error_of(out.one(1))
        self.assertEqual((err.code, err.message, err.details, err.headers["Retry-After"]),
                         ("queue_full", "category 'b' is busy and its queue is full",
                          {"category": "b"}, "7"))

    def test_a_stopping_pool_refuses_with_the_category_and_its_retry_after(self) -> None:
        pool, tp, clock = make_pool(2, a={"retry_after": 5}, b={})
        out = Outcomes()
        out.watch(0, pool.run("a", lambda: 0))
        pool.stopService()
        out.watch(1, pool.run("a", lambda: 1))
        out.watch(2, pool.run("b", lambda: 2))
        for key, cat, retry in ((1, "a", "5"), (2, "b", str(int(pool.config.retry_after)))):
            err = error_of(out.one(key))
            self.assertEqual((err.code, err.status, err.message, err.details),
                             ("pool_closing", 503, "the thread pool is stopping",
                              {"category": cat}))
            self.assertEqual(err.headers["Retry-After"], retry)
        self.assertEqual([pool.category_status(c)["closed"] for c in "ab"], [1, 1])
        self.assertEqual([pool.category_status(c)["submitted"] for c in "ab"], [2, 1])
        tp.finish_all()
        self.assertEqual(out.one(0), 0)

    def test_a_zombie_that_fails_is_a_warning_naming_its_category(self) -> None:
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        pool, tp, clock = make_pool(2, slowcat={"timeout": 1.0})
        out = Outcomes()

        def boom() -> None:
            raise KeyError("the thing")

        out.watch(0, pool.run("slowcat", boom))
        out.watch(1, pool.run("slowcat", lambda: "fine"))
        clock.advance(1.0)
        self.assertIsInstance(error_of(out.one(0)), ExecutionTimeout)
        tp.finish_all()  # both zombies return: one failed, one did not
        mine = [(e["log_level"].name, formatEvent(e)) for e in events
                if e.get("log_namespace") == "pipecomet._quota"]
        self.assertEqual(mine, [
            ("warn", "quota category slowcat: a job whose caller was already answered failed: "
                     "'the thing'")])
        s = pool.category_status("slowcat")
        self.assertEqual((s["zombies"], s["zombies_returned"], s["failed"], s["completed"]),
                         (0, 2, 0, 0))


class WakeTests(SynchronousTestCase):
    def test_a_thread_freed_inside_a_wake_pass_is_not_lost(self) -> None:
        """
        A job's caller, answered while the pool hands out threads, frees a
        thread of a category the pass has already looked at: the pass goes
        round again and that category's waiting job starts.
        """
        pool, tp, clock = make_pool(2, a={"limit": 1, "priority": 1}, b={})
        out = Outcomes()
        out.watch("a0", pool.run("a", lambda: "a0"))
        out.watch("a1", pool.run("a", lambda: "a1"))  # waits: a's limit
        out.watch("b0", pool.run("b", lambda: "b0"))
        b1 = out.watch("b1", pool.run("b", lambda: "b1"))  # waits: no thread
        self.assertEqual((pool.category_status("a")["queued"],
                          pool.category_status("b")["queued"]), (1, 1))
        # From now on a job returns the moment it starts; b1's caller then
        # lets a0 return (a's thread freed while the pass is at b).
        b1.addCallback(lambda _: tp.finish(0))
        tp.immediate = True
        tp.finish(1)  # b0 returns: the pass starts b1, which returns at once
        self.assertEqual([out.one(k) for k in ("a0", "a1", "b0", "b1")],
                         ["a0", "a1", "b0", "b1"])
        self.assertEqual((pool.busy, tp.running), (0, []))
