"""
The HTTP side of lazy parsing lives in :mod:`pipecomet._http` now (its own
HTTP/1.1 protocol feeds a :class:`~._body.LazyBody` as the body arrives);
these are the names it had here.
"""

from __future__ import annotations

from .._http import HTTP11Protocol as LazyChannel
from .._http import HTTPStats as LazyStats
from .._http import Phase
from .._http import Request as LazyRequest
from .._http import Site as LazySite

__all__ = ["LazyChannel", "LazyRequest", "LazySite", "LazyStats", "Phase"]
