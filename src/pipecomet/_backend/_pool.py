"""
Connections to one endpoint: kept alive, capped, with a bounded wait queue.

An :class:`EndpointPool` never holds more than ``max_connections``
connections (busy, idle or connecting).  A call that finds none free waits in
a queue bounded in length (full: 503 ``backend_busy``) and in time (503
``backend_queue_timeout``); the call's own deadline still rules.  Idle
connections are closed after ``idle_timeout`` and any connection after
``max_lifetime``; a connection that had a protocol error or an unfinished
call is never reused.

Everything runs on the reactor thread; waiting calls are plain objects with
``got_connection(conn)`` and ``acquire_failed(error)``, so the common path
(an idle connection is there) makes no Deferred.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable, Protocol as TypingProtocol

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IAddress, IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._config import PoolConfig
from ._discovery import Endpoint, IBackendReactor
from ._errors import BackendBusy, BackendQueueTimeout, ConnectionFailed
from ._protocol import ClientConnection

if TYPE_CHECKING:
    from .._json import JSON

__all__ = ["EndpointPool", "Waiter"]

log = Logger()


class Waiter(TypingProtocol):
    """
    A call waiting for a connection.
    """

    service: str

    def got_connection(self, conn: ClientConnection) -> None: ...
    def acquire_failed(self, error: Exception) -> None: ...


class _Factory(Factory):
    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: IAddress | None) -> ClientConnection:
        return ClientConnection(self.pool, self.pool.reactor.seconds())


class _Queued:
    """
    A waiter in the queue, with the timer that ends its wait.
    """

    __slots__ = ("waiter", "timer")

    def __init__(self, waiter: Waiter, timer: IDelayedCall | None) -> None:
        self.waiter = waiter
        self.timer = timer


class EndpointPool:
    """
    The connections of one endpoint of one service.

    :param on_empty: called once a draining pool has no connection left.
    :param host_header: ``Host`` sent; the endpoint's ``host:port`` when empty.
    """

    def __init__(self, service: str, endpoint: Endpoint, config: PoolConfig, reactor: IBackendReactor,
                 retry_after: float = 1.0,
                 on_empty: Callable[[EndpointPool], object] | None = None,
                 host_header: str = "") -> None:
        self.service = service
        self.endpoint = endpoint
        self.config = config
        self.reactor = reactor
        self.retry_after = retry_after
        self.on_empty = on_empty
        self.idle: deque[ClientConnection] = deque()
        self.busy = 0
        self.connecting = 0
        self.queue: deque[_Queued] = deque()
        self.draining = False
        self.closed = False
        self.connects = 0
        self.connect_failures = 0
        self.rejected = 0
        self.queue_timeouts = 0
        self._factory = _Factory(self)
        host = endpoint.host
        if not host_header:
            host_header = f"[{host}]:{endpoint.port}" if ":" in host else endpoint.address
        #: ``Host`` of every request sent here.
        self.host_header = host_header.encode("idna" if not host_header.isascii() else "ascii")
        timeout = config.connect_timeout
        if isIPAddress(host):
            self._endpoint: IStreamClientEndpoint = TCP4ClientEndpoint(reactor, host, endpoint.port, timeout=timeout)
        elif isIPv6Address(host):
            self._endpoint = TCP6ClientEndpoint(reactor, host, endpoint.port, timeout=timeout)
        else:
            self._endpoint = HostnameEndpoint(reactor, host.encode("idna"), endpoint.port,
                                              timeout=timeout)

    @property
    def total(self) -> int:
        """
        Connections counted against the cap.
        """
        return len(self.idle) + self.busy + self.connecting

    # -- taking and giving back

    def acquire(self, waiter: Waiter, wait_limit: float) -> ClientConnection | None:
        """
        Give ``waiter`` a connection now (returned) or later
        (``waiter.got_connection``); None when it has to wait.  A full queue
        raises :class:`BackendBusy`.

        :param wait_limit: seconds the waiter may wait at most (the smaller
            of ``queue_timeout`` and what is left of its deadline; the
            deadline's own timer ends the call when it comes first).
        """
        idle = self.idle
        if idle:
            now = self.reactor.seconds()
            lifetime = self.config.max_lifetime
            while idle:
                conn = idle.pop()
                if conn.closed or (lifetime and now - conn.created >= lifetime):
                    conn.close()
                    continue
                self.busy += 1
                return conn
        if self.draining or self.closed:
            raise ConnectionFailed("endpoint removed", sent=False)
        queue = self.queue
        if self.total < self.config.max_connections:
            self._connect()
        elif len(queue) >= self.connecting + self.config.queue:
            self.rejected += 1
            raise BackendBusy(waiter.service, retry_after=self.retry_after)
        entry = _Queued(waiter, None)
        if self.config.queue_timeout < wait_limit:
            # Otherwise the call's deadline comes first and ends the wait.
            entry.timer = self.reactor.callLater(self.config.queue_timeout,
                                                 self._queue_timeout, entry)
        queue.append(entry)
        return None

    def forget(self, waiter: Waiter) -> None:
        """
        ``waiter`` no longer wants a connection (its call was cancelled or
        timed out).
        """
        for entry in self.queue:
            if entry.waiter is waiter:
                self.queue.remove(entry)
                if entry.timer is not None and entry.timer.active():
                    entry.timer.cancel()
                return

    def release(self, conn: ClientConnection, reusable: bool) -> None:
        """
        A call is done with ``conn``; keep it when ``reusable`` and still
        young, else close it.
        """
        self.busy -= 1
        if reusable and not conn.closed and not self.draining:
            lifetime = self.config.max_lifetime
            now = self.reactor.seconds()
            if not lifetime or now - conn.created < lifetime:
                if self.queue:
                    self.busy += 1
                    self._hand(conn)
                    return
                conn.idle_since = now
                self.idle.append(conn)
                return
        if not conn.closed:
            conn.abort() if not reusable else conn.close()
        self._refill()
        self._check_empty()

    def connection_lost(self, conn: ClientConnection) -> None:
        """
        Called by a connection when its socket is gone.
        """
        try:
            self.idle.remove(conn)
        except ValueError:
            return  # it was busy: its call releases it
        self._refill()
        self._check_empty()

    # -- upkeep

    def reap(self, now: float) -> int:
        """
        Close connections idle longer than ``idle_timeout`` (oldest first);
        the number closed.
        """
        idle = self.idle
        limit = now - self.config.idle_timeout
        closed = 0
        while idle and idle[0].idle_since <= limit:
            idle.popleft().close()
            closed += 1
        return closed

    def drain(self) -> None:
        """
        The endpoint left discovery: no new calls, idle connections closed,
        waiting calls sent elsewhere, busy ones finish and then close.
        """
        self.draining = True
        while self.idle:
            self.idle.pop().close()
        queue, self.queue = self.queue, deque()
        for entry in queue:
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            entry.waiter.acquire_failed(ConnectionFailed("endpoint removed", sent=False))
        self._check_empty()

    def close(self) -> None:
        """
        Stop: every connection closed, every waiter failed.
        """
        self.drain()
        self.closed = True

    def _check_empty(self) -> None:
        if self.draining and not self.busy and not self.connecting and not self.idle:
            callback, self.on_empty = self.on_empty, None
            if callback is not None:
                callback(self)

    def status(self) -> dict[str, JSON]:
        return {
            "busy": self.busy,
            "idle": len(self.idle),
            "connecting": self.connecting,
            "waiting": len(self.queue),
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "rejected_busy": self.rejected,
            "queue_timeouts": self.queue_timeouts,
        }

    # -- inside

    def _hand(self, conn: ClientConnection) -> None:
        """
        Give a leased connection (``busy`` already counts it) to the first
        waiter.
        """
        entry = self.queue.popleft()
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entry.waiter.got_connection(conn)

    def _refill(self) -> None:
        """
        Open connections for waiters that no connection will reach.
        """
        while (self.queue and len(self.queue) > self.connecting and not self.draining
               and self.total < self.config.max_connections):
            self._connect()

    def _connect(self) -> None:
        self.connecting += 1
        self.connects += 1
        d = self._endpoint.connect(self._factory)
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: ClientConnection) -> None:
        self.connecting -= 1
        if self.queue and not self.draining:
            self.busy += 1
            self._hand(conn)
            return
        if self.draining:
            conn.close()
            self._check_empty()
            return
        conn.idle_since = self.reactor.seconds()
        self.idle.append(conn)

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting -= 1
        self.connect_failures += 1
        log.info("backend {service}: connect to {address} failed: {why}", service=self.service,
                 address=self.endpoint.address, why=failure.getErrorMessage())
        # The connect was for the first waiter in line; only it fails, the
        # others keep their place (and a fresh connect if none is coming).
        if self.queue:
            entry = self.queue.popleft()
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            entry.waiter.acquire_failed(ConnectionFailed(f"connect failed: {failure.getErrorMessage()}",
                                                         sent=False))
        self._refill()
        self._check_empty()

    def _queue_timeout(self, entry: _Queued) -> None:
        try:
            self.queue.remove(entry)
        except ValueError:
            return
        self.queue_timeouts += 1
        entry.waiter.acquire_failed(BackendQueueTimeout(
            entry.waiter.service,
            f"backend service {entry.waiter.service!r}: no connection free within "
            f"{self.config.queue_timeout:g}s", retry_after=self.retry_after))
