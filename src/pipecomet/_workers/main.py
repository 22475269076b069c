"""
The worker process: ``python -m pipecomet._workers.main --shm PATH --module MOD``.

It maps the file its server made, imports the functions module, says hello
through the response ring, then runs calls one after another.  Its stdin
and stdout are doorbells only (the user's prints go to stderr): it sleeps
on stdin when the request ring is empty and writes one byte to stdout only
when the server has said it is parked.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import signal
import sys
import time
import traceback
from time import perf_counter
from typing import TypedDict

from ._codec import Chunk, PicklingFailed, decode, encode
from ._exits import EXIT_OUT_OF_MEMORY, EXIT_PARENT_GONE, EXIT_SETUP
from ._registry import REGISTRY, WorkerFunction
from ._ring import (
    KIND_CALL, KIND_ERROR, KIND_FAILURE, KIND_HELLO, KIND_RESULT, KIND_STOP, OFF_BASELINE_RSS,
    OFF_CALLS_DONE, OFF_CURRENT_CALL, OFF_RSS, OFF_WORKER_PID, U32, U64, OutgoingMessage,
    RingConsumer, RingProducer, fence,
)
from ._shm import SharedFile


#: a parked worker looks at its ring at least this often, so that even a
#: lost doorbell costs a delay, never a hang
PARK_TIMEOUT_MS = 1000
#: RSS is read from /proc after this many calls or seconds, whichever first
RSS_EVERY_CALLS = 64
RSS_EVERY_SECONDS = 0.25

_PAGE = os.sysconf("SC_PAGE_SIZE")


class WorkerHello(TypedDict, total=False):
    """
    What a worker says once it is ready (the server keeps it as ``info``).
    """

    pid: int
    functions: list[str]
    module: str
    baseline_rss: int
    python: str


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def _set_parent_death_signal() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass  # stdin EOF still tells the worker its server is gone


def _limit_memory(extra: int) -> None:
    """
    Cap the address space at its size after start-up plus ``extra`` bytes:
    an allocation past that raises MemoryError in the worker, before the
    kernel has to choose a victim.
    """
    if extra > 0:
        import resource

        with open("/proc/self/statm", "rb") as f:
            size = int(f.read().split()[0]) * _PAGE
        resource.setrlimit(resource.RLIMIT_AS, (size + extra, size + extra))


def _raise_oom_score(adj: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(adj))
    except OSError:
        pass


class Worker:
    def __init__(self, shm: SharedFile, epoch: int, bell_in: int, bell_out: int,
                 functions: dict[str, WorkerFunction], spin: float = 0.0) -> None:
        self.shm = shm
        self.spin = spin
        self.epoch = epoch
        view = shm.view
        assert view is not None  # a file just opened
        self.view = view
        self.requests = RingConsumer(*shm.layout.request_ring(view))
        self.responses = RingProducer(*shm.layout.response_ring(view))
        self.bell_in = bell_in
        self.bell_out = bell_out
        self.functions = functions
        self.calls_done = 0
        # Written on every call: one-item native views, cheaper than struct.
        self._current = view[OFF_CURRENT_CALL:OFF_CURRENT_CALL + 8].cast("Q")
        self._done = view[OFF_CALLS_DONE:OFF_CALLS_DONE + 8].cast("Q")
        self._rss_calls = 0
        self._rss_time = time.monotonic()

    # -- doorbells

    def _drain_bell(self) -> None:
        try:
            while True:
                data = os.read(self.bell_in, 4096)
                if not data:
                    self._parent_gone()
                if len(data) < 4096:
                    return
        except BlockingIOError:
            return

    def _sleep(self) -> None:
        poller = select.poll()
        poller.register(self.bell_in, select.POLLIN)
        events = poller.poll(PARK_TIMEOUT_MS)
        for _, ev in events:
            if ev & (select.POLLHUP | select.POLLERR) and not ev & select.POLLIN:
                self._parent_gone()

    def _parent_gone(self) -> None:
        self.shm.unlink()
        os._exit(EXIT_PARENT_GONE)

    def _ring_server(self) -> None:
        try:
            os.write(self.bell_out, b"\x01")
        except BlockingIOError:
            pass  # the pipe is full of bells the server has not read yet
        except BrokenPipeError:
            self._parent_gone()

    # -- rings

    def next_request(self) -> tuple[int, int, int, list[memoryview]]:
        requests = self.requests
        while True:
            msg = requests.next_message()
            if msg is not None:
                return msg
            # Parts of a long call were read: the server may wait for room.
            self._after_consume()
            if self.spin and not requests.gathering:
                # Right after a call the next one often comes within tens of
                # microseconds: looking for it a little while costs less than
                # going to sleep and being woken.
                end = perf_counter() + self.spin
                while perf_counter() < end and not requests.has_data():
                    pass
                if requests.has_data():
                    continue
            # Park: say so, then look again, then sleep on the doorbell.
            requests.set_consumer_parked(True)
            self._drain_bell()  # a system call: orders the flag before the re-check
            if requests.has_data():
                requests.set_consumer_parked(False)
                continue
            self._sleep()
            requests.set_consumer_parked(False)

    def send(self, kind: int, call_id: int, chunks: list[Chunk], length: int) -> None:
        responses = self.responses
        if responses.write_small(kind, call_id, self.epoch, chunks, length):
            fence()
            if responses.take_consumer_parked():
                self._ring_server()
            return
        msg = OutgoingMessage(kind, call_id, self.epoch, chunks, length)
        while True:
            done = responses.try_write(msg)
            if msg.sent:
                fence()
                if responses.take_consumer_parked():
                    self._ring_server()
            if done:
                return
            responses.set_producer_waiting(True)
            self._drain_bell()
            if responses.free() >= min(msg.length - msg.sent + 64, responses.cap // 2):
                responses.set_producer_waiting(False)
                continue
            self._sleep()
            responses.set_producer_waiting(False)

    def _after_consume(self) -> None:
        # The server may be waiting for room to send the rest of a call.
        fence()
        if self.requests.take_producer_waiting():
            self._ring_server()

    # -- calls

    def hello(self, module: str) -> None:
        baseline = rss_bytes()
        U64.pack_into(self.view, OFF_BASELINE_RSS, baseline)
        U64.pack_into(self.view, OFF_RSS, baseline)
        U32.pack_into(self.view, OFF_WORKER_PID, os.getpid())
        info: WorkerHello = {"pid": os.getpid(), "functions": sorted(self.functions),
                             "module": module, "baseline_rss": baseline,
                             "python": sys.version.split()[0]}
        chunks, n = encode(info)
        self.send(KIND_HELLO, 0, chunks, n)

    def run(self) -> None:
        functions = self.functions
        requests = self.requests
        current = self._current
        monotonic = time.monotonic
        while True:
            kind, call_id, epoch, segments = self.next_request()
            if kind == KIND_STOP:
                requests.release()
                return
            if kind != KIND_CALL or epoch != self.epoch:
                requests.release()
                self._after_consume()
                continue
            try:
                name, payload = decode(segments)
            except Exception as e:
                requests.release()
                self._after_consume()
                self._fail(call_id, "undecodable", f"cannot unpickle the argument: {type(e).__name__}: {e}")
                continue
            del segments  # the views into the ring go before release()
            requests.release()
            self._after_consume()
            func = functions.get(name)
            if func is None:
                self._fail(call_id, "unknown_function", f"no worker function named {name!r}")
                continue
            current[0] = call_id
            try:
                value = func(payload)
            except MemoryError:
                payload = None
                os._exit(EXIT_OUT_OF_MEMORY)
            except BaseException as e:
                payload = None
                self._error(call_id, e)
            else:
                payload = None
                try:
                    chunks, n = encode(value)
                except PicklingFailed as e:
                    self._fail(call_id, "unpicklable_result",
                               f"the result of {name!r} ({type(value).__name__}) cannot be pickled: {e}")
                except MemoryError:
                    os._exit(EXIT_OUT_OF_MEMORY)
                else:
                    value = None
                    self.send(KIND_RESULT, call_id, chunks, n)
            self.calls_done += 1
            self._done[0] = self.calls_done
            current[0] = 0
            self._rss_calls += 1
            if self._rss_calls >= RSS_EVERY_CALLS or monotonic() - self._rss_time > RSS_EVERY_SECONDS:
                self._measure()

    def _measure(self) -> None:
        self._rss_calls = 0
        self._rss_time = time.monotonic()
        U64.pack_into(self.view, OFF_RSS, rss_bytes())

    def _error(self, call_id: int, e: BaseException) -> None:
        info = {"type": f"{type(e).__module__}.{type(e).__qualname__}".removeprefix("builtins."),
                "message": str(e), "traceback": traceback.format_exc()}
        chunks, n = encode(info)
        self.send(KIND_ERROR, call_id, chunks, n)

    def _fail(self, call_id: int, code: str, message: str) -> None:
        chunks, n = encode({"code": code, "message": message})
        self.send(KIND_FAILURE, call_id, chunks, n)


def _doorbells() -> tuple[int, int]:
    """
    Keep stdin/stdout as private doorbell descriptors and point fds 0 and 1
    elsewhere, so that a print in a user's function cannot ring a bell.
    """
    bell_in = os.dup(0)
    bell_out = os.dup(1)
    os.set_blocking(bell_in, False)
    os.set_blocking(bell_out, False)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return bell_in, bell_out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipecomet._workers.main")
    parser.add_argument("--shm", required=True)
    parser.add_argument("--module", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--memory-limit", type=int, default=0)
    parser.add_argument("--oom-score-adj", type=int, default=1000)
    parser.add_argument("--spin-us", type=float, default=0.0)
    args = parser.parse_args(argv)
    bell_in, bell_out = _doorbells()
    _set_parent_death_signal()
    if os.getppid() != args.server_pid:
        os._exit(EXIT_PARENT_GONE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when a worker stops
    _raise_oom_score(args.oom_score_adj)
    try:
        shm, epoch, slot, server_pid = SharedFile.open(args.shm)
        importlib.import_module(args.module)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(EXIT_SETUP)
    _limit_memory(args.memory_limit)
    worker = Worker(shm, epoch, bell_in, bell_out, dict(REGISTRY), spin=args.spin_us / 1e6)
    worker.hello(args.module)
    worker.run()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
