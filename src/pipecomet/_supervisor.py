"""
``--processes N``: a supervisor and N serving processes that share nothing
but the listening socket.

The supervisor binds the listening socket once and hands it to every
serving process (``spawnProcess`` ``childFDs``), which adopts it
(``reactor.adoptStreamPort``) and is otherwise a whole pipecomet: its own
chain runtime, quota pool, backend pools, worker pool and comet hub.  The
kernel's one accept queue survives a serving process's restart, which is
why the socket is inherited rather than bound per process with
SO_REUSEPORT (whose per-socket queue is lost with its process; measured
figures in ``docs/scaling.md``).

The supervisor restarts a serving process that dies (with backoff; the
others keep serving), drains them all on SIGTERM and restarts them one at
a time on SIGHUP: a new one is started and reports ready before the old one
is told to stop, so the socket always has a process accepting.  Each
serving process reports its status over a pipe every
``status_interval`` seconds and the supervisor sends the whole set back,
so ``/_pipecomet/status`` on any process shows every process and which
one answered.  A scrape of ``/_pipecomet/metrics`` on any process is
answered for all of them: the supervisor asks each serving process for its
metric families and sends them back to the one that was asked
(:class:`MetricsGathering`, ``pipecomet._observe._multiprocess``).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any, AnyStr, Callable, Mapping, Sequence
from typing import Protocol as TypingProtocol

from twisted.application.service import Service
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IProcessProtocol,
    IProcessTransport,
    IReactorCore,
    IReactorFromThreads,
    IReactorSocket,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._config import ConfigError
from ._observe._multiprocess import FamilyData, Gathered

if TYPE_CHECKING:
    from ._app import App
    from ._comet import CometHub
    from ._runtime import Runtime
    from ._service import Options

__all__ = ["Supervisor", "ChildControl", "bind_listener", "bound_endpoint", "parse_tcp_endpoint",
           "usable_cores", "CONTROL_IN", "CONTROL_OUT", "LISTEN_FD", "LISTEN_MODES"]

log = Logger()

#: The serving process's file descriptors: the inherited listening socket,
#: the pipe it reports on, the pipe it hears the supervisor on.
LISTEN_FD, CONTROL_OUT, CONTROL_IN = 3, 4, 5

#: How the serving processes get the listening socket (``[server] processes_listen``).
LISTEN_MODES = ("inherit", "reuseport")

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def usable_cores() -> int:
    """
    The cores this process may run on (its CPU affinity), at least 1.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_tcp_endpoint(spec: str) -> tuple[str, int, int]:
    """
    ``tcp:PORT[:interface=ADDR][:backlog=N]`` (or a bare port) → ``(interface,
    port, backlog)``; ``--processes`` serves TCP only.
    """
    parts = re.split(r"(?<!\\):", spec)  # "\:" is a colon inside a value (an IPv6 address)
    if parts[0].isdigit() and len(parts) == 1:
        return "0.0.0.0", int(parts[0]), 1024
    if parts[0] not in ("tcp", "tcp6") or len(parts) < 2 or not parts[1].isdigit():
        raise ConfigError(f"--processes: port {spec!r}: only tcp:PORT[:interface=...] endpoints "
                          "can be shared by several processes")
    interface = "::" if parts[0] == "tcp6" else "0.0.0.0"
    backlog = 1024
    for extra in parts[2:]:
        key, _, value = extra.partition("=")
        if key == "interface":
            interface = value.replace("\\", "")
        elif key == "backlog" and value.isdigit():
            backlog = int(value)
        else:
            raise ConfigError(f"--processes: port {spec!r}: unknown option {extra!r}")
    return interface, int(parts[1]), backlog


def bind_listener(spec: str, reuseport: bool = False, listen: bool = True) -> socket.socket:
    """
    A listening, non-blocking TCP socket for ``spec`` (bound only, not
    listening, when ``listen`` is false).
    """
    interface, port, backlog = parse_tcp_endpoint(spec)
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((interface, port))
    except OSError as e:
        s.close()
        raise ConfigError(f"cannot listen on {spec}: {e.strerror}") from None
    if listen:
        s.listen(backlog)
    s.setblocking(False)
    return s


