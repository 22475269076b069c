"""
Service discovery: where a backend service's endpoints are.

One interface (:class:`IDiscovery`), three providers: a static list
(here), a JSON/TOML file watched for changes (``_file.py``) and ZooKeeper in
Apache Curator's service-discovery layout (``_zookeeper.py``).  The backend
client only ever asks a provider for its current endpoints and listens for
changes; it never knows which provider it has.
"""

from __future__ import annotations

from typing import Callable

import attrs
from twisted.internet.defer import Deferred, succeed
from zope.interface import Interface, implementer

from .._interfaces import IBackendReactor
from .._json import JSON

__all__ = [
    "Endpoint",
    "DiscoveryConfig",
    "IDiscovery",
    "StaticDiscovery",
    "parse_address",
    "WatchedEndpoints",
    "make_discovery",
]


@attrs.frozen
class Endpoint:
    """
    One instance of a service.

    :ivar host: IP address or host name to connect to.
    :ivar port: TCP port.
    :ivar id: stable id of the instance (Curator's ``id``); ``host:port`` when
        the provider has none.
    :ivar payload: provider-specific data (Curator's ``payload``), or None.
    """

    host: str
    port: int
    id: str = attrs.field(default="")
    payload: JSON = attrs.field(default=None, eq=False, hash=False)

    def __attrs_post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", f"{self.host}:{self.port}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> Endpoint:
    """
    ``"host:port"`` (or ``"[v6]:port"``) as an :class:`Endpoint`; ValueError
    naming the text when it is not one.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdecimal() or not port.isascii():
        raise ValueError(f"{text!r} is not host:port")
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"{text!r}: port out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Endpoint(host, number)


_KINDS = ("static", "file", "zookeeper")


@attrs.frozen
class DiscoveryConfig:
    """
    ``[backends.NAME.discovery]``: where the service's endpoints come from.

    :ivar kind: ``"static"``, ``"file"`` or ``"zookeeper"``.
    :ivar endpoints: static: the ``host:port`` list.
    :ivar path: file: a JSON or TOML file holding ``{"endpoints": ["host:port", ...]}``.
    :ivar poll_interval: file: seconds between checks of the file.
    :ivar hosts: zookeeper: the connect string, e.g. ``"127.0.0.1:2181"``.
    :ivar base_path: zookeeper: Curator's base path; instances live at
        ``<base_path>/<service>/<id>``.
    :ivar service: zookeeper: the service name under ``base_path``
        (the backend's own name when empty).
    :ivar session_timeout: zookeeper: session timeout in seconds.
    """

    kind: str = attrs.field(default="static", validator=attrs.validators.in_(_KINDS))
    endpoints: list[str] = attrs.field(factory=list)
    path: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    poll_interval: float = attrs.field(default=1.0, converter=float,
                                       validator=attrs.validators.gt(0))
    hosts: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    base_path: str = attrs.field(default="/services", validator=attrs.validators.instance_of(str))
    service: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    session_timeout: float = attrs.field(default=10.0, converter=float,
                                         validator=attrs.validators.gt(0))

    @endpoints.validator
    def _check_endpoints(self, attribute: attrs.Attribute[list[str]], value: object) -> None:
        if not isinstance(value, list):
            raise ValueError("must be a list of host:port strings")
        for item in value:
            if not isinstance(item, str):
                raise ValueError("must be a list of host:port strings")
            parse_address(item)

    def __attrs_post_init__(self) -> None:
        if self.kind == "file" and not self.path:
            raise ValueError("kind = 'file' needs path")
        if self.kind == "zookeeper" and not self.hosts:
            raise ValueError("kind = 'zookeeper' needs hosts")


class IDiscovery(Interface):
    """
    The endpoints of one service, kept current.

    All methods are called, and all callbacks fire, on the reactor thread.
    """

    def start() -> Deferred:
        """
        Begin watching.  Fires once the first list is known (or at once
        with an empty list and a stale status when the source is down).
        """

    def stop() -> Deferred:
        """
        Stop watching and release the source's connections.
        """

    def current() -> tuple[Endpoint, ...]:
        """
        The endpoints known now (the last known ones when the source is lost).
        """

    def watch(callback: Callable[[tuple[Endpoint, ...]], None]) -> Callable[[], None]:
        """
        Call ``callback(endpoints)`` whenever the list changes.

        :return: a function that stops the watch.
        """

    def status() -> dict:
        """
        JSON-able figures for ``/_pipecomet/status``: at least ``kind``,
        ``connected`` (bool) and ``stale`` (True while the source is lost and
        the last known list is kept).
        """


class WatchedEndpoints:
    """
    :meth:`IDiscovery.current` and :meth:`IDiscovery.watch` for a provider
    that keeps its list in ``_endpoints`` and its callbacks in ``_watchers``.
    """

    _endpoints: tuple[Endpoint, ...]
    _watchers: list[Callable[[tuple[Endpoint, ...]], None]]

    def current(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    def watch(self, callback: Callable[[tuple[Endpoint, ...]], None]) -> Callable[[], None]:
        self._watchers.append(callback)

        def unwatch() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)

        return unwatch


@implementer(IDiscovery)
class StaticDiscovery(WatchedEndpoints):
    """
    A fixed list of endpoints; :meth:`set` replaces it (used by tests and by
    apps that find endpoints their own way).
    """

    def __init__(self, endpoints: list[Endpoint] | tuple[Endpoint, ...] = ()) -> None:
        self._endpoints = tuple(endpoints)
        self._watchers: list[Callable[[tuple[Endpoint, ...]], None]] = []

    def start(self) -> Deferred:
        return succeed(None)

    def stop(self) -> Deferred:
        return succeed(None)

    def set(self, endpoints: list[Endpoint] | tuple[Endpoint, ...]) -> None:
        endpoints = tuple(endpoints)
        if endpoints == self._endpoints:
            return
        self._endpoints = endpoints
        for callback in list(self._watchers):
            callback(endpoints)

    def status(self) -> dict:
        return {"kind": "static", "connected": True, "stale": False,
                "endpoints": len(self._endpoints)}


def make_discovery(service: str, config: DiscoveryConfig, reactor: IBackendReactor) -> IDiscovery:
    """
    The provider ``config.kind`` names, for backend ``service``.
    """
    if config.kind == "static":
        return StaticDiscovery([parse_address(a) for a in config.endpoints])
    if config.kind == "file":
        from ._file import FileDiscovery

        return FileDiscovery(config.path, reactor=reactor, poll_interval=config.poll_interval)
    if config.kind == "zookeeper":
        from ._zookeeper import ZooKeeperDiscovery

        return ZooKeeperDiscovery(config.hosts, config.base_path, config.service or service,
                                  reactor=reactor, session_timeout=config.session_timeout)
    raise ValueError(f"unknown discovery kind {config.kind!r}")
