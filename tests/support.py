"""
Helpers for the integration tests: free ports, a twistd server in a
subprocess, waiting for a port to answer.  Everything listens on 127.0.0.1
and is stopped by the test that started it.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


#: Seconds a wait on a real socket may take before it fails its test (a
#: bound for a broken build, never a speed target).
WAIT = 30.0


def within(d: Any, what: str = "an answer", limit: float = WAIT) -> Any:
    """
    ``d`` (a Deferred) bounded: past ``limit`` seconds it is cancelled and
    fails with an :class:`AssertionError` naming ``what``, so a hang fails
    the test that waits rather than the whole suite.
    """
    from twisted.internet import reactor

    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        d.cancel()

    timer = reactor.callLater(limit, expire)

    def settled(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        if expired:
            # Whatever the cancel made of it (CancelledError,
            # ResponseNeverReceived...), the test failed by waiting.
            raise AssertionError(f"{what}: nothing within {limit:g}s")
        return result

    return d.addBoth(settled)


def fetch(method: str, url: str, what: str | None = None, limit: float = WAIT,
          **kw: Any) -> Any:
    """
    A treq request and its whole body, both within ``limit`` seconds:
    a Deferred of ``(response, body)``.
    """
    import treq
    from twisted.internet.defer import inlineCallbacks

    @inlineCallbacks
    def go() -> Any:
        response = yield treq.request(method, url, **kw)
        body = yield treq.content(response)
        return response, body

    return within(go(), what or f"{method} {url}", limit)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, deadline: float = 20.0) -> None:
    """
    Block until 127.0.0.1:port accepts, the process dies, or time runs out.
    (For synchronous tests only; never called on the reactor thread.)
    """
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {deadline}s")


def drain_output(proc: subprocess.Popen) -> None:
    """
    Read a server's output in a thread (its last 2,000 lines are kept in
    ``proc.output_tail``): a pipe nobody reads fills up after 64 KiB of log
    and then blocks the server in its next write.
    """
    tail: collections.deque[bytes] = collections.deque(maxlen=2000)
    proc.output_tail = tail  # type: ignore[attr-defined]

    def read() -> None:
        try:
            for line in proc.stdout:
                tail.append(line)
        except (OSError, ValueError):
            pass

    threading.Thread(target=read, daemon=True).start()


@contextmanager
def twistd_server(args: Sequence[str] = (), env: dict[str, str] | None = None,
                  port: int | None = None,
                  cwd: Path | str | None = None) -> Iterator[tuple[int, subprocess.Popen]]:
    """
    ``twistd -n pipecomet --port tcp:PORT:interface=127.0.0.1 ARGS`` in a
    subprocess, stopped (SIGTERM, then SIGKILL) on exit.
    """
    port = port or free_port()
    cmd = [*TWISTD, "-n", "--pidfile=", "pipecomet",
           "--port", f"tcp:{port}:interface=127.0.0.1", *args]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=cwd or ROOT, env=full_env, start_new_session=True)
    try:
        wait_for_port(port, proc)
        drain_output(proc)
        yield port, proc
    finally:
        stop_process(proc)


#: What a process started with ``clean_env`` keeps of this one's
#: environment: no PYTHONPATH, no virtualenv, nothing of the test runner.
CLEAN_ENV_KEYS = ("HOME", "LANG", "LC_ALL", "TERM", "TMPDIR", "USER")


def clean_env(path_first: Sequence[str] = ()) -> dict[str, str]:
    """
    A minimal environment: ``PATH`` (with ``path_first`` before the system
    directories) and the locale; nothing that changes what Python imports.
    """
    env = {k: os.environ[k] for k in CLEAN_ENV_KEYS if k in os.environ}
    env["PATH"] = os.pathsep.join([*path_first, "/usr/local/bin", "/usr/bin", "/bin"])
    return env


@contextmanager
def serve_process(cmd: Sequence[str], port: int, cwd: Path | str,
                  clean_env: bool = False) -> Iterator[subprocess.Popen]:
    """
    A server command run in ``cwd`` until 127.0.0.1:port answers; stopped
    (SIGTERM, then SIGKILL) on exit.  ``clean_env``: run it with
    :func:`clean_env` instead of this process's environment.
    """
    env = globals()["clean_env"]() if clean_env else None
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=cwd, env=env, start_new_session=True)
    try:
        wait_for_port(port, proc, deadline=60.0)
        drain_output(proc)
        yield proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout:
        proc.stdout.close()


class TwistdProcess:
    """
    A ``twistd -n pipecomet`` subprocess for tests that run on the reactor
    (pytest-twisted): :meth:`start` and :meth:`stop` return Deferreds and
    never block the reactor thread.  The server's output goes to a
    temporary file (a pipe nobody reads would fill up and stall it).
    """

    def __init__(self, args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        import tempfile

        self.port = free_port()
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.output = tempfile.TemporaryFile()
        self.proc: subprocess.Popen | None = None

    def start(self, deadline: float = 30.0) -> Any:
        """
        Start the server; fires with ``self`` once its port accepts, fails
        if it exits or ``deadline`` seconds pass.
        """
        from twisted.internet import defer, reactor, task
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol

        cmd = [*TWISTD, "-n", "--pidfile=", "pipecomet",
               "--port", f"tcp:{self.port}:interface=127.0.0.1", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self.output, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=self.env, start_new_session=True)

        @defer.inlineCallbacks
        def wait() -> Any:
            end = reactor.seconds() + deadline
            while reactor.seconds() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                       f"{self.log()}")
                endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=2)
                try:
                    probe = yield connectProtocol(endpoint, Protocol())
                except Exception:
                    yield task.deferLater(reactor, 0.05, lambda: None)
                    continue
                probe.transport.loseConnection()
                return self
            yield self.stop()
            raise TimeoutError(f"nothing listening on 127.0.0.1:{self.port} after {deadline}s")

        return wait()

    def log(self) -> str:
        self.output.seek(0)
        return self.output.read().decode("utf-8", "replace")

    def stop(self, grace: float = 10.0) -> Any:
        """
        SIGTERM, then SIGKILL after ``grace`` seconds; fires once it exited.
        """
        from twisted.internet import defer, reactor, task

        @defer.inlineCallbacks
        def stop() -> Any:
            proc = self.proc
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                end = reactor.seconds() + grace
                while proc.poll() is None and reactor.seconds() < end:
                    yield task.deferLater(reactor, 0.05, lambda: None)
                if proc.poll() is None:
                    proc.kill()
                    while proc.poll() is None:
                        yield task.deferLater(reactor, 0.05, lambda: None)
            self.output.close()

        return stop()
