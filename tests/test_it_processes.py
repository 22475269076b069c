"""
``twistd pipecomet --processes 2`` for real, with a real Redis: a publish
taken by one serving process reaches subscribers on the other; a client
resumes exactly once on another server instance; a serving process killed
with SIGKILL is restarted while the other serves, and only the streams it
held end (they resume exactly once elsewhere); Redis killed under two
processes fails only what needs the bus; SIGHUP restarts them one
at a time with no failed request; SIGTERM gives held clients the farewell
event; the start fails clearly with the memory bus or without Redis.

These tests are synchronous (subprocesses, sockets and threads, never the
test reactor); every wait has a deadline that fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ._redis import RedisServer
from .support import ROOT, TWISTD, free_port, twistd_server

APP = "tests.scale_app:make_app"
TOKEN = "proc-token"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: Any) -> Any:
    server = RedisServer(tmp_path_factory.mktemp("redis-proc"))
    server.start()
    yield server
    server.stop()


def write_config(directory: Path, url: str, extra: str = "") -> str:
    path = directory / "pipecomet.toml"
    path.write_text(f'[bus]\nkind = "redis"\nurl = "{url}"\n'
                    f'[comet]\npublish_token = "{TOKEN}"\nretry = 0.2\n'
                    f'[server]\ndrain_grace = 0.5\naccess_log = "off"\n{extra}')
    return str(path)


def http(port: int, method: str, path: str, body: bytes = b"",
         headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """
    One request on a new connection (``Connection: close``).
    """
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
            f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    payload = data.split(b"\r\n\r\n", 1)[1]
    if b"transfer-encoding: chunked" in data.split(b"\r\n\r\n", 1)[0].lower():
        out, rest = b"", payload
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        payload = out
    return status, payload


def status(port: int) -> dict[str, Any]:
    code, body = http(port, "GET", "/_pipecomet/status")
    assert code == 200, body
    return json.loads(body)


def wait_for(pred: Any, deadline: float = 30.0, what: str = "condition") -> Any:
    end = time.monotonic() + deadline
    last_error: Any = None
    while time.monotonic() < end:
        try:
            value = pred()
            if value:
                return value
        except (OSError, ValueError, AssertionError) as e:
            last_error = e
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error})")


def wait_replaced(port: int, old_pids: set[int]) -> Any:
    """
    The supervisor's process set once two ready processes serve, none of
    them one of ``old_pids`` (a SIGHUP reload has replaced both).
    """

    def reloaded() -> Any:
        s = status(port)["processes"]
        pids = {c["pid"] for c in s["set"] if c["ready"]}
        return s if len(pids) == 2 and not pids & old_pids else None

    return wait_for(reloaded, 90, "both processes replaced")


def ready_set(port: int, n: int = 2) -> Any:
    def check() -> Any:
        s = status(port)["processes"]
        ready = [c for c in s.get("set", []) if c["ready"] and c["status"]]
        return s if len(ready) == n else None

    return wait_for(check, 60, f"{n} ready serving processes")


def publish(port: int, topic: str, data: Any) -> tuple[int, dict[str, Any]]:
    code, body = http(port, "POST", f"/_pipecomet/publish/{topic}", json.dumps(data).encode(),
                      {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    return code, json.loads(body)


class SSEReader(threading.Thread):
    """
    An SSE client on its own socket, collecting ids, data and events.
    """

    def __init__(self, port: int, path: str, last_event_id: str | None = None) -> None:
        super().__init__(daemon=True)
        self.port, self.path = port, path
        self.last_event_id = last_event_id
        self.messages: list[tuple[str, Any]] = []
        self.events: list[tuple[str, Any]] = []
        self.head = b""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                          f"{extra}\r\n".encode())
        self.closed = False

    def run(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if not self.head and b"\r\n\r\n" in buf:
                    self.head, buf = buf.split(b"\r\n\r\n", 1)
                while b"\n\n" in buf and self.head:
                    block, buf = buf.split(b"\n\n", 1)
                    self._block(block)
        except OSError:
            pass
        self.closed = True

    def _block(self, block: bytes) -> None:
        fields: dict[str, str] = {}
        for line in block.split(b"\n"):
            line = line.strip(b"\r")
            # chunked framing lines (hex sizes) carry no colon-separated field
            if b":" not in line or line.startswith(b":"):
                continue
            k, _, v = line.decode().partition(":")
            fields[k.strip().split("\r")[-1]] = v.strip()
        if "data" not in fields:
            return
        if fields.get("event", "message") == "message":
            self.messages.append((fields.get("id", ""), json.loads(fields["data"])))
        else:
            self.events.append((fields["event"], json.loads(fields["data"])))

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def comet_connections(s: dict[str, Any]) -> dict[int, int]:
    return {c["pid"]: c["status"]["comet"]["connections"] for c in s["processes"]["set"]}


def test_publish_on_one_process_reaches_the_other(tmp_path: Path, redis_server: RedisServer):
    cfg = write_config(tmp_path, redis_server.url)
    with twistd_server(["--app", APP, "--config", cfg, "--processes", "2"]) as (port, proc):
        ready_set(port)
        readers: list[SSEReader] = []
        try:
            # The kernel picks the process: open subscribers until both hold some.
            # 40 subscribers at once: the accept balancer spreads them.
            for _ in range(40):
                r = SSEReader(port, "/comet/x")
                r.start()
                readers.append(r)

            def both_hold() -> Any:
                counts = comet_connections(status(port))
                if sum(counts.values()) != len(readers):
                    return None
                return counts

            counts = wait_for(both_hold, 30, "40 subscribers held")
            # Both hold some (how evenly depends on the machine's load: the
            # balancer counts subscriptions, which trail the accepts).
            print("subscribers per process:", sorted(counts.values()))
            assert min(counts.values()) >= 1, counts
            # Both processes hold subscribers: whichever takes a publish,
            # the subscribers of the other get it through Redis.
            sent = list(range(5))
            for n in sent:
                code, body = publish(port, "x", {"n": n})
                assert code == 200, body
            wait_for(lambda: all(len(r.messages) == len(sent) for r in readers), 30,
                     "every subscriber has every message")
            for r in readers:
                assert [m[1]["n"] for m in r.messages] == sent
            s = status(port)
            assert s["processes"]["answered_by"]["pid"] in comet_connections(s)
        finally:
            for r in readers:
                r.close()


def test_resume_exactly_once_on_another_server_instance(tmp_path: Path,
                                                         redis_server: RedisServer):
    cfg = write_config(tmp_path, redis_server.url)
    with twistd_server(["--app", APP, "--config", cfg]) as (port_a, _), \
            twistd_server(["--app", APP, "--config", cfg]) as (port_b, _):
        wait_for(lambda: status(port_a)["bus"]["connected"] and status(port_b)["bus"]["connected"],
                 30, "both connected to Redis")
        first = SSEReader(port_a, "/comet/resume")
        first.start()
        wait_for(lambda: status(port_a)["comet"]["connections"] == 1, 10, "subscriber")
        for n in range(3):
            assert publish(port_b, "resume", n)[0] == 200
        wait_for(lambda: len(first.messages) == 3, 10, "3 messages")
        first.close()
        cursor = first.messages[-1][0]
        for n in range(3, 6):
            assert publish(port_a, "resume", n)[0] == 200
        again = SSEReader(port_b, "/comet/resume", last_event_id=cursor)
        again.start()
        wait_for(lambda: len(again.messages) == 3, 10, "the 3 missed")
        assert publish(port_a, "resume", 6)[0] == 200
        wait_for(lambda: len(again.messages) == 4, 10, "a live one")
        again.close()
        assert [m[1] for m in first.messages + again.messages] == list(range(7))
        assert not [e for e in again.events if e[0] in ("gap", "reset")]
        assert b"pipecomet-resume: ok" in again.head.lower()


def test_reuseport_mode_spreads_new_connections_and_refuses_none(tmp_path: Path,
                                                                  redis_server: RedisServer):
    cfg = write_config(tmp_path, redis_server.url, 'processes_listen = "reuseport"\n')
    with twistd_server(["--app", APP, "--config", cfg, "--processes", "2"]) as (port, proc):
        s = ready_set(port)
        assert s["listen"] == "reuseport"
        pids = {c["pid"] for c in s["set"]}
        # Each new connection (a new source port) is hashed to one of the
        # two processes' sockets; every one is answered (none is queued on a
        # socket nobody accepts from: the supervisor only holds the port).
        seen = []
        for _ in range(60):
            code, body = http(port, "GET", "/pid", timeout=10)
            assert code == 200, body
            seen.append(json.loads(body)["pid"])
        assert set(seen) == pids, (set(seen), pids)
        # No accept balancer on a socket of one's own.
        assert "accept_paused" not in status(port)["processes"]["answered_by"]


def test_sigkill_restarts_one_while_the_other_serves(tmp_path: Path, redis_server: RedisServer):
    cfg = write_config(tmp_path, redis_server.url)
    with twistd_server(["--app", APP, "--config", cfg, "--processes", "2"]) as (port, proc):
        before = ready_set(port)
        victim = before["set"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        # The other one serves at once: every request answered.
        for _ in range(30):
            code, body = http(port, "GET", "/pid")
            assert code == 200, body
            assert json.loads(body)["pid"] != victim["pid"]

        def restarted() -> Any:
            s = ready_set(port)
            pids = {c["index"]: c["pid"] for c in s["set"]}
            return s if pids[victim["index"]] != victim["pid"] else None

        after = wait_for(restarted, 60, "the killed process restarted")
        assert after["restarts"] == 1 and after["deaths"] == 1
        assert {c["pid"] for c in after["set"]} - {victim["pid"]} >= {before["set"][1]["pid"]}
        assert proc.poll() is None


def test_sigkill_ends_only_the_streams_that_process_held(tmp_path: Path,
                                                        redis_server: RedisServer):
    cfg = write_config(tmp_path, redis_server.url)
    with twistd_server(["--app", APP, "--config", cfg, "--processes", "2"]) as (port, proc):
        ready_set(port)
        readers: list[SSEReader] = []
        try:
            # One at a time, each counted before the next, until both hold
            # some (the accept balancer pauses the fuller one past its share
            # plus 4): at most 60.
            held: dict[int, int] = {}
            while len(readers) < 60 and not (len(readers) >= 10 and min(held.values()) >= 1):
                r = SSEReader(port, "/comet/crash")
                r.start()
                readers.append(r)
                n = len(readers)
                held = wait_for(lambda: (lambda c: c if sum(c.values()) == n else None)(
                    comet_connections(status(port))), 30, f"{n} held")
            assert min(held.values()) >= 1, held
            total = len(readers)
            assert publish(port, "crash", 0)[0] == 200
            wait_for(lambda: all(len(r.messages) == 1 for r in readers), 20, "message 0")
            victim = next(pid for pid in held)
            os.kill(victim, signal.SIGKILL)
            # The victim's streams end; the other process's streams stay.
            wait_for(lambda: sum(r.closed for r in readers) == held[victim], 20,
                     f"{held[victim]} streams of the killed process closed")
            code, body = publish(port, "crash", 1)
            assert code == 200, body
            alive = [r for r in readers if not r.closed]
            assert len(alive) == total - held[victim]
            wait_for(lambda: all(len(r.messages) == 2 for r in alive), 20, "message 1 live")
            # Those that lost their process resume on what serves now: once.
            again = [SSEReader(port, "/comet/crash", last_event_id=r.messages[-1][0])
                     for r in readers if r.closed]
            readers.extend(again)
            for r in again:
                r.start()
            wait_for(lambda: all(len(r.messages) == 1 for r in again), 20, "resumed")
            time.sleep(0.3)  # a duplicate would show now
            for r in alive:
                assert [m[1] for m in r.messages] == [0, 1]
            for r in again:
                assert [m[1] for m in r.messages] == [1]
                assert not [e for e in r.events if e[0] in ("gap", "reset")]
            assert proc.poll() is None
        finally:
            for r in readers:
                r.close()


def test_redis_killed_fails_only_the_bus_calls(tmp_path: Path):
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        cfg = write_config(tmp_path, redis.url)
        with twistd_server(["--app", APP, "--config", cfg, "--processes", "2"]) as (port, _):
            ready_set(port)
            readers = [SSEReader(port, "/comet/redis") for _ in range(10)]
            try:
                for r in readers:
                    r.start()
                wait_for(lambda: sum(comet_connections(status(port)).values()) == 10, 30,
                         "10 held")
                assert publish(port, "redis", 0)[0] == 200
                wait_for(lambda: all(len(r.messages) == 1 for r in readers), 20, "message 0")
                redis.kill()

                def bus_down_everywhere() -> bool:
                    return not any(c["status"]["bus"]["connected"]
                                   for c in status(port)["processes"]["set"])

                wait_for(bus_down_everywhere, 30, "both processes hear Redis gone")
                # What does not need the bus is served as before.
                for _ in range(20):
                    code, body = http(port, "GET", "/hello")
                    assert code == 200, body
                # A publish is answered 503 bus_unavailable with Retry-After.
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(b"POST /_pipecomet/publish/redis HTTP/1.1\r\nHost: x\r\n"
                              b"Connection: close\r\nContent-Type: application/json\r\n"
                              b"Authorization: Bearer " + TOKEN.encode() +
                              b"\r\nContent-Length: 1\r\n\r\n1")
                    raw = b""
                    while chunk := s.recv(65536):
                        raw += chunk
                head, _, body = raw.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 503"), head
                assert b"\r\nretry-after: " in head.lower()
                assert b"bus_unavailable" in body
                # The held subscribers stay connected.
                assert not any(r.closed for r in readers)
                redis.start()
                wait_for(lambda: all(c["status"]["bus"]["connected"]
                                     for c in status(port)["processes"]["set"]), 30,
                         "both reconnected")
                assert publish(port, "redis", 1)[0] == 200
                wait_for(lambda: all(len(r.messages) == 2 for r in readers), 20, "message 1")
                time.sleep(0.3)  # a duplicate would show now
                for r in readers:
                    assert [m[1] for m in r.messages] == [0, 1]
                    # Redis lost the history (no persistence): said once, never silent.
                    assert [e[0] for e in r.events if e[0] in ("gap", "reset")] == ["reset"]
            finally:
                for r in readers:
                    r.close()
    finally:
        redis.stop()


def test_sighup_restarts_one_at_a_time_with_no_failed_request(tmp_path: Path,
                                                               redis_server: RedisServer):
    cfg = write_config(tmp_path, redis_server.url)
    with twistd_server(["--app", APP, "--config", cfg, "--processes", "2"]) as (port, proc):
        before = ready_set(port)
        old_pids = {c["pid"] for c in before["set"]}
        results: list[Any] = []
        stop = threading.Event()

        def load() -> None:
            # A bounded request loop: at most 5,000 requests or until told.
            for _ in range(5000):
                if stop.is_set():
                    return
                try:
                    results.append(http(port, "GET", "/hello")[0])
                except OSError as e:
                    results.append(repr(e))

        workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
        for w in workers:
            w.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGHUP)

        after = wait_replaced(port, old_pids)
        time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join(30)
        assert after["reloads"] == 1 and after["deaths"] == 0
        assert len(results) > 50
        failed = [r for r in results if r != 200]
        assert failed == [], f"{len(failed)} of {len(results)} failed: {failed[:5]}"


class KeepAliveClient(threading.Thread):
    """
    A real HTTP/1.1 client (``http.client``) that sends requests back to
    back on one keep-alive connection, as wrk does, for at most
    ``limit`` requests or until told to stop.  A response that says
    ``Connection: close`` is followed by a new connection (not a
    failure); anything else is counted as a failure: a non-2xx answer, a
    reset, a connection closed without an answer (wrk's read error), a
    timeout.  No request is retried.
    """

    def __init__(self, port: int, stop: threading.Event, limit: int = 20000) -> None:
        super().__init__(daemon=True)
        self.port, self.stop, self.limit = port, stop, limit
        self.ok = 0
        self.reconnects = 0
        self.failures: list[str] = []
        self.pids: set[int] = set()

    def run(self) -> None:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        for _ in range(self.limit):
            if self.stop.is_set():
                break
            try:
                conn.request("GET", "/pid")
                resp = conn.getresponse()
                body = resp.read()
                if 200 <= resp.status < 300:
                    self.ok += 1
                    self.pids.add(json.loads(body)["pid"])
                else:
                    self.failures.append(f"status {resp.status}")
                if resp.will_close:
                    self.reconnects += 1  # http.client opens a new one for the next request
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(repr(e))
                conn.close()
        conn.close()


def test_sighup_under_keep_alive_load_fails_no_request(tmp_path: Path, redis_server: RedisServer):
    """
    The reload as wrk sees it: clients that keep their connections and
    send the next request as soon as the answer is in.  A draining process
    answers what it has with ``Connection: close`` and never closes a
    connection a request may be on its way to: zero failures.
    """
    cfg = write_config(tmp_path, redis_server.url)
    with twistd_server(["--app", APP, "--config", cfg, "--processes", "2"]) as (port, proc):
        before = ready_set(port)
        old_pids = {c["pid"] for c in before["set"]}
        stop = threading.Event()
        clients = [KeepAliveClient(port, stop) for _ in range(8)]
        for c in clients:
            c.start()
        wait_for(lambda: all(c.ok for c in clients), 30, "every client answered")
        proc.send_signal(signal.SIGHUP)

        after = wait_replaced(port, old_pids)
        # Every client has been moved off the old processes (it got a
        # Connection: close there and reconnected), and has been answered
        # by a new one since.
        new_pids = {c["pid"] for c in after["set"]}
        wait_for(lambda: all(c.pids & new_pids for c in clients), 30,
                 "every client answered by a new process")
        time.sleep(0.5)
        stop.set()
        for c in clients:
            c.join(30)
        assert after["reloads"] == 1 and after["deaths"] == 0
        answered = sum(c.ok for c in clients)
        moved = sum(c.reconnects for c in clients)
        failed = [f for c in clients for f in c.failures]
        assert answered > 100
        assert failed == [], (f"{len(failed)} failed of {answered + len(failed)} requests "
                              f"({moved} reconnects after Connection: close): {failed[:5]}")
        assert moved >= len(clients), "the draining processes never said Connection: close"


def test_sigterm_gives_held_clients_the_farewell(tmp_path: Path, redis_server: RedisServer):
    cfg = write_config(tmp_path, redis_server.url)
    with twistd_server(["--app", APP, "--config", cfg, "--processes", "2"]) as (port, proc):
        ready_set(port)
        readers = [SSEReader(port, "/comet/bye") for _ in range(6)]
        for r in readers:
            r.start()
        wait_for(lambda: sum(comet_connections(status(port)).values()) == 6, 20, "6 held")
        children = [c["pid"] for c in status(port)["processes"]["set"]]
        proc.send_signal(signal.SIGTERM)
        # twistd ends by re-raising the signal it stopped on (Twisted >= 18).
        assert proc.wait(60) in (0, -signal.SIGTERM)
        wait_for(lambda: all(r.closed for r in readers), 20, "streams closed")
        for r in readers:
            # the stream's head (its cursor), then the farewell
            assert [e[0] for e in r.events] == ["open", "shutdown"]
        for pid in children:
            wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, f"child {pid} gone")


def run_twistd(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*TWISTD, "-n", "--pidfile=", "pipecomet",
                           "--port", f"tcp:{free_port()}:interface=127.0.0.1", *args],
                          cwd=ROOT, capture_output=True, timeout=60)


def test_processes_with_the_memory_bus_and_comet_routes_refuse_to_start():
    done = run_twistd(["--app", APP, "--processes", "2"])
    assert done.returncode != 0
    assert b"[bus]" in done.stderr and b"--processes 2" in done.stderr


def test_redis_down_at_start_fails_clearly(tmp_path: Path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = run_twistd(["--app", APP, "--config", write_config(tmp_path, url)])
    assert done.returncode == 1
    assert f"cannot reach Redis at {url}".encode() in done.stderr
