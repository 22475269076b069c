"""
Self-registration: this server announces itself in ZooKeeper as an
ephemeral node in Apache Curator's service-discovery layout
(``<base_path>/<service>/<id>``, ``serviceType: "DYNAMIC"``), so that Curator
clients and other pipecomet servers find it, and the node disappears with
the server's session.

The node is created when the client connects, checked again after every
reconnection, and created anew after a lost (expired) session — as
Curator's ``ServiceDiscoveryImpl`` does, a node left by an older session
under the same id is deleted and written again.  Stopping the service
deletes the node and closes the session.  Threads are handled as in
:mod:`pipecomet._backend._zookeeper`: kazoo's async calls only, results
brought to the reactor thread.
"""

from __future__ import annotations

import enum
import json
import uuid
from typing import TYPE_CHECKING, Any, Callable, Generator

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._json import JSON  # at run time: build_section reads the config's type hints
from ._discovery import IBackendReactor
from ._zookeeper import (
    as_deferred,
    describe,
    instance_json,
    instance_path,
    make_kazoo_client,
    start_client,
    stop_client,
)

if TYPE_CHECKING:
    # kazoo ships no type information: these name what the values are.
    from kazoo.client import KazooClient
    from kazoo.protocol.states import KazooState
    from twisted.internet.interfaces import IDelayedCall

    from .._app import App

__all__ = ["ServiceRegistration", "RegistrationConfig", "RegistrationState", "install"]

log = Logger()

#: Attempts at create → (exists, delete) before giving up until the next retry.
_CREATE_ATTEMPTS = 5


def _json_value(instance: object, attribute: attrs.Attribute[JSON], value: object) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise ValueError("must be a JSON value (string, number, table, list)") from None


@attrs.frozen
class RegistrationConfig:
    """
    ``[registration]``: announce this server in ZooKeeper (Curator's
    service-discovery layout) as an ephemeral instance of a service.

    :ivar enabled: register at start.
    :ivar hosts: ZooKeeper connect string, e.g. ``"127.0.0.1:2181"``.
    :ivar base_path: Curator's base path; the node is ``<base_path>/<service>/<id>``.
    :ivar service: the service name to register under.
    :ivar address: the address others should connect to (an IP or host name reachable by them).
    :ivar port: the port others should connect to.
    :ivar id: the instance id (node name); a random UUID per process when empty.
    :ivar payload: Curator's ``payload``: any JSON value, or None.
    :ivar session_timeout: ZooKeeper session timeout in seconds; the node
        outlives a dead server by about this long.
    """

    enabled: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    hosts: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    base_path: str = attrs.field(default="/services",
                                 validator=attrs.validators.instance_of(str))
    service: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    address: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    port: int = attrs.field(default=0, validator=[attrs.validators.instance_of(int),
                                                  attrs.validators.ge(0),
                                                  attrs.validators.le(65535)])
    id: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    payload: JSON = attrs.field(default=None, validator=_json_value)
    session_timeout: float = attrs.field(default=10.0, converter=float,
                                         validator=attrs.validators.gt(0))

    def __attrs_post_init__(self) -> None:
        if "/" in self.service:
            raise ValueError("service: must not contain '/'")
        if "/" in self.id:
            raise ValueError("id: must not contain '/'")
        if not self.enabled:
            return
        for name in ("hosts", "service", "address"):
            if not getattr(self, name):
                raise ValueError(f"{name}: needed when enabled = true")
        if self.port == 0:
            raise ValueError("port: needed when enabled = true (1..65535)")


class RegistrationState(enum.Enum):
    """
    Where a :class:`ServiceRegistration` stands.
    """

    STOPPED = "stopped"
    #: started, never connected yet
    CONNECTING = "connecting"
    #: connected; making sure the node is there and ours
    REGISTERING = "registering"
    #: the node exists, owned by the current session
    REGISTERED = "registered"
    #: connection suspended; the node lives as long as the session does
    SUSPENDED = "suspended"
    #: the session expired and the node with it; written again on reconnection
    EXPIRED = "expired"


