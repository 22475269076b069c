"""
The demo gateway: an open-API platform in miniature.

``make_app`` is what ``twistd -n pipecomet`` serves when no ``--app`` is
given.  Each part of pipecomet adds its own routes from a module listed in
:data:`DEMO_ROUTE_MODULES`; the defaults come from ``demo.toml`` beside this
file.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .._app import App
from .._config import Config, load_config

__all__ = ["make_app", "DEMO_CONFIG", "DEMO_ROUTE_MODULES", "PUBLISH_TOKEN"]

#: The configuration the demo runs with when no ``--config`` is given.
DEMO_CONFIG = Path(__file__).with_name("demo.toml")

#: Documented in the README; a real deployment sets its own in ``[comet]``.
PUBLISH_TOKEN = "demo-publish-token"

#: Modules with ``install_routes(app)``, one per part of pipecomet.
DEMO_ROUTE_MODULES = [
    "pipecomet.demo._gateway",
    "pipecomet.demo._comet",
    "pipecomet.demo._upload",
    "pipecomet.demo._slow",
    "pipecomet.demo._workers",
    "pipecomet.demo._backends",
]


def make_app(config: Config | None = None, reactor: Any = None) -> App:
    """
    Build the demo gateway with ``config`` (``demo.toml`` when None).
    """
    app = App(reactor=reactor, name="pipecomet-demo")
    for name in DEMO_ROUTE_MODULES:
        importlib.import_module(name).install_routes(app)
    config = config if config is not None else load_config(DEMO_CONFIG)
    from ._backends import with_demo_services

    app.configure(with_demo_services(config))
    return app
