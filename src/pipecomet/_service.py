"""
``twistd pipecomet``: options, app loading and the service tree.

Everything that can be wrong in a configuration is checked while the
options are parsed, so a bad config file or app exits at once with a
message naming the key, before anything listens.
"""

from __future__ import annotations

import importlib
import os
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
        ["log-format", None, None, "Server log format: text or json (default: [logging].format)."],
    ]

    def postOptions(self) -> None:
        try:
            self["app_object"] = build_app(self)
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from None

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
    if options["log-format"]:
        config = _override(config, "logging", format=options["log-format"])
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


def makeService(options: Options) -> IService:
    from twisted.application import strports

    app = options["app_object"]
    port = options["port"] or app.config.server.port
    root = MultiService()
    if app.config.logging.format == "json":
        from ._observe import json_log_root

        root = json_log_root(app.config.logging)  # sets twistd's log observer
    # Parts start before the listener and stop after it (MultiService stops
    # its children in reverse order).
    app.service.setServiceParent(root)
    strports.service(port, app.site()).setServiceParent(root)
    return root