def bound_endpoint(spec: str, sock: socket.socket) -> str:
    """
    ``spec`` with the port ``sock`` is bound to (``tcp:0`` made definite),
    for the serving processes that bind their own sockets.
    """
    interface, _, backlog = parse_tcp_endpoint(spec)
    port = sock.getsockname()[1]
    kind = "tcp6" if ":" in interface else "tcp"
    escaped = interface.replace(":", "\\:")
    return f"{kind}:{port}:interface={escaped}:backlog={backlog}"


class _Timers(TypingProtocol):
    """
    What every part here asks of the reactor: the time and timed calls
    (``IReactorTime``; a ``Clock`` in the unit tests).
    """

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., object], *args: object,
                  **kw: object) -> IDelayedCall: ...


class SupervisorReactor(_Timers, TypingProtocol):
    """
    The reactor a :class:`Supervisor` runs on: timed calls and processes.
    """

    def spawnProcess(self, processProtocol: IProcessProtocol, executable: bytes | str,
                     args: Sequence[bytes | str], env: Mapping[AnyStr, AnyStr] | None = None,
                     path: bytes | str | None = None, uid: int | None = None,
                     gid: int | None = None, usePTY: bool = False,
                     childFDs: Mapping[int, int | str] | None = None) -> IProcessTransport: ...


# ---------------------------------------------------------------------------
# The supervisor side


class _Child(ProcessProtocol):
    """
    One serving process as the supervisor sees it.
    """

    def __init__(self, supervisor: Supervisor, index: int, generation: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.generation = generation
        self.pid: int | None = None
        self.ready = False
        self.started_at = supervisor.reactor.seconds()
        self.status: dict[str, Any] = {}
        self.ended: Deferred = Deferred()
        self.when_ready: Deferred = Deferred()
        self.stopping = False
        self.held = 0
        self.conns = 0
        self._buf = b""

    def connectionMade(self) -> None:
        assert self.transport is not None  # set by makeConnection
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != CONTROL_OUT:
            return
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("op") == "ready" and not self.ready:
                self.ready = True
                self.when_ready.callback(self)
                self.supervisor._send_held()
            elif msg.get("op") == "status":
                self.status = msg.get("status", {})
            elif msg.get("op") == "held":
                self.held = int(msg.get("held", 0))
                self.supervisor._send_held()
            elif msg.get("op") == "conns":
                self.conns = int(msg.get("conns", 0))
                self.supervisor._send_conns()
            elif msg.get("op") == "scrape":
                self.supervisor._scrape(self, msg)
            elif msg.get("op") == "families":
                self.supervisor._families(self, msg)

    def send(self, msg: dict[str, Any]) -> None:
        if self.transport is not None and self.pid is not None:
            try:
                self.transport.writeToChild(CONTROL_IN, json.dumps(msg).encode() + b"\n")
            except (KeyError, OSError):
                pass

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.supervisor._ended(self, code, sig)
        if not self.when_ready.called:
            self.when_ready.errback(RuntimeError(
                f"serving process {self.index} ended before it was ready (exit {code}, "
                f"signal {sig})"))
            self.when_ready.addErrback(lambda f: None)
        self.ended.callback(None)

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "pid": self.pid, "ready": self.ready,
                "generation": self.generation,
                "up_seconds": round(self.supervisor.reactor.seconds() - self.started_at, 1),
                "status": self.status}


