"""
The worker pool: ``size`` worker processes, one :class:`WorkerProtocol`
each, fed through the rings of their shared-memory files.

Everything here runs on the reactor thread.  A call is encoded at once
(so an unpicklable argument fails in the server, never in a worker), then
either written into the ring of the least-loaded ready worker or queued.
Doorbell bytes go only to a side that said it is parked (so a loaded pool
makes no system call per call): to a worker through a pipe of the pool's
own, given to it as its stdin, and back through its stdout.  The pool and
its :class:`WorkerProtocol` objects talk through public methods only
(``worker_ready``, ``worker_gone``, ``ring_soon``, ``pump``...).
"""

from __future__ import annotations

import atexit
import collections
import enum
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Deque, cast

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._codec import Chunk, PicklingFailed, decode, encode
from ._config import WorkersConfig
from ._errors import (
    WorkerCallError, WorkerCrashed, WorkerFunctionError, WorkersUnavailable, WorkerTimeout,
)
from ._ring import (
    KIND_CALL, KIND_ERROR, KIND_FAILURE, KIND_HELLO, KIND_RESULT, KIND_STOP, OFF_BASELINE_RSS,
    OFF_CURRENT_CALL, OFF_RSS, U64, OutgoingMessage, RingConsumer, RingProducer,
    fence,
)
from ._shm import SharedFile, shm_name, sweep_stale
from ._exits import EXIT_OUT_OF_MEMORY, EXIT_PARENT_GONE, EXIT_SETUP

if TYPE_CHECKING:
    from .._app import App
    from .._interfaces import IPipecometReactor
    from .._json import JSON
    from .main import WorkerHello

__all__ = ["WorkerPool", "WorkerProtocol", "WorkerState", "PoolState", "install"]

log = Logger(namespace="pipecomet.workers")

_PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024


#: How a worker process starts: ``pipecomet`` is made a package object
#: whose ``__init__`` (Twisted, Klein...) runs only if the worker's module
#: uses a name from it other than ``worker_function``; a worker then starts
#: in a fraction of the time and memory.
BOOT = """
import importlib.util, sys
spec = importlib.util.find_spec("pipecomet")
pkg = importlib.util.module_from_spec(spec)
sys.modules["pipecomet"] = pkg
def lazy(name):
    if name == "worker_function":
        from pipecomet._workers._registry import worker_function
        return worker_function
    del pkg.__getattr__
    spec.loader.exec_module(pkg)
    return getattr(pkg, name)
pkg.__getattr__ = lazy
from pipecomet._workers.main import main
main(sys.argv[1:])
"""


class WorkerState(enum.Enum):
    """
    A worker process's life: it starts, says hello (ready), holds calls
    (busy), may be asked to finish its calls and go (draining), is told to
    stop or killed (stopping), and ends (dead).
    """

    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    STOPPING = "stopping"
    DEAD = "dead"


_S = WorkerState
#: allowed moves; anything else is a bug and raises.
WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    _S.STARTING: frozenset({_S.READY, _S.STOPPING, _S.DEAD}),
    _S.READY: frozenset({_S.BUSY, _S.DRAINING, _S.STOPPING, _S.DEAD}),
    _S.BUSY: frozenset({_S.READY, _S.DRAINING, _S.STOPPING, _S.DEAD}),
    _S.DRAINING: frozenset({_S.STOPPING, _S.DEAD}),
    _S.STOPPING: frozenset({_S.DEAD}),
    _S.DEAD: frozenset(),
}


