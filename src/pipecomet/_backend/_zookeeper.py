"""
ZooKeeper discovery in Apache Curator's service-discovery layout, so that
JVM services registered with Curator and pipecomet servers see each other.

Layout: each instance of service ``S`` is a node ``<base_path>/S/<id>``
holding Curator's ``ServiceInstance`` JSON::

    {"name": "users", "id": "3f0c…", "address": "10.0.0.7", "port": 8081,
     "sslPort": null, "payload": null, "registrationTimeUTC": 1795000000000,
     "serviceType": "DYNAMIC", "uriSpec": null}

Threads: kazoo runs its own connection and callback threads.  Every kazoo
call made here is one of its ``*_async`` calls, which only queue a request
and return; their results, the watches and the connection-state changes
arrive on kazoo's threads and are handed to the reactor thread with
``reactor.callFromThread`` — all state below is touched on the reactor
thread only.  The two calls that may wait (``start_async``, which joins a
previous connection, and ``stop``/``close``) run on the reactor's thread
pool.
"""

from __future__ import annotations

import enum
import json
from typing import TYPE_CHECKING, Any, Callable, Generator

from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._discovery import Endpoint, IBackendReactor, IDiscovery, WatchedEndpoints

if TYPE_CHECKING:
    # kazoo ships no type information: these name what the values are.
    from kazoo.client import KazooClient
    from kazoo.interfaces import IAsyncResult
    from kazoo.protocol.states import KazooState, WatchedEvent
    from twisted.internet.interfaces import IDelayedCall

    from .._json import JSON

__all__ = [
    "ZooKeeperDiscovery",
    "parse_instance",
    "instance_json",
    "instance_path",
    "make_kazoo_client",
    "as_deferred",
    "describe",
    "SERVICE_TYPES",
    "Link",
]

log = Logger()

#: Curator's ``ServiceType`` values; ``DYNAMIC`` instances are ephemeral nodes.
SERVICE_TYPES = ("DYNAMIC", "STATIC", "PERMANENT", "DYNAMIC_SEQUENTIAL")


# -- Curator's ServiceInstance JSON


def parse_instance(data: bytes, node: str = "") -> Endpoint | None:
    """
    A Curator ``ServiceInstance`` JSON document as an :class:`Endpoint`.

    ``address`` and ``port`` give where to connect; ``id`` (the node name
    when absent) is the endpoint's id; Curator's ``payload`` becomes the
    endpoint's payload, without the ``"@class"`` member Jackson adds to an
    object payload (a Java class name, the same data either way).  Returns None for an instance Curator would not hand
    out either (``"enabled": false``, Curator 5's flag).  Raises ValueError
    saying what is wrong otherwise — including an instance with only an
    ``sslPort``, since the backend client speaks plain HTTP.

    :param data: the node's bytes.
    :param node: the node's name, for the default id and for messages.
    """
    where = f"instance {node!r}" if node else "instance"
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: not a JSON object")
    if doc.get("enabled", True) is False:
        return None
    address = doc.get("address")
    if not isinstance(address, str) or not address:
        raise ValueError(f"{where}: address: must be a non-empty string")
    port = doc.get("port")
    if port is None:
        if doc.get("sslPort") is not None:
            raise ValueError(f"{where}: has only an sslPort; TLS backends are not supported")
        raise ValueError(f"{where}: port: missing")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{where}: port: must be an integer in 1..65535")
    ident = doc.get("id") or node
    if not isinstance(ident, str):
        raise ValueError(f"{where}: id: must be a string")
    service_type = doc.get("serviceType", "DYNAMIC")
    if service_type not in SERVICE_TYPES:
        raise ValueError(f"{where}: serviceType: {service_type!r} is not one of "
                         f"{', '.join(SERVICE_TYPES)}")
    payload = doc.get("payload")
    if isinstance(payload, dict) and "@class" in payload:
        payload = {k: v for k, v in payload.items() if k != "@class"}
    return Endpoint(address, port, ident, payload)