class Supervisor(Service):
    """
    Keeps ``count`` serving processes running on one listening socket.

    :param reactor: the reactor processes and timers go through.
    :param count: how many serving processes.
    :param port: the ``tcp:`` endpoint to listen on.
    :param child_args: the ``twistd pipecomet`` options every serving
        process gets (app, config...), without ``--port``/``--processes``.
    :param listen: ``"inherit"`` (one socket, adopted by each) or
        ``"reuseport"`` (each binds its own with SO_REUSEPORT; the
        supervisor's socket then only holds the port: bound, never
        listening, so the kernel gives it no connections).
    """

    name = "supervisor"
    install_sighup = True

    def __init__(self, reactor: SupervisorReactor, count: int, port: str,
                 child_args: Sequence[str],
                 listen: str = "inherit", restart_min: float = 0.1,
                 restart_max: float = 5.0, stop_timeout: float = 30.0,
                 status_interval: float = 1.0, workers_per_process: int | None = None,
                 env: dict[str, str] | None = None,
                 kill: Callable[[int, int], None] = os.kill) -> None:
        if listen not in LISTEN_MODES:
            raise ValueError(f"listen: {listen!r} is not one of {LISTEN_MODES}")
        self.reactor = reactor
        self.count = count
        self.port = port
        self.child_args = list(child_args)
        self.listen = listen
        self.restart_min = restart_min
        self.restart_max = restart_max
        self.stop_timeout = stop_timeout
        self.status_interval = status_interval
        self.workers_per_process = workers_per_process
        self.env = env
        self._kill_pid = kill
        self.socket: socket.socket | None = None
        self.children: dict[int, _Child] = {}
        self.backoff: dict[int, float] = {}
        self._respawn: dict[int, IDelayedCall] = {}
        self._generation = 0
        self._stopping = False
        self._reloading: Deferred | None = None
        self._broadcast: IDelayedCall | None = None
        self.restarts = 0
        self.reloads = 0
        self.deaths = 0
        self._gatherings: dict[int, MetricsGathering] = {}
        self._gathering_ids = itertools.count(1)

    # -- lifecycle

    def bind(self) -> None:
        """
        Bind the address now (before the reactor runs, so that a port in
        use fails the start): the listening socket every serving process
        adopts, or, with ``reuseport``, a socket that holds the port
        without listening (a listening one would join the SO_REUSEPORT
        group and be handed connections nobody accepts).

        :raises ConfigError: the address cannot be bound.
        """
        if self.listen == "reuseport":
            self.socket = bind_listener(self.port, reuseport=True, listen=False)
        else:
            self.socket = bind_listener(self.port)

    def startService(self) -> None:
        super().startService()
        if self.socket is None:
            self.bind()
        for i in range(self.count):
            self._spawn(i)
        self._broadcast = self.reactor.callLater(self.status_interval, self._send_set)
        if self.install_sighup:
            threads = IReactorFromThreads(self.reactor)
            signal.signal(signal.SIGHUP, lambda *a: threads.callFromThread(self.reload))
        log.info("pipecomet supervisor {pid}: {n} serving processes on {port} ({listen})",
                 pid=os.getpid(), n=self.count, port=self.port, listen=self.listen)

    def stopService(self) -> Deferred:
        super().stopService()
        self._stopping = True
        for call in list(self._respawn.values()) + [self._broadcast]:
            if call is not None and call.active():
                call.cancel()
        self._respawn.clear()
        ends = [self._stop_child(c) for c in list(self.children.values())]

        def closed(_: object) -> None:
            if self.socket is not None:
                self.socket.close()
                self.socket = None

        return DeferredList(ends).addCallback(closed)

    def _spawn(self, index: int) -> _Child:
        self._generation += 1
        child = _Child(self, index, self._generation)
        args = [*TWISTD, "-n", "--pidfile=", "pipecomet", *self.child_args,
                "--process-index", str(index), "--processes-total", str(self.count),
                "--supervisor-pid", str(os.getpid())]
        fds: dict[int, int | str] = {0: 0, 1: 1, 2: 2, CONTROL_OUT: "r", CONTROL_IN: "w"}
        if self.listen == "inherit":
            assert self.socket is not None
            fds[LISTEN_FD] = self.socket.fileno()
            args += ["--listen-fd", str(LISTEN_FD)]
        else:
            assert self.socket is not None
            args += ["--port", bound_endpoint(self.port, self.socket), "--reuseport"]
        env = dict(os.environ if self.env is None else self.env)
        self.reactor.spawnProcess(child, sys.executable, args, env=env, childFDs=fds)
        self.children[index] = child
        return child

    def _ended(self, child: _Child, code: int | None, sig: int | None) -> None:
        for gathering in list(self._gatherings.values()):
            gathering.gone(child)
        if self.children.get(child.index) is not child:
            return  # replaced (reload): its successor is already serving
        del self.children[child.index]
        self._send_held()
        if self._stopping or child.stopping:
            return
        self.deaths += 1
        lived = self.reactor.seconds() - child.started_at
        delay = self.backoff.get(child.index, 0.0)
        delay = self.restart_min if lived > 10 or delay == 0 else min(self.restart_max, delay * 2)
        self.backoff[child.index] = delay
        log.warn("serving process {index} (pid {pid}) ended (exit {code}, signal {sig}); "
                 "restarting in {delay}s", index=child.index, pid=child.pid, code=code, sig=sig,
                 delay=delay)
        self._respawn[child.index] = self.reactor.callLater(delay, self._restart, child.index)

    def _restart(self, index: int) -> None:
        self._respawn.pop(index, None)
        if not self._stopping:
            self.restarts += 1
            self._spawn(index)

    def _stop_child(self, child: _Child) -> Deferred:
        child.stopping = True
        if child.ended.called:
            return succeed(None)
        try:
            if child.pid is not None:
                self._kill_pid(child.pid, signal.SIGTERM)
        except OSError:
            pass
        timer = self.reactor.callLater(self.stop_timeout, self._kill, child)

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()

        d: Deferred = Deferred()
        child.ended.addCallback(done).addCallback(lambda _: d.callback(None))
        return d

    def _kill(self, child: _Child) -> None:
        log.warn("serving process {index} did not stop in {t}s: killed", index=child.index,
                 t=self.stop_timeout)
        try:
            if child.pid is not None:
                self._kill_pid(child.pid, signal.SIGKILL)
        except OSError:
            pass

    # -- SIGHUP: one at a time

    def reload(self) -> Deferred:
        """
        Replace every serving process, one at a time: the new one first,
        then, once it is ready, the old one drains and stops.
        """
        if self._reloading is not None:
            return self._reloading
        self.reloads += 1
        log.info("supervisor: SIGHUP, restarting the serving processes one at a time")

        async def run() -> None:
            from twisted.internet.defer import ensureDeferred  # noqa: F401

            for index in sorted(self.children):
                if self._stopping:
                    return
                old = self.children.get(index)
                new = self._spawn(index)
                try:
                    await new.when_ready
                except Exception as e:
                    # The new one did not come up: keep the old one serving.
                    log.error("reload: {error}; process {index} keeps running", error=e,
                              index=index)
                    call = self._respawn.pop(index, None)
                    if call is not None and call.active():
                        call.cancel()
                    if old is not None and not old.ended.called:
                        self.children[index] = old
                    continue
                if old is not None:
                    await self._stop_child(old)

        from twisted.internet.defer import ensureDeferred

        d = ensureDeferred(run())

        def finished(result: None | Failure) -> None | Failure:
            self._reloading = None
            return result

        self._reloading = d.addBoth(finished)
        return d

    # -- metrics of every serving process in one scrape

    def _scrape(self, asker: _Child, msg: dict[str, Any]) -> None:
        """
        ``asker`` was scraped: ask every ready serving process for its
        families, answer ``asker`` with all that came within the timeout.
        """
        try:
            timeout = min(60.0, max(0.001, float(msg.get("timeout", 2.0))))
        except (TypeError, ValueError):
            timeout = 2.0
        gid = next(self._gathering_ids)
        asked = [c for _, c in sorted(self.children.items()) if c.ready and not c.stopping]
        gathering = MetricsGathering(self, gid, asker, msg.get("id"), asked, self.count)
        self._gatherings[gid] = gathering
        gathering.timer = self.reactor.callLater(timeout, gathering.finish)
        for child in asked:
            child.send({"op": "collect", "id": gid})
        if not asked:
            gathering.finish()

    def _families(self, child: _Child, msg: dict[str, Any]) -> None:
        gathering = self._gatherings.get(msg.get("id", -1))
        if gathering is not None:
            gathering.answered(child, msg.get("families") or [])

    # -- status

    def _send_held(self) -> None:
        msg = {"op": "held", "held": {str(c.index): c.held for c in self.children.values()
                                      if c.ready}}
        for child in list(self.children.values()):
            child.send(msg)

    def _send_conns(self) -> None:
        msg = {"op": "conns", "conns": {str(c.index): c.conns for c in self.children.values()
                                        if c.ready}}
        for child in list(self.children.values()):
            child.send(msg)

    def _send_set(self) -> None:
        self._broadcast = self.reactor.callLater(self.status_interval, self._send_set)
        msg = {"op": "set", "set": self.describe()}
        for child in list(self.children.values()):
            child.send(msg)

    def describe(self) -> dict[str, Any]:
        return {
            "supervisor_pid": os.getpid(),
            "processes": self.count,
            "listen": self.listen,
            # Each serving process has its own worker pool (its rings belong
            # to one reactor): N x size worker processes in all.
            "workers": {"pool": "per process",
                        "size_per_process": self.workers_per_process or 0},
            "restarts": self.restarts,
            "deaths": self.deaths,
            "reloads": self.reloads,
            "set": [c.describe() for _, c in sorted(self.children.items())],
        }


