"""
A named backend service and the calls made to it.

:class:`BackendService` ties discovery, the balancer, one
:class:`~pipecomet._backend._pool.EndpointPool` per endpoint and the retry
budget together; :class:`Backends` holds an app's services (one set per
serving process: nothing is shared, so throughput grows with processes).

A call (:class:`_Call`) has one deadline for everything (waiting for a
connection, connecting, sending, the whole answer); the time left is sent to
the backend in the ``deadline_header``.  Connection failures are retried on
another endpoint for idempotent methods within the retry budget; a request
that met a kept-alive connection the backend had just closed is replayed
once on a fresh one whatever the budget (nothing of it was answered).
"""

from __future__ import annotations

import json as _json
import random
from collections import deque
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, TypeAlias, TypedDict, Unpack
from urllib.parse import urlencode

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer

from ._balancer import Balancer, EndpointState, RetryBudget
from ._config import IDEMPOTENT_METHODS, BackendsConfig, DiscoveryConfig, ServiceConfig
from ._discovery import Endpoint, IBackendReactor, IDiscovery, make_discovery
from ._errors import (
    BackendBusy,
    BackendError,
    BackendResponseTooLarge,
    BackendTimeout,
    ConnectionFailed,
    NoBackend,
    UnknownBackend,
)
from ._pool import EndpointPool
from ._protocol import ClientConnection, build_head, header_lines
from ._response import Response

if TYPE_CHECKING:
    from .._app import App
    from .._json import JSON

__all__ = ["BackendService", "Backends", "install", "Deadlines"]

log = Logger()

