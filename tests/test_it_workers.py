"""
Integration tests of the worker pool: real worker processes, real shared
memory under /dev/shm, real HTTP through a server on 127.0.0.1.

Waits are bounded polls of the pool's state or generous timeouts that fail
the test; no test races a sleep against a deadline: calls that must outlast
something wait for a file the test creates (``tests/it_worker_functions``).
How fast a crash is noticed is for bench/, not for a test.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.web.client import HTTPConnectionPool

from pipecomet import App, Config, Parallel, process_pipe
from pipecomet._workers import (
    WorkerCallError, WorkerPool, WorkersConfig, WorkersUnavailable,
)
from pipecomet._workers._ring import OFF_CURRENT_CALL, U64
from tests.support import ROOT, within

MODULE = "tests.it_worker_functions"
SHM = "/dev/shm"
MiB = 1024 * 1024


def _query_float(name: str, default: float) -> Any:
    def payload(inp: Any, ctx: Any, res: Any) -> float:
        return float(inp.query.get(name, default))

    return payload


def _query_str(name: str) -> Any:
    def payload(inp: Any, ctx: Any, res: Any) -> str:
        return inp.query.get(name, "")

    return payload


class Server:
    """
    An app whose routes are process pipes on a pool configured per test.
    """

    def __init__(self, **workers: Any) -> None:
        table = {"module": MODULE, "size": 2, "restart_backoff": 0.05, **workers}
        self.app = App(reactor=reactor, name="workers-it")
        route = self.app.route
        route("/echo", [process_pipe("echo", payload=_query_str("v"))], methods=("POST",))
        route("/sleep", [process_pipe("sleep", payload=_query_float("s", 1.0))], methods=("POST",))
        route("/wait", [process_pipe("wait_for_file", payload=_query_str("path"))],
              methods=("POST",))
        route("/spin", [process_pipe("spin_forever", timeout=1.0)], methods=("POST",))
        route("/fail", [process_pipe("fail", payload=_query_str("m"))], methods=("POST",))
        route("/exit", [process_pipe("exit_now", payload=_query_float("code", 3))], methods=("POST",))
        route("/bomb", [process_pipe("allocate_without_bound", payload=lambda i, c, r: 32)],
              methods=("POST",))
        route("/unpicklable-argument", [process_pipe("echo", payload=lambda i, c, r: threading.Lock())],
              methods=("POST",))
        route("/unpicklable-result", [process_pipe("unpicklable_result")], methods=("POST",))
        route("/branches", [Parallel([
            process_pipe("echo", payload=lambda i, c, r: "left", name="left"),
            process_pipe("cpu_burn", payload=lambda i, c, r: 5, name="right"),
        ])], methods=("POST",), responders=("json",))
        self.app.configure(Config.from_dict({"workers": table}))
        self.pool: WorkerPool = self.app.runtime.workers
        self.http = HTTPConnectionPool(reactor, persistent=False)

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.app.service.startService()
        self.port = reactor.listenTCP(0, self.app.site(), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        yield self.pool.ready().addTimeout(30, reactor)
        return self

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.port.stopListening()
        yield self.app.service.stopService()
        yield self.http.closeCachedConnections()

    def post(self, path: str) -> Any:
        return within(treq.post(self.base + path, pool=self.http), f"POST {path}")

    @defer.inlineCallbacks
    def status(self) -> Any:
        r = yield within(treq.get(self.base + "/_pipecomet/status", pool=self.http), "the status")
        body = yield within(r.json())
        return body["workers"]

    def files(self) -> list[str]:
        prefix = f"pipecomet-w{os.getpid()}-{self.pool._token}-"
        return sorted(n for n in os.listdir(SHM) if n.startswith(prefix))


@defer.inlineCallbacks
def wait_until(predicate: Any, what: str, limit: int = 1000) -> Any:
    """
    Poll ``predicate`` every 20 ms, at most ``limit`` times.
    """
    for _ in range(limit):
        value = predicate()
        if value:
            return value
        yield task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


def running_worker(pool: WorkerPool) -> Any:
    """
    The worker that is inside a call right now, if any.
    """
    for slot in pool.slots:
        w = slot.worker
        if w is not None and w.view is not None and U64.unpack_from(w.view, OFF_CURRENT_CALL)[0]:
            return w
    return None


def ready_pids(pool: WorkerPool) -> list[int]:
    return [s.worker.pid for s in pool.slots if s.worker is not None and s.worker.accepting]


def own_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def caught(d: defer.Deferred) -> defer.Deferred:
    """
    A Deferred of the exception ``d`` fails with (a success fails the test).
    """

    def succeeded(value: Any) -> None:
        raise AssertionError(f"expected a failure, got {value!r}")

    return d.addCallbacks(succeeded, lambda f: f.value)


@defer.inlineCallbacks
def error_of(response: Any) -> Any:
    body = yield within(response.json())
    return body["error"]


@pytest_twisted.inlineCallbacks
def test_kill_9_mid_call_fails_that_call_only_and_the_worker_comes_back() -> Any:
    server = yield Server().start()
    try:
        files_before = server.files()
        assert len(files_before) == 2
        doomed = server.post("/sleep?s=20")
        victim = yield wait_until(lambda: running_worker(server.pool), "a worker inside the call")
        old_pid, old_file = victim.pid, victim.shm.path
        other = server.post("/echo?v=still-here")  # least outstanding: the other worker
        os.kill(old_pid, signal.SIGKILL)
        # The exit is noticed when the process ends, not by a timer: 30 s is
        # only there so that a regression fails this test instead of hanging.
        r = yield doomed.addTimeout(30, reactor)
        assert r.code == 502
        err = yield error_of(r)
        assert err["code"] == "worker_crashed"
        assert "SIGKILL" in err["message"] and "sleep" in err["message"]
        assert set(err) >= {"code", "message", "id"}
        r = yield other
        assert r.code == 200 and (yield within(r.json())) == "still-here"
        # The worker comes back under a new pid and a new file.
        yield wait_until(lambda: len(ready_pids(server.pool)) == 2
                         and old_pid not in ready_pids(server.pool), "the replacement")
        assert not os.path.exists(old_file)
        assert len(server.files()) == 2 and old_file.rsplit("/", 1)[1] not in server.files()
        # No stale reply ever reaches a later call: every answer is its own.
        tokens = [f"t{i}" for i in range(40)]
        answers = yield defer.gatherResults([server.post(f"/echo?v={t}") for t in tokens])
        bodies = yield within(defer.gatherResults([a.json() for a in answers]), "40 bodies")
        assert bodies == tokens
        status = yield server.status()
        assert status["failed"].get("crash") == 1 and status["restarts"] == 1
    finally:
        yield server.stop()
    assert server.files() == []


@pytest_twisted.inlineCallbacks
def test_memory_bomb_kills_the_worker_not_the_server() -> Any:
    server = yield Server(size=1, memory_limit_mb=256).start()
    try:
        pid = ready_pids(server.pool)[0]
        with open(f"/proc/{pid}/oom_score_adj") as f:
            assert f.read().strip() == "1000"
        with open(f"/proc/{pid}/limits") as f:
            limit = [line for line in f if line.startswith("Max address space")][0]
        assert "unlimited" not in limit
        before = own_rss()
        r = yield server.post("/bomb")
        assert r.code == 502
        err = yield error_of(r)
        assert err["code"] == "worker_crashed" and "memory limit" in err["message"]
        assert own_rss() - before < 64 * MiB
        r = yield server.post("/echo?v=after")
        assert r.code == 200 and (yield within(r.json())) == "after"
        assert ready_pids(server.pool) != [pid]
        status = yield server.status()
        assert status["failed"]["memory"] == 1
    finally:
        yield server.stop()
    assert server.files() == []


@pytest_twisted.inlineCallbacks
def test_call_that_never_returns_gets_504_and_its_worker_is_replaced() -> Any:
    server = yield Server(size=1).start()
    try:
        pid = ready_pids(server.pool)[0]
        r = yield server.post("/spin")
        assert r.code == 504
        err = yield error_of(r)
        assert err["code"] == "worker_timeout"
        yield wait_until(lambda: ready_pids(server.pool) and ready_pids(server.pool) != [pid],
                         "the replacement")
        with pytest.raises(OSError):
            os.kill(pid, 0)  # the spinning worker is gone
        r = yield server.post("/echo?v=next")
        assert r.code == 200 and (yield within(r.json())) == "next"
        status = yield server.status()
        assert status["failed"]["timeout"] == 1
    finally:
        yield server.stop()
    assert server.files() == []


@pytest_twisted.inlineCallbacks
def test_queue_full_is_503_and_queue_timeout_is_503(tmp_path: Any) -> Any:
    server = yield Server(size=1, max_in_flight=1, queue=1, queue_timeout=0.5).start()
    gate = tmp_path / "gate"
    try:
        # The first call holds the only worker until the test opens the gate.
        first = server.post(f"/wait?path={gate}")
        yield wait_until(lambda: running_worker(server.pool), "the first call running")
        second = server.post("/sleep?s=0")
        yield wait_until(lambda: len(server.pool._queue) == 1, "the second call queued")
        third = yield server.post("/sleep?s=0")
        assert third.code == 503
        assert third.headers.hasHeader("retry-after")
        assert (yield error_of(third))["code"] == "queue_full"
        # The queued one waits longer than queue_timeout behind the first.
        r = yield second.addTimeout(30, reactor)
        assert r.code == 503 and (yield error_of(r))["code"] == "queue_timeout"
        assert running_worker(server.pool) is not None  # the first call is still in
        gate.write_text("open")
        r = yield first.addTimeout(30, reactor)
        assert r.code == 200
        status = yield server.status()
        assert status["rejected"] == 1 and status["failed"]["queue_timeout"] == 1
    finally:
        gate.write_text("open")
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_unpicklable_argument_and_result_and_unknown_function_are_clear_errors() -> Any:
    server = yield Server(size=1).start()
    try:
        r = yield server.post("/unpicklable-argument")
        assert r.code == 500
        err = yield error_of(r)
        assert err["code"] == "unpicklable_argument"
        assert "lock" in err["message"] and "echo" in err["message"]
        # It fails in the server at once: the Deferred has already failed.
        d = server.pool.call("echo", threading.Lock())
        assert d.called
        f = yield caught(d)
        assert isinstance(f, WorkerCallError)
        assert server.pool.status()["workers"][0]["completed"] == 0
        r = yield server.post("/unpicklable-result")
        assert r.code == 500
        err = yield error_of(r)
        assert err["code"] == "unpicklable_result" and "cannot be pickled" in err["message"]
        f = yield caught(server.pool.call("no_such_function", 1))
        assert f.code == "unknown_function"
        # Pickled fine, but cannot be unpickled: by the worker, by the server.
        from tests.it_worker_functions import Undecodable

        f = yield caught(server.pool.call("echo", Undecodable()).addTimeout(30, reactor))
        assert isinstance(f, WorkerCallError) and (f.code, f.status) == ("undecodable", 500)
        f = yield caught(server.pool.call("undecodable_result").addTimeout(30, reactor))
        assert isinstance(f, WorkerCallError)
        assert (f.code, f.status) == ("undecodable_result", 500)
        r = yield server.post("/echo?v=fine")
        assert r.code == 200
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_exception_is_500_with_an_id_and_the_worker_traceback_is_logged() -> Any:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    server = yield Server(size=1).start()
    try:
        r = yield server.post("/fail?m=bad+input")
        assert r.code == 500
        err = yield error_of(r)
        assert err["code"] == "internal_error" and err["id"]
        assert "bad input" not in json.dumps(err)  # details stay in the log
        logged = [e for e in events if e.get("error_id") == err["id"]]
        assert logged, "no log line carries the error id"
        assert logged[0]["exc_type"] == "ValueError"
        assert logged[0]["exc_message"] == "bad input"
        assert "Traceback" in logged[0]["traceback"] and "worker_functions.py" in logged[0]["traceback"]
        r = yield server.post("/echo?v=ok")  # the worker lives on
        assert r.code == 200
        assert server.pool.status()["restarts"] == 0
    finally:
        globalLogPublisher.removeObserver(events.append)
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_exit_is_502_naming_the_status_and_parallel_branches_run_in_workers() -> Any:
    server = yield Server().start()
    try:
        r = yield server.post("/exit?code=3")
        assert r.code == 502
        err = yield error_of(r)
        assert "exited with status 3" in err["message"]
        yield wait_until(lambda: len(ready_pids(server.pool)) == 2, "the replacement")
        r = yield server.post("/branches")
        assert r.code == 200
        body = yield within(r.json())
        text = json.dumps(body)
        assert "left" in text and "loops" in text
        status = yield server.status()
        assert {"queued", "in_flight", "completed", "failed", "restarts", "rss_bytes",
                "workers"} <= set(status)
        assert {"state", "pid", "in_flight", "completed", "failed", "restarts",
                "rss_bytes", "baseline_rss_bytes"} <= set(status["workers"][0])
        assert status["completed"] >= 2 and status["rss_bytes"] > 0
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_payloads_up_to_256_mib_round_trip() -> Any:
    pool = WorkerPool(WorkersConfig(module=MODULE, size=1, ring_kib=1024), reactor)
    pool.startService()
    try:
        yield pool.ready().addTimeout(30, reactor)
        block = os.urandom(4093)  # a length that lines up with nothing
        for size in (0, 1, 1 * MiB - 7, 5 * MiB + 3, 256 * MiB):
            payload = (block * (size // len(block) + 1))[:size]
            out = yield pool.call("echo", payload)
            assert type(out) is bytes and len(out) == size and out == payload
            del out, payload
        value = {"a": pickle.PickleBuffer(block * 500), "b": bytearray(block), "c": [1, "x"]}
        out = yield pool.call("echo", value)
        assert bytes(out["a"]) == block * 500 and out["b"] == bytearray(block) and out["c"] == [1, "x"]
    finally:
        yield pool.stopService()


@pytest_twisted.inlineCallbacks
def test_graceful_shutdown_drains_running_calls(tmp_path: Any) -> Any:
    """
    Stopping the pool refuses new calls and lets the running ones finish
    (the deadline is far away: nothing is killed).
    """
    gate = tmp_path / "gate"
    pool = WorkerPool(WorkersConfig(module=MODULE, size=2, shutdown_timeout=120.0), reactor)
    pool.startService()
    yield pool.ready().addTimeout(30, reactor)
    running = [pool.call("wait_for_file", str(gate)) for _ in range(2)]
    yield wait_until(lambda: all(s.worker.calls for s in pool.slots), "both calls sent")
    pids = [s.worker.pid for s in pool.slots]
    stopped = pool.stopService()
    late = yield caught(pool.call("echo", 1))
    assert isinstance(late, WorkersUnavailable) and late.code == "pool_closing"
    assert not stopped.called
    gate.write_text("open")
    done = yield defer.gatherResults(running).addTimeout(30, reactor)
    assert sorted(done) == sorted(pids)  # finished in their workers during the drain
    yield stopped.addTimeout(30, reactor)
    prefix = f"pipecomet-w{os.getpid()}-{pool._token}-"
    assert [n for n in os.listdir(SHM) if n.startswith(prefix)] == []


@pytest_twisted.inlineCallbacks
def test_graceful_shutdown_kills_at_the_deadline(tmp_path: Any) -> Any:
    """
    A call still running at ``shutdown_timeout`` is failed and its worker
    killed (the call waits for a file that never comes).
    """
    pool = WorkerPool(WorkersConfig(module=MODULE, size=1, shutdown_timeout=0.5), reactor)
    pool.startService()
    yield pool.ready().addTimeout(30, reactor)
    stuck = pool.call("wait_for_file", str(tmp_path / "never"))
    yield wait_until(lambda: all(s.worker.calls for s in pool.slots), "the call sent")
    pid = pool.slots[0].worker.pid
    stopped = pool.stopService()
    f = yield caught(stuck.addTimeout(30, reactor))
    assert isinstance(f, WorkersUnavailable) and "stopped before" in f.message
    yield stopped.addTimeout(30, reactor)
    yield wait_until(lambda: _gone(pid), "the killed worker gone")
    prefix = f"pipecomet-w{os.getpid()}-{pool._token}-"
    assert [n for n in os.listdir(SHM) if n.startswith(prefix)] == []


@pytest_twisted.inlineCallbacks
def test_breaker_retries_after_the_cooldown(tmp_path: Any, monkeypatch: Any) -> Any:
    """
    A worker that crashes at start opens the breaker; after
    ``crash_loop_cooldown`` the pool tries again, and a repaired worker
    serves calls.
    """
    flag = tmp_path / "repaired"
    monkeypatch.setenv("PIPECOMET_TEST_FLAKY_FLAG", str(flag))
    pool = WorkerPool(WorkersConfig(module="tests.it_worker_flaky", size=1, restart_backoff=0.01,
                                    crash_loop_crashes=2, crash_loop_window=60,
                                    crash_loop_cooldown=1.0), reactor)
    pool.startService()
    try:
        f = yield caught(pool.ready().addTimeout(30, reactor))
        assert isinstance(f, WorkersUnavailable) and "could not load module" in f.message
        assert pool.status()["workers"][0]["state"] == "broken"
        flag.write_text("ok")
        yield wait_until(lambda: ready_pids(pool), "a worker after the cooldown", limit=1500)
        assert (yield pool.call("echo", "back").addTimeout(30, reactor)) == "back"
        assert pool.status()["workers"][0]["state"] == "ready"
    finally:
        yield pool.stopService()


@pytest_twisted.inlineCallbacks
def test_start_timeout_kills_a_worker_that_never_says_hello() -> Any:
    """
    A worker that has not said hello within ``start_timeout`` is killed
    and counted as a crash; with ``crash_loop_crashes = 1`` the breaker
    opens and ``ready()`` fails naming the cause.
    """
    pool = WorkerPool(WorkersConfig(module="tests.it_worker_slow_start", size=1,
                                    start_timeout=0.5, crash_loop_crashes=1,
                                    crash_loop_cooldown=600), reactor)
    pool.startService()
    try:
        pid = pool.slots[0].worker.pid
        f = yield caught(pool.ready().addTimeout(60, reactor))
        assert isinstance(f, WorkersUnavailable) and f.code == "workers_down"
        assert "did not start within 0.5s" in f.message
        assert pool.status()["workers"][0]["state"] == "broken"
        yield wait_until(lambda: _gone(pid), "the slow worker killed")
        f = yield caught(pool.call("echo", 1))
        assert isinstance(f, WorkersUnavailable) and f.code == "workers_down"
    finally:
        yield pool.stopService()


@pytest_twisted.inlineCallbacks
def test_recycle_after_n_calls_and_crash_loop_breaker() -> Any:
    pool = WorkerPool(WorkersConfig(module=MODULE, size=1, recycle_calls=3), reactor)
    pool.startService()
    try:
        yield pool.ready().addTimeout(30, reactor)
        pids = []
        for _ in range(5):
            pids.append((yield pool.call("pid")))
        assert pids[0] == pids[1] == pids[2] and pids[3] != pids[0] and pids[3] == pids[4]
        assert pool.status()["restarts"] == 1 and pool.status()["failed"] == {}
    finally:
        yield pool.stopService()
    broken = WorkerPool(WorkersConfig(module="tests.no_such_module_here", size=1,
                                      restart_backoff=0.01, crash_loop_crashes=2,
                                      crash_loop_window=30), reactor)
    broken.startService()
    try:
        f = yield caught(broken.ready().addTimeout(30, reactor))
        assert isinstance(f, WorkersUnavailable) and "could not load module" in f.message
        assert broken.status()["workers"][0]["state"] == "broken"
        f = yield caught(broken.call("echo", 1))
        assert isinstance(f, WorkersUnavailable) and f.code == "workers_down"
    finally:
        yield broken.stopService()


SERVER_SCRIPT = """
import sys
from twisted.internet import reactor
from pipecomet._workers import WorkerPool, WorkersConfig
pool = WorkerPool(WorkersConfig(module=%r, size=2), reactor)
reactor.addSystemEventTrigger("before", "shutdown", pool.stopService)
def started():
    pool.startService()
    pool.ready().addCallback(lambda _: print("READY", [s.worker.pid for s in pool.slots], flush=True))