class MetricsGathering:
    """
    One scrape's round of the serving processes: who was asked, who
    answered, and the answer for the process that was scraped.
    """

    def __init__(self, supervisor: Supervisor, gid: int, asker: _Child, request_id: object,
                 asked: list[_Child], count: int) -> None:
        self.supervisor = supervisor
        self.gid = gid
        self.asker = asker
        self.request_id = request_id
        self.waiting = {id(c): c for c in asked}
        self.count = count
        self.families: dict[str, list[FamilyData]] = {}
        self.timer: IDelayedCall | None = None
        self.done = False

    def answered(self, child: _Child, families: list[FamilyData]) -> None:
        if self.waiting.pop(id(child), None) is None:
            return
        self.families[str(child.index)] = families
        if not self.waiting:
            self.finish()

    def gone(self, child: _Child) -> None:
        """
        ``child`` ended: it will not answer.
        """
        if self.waiting.pop(id(child), None) is not None and not self.waiting:
            self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        sup = self.supervisor
        sup._gatherings.pop(self.gid, None)
        up = {str(i): str(i) in self.families for i in range(self.count)}
        self.asker.send({"op": "scraped", "id": self.request_id, "processes": self.families,
                         "up": up, "supervisor": {"processes": sup.count,
                                                  "restarts": sup.restarts,
                                                  "deaths": sup.deaths,
                                                  "reloads": sup.reloads}})


