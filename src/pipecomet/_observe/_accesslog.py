"""
The access log: one line per answered request, text or JSON, kept in a
buffer on the reactor thread and written in batches by a thread of its own.

twisted.web's own access log formats a line and sends it through the log
observers for every request, which cost 42% of a small chain's throughput;
here a request costs one formatted string appended to a list, and the
file or standard output is written once a second (or when the buffer is
full).  A writer that cannot keep up (a full pipe, a slow disk) never
blocks the reactor: past ``access_max_pending_bytes`` the lines are
dropped and counted.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from json.encoder import encode_basestring as _json_str
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ._requests import RequestRecord

__all__ = ["AccessLog", "AccessLogService", "FileWriter", "MemoryWriter"]

log = Logger()

_TOKEN = re.compile(rb"(token=)[^&]*")


def _redact(uri: bytes) -> bytes:
    return _TOKEN.sub(rb"\1***", uri) if b"token=" in uri else uri


class AccessWriter(Protocol):
    """
    Where the access log's batches go (:class:`FileWriter`, or
    :class:`MemoryWriter` in tests).
    """

    #: bytes handed over and not written yet
    pending_bytes: int

    def start(self) -> None: ...

    def write(self, data: bytes) -> bool: ...

    def close(self) -> Deferred[None]: ...


class MemoryWriter:
    """
    A writer that keeps what it is given (unit tests).
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.pending_bytes = 0

    def start(self) -> None:
        pass

    def write(self, data: bytes) -> bool:
        self.chunks.append(data)
        return True

    def close(self) -> Deferred:
        return succeed(None)

    def lines(self) -> list[str]:
        return b"".join(self.chunks).decode("utf-8").splitlines()


