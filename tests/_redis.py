"""
A real Redis server for the integration tests: Debian's ``redis-server``
(``make test`` installs it), started on a free loopback port in a temporary
directory with persistence off and stopped by PID; it can be killed and
started again on the same port to play "Redis went away" (its data gone,
as after a restart without persistence).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .support import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """
    One ``redis-server`` in ``directory`` on 127.0.0.1.
    """

    def __init__(self, directory: Path, port: int | None = None) -> None:
        if not os.path.exists(REDIS_SERVER):
            raise RuntimeError("redis-server missing: install Debian's redis-server package "
                               "(scripts/apt-ensure redis-server, or make test)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = self.directory / "redis.log"
        self.process: subprocess.Popen | None = None
        atexit.register(self.stop)

    def start(self, deadline: float = 20.0) -> None:
        """
        Start the server and wait until it answers PING (blocking: fixtures
        only, never on the reactor thread while it serves).
        """
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("Redis is already running")
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--protected-mode", "yes", "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: "
                                   + self.log.read_text()[-2000:])
            if self.command("PING") == b"+PONG\r\n":
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server not answering on {self.port} after {deadline}s")

    def command(self, *args: str) -> bytes | None:
        """
        One command over a fresh socket; the raw reply, or None when the
        server does not answer.
        """
        out = b"*%d\r\n" % len(args) + b"".join(
            b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as s:
                s.sendall(out)
                return s.recv(65536)
        except OSError:
            return None

    def kill(self) -> None:
        """
        SIGKILL: the data goes with it (no persistence).
        """
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