_S = RegistrationState
_MOVES: dict[RegistrationState, frozenset[RegistrationState]] = {
    _S.STOPPED: frozenset({_S.CONNECTING}),
    _S.CONNECTING: frozenset({_S.REGISTERING, _S.SUSPENDED, _S.EXPIRED, _S.STOPPED}),
    _S.REGISTERING: frozenset({_S.REGISTERING, _S.REGISTERED, _S.SUSPENDED, _S.EXPIRED,
                               _S.STOPPED}),
    _S.REGISTERED: frozenset({_S.REGISTERING, _S.SUSPENDED, _S.EXPIRED, _S.STOPPED}),
    _S.SUSPENDED: frozenset({_S.REGISTERING, _S.SUSPENDED, _S.EXPIRED, _S.STOPPED}),
    _S.EXPIRED: frozenset({_S.REGISTERING, _S.EXPIRED, _S.STOPPED}),
}


class ServiceRegistration(Service):
    """
    This server as an ephemeral Curator instance of ``service``.

    :param hosts: ZooKeeper connect string.
    :param base_path: Curator's base path.
    :param service: the service to register under.
    :param address: the address to announce.
    :param port: the port to announce.
    :param payload: Curator's ``payload`` (a JSON value) or None.
    :param reactor: the reactor (``IReactorTime``, ``IReactorThreads``).
    :param instance_id: the node name; a random UUID when None.
    :param session_timeout: ZooKeeper session timeout, seconds.
    :param reconnect_max_delay: cap of kazoo's reconnect backoff, seconds.
    :param retry_delay: seconds before a failed registration is tried again
        while connected.
    :param client_factory: ``() -> KazooClient``-like; for tests.
    """

    def __init__(self, hosts: str, base_path: str, service: str, address: str, port: int,
                 payload: JSON = None, *, reactor: IBackendReactor,
                 instance_id: str | None = None,
                 session_timeout: float = 10.0, reconnect_max_delay: float = 2.0,
                 retry_delay: float = 1.0,
                 client_factory: Callable[[], KazooClient] | None = None) -> None:
        self.instance_id = instance_id or str(uuid.uuid4())
        self.path = instance_path(base_path, service, self.instance_id)
        self._hosts = hosts
        self._service = service
        self._address = address
        self._port = port
        self._payload = payload
        self._reactor = reactor
        self._retry_delay = retry_delay
        self._client_factory = client_factory or (
            lambda: make_kazoo_client(hosts, session_timeout, reconnect_max_delay))
        self._client: KazooClient | None = None
        self._data = b""
        self._state = RegistrationState.STOPPED
        self._epoch = 0  # connections so far; an attempt counts only for its own
        self._busy = False
        self._again = False
        self._retry_call: IDelayedCall | None = None
        self._registrations = 0
        self._losses = 0
        self._last_error: str | None = None
        self._starting: Deferred = succeed(None)

    @property
    def session(self) -> tuple[int, bytes] | None:
        """
        kazoo's ``(session id, password)`` while connected, else None
        (diagnostics; tests use it to expire the session on purpose).
        """
        return None if self._client is None else self._client.client_id

    @property
    def state(self) -> RegistrationState:
        return self._state

    def _move(self, to: RegistrationState) -> None:
        if to not in _MOVES[self._state]:
            raise RuntimeError(f"registration {self.path}: no move from {self._state.value} "
                               f"to {to.value}")
        self._state = to

    def instance_json(self) -> bytes:
        """
        The bytes written to the node.
        """
        return self._data

    def startService(self) -> None:
        Service.startService(self)
        self._move(RegistrationState.CONNECTING)
        registered_at = int(self._reactor.seconds() * 1000)
        self._data = instance_json(self._service, self.instance_id, self._address, self._port,
                                   payload=self._payload, registration_time_ms=registered_at,
                                   service_type="DYNAMIC")
        self._client = self._client_factory()
        self._client.add_listener(self._kazoo_state)
        self._starting = start_client(self._reactor, self._client).addErrback(
            self._failed, "start")

    @inlineCallbacks
    def stopService(self) -> Generator[Deferred[Any], object, None]:
        Service.stopService(self)
        registered = self._state is RegistrationState.REGISTERED
        self._move(RegistrationState.STOPPED)
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        client, self._client = self._client, None
        if client is None:
            return
        client.remove_listener(self._kazoo_state)
        if registered:
            from kazoo.exceptions import NoNodeError

            try:
                yield as_deferred(self._reactor, client.delete_async(self.path)).addTimeout(
                    5.0, self._reactor)
                log.info("registration: removed {path}", path=self.path)
            except NoNodeError:
                pass
            except Exception:
                # Closing the session below removes an ephemeral node anyway.
                log.failure("registration: could not delete {path}", path=self.path)
        yield self._starting  # a stop racing the start's thread could leave kazoo running
        yield stop_client(self._reactor, client)

    def status(self) -> dict:
        """
        ``path``, ``id``, ``address``, ``state`` (a :class:`RegistrationState`
        value), ``connected``, ``registered`` (the node is known to exist
        for the current session), ``registrations`` (nodes
        created), ``session_losses`` and ``last_error``.
        """
        return {"path": self.path, "id": self.instance_id,
                "address": f"{self._address}:{self._port}", "state": self._state.value,
                "connected": self._state in (_S.REGISTERING, _S.REGISTERED),
                "registered": self._state is _S.REGISTERED,
                "registrations": self._registrations,
                "session_losses": self._losses, "last_error": self._last_error}

    # -- connection state (kazoo thread → reactor thread)

    def _kazoo_state(self, state: KazooState) -> None:
        self._reactor.callFromThread(self._on_state, str(state))

    def _on_state(self, state: str) -> None:
        if self._state is _S.STOPPED:
            return
        if state == "CONNECTED":
            self._move(_S.REGISTERING)
            self._epoch += 1
            self._ensure()
        elif state == "LOST":
            # The session is gone and the node with it; a new session
            # writes it again on CONNECTED.
            if self._state in (_S.REGISTERING, _S.REGISTERED, _S.SUSPENDED):
                self._losses += 1
                log.warn("registration: ZooKeeper session lost; {path} will be registered "
                         "again on reconnection", path=self.path)
            self._move(_S.EXPIRED)
        else:
            self._move(_S.SUSPENDED)

    # -- registering

    def _ensure(self) -> None:
        if self._state is not _S.REGISTERING or self._client is None:
            return
        if self._busy:
            self._again = True
            return
        self._busy = True
        self._again = False
        d = self._register_once(self._client, self._epoch)
        d.addErrback(self._failed, "register")
        d.addBoth(self._done)

    def _done(self, _: object) -> None:
        self._busy = False
        if self._again:
            self._ensure()

    @inlineCallbacks
    def _register_once(self, client: KazooClient,
                       epoch: int) -> Generator[Deferred[Any], Any, None]:
        from kazoo.exceptions import BadVersionError, NoNodeError, NodeExistsError

        for _ in range(_CREATE_ATTEMPTS):
            try:
                yield as_deferred(self._reactor, client.create_async(
                    self.path, self._data, ephemeral=True, makepath=True))
            except NodeExistsError:
                stat = yield as_deferred(self._reactor, client.exists_async(self.path))
                if stat is None:
                    continue
                session = client.client_id
                if session is not None and stat.ephemeralOwner == session[0]:
                    self._registered_now(epoch, created=False)  # ours, from this session
                    return
                # Left by an older session (or another process with our id):
                # replace it, as Curator does, so watchers see the change.
                try:
                    yield as_deferred(self._reactor,
                                      client.delete_async(self.path, version=stat.version))
                except (NoNodeError, BadVersionError):
                    pass
                continue
            self._registered_now(epoch, created=True)
            return
        raise RuntimeError(f"{self.path} kept existing under another session")

    def _registered_now(self, epoch: int, created: bool) -> None:
        if created:
            self._registrations += 1
            log.info("registration: {path} registered as {address}:{port}", path=self.path,
                     address=self._address, port=self._port)
        # An answer from before a suspension or a lost session proves
        # nothing about the present one.
        if self._state is _S.REGISTERING and epoch == self._epoch:
            self._move(_S.REGISTERED)
            self._last_error = None

    def _failed(self, failure: Failure, what: str) -> None:
        self._last_error = f"{what}: {describe(failure)}"
        log.warn("registration: {what} of {path} failed: {error}", what=what, path=self.path,
                 error=describe(failure))
        if self._state is _S.REGISTERING and self._retry_call is None:
            self._retry_call = self._reactor.callLater(self._retry_delay, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        self._ensure()


def install(app: App, config: RegistrationConfig) -> ServiceRegistration | None:
    """
    When ``[registration] enabled``: register this server with the app's
    start, unregister at its stop, and show the ``registration`` status.
    """
    if not config.enabled:
        return None
    registration = ServiceRegistration(
        config.hosts, config.base_path, config.service, config.address, config.port,
        config.payload, reactor=app.reactor, instance_id=config.id or None,
        session_timeout=config.session_timeout)
    app.runtime.status_sources["registration"] = registration.status
    app.add_service(registration)
    return registration