class FileWriter:
    """
    Writes batches to a file (appending) or to standard output from one
    daemon thread, so a slow destination never blocks the reactor.

    :param path: a file path, or ``"-"`` for standard output.
    :param max_pending: bytes that may wait for the thread; a batch that
        would exceed it is refused (:meth:`write` returns False).
    """

    def __init__(self, reactor: IReactorTime, path: str, max_pending: int) -> None:
        self.reactor = reactor
        self.path = path
        self.max_pending = max_pending
        self.pending_bytes = 0
        self._fd = -1
        self._queue: deque[bytes | None] = deque()
        self._cond = threading.Condition()
        self._done: Deferred = Deferred()
        self._thread: threading.Thread | None = None
        self._sync = False
        self._threads: IReactorFromThreads | None = None

    def start(self) -> None:
        """
        Open the destination and start the thread (when the app starts:
        after twistd has daemonized, so the thread and the descriptor are
        the serving process's).
        """
        if self._thread is not None or self._sync:
            return
        if self.path == "-":
            # A duplicate of fd 1: twistd replaces sys.stdout with a file
            # that logs every write, which is what this avoids.
            self._fd = os.dup(1)
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        threads = IReactorFromThreads(self.reactor, None)
        if threads is None:
            # A fake clock (unit tests): no thread, batches are written at once.
            self._sync = True
            return
        self._threads = threads
        self._thread = threading.Thread(target=self._run, name="pipecomet-access-log",
                                        daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> bool:
        if self._sync:
            self._write_all(data)
            return True
        n = len(data)
        with self._cond:
            if self.pending_bytes + n > self.max_pending:
                return False
            self.pending_bytes += n
            self._queue.append(data)
            self._cond.notify()
        return True

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue:
                        self._cond.wait()
                    data = self._queue.popleft()
                if data is None:
                    return
                self._write_all(data)
                with self._cond:
                    self.pending_bytes -= len(data)
        finally:
            try:
                os.close(self._fd)
            except OSError:
                pass
            if self._threads is not None:
                self._threads.callFromThread(self._finished)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:
            pass  # a closed pipe or a full disk: the lines are lost, the server goes on

    def _finished(self) -> None:
        if not self._done.called:
            self._done.callback(None)

    def close(self, timeout: float = 5.0) -> Deferred:
        """
        Write what is queued, then stop the thread; fires when done (or
        after ``timeout`` seconds, should the destination hang).
        """
        if self._thread is None:
            if self._sync:
                self._sync = False
                os.close(self._fd)
            return succeed(None)
        with self._cond:
            self._queue.append(None)
            self._cond.notify()
        timer = self.reactor.callLater(timeout, self._finished)
        self._done.addBoth(lambda r: timer.cancel() if timer.active() else None)
        return self._done


class AccessLog:
    """
    Formats each answered request into the buffer; :meth:`flush` hands the
    buffer to the writer.

    What a line costs was measured (``make bench-http``, ``make
    bench-accesslog``) and cut down: the text line is made as bytes in one
    ``%`` format (the request line and headers are bytes already, nothing
    is decoded and encoded again), the time stamp is made once a second,
    the client's address, the route and the protocol version are turned
    into bytes once and kept, and the buffer is one list of bytes joined
    per batch.

    :param writer: ``write(bytes) -> bool`` (False: refused, lines dropped).
    :param line_format: ``"text"`` (the combined log format, then the
        duration in seconds, the request id, the route and the error) or
        ``"json"`` (one object per line).
    :param buffer_bytes: flush as soon as the buffer holds this much.
    """

    def __init__(self, writer: AccessWriter, line_format: str = "text",
                 buffer_bytes: int = 65536) -> None:
        self.writer = writer
        self.json = line_format == "json"
        self.buffer_bytes = buffer_bytes
        self.lines = 0
        self.dropped = 0
        self.writes = 0
        self._buffer: list[str] = []
        self._size = 0
        self._second = -1
        self._stamp = ""

    def _time(self, now: float) -> str:
        """
        The time stamp of second ``now``, made once per second.
        """
        second = int(now)
        if second != self._second:
            self._second = second
            fmt = "%Y-%m-%dT%H:%M:%S" if self.json else "%d/%b/%Y:%H:%M:%S +0000"
            self._stamp = time.strftime(fmt, time.gmtime(second))
        return self._stamp

    def record(self, request: Any, record: RequestRecord, status: int,
               duration: float) -> None:
        """
        Add one request's line (called when its response ended).
        """
        end = record.start + duration
        stamp = self._stamp if int(end) == self._second else self._time(end)
        addr = request.getClientAddress()
        host = addr.host if isinstance(addr, (IPv4Address, IPv6Address)) else "-"
        headers = request.requestHeaders
        agent = headers.getRawHeaders(b"user-agent")
        referer = headers.getRawHeaders(b"referer")
        uri = request.uri
        if b"token=" in uri:
            uri = _redact(uri)
        if self.json:
            line = self._json_line(request, record, status, duration, end, stamp, host, uri,
                                   agent, referer)
        else:
            version = _VERSIONS.get(request.clientproto)
            if version is None:
                version = request.clientproto.decode("ascii", "replace")
            line = (
                f'{host} - - [{stamp}] "{record.method} {uri.decode("utf-8", "replace")} '
                f'{version}" {status} {request.sentLength} '
                f'"{_header_field(referer) if referer else "-"}" '
                f'"{_header_field(agent) if agent else "-"}" {duration:.6f} '
                f'{record.request_id} {record.route}'
                f'{"" if record.error_code is None else _error_field(record)}\n'
            )
        self._buffer.append(line)
        self.lines += 1
        self._size += len(line)
        if self._size >= self.buffer_bytes:
            self.flush()

    def _json_line(self, request: Any, record: RequestRecord, status: int, duration: float,
                   end: float, stamp: str, host: str, uri: bytes, agent: list[bytes] | None,
                   referer: list[bytes] | None) -> str:
        line = (
            f'{{"time":"{stamp}.{int((end % 1) * 1e6):06d}Z",'
            f'"remote":{_json_str(host)},"method":"{record.method}",'
            f'"uri":{_json_str(uri.decode("utf-8", "replace"))},"status":{status},'
            f'"bytes":{request.sentLength},"duration":{duration:.6f},'
            f'"request_id":"{record.request_id}","route":{_json_str(record.route)}'
        )
        if agent:
            line += ',"user_agent":' + _json_str(agent[0].decode("utf-8", "replace"))
        if referer:
            line += ',"referer":' + _json_str(referer[0].decode("utf-8", "replace"))
        if record.error_code is not None:
            line += (f',"error_code":{_json_str(record.error_code)},'
                     f'"error_id":{_json_str(record.error_id or "")}')
        return line + "}\n"

    def flush(self) -> None:
        """
        Hand the buffered lines to the writer.
        """
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        self._size = 0
        if self.writer.write("".join(lines).encode("utf-8")):
            self.writes += 1
        else:
            self.dropped += len(lines)

    def status(self) -> dict[str, int]:
        return {"lines": self.lines, "dropped": self.dropped, "writes": self.writes,
                "buffered": len(self._buffer), "pending_bytes": self.writer.pending_bytes}


#: Protocol versions as text, without decoding them per request.
_VERSIONS = {b"HTTP/1.1": "HTTP/1.1", b"HTTP/1.0": "HTTP/1.0"}


def _header_field(values: list[bytes]) -> str:
    """
    A header's first value for a quoted field of the text line (a ``"`` in
    it written ``%22`` so the field stays one field).
    """
    return values[0].decode("utf-8", "replace").replace('"', "%22")


def _error_field(record: RequestRecord) -> str:
    return f" {record.error_code}:{record.error_id}"


class AccessLogService(Service):
    """
    Flushes the access log every ``interval`` seconds on the reactor, and
    once more (then closes the writer) when the app stops.
    """

    name = "access-log"

    def __init__(self, access: AccessLog, reactor: IReactorTime, interval: float) -> None:
        self.access = access
        self._call = LoopingCall(access.flush)
        self._call.clock = reactor
        self.interval = interval

    def startService(self) -> None:
        super().startService()
        self.access.writer.start()
        self._call.start(self.interval, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._call.running:
            self._call.stop()
        self.access.flush()
        return self.access.writer.close()
