"""
File discovery: a service's endpoints listed in a small JSON or TOML file
that operators (or a config-management tool) rewrite; the file is polled
on the reactor's clock and a change reaches the backend client within one
poll interval.

Reading happens on the reactor thread, on purpose: each poll is one
``stat()`` of a local file, and the file is read and parsed only when its
size, modification time or inode changed — a few microseconds for the
handful of lines such a file holds.  A thread hop per poll would cost more
than it saves.  To keep that promise the file is refused (and the last good
list kept) when it is larger than ``max_size`` bytes, so a mistaken path to
a big file cannot stall the reactor; keep the file on a local disk, not on
a network mount whose ``stat()`` may hang.
"""

from __future__ import annotations

import json
import os
import tomllib
from typing import TYPE_CHECKING, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ._discovery import Endpoint, IBackendReactor, IDiscovery, WatchedEndpoints, parse_address

if TYPE_CHECKING:
    from .._json import JSON

__all__ = ["FileDiscovery", "parse_endpoints_file", "DEFAULT_MAX_SIZE"]

#: Largest file read (bytes); a larger file is an error that keeps the last list.
DEFAULT_MAX_SIZE = 1024 * 1024

log = Logger()


def _endpoint_from_item(item: object, where: str) -> Endpoint:
    if isinstance(item, str):
        try:
            return parse_address(item)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if isinstance(item, dict):
        unknown = set(item) - {"host", "port", "id", "payload"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                             "(known: host, port, id, payload)")
        host = item.get("host")
        port = item.get("port")
        ident = item.get("id", "")
        if not isinstance(host, str) or not host:
            raise ValueError(f"{where}.host: must be a non-empty string")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"{where}.port: must be an integer in 1..65535")
        if not isinstance(ident, str):
            raise ValueError(f"{where}.id: must be a string")
        return Endpoint(host, port, ident, item.get("payload"))
    raise ValueError(f"{where}: must be \"host:port\" or a table with host and port")


def parse_endpoints_file(data: bytes, name: str) -> tuple[Endpoint, ...]:
    """
    The endpoints a discovery file lists; ValueError saying what is wrong.

    ``name`` ending in ``.toml`` is read as TOML, anything else as JSON.
    Accepted shapes: ``{"endpoints": [...]}`` (JSON or TOML) or, in JSON, a
    bare list; each item is ``"host:port"`` or an object with ``host``,
    ``port`` and optional ``id`` and ``payload``.  Two items with the same
    id are an error.

    :param data: the file's bytes.
    :param name: the file's name (for its format and for messages).
    """
    try:
        if name.endswith(".toml"):
            doc: JSON = tomllib.loads(data.decode("utf-8"))
        else:
            doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        kind = "TOML" if name.endswith(".toml") else "JSON"
        raise ValueError(f"not valid {kind}: {e}") from None
    if isinstance(doc, dict):
        unknown = set(doc) - {"endpoints"}
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))} (known: endpoints)")
        if "endpoints" not in doc:
            raise ValueError("missing key: endpoints")
        items = doc["endpoints"]
    else:
        items = doc
    if not isinstance(items, list):
        raise ValueError("endpoints: must be a list")
    endpoints = tuple(_endpoint_from_item(item, f"endpoints[{i}]") for i, item in enumerate(items))
    seen: set[str] = set()
    for endpoint in endpoints:
        if endpoint.id in seen:
            raise ValueError(f"endpoints: duplicate id {endpoint.id!r}")
        seen.add(endpoint.id)
    return endpoints


def _same(a: tuple[Endpoint, ...], b: tuple[Endpoint, ...]) -> bool:
    # Endpoint equality ignores the payload; a payload change is a change too.
    return a == b and [e.payload for e in a] == [e.payload for e in b]


