"""
``twistd pipecomet`` and ``pipecomet serve``: options, app loading and the
service tree.

Everything that can be wrong in a configuration is checked while the
options are parsed, so a bad config file or app exits at once with a
message naming the key, before anything listens.  The working directory
is put on ``sys.path`` first (as uvicorn and gunicorn do), so ``--app
hello:app`` finds ``hello.py`` where the command runs.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFDSet, ITCPTransport
from twisted.logger import Logger
from twisted.python import usage

from ._config import Config, ConfigError, ServerConfig, build_section, merge_tables, read_tables

if TYPE_CHECKING:
    from ._app import App

__all__ = ["Options", "makeService", "load_app", "build_app"]

log = Logger()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Serve a pipecomet app (the built-in demo gateway by default). "
                "Settings come from a TOML file (--config); options override it.")

    optParameters = [
        ["port", "p", None, "Twisted endpoint to listen on (default: [server].port, tcp:8080)."],
        ["app", "a", None, "module:attr of an App, or of a factory(config=, reactor=) returning one."],
        ["config", "c", None, "TOML configuration file."],
        ["workers-module", None, None, "Module the worker processes import their functions from."],
        ["log-format", None, None, "Server log format: text or json (default: [logging].format)."],
        ["processes", None, None,
         "Serving processes on one socket: a number or 'auto' (default: [server].processes, 1)."],
        # Set by the supervisor for the serving processes it starts.
        ["listen-fd", None, None, "(internal) the inherited listening socket's descriptor."],
        ["process-index", None, None, "(internal) this serving process's index."],
        ["processes-total", None, None, "(internal) how many serving processes there are."],
        ["supervisor-pid", None, None, "(internal) the supervisor's pid."],
    ]
    optFlags = [
        ["reuseport", None, "(internal) bind the --port socket with SO_REUSEPORT."],
    ]

    def postOptions(self) -> None:
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
        try:
            self["app_object"] = build_app(self)
            self["processes_count"] = _processes(self, self["app_object"])
        except ConfigError as e:
            # Not a UsageError: some twistd releases (24.7 among them) printed those and exited 0,
            # and a bad configuration must fail the start on every version.
            sys.stderr.write(f"pipecomet: configuration error: {e}\n")
            raise SystemExit(1) from None

    def opt_version(self) -> None:
        from . import __version__

        print(f"pipecomet {__version__}")
        raise SystemExit(0)


def load_app(spec: str) -> object:
    """
    Import ``module:attr``; errors say what was not found.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--app {spec!r}: expected module:attr")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--app {spec!r}: cannot import {module_name}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"--app {spec!r}: {module_name} has no attribute {attr!r}") from None


#: The entry point group an installed package names its apps in; the
#: ``default`` one is served when no app is given.
APPS_GROUP = "pipecomet.apps"


def default_app_spec() -> str:
    """
    ``module:attr`` of the installed default app: the ``default`` entry
    point of the ``pipecomet.apps`` group (the demo gateway declares it).
    """
    from importlib.metadata import entry_points

    found = entry_points(group=APPS_GROUP, name="default")
    for ep in found:
        return str(ep.value)
    raise ConfigError(f"no app given (--app or [server] app) and no {APPS_GROUP!r} "
                      "entry point named 'default' is installed")


def build_app(options: Options) -> App:
    """
    Read the config file (its tables only: an app factory lays them over
    its own defaults), apply the options that override it, import the app
    (which may register tables of its own) and configure it.  Nothing
    starts.
    """
    from ._app import App

    spec = options["app"]
    tables: dict[str, Any] = {}
    if options["config"]:
        tables = read_tables(os.path.expanduser(options["config"]))
    if options["workers-module"]:
        tables = merge_tables(tables, {"workers": {"module": options["workers-module"]}})
    if options["log-format"]:
        tables = merge_tables(tables, {"logging": {"format": options["log-format"]}})
    server = build_section(ServerConfig, tables.get("server", {}), "server")
    spec = spec or server.app or default_app_spec()
    target = load_app(spec)
    config = Config.from_dict(tables)
    if isinstance(target, App):
        app = target.configure(config)
    elif callable(target):
        app = target(config=config)
        if not isinstance(app, App):
            raise ConfigError(f"--app {spec!r}: the factory returned {type(app).__name__}, not an App")
        if not app.configured:
            app.configure(config)
    else:
        raise ConfigError(f"--app {spec!r} is a {type(target).__name__}, not an App or a factory")
    return app


