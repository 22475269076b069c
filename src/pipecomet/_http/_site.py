"""
The factory of pipecomet's HTTP/1.1 protocol.

:class:`Site` is a ``twisted.web.server.Site`` (resource traversal for
plain resources, sessions, the access log, ``timeOut``) whose
connections are :class:`~._protocol.HTTP11Protocol` instead of
twisted.web's ``HTTPChannel``.  It carries the ``[limits]``, the live
figures, and the chain-route lookup the protocol uses once a request's
headers are in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from twisted.web import http, server
from twisted.web.resource import IResource

from .._errors import PipecometError
from .._lazy._config import LimitsConfig
from .._routing import Matched
from ._protocol import HTTP11Protocol
from ._request import Request
from ._stats import HTTPStats

if TYPE_CHECKING:
    from .._app import Route

__all__ = ["Site"]


class Site(server.Site):
    """
    A site served by :class:`~._protocol.HTTP11Protocol`.

    :param resource: the root resource (a ``PipecometResource`` to have
        chain routes found and run without resource traversal).
    :param limits: the ``[limits]`` table (defaults when None).
    :param stats: where the figures go.
    """

    # Made by the protocol with its message, not by an HTTPChannel: the
    # constructor differs from twisted.web's by design (as H2Stream's).
    requestFactory = Request  # type: ignore[assignment]

    def __init__(self, resource: IResource, *, limits: LimitsConfig | None = None,
                 stats: HTTPStats | None = None, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.limits = limits if limits is not None else LimitsConfig()
        self.stats = stats if stats is not None else HTTPStats()
        self.app = getattr(resource, "app", None)
        self._date_second = -1
        self._date = b""

    # Not an HTTPChannel (the point of this protocol), so the return type
    # is not the one twisted.web's HTTPFactory declares.
    def buildProtocol(self, addr: Any) -> HTTP11Protocol:  # type: ignore[override]
        return HTTP11Protocol(self)

    def acceptableProtocols(self) -> list[bytes]:
        # HTTP/1.1 only, whatever twisted.web could offer over ALPN.
        return [b"http/1.1"]

    def date(self) -> bytes:
        """
        The ``Date`` header value, formatted once a second.
        """
        now = int(self.reactor.seconds())
        if now != self._date_second:
            self._date_second = now
            self._date = http.datetimeToString(now)
        return self._date

    def find_route(self, request: Request) -> tuple[Route, Mapping[str, Any]] | None:
        """
        The chain route and path parameters for ``request``, or None when
        it is not a chain route of this site's app.
        """
        app = self.app
        if app is None:
            return None
        found = app.router.match(request.method, request.path)
        return (found.route, found.params) if isinstance(found, Matched) else None

    def stats_refused(self, error: PipecometError) -> None:
        self.stats.refused(error.status)