def instance_json(name: str, id: str, address: str, port: int, *, payload: JSON = None,
                  registration_time_ms: int = 0, service_type: str = "DYNAMIC",
                  ssl_port: int | None = None, uri_spec: JSON = None) -> bytes:
    """
    The JSON Curator's ``JsonInstanceSerializer`` writes for a
    ``ServiceInstance``, field for field and in its order.

    Curator 5's ``enabled`` field is left out on purpose: Curator readers
    before CURATOR-275 reject unknown fields, and newer ones take a missing
    ``enabled`` as true.
    """
    if service_type not in SERVICE_TYPES:
        raise ValueError(f"service_type: must be one of {', '.join(SERVICE_TYPES)}")
    doc = {
        "name": name,
        "id": id,
        "address": address,
        "port": port,
        "sslPort": ssl_port,
        "payload": payload,
        "registrationTimeUTC": registration_time_ms,
        "serviceType": service_type,
        "uriSpec": uri_spec,
    }
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def service_path(base_path: str, service: str) -> str:
    """
    ``<base_path>/<service>``, with exactly one slash between parts.
    """
    if not service or "/" in service:
        raise ValueError(f"service: {service!r} must be a non-empty name without '/'")
    base = "/" + base_path.strip("/")
    return f"{base.rstrip('/')}/{service}"


def instance_path(base_path: str, service: str, id: str) -> str:
    """
    ``<base_path>/<service>/<id>``, where Curator keeps one instance.
    """
    if not id or "/" in id:
        raise ValueError(f"id: {id!r} must be a non-empty name without '/'")
    return f"{service_path(base_path, service)}/{id}"


# -- kazoo glue


def make_kazoo_client(hosts: str, session_timeout: float,
                      reconnect_max_delay: float) -> KazooClient:
    """
    A kazoo client that reconnects forever with a backoff capped at
    ``reconnect_max_delay`` seconds (kazoo's default cap is an hour, which
    would leave a server without ZooKeeper long after it came back).
    """
    from kazoo.client import KazooClient
    from kazoo.retry import KazooRetry

    retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_jitter=0.4,
                       max_delay=reconnect_max_delay)
    return KazooClient(hosts=hosts, timeout=session_timeout, connection_retry=retry)


def as_deferred(reactor: IBackendReactor, result: IAsyncResult) -> Deferred[Any]:
    """
    A Deferred that fires on the reactor thread with the outcome of a kazoo
    ``IAsyncResult`` (which completes on one of kazoo's threads).
    """
    d: Deferred[Any] = Deferred()

    def completed(res: IAsyncResult) -> None:  # kazoo's callback thread
        try:
            value = res.get_nowait()
        except BaseException:
            reactor.callFromThread(d.errback, Failure())
        else:
            reactor.callFromThread(d.callback, value)

    result.rawlink(completed)
    return d


def describe(failure: Failure) -> str:
    """
    A failure in one line for logs and status: type, and message if any.
    """
    message = failure.getErrorMessage()
    name = failure.type.__name__ if failure.type is not None else "error"
    return f"{name}: {message}" if message and message != name else name


def _in_thread(reactor: IBackendReactor, f: Callable[..., object], *args: object) -> Deferred[object]:
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


def stop_client(reactor: IBackendReactor, client: KazooClient) -> Deferred[object]:
    """
    Close the session and free the client's sockets, off the reactor thread.
    """

    def stop_and_close() -> None:
        client.stop()
        client.close()

    return _in_thread(reactor, stop_and_close)


def start_client(reactor: IBackendReactor, client: KazooClient) -> Deferred[object]:
    """
    ``client.start_async()`` off the reactor thread; the connection comes up
    (and comes back) on its own, reported to the state listeners.
    """
    return _in_thread(reactor, client.start_async)


def _same(a: tuple[Endpoint, ...], b: tuple[Endpoint, ...]) -> bool:
    return a == b and [e.payload for e in a] == [e.payload for e in b]


class Link(enum.Enum):
    """
    Where a :class:`ZooKeeperDiscovery` stands with ZooKeeper.
    """

    STOPPED = "stopped"
    #: started, never connected yet
    CONNECTING = "connecting"
    #: connected; the list is being read afresh (still stale)
    READING = "reading"
    #: connected, and the list read since the connection came up
    CURRENT = "current"
    #: connection suspended or session lost; the last list is kept
    DISCONNECTED = "disconnected"


