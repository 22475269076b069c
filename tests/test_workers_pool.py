"""
Unit tests of the worker pool's bookkeeping on a fake clock: the pool's
processes are fake transports, and the test plays the worker through the
real shared-memory rings (a temporary directory, not /dev/shm).  The same
behaviour is shown with real processes in ``test_it_workers.py``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pipecomet._workers import (
    WorkerCrashed, WorkerFunctionError, WorkerPool, WorkersConfig, WorkersUnavailable,
    WorkerTimeout,
)
from pipecomet._workers._codec import decode, encode
from pipecomet._workers._exits import EXIT_OUT_OF_MEMORY
from pipecomet._workers._pool import WorkerState
from pipecomet._workers._ring import (
    KIND_ERROR, KIND_HELLO, KIND_RESULT, KIND_STOP, OFF_BASELINE_RSS,
    OFF_CURRENT_CALL, OFF_RSS, U64,
    OutgoingMessage, RingConsumer, RingProducer,
)
from pipecomet._workers._shm import SharedFile


class FakeProcess:
    def __init__(self, pid: int, args: list[str], bell_fd: int) -> None:
        self.pid = pid
        self.args = args
        #: The child's copy of its stdin: the read end of the doorbell pipe.
        self.bell_fd = bell_fd
        self.signals: list[str] = []

    def bells(self) -> bytes:
        """
        The doorbell bytes the pool wrote so far (not yet read).
        """
        out = b""
        while True:
            try:
                chunk = os.read(self.bell_fd, 4096)
            except BlockingIOError:
                return out
            if not chunk:
                return out
            out += chunk

    def signalProcess(self, sig: str) -> None:
        self.signals.append(sig)


class FakeReactor(Clock):
    """
    A clock that "spawns" processes by connecting fake transports.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, FakeProcess]] = []
        self._pid = 1000
        self.fds: list[int] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: Any = None,
                     childFDs: Any = None, **kw: Any) -> FakeProcess:
        self._pid += 1
        # What a fork would do: the child holds its own copy of the fd the
        # pool passes as its stdin (the pool closes its copy after spawning).
        child_stdin = os.dup(childFDs[0])
        os.set_blocking(child_stdin, False)
        self.fds.append(child_stdin)
        transport = FakeProcess(self._pid, args, child_stdin)
        proto.makeConnection(transport)
        self.spawned.append((proto, transport))
        return transport


