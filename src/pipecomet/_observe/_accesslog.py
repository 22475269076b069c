"""
The access log: one line per answered request, text or JSON, kept raw in
a buffer on the reactor thread, formatted per batch and written by a
thread of its own.

twisted.web's own access log formats a line and sends it through the log
observers for every request, which cost 42% of a small chain's throughput;
here a request costs one tuple appended to a list; the lines are made in
one loop per batch, once a second (or when the buffer is full), and
written to the file or standard output by the thread.  A writer that cannot keep up (a full pipe, a slow disk) never
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
from typing import TYPE_CHECKING, Protocol, Tuple, cast

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress, IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

from ._requests import RequestRecord

if TYPE_CHECKING:
    from .._json import JSON

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

    def close(self) -> Deferred[None]:
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
    Keeps what each answered request's line needs, raw, in the buffer;
    :meth:`flush` formats the buffered lines in one loop and hands them to
    the writer.

    What a line costs was measured (``make bench-http``, ``make
    bench-accesslog``) and cut down: on the reactor a request costs one
    tuple of values it already has (no header looked up, nothing
    formatted or decoded); the lines are made per batch, in one loop,
    with the time stamp made once a second, the text line as one
    f-string, and the fields that repeat from line to line (client,
    user agent, referer, route) escaped once and kept.  Formatting is
    done on the reactor thread at flush time, not in the writer thread:
    a thread holding the GIL to format stalls the reactor on a shared
    core (measured: a JSON log cost 28 % of hello's req/s that way).

    :param writer: ``write(bytes) -> bool`` (False: refused, lines dropped).
    :param line_format: ``"text"`` (the combined log format, then the
        duration in seconds, the request id, the route and the error) or
        ``"json"`` (one object per line).
    :param buffer_bytes: flush as soon as the buffer holds about this much
        (lines are reckoned at :data:`LINE_BYTES` bytes each until they are
        formatted).
    """

    def __init__(self, writer: AccessWriter, line_format: str = "text",
                 buffer_bytes: int = 65536) -> None:
        self.writer = writer
        self.json = line_format == "json"
        self.buffer_bytes = buffer_bytes
        self.line_bytes = LINE_BYTES["json" if self.json else "text"]
        #: entries kept before a flush: ``buffer_bytes`` at ``line_bytes`` a line
        self.max_entries = max(1, -(-buffer_bytes // self.line_bytes))
        self.lines = 0
        self.dropped = 0
        self.writes = 0
        self._buffer: list[_Entry] = []
        self._escaped: dict[bytes, str] = {}
        self._names: dict[str, str] = {}
        self._second = -1
        self._stamp = ""

    def record(self, request: IRequest, record: RequestRecord, status: int,
               duration: float) -> None:
        """
        Keep one request's line (called when its response ended).  The
        entry holds only strings, bytes and numbers: a tuple of those is
        left alone by the cyclic GC, where one holding the request's
        objects would be carried into the old generations and traversed
        by every full collection until it is written.
        """
        req = cast(_LoggedRequest, request)
        noted = getattr(req, "log_headers", None)
        if noted is not None:
            # Noted by pipecomet's protocol as the headers were parsed.
            agent, referer = noted()
        else:
            headers = req.requestHeaders
            agents = headers.getRawHeaders(b"user-agent")
            referers = headers.getRawHeaders(b"referer")
            agent = agents[0] if agents else None
            referer = referers[0] if referers else None
        addr = req.getClientAddress()
        buffer = self._buffer
        buffer.append((record.start, status, duration, req.sentLength, req.uri,
                       req.clientproto,
                       addr.host if isinstance(addr, (IPv4Address, IPv6Address)) else "-",
                       agent, referer, record.method, record.request_id, record.route,
                       record.error_code, record.error_id))
        self.lines += 1
        if len(buffer) >= self.max_entries:
            self.flush()

    def flush(self) -> None:
        """
        Format the buffered lines and hand them to the writer.
        """
        if not self._buffer:
            return
        entries, self._buffer = self._buffer, []
        if self.writer.write(self.render(entries)):
            self.writes += 1
        else:
            self.dropped += len(entries)

    def render(self, entries: list[_Entry]) -> bytes:
        """
        The lines of ``entries``, as bytes.
        """
        if len(self._escaped) > _MAX_ESCAPED:
            self._escaped.clear()
        lines = self._json_lines(entries) if self.json else self._text_lines(entries)
        return "".join(lines).encode("utf-8")

    def _field(self, value: bytes) -> str:
        """
        A header's value for a quoted field of the text line, or a JSON
        string, made once per distinct value (they repeat: a client sends
        the same user agent with every request).
        """
        out = self._escaped.get(value)
        if out is None:
            text = value.decode("utf-8", "replace")
            out = _json_str(text) if self.json else text.replace('"', "%22")
            if len(value) <= _MAX_CACHED_BYTES:
                self._escaped[value] = out
        return out

    def _name(self, value: str) -> str:
        """
        ``value`` (a client address or a route) as a JSON string, made once.
        """
        out = self._names.get(value)
        if out is None:
            if len(self._names) > _MAX_ESCAPED:
                self._names.clear()
            out = self._names[value] = _json_str(value)
        return out

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

    def _text_lines(self, entries: list[_Entry]) -> list[str]:
        out = []
        field = self._field
        for (start, status, duration, sent, uri, proto, host, agent, referer, method,
             request_id, route, error_code, error_id) in entries:
            end = start + duration
            stamp = self._stamp if int(end) == self._second else self._time(end)
            if b"token=" in uri:
                uri = _redact(uri)
            version = _VERSIONS.get(proto)
            if version is None:
                version = proto.decode("ascii", "replace")
            out.append(
                f'{host} - - [{stamp}] "{method} {uri.decode("utf-8", "replace")} '
                f'{version}" {status} {sent} '
                f'"{"-" if referer is None else field(referer)}" '
                f'"{"-" if agent is None else field(agent)}" {duration:.6f} '
                f'{request_id} {route}'
                f'{"" if error_code is None else f" {error_code}:{error_id}"}\n'
            )
        return out

    def _json_lines(self, entries: list[_Entry]) -> list[str]:
        out = []
        field, name = self._field, self._name
        for (start, status, duration, sent, uri, _proto, host, agent, referer, method,
             request_id, route, error_code, error_id) in entries:
            end = start + duration
            stamp = self._stamp if int(end) == self._second else self._time(end)
            if b"token=" in uri:
                uri = _redact(uri)
            line = (
                f'{{"time":"{stamp}.{int((end % 1) * 1e6):06d}Z",'
                f'"remote":{name(host)},"method":"{method}",'
                f'"uri":{_json_str(uri.decode("utf-8", "replace"))},"status":{status},'
                f'"bytes":{sent},"duration":{duration:.6f},'
                f'"request_id":"{request_id}","route":{name(route)}'
            )
            if agent is not None:
                line += ',"user_agent":' + field(agent)
            if referer is not None:
                line += ',"referer":' + field(referer)
            if error_code is not None:
                line += (f',"error_code":{_json_str(error_code)},'
                         f'"error_id":{_json_str(error_id or "")}')
            out.append(line + "}\n")
        return out

    def status(self) -> dict[str, JSON]:
        return {"lines": self.lines, "dropped": self.dropped, "writes": self.writes,
                "buffered": len(self._buffer), "pending_bytes": self.writer.pending_bytes}


#: What a line is reckoned at before it is formatted (wrk's requests make
#: text lines of ~150 bytes, JSON lines of ~260).
LINE_BYTES = {"text": 128, "json": 256}
#: Distinct header values (and names) kept escaped before the cache is emptied.
_MAX_ESCAPED = 1024
#: Longer header values are escaped every time, not kept.
_MAX_CACHED_BYTES = 256

#: One request's line, raw: (start, status, duration, bytes sent, URI,
#: protocol version, client host, user agent, referer, method, request id,
#: route, error code, error id).
_Entry = Tuple[float, int, float, int, bytes, bytes, str, "bytes | None", "bytes | None", str,
               str, str, "str | None", "str | None"]


class _LoggedRequest(Protocol):
    """
    What a line reads of a request beyond ``IRequest``: every request that
    reaches an app is a ``twisted.web.http.Request``, which has these.
    """

    sentLength: int
    uri: bytes
    clientproto: bytes
    requestHeaders: Headers

    def getClientAddress(self) -> IAddress: ...


#: Protocol versions as text, without decoding them per request.
_VERSIONS = {b"HTTP/1.1": "HTTP/1.1", b"HTTP/1.0": "HTTP/1.0"}


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
