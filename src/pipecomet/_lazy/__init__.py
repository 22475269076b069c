"""
Lazy request parsing (the seed's LazyParser): a chain route's pipes run
while the request body is still arriving, and an invalid request is
answered before the rest of its body is read.

``install(app, config)`` is the ``[limits]`` table's installer: it puts a
:class:`LazyParser` on ``app.runtime.lazy``; ``App.site()`` then serves
through a :class:`LazySite`.
"""

from __future__ import annotations

from typing import Any

from ._body import BodyState, LazyBody, UploadedFile
from ._config import LimitsConfig
from ._http import LazyChannel, LazyRequest, LazySite, LazyStats, Phase
from ._parsers import FormParser, JSONParser, MultipartParser, parse_content_type

__all__ = [
    "BodyState",
    "FormParser",
    "JSONParser",
    "LazyBody",
    "LazyChannel",
    "LazyParser",
    "LazyRequest",
    "LazySite",
    "LazyStats",
    "LimitsConfig",
    "MultipartParser",
    "Phase",
    "UploadedFile",
    "install",
    "parse_content_type",
]


class LazyParser:
    """
    The part on ``app.runtime.lazy``: the limits, the figures, and the site
    factory ``App.site()`` uses.
    """

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self.stats = LazyStats()

    def make_site(self, resource: Any, **kwargs: Any) -> LazySite:
        """
        A :class:`LazySite` for ``resource`` (``Site`` keyword arguments pass through).
        """
        return LazySite(resource, limits=self.config, stats=self.stats, **kwargs)

    def status(self) -> dict[str, Any]:
        return {"lazy": self.config.lazy, **self.stats.as_dict()}


def install(app: Any, config: LimitsConfig) -> None:
    """
    ``[limits]`` installer: serve the app's sites through :class:`LazySite`.
    """
    part = LazyParser(config)
    app.runtime.lazy = part
    app.runtime.status_sources["lazy"] = part.status
