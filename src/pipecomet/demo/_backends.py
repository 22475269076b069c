"""
The demo's backend services, so ``make run`` needs no other server.

Two tiny services run inside the demo process on loopback ports: ``users``
(three instances) and ``orders`` (two).  They are found through static
discovery: when ``demo.toml`` leaves a service's ``endpoints`` empty, the
instances listen on free ports at start and the list is filled then; list
endpoints there to call real servers instead.

Routes: ``GET /api/user.get?app_key=demo-key&id=N`` (one call),
``GET /api/profile.get?app_key=demo-key&id=N`` (a parallel fan-out to both
services, streamed as NDJSON or SSE when asked), ``/backend/users/...``
(proxied to ``users``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.http import Request
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from pipecomet import BadRequest, Config, Parallel, Pipe, PipeContext, PipeInput, PipeResult, call, proxy
from pipecomet.backend import Endpoint, StaticDiscovery
from pipecomet.config import BackendsConfig, ServiceConfig
from ._gateway import auth_pipes

if TYPE_CHECKING:
    from pipecomet import App

__all__ = ["install_routes", "with_demo_services", "DemoService", "INSTANCES"]

log = Logger()

#: Service name → instances the demo starts when its endpoints are not listed.
INSTANCES = {"users": 3, "orders": 2}

_NAMES = ["ann", "bob", "cho", "dev", "eve", "fay", "gus", "hal", "ivy", "jon"]


class DemoService(Resource):
    """
    One instance of a demo backend: ``GET /users/N`` or ``GET /orders/N``
    (JSON; 404 for an unknown id), anything else echoed.
    """

    isLeaf = True

    def __init__(self, service: str, instance: str) -> None:
        super().__init__()
        self.service = service
        self.instance = instance

    def render(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        parts = request.path.decode("utf-8", "replace").strip("/").split("/")
        if len(parts) == 2 and parts[0] == self.service and parts[1].isdigit():
            n = int(parts[1])
            if not 1 <= n <= 1000:
                request.setResponseCode(404)
                return json.dumps({"error": f"no {self.service[:-1]} {n}"}).encode()
            if self.service == "users":
                name = _NAMES[n % len(_NAMES)]
                body: object = {"id": n, "name": name, "email": f"{name}{n}@example.com"}
            else:
                body = [{"order": n * 100 + i, "user": n, "total": round(9.5 * (i + 1), 2)}
                        for i in range(n % 3 + 1)]
            return json.dumps({"served_by": self.instance, "data": body}).encode()
        content = request.content.read() if request.content is not None else b""
        return json.dumps({
            "served_by": self.instance,
            "method": request.method.decode("ascii"),
            "uri": request.uri.decode("utf-8", "replace"),
            "body": content.decode("utf-8", "replace"),
            "forwarded_for": (request.getHeader(b"x-forwarded-for") or b"").decode(),
            "deadline_ms": (request.getHeader(b"x-request-deadline-ms") or b"").decode(),
        }).encode()


class _QuietSite(Site):
    """
    A demo instance's site: the gateway logs the calls, the instance does not.
    """

    def log(self, request: Request) -> None:
        pass


class _DemoBackends(Service):
    """
    Starts the demo instances of every service whose static list is empty
    and fills the list with their loopback addresses.
    """

    name = "demo-backends"

    def __init__(self, app: App) -> None:
        self.app = app
        self.ports: list[IListeningPort] = []

    def startService(self) -> None:
        super().startService()
        reactor = self.app.reactor
        backends = self.app.runtime.backends
        if backends is None or not IReactorTCP.providedBy(reactor):
            return  # a fake clock in unit tests: no sockets
        for name, count in INSTANCES.items():
            if name not in backends:
                continue
            discovery = backends.get(name).discovery
            if not isinstance(discovery, StaticDiscovery) or discovery.current():
                continue
            endpoints = []
            for i in range(count):
                site = _QuietSite(DemoService(name, f"{name}-{i + 1}"))
                # (A Site is a ServerFactory[HTTPChannel]; listenTCP's
                # annotation names the unparameterized, invariant one.)
                port = reactor.listenTCP(0, cast(ServerFactory, site), interface="127.0.0.1")
                self.ports.append(port)
                address = port.getHost()
                assert isinstance(address, IPv4Address)
                endpoints.append(Endpoint("127.0.0.1", address.port, id=f"{name}-{i + 1}"))
            discovery.set(endpoints)
            log.info("demo backend {service}: {n} instances on {addresses}", service=name,
                     n=count, addresses=", ".join(e.address for e in endpoints))

    def stopService(self) -> Deferred[list[object]]:
        super().stopService()
        ports, self.ports = self.ports, []
        return gatherResults([maybeDeferred(p.stopListening) for p in ports])


def with_demo_services(config: Config) -> Config:
    """
    ``config`` with a ``users`` and an ``orders`` service added when it
    declares none of that name (so a user's ``--config`` for the demo need
    not repeat them).
    """
    services = dict(config.backends.services)
    missing = [n for n in INSTANCES if n not in services]
    if not missing:
        return config
    for name in missing:
        services[name] = ServiceConfig(timeout=2.0)
    sections = {name: getattr(config, name) for name in config.present()}
    sections["backends"] = BackendsConfig(services=services)
    return Config(sections)


def user_id(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> int:
    raw = inp.query.get("id", "")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 1000:
        raise BadRequest("id must be a number from 1 to 1000", code="invalid_parameter",
                         details={"param": "id"})
    return int(raw)


def install_routes(app: App) -> None:
    auth = [*auth_pipes(app), Pipe(user_id)]
    app.route("/api/user.get", [*auth, call("users", "GET", "/users/{id}", name="user")])
    app.route("/api/profile.get", [
        *auth,
        Parallel([call("users", "GET", "/users/{id}", name="user"),
                  call("orders", "GET", "/orders/{id}", name="orders")], timeout=3.0),
    ])
    app.route("/backend/users/<path:rest>", [proxy("users", strip_prefix="/backend/users")],
              methods=("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"))
    app.add_service(_DemoBackends(app))