_LINK_MOVES: dict[Link, frozenset[Link]] = {
    Link.STOPPED: frozenset({Link.CONNECTING}),
    Link.CONNECTING: frozenset({Link.READING, Link.DISCONNECTED, Link.STOPPED}),
    Link.READING: frozenset({Link.READING, Link.CURRENT, Link.DISCONNECTED, Link.STOPPED}),
    Link.CURRENT: frozenset({Link.READING, Link.DISCONNECTED, Link.STOPPED}),
    Link.DISCONNECTED: frozenset({Link.READING, Link.DISCONNECTED, Link.STOPPED}),
}


@implementer(IDiscovery)
class ZooKeeperDiscovery(WatchedEndpoints):
    """
    The instances of one service under ``<base_path>/<service>``, kept
    current with a children watch on the service node and a data watch on
    each instance node.

    When the connection is suspended or the session lost, the last known
    endpoints are kept and :meth:`status` says ``connected: False,
    stale: True``; when the client is connected again the list is read
    afresh (watches do not survive a lost session).  A service node that
    does not exist yet means no instances, and an existence watch brings
    the list in as soon as someone creates it.  An instance node whose JSON
    is not a usable Curator instance is left out, logged, and named in
    ``status()["invalid"]``.

    :param hosts: ZooKeeper connect string (``"h1:2181,h2:2181[/chroot]"``).
    :param base_path: Curator's base path.
    :param service: the service's name under ``base_path``.
    :param reactor: the reactor (``IReactorTime``, ``IReactorThreads``).
    :param session_timeout: ZooKeeper session timeout, seconds.
    :param start_timeout: seconds :meth:`start` waits for the first list
        before firing with an empty, stale one (``session_timeout`` when None).
    :param reconnect_max_delay: cap of kazoo's reconnect backoff, seconds.
    :param retry_delay: seconds before a failed read is tried again while
        connected.
    :param client_factory: ``() -> KazooClient``-like; for tests.
    """

    def __init__(self, hosts: str, base_path: str, service: str, *, reactor: IBackendReactor,
                 session_timeout: float = 10.0, start_timeout: float | None = None,
                 reconnect_max_delay: float = 2.0, retry_delay: float = 1.0,
                 client_factory: Callable[[], KazooClient] | None = None) -> None:
        self._hosts = hosts
        self._service = service
        self._path = service_path(base_path, service)
        self._reactor = reactor
        self._start_timeout = session_timeout if start_timeout is None else start_timeout
        self._retry_delay = retry_delay
        self._client_factory = client_factory or (
            lambda: make_kazoo_client(hosts, session_timeout, reconnect_max_delay))
        self._client: KazooClient | None = None
        self._link = Link.STOPPED
        self._epoch = 0  # connections so far; a read counts only for its own
        self._endpoints: tuple[Endpoint, ...] = ()
        self._instances: dict[str, Endpoint] = {}
        self._invalid: dict[str, str] = {}
        self._node_exists: bool | None = None
        self._watchers: list[Callable[[tuple[Endpoint, ...]], None]] = []
        self._reading = False
        self._again = False
        self._full = True
        self._dirty: set[str] = set()
        self._retry_call: IDelayedCall | None = None
        self._start_call: IDelayedCall | None = None
        self._started: Deferred | None = None
        self._starting: Deferred = succeed(None)
        self._last_error: str | None = None
        self._changes = 0
        self._connects = 0
        self._losses = 0

    @property
    def session(self) -> tuple[int, bytes] | None:
        """
        kazoo's ``(session id, password)`` while connected, else None
        (diagnostics; tests use it to expire the session on purpose).
        """
        return None if self._client is None else self._client.client_id

    # -- IDiscovery

    def start(self) -> Deferred:
        """
        Connect and read the list; fires with it, or after ``start_timeout``
        with an empty, stale list when ZooKeeper cannot be reached (kazoo
        keeps trying; the list arrives through :meth:`watch` later).
        """
        if self._link is not Link.STOPPED:
            return succeed(None)
        self._move(Link.CONNECTING)
        self._started = Deferred()
        started = self._started
        self._client = self._client_factory()
        self._client.add_listener(self._kazoo_state)
        self._start_call = self._reactor.callLater(self._start_timeout, self._start_timed_out)
        self._starting = start_client(self._reactor, self._client).addErrback(self._start_failed)
        return started

    @inlineCallbacks
    def stop(self) -> Generator[Deferred[Any], object, None]:
        if self._link is Link.STOPPED:
            return
        self._move(Link.STOPPED)
        for call in (self._retry_call, self._start_call):
            if call is not None and call.active():
                call.cancel()
        self._retry_call = self._start_call = None
        self._fire_started()
        client, self._client = self._client, None
        assert client is not None  # set while not STOPPED
        client.remove_listener(self._kazoo_state)
        # A stop racing the start's thread could leave kazoo's threads running.
        yield self._starting
        yield stop_client(self._reactor, client)

    @property
    def link(self) -> Link:
        """
        Where this discovery stands with ZooKeeper now.
        """
        return self._link

    def _move(self, to: Link) -> None:
        if to not in _LINK_MOVES[self._link]:
            raise RuntimeError(f"zookeeper discovery {self._path}: no move from "
                               f"{self._link.value} to {to.value}")
        self._link = to

    @property
    def _running(self) -> bool:
        return self._link is not Link.STOPPED

    def status(self) -> dict:
        """
        ``kind``, ``hosts``, ``path``, ``state`` (a :class:`Link` value),
        ``connected``, ``stale`` (the list may be out of date: not
        connected, or not read since the connection came back),
        ``endpoints``, ``node_exists`` (None before the first read),
        ``invalid`` (node → why it was left out), ``last_error``,
        ``changes`` (list changes seen), ``connects`` and ``losses``
        (suspensions and lost sessions).
        """
        return {"kind": "zookeeper", "hosts": self._hosts, "path": self._path,
                "state": self._link.value,
                "connected": self._link in (Link.READING, Link.CURRENT),
                "stale": self._link is not Link.CURRENT,
                "endpoints": len(self._endpoints), "node_exists": self._node_exists,
                "invalid": dict(self._invalid), "last_error": self._last_error,
                "changes": self._changes, "connects": self._connects, "losses": self._losses}

    # -- connection state (kazoo thread → reactor thread)

    def _kazoo_state(self, state: KazooState) -> None:
        self._reactor.callFromThread(self._on_state, str(state))

    def _on_state(self, state: str) -> None:
        if not self._running:
            return
        if state == "CONNECTED":
            self._move(Link.READING)
            self._epoch += 1
            self._connects += 1
            log.info("zookeeper discovery {path}: connected to {hosts}",
                     path=self._path, hosts=self._hosts)
            # After a suspension the data may have moved on; after a lost
            # session the watches are gone.  Read everything again.
            self._full = True
            self._read()
        else:  # SUSPENDED or LOST
            was = self._link in (Link.READING, Link.CURRENT)
            self._move(Link.DISCONNECTED)
            if was:
                self._losses += 1
                log.warn("zookeeper discovery {path}: connection {state}; keeping the last "
                         "{count} endpoint(s)", path=self._path, state=state.lower(),
                         count=len(self._endpoints))

    def _start_failed(self, failure: Failure) -> None:
        self._last_error = describe(failure)
        log.failure("zookeeper discovery {path}: cannot start the client", failure,
                    path=self._path)

    def _start_timed_out(self) -> None:
        self._start_call = None
        if self._started is not None:
            log.warn("zookeeper discovery {path}: no answer from {hosts} within {t}s; "
                     "starting with no endpoints, still trying",
                     path=self._path, hosts=self._hosts, t=self._start_timeout)
        self._fire_started()

    def _fire_started(self) -> None:
        if self._start_call is not None and self._start_call.active():
            self._start_call.cancel()
        self._start_call = None
        started, self._started = self._started, None
        if started is not None:
            started.callback(None)

    # -- watches (kazoo thread → reactor thread)

    def _children_event(self, event: WatchedEvent) -> None:
        self._reactor.callFromThread(self._changed, None)

    def _node_event(self, event: WatchedEvent) -> None:
        self._reactor.callFromThread(self._changed, None)

    def _data_event(self, event: WatchedEvent) -> None:
        name = event.path.rsplit("/", 1)[-1] if event.path else None
        self._reactor.callFromThread(self._changed, name)

    def _changed(self, name: str | None) -> None:
        if not self._running:
            return
        if name is not None:
            self._dirty.add(name)
        self._read()

    # -- reading

    def _read(self) -> None:
        """
        Read the children and the instances that are new or changed; one
        read at a time, a request during a read runs one more afterwards.
        """
        if not self._running or self._client is None:
            return
        if self._reading:
            self._again = True
            return
        self._reading = True
        self._again = False
        full, self._full = self._full, False
        dirty, self._dirty = self._dirty, set()
        d = self._read_once(self._client, full, dirty, self._epoch)
        d.addErrback(self._read_failed, full, dirty)
        d.addBoth(self._read_done)

    @inlineCallbacks
    def _read_once(self, client: KazooClient, full: bool, dirty: set[str],
                   epoch: int) -> Generator[Deferred[Any], Any, None]:
        from kazoo.exceptions import NoNodeError

        try:
            children = yield as_deferred(
                self._reactor, client.get_children_async(self._path, watch=self._children_event))
        except NoNodeError:
            # No service node yet: no instances.  Watch for its creation;
            # if it appeared meanwhile, read again.
            stat = yield as_deferred(self._reactor,
                                     client.exists_async(self._path, watch=self._node_event))
            if not self._running or client is not self._client:
                return
            self._node_exists = False
            self._instances.clear()
            self._invalid.clear()
            self._publish(complete=True, epoch=epoch)
            if stat is not None:
                self._again = True
            return
        if not self._running or client is not self._client:
            return
        assert client is not None  # the running client (a type checker narrows it to Optional)
        names = set(children)
        wanted = sorted(n for n in names
                        if full or n in dirty or (n not in self._instances
                                                  and n not in self._invalid))
        reads = [as_deferred(self._reactor,
                             client.get_async(f"{self._path}/{n}", watch=self._data_event))
                 for n in wanted]
        results = yield DeferredList(reads, consumeErrors=True)
        if not self._running or client is not self._client:
            return
        self._node_exists = True
        for name in list(self._instances):
            if name not in names:
                del self._instances[name]
        for name in list(self._invalid):
            if name not in names:
                del self._invalid[name]
        failed: list[str] = []
        error = ""
        for name, (ok, value) in zip(wanted, results):
            if not ok:
                if value.check(NoNodeError):  # removed between the listing and the read
                    self._instances.pop(name, None)
                    self._invalid.pop(name, None)
                    continue
                # Keep what we had for it and read it again.
                failed.append(name)
                error = f"{name}: {describe(value)}"
                continue
            self._instances.pop(name, None)
            self._invalid.pop(name, None)
            data, _stat = value
            try:
                endpoint = parse_instance(data, name)
            except ValueError as e:
                self._invalid[name] = str(e)
                log.warn("zookeeper discovery {path}: leaving out {message}",
                         path=self._path, message=str(e))
                continue
            if endpoint is not None:
                self._instances[name] = endpoint
        self._publish(complete=not failed, epoch=epoch)
        if failed:
            self._dirty.update(failed)
            raise RuntimeError(f"could not read {len(failed)} instance node(s), e.g. {error}")

    def _read_failed(self, failure: Failure, full: bool, dirty: set[str]) -> None:
        self._full = self._full or full
        self._dirty |= dirty
        self._last_error = describe(failure)
        log.warn("zookeeper discovery {path}: read failed ({error}); keeping the last "
                 "{count} endpoint(s)", path=self._path, error=self._last_error,
                 count=len(self._endpoints))
        if self._link in (Link.READING, Link.CURRENT) and self._retry_call is None:
            self._retry_call = self._reactor.callLater(self._retry_delay, self._retry)
        return None

    def _retry(self) -> None:
        self._retry_call = None
        self._read()

    def _read_done(self, _: object) -> None:
        self._reading = False
        if self._running and self._again:
            self._read()

    def _publish(self, complete: bool, epoch: int) -> None:
        # Only a complete read begun on the present connection makes the
        # list current; one begun before a suspension does not.
        if complete and self._link is Link.READING and epoch == self._epoch:
            self._move(Link.CURRENT)
        if complete and self._link is Link.CURRENT:
            self._last_error = None
        endpoints = tuple(sorted(self._instances.values(), key=lambda e: e.id))
        if not _same(endpoints, self._endpoints):
            self._endpoints = endpoints
            self._changes += 1
            log.info("zookeeper discovery {path}: {count} endpoint(s)",
                     path=self._path, count=len(endpoints))
            for callback in list(self._watchers):
                try:
                    callback(endpoints)
                except Exception:
                    log.failure("discovery watcher {callback!r} failed", callback=callback)
        self._fire_started()