reactor.callWhenRunning(started)
reactor.run()
""" % MODULE


def _start_server() -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
    end = time.monotonic() + 30
    line = b""
    while time.monotonic() < end and not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 1024)
            if not chunk:
                break
            line += chunk
    if not line.startswith(b"READY"):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r}")
    return proc, json.loads(line.split(b" ", 1)[1])


def _files_of(pid: int) -> list[str]:
    return [n for n in os.listdir(SHM) if n.startswith(f"pipecomet-w{pid}-")]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie child of the killed server counts as gone once reaped by init.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_no_shm_file_outlives_a_killed_server_once_the_next_one_starts() -> None:
    first, worker_pids = _start_server()
    try:
        assert len(_files_of(first.pid)) == 2
        os.kill(first.pid, signal.SIGKILL)  # no cleanup code runs in the server
        first.wait(10)
        end = time.monotonic() + 10
        while time.monotonic() < end and not all(_gone(p) for p in worker_pids):
            time.sleep(0.05)
        assert all(_gone(p) for p in worker_pids), "workers outlived their server"
    finally:
        if first.poll() is None:
            first.kill()
    second, _ = _start_server()
    try:
        assert _files_of(first.pid) == []  # swept at start
        assert len(_files_of(second.pid)) == 2
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(20)
    assert _files_of(second.pid) == []


@pytest_twisted.inlineCallbacks
def test_demo_gateway_serves_cpu_burn_and_image_resize_from_its_pool() -> Any:
    import io

    from PIL import Image

    from pipecomet.demo import make_app

    app = make_app(reactor=reactor)
    app.service.startService()
    port = reactor.listenTCP(0, app.site(), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    http = HTTPConnectionPool(reactor, persistent=False)
    try:
        yield app.runtime.workers.ready().addTimeout(30, reactor)
        r = yield within(treq.post(base + "/api/cpu.burn?app_key=demo-key&ms=5", pool=http))
        assert r.code == 200
        burned = (yield within(r.json()))["burned"]
        assert burned["ms"] == 5 and burned["cpu_ms"] >= 5 and burned["pid"] in ready_pids(app.runtime.workers)
        r = yield within(treq.post(base + "/api/cpu.burn?app_key=demo-key&ms=-1", pool=http))
        assert r.code == 400
        picture = io.BytesIO()
        Image.new("RGB", (640, 480), (10, 200, 30)).save(picture, "PNG")
        r = yield within(treq.post(
            base + "/api/image.resize?app_key=demo-key&width=64&height=64&format=jpeg",
            data=picture.getvalue(), headers={"Content-Type": "image/png"}, pool=http))
        assert r.code == 200
        assert r.headers.getRawHeaders("content-type") == ["image/jpeg"]
        assert r.headers.getRawHeaders("x-image-size") == ["64x48"]
        small = Image.open(io.BytesIO((yield within(r.content()))))
        assert (small.format, small.size) == ("JPEG", (64, 48))
        r = yield within(treq.post(base + "/api/image.resize?app_key=demo-key", pool=http))
        assert r.code == 400 and (yield error_of(r))["code"] == "missing_body"
        r = yield within(treq.post(base + "/api/image.resize?app_key=demo-key", data=b"not an image",
                                   headers={"Content-Type": "image/png"}, pool=http))
        assert r.code == 400 and (yield error_of(r))["code"] == "not_an_image"
        r = yield within(treq.get(base + "/_pipecomet/status", pool=http))
        workers = (yield within(r.json()))["workers"]
        assert workers["size"] == 2 and workers["completed"] >= 3
    finally:
        yield port.stopListening()
        yield app.service.stopService()
        yield http.closeCachedConnections()