class PoolState(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"
    CLOSING = "closing"


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class _Call:
    __slots__ = ("id", "function", "chunks", "length", "timeout", "created", "deferred", "worker")

    def __init__(self, call_id: int, function: str, chunks: list[Chunk], length: int,
                 timeout: float, created: float) -> None:
        self.id = call_id
        self.function = function
        self.chunks = chunks
        self.length = length
        self.timeout = timeout
        self.created = created
        self.deferred: Deferred = None  # type: ignore[assignment]
        self.worker: WorkerProtocol | None = None


class _Slot:
    """
    One of the pool's ``size`` places: the current process, its epoch
    counter, and the crash history the backoff and breaker read.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.epoch = 0
        self.worker: WorkerProtocol | None = None
        self.restart_timer: IDelayedCall | None = None
        self.crash_times: Deque[float] = collections.deque()
        self.consecutive_crashes = 0
        self.broken_until = 0.0
        self.restarts = 0
        self.completed = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.last_cause = ""
        self.ever_ready = False


class WorkerProtocol(ProcessProtocol):
    """
    One worker process: its rings, the calls it holds (in the order it
    runs them), and its lifecycle as a :class:`WorkerState` machine.
    """

    def __init__(self, pool: WorkerPool, slot: _Slot, epoch: int, shm: SharedFile) -> None:
        self.pool = pool
        self.slot = slot
        self.epoch = epoch
        self.shm = shm
        view = shm.view
        assert view is not None  # a file just created
        self.view: memoryview | None = view
        self.requests = RingProducer(*shm.layout.request_ring(view))
        self.responses = RingConsumer(*shm.layout.response_ring(view))
        self.state = WorkerState.STARTING
        self.calls: dict[int, _Call] = {}
        self.backlog: Deque[tuple[OutgoingMessage, _Call | None]] = collections.deque()
        self.pid: int | None = None
        self.info: WorkerHello = {}
        self.head_since = 0.0
        self.deadline_timer: IDelayedCall | None = None
        self.start_timer: IDelayedCall | None = None
        self.stop_reason = ""
        self.bell_fd = -1
        self.completed = 0
        self._stderr = b""
        self._stderr_tail: Deque[str] = collections.deque(maxlen=20)
        self.started_at = pool.reactor.seconds()

    # -- lifecycle

    def _to(self, new: WorkerState) -> None:
        if new not in WORKER_TRANSITIONS[self.state]:
            raise RuntimeError(f"worker {self.slot.index}: {self.state.value} -> {new.value} "
                               "is not a legal transition")
        self.state = new

    @property
    def accepting(self) -> bool:
        return self.state is WorkerState.READY or self.state is WorkerState.BUSY

    def connectionMade(self) -> None:
        assert self.transport is not None  # makeConnection set it
        self.pid = self.transport.pid

    def close_bell(self) -> None:
        """
        Close the write end of the doorbell pipe (the worker is gone).
        """
        fd, self.bell_fd = self.bell_fd, -1
        if fd >= 0:
            os.close(fd)

    def ring(self) -> None:
        """
        One doorbell byte to the worker's stdin: written at once by this
        process (a pipe of its own, given to the child as its stdin through
        ``spawnProcess``'s ``childFDs``), not queued behind the reactor.
        """
        try:
            os.write(self.bell_fd, b"\x01")
        except BlockingIOError:
            pass  # the worker has bells it has not read yet
        except OSError:
            pass  # it is gone; processExited will tell

    # -- sending

    def send(self, call: _Call) -> None:
        if not self.calls:
            self.head_since = self.pool.reactor.seconds()
            if self.state is WorkerState.READY:
                # READY <-> BUSY is the one move made per call: a legal move
                # in the table, set directly to keep the hot path short.
                self.state = WorkerState.BUSY
        self.calls[call.id] = call
        call.worker = self
        requests = self.requests
        if self.backlog:
            self.backlog.append((OutgoingMessage(KIND_CALL, call.id, self.epoch, call.chunks,
                                                 call.length), call))
            return
        if requests.write_small(KIND_CALL, call.id, self.epoch, call.chunks, call.length):
            done = True
        else:
            msg = OutgoingMessage(KIND_CALL, call.id, self.epoch, call.chunks, call.length)
            done = requests.try_write(msg)
        fence()
        if requests.take_consumer_parked():
            pool = self.pool
            pool.ring_soon(self)
        if not done:
            self.backlog.append((msg, call))
            self._wait_for_room()
        timer = self.deadline_timer
        if timer is None:
            self._arm(self.head_since + next(iter(self.calls.values())).timeout)

    def send_stop(self) -> None:
        msg = OutgoingMessage(KIND_STOP, 0, self.epoch, [], 0)
        if self.backlog or not self.requests.try_write(msg):
            self.backlog.append((msg, None))
            self._wait_for_room()
            return
        fence()
        if self.requests.take_consumer_parked():
            self.ring()

    def _wait_for_room(self) -> None:
        requests = self.requests
        while self.backlog:
            requests.set_producer_waiting(True)
            fence()
            if not self._flush_once():
                return
        requests.set_producer_waiting(False)

    def _flush_once(self) -> bool:
        """
        Write what fits from the backlog; True if something was written.
        """
        requests = self.requests
        progressed = False
        while self.backlog:
            msg, _ = self.backlog[0]
            before = msg.sent, msg.started
            done = requests.try_write(msg)
            if (msg.sent, msg.started) != before:
                progressed = True
            if not done:
                break
            self.backlog.popleft()
        if progressed:
            fence()
            if requests.take_consumer_parked():
                self.ring()
        return progressed

    # -- receiving

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.on_bell()
        elif fd == 2:
            self._log_stderr(data)

    def on_bell(self) -> None:
        if self.state is WorkerState.DEAD:
            return
        responses = self.responses
        pool = self.pool
        pool.drain_begins()
        try:
            while True:
                responses.set_consumer_parked(False)
                self.drain()
                if self.state is WorkerState.DEAD:
                    return
                fence()
                if responses.take_producer_waiting():
                    self.ring()
                if self.backlog:
                    self._wait_for_room()
                responses.set_consumer_parked(True)
                fence()
                if not responses.has_data():
                    break
            pool.pump()
        finally:
            pool.drain_ends()

    def drain(self) -> None:
        """
        Take every complete message out of the response ring.
        """
        responses = self.responses
        calls = self.calls
        epoch = self.epoch
        while True:
            msg = responses.next_message()
            if msg is None:
                return
            kind, call_id, msg_epoch, segments = msg
            if msg_epoch != epoch:
                responses.release()
                continue
            if kind == KIND_HELLO:
                try:
                    _, info = decode(segments)
                finally:
                    responses.release()
                self._hello(info)
                continue
            call = calls.pop(call_id, None)
            if call is None:
                responses.release()
                continue
            try:
                _, value = decode(segments)
            except Exception as e:
                kind = KIND_FAILURE
                value = {"code": "undecodable_result",
                         "message": f"cannot unpickle the result: {type(e).__name__}: {e}"}
            finally:
                responses.release()
            self._completed(call, kind, value)

    def _hello(self, info: WorkerHello) -> None:
        if self.start_timer is not None and self.start_timer.active():
            self.start_timer.cancel()
        self.start_timer = None
        self.info = info
        if self.state is WorkerState.STARTING:
            self._to(WorkerState.READY)
            self.slot.ever_ready = True
            self.pool.worker_ready(self)

    def _completed(self, call: _Call, kind: int, value: object) -> None:
        pool = self.pool
        slot = self.slot
        call.worker = None
        call.chunks = None  # type: ignore[assignment]
        if self.calls:
            self.head_since = pool.reactor.seconds()
        elif self.state is WorkerState.BUSY:
            self.state = WorkerState.READY
        self.completed += 1
        if pool.recycling and self.state is not WorkerState.DRAINING:
            # Before the callbacks run: they may send the next call at once.
            pool.maybe_recycle(self)
        d = call.deferred
        if kind == KIND_RESULT:
            slot.completed += 1
            slot.consecutive_crashes = 0
            pool.completed += 1
            if not d.called:
                d.callback(value)
        else:
            pool.call_failed(self, call, kind, value)
        if self.state is WorkerState.DRAINING and not self.calls:
            self.stop(self.stop_reason or "shutdown")

    # -- timeouts

    def _arm(self, deadline: float) -> None:
        reactor = self.pool.reactor
        self.deadline_timer = reactor.callLater(max(0.0, deadline - reactor.seconds()),
                                                self._deadline)

    def _deadline(self) -> None:
        self.deadline_timer = None
        if self.state is WorkerState.DEAD or self.state is WorkerState.STOPPING:
            return
        # Results may be waiting for a bell the reactor has not read yet.
        self.drain()
        if not self.calls:
            return
        head = next(iter(self.calls.values()))
        deadline = self.head_since + head.timeout
        now = self.pool.reactor.seconds()
        if now < deadline:
            self._arm(deadline)
            return
        if not head.deferred.called:
            self.slot.failed["timeout"] += 1
            self.pool.failed["timeout"] += 1
            head.deferred.errback(Failure(WorkerTimeout(
                f"worker function {head.function!r} ran longer than {head.timeout:g}s; "
                "its worker was killed and is being replaced")))
        log.warn("worker {slot} (pid {pid}): call {call_id} to {function!r} timed out after "
                 "{timeout}s; killing the worker", slot=self.slot.index, pid=self.pid,
                 call_id=head.id, function=head.function, timeout=head.timeout)
        self.kill("timeout")

    def start_timed_out(self) -> None:
        self.start_timer = None
        if self.state is WorkerState.STARTING:
            log.warn("worker {slot} (pid {pid}) did not say hello within {t}s; killing it",
                     slot=self.slot.index, pid=self.pid, t=self.pool.config.start_timeout)
            self.kill("start_timeout")

    # -- stopping

    def stop(self, reason: str) -> None:
        """
        Ask the worker to exit once it has read everything sent so far.
        """
        if self.state is WorkerState.STOPPING or self.state is WorkerState.DEAD:
            return
        self.stop_reason = reason
        self._to(WorkerState.STOPPING)
        self.send_stop()

    def drain_and_stop(self, reason: str) -> None:
        if not self.calls or self.state is WorkerState.STARTING:
            self.stop(reason)
        elif self.state in (WorkerState.READY, WorkerState.BUSY):
            self.stop_reason = reason
            self._to(WorkerState.DRAINING)

    def kill(self, reason: str) -> None:
        if self.state is WorkerState.DEAD:
            return
        self.stop_reason = reason
        if self.state is not WorkerState.STOPPING:
            self._to(WorkerState.STOPPING)
        if self.transport is None:
            return  # never started
        try:
            self.transport.signalProcess("KILL")
        except (ProcessExitedAlready, OSError):
            pass

    def processExited(self, reason: Failure) -> None:
        if self.state is WorkerState.DEAD:
            return
        status = reason.value
        exit_code = getattr(status, "exitCode", None)
        sig = getattr(status, "signal", None)
        for timer in (self.deadline_timer, self.start_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.deadline_timer = self.start_timer = None
        try:
            self.drain()  # results it finished before it went are good results
        except Exception:
            log.failure("worker {slot}: reading its last results failed", slot=self.slot.index)
        running = U64.unpack_from(self.view, OFF_CURRENT_CALL)[0] if self.view is not None else 0
        self.state = WorkerState.DEAD
        cause = self._cause(exit_code, sig)
        planned = self.stop_reason in ("recycle", "shutdown") and exit_code == 0
        # The file goes before anyone hears of the death (a stop Deferred
        # may fire inside worker_gone).
        self.view = None
        self.requests = self.responses = None  # type: ignore[assignment]
        self.shm.close()
        self.shm.unlink()
        self.close_bell()
        self.pool.worker_gone(self, running, cause, planned, exit_code, sig)

    def _cause(self, exit_code: int | None, sig: int | None) -> str:
        who = f"worker {self.slot.index} (pid {self.pid})"
        if self.stop_reason == "timeout":
            return f"{who} was killed after a call timed out"
        if self.stop_reason == "start_timeout":
            return f"{who} did not start within {self.pool.config.start_timeout:g}s"
        if sig is not None:
            name = _signal_name(sig)
            extra = " (by the kernel's OOM killer if memory ran out)" if sig == signal.SIGKILL else ""
            return f"{who} was killed by {name}{extra}"
        if exit_code == EXIT_OUT_OF_MEMORY:
            return (f"{who} exceeded its memory limit "
                    f"({self.pool.config.memory_limit_mb} MiB above its start-up size)")
        if exit_code == EXIT_SETUP:
            tail = " | ".join(list(self._stderr_tail)[-3:])
            return f"{who} could not load module {self.pool.config.module!r}: {tail}"
        if exit_code == EXIT_PARENT_GONE:
            return f"{who} lost its server"
        return f"{who} exited with status {exit_code}"

    # -- stderr

    def _log_stderr(self, data: bytes) -> None:
        buf = self._stderr + data
        *lines, self._stderr = buf.split(b"\n")
        if len(self._stderr) > 65536:
            lines.append(self._stderr)
            self._stderr = b""
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr_tail.append(line)
                log.info("worker {slot} (pid {pid}): {line}", slot=self.slot.index, pid=self.pid,
                         line=line)

    # -- figures

    def rss(self) -> int:
        if self.pid is not None and self.state is not WorkerState.DEAD:
            try:
                with open(f"/proc/{self.pid}/statm", "rb") as f:
                    return int(f.read().split()[1]) * _PAGE
            except (OSError, ValueError, IndexError):
                pass
        return 0

    def shm_figure(self, offset: int) -> int:
        if self.view is None:
            return 0
        return U64.unpack_from(self.view, offset)[0]


class WorkerPool(Service):
    """
    A fixed pool of worker processes running registered functions.

    :param config: the ``[workers]`` table.
    :param reactor: the reactor (the global one when None, looked up on start).
    """

    name = "workers"

    def __init__(self, config: WorkersConfig, reactor: IPipecometReactor | None = None) -> None:
        if not config.module:
            raise ValueError("workers.module: name the module the workers import")
        self.config = config
        self._reactor = reactor
        self.state = PoolState.STOPPED
        self.slots = [_Slot(i) for i in range(config.size)]
        self._queue: Deque[_Call] = collections.deque()
        self._queue_timer: IDelayedCall | None = None
        self._next_id = 1
        self._known: frozenset[str] | None = None
        self._token = os.urandom(4).hex()
        self._stopped: Deferred | None = None
        self._stop_timer: IDelayedCall | None = None
        self._ready_waiters: list[Deferred] = []
        self.completed = 0
        self.rejected = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.recycling = bool(config.recycle_calls or config.recycle_rss_mb)
        self._python = config.python or sys.executable
        self._files: set[str] = set()
        self._in_drain = 0
        self._bells: list[WorkerProtocol] = []

    @property
    def reactor(self) -> IPipecometReactor:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = cast("IPipecometReactor", reactor)
        return self._reactor

    # -- service

    def startService(self) -> None:
        super().startService()
        removed = sweep_stale(self.config.shm_dir)
        if removed:
            log.info("removed {n} worker files left by dead servers", n=len(removed))
        self.state = PoolState.RUNNING
        atexit.register(self._unlink_all)
        for slot in self.slots:
            self._spawn(slot)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._stopped is not None:
            return self._stopped
        self._stopped = Deferred()
        self.state = PoolState.CLOSING
        queued, self._queue = self._queue, collections.deque()
        for call in queued:
            self._fail(call, WorkersUnavailable("the worker pool is shutting down",
                                                code="pool_closing"), "closing")
        if self._queue_timer is not None and self._queue_timer.active():
            self._queue_timer.cancel()
        for slot in self.slots:
            if slot.restart_timer is not None and slot.restart_timer.active():
                slot.restart_timer.cancel()
            slot.restart_timer = None
            if slot.worker is not None:
                slot.worker.drain_and_stop("shutdown")
        self._stop_timer = self.reactor.callLater(self.config.shutdown_timeout, self._kill_all)
        for d in self._ready_waiters:
            d.errback(Failure(WorkersUnavailable("the worker pool stopped", code="pool_closing")))
        self._ready_waiters = []
        self._maybe_stopped()
        return self._stopped

    def _kill_all(self) -> None:
        self._stop_timer = None
        for slot in self.slots:
            if slot.worker is not None:
                log.warn("worker {slot}: still busy at the shutdown deadline; killing it",
                         slot=slot.index)
                slot.worker.kill("shutdown")

    def _maybe_stopped(self) -> None:
        if self.state is PoolState.CLOSING and all(s.worker is None for s in self.slots):
            self.state = PoolState.STOPPED
            if self._stop_timer is not None and self._stop_timer.active():
                self._stop_timer.cancel()
            self._stop_timer = None
            self._unlink_all()
            d, self._stopped = self._stopped, None
            if d is not None:
                d.callback(None)

    def _unlink_all(self) -> None:
        for path in list(self._files):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._files.clear()

    def ready(self) -> Deferred:
        """
        Fires when every worker has said hello (for tests and benchmarks);
        fails if the pool stops first.
        """
        d: Deferred = Deferred()
        if self._all_ready():
            d.callback(self)
        else:
            self._ready_waiters.append(d)
        return d

    def _all_ready(self) -> bool:
        return all(s.worker is not None and s.worker.accepting for s in self.slots)

    # -- spawning

    def _spawn(self, slot: _Slot) -> None:
        slot.restart_timer = None
        if self.state is not PoolState.RUNNING:
            return
        cfg = self.config
        slot.epoch += 1
        pid = os.getpid()
        path = os.path.join(cfg.shm_dir, shm_name(pid, self._token, slot.index, slot.epoch))
        try:
            shm = SharedFile.create(path, cfg.ring_bytes, slot.epoch, slot.index, pid)
        except OSError as e:
            log.error("worker {slot}: cannot create {path}: {e}", slot=slot.index, path=path, e=e)
            self._after_crash(slot, f"cannot create its shared-memory file: {e}")
            return
        self._files.add(path)
        proto = WorkerProtocol(self, slot, slot.epoch, shm)
        # The server starts parked on the responses: the hello rings it.
        proto.responses.set_consumer_parked(True)
        args = [self._python, "-c", BOOT, "--shm", path,
                "--module", cfg.module, "--server-pid", str(pid),
                "--memory-limit", str(cfg.memory_limit_mb * MiB),
                "--oom-score-adj", str(cfg.oom_score_adj), "--spin-us", str(cfg.spin_us)]
        # The doorbell: a pipe of our own as the child's stdin, so a bell is
        # one os.write() now (no reactor write buffer in between).
        bell_read, bell_write = os.pipe()
        os.set_blocking(bell_write, False)
        try:
            self.reactor.spawnProcess(proto, self._python, args, env=self._environment(),
                                      childFDs={0: bell_read, 1: "r", 2: "r"})
        except Exception as e:
            os.close(bell_write)
            shm.close()
            shm.unlink()
            self._files.discard(path)
            log.error("worker {slot}: cannot start: {e}", slot=slot.index, e=e)
            self._after_crash(slot, f"cannot start: {e}")
            return
        finally:
            os.close(bell_read)  # the child has its copy
        proto.bell_fd = bell_write
        slot.worker = proto
        proto.start_timer = self.reactor.callLater(cfg.start_timeout, proto.start_timed_out)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self._python == sys.executable:
            # The workers must import what the server can: give them its path
            # (twistd may have added the working directory, or changed it).
            paths = [p if p else os.getcwd() for p in sys.path]
            paths = [p for p in paths if os.path.isdir(p)]
            if env.get("PYTHONPATH"):
                paths.append(env["PYTHONPATH"])
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        return env

    def worker_ready(self, worker: WorkerProtocol) -> None:
        functions = worker.info.get("functions", ())
        self._known = frozenset(functions)
        log.info("worker {slot} ready (pid {pid}, {n} functions from {module})",
                 slot=worker.slot.index, pid=worker.pid, n=len(functions),
                 module=self.config.module)
        if self.state is not PoolState.RUNNING:
            worker.stop("shutdown")
            return
        self.pump()
        if self._ready_waiters and self._all_ready():
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                d.callback(self)

    def worker_gone(self, worker: WorkerProtocol, running: int, cause: str, planned: bool,
                     exit_code: int | None, sig: int | None) -> None:
        slot = worker.slot
        if slot.worker is worker:
            slot.worker = None
        self._files.discard(worker.shm.path)
        requeue: list[_Call] = []
        failed: list[int] = []
        reason = worker.stop_reason
        if exit_code == EXIT_OUT_OF_MEMORY:
            kind = "memory"
        elif reason == "timeout":
            kind = "timeout"
        else:
            kind = "crash"
        for call in worker.calls.values():
            call.worker = None
            if call.deferred.called:
                continue
            if call.id == running or (reason == "shutdown" and not planned):
                failed.append(call.id)
                if reason == "shutdown":
                    err: Exception = WorkersUnavailable(
                        "the worker pool stopped before the call finished", code="pool_closing")
                else:
                    err = WorkerCrashed(f"{cause} while running {call.function!r}")
                self._fail(call, err, kind if kind != "timeout" else "crash", slot)
            else:
                requeue.append(call)
        worker.calls.clear()
        worker.backlog.clear()
        slot.last_cause = cause
        if planned:
            log.info("{cause}: stopped as asked ({reason})", cause=cause, reason=reason)
        else:
            log.warn("{cause}; failed calls {failed}, requeued {n} not yet started",
                     cause=cause, failed=failed, n=len(requeue))
        if requeue:
            # They were dispatched before anything still queued: keep them first.
            self._queue.extendleft(reversed(requeue))
            self._arm_queue_timer()
        if self.state is not PoolState.RUNNING:
            for call in requeue:
                self._fail(call, WorkersUnavailable("the worker pool is shutting down",
                                                    code="pool_closing"), "closing")
            self._queue.clear()
            self._maybe_stopped()
            return
        slot.restarts += 1
        if planned or reason == "timeout":
            self._spawn(slot)
        else:
            self._after_crash(slot, cause)
        self.pump()

    def _after_crash(self, slot: _Slot, cause: str) -> None:
        cfg = self.config
        now = self.reactor.seconds()
        slot.crash_times.append(now)
        while slot.crash_times and slot.crash_times[0] < now - cfg.crash_loop_window:
            slot.crash_times.popleft()
        slot.consecutive_crashes += 1
        if len(slot.crash_times) >= cfg.crash_loop_crashes:
            slot.broken_until = now + cfg.crash_loop_cooldown
            slot.crash_times.clear()
            delay = cfg.crash_loop_cooldown
            log.error("worker {slot} crashed {n} times within {w}s (last: {cause}); leaving it "
                      "down for {c}s", slot=slot.index, n=cfg.crash_loop_crashes,
                      w=cfg.crash_loop_window, cause=cause, c=cfg.crash_loop_cooldown)
            if not slot.ever_ready:
                self._fail_ready_waiters(cause)
        else:
            delay = min(cfg.restart_backoff_max,
                        cfg.restart_backoff * (2 ** (slot.consecutive_crashes - 1)))
        slot.restart_timer = self.reactor.callLater(delay, self._spawn, slot)
        if self._all_down():
            queued, self._queue = self._queue, collections.deque()
            for call in queued:
                self._fail(call, WorkersUnavailable(f"no worker is running ({cause})",
                                                    code="workers_down"), "unavailable")

    def _fail_ready_waiters(self, cause: str) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.errback(Failure(WorkersUnavailable(f"workers cannot start: {cause}",
                                                 code="workers_down")))

    def _all_down(self) -> bool:
        now = self.reactor.seconds()
        return all(s.worker is None and s.broken_until > now for s in self.slots)

    # -- recycling

    def maybe_recycle(self, worker: WorkerProtocol) -> None:
        cfg = self.config
        reason = ""
        if cfg.recycle_calls and worker.completed >= cfg.recycle_calls:
            reason = f"{worker.completed} calls"
        elif cfg.recycle_rss_mb:
            rss = worker.shm_figure(OFF_RSS)
            base = worker.shm_figure(OFF_BASELINE_RSS)
            if rss - base > cfg.recycle_rss_mb * MiB:
                reason = f"RSS {rss // MiB} MiB, {(rss - base) // MiB} MiB above its baseline"
        if reason:
            log.info("worker {slot} (pid {pid}): recycling after {reason}", slot=worker.slot.index,
                     pid=worker.pid, reason=reason)
            worker.drain_and_stop("recycle")

    # -- calls

    def call(self, function: str, payload: object = None,
             timeout: float | None = None) -> Deferred[Any]:
        """
        Run worker function ``function`` on ``payload`` in a worker process.

        :param timeout: seconds the call may run (``call_timeout`` when None);
            past it the worker is killed and the call fails with 504.
        :returns: a Deferred of the function's value.  Cancelling it drops a
            queued call; a running call finishes in its worker and its
            result is discarded.
        """
        if self.state is not PoolState.RUNNING:
            return defer.fail(WorkersUnavailable("the worker pool is not running", code="pool_closing"))
        known = self._known
        if known is not None and function not in known:
            err = WorkerCallError(f"no worker function named {function!r} in module "
                                  f"{self.config.module!r}", code="unknown_function")
            return self._reject(err, function)
        try:
            chunks, length = encode(payload, function.encode("utf-8"))
        except PicklingFailed as e:
            err = WorkerCallError(f"the argument of worker function {function!r} "
                                  f"({type(payload).__name__}) cannot be pickled: {e}",
                                  code="unpicklable_argument")
            return self._reject(err, function)
        reactor = self.reactor
        call = _Call(self._next_id, function, chunks, length,
                     timeout if timeout is not None else self.config.call_timeout, reactor.seconds())
        self._next_id += 1
        d: Deferred[Any] = Deferred(lambda _: self._cancel(call))
        call.deferred = d
        if not self._queue:
            worker = self._pick()
            if worker is not None:
                worker.send(call)
                return d
        if len(self._queue) >= self.config.queue:
            self.rejected += 1
            self.failed["queue_full"] += 1
            d.errback(Failure(WorkersUnavailable(
                f"the worker queue is full ({self.config.queue} calls waiting)", code="queue_full")))
            return d
        if self._all_down():
            self.failed["unavailable"] += 1
            d.errback(Failure(WorkersUnavailable("no worker is running", code="workers_down")))
            return d
        self._queue.append(call)
        self._arm_queue_timer()
        return d

    def _reject(self, err: Exception, function: str) -> Deferred:
        self.failed[getattr(err, "code", "error")] += 1
        log.error("worker call to {function!r} refused: {message} (error id {error_id})",
                  function=function, message=str(err), error_id=getattr(err, "error_id", ""))
        return defer.fail(err)

    def _pick(self) -> WorkerProtocol | None:
        best = None
        best_n = self.config.max_in_flight
        for slot in self.slots:
            w = slot.worker
            if w is not None and (w.state is WorkerState.READY or w.state is WorkerState.BUSY):
                n = len(w.calls)
                if n < best_n:
                    best, best_n = w, n
                    if n == 0:
                        break
        return best

    # -- called by the WorkerProtocols

    def ring_soon(self, worker: WorkerProtocol) -> None:
        """
        Ring ``worker``'s doorbell: now, or once the drain of results in
        progress ends when calls are sent from result callbacks (one bell
        then wakes the worker to a batch instead of to each call).
        """
        if self._in_drain:
            self._bells.append(worker)
        else:
            worker.ring()

    def drain_begins(self) -> None:
        """
        A worker starts handing out results (see :meth:`ring_soon`).
        """
        self._in_drain += 1

    def drain_ends(self) -> None:
        """
        The drain is over: ring the bells held meanwhile.
        """
        self._in_drain -= 1
        if not self._in_drain and self._bells:
            bells, self._bells = self._bells, []
            for worker in bells:
                worker.ring()

    def pump(self) -> None:
        queue = self._queue
        while queue:
            worker = self._pick()
            if worker is None:
                return
            call = queue.popleft()
            if not call.deferred.called:
                worker.send(call)

    def _cancel(self, call: _Call) -> None:
        if call.worker is None:
            try:
                self._queue.remove(call)
            except ValueError:
                pass
        self.failed["cancelled"] += 1

    def _fail(self, call: _Call, error: Exception, cause: str, slot: _Slot | None = None) -> None:
        self.failed[cause] += 1
        if slot is not None:
            slot.failed[cause] += 1
        if not call.deferred.called:
            call.deferred.errback(Failure(error))

    def call_failed(self, worker: WorkerProtocol, call: _Call, kind: int, value: object) -> None:
        slot = worker.slot
        if kind == KIND_ERROR and isinstance(value, dict):
            raised = WorkerFunctionError(call.function, value.get("type", "?"),
                                         value.get("message", ""), value.get("traceback", ""))
            err: Exception = raised
            log.error("worker function {function!r} raised {exc_type}: {exc_message} "
                      "(error id {error_id}, worker {slot}, pid {pid})\n{traceback}",
                      function=call.function, exc_type=raised.exc_type,
                      exc_message=raised.exc_message, error_id=raised.error_id,
                      slot=slot.index, pid=worker.pid, traceback=raised.remote_traceback)
            cause = "exception"
        else:
            info = value if isinstance(value, dict) else {}
            err = WorkerCallError(info.get("message", "the call could not run"),
                                  code=info.get("code", "worker_call_error"))
            log.error("worker call to {function!r} failed: {message} (error id {error_id})",
                      function=call.function, message=err.message, error_id=err.error_id)
            cause = err.code
        self._fail(call, err, cause, slot)

    def _arm_queue_timer(self) -> None:
        if self._queue_timer is None and self._queue:
            head = self._queue[0]
            reactor = self.reactor
            delay = max(0.0, head.created + self.config.queue_timeout - reactor.seconds())
            self._queue_timer = reactor.callLater(delay, self._queue_deadline)

    def _queue_deadline(self) -> None:
        self._queue_timer = None
        now = self.reactor.seconds()
        limit = self.config.queue_timeout
        queue = self._queue
        while queue and queue[0].created + limit <= now:
            call = queue.popleft()
            self._fail(call, WorkersUnavailable(
                f"no worker was free within {limit:g}s", code="queue_timeout"), "queue_timeout")
        self._arm_queue_timer()

    # -- figures

    def status(self) -> dict[str, Any]:
        """
        Live figures for ``/_pipecomet/status``.
        """
        workers = []
        for slot in self.slots:
            w = slot.worker
            workers.append({
                "slot": slot.index,
                "state": w.state.value if w is not None else (
                    "broken" if slot.broken_until > self.reactor.seconds() else "restarting"),
                "pid": w.pid if w is not None else None,
                "epoch": slot.epoch,
                "in_flight": len(w.calls) if w is not None else 0,
                "completed": slot.completed,
                "failed": dict(slot.failed),
                "restarts": slot.restarts,
                "calls_this_process": w.completed if w is not None else 0,
                "rss_bytes": w.rss() if w is not None else 0,
                "baseline_rss_bytes": w.shm_figure(OFF_BASELINE_RSS) if w is not None else 0,
                "last_cause": slot.last_cause,
            })
        return {
            "state": self.state.value,
            "module": self.config.module,
            "size": self.config.size,
            "queued": len(self._queue),
            "queue_limit": self.config.queue,
            "in_flight": sum(w["in_flight"] for w in workers),
            "completed": self.completed,
            "rejected": self.rejected,
            "failed": dict(self.failed),
            "restarts": sum(s.restarts for s in self.slots),
            "rss_bytes": sum(w["rss_bytes"] for w in workers),
            "workers": workers,
        }


def install(app: App, config: WorkersConfig) -> None:
    """
    Build the pool from ``[workers]`` when it names a module: set
    ``app.runtime.workers``, show its figures on the status page, and start
    and stop it with the app.
    """
    if not config.module:
        return
    pool = WorkerPool(config, reactor=app.reactor)
    app.runtime.workers = pool
    app.runtime.status_sources["workers"] = pool.status
    app.add_service(pool)
