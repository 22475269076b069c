"""
A real, standalone ZooKeeper server for the integration tests: Debian's
``zookeeper`` package (``make test`` installs it), started on a free
loopback port in a temporary directory and stopped by PID; it can be
stopped and started again on the same port and data directory to play
"ZooKeeper went away".

Only the test process talks to it; it listens on 127.0.0.1 only, with the
admin server off and the four-letter words it needs (``ruok``) allowed.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from twisted.internet import threads

from .support import free_port

#: The Debian package's server jar; its manifest names the jars it needs.
ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
MAIN = "org.apache.zookeeper.server.ZooKeeperServerMain"


class ZooKeeperServer:
    """
    One standalone ZooKeeper in ``directory``.

    :param directory: where ``zoo.cfg``, the data and the log go.
    :param tick: ZooKeeper's ``tickTime`` in ms; sessions may be as short
        as two ticks, which keeps the expiry tests short.
    """

    def __init__(self, directory: Path, tick: int = 200) -> None:
        if not ZOOKEEPER_JAR.exists():
            raise RuntimeError(f"{ZOOKEEPER_JAR} missing: install Debian's zookeeper package "
                               "(scripts/apt-ensure zookeeper, or make test)")
        self.directory = Path(directory)
        self.port = free_port()
        self.hosts = f"127.0.0.1:{self.port}"
        self.config = self.directory / "zoo.cfg"
        self.log = self.directory / "zookeeper.log"
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"tickTime={tick}\n"
            f"dataDir={self.directory / 'data'}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=ruok,srvr\n"
            f"minSessionTimeout={2 * tick}\n"
            "maxSessionTimeout=60000\n"
            "maxClientCnxns=0\n"
        )
        self.process: subprocess.Popen | None = None
        # A test run that dies before its fixture's teardown must not leave a JVM behind.
        atexit.register(self.stop)

    # -- blocking (fixtures; never on the reactor thread while it serves)

    def start(self, deadline: float = 60.0) -> None:
        """
        Start the server and wait until it answers ``ruok`` with ``imok``.
        """
        self.spawn()
        self.wait_ready(deadline)

    def spawn(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("ZooKeeper is already running")
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                ["java", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                 "-Dzookeeper.admin.enableServer=false",
                 "-cp", str(ZOOKEEPER_JAR), MAIN, str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.directory)

    def answers(self) -> bool:
        """
        One ``ruok``: True when the server says ``imok``.
        """
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                s.settimeout(1.0)
                s.sendall(b"ruok")
                return s.recv(16) == b"imok"
        except OSError:
            return False

    def wait_ready(self, deadline: float = 60.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited ({self.process and self.process.returncode})"
                                   f":\n{self._log_tail()}")
            if self.answers():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"ZooKeeper did not answer ruok within {deadline}s:\n"
                           f"{self._log_tail()}")

    def stop(self, deadline: float = 20.0) -> None:
        """
        Stop the server by PID (SIGTERM, then SIGKILL after ``deadline``).
        """
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(deadline)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(deadline)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return "(no log)"

    # -- from a test running on the reactor: the waits go to a thread

    def stop_later(self):
        """
        :meth:`stop` off the reactor thread; a Deferred.
        """
        return threads.deferToThread(self.stop)

    def start_later(self, deadline: float = 60.0):
        """
        :meth:`start` off the reactor thread; a Deferred.
        """
        return threads.deferToThread(self.start, deadline)