class PlayedWorker:
    """
    The test's side of one worker: its rings, opened from the file the pool
    made.
    """

    def __init__(self, proto: Any, transport: FakeProcess) -> None:
        self.proto = proto
        self.transport = transport
        path = transport.args[transport.args.index("--shm") + 1]
        self.shm, self.epoch, _, _ = SharedFile.open(path)
        self.requests = RingConsumer(*self.shm.layout.request_ring(self.shm.view))
        self.responses = RingProducer(*self.shm.layout.response_ring(self.shm.view))

    def send(self, kind: int, call_id: int, value: Any, epoch: int | None = None) -> None:
        chunks, n = encode(value)
        msg = OutgoingMessage(kind, call_id, self.epoch if epoch is None else epoch, chunks, n)
        assert self.responses.try_write(msg)
        self.proto.childDataReceived(1, b"\x01")

    def hello(self, functions: tuple[str, ...] = ("echo", "slow")) -> None:
        self.send(KIND_HELLO, 0, {"pid": self.transport.pid, "functions": list(functions),
                                  "baseline_rss": 0})

    def calls(self) -> list[tuple[int, str, Any]]:
        out = []
        while True:
            msg = self.requests.next_message()
            if msg is None:
                return out
            kind, call_id, _, segments = msg
            if kind == KIND_STOP:
                out.append((0, "STOP", None))
            else:
                name, value = decode(segments)
                out.append((call_id, name, value))
            self.requests.release()

    def running(self, call_id: int) -> None:
        U64.pack_into(self.shm.view, OFF_CURRENT_CALL, call_id)

    def dies(self, reason: Exception) -> None:
        self.requests.close()
        self.responses.close()
        self.proto.processExited(Failure(reason))


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pipecomet-pool-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.reactor = FakeReactor()
        self.addCleanup(lambda: [os.close(fd) for fd in self.reactor.fds])

    def pool(self, **kw: Any) -> WorkerPool:
        cfg = {"module": "m", "size": 2, "shm_dir": self.dir, "restart_backoff": 0.5,
               "queue_timeout": 5.0, "call_timeout": 10.0, **kw}
        pool = WorkerPool(WorkersConfig(**cfg), reactor=self.reactor)
        pool.startService()
        return pool

    def worker(self, i: int) -> PlayedWorker:
        return PlayedWorker(*self.reactor.spawned[i])

    def test_ready_after_hello_then_least_outstanding(self) -> None:
        pool = self.pool(max_in_flight=2)
        ready = pool.ready()
        self.assertNoResult(ready)
        a, b = self.worker(0), self.worker(1)
        a.hello()
        self.assertEqual(a.proto.state, WorkerState.READY)
        self.assertNoResult(ready)
        b.hello()
        self.assertIs(self.successResultOf(ready), pool)
        ds = [pool.call("echo", i) for i in range(5)]
        got_a, got_b = a.calls(), b.calls()
        self.assertEqual(([c[2] for c in got_a], [c[2] for c in got_b]), ([0, 2], [1, 3]))
        self.assertEqual(pool.status()["queued"], 1)  # both at max_in_flight
        a.send(KIND_RESULT, got_a[0][0], "zero")
        self.assertEqual(self.successResultOf(ds[0]), "zero")
        self.assertEqual([c[2] for c in a.calls()], [4])  # the queued call moved in

    def test_a_call_to_a_parked_worker_rings_its_stdin(self) -> None:
        """
        The doorbell is the pool's own pipe, handed to the child as its
        stdin (``childFDs``): a parked worker gets one byte, written at
        once; a worker that is not parked gets none.
        """
        pool = self.pool(size=1)
        w = self.worker(0)
        w.hello()
        w.transport.bells()
        w.requests.set_consumer_parked(True)
        pool.call("echo", 1)
        self.assertEqual(w.transport.bells(), b"\x01")
        pool.call("echo", 2)  # still busy with the first: no syscall
        self.assertEqual(w.transport.bells(), b"")

    def test_the_doorbell_closes_when_the_worker_dies(self) -> None:
        self.pool(size=1)
        w = self.worker(0)
        w.hello()
        self.assertGreaterEqual(w.proto.bell_fd, 0)
        w.dies(RuntimeError("gone"))
        self.assertEqual(w.proto.bell_fd, -1)
        os.set_blocking(w.transport.bell_fd, True)
        self.assertEqual(os.read(w.transport.bell_fd, 10), b"")  # EOF: no writer left

    def test_queue_full_and_queue_timeout(self) -> None:
        pool = self.pool(size=1, max_in_flight=1, queue=1)
        self.worker(0).hello()
        running = pool.call("slow", 1)
        waiting = pool.call("slow", 2)
        full = self.failureResultOf(pool.call("slow", 3), WorkersUnavailable)
        self.assertEqual((full.value.code, full.value.status), ("queue_full", 503))
        self.assertIn("Retry-After", full.value.headers)
        self.reactor.advance(5.0)
        self.assertEqual(self.failureResultOf(waiting).value.code, "queue_timeout")
        self.assertNoResult(running)

    def test_timeout_kills_the_worker_and_requeues_what_it_had_not_started(self) -> None:
        pool = self.pool(size=1, max_in_flight=4)
        w = self.worker(0)
        w.hello()
        stuck = pool.call("slow", "stuck", timeout=2.0)
        behind = pool.call("echo", "behind")
        calls = w.calls()
        w.running(calls[0][0])
        self.reactor.advance(1.9)
        self.assertNoResult(stuck)
        self.reactor.advance(0.2)
        self.assertIsInstance(self.failureResultOf(stuck).value, WorkerTimeout)
        self.assertEqual(w.transport.signals, ["KILL"])
        w.dies(ProcessTerminated(signal=9))
        self.assertFalse(os.path.exists(w.shm.path))
        # Replaced at once (a kill of ours is no crash); the untouched call moves over.
        self.assertEqual(len(self.reactor.spawned), 2)
        fresh = self.worker(1)
        fresh.hello()
        [(call_id, name, value)] = fresh.calls()
        self.assertEqual((name, value), ("echo", "behind"))
        fresh.send(KIND_RESULT, call_id, "ok")
        self.assertEqual(self.successResultOf(behind), "ok")

    def test_crash_fails_only_the_running_call_and_restarts_with_backoff(self) -> None:
        pool = self.pool(size=1, max_in_flight=4, crash_loop_crashes=3)
        w = self.worker(0)
        w.hello()
        doomed, spared = pool.call("slow", 1), pool.call("echo", 2)
        calls = w.calls()
        w.running(calls[0][0])
        w.dies(ProcessTerminated(signal=9))
        err = self.failureResultOf(doomed).value
        self.assertIsInstance(err, WorkerCrashed)
        self.assertEqual(err.status, 502)
        self.assertIn("SIGKILL", err.message)
        self.assertNoResult(spared)
        self.assertEqual(len(self.reactor.spawned), 1)  # backoff first
        self.reactor.advance(0.49)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(0.01)
        self.assertEqual(len(self.reactor.spawned), 2)
        # A second crash in a row waits twice as long; the third opens the breaker.
        self.worker(1).dies(ProcessTerminated(exitCode=1))
        self.reactor.advance(0.9)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.worker(2).dies(ProcessTerminated(exitCode=1))
        self.assertEqual(pool.status()["workers"][0]["state"], "broken")
        self.assertEqual(self.failureResultOf(spared).value.code, "workers_down")

    def test_breaker_tries_again_after_the_cooldown(self) -> None:
        """
        An open breaker leaves the slot down for ``crash_loop_cooldown``
        seconds exactly, then starts a worker again, which serves calls.
        """
        pool = self.pool(size=1, crash_loop_crashes=2, crash_loop_window=60.0,
                         crash_loop_cooldown=40.0, restart_backoff=0.5)
        self.worker(0).hello()
        self.worker(0).dies(ProcessTerminated(exitCode=1))
        self.reactor.advance(0.5)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.worker(1).dies(ProcessTerminated(exitCode=1))
        self.assertEqual(pool.status()["workers"][0]["state"], "broken")
        self.assertEqual(self.failureResultOf(pool.call("echo", 0)).value.code, "workers_down")
        self.reactor.advance(39.9)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(pool.status()["workers"][0]["state"], "broken")
        self.reactor.advance(0.1)
        self.assertEqual(len(self.reactor.spawned), 3)
        fresh = self.worker(2)
        fresh.hello()
        self.assertEqual(pool.status()["workers"][0]["state"], "ready")
        d = pool.call("echo", "back")
        [(call_id, _, value)] = fresh.calls()
        fresh.send(KIND_RESULT, call_id, value)
        self.assertEqual(self.successResultOf(d), "back")

    def test_books_after_each_way_a_call_ends(self) -> None:
        """
        The pool's and the slot's figures after a result, a memory-limit
        exit, a crash by signal and a timeout kill: each counted under its
        own kind, the calls not yet started moved to the new worker.
        """
        pool = self.pool(size=1, max_in_flight=4, crash_loop_crashes=10)
        w = self.worker(0)
        w.hello()
        for n in range(2):
            d = pool.call("echo", "ok")
            [(call_id, _, _)] = w.calls()
            self.assertEqual(pool.status()["workers"][0]["state"], "busy")
            w.send(KIND_RESULT, call_id, "ok")
            self.successResultOf(d)
        s = pool.status()
        self.assertEqual((s["completed"], s["in_flight"], s["failed"]), (2, 0, {}))
        self.assertEqual((s["workers"][0]["completed"], s["workers"][0]["calls_this_process"],
                          s["workers"][0]["state"]), (2, 2, "ready"))
        # Memory: the running call fails as "memory", the one behind it moves on.
        running, behind = pool.call("slow", 1), pool.call("echo", 2)
        calls = w.calls()
        w.running(calls[0][0])
        w.dies(ProcessTerminated(exitCode=EXIT_OUT_OF_MEMORY))
        err = self.failureResultOf(running, WorkerCrashed).value
        self.assertIn("memory limit", err.message)
        self.assertIn("'slow'", err.message)
        self.assertNoResult(behind)
        s = pool.status()
        self.assertEqual((s["failed"], s["workers"][0]["failed"]), ({"memory": 1}, {"memory": 1}))
        self.assertEqual((s["restarts"], s["queued"], s["workers"][0]["state"]), (1, 1, "restarting"))
        self.assertIn("memory limit", s["workers"][0]["last_cause"])
        self.assertFalse(os.path.exists(w.shm.path))
        self.reactor.advance(0.5)
        w = self.worker(1)
        w.hello()
        [(call_id, name, value)] = w.calls()
        self.assertEqual((name, value), ("echo", 2))
        w.send(KIND_RESULT, call_id, 2)
        self.assertEqual(self.successResultOf(behind), 2)
        self.assertEqual(pool.status()["workers"][0]["completed"], 3)
        # A signal: "crash".  A result came between: the backoff starts over.
        running = pool.call("slow", 3)
        w.running(w.calls()[0][0])
        w.dies(ProcessTerminated(signal=11))
        self.assertIn("SIGSEGV", self.failureResultOf(running, WorkerCrashed).value.message)
        self.assertEqual(pool.status()["failed"], {"memory": 1, "crash": 1})
        self.reactor.advance(0.5)
        self.assertEqual(len(self.reactor.spawned), 3)
        w = self.worker(2)
        w.hello()
        # A timeout: the call is failed as "timeout" and its worker's death is no crash.
        stuck = pool.call("slow", 4, timeout=2.0)
        w.running(w.calls()[0][0])
        self.reactor.advance(2.0)
        self.failureResultOf(stuck, WorkerTimeout)
        w.dies(ProcessTerminated(signal=9))
        s = pool.status()
        self.assertEqual(s["failed"], {"memory": 1, "crash": 1, "timeout": 1})
        self.assertEqual((s["restarts"], len(self.reactor.spawned)), (3, 4))  # replaced at once
        self.assertIn("timed out", s["workers"][0]["last_cause"])

    def test_queue_deadline_per_call(self) -> None:
        """
        Each queued call gets its own ``queue_timeout``, counted from when
        it was made; a cancelled one leaves the queue at once.
        """
        pool = self.pool(size=1, max_in_flight=1, queue=10, queue_timeout=5.0)
        w = self.worker(0)
        w.hello()
        running = pool.call("slow", 0)
        first = pool.call("echo", 1)
        self.reactor.advance(0.5)
        second, third = pool.call("echo", 2), pool.call("echo", 3)
        self.assertEqual(pool.status()["queued"], 3)
        third.cancel()
        self.failureResultOf(third, CancelledError)
        self.assertEqual(pool.status()["queued"], 2)
        self.reactor.advance(4.4)
        self.assertNoResult(first)
        self.reactor.advance(0.1)
        err = self.failureResultOf(first).value
        self.assertEqual((err.code, err.message), ("queue_timeout", "no worker was free within 5s"))
        self.assertEqual(pool.status()["queued"], 1)
        self.reactor.advance(0.4)
        self.assertNoResult(second)
        self.reactor.advance(0.1)
        self.assertEqual(self.failureResultOf(second).value.code, "queue_timeout")
        s = pool.status()
        self.assertEqual((s["queued"], s["failed"]), (0, {"queue_timeout": 2, "cancelled": 1}))
        [(call_id, _, _)] = w.calls()
        w.send(KIND_RESULT, call_id, 0)
        self.assertEqual(self.successResultOf(running), 0)

    def test_stop_fails_what_is_left_at_the_deadline(self) -> None:
        """
        Stopping: queued calls are turned away at once; at
        ``shutdown_timeout`` the worker is killed and the calls it still
        had (running or only sent) fail with ``pool_closing``.
        """
        pool = self.pool(size=1, max_in_flight=2, shutdown_timeout=3.0)
        w = self.worker(0)
        w.hello()
        running, sent, queued = pool.call("slow", 1), pool.call("echo", 2), pool.call("echo", 3)
        calls = w.calls()
        self.assertEqual(len(calls), 2)
        w.running(calls[0][0])
        stopped = pool.stopService()
        err = self.failureResultOf(queued, WorkersUnavailable).value
        self.assertEqual(err.code, "pool_closing")
        self.reactor.advance(2.9)
        self.assertNoResult(running)
        self.assertEqual(w.transport.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(w.transport.signals, ["KILL"])
        w.dies(ProcessTerminated(signal=9))
        for d in (running, sent):
            err = self.failureResultOf(d, WorkersUnavailable).value
            self.assertEqual((err.code, err.message),
                             ("pool_closing", "the worker pool stopped before the call finished"))
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(sum(pool.status()["failed"].values()), 3)
        self.assertEqual(os.listdir(self.dir), [])

    def test_stale_replies_and_cancelled_calls_are_dropped(self) -> None:
        pool = self.pool(size=1)
        w = self.worker(0)
        w.hello()
        d = pool.call("echo", 1)
        [(call_id, _, _)] = w.calls()
        w.send(KIND_RESULT, call_id, "from an old epoch", epoch=w.epoch + 1)
        self.assertNoResult(d)
        w.send(KIND_RESULT, call_id + 1000, "nobody asked")
        self.assertNoResult(d)
        w.send(KIND_RESULT, call_id, "right")
        self.assertEqual(self.successResultOf(d), "right")
        sent = pool.call("echo", 2)
        sent.cancel()
        self.failureResultOf(sent, CancelledError)
        [(call_id, _, _)] = w.calls()
        w.send(KIND_RESULT, call_id, "too late")  # no error: the result is dropped
        self.assertEqual(pool.status()["failed"]["cancelled"], 1)

    def test_function_error_and_graceful_stop(self) -> None:
        pool = self.pool(size=1, shutdown_timeout=3.0)
        w = self.worker(0)
        w.hello()
        d = pool.call("echo", 1)
        [(call_id, _, _)] = w.calls()
        w.send(KIND_ERROR, call_id, {"type": "ValueError", "message": "no", "traceback": "tb"})
        err = self.failureResultOf(d).value
        self.assertIsInstance(err, WorkerFunctionError)
        self.assertEqual((err.status, err.exc_type, err.remote_traceback), (500, "ValueError", "tb"))
        inflight = pool.call("echo", 2)
        stopped = pool.stopService()
        self.assertEqual(self.failureResultOf(pool.call("echo", 3)).value.code, "pool_closing")
        [(call_id, _, _)] = w.calls()
        self.assertNoResult(stopped)
        w.send(KIND_RESULT, call_id, "drained")
        self.assertEqual(self.successResultOf(inflight), "drained")
        self.assertEqual(w.calls(), [(0, "STOP", None)])
        w.dies(ProcessDone(0))
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(os.listdir(self.dir), [])

    def test_recycle_above_the_rss_ceiling(self) -> None:
        pool = self.pool(size=1, recycle_rss_mb=100)
        w = self.worker(0)
        w.hello()
        U64.pack_into(w.shm.view, OFF_BASELINE_RSS, 50 << 20)
        U64.pack_into(w.shm.view, OFF_RSS, 140 << 20)  # 90 MiB above: stays
        d = pool.call("echo", 1)
        [(call_id, _, _)] = w.calls()
        w.send(KIND_RESULT, call_id, 1)
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(w.proto.state, WorkerState.READY)
        U64.pack_into(w.shm.view, OFF_RSS, 151 << 20)  # 101 MiB above: recycled
        d = pool.call("echo", 2)
        [(call_id, _, _)] = w.calls()
        w.send(KIND_RESULT, call_id, 2)
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual(w.proto.state, WorkerState.STOPPING)
        self.assertEqual(w.calls(), [(0, "STOP", None)])
        queued = pool.call("echo", 3)  # waits for the replacement
        w.dies(ProcessDone(0))
        self.assertEqual(len(self.reactor.spawned), 2)  # at once, no backoff
        fresh = self.worker(1)
        fresh.hello()
        [(call_id, _, value)] = fresh.calls()
        fresh.send(KIND_RESULT, call_id, value)
        self.assertEqual(self.successResultOf(queued), 3)
        self.assertEqual(pool.status()["failed"], {})


class LogLines:
    """
    The pool's log (namespace ``pipecomet.workers``) as (level, text) pairs,
    collected while a test runs: what an operator reads about a crash.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        from twisted.logger import globalLogPublisher

        self.events: list[dict[str, Any]] = []
        observer = self.events.append
        globalLogPublisher.addObserver(observer)
        case.addCleanup(globalLogPublisher.removeObserver, observer)

    def lines(self) -> list[tuple[str, str]]:
        from twisted.logger import formatEvent

        return [(e["log_level"].name, formatEvent(e)) for e in self.events
                if e.get("log_namespace") == "pipecomet.workers"]

    def take(self) -> list[tuple[str, str]]:
        out = self.lines()
        self.events.clear()
        return out


class PoolBookkeepingTests(SynchronousTestCase):
    """
    More of the pool's books: what the log says on each kind of end, the
    crash-loop window's edge, the order of requeued calls, deadlines of
    calls behind others, and which workers take calls.
    """

    setUp = PoolTests.setUp
    pool = PoolTests.pool
    worker = PoolTests.worker

    def test_crash_is_logged_with_the_calls_it_failed_and_requeued(self) -> None:
        pool = self.pool(size=1, max_in_flight=4, crash_loop_crashes=3)
        log = LogLines(self)
        w = self.worker(0)
        w.hello()
        doomed, spared = pool.call("slow", 1), pool.call("echo", 2)
        calls = w.calls()
        w.running(calls[0][0])
        log.take()
        w.dies(ProcessTerminated(signal=9))
        self.failureResultOf(doomed, WorkerCrashed)
        self.assertNoResult(spared)
        cause = (f"worker 0 (pid {w.transport.pid}) was killed by SIGKILL "
                 "(by the kernel's OOM killer if memory ran out)")
        self.assertEqual(pool.status()["workers"][0]["last_cause"], cause)
        self.assertEqual(log.take(), [
            ("warn", f"{cause}; failed calls [{calls[0][0]}], requeued 1 not yet started")])

    def test_planned_stop_is_logged_as_asked(self) -> None:
        pool = self.pool(size=1, recycle_calls=1)
        log = LogLines(self)
        w = self.worker(0)
        w.hello()
        d = pool.call("echo", 1)
        [(call_id, _, _)] = w.calls()
        w.send(KIND_RESULT, call_id, 1)
        self.successResultOf(d)
        log.take()
        w.dies(ProcessDone(0))
        self.assertEqual(log.take(), [
            ("info", f"worker 0 (pid {w.transport.pid}) exited with status 0: "
                     "stopped as asked (recycle)")])
        self.assertEqual((pool.status()["restarts"], len(self.reactor.spawned)), (1, 2))

    def test_breaker_is_logged_as_an_error(self) -> None:
        pool = self.pool(size=1, crash_loop_crashes=2, crash_loop_window=60.0,
                         crash_loop_cooldown=40.0, restart_backoff=0.5)
        log = LogLines(self)
        self.worker(0).hello()
        self.worker(0).dies(ProcessTerminated(exitCode=3))
        self.reactor.advance(0.5)
        log.take()
        self.worker(1).dies(ProcessTerminated(exitCode=4))
        cause = f"worker 0 (pid {self.reactor.spawned[1][1].pid}) exited with status 4"
        self.assertEqual(log.take(), [
            ("warn", f"{cause}; failed calls [], requeued 0 not yet started"),
            ("error", f"worker 0 crashed 2 times within 60.0s (last: {cause}); leaving it "
                      "down for 40.0s")])
        self.assertEqual(pool.status()["workers"][0]["last_cause"], cause)

    def crashes_apart(self, gap: float) -> str:
        pool = self.pool(size=1, crash_loop_crashes=2, crash_loop_window=10.0,
                         crash_loop_cooldown=100.0, restart_backoff=0.5,
                         restart_backoff_max=0.5)
        self.worker(0).hello()
        self.reactor.advance(1.0)
        self.worker(0).dies(ProcessTerminated(exitCode=1))  # t = 1
        self.reactor.advance(0.5)
        self.worker(1).hello()
        self.reactor.advance(gap - 0.5)
        self.worker(1).dies(ProcessTerminated(exitCode=1))  # t = 1 + gap
        return pool.status()["workers"][0]["state"]

    def test_crashes_window_seconds_apart_open_the_breaker(self) -> None:
        self.assertEqual(self.crashes_apart(10.0), "broken")

    def test_crashes_more_than_window_seconds_apart_do_not(self) -> None:
        self.assertEqual(self.crashes_apart(10.25), "restarting")

    def test_backoff_doubles_up_to_its_ceiling(self) -> None:
        pool = self.pool(size=1, crash_loop_crashes=100, restart_backoff=1.0,
                         restart_backoff_max=3.0)
        delays = []
        for n in range(4):
            self.worker(n).dies(ProcessTerminated(exitCode=1))
            waited = 0.0
            while len(self.reactor.spawned) == n + 1:
                self.reactor.advance(0.25)
                waited += 0.25
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 3.0, 3.0])
        self.assertEqual(pool.status()["restarts"], 4)

    def test_ready_fails_only_for_a_slot_that_never_started(self) -> None:
        """
        The breaker of a slot that never said hello fails ``ready()``
        (the workers cannot start); one that had been ready does not.
        """
        pool = self.pool(size=2, crash_loop_crashes=1, crash_loop_cooldown=50.0)
        ready = pool.ready()
        self.worker(0).hello()
        self.worker(0).dies(ProcessTerminated(exitCode=1))
        self.assertNoResult(ready)
        self.assertEqual(pool.status()["workers"][0]["state"], "broken")
        self.worker(1).dies(ProcessTerminated(exitCode=7))
        err = self.failureResultOf(ready, WorkersUnavailable).value
        self.assertEqual(err.code, "workers_down")
        self.assertEqual(err.message, "workers cannot start: worker 1 (pid "
                         f"{self.reactor.spawned[1][1].pid}) exited with status 7")

    def test_calls_queued_when_every_worker_is_down_fail_with_the_cause(self) -> None:
        pool = self.pool(size=1, max_in_flight=1, crash_loop_crashes=2, restart_backoff=1.0)
        w = self.worker(0)
        w.hello()
        running, queued = pool.call("slow", 1), pool.call("echo", 2)
        w.running(w.calls()[0][0])
        w.dies(ProcessTerminated(exitCode=1))
        self.failureResultOf(running, WorkerCrashed)
        self.assertNoResult(queued)  # restarting, not broken: it waits
        self.reactor.advance(1.0)
        self.worker(1).dies(ProcessTerminated(exitCode=2))
        err = self.failureResultOf(queued, WorkersUnavailable).value
        self.assertEqual(err.code, "workers_down")
        self.assertEqual(err.message, "no worker is running (worker 0 (pid "
                         f"{self.reactor.spawned[1][1].pid}) exited with status 2)")
        s = pool.status()
        self.assertEqual((s["failed"], s["queued"]), ({"crash": 1, "unavailable": 1}, 0))
        self.assertEqual(s["workers"][0]["failed"], {"crash": 1})

    def test_one_broken_slot_of_two_is_not_all_down(self) -> None:
        pool = self.pool(size=2, max_in_flight=1, crash_loop_crashes=1,
                         crash_loop_cooldown=50.0, restart_backoff=1.0)
        a, b = self.worker(0), self.worker(1)
        a.hello()
        b.hello()
        a.dies(ProcessTerminated(exitCode=1))  # broken for 50 s
        self.reactor.advance(10.0)
        busy = pool.call("slow", 1)
        [(busy_id, _, _)] = b.calls()
        b.running(busy_id)
        b.dies(ProcessTerminated(exitCode=1))  # broken too, but ...
        self.failureResultOf(busy, WorkerCrashed)
        self.assertEqual(self.failureResultOf(pool.call("echo", 1)).value.code, "workers_down")
        # ... slot 0 comes back after its cooldown: from then on calls wait for it.
        self.reactor.advance(40.0)
        self.assertEqual([s["state"] for s in pool.status()["workers"]], ["starting", "broken"])
        waiting = pool.call("echo", 2)
        self.assertNoResult(waiting)
        self.assertEqual(pool.status()["queued"], 1)
        fresh = self.worker(2)
        fresh.hello()
        [(call_id, _, value)] = fresh.calls()
        fresh.send(KIND_RESULT, call_id, value)
        self.assertEqual(self.successResultOf(waiting), 2)

    def test_requeued_calls_go_first_in_their_order_and_keep_their_queue_deadline(self) -> None:
        pool = self.pool(size=1, max_in_flight=3, queue=10, queue_timeout=5.0,
                         crash_loop_crashes=10, restart_backoff=1.0)
        w = self.worker(0)
        w.hello()
        running = pool.call("slow", "a")
        b, c = pool.call("echo", "b"), pool.call("echo", "c")
        d = pool.call("echo", "d")  # queued: the worker holds three
        self.reactor.advance(0.5)
        e = pool.call("echo", "e")
        calls = w.calls()
        self.assertEqual([x[2] for x in calls], ["a", "b", "c"])
        w.running(calls[0][0])
        w.dies(ProcessTerminated(exitCode=1))
        self.failureResultOf(running, WorkerCrashed)
        self.assertEqual(pool.status()["queued"], 4)
        self.reactor.advance(1.0)
        fresh = self.worker(1)
        fresh.hello()
        sent = fresh.calls()
        self.assertEqual([x[2] for x in sent], ["b", "c", "d"])
        # Nobody answers: each waits its own queue_timeout from when it was made.
        self.reactor.advance(3.5)  # t = 5.0
        self.assertNoResult(e)
        for x in (b, c, d):
            self.assertNoResult(x)  # sent: no longer queued
        self.reactor.advance(0.5)  # t = 5.5
        self.assertEqual(self.failureResultOf(e).value.code, "queue_timeout")

    def test_requeued_calls_time_out_while_the_worker_is_away(self) -> None:
        pool = self.pool(size=1, max_in_flight=2, queue_timeout=5.0,
                         crash_loop_crashes=10, restart_backoff=30.0)
        w = self.worker(0)
        w.hello()
        running, behind = pool.call("slow", 1), pool.call("echo", 2)
        w.running(w.calls()[0][0])
        self.reactor.advance(1.0)
        w.dies(ProcessTerminated(exitCode=1))
        self.failureResultOf(running, WorkerCrashed)
        self.reactor.advance(3.9)
        self.assertNoResult(behind)
        self.reactor.advance(0.1)
        err = self.failureResultOf(behind).value
        self.assertEqual((err.code, err.message), ("queue_timeout", "no worker was free within 5s"))
        self.assertEqual(pool.status()["failed"], {"crash": 1, "queue_timeout": 1})

    def test_the_deadline_of_a_call_behind_another_runs_from_when_it_started(self) -> None:
        """
        A worker runs its calls in order: the second one's timeout counts
        from when the first ended, not from when both were sent.
        """
        pool = self.pool(size=1, max_in_flight=2)
        w = self.worker(0)
        w.hello()
        first, second = pool.call("slow", 1, timeout=10.0), pool.call("slow", 2, timeout=10.0)
        (id1, _, _), (id2, _, _) = w.calls()
        w.running(id1)
        self.reactor.advance(8.0)
        w.send(KIND_RESULT, id1, 1)
        self.assertEqual(self.successResultOf(first), 1)
        w.running(id2)
        self.reactor.advance(9.9)  # t = 17.9: 9.9 s into the second call
        self.assertNoResult(second)
        self.assertEqual(w.transport.signals, [])
        self.reactor.advance(0.1)
        self.failureResultOf(second, WorkerTimeout)
        self.assertEqual(w.transport.signals, ["KILL"])

    def test_a_draining_worker_takes_no_new_call(self) -> None:
        pool = self.pool(size=1, max_in_flight=4, recycle_calls=1)
        w = self.worker(0)
        w.hello()
        first, second = pool.call("echo", 1), pool.call("echo", 2)
        (id1, _, _), (id2, _, _) = w.calls()
        w.send(KIND_RESULT, id1, 1)  # recycle after one call: drains the other
        self.successResultOf(first)
        self.assertEqual(w.proto.state, WorkerState.DRAINING)
        third = pool.call("echo", 3)
        self.assertEqual((w.calls(), pool.status()["queued"]), ([], 1))
        w.send(KIND_RESULT, id2, 2)
        self.assertEqual(self.successResultOf(second), 2)
        self.assertEqual(w.calls(), [(0, "STOP", None)])
        w.dies(ProcessDone(0))
        fresh = self.worker(1)
        fresh.hello()
        [(call_id, _, value)] = fresh.calls()
        fresh.send(KIND_RESULT, call_id, value)
        self.assertEqual(self.successResultOf(third), 3)
        s = pool.status()
        self.assertEqual((s["completed"], s["failed"], s["workers"][0]["completed"]), (3, {}, 3))

    def test_least_loaded_worker_gets_the_call(self) -> None:
        pool = self.pool(size=3, max_in_flight=3)
        ws = [self.worker(i) for i in range(3)]
        for w in ws:
            w.hello()
        ds = [pool.call("echo", i) for i in range(3)]  # one each
        ids = [w.calls()[0][0] for w in ws]
        ws[0].send(KIND_RESULT, ids[0], 0)
        ds.append(pool.call("echo", 3))  # to worker 0, the only idle one
        self.assertEqual([[c[2] for c in w.calls()] for w in ws], [[3], [], []])
        ds.append(pool.call("echo", 4))
        ds.append(pool.call("echo", 5))
        ds.append(pool.call("echo", 6))
        self.assertEqual(sorted(len(w.proto.calls) for w in ws), [2, 2, 2])
        self.assertEqual(pool.status()["queued"], 0)
        for d in ds[1:3]:
            self.assertNoResult(d)

    def test_cancelled_calls_are_counted_each(self) -> None:
        pool = self.pool(size=1, max_in_flight=1, queue=10)
        w = self.worker(0)
        w.hello()
        sent = pool.call("slow", 0)
        queued = [pool.call("echo", i) for i in range(1, 4)]
        sent.cancel()  # sent: the queue is left as it is
        self.assertEqual(pool.status()["queued"], 3)
        queued[1].cancel()
        self.failureResultOf(queued[1], CancelledError)
        self.assertEqual(pool.status()["queued"], 2)
        self.assertEqual(pool.status()["failed"], {"cancelled": 2})
        [(call_id, _, _)] = w.calls()
        w.send(KIND_RESULT, call_id, "late")  # dropped; the next queued call moves in
        self.failureResultOf(sent, CancelledError)
        [(call_id, _, value)] = w.calls()
        self.assertEqual(value, 1)
        w.send(KIND_RESULT, call_id, value)
        self.assertEqual(self.successResultOf(queued[0]), 1)
        self.assertEqual([c[2] for c in w.calls()], [3])

    def test_stop_counts_what_it_failed_by_kind(self) -> None:
        pool = self.pool(size=1, max_in_flight=2, shutdown_timeout=3.0)
        w = self.worker(0)
        w.hello()
        running, sent, queued = pool.call("slow", 1), pool.call("echo", 2), pool.call("echo", 3)
        w.running(w.calls()[0][0])
        stopped = pool.stopService()
        self.reactor.advance(3.0)
        w.dies(ProcessTerminated(signal=9))
        self.assertIsNone(self.successResultOf(stopped))
        for d in (running, sent, queued):
            self.assertEqual(self.failureResultOf(d).value.code, "pool_closing")
        s = pool.status()
        self.assertEqual((s["failed"], s["workers"][0]["failed"]),
                         ({"closing": 1, "crash": 2}, {"crash": 2}))
        self.assertEqual((s["restarts"], s["state"], len(self.reactor.spawned)), (0, "stopped", 1))

    def test_a_requeued_call_can_be_cancelled(self) -> None:
        pool = self.pool(size=1, max_in_flight=3, crash_loop_crashes=10, restart_backoff=1.0)
        w = self.worker(0)
        w.hello()
        running, kept, dropped = pool.call("slow", 1), pool.call("echo", 2), pool.call("echo", 3)
        w.running(w.calls()[0][0])
        w.dies(ProcessTerminated(exitCode=1))
        self.failureResultOf(running, WorkerCrashed)
        self.assertEqual(pool.status()["queued"], 2)
        dropped.cancel()
        self.failureResultOf(dropped, CancelledError)
        self.assertEqual(pool.status()["queued"], 1)
        self.reactor.advance(1.0)
        fresh = self.worker(1)
        fresh.hello()
        [(call_id, _, value)] = fresh.calls()
        fresh.send(KIND_RESULT, call_id, value)
        self.assertEqual(self.successResultOf(kept), 2)
        self.assertEqual(pool.status()["failed"], {"crash": 1, "cancelled": 1})

    def test_calls_behind_a_timed_out_call_fail_when_the_pool_is_stopping(self) -> None:
        """
        A worker killed for a timeout just before the pool stops: the calls
        it had not started are not requeued but turned away.
        """
        pool = self.pool(size=1, max_in_flight=2, shutdown_timeout=5.0)
        w = self.worker(0)
        w.hello()
        stuck, behind = pool.call("slow", 1, timeout=2.0), pool.call("echo", 2)
        w.running(w.calls()[0][0])
        self.reactor.advance(2.0)
        self.failureResultOf(stuck, WorkerTimeout)
        stopped = pool.stopService()
        self.assertNoResult(behind)
        w.dies(ProcessTerminated(signal=9))
        err = self.failureResultOf(behind, WorkersUnavailable).value
        self.assertEqual((err.code, err.message),
                         ("pool_closing", "the worker pool is shutting down"))
        self.assertIsNone(self.successResultOf(stopped))
        s = pool.status()
        self.assertEqual((s["failed"], s["queued"], s["restarts"], len(self.reactor.spawned)),
                         ({"timeout": 1, "closing": 1}, 0, 0, 1))