class _Serving(MultiService):
    """
    The app's parts and its listener, stopped in the order that lets every
    request in flight get its answer: the listener first (no new
    connections), then the parts (running thread jobs finish, queued ones
    get 503 ``pool_closing``), then a wait until every response written has
    left the process (no TCP connection still has bytes to write; at most
    ``[server] drain_timeout`` seconds), before the reactor drops the
    connections.
    """

    def __init__(self, app: App, listener: IService) -> None:
        super().__init__()
        self._app = app
        self._listener = listener
        app.service.setServiceParent(self)
        listener.setServiceParent(self)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        d = maybeDeferred(self._listener.stopService)
        d.addBoth(lambda _: maybeDeferred(self._app.service.stopService))
        d.addBoth(lambda _: self._flushed())
        return d

    def _flushed(self) -> Deferred | None:
        if not IReactorFDSet.providedBy(self._app.reactor):
            return None
        reactor = self._app.reactor
        timeout = float(getattr(self._app.config.server, "drain_timeout", 5.0))
        deadline = reactor.seconds() + timeout
        done: Deferred = Deferred()

        def check() -> None:
            writing = [w for w in reactor.getWriters() if ITCPTransport.providedBy(w)]
            if not writing:
                done.callback(None)
            elif reactor.seconds() >= deadline:
                log.warn("{n} connections still had bytes to send after {t}s; dropping them",
                         n=len(writing), t=timeout)
                done.callback(None)
            else:
                # Shutdown only: a short poll of the reactor's own writer set
                # (no per-connection bookkeeping while serving).
                reactor.callLater(0.02, check)

        check()
        return done
def _processes(options: Options, app: App) -> int:
    """
    How many serving processes: ``--processes`` over ``[server] processes``;
    more than one with comet routes needs a bus between them.
    """
    from ._supervisor import usable_cores

    value = options["processes"]
    if value is None:
        value = app.config.server.processes
    if value == "auto":
        count = usable_cores()
    else:
        try:
            count = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--processes {value!r}: expected a number >= 1 or 'auto'") from None
        if count < 1:
            raise ConfigError(f"--processes {value!r}: expected a number >= 1 or 'auto'")
    if count > 1 and options["process-index"] is None and app.config.bus.kind == "memory" \
            and _has_comet_routes(app):
        raise ConfigError(
            f"--processes {count}: the app has comet routes and [bus] kind is \"memory\": "
            "a publish would reach only the subscribers of the process that took it; "
            "set [bus] kind = \"redis\" (and url) in the config file, or serve one process")
    return count


def _has_comet_routes(app: App) -> bool:
    for route in app.routes:
        for p in route.chain.walk():
            if getattr(inspect.unwrap(p.func), "mode", None) == "many":
                return True
    return False


def _probe_bus(app: App) -> None:
    """
    With ``[bus] kind = "redis"`` and ``on_unavailable = "fail"``, a start
    with Redis unreachable fails at once, naming it.  (Run before the
    reactor runs: a blocking probe blocks nothing.)
    """
    bus = app.config.bus
    if bus.kind != "redis" or bus.on_unavailable != "fail":
        return
    from ._redis_bus import probe

    error = probe(bus.url, bus.connect_timeout)
    if error is not None:
        sys.stderr.write(f"pipecomet: [bus] cannot reach Redis at {bus.url}: {error} "
                         "(set [bus] on_unavailable = \"serve\" to start anyway and answer 503)\n")
        raise SystemExit(1)


def makeService(options: Options) -> IService:
    from twisted.application import strports

    app = options["app_object"]
    port = options["port"] or app.config.server.port
    count = options["processes_count"]
    _probe_bus(app)
    if count > 1 and options["process-index"] is None:
        return _supervisor_service(options, app, port, count)
    root: IService
    if options["process-index"] is not None:
        root = _serving_process_service(options, app, port)
    else:
        # Parts start before the listener; on stop, see _Serving.
        root = _Serving(app, strports.service(port, app.site()))
    if app.config.logging.format == "json":
        from ._observe import json_log_root

        log_root = json_log_root(app.config.logging)  # sets twistd's log observer
        root.setServiceParent(log_root)
        return log_root
    return root


def _supervisor_service(options: Options, app: App, port: str, count: int) -> IService:
    from ._supervisor import Supervisor

    reactor = app.reactor

    args: list[str] = []
    for name in ("app", "config", "workers-module", "log-format"):
        if options[name]:
            value = options[name]
            if name == "config":
                value = os.path.abspath(os.path.expanduser(value))
            args += [f"--{name}", value]
    pool = app.runtime.workers
    server = app.config.server
    supervisor = Supervisor(reactor, count, port, args, listen=server.processes_listen,
                            stop_timeout=max(30.0, server.drain_grace + 10.0),
                            workers_per_process=app.config.workers.size if pool else 0)
    # Bound now, before the reactor runs: a port in use fails the start.
    try:
        supervisor.bind()
    except ConfigError as e:
        sys.stderr.write(f"pipecomet: {e}\n")
        raise SystemExit(1) from None
    return supervisor


def _serving_process_service(options: Options, app: App, port: str) -> IService:
    from ._supervisor import ServingProcess

    # Stopped as one process is: the listener drains its connections first
    # (the app's parts still serve them), then the parts stop.
    return _Serving(app, ServingProcess(app.reactor, app, options))
