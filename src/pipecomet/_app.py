"""
The app: routes bound to chains, served through twisted.web.

``App.route`` puts a chain route in the app's one :class:`~._routing.Router`;
every server path finds routes through ``router.match``: the
:class:`PipecometResource` on twisted.web's channel and pipecomet's own
HTTP/1.1 protocol.  Plain Klein handlers (``app.klein_route``) are served
beside the chains by the wrapped :class:`klein.Klein` when no chain route
matches; :meth:`App.mount_in_klein` registers the chain routes on a Klein
app, for mounting a pipecomet app inside a Klein one (an explicit option:
the server itself never routes chains through Klein).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET, Site
from werkzeug.exceptions import MethodNotAllowed as WzMethodNotAllowed
from werkzeug.exceptions import NotFound as WzNotFound

from ._backend._pipes import BackendPipe
from ._chain import Chain, ChainRun, Parallel, Pipe, PipeContext, PipeFunc, PipeInput, PipeResult
from ._config import Config, ConfigError
from ._events import Condition
from ._interfaces import IPipecometReactor
from ._errors import MethodNotAllowed, NotFound, PipecometError, error_response
from ._responders import RESPONDERS, choose_responder, send_error
from ._observe import KLEIN, UNMATCHED, RequestObserver
from ._routing import Matched, Router
from ._runtime import Runtime

if TYPE_CHECKING:
    from klein import Klein

    from ._json import JSON

__all__ = ["App", "Route", "PipecometResource"]

log = Logger()


def _no_access_log(request: object) -> None:
    """
    ``Site.log``: twisted.web's per-request log line is replaced by the
    buffered access log (``pipecomet._observe``).
    """


class Route:
    """
    A path and methods bound to a chain and the responders it offers.
    """

    __slots__ = ("path", "methods", "chain", "responders", "app", "_one")

    def __init__(self, app: App, path: str, chain: Chain, methods: Sequence[str],
                 responders: Sequence[str]) -> None:
        unknown = [r for r in responders if r not in RESPONDERS]
        if unknown:
            raise ValueError(f"route {path}: unknown responders {unknown}; known: {sorted(RESPONDERS)}")
        self.app = app
        self.path = path
        self.chain = chain
        self.methods = tuple(m.upper() for m in methods)
        self.responders = tuple(responders)
        self._one = RESPONDERS[self.responders[0]] if len(self.responders) == 1 else None

    def serve(self, request: IRequest, path_params: Mapping[str, object] | None = None) -> ChainRun:
        """
        Run the chain for ``request``; the responder answers it.  The app's
        observer gives the request its id (``ctx.request_id``) and records
        it (figures, access log).
        """
        factory = self._one
        if factory is None:
            factory = RESPONDERS[choose_responder(request, self.responders)]
        observer = self.app.observer
        record = observer.begin(request, self.path)
        ctx = PipeContext(self.app.runtime)
        ctx.request_id = record.request_id
        run = ChainRun(self.chain, PipeInput(request, path_params), ctx, factory(request))
        run.start()
        observer.follow(request, record)
        return run


class PipecometResource(Resource):
    """
    The leaf resource that serves an :class:`App`.
    """

    isLeaf = True

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app
        self._klein_resource: Resource | None = None

    def render(self, request: IRequest) -> bytes | int:
        app = self.app
        found = app.router.match(request.method, request.path)
        if isinstance(found, Matched):
            found.route.serve(request, found.params)
            return NOT_DONE_YET
        observer = app.observer  # request id, figures, access log
        if app._plain_klein_routes:
            record = observer.begin(request, KLEIN)
            if self._klein_resource is None:
                self._klein_resource = app.klein.resource()
            out = self._klein_resource.render(request)
            observer.follow(request, record)
            return out
        record = observer.begin(request, UNMATCHED)
        error: PipecometError
        if found is not None:
            error = MethodNotAllowed(f"method {request.method.decode('ascii', 'replace')} not allowed here",
                                     headers={"Allow": found.allow_header})
        else:
            error = NotFound(f"no route for {request.path.decode('utf-8', 'replace')}")
        send_error(request, error)
        observer.follow(request, record)
        return NOT_DONE_YET


class App:
    """
    A pipecomet application.

    :param reactor: the reactor; the global one when None (looked up on
        first use, never at import).
    :param name: shown in logs and status.
    :param builtin_routes: serve ``/_pipecomet/status``.
    """

    def __init__(self, *, reactor: IPipecometReactor | None = None, name: str = "pipecomet",
                 builtin_routes: bool = True) -> None:
        from klein import Klein

        self.name = name
        self.klein = Klein()
        #: The chain routes: the one table every server path looks up.
        self.router = Router()
        self._plain_klein_routes = False
        self.runtime = Runtime(reactor)
        #: Request ids, request figures and the access log (pipecomet._observe).
        self.observer = RequestObserver()
        self.config = Config()
        self.service = MultiService()
        self.service.setName(name)
        self._configured = False
        self._install_klein_errors()
        if builtin_routes:
            self.route("/_pipecomet/status", [Pipe(self._status, name="status")])

    @property
    def reactor(self) -> IPipecometReactor:
        """
        The app's reactor (the one given, else the global one).
        """
        return self.runtime.reactor

    # -- declaring

    def route(
        self,
        path: str,
        chain: Chain | Iterable[Pipe | Parallel | PipeFunc],
        *,
        methods: Sequence[str] = ("GET",),
        responders: Sequence[str] | None = None,
    ) -> Route:
        """
        Bind ``path`` (werkzeug syntax, e.g. ``/items/<int:id>``) to a chain.

        :param responders: names from :data:`~pipecomet._responders.RESPONDERS`,
            the first being the default; ``("json", "ndjson", "sse")`` for a
            chain with branches, ``("json",)`` otherwise.
        """
        compiled = chain if isinstance(chain, Chain) else Chain(chain, name=path)
        compiled = self.observer.instrument(compiled, path)
        if responders is None:
            responders = ("json", "ndjson", "sse") if compiled.has_branches else ("json",)
        route = Route(self, path, compiled, methods, responders)
        self.router.add(route)
        return route

    @property
    def routes(self) -> tuple[Route, ...]:
        """
        The chain routes, in declaration order (a read-only view of
        :attr:`router`).
        """
        return self.router.routes

    def mount_in_klein(self, klein: Klein | None = None) -> Klein:
        """
        Register every chain route declared so far on ``klein`` (the wrapped
        :attr:`klein` when None) and return it, so that a Klein app serves
        them: ``parent.subroute("/api")`` mounting, or ``klein.resource()``.
        Requests served that way go through Klein's own routing; the
        app's server does not need this.
        """
        if klein is None:
            klein = self.klein
        for i, route in enumerate(self.router.routes):
            endpoint = f"pipecomet:{i + 1}:{route.path}"

            def handler(request: IRequest, _route: Route = route,
                        **params: object) -> Deferred[None]:
                return _route.serve(request, params).when_done()

            handler.__name__ = endpoint
            klein.route(route.path, methods=list(route.methods), endpoint=endpoint)(handler)
        return klein

    # Any: Klein's own route arguments and decorator, passed through.
    def klein_route(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        """
        ``app.klein.route`` for plain Klein handlers served beside the chains.
        """
        self._plain_klein_routes = True
        return self.klein.route(*args, **kwargs)

    def add_service(self, service: IService) -> None:
        """
        Start and stop ``service`` with the app (pools, keepers, clients).
        """
        service.setServiceParent(self.service)

    # -- configuring

    def configure(self, config: Config) -> App:
        """
        Apply a configuration: every part's installer builds what its table
        asks for (quota pool, workers, comet...), then the routes are
        checked against it.  Errors are :class:`ConfigError`.
        """
        self.config = config
        self.runtime.config = config
        self.reactor  # resolve now, before any part needs it
        for name, install in config.installers():
            install(self, getattr(config, name))
        self._configured = True
        self.check()
        return self

    def check(self) -> None:
        """
        Fail with :class:`ConfigError` when a route uses a part or a quota
        category that is not there (a thread pipe without a quota pool, a
        process pipe without workers, a condition pipe without an event
        keeper or, for a comet stream, without a comet hub).
        """
        for route in self.routes:
            for p in route.chain.walk():
                if p.run == "thread":
                    quota = self.runtime.quota
                    if quota is None:
                        raise ConfigError(f"route {route.path}: pipe {p.name!r} runs in a thread "
                                          "but no quota pool is configured")
                    if not quota.has_category(p.category):
                        raise ConfigError(f"route {route.path}: pipe {p.name!r} uses unknown quota "
                                          f"category {p.category!r}")
                elif p.run == "process" and self.runtime.workers is None:
                    raise ConfigError(f"route {route.path}: pipe {p.name!r} runs in a worker "
                                      "process but no worker pool is configured")
                func = inspect.unwrap(p.func)  # metrics may time the pipe
                if isinstance(func, Condition):
                    if func.mode == "many" and self.runtime.comet is None:
                        raise ConfigError(f"route {route.path}: condition pipe {p.name!r} streams "
                                          "topics but no comet hub is installed ([comet])")
                    if self.runtime.events is None:
                        raise ConfigError(f"route {route.path}: condition pipe {p.name!r} waits "
                                          "for events but no event keeper is installed ([comet])")
                if isinstance(func, BackendPipe):
                    backends = self.runtime.backends
                    if backends is None or func.service not in backends:
                        known = backends.names() if backends is not None else []
                        raise ConfigError(f"route {route.path}: pipe {p.name!r} calls unknown "
                                          f"backend service {func.service!r}; known: {known}")

    @property
    def configured(self) -> bool:
        """
        True once :meth:`configure` has run.
        """
        return self._configured

    # -- serving

    def resource(self) -> PipecometResource:
        return PipecometResource(self)

    # Any: twisted.web Site's own keyword arguments, passed through.
    def site(self, **kwargs: Any) -> Site:
        """
        The ``twisted.web`` Site serving this app: pipecomet's own HTTP/1.1
        protocol (:mod:`pipecomet._http`) with the ``[limits]`` table, or
        twisted.web's plain channel when ``[server] protocol = "twisted"``.
        """
        server = self.config.server
        kwargs.setdefault("timeout", getattr(server, "idle_timeout", 60.0))
        site: Site
        if getattr(server, "protocol", "pipecomet") == "twisted":
            site = Site(self.resource(), reactor=self.reactor, **kwargs)
        else:
            from ._http import Site as HTTPSite
            from ._lazy import LimitsConfig

            lazy = self.runtime.lazy  # set by the [limits] installer (pipecomet._lazy)
            if lazy is not None:
                site = lazy.make_site(self.resource(), reactor=self.reactor, **kwargs)
            else:
                site = HTTPSite(self.resource(), limits=LimitsConfig(), reactor=self.reactor,
                                **kwargs)
        site.displayTracebacks = False
        # The [logging] installer's buffered access log records requests
        # (server.access_log), not twisted.web's line per request.
        # An instance attribute over the method, on purpose: no call into
        # twisted.web's log (and its AttributeError) per request.
        site.log = _no_access_log  # type: ignore[method-assign]
        return site

    def _install_klein_errors(self) -> None:
        @self.klein.handle_errors(WzNotFound)
        def not_found(request: IRequest, failure: Failure) -> bytes:
            return error_response(
                request, NotFound(f"no route for {request.path.decode('utf-8', 'replace')}"))

        @self.klein.handle_errors(WzMethodNotAllowed)
        def not_allowed(request: IRequest, failure: Failure) -> bytes:
            return error_response(request, MethodNotAllowed("method not allowed here"))

    def _status(self, inp: PipeInput, ctx: PipeContext, res: PipeResult) -> dict[str, JSON]:
        return {"app": self.name, **self.runtime.status()}