_METHODS = {m: m.encode("ascii") for m in
            ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")}


#: A header's value: text or bytes, or several of them.
HeaderValue: TypeAlias = "str | bytes | Sequence[str | bytes]"
#: Request headers: a mapping, or ``(name, value)`` byte pairs already encoded.
RequestHeaders: TypeAlias = "Mapping[str, HeaderValue] | Sequence[tuple[bytes, bytes]]"
#: Query parameters: a mapping or pairs, values text or lists of text.
QueryParams: TypeAlias = "Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]]"
#: A request body: bytes, text (sent as UTF-8), or a producer streamed.
RequestBody: TypeAlias = "bytes | str | IBodyProducer"
#: ``f(name, config, reactor)`` → where a service's endpoints come from.
DiscoveryFactory = Callable[[str, DiscoveryConfig, IBackendReactor], IDiscovery]


class RequestOptions(TypedDict, total=False):
    """
    The keyword arguments of :meth:`BackendService.request` after the path.
    """

    params: QueryParams | None
    json: object
    data: RequestBody | None
    headers: RequestHeaders | None
    timeout: float | None
    stream: bool


def _encode_headers(headers: RequestHeaders | None) -> list[tuple[bytes, bytes]]:
    if not headers:
        return []
    out = []
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for k, value in pairs:
        name = k.encode("latin-1") if isinstance(k, str) else k
        values = value if isinstance(value, (list, tuple)) else (value,)
        for x in values:
            out.append((name, x.encode("latin-1") if isinstance(x, str) else x))
    return out


class Deadlines:
    """
    The deadlines of a service's calls, in deadline order, with one reactor
    timer per distinct timeout instead of one per call.

    Calls with the same timeout end in the order they started, so each
    timeout keeps a FIFO queue; the timer waits for the oldest call still
    running, and finished calls are dropped from the front as new ones come
    (never scanned).  A call is timed out exactly at its deadline.
    """

    def __init__(self, reactor: IBackendReactor) -> None:
        self.reactor = reactor
        self._queues: dict[float, deque[_Call]] = {}
        self._timers: dict[float, IDelayedCall] = {}

    def add(self, call: _Call) -> None:
        timeout = call.timeout
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = deque()
        while queue and queue[0].done:
            queue.popleft()
        queue.append(call)
        if timeout not in self._timers:
            self._timers[timeout] = self.reactor.callLater(timeout, self._fire, timeout)

    def _fire(self, timeout: float) -> None:
        del self._timers[timeout]
        queue = self._queues[timeout]
        now = self.reactor.seconds()
        while queue:
            head = queue[0]
            if head.done:
                queue.popleft()
            elif head.deadline <= now:
                queue.popleft()
                head._timed_out()
            else:
                # (a call timed out above may have started another one, and
                # with it this timeout's timer)
                if timeout not in self._timers:
                    self._timers[timeout] = self.reactor.callLater(head.deadline - now,
                                                                   self._fire, timeout)
                return
        if timeout not in self._timers:
            del self._queues[timeout]

    def stop(self) -> None:
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()


class BackendService:
    """
    One backend service: ``await service.get("/users/1")`` → :class:`Response`.

    :param name: the service's name (shown to clients in errors).
    :param config: its ``[backends.NAME]`` settings.
    :param discovery: where its endpoints come from.
    :param reactor: the reactor all sockets and timers use.
    :param rng: random source of the balancer (seeded in tests).
    """

    def __init__(self, name: str, config: ServiceConfig, discovery: IDiscovery, reactor: IBackendReactor,
                 rng: random.Random | None = None) -> None:
        self.name = name
        self.config = config
        self.discovery = discovery
        self.reactor = reactor
        self.balancer = Balancer(config.balancer, reactor.seconds, self._make_pool,
                                 self._drain_pool, rng=rng)
        retry = config.retry
        self.budget = RetryBudget(retry.budget_ratio, retry.budget_min_per_second,
                                  retry.budget_window, reactor.seconds)
        self._headers = header_lines(_encode_headers(config.headers))
        self._deadline_header = config.deadline_header.encode("latin-1") + b": " \
            if config.deadline_header else b""
        self._unwatch: Callable[[], None] | None = None
        self._reaper: IDelayedCall | None = None
        self.deadlines = Deadlines(reactor)
        self.calls = 0
        self.failures = {"backend_error": 0, "backend_timeout": 0, "backend_busy": 0,
                         "no_backend": 0, "backend_response_too_large": 0, "cancelled": 0}
        self.retries = 0
        self.safe_retries = 0
        self.in_flight = 0
        self.balancer.update(discovery.current())
        self._unwatch = discovery.watch(self.balancer.update)

    # -- life

    def start(self) -> Deferred:
        """
        Start discovery and connection upkeep.
        """
        d = self.discovery.start()
        d.addCallback(lambda _: self.balancer.update(self.discovery.current()))
        self._schedule_reap()
        return d

    def stop(self) -> Deferred:
        """
        Stop discovery, close every connection.
        """
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._reaper is not None and self._reaper.active():
            self._reaper.cancel()
        self._reaper = None
        self.deadlines.stop()
        for state in list(self.balancer.active) + list(self.balancer.draining):
            if state.pool is not None:
                state.pool.close()
        return self.discovery.stop()

    def _schedule_reap(self) -> None:
        interval = min(max(self.config.pool.idle_timeout / 4, 0.05), 5.0)
        self._reaper = self.reactor.callLater(interval, self._reap)

    def _reap(self) -> None:
        now = self.reactor.seconds()
        for state in self.balancer.active:
            state.pool.reap(now)
        self._schedule_reap()

    def _make_pool(self, endpoint: Endpoint) -> EndpointPool:
        return EndpointPool(self.name, endpoint, self.config.pool, self.reactor,
                            retry_after=self.config.retry_after,
                            host_header=self.config.host_header)

    def _drain_pool(self, state: EndpointState) -> None:
        log.info("backend {service}: endpoint {address} removed; draining {n} calls",
                 service=self.name, address=state.endpoint.address, n=state.outstanding)
        state.pool.on_empty = lambda pool: self.balancer.forget(state)
        state.pool.drain()

    # -- calls

    def request(self, method: str, path: str | bytes, *, params: QueryParams | None = None,
                json: object = ..., data: RequestBody | None = None,
                headers: RequestHeaders | None = None, timeout: float | None = None,
                stream: bool = False) -> Deferred[Response]:
        """
        Call the service.

        :param method: HTTP method.
        :param path: path on the backend, e.g. ``"/users/1"`` (may carry a
            query).
        :param params: query parameters (a mapping or pairs) added to the path.
        :param json: a value sent as a JSON body.
        :param data: a body: bytes, str, or an ``IBodyProducer`` streamed
            (chunked when its length is unknown; such a call is never
            replayed).
        :param headers: extra request headers (a mapping, or ``(name, value)``
            byte pairs).
        :param timeout: this call's deadline in seconds (the service's
            ``timeout`` when None).
        :param stream: hand the response over as soon as its headers are in,
            whatever the body's size (see :meth:`Response.deliver`).
        :return: a Deferred of :class:`Response`; fails with
            :class:`BackendError` (502), :class:`BackendTimeout` (504),
            :class:`BackendBusy` / :class:`NoBackend` (503).  Cancelling it
            closes the connection.
        """
        method = method.upper()
        bmethod = _METHODS.get(method) or method.encode("ascii")
        if isinstance(path, str):
            path = path.encode("utf-8")
        target = path if path.startswith(b"/") else b"/" + path
        if params:
            query = urlencode(params, doseq=True).encode("ascii")
            target = target + (b"&" if b"?" in target else b"?") + query
        extra = self._headers
        if headers:
            extra = extra + header_lines(_encode_headers(headers))
        body: bytes | IBodyProducer | None = None
        if json is not ...:
            body = _json.dumps(json, separators=(",", ":")).encode("utf-8")
            extra = extra + b"Content-Type: application/json\r\n"
        elif data is not None:
            body = data.encode("utf-8") if isinstance(data, str) else data
        return _Call(self, method, bmethod, target, extra, body,
                     timeout if timeout is not None else self.config.timeout, stream).start()

    def get(self, path: str, **kw: Unpack[RequestOptions]) -> Deferred[Response]:
        return self.request("GET", path, **kw)

    def head(self, path: str, **kw: Unpack[RequestOptions]) -> Deferred[Response]:
        return self.request("HEAD", path, **kw)

    def post(self, path: str, **kw: Unpack[RequestOptions]) -> Deferred[Response]:
        return self.request("POST", path, **kw)

    def put(self, path: str, **kw: Unpack[RequestOptions]) -> Deferred[Response]:
        return self.request("PUT", path, **kw)

    def patch(self, path: str, **kw: Unpack[RequestOptions]) -> Deferred[Response]:
        return self.request("PATCH", path, **kw)

    def delete(self, path: str, **kw: Unpack[RequestOptions]) -> Deferred[Response]:
        return self.request("DELETE", path, **kw)

    def options(self, path: str, **kw: Unpack[RequestOptions]) -> Deferred[Response]:
        return self.request("OPTIONS", path, **kw)

    # -- status

    def status(self) -> dict[str, JSON]:
        balancer = self.balancer.status(EndpointPool.status)
        return {
            "calls": self.calls,
            "in_flight": self.in_flight,
            "retries": self.retries,
            "safe_retries": self.safe_retries,
            "failures": dict(self.failures),
            "retry_budget": self.budget.status(),
            "discovery": self.discovery.status(),
            **balancer,
        }


class _Call:
    """
    One call: endpoint choice, connection, request, response, deadline,
    retries.  It is the pool's waiter and the connection's listener.
    """

    __slots__ = ("svc", "service", "method", "bmethod", "target", "headers", "body", "timeout",
                 "stream", "d", "deadline", "state", "conn", "response", "started",
                 "attempts", "fresh_only", "done", "sent_at", "holding")

    def __init__(self, svc: BackendService, method: str, bmethod: bytes, target: bytes,
                 headers: bytes, body: bytes | IBodyProducer | None, timeout: float,
                 stream: bool) -> None:
        self.svc = svc
        self.service = svc.name
        self.method = method
        self.bmethod = bmethod
        self.target = target
        self.headers = headers
        self.body = body
        self.timeout = timeout
        self.stream = stream
        self.d: Deferred = Deferred(self._cancel)
        self.state: EndpointState | None = None
        self.conn: ClientConnection | None = None
        self.response: Response | None = None
        self.started = 0.0
        self.sent_at = 0.0
        self.attempts = 0
        self.fresh_only = False
        self.done = False
        self.holding = False

    def start(self) -> Deferred:
        svc = self.svc
        reactor = svc.reactor
        svc.calls += 1
        svc.in_flight += 1
        svc.budget.record_call()
        self.started = now = reactor.seconds()
        self.deadline = now + self.timeout
        svc.deadlines.add(self)
        self._attempt(None, now)
        return self.d

    # -- attempts

    def _attempt(self, exclude: EndpointState | None, now: float | None = None) -> None:
        state = self.svc.balancer.pick(exclude)
        if state is None:
            self._end_error(NoBackend(self.service, retry_after=self.svc.config.retry_after),
                            "no_backend")
            return
        self.state = state
        self.holding = True
        state.outstanding += 1
        state.calls += 1
        self.attempts += 1
        pool = state.pool
        if self.fresh_only:
            # The one safe retry: a fresh connection, not another kept one
            # the backend may have closed too.
            while pool.idle:
                pool.idle.popleft().close()
        try:
            if now is None:
                now = self.svc.reactor.seconds()
            conn = pool.acquire(self, self.deadline - now)
        except BackendBusy as e:
            self._leave_endpoint()
            self._end_error(e, "backend_busy")
            return
        except ConnectionFailed as e:
            self._attempt_failed(e, count=False)
            return
        if conn is not None:
            self.got_connection(conn, now)

    def got_connection(self, conn: ClientConnection, now: float | None = None) -> None:
        if self.done:
            assert self.state is not None  # (a connection comes from its pool)
            self.state.pool.release(conn, True)
            return
        self.conn = conn
        svc = self.svc
        if now is None:
            now = svc.reactor.seconds()
        headers = self.headers
        dh = svc._deadline_header
        if dh:
            left = int((self.deadline - now) * 1000)
            headers = b"%s%s%d\r\n" % (headers, dh, left if left > 0 else 0)
        body = self.body
        if body is None or isinstance(body, bytes):
            length = len(body) if body else (0 if self.method in ("POST", "PUT", "PATCH") else None)
            head = build_head(self.bmethod, self.target, conn.owner.host_header, headers, length)
        else:
            length = body.length if isinstance(body.length, int) else None
            head = build_head(self.bmethod, self.target, conn.owner.host_header, headers, length,
                              chunked=length is None)
        self.sent_at = now
        conn.send(self, head, body, is_head=self.method == "HEAD")

    def acquire_failed(self, error: Exception) -> None:
        if self.done:
            return
        if isinstance(error, ConnectionFailed):
            if error.reason == "endpoint removed" and self.svc.balancer.active:
                # Discovery dropped the endpoint while the call waited:
                # nothing was tried, so it simply goes elsewhere.
                self._leave_endpoint()
                self._attempt(None)
                return
            self._attempt_failed(error, count=error.reason != "endpoint removed")
            return
        self._leave_endpoint()
        self._end_error(error, "backend_busy")

    # -- ResponseListener

    def response_started(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.response = resp = Response(self.service, status, headers,
                                        self.svc.config.max_response_bytes)
        resp._call = self
        if self.stream or self.method == "HEAD" or status in (204, 304):
            self._deliver()

    def body_data(self, data: bytes) -> None:
        resp = self.response
        assert resp is not None  # (response_started came first)
        if not resp._feed(data):
            conn, self.conn = self.conn, None
            state = self.state
            assert state is not None
            self._leave_endpoint()
            if conn is not None:
                conn.abort()
                state.pool.release(conn, False)
            log.info("backend {service}: {address} sent more than {limit} bytes",
                     service=self.service, address=state.endpoint.address,
                     limit=self.svc.config.max_response_bytes)
            self._end_error(BackendResponseTooLarge(
                self.service, f"backend service {self.service!r} answered more than "
                f"{self.svc.config.max_response_bytes} bytes"), "backend_response_too_large")
            return
        if resp._write is None and resp._size >= self.svc.config.buffer_bytes:
            if not self.d.called:
                self._deliver()
            if resp._write is None and not resp._waiters and self.conn is not None:
                self.conn.pause()

    def response_done(self, keep_alive: bool) -> None:
        conn, self.conn = self.conn, None
        state, resp = self.state, self.response
        assert state is not None and resp is not None
        svc = self.svc
        svc.balancer.record_success(state, svc.reactor.seconds() - self.sent_at)
        self._leave_endpoint()
        if conn is not None:
            state.pool.release(conn, keep_alive)
        self._finish()
        resp._done()
        self._deliver()

    def failed(self, error: ConnectionFailed) -> None:
        if self.done:
            return
        self._attempt_failed(error)

    # -- endings

    def _attempt_failed(self, error: ConnectionFailed, count: bool = True) -> None:
        conn, self.conn = self.conn, None
        state = self.state
        assert state is not None  # (set by the attempt that failed)
        svc = self.svc
        self._leave_endpoint()
        if conn is not None:
            state.pool.release(conn, False)
        if count:
            svc.balancer.record_failure(state)
        log.info("backend {service}: {address}: {reason}", service=self.service,
                 address=state.endpoint.address, reason=error.reason)
        if not error.answered and self.response is None and (
                self.body_replayable() or not error.sent):
            # (A streamed body can go again only when none of it went.)
            left = self.deadline - svc.reactor.seconds()
            if left > 0:
                if error.reused and not self.fresh_only and (
                        not error.sent or self.method in IDEMPOTENT_METHODS):
                    # The backend closed a kept-alive connection as we used
                    # it: once, on a fresh connection, outside the budget.
                    self.fresh_only = True
                    svc.safe_retries += 1
                    self._attempt(None)
                    return
                if ((not error.sent or self.method in IDEMPOTENT_METHODS)
                        and self.attempts <= svc.config.retry.retries
                        and svc.budget.try_retry()):
                    svc.retries += 1
                    self._attempt(state)
                    return
        self._end_error(BackendError(self.service), "backend_error")

    def body_replayable(self) -> bool:
        return self.body is None or isinstance(self.body, bytes)

    def _leave_endpoint(self) -> None:
        """
        The attempt no longer counts as in flight on its endpoint.
        """
        state = self.state
        if self.holding and state is not None:
            self.holding = False
            state.outstanding -= 1

    def _deliver(self) -> None:
        d = self.d
        if not d.called:
            d.callback(self.response)

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.svc.in_flight -= 1

    def _end_error(self, error: Exception, kind: str) -> None:
        if self.done:
            return
        self._finish()
        self.svc.failures[kind] = self.svc.failures.get(kind, 0) + 1
        if self.response is not None:
            self.response._fail(error)
        if not self.d.called:
            self.d.errback(error)

    def _abandon(self) -> None:
        """
        Drop whatever the call holds: a queued place or a connection (which
        is closed: a half-read answer never goes back to the pool).
        """
        conn, self.conn = self.conn, None
        state = self.state
        if state is not None:
            if conn is not None:
                conn.abort()
                state.pool.release(conn, False)
            else:
                state.pool.forget(self)

    def _timed_out(self) -> None:
        if self.done:
            return
        state = self.state
        sent = self.conn is not None and self.holding
        self._abandon()
        self._leave_endpoint()
        if sent and state is not None:
            # A backend that does not answer in time is failing; one that
            # only had no free connection is busy, and that is not its fault.
            self.svc.balancer.record_failure(state)
        self._end_error(BackendTimeout(self.service, self.timeout), "backend_timeout")

    # -- for the Response

    def pause(self) -> None:
        if self.conn is not None:
            self.conn.pause()

    def resume(self) -> None:
        if self.conn is not None:
            self.conn.resume()

    def abort_body(self) -> None:
        """
        The reader gave up the rest of the body.
        """
        if self.done:
            return
        self._abandon()
        self._leave_endpoint()
        self._finish()
        self.svc.failures["cancelled"] += 1
        if self.response is not None:
            self.response._fail(CancelledError())

    def _cancel(self, d: Deferred) -> None:
        if self.done:
            return
        self._abandon()
        self._leave_endpoint()
        self._finish()
        self.svc.failures["cancelled"] += 1
        if self.response is not None:
            self.response._fail(CancelledError())


class Backends(Service):
    """
    An app's backend services by name, started and stopped with the app.

    Each serving process builds its own (pools, balancers and budgets are
    never shared between processes).

    :param config: ``[backends]``.
    :param reactor: the reactor.
    :param discovery_factory: ``f(name, DiscoveryConfig, reactor)`` →
        :class:`IDiscovery` (tests hand in their own).
    """

    name = "backends"

    def __init__(self, config: BackendsConfig, reactor: IBackendReactor,
                 discovery_factory: DiscoveryFactory = make_discovery) -> None:
        self.config = config
        self.reactor = reactor
        self.services: dict[str, BackendService] = {}
        for name, service_config in config.services.items():
            discovery = discovery_factory(name, service_config.discovery, reactor)
            self.services[name] = BackendService(name, service_config, discovery, reactor)

    def add(self, service: BackendService) -> BackendService:
        """
        Add a service built by hand (an app that finds endpoints its own way).
        """
        self.services[service.name] = service
        if self.running:
            service.start()
        return service

    def __contains__(self, name: str) -> bool:
        return name in self.services

    def names(self) -> list[str]:
        return sorted(self.services)

    def get(self, name: str) -> BackendService:
        """
        The service ``name``; :class:`UnknownBackend` when it is not declared.
        """
        try:
            return self.services[name]
        except KeyError:
            raise UnknownBackend(f"backend service {name!r} is not declared in [backends]; "
                                 f"known: {self.names()}") from None

    def startService(self) -> None:
        super().startService()
        for service in self.services.values():
            service.start().addErrback(self._start_failed, service.name)

    def _start_failed(self, failure: Failure, name: str) -> None:
        log.failure("backend {service}: discovery failed to start", failure, service=name)

    def stopService(self) -> Deferred:
        super().stopService()
        ds = [s.stop() for s in self.services.values()]
        return DeferredList(ds, consumeErrors=True) if ds else succeed(None)

    def status(self) -> dict[str, JSON]:
        return {name: s.status() for name, s in self.services.items()}


def install(app: App, config: BackendsConfig) -> Backends:
    """
    Build the app's backend services from ``[backends]``:
    ``app.runtime.backends``, the ``backends`` status source, and a service
    started with the app.
    """
    backends = Backends(config, app.reactor)
    app.runtime.backends = backends
    app.runtime.status_sources["backends"] = backends.status
    app.add_service(backends)
    return backends
