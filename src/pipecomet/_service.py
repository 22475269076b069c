"""
``twistd pipecomet``: options, app loading and the service tree.

Everything that can be wrong in a configuration is checked while the
options are parsed, so a bad config file or app exits at once with a
message naming the key, before anything listens.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import attrs
from twisted.application.service import IService, MultiService
from twisted.python import usage

from ._config import Config, ConfigError, load_config

__all__ = ["Options", "makeService", "load_app"]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Serve a pipecomet app (the built-in demo gateway by default). "
                "Settings come from a TOML file (--config); options override it.")

    optParameters = [
        ["port", "p", None, "Twisted endpoint to listen on (default: [server].port, tcp:8080)."],
        ["app", "a", None, "module:attr of an App, or of a factory(config=, reactor=) returning one."],
        ["config", "c", None, "TOML configuration file."],
        ["workers-module", None, None, "Module the worker processes import their functions from."],
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
        try:
            self["app_object"] = build_app(self)
            self["processes_count"] = _processes(self, self["app_object"])
        except ConfigError as e:
            # Not a UsageError: older twistd (24.7 among them) printed those and exited 0,
            # and a bad configuration must fail the start on every version.
            sys.stderr.write(f"pipecomet: configuration error: {e}\n")
            raise SystemExit(1) from None

    def opt_version(self) -> None:
        from . import __version__

        print(f"pipecomet {__version__}")
        raise SystemExit(0)


def _override(config: Config, section: str, **values: Any) -> Config:
    current = getattr(config, section)
    try:
        new = attrs.evolve(current, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{section}: {e}") from None
    return Config({**{name: getattr(config, name) for name in config.present()}, section: new})


def load_app(spec: str) -> Any:
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


def build_app(options: Options) -> Any:
    from ._app import App
    from .demo import DEMO_CONFIG

    spec = options["app"]
    if options["config"]:
        config = load_config(os.path.expanduser(options["config"]))
    elif spec is None or spec == "pipecomet.demo:make_app":
        config = load_config(DEMO_CONFIG)
    else:
        config = Config()
    spec = spec or config.server.app
    if options["workers-module"]:
        config = _override(config, "workers", module=options["workers-module"])
    target = load_app(spec)
    if isinstance(target, App):
        app = target.configure(config)
    elif callable(target):
        app = target(config=config)
        if not isinstance(app, App):
            raise ConfigError(f"--app {spec!r}: the factory returned {type(app).__name__}, not an App")
        if not app._configured:
            app.configure(config)
    else:
        raise ConfigError(f"--app {spec!r} is a {type(target).__name__}, not an App or a factory")
    return app


def _processes(options: Options, app: Any) -> int:
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


def _has_comet_routes(app: Any) -> bool:
    for route in app.routes:
        for p in route.chain.walk():
            if getattr(getattr(p, "func", None), "mode", None) == "many":
                return True
    return False


def _probe_bus(app: Any) -> None:
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
    if options["process-index"] is not None:
        return _serving_process_service(options, app, port)
    root = MultiService()
    # Parts start before the listener and stop after it (MultiService stops
    # its children in reverse order).
    app.service.setServiceParent(root)
    strports.service(port, app.site()).setServiceParent(root)
    return root


def _supervisor_service(options: Options, app: Any, port: str, count: int) -> IService:
    from twisted.internet import reactor

    from ._supervisor import Supervisor

    args: list[str] = []
    for name in ("app", "config", "workers-module"):
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
    if server.processes_listen == "inherit":
        # Bound now, before the reactor runs: a port in use fails the start.
        from ._supervisor import bind_listener

        try:
            supervisor.socket = bind_listener(port)
        except ConfigError as e:
            sys.stderr.write(f"pipecomet: {e}\n")
            raise SystemExit(1) from None
    return supervisor


def _serving_process_service(options: Options, app: Any, port: str) -> IService:
    from twisted.internet import reactor

    from ._supervisor import ServingProcess

    root = MultiService()
    app.service.setServiceParent(root)
    ServingProcess(reactor, app, options).setServiceParent(root)
    return root
