"""
The demo gateway: an open-API platform in miniature.

``make_app`` is what ``pipecomet serve`` (and ``twistd -n pipecomet``)
serves when no ``--app`` is given: it is the ``default`` entry point of
the ``pipecomet.apps`` group (``pyproject.toml``).  The demo is built on
the public API only (``pipecomet``, ``pipecomet.config``,
``pipecomet.errors``, ``pipecomet.backend``) and registers its ``[demo]``
table itself (:func:`pipecomet.config.register_section`).  Each part of pipecomet adds its own
routes from a module listed in :data:`DEMO_ROUTE_MODULES`; the demo's
defaults are the tables of ``demo.toml`` beside this file (package data),
and a config file overrides only the keys it names.
"""

from __future__ import annotations

import importlib
from pathlib import Path
import tomllib

from pipecomet import App, Config
from pipecomet.config import register_section
from pipecomet.interfaces import IPipecometReactor

from ._config import DemoConfig

__all__ = ["make_app", "demo_defaults", "DEMO_CONFIG", "DEMO_ROUTE_MODULES", "PUBLISH_TOKEN"]

# The demo's own table; the core knows nothing of it.
register_section("demo", DemoConfig)

#: The demo's default tables (what it runs with when no ``--config`` is given).
DEMO_CONFIG = Path(__file__).with_name("demo.toml")

#: Documented in the README; a real deployment sets its own in ``[comet]``.
PUBLISH_TOKEN = "demo-publish-token"

#: Modules with ``install_routes(app)``, one per part of pipecomet.
DEMO_ROUTE_MODULES = [
    "pipecomet.demo._landing",
    "pipecomet.demo._gateway",
    "pipecomet.demo._comet",
    "pipecomet.demo._upload",
    "pipecomet.demo._slow",
    "pipecomet.demo._workers",
    "pipecomet.demo._backends",
]


def demo_defaults() -> dict[str, object]:
    """
    The demo's default tables, read from ``demo.toml``.
    """
    with open(DEMO_CONFIG, "rb") as f:
        return tomllib.load(f)


def make_app(config: Config | None = None, reactor: IPipecometReactor | None = None) -> App:
    """
    Build the demo gateway: ``config`` laid over the demo's defaults
    (:func:`demo_defaults`), so it names only what it changes.
    """
    app = App(reactor=reactor, name="pipecomet-demo")
    for name in DEMO_ROUTE_MODULES:
        importlib.import_module(name).install_routes(app)
    config = (config if config is not None else Config()).with_defaults(demo_defaults())
    from ._backends import with_demo_services

    app.configure(with_demo_services(config))
    return app