# ---------------------------------------------------------------------------
# The serving process side


class ChildControl(Protocol):
    """
    A serving process's end of the pipes to its supervisor: says "ready",
    reports its status every ``interval`` seconds, keeps the last set the
    supervisor sent, and stops the process when the supervisor is gone.
    """

    def __init__(self, reactor: IReactorTime, runtime: Runtime | None, index: int, total: int,
                 supervisor_pid: int, interval: float = 1.0) -> None:
        self.reactor = reactor
        self.runtime = runtime
        self.index = index
        self.total = total
        self.supervisor_pid = supervisor_pid
        self.interval = interval
        self.set: dict[str, Any] = {}
        self.held_elsewhere: dict[str, int] = {}
        #: the other processes' short-lived (not comet) connections
        self.conns_elsewhere: dict[str, int] = {}
        self.balancer: AcceptBalancer | None = None
        self.rebalancer: ConnectionBalancer | None = None
        self.stopping = False
        #: this process's metric families, for the supervisor's scrapes
        #: (set when the app serves metrics)
        self.families: Callable[[], list[FamilyData]] | None = None
        self._scrapes: dict[int, Deferred[Gathered | None]] = {}
        self._scrape_ids = itertools.count(1)
        self._buf = b""
        self._call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._call = self.reactor.callLater(0, self._report)

    def ready(self) -> None:
        self._write({"op": "ready", "pid": os.getpid()})

    def _write(self, msg: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(json.dumps(msg, default=str).encode() + b"\n")

    def _report(self) -> None:
        self._call = self.reactor.callLater(self.interval, self._report)
        own = self.runtime.status() if self.runtime is not None else {}
        status = {k: v for k, v in own.items() if k != "processes"}
        self._write({"op": "status", "status": status})

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("op") == "set":
                self.set = msg.get("set", {})
            elif msg.get("op") == "held":
                held = msg.get("held", {})
                held.pop(str(self.index), None)
                self.held_elsewhere = held
            elif msg.get("op") == "conns":
                conns = msg.get("conns", {})
                conns.pop(str(self.index), None)
                self.conns_elsewhere = conns
            elif msg.get("op") == "collect":
                families = self.families() if self.families is not None else []
                self._write({"op": "families", "id": msg.get("id"), "families": families})
            elif msg.get("op") == "scraped":
                d = self._scrapes.pop(msg.get("id", -1), None)
                if d is not None:
                    d.callback({"processes": msg.get("processes", {}), "up": msg.get("up", {}),
                                "supervisor": msg.get("supervisor", {})})

    def gather_metrics(self, timeout: float) -> Deferred[Gathered | None]:
        """
        Every serving process's metric families, through the supervisor,
        which waits up to ``timeout`` seconds for them; fires None when
        the supervisor itself has not answered a second after that.
        """
        sid = next(self._scrape_ids)
        d: Deferred[Gathered | None] = Deferred()
        self._scrapes[sid] = d
        self._write({"op": "scrape", "id": sid, "timeout": timeout})

        def late() -> None:
            if self._scrapes.pop(sid, None) is d:
                d.callback(None)

        timer = self.reactor.callLater(timeout + 1.0, late)

        def settled(result: Gathered | None) -> Gathered | None:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(settled)

    def report_held(self, held: int) -> None:
        self._write({"op": "held", "held": held})

    def report_conns(self, conns: int) -> None:
        self._write({"op": "conns", "conns": conns})

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        # The supervisor is gone: a serving process does not outlive it.
        core = IReactorCore(self.reactor, None)
        if not self.stopping and core is not None and core.running:
            from twisted.internet.error import ReactorNotRunning

            log.warn("supervisor gone: stopping")
            try:
                core.stop()
            except ReactorNotRunning:
                pass

    def status(self) -> dict[str, Any]:
        out = {"answered_by": {"index": self.index, "pid": os.getpid()},
               "processes": self.total, "supervisor_pid": self.supervisor_pid, **self.set}
        if self.balancer is not None:
            out["answered_by"]["accept_paused"] = self.balancer.paused
            out["answered_by"]["accept_pauses"] = self.balancer.pauses
        if self.rebalancer is not None:
            out["answered_by"]["connections"] = self.rebalancer.reported
            out["answered_by"]["connections_moved"] = self.rebalancer.moved
        return out


class _ProtocolMaker(TypingProtocol):
    """
    What :class:`ConnectionTracker` asks of the factory it wraps (the
    app's ``Site``).
    """

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None: ...

    def doStart(self) -> None: ...

    def doStop(self) -> None: ...


class ConnectionTracker(ServerFactory):
    """
    The site's factory, keeping the connections it made so that a stopping
    serving process can drain them and wait for them to close.

    Connections are kept in a list pruned of the closed ones whenever it
    has doubled since the last pruning (amortized: a closed connection is
    let go of within as many accepts as there were open ones).

    :param site: the factory that makes the protocols (the app's site).
    """

    def __init__(self, site: _ProtocolMaker) -> None:
        self.site = site
        self._connections: list[Protocol] = []
        self._prune_at = 1024

    def doStart(self) -> None:
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        protocol = self.site.buildProtocol(addr)
        if protocol is not None:
            self._connections.append(protocol)
            if len(self._connections) >= self._prune_at:
                self.open_connections()
        return protocol

    def open_connections(self) -> list[Protocol]:
        """
        The connections not closed yet (a transport's ``disconnected``,
        which Twisted's ``FileDescriptor`` documents for its consumers);
        the closed ones are let go of.
        """
        self._connections = [p for p in self._connections if p.transport is None
                             or not getattr(p.transport, "disconnected", False)]
        self._prune_at = max(1024, 2 * len(self._connections))
        return list(self._connections)

    def drain(self) -> None:
        """
        Drain every open connection that can be (pipecomet's protocol;
        twisted.web's ``HTTPChannel``, with ``[server] protocol =
        "twisted"``, cannot: its connections are closed with the process).
        """
        for p in self.open_connections():
            drain = getattr(p, "drain", None)
            if callable(drain):
                drain()


class ServingProcess(Service):
    """
    A serving process's listener: adopts the inherited socket (or binds its
    own with SO_REUSEPORT) and talks to the supervisor.  On stop it stops
    accepting, tells held comet clients to reconnect, and drains its
    connections (each answers what it has in hand, the last answer with
    ``Connection: close``; idle ones are not closed under a request that
    may be on its way), waiting for them to close for at most ``[server]
    drain_grace`` seconds; the app's parts stop after that.
    """

    name = "serving-process"

    def __init__(self, reactor: IReactorTime, app: App, options: Options) -> None:
        self.reactor = reactor
        self.app = app
        self.options = options
        self.port: IListeningPort | None = None
        self.control: ChildControl | None = None
        self.balancer: AcceptBalancer | None = None
        self.connections: ConnectionTracker | None = None
        self.rebalancer: ConnectionBalancer | None = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet.stdio import StandardIO

        opts = self.options
        # Every connection is kept track of, to be drained on stop.
        self.connections = ConnectionTracker(self.app.site())
        site = self.connections
        if opts["listen-fd"] is not None:
            fd = int(opts["listen-fd"])
            probe = socket.socket(fileno=fd)
            family = probe.family
            probe.detach()
            self.port = IReactorSocket(self.reactor).adoptStreamPort(fd, family, site)
            os.close(fd)  # adoptStreamPort made its own copy
        else:
            own = bind_listener(opts["port"] or self.app.config.server.port, reuseport=True)
            self.port = IReactorSocket(self.reactor).adoptStreamPort(own.fileno(), own.family,
                                                                     site)
            own.close()
        index = int(opts["process-index"])
        self.control = ChildControl(self.reactor, self.app.runtime, index,
                                    int(opts["processes-total"] or 1),
                                    int(opts["supervisor-pid"] or 0))
        # twisted.internet.stdio chooses its StandardIO by platform when it
        # runs; a type checker reads the Windows one, which has no
        # stdin/stdout descriptors.
        pipes: Callable[..., object] = StandardIO
        pipes(self.control, stdin=CONTROL_IN, stdout=CONTROL_OUT, reactor=self.reactor)
        self.app.runtime.status_sources["processes"] = self.control.status
        metrics = self.app.observer.metrics
        if metrics is not None and self.control.total > 1:
            # One scrape of any process gives every process's series.
            self.control.families = metrics.families
            metrics.serve_as_process(index, self.control.total, self.control.gather_metrics)
        self.control.ready()
        hub = self.app.runtime.comet
        # Only with the one shared socket: a process that stops reading its
        # own SO_REUSEPORT socket leaves the connections hashed to it waiting.
        # (A TCP port is a FileDescriptor: it can stop and start accepting.)
        if (hub is not None and self.control.total > 1 and opts["listen-fd"] is not None
                and isinstance(self.port, FileDescriptor)):
            self.balancer = AcceptBalancer(self.reactor, self.port, hub, self.control)
            self.balancer.start()
            self.control.balancer = self.balancer
        if self.control.total > 1 and opts["listen-fd"] is not None:
            self.rebalancer = ConnectionBalancer(self.reactor, self.connections, hub,
                                                 self.control)
            self.rebalancer.start()
            self.control.rebalancer = self.rebalancer
        log.info("serving process {index} (pid {pid}) ready", index=index, pid=os.getpid())

    def stopService(self) -> Deferred:
        super().stopService()
        if self.control is not None:
            self.control.stopping = True
        if self.balancer is not None:
            self.balancer.stop()
        if self.rebalancer is not None:
            self.rebalancer.stop()
        d = maybeDeferred(self.port.stopListening) if self.port is not None else succeed(None)
        return d.addCallback(lambda _: self._drain())

    def _drain(self) -> Deferred[None]:
        """
        Not accepting any more: held comet clients are told to reconnect
        (elsewhere) now, every open connection answers what it has with
        ``Connection: close`` (``drain``), and the process waits until
        they have all closed, for at most ``[server] drain_grace`` seconds.
        """
        hub = self.app.runtime.comet
        if hub is not None:
            hub.stop()  # again when the app's parts stop: a no-op then
        tracker = self.connections
        if tracker is None:
            return succeed(None)
        tracker.drain()
        deadline = self.reactor.seconds() + self.app.config.server.drain_grace
        done: Deferred[None] = Deferred()

        def check() -> None:
            left = tracker.open_connections()
            if not left:
                done.callback(None)
            elif self.reactor.seconds() >= deadline:
                log.info("drain grace over: {n} connections still open (closed with the "
                         "process)", n=len(left))
                done.callback(None)
            else:
                # Stopping only: a short poll of the connections left.
                self.reactor.callLater(0.02, check)

        check()
        return done


class _Pausable(TypingProtocol):
    """
    A listening port that can stop and start accepting (Twisted's TCP
    ``Port``, an ``IReadDescriptor``).
    """

    def stopReading(self) -> None: ...

    def startReading(self) -> None: ...


class _PeriodicCheck:
    """
    A check run every ``interval`` seconds on ``reactor`` between
    :meth:`start` and :meth:`stop` (the next call is armed before the
    check runs, so a failing check does not end the series).
    """

    reactor: IReactorTime
    interval: float
    _call: IDelayedCall | None

    def start(self) -> None:
        self._call = self.reactor.callLater(self.interval, self._check)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        self._call = self.reactor.callLater(self.interval, self._check)
        self.check()

    def check(self) -> None:
        raise NotImplementedError


class AcceptBalancer(_PeriodicCheck):
    """
    Keeps held (comet) connections even across the serving processes that
    share one listening socket.

    With one inherited socket the kernel wakes whichever process is
    waiting and Twisted accepts in batches, so a burst of long-lived
    connections lands on one process (measured: 554 of 554 in a test).
    Every ``interval`` seconds each process compares its held connections
    with the others' (sent through the supervisor as they change) and stops
    accepting while it holds more than its share plus ``slack``: the
    connections wait in the shared queue for the others, none is refused.
    Short requests balance themselves (a busy process does not accept).
    """

    def __init__(self, reactor: IReactorTime, port: _Pausable, hub: CometHub,
                 control: ChildControl,
                 interval: float = 0.02, slack: int = 4) -> None:
        self.reactor = reactor
        self.port = port
        self.hub = hub
        self.control = control
        self.interval = interval
        self.slack = slack
        self.paused = False
        self.pauses = 0
        self._reported = -1
        self._call: IDelayedCall | None = None

    def stop(self) -> None:
        super().stop()
        self._resume()

    def check(self) -> None:
        own = self.hub.connections
        if own != self._reported:
            self._reported = own
            self.control.report_held(own)
        others = self.control.held_elsewhere
        if not others:
            self._resume()
            return
        mean = (own + sum(others.values())) / (len(others) + 1)
        slack = max(self.slack, mean * 0.02)
        if not self.paused and own > mean + slack:
            self.paused = True
            self.pauses += 1
            self.port.stopReading()
        elif self.paused and own <= mean + slack / 2:
            self._resume()

    def _resume(self) -> None:
        if self.paused:
            self.paused = False
            self.port.startReading()


class ConnectionBalancer(_PeriodicCheck):
    """
    Moves keep-alive connections off a serving process that holds more
    than its share, with one inherited socket.

    A burst of connections opened at once (wrk's 32, a proxy's pool) is
    accepted by whichever process wakes first, in one batch: measured, 32
    of 32 on one process while the other idled.  Keep-alive connections
    never move by themselves, so every ``interval`` seconds each process
    counts its open connections that are not held comet streams, reports
    the count (through the supervisor) and, while it holds more than
    ``ratio`` × the mean plus ``slack``, drains half its excess: those
    connections answer their next request with ``Connection: close``
    (no request fails) and their clients reconnect through the shared
    queue, where an idle process, waiting in the reactor, takes them
    before a busy one.

    :param tracker: this process's connections.
    :param hub: the comet hub, whose held streams are not counted (the
        :class:`AcceptBalancer` evens those out), or None.
    """

    def __init__(self, reactor: IReactorTime, tracker: ConnectionTracker,
                 hub: CometHub | None, control: ChildControl, interval: float = 0.25,
                 ratio: float = 1.25, slack: int = 2) -> None:
        self.reactor = reactor
        self.tracker = tracker
        self.hub = hub
        self.control = control
        self.interval = interval
        self.ratio = ratio
        self.slack = slack
        self.reported = -1
        self.moved = 0
        self._drained: set[int] = set()
        self._call: IDelayedCall | None = None

    def check(self) -> None:
        open_ = self.tracker.open_connections()
        ids = {id(p) for p in open_}
        self._drained &= ids
        held = self.hub.connections if self.hub is not None else 0
        # Connections already told to close are on their way out.
        own = max(0, len(open_) - held - len(self._drained))
        if own != self.reported:
            self.reported = own
            self.control.report_conns(own)
        others = self.control.conns_elsewhere
        if not others:
            return
        mean = (own + sum(others.values())) / (len(others) + 1)
        if own <= mean * self.ratio + self.slack:
            return
        excess = max(1, int((own - mean) / 2))
        # The newest first: the oldest are likelier to be held streams.
        for p in reversed(open_):
            if excess == 0:
                break
            drain = getattr(p, "drain", None)
            if id(p) in self._drained or not callable(drain):
                continue
            drain()
            self._drained.add(id(p))
            self.moved += 1
            excess -= 1
