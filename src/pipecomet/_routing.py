"""
The router: one table of an app's chain routes, and the one lookup every
server path uses.

:class:`Router` holds the routes in a werkzeug :class:`~werkzeug.routing.Map`
(bound once, not per request) with an exact-path index in front of it for
the paths without a ``<converter>``.  :meth:`Router.match` answers a method
and a path with a :class:`Matched` route, a :class:`WrongMethod` (405, with
the methods for ``Allow``) or None (no route).  ``PipecometResource.render``
(twisted.web's channel) and pipecomet's own HTTP/1.1 protocol
(``Site.find_route``) both call it.  Tools read the table through the
read-only views :attr:`Router.routes` and :attr:`Router.url_map`, as
Klein's ``url_map``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

import attrs
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as WzMethodNotAllowed
from werkzeug.routing import Map, MapAdapter, Rule

if TYPE_CHECKING:
    from ._app import Route

__all__ = ["Router", "Matched", "WrongMethod"]

_NO_PARAMS: Mapping[str, object] = MappingProxyType({})


@attrs.frozen
class Matched:
    """
    A request's route and the parameters taken from its path.
    """

    route: Route
    params: Mapping[str, object] = _NO_PARAMS


@attrs.frozen
class WrongMethod:
    """
    The path has routes, none for this method: answer 405 with ``Allow``.
    """

    allow: tuple[str, ...]

    @property
    def allow_header(self) -> str:
        return ", ".join(self.allow)


class Router:
    """
    The chain routes of one app.
    """

    def __init__(self) -> None:
        self._routes: list[Route] = []
        self._map = Map(strict_slashes=False)
        self._endpoints: dict[str, Route] = {}
        # path → method → Matched, for paths without converters: most
        # requests are answered by one dict lookup and no werkzeug call.
        self._exact: dict[bytes, dict[bytes, Matched]] = {}
        self._adapter: MapAdapter | None = None

    # -- building

    def add(self, route: Route) -> None:
        """
        Add ``route`` (its ``path`` in werkzeug syntax, its ``methods``).
        """
        self._routes.append(route)
        endpoint = f"pipecomet:{len(self._routes)}:{route.path}"
        self._endpoints[endpoint] = route
        self._map.add(Rule(route.path, endpoint=endpoint, methods=list(route.methods)))
        self._adapter = None
        if "<" not in route.path:
            table = self._exact.setdefault(route.path.encode("utf-8"), {})
            found = Matched(route)
            for m in route.methods:
                table.setdefault(m.encode("ascii"), found)
            if "GET" in route.methods:
                table.setdefault(b"HEAD", found)

    # -- looking up

    def match(self, method: bytes, path: bytes) -> Matched | WrongMethod | None:
        """
        The route for ``method`` and ``path`` (the request's path, no query).

        :return: :class:`Matched`, :class:`WrongMethod` when the path has
            routes for other methods only, None when it has none.
        """
        by_method = self._exact.get(path)
        if by_method is not None:
            found = by_method.get(method)
            if found is not None:
                return found
        adapter = self._adapter
        if adapter is None:
            adapter = self._adapter = self._map.bind("localhost", "/")
        try:
            endpoint, params = adapter.match(path.decode("utf-8", "replace"),
                                             method.decode("ascii", "replace"))
        except WzMethodNotAllowed as e:
            return WrongMethod(tuple(sorted(e.valid_methods or ())))
        except HTTPException:
            # NotFound, and RequestRedirect for a slash fix: both a miss.
            return None
        return Matched(self._endpoints[endpoint], params)

    # -- read-only views

    @property
    def routes(self) -> tuple[Route, ...]:
        """
        Every route, in the order they were added.
        """
        return tuple(self._routes)

    @property
    def url_map(self) -> Map:
        """
        The werkzeug map of the routes (endpoint ``pipecomet:N:path``), for
        tools that list or build URLs; do not add rules to it.
        """
        return self._map

    def __len__(self) -> int:
        return len(self._routes)