@implementer(IDiscovery)
class FileDiscovery(WatchedEndpoints):
    """
    Endpoints from a JSON or TOML file, re-read when it changes.

    A file that cannot be read or parsed keeps the last good list, logs the
    reason once per change of the file, and shows it in :meth:`status`
    (``error``, ``stale: True``) until a good version is read.

    :param path: the file.
    :param reactor: provides ``IReactorTime``; polls run on its clock.
    :param poll_interval: seconds between two ``stat()`` calls.
    :param max_size: largest file read, in bytes.
    """

    def __init__(self, path: str, *, reactor: IBackendReactor, poll_interval: float = 1.0,
                 max_size: int = DEFAULT_MAX_SIZE) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval: must be > 0")
        if max_size <= 0:
            raise ValueError("max_size: must be > 0")
        self._path = path
        self._reactor = reactor
        self._poll_interval = poll_interval
        self._max_size = max_size
        self._endpoints: tuple[Endpoint, ...] = ()
        self._watchers: list[Callable[[tuple[Endpoint, ...]], None]] = []
        self._signature: tuple[int, int, int] | None = None
        self._error: str | None = "not read yet"
        self._loaded = False
        self._loads = 0
        self._checks = 0
        self._loop: LoopingCall | None = None

    # -- IDiscovery

    def start(self) -> Deferred:
        """
        Read the file now (the returned Deferred has fired on return) and
        poll it every ``poll_interval`` seconds.
        """
        if self._loop is None:
            self._loop = LoopingCall(self._poll)
            self._loop.clock = self._reactor
            self._loop.start(self._poll_interval, now=True)
        return succeed(None)

    def stop(self) -> Deferred:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return succeed(None)

    def status(self) -> dict:
        """
        ``kind``, ``path``, ``connected`` (the last check read a good
        file), ``stale`` (the list shown is not the file's current content),
        ``endpoints``, ``error`` (why the file was refused, or None),
        ``loads`` (good reads) and ``checks`` (polls).
        """
        return {"kind": "file", "path": self._path, "connected": self._error is None,
                "stale": self._error is not None, "endpoints": len(self._endpoints),
                "error": self._error, "loads": self._loads, "checks": self._checks}

    # -- polling

    def _poll(self) -> None:
        # An unexpected error must not end the polling (LoopingCall stops
        # on the first exception): log it, keep the list, poll again.
        try:
            self.check()
        except Exception as e:
            log.failure("file discovery: checking {path} failed", path=self._path)
            self._error = f"{self._path}: unexpected {type(e).__name__}: {e}"

    def check(self) -> None:
        """
        One poll: ``stat()`` the file and, when it changed, read and parse it.
        """
        self._checks += 1
        try:
            st = os.stat(self._path)
        except OSError as e:
            self._fail(None, f"cannot read {self._path}: {e.strerror}")
            return
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == self._signature:
            return
        if st.st_size > self._max_size:
            self._fail(signature, f"{self._path} is {st.st_size} bytes, "
                                  f"larger than max_size {self._max_size}")
            return
        try:
            with open(self._path, "rb") as f:
                data = f.read(self._max_size + 1)
        except OSError as e:
            self._fail(signature, f"cannot read {self._path}: {e.strerror}")
            return
        if len(data) > self._max_size:  # grew between stat() and read()
            self._fail(signature, f"{self._path} is larger than max_size {self._max_size}")
            return
        try:
            endpoints = parse_endpoints_file(data, self._path)
        except ValueError as e:
            self._fail(signature, f"{self._path}: {e}")
            return
        self._signature = signature
        self._error = None
        self._loads += 1
        if not self._loaded:
            log.info("file discovery: {count} endpoint(s) from {path}",
                     count=len(endpoints), path=self._path)
        elif not _same(endpoints, self._endpoints):
            log.info("file discovery: {path} changed, now {count} endpoint(s)",
                     count=len(endpoints), path=self._path)
        self._loaded = True
        self._set(endpoints)

    def _fail(self, signature: tuple[int, int, int] | None, message: str) -> None:
        if message != self._error or signature != self._signature:
            log.warn("file discovery: {message}; keeping the last {count} endpoint(s)",
                     message=message, count=len(self._endpoints))
        self._signature = signature
        self._error = message

    def _set(self, endpoints: tuple[Endpoint, ...]) -> None:
        if _same(endpoints, self._endpoints):
            return
        self._endpoints = endpoints
        for callback in list(self._watchers):
            try:
                callback(endpoints)
            except Exception:
                log.failure("discovery watcher {callback!r} failed", callback=callback)
