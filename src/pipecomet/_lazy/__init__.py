"""
Lazy request parsing (what the seed calls its LazyParser): a chain route's pipes run
while the request body is still arriving, and an invalid request is
answered before the rest of its body is read.

``install(app, config)`` is the ``[limits]`` table's installer: it puts a
:class:`LazySiteFactory` on ``app.runtime.lazy``; ``App.site()`` then serves
through a :class:`LazySite`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web.resource import IResource

from ._body import BodyState, LazyBody, UploadedFile
from ._config import LimitsConfig
from ._http import LazyChannel, LazyRequest, LazySite, LazyStats, Phase
from ._parsers import FormParser, JSONParser, MultipartParser, parse_content_type

if TYPE_CHECKING:
    from .._app import App
    from .._json import JSON

__all__ = [
    "BodyState",
    "FormParser",
    "JSONParser",
    "LazyBody",
    "LazyChannel",
    "LazyRequest",
    "LazySite",
    "LazySiteFactory",
    "LazyStats",
    "LimitsConfig",
    "MultipartParser",
    "Phase",
    "UploadedFile",
    "install",
    "parse_content_type",
]


class LazySiteFactory:
    """
    The ``[limits]`` part on ``app.runtime.lazy``: makes the sites
    ``App.site()`` serves with the limits, and keeps their figures.  (The
    parsers are in :mod:`._parsers`; this parses nothing.)
    """

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self.stats = LazyStats()

    # Any: twisted.web Site's own keyword arguments, passed through.
    def make_site(self, resource: IResource, **kwargs: Any) -> LazySite:
        """
        A :class:`LazySite` for ``resource`` (``Site`` keyword arguments pass through).
        """
        return LazySite(resource, limits=self.config, stats=self.stats, **kwargs)

    def status(self) -> dict[str, JSON]:
        return {"lazy": self.config.lazy, **self.stats.as_dict()}


def install(app: App, config: LimitsConfig) -> None:
    """
    ``[limits]`` installer: serve the app's sites through :class:`LazySite`.
    """
    part = LazySiteFactory(config)
    app.runtime.lazy = part
    app.runtime.status_sources["lazy"] = part.status
