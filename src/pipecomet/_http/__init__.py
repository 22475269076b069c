"""
pipecomet's own HTTP/1.1 server (see ``docs/http.md``): a protocol on the
llhttp parser over any stream transport, its request object (a
``twisted.web`` request for Klein and resources, run directly for chain
routes) and its site.
"""

from ._protocol import HTTP11Protocol, Phase
from ._request import Request
from ._site import Site
from ._stats import HTTPStats

__all__ = ["HTTP11Protocol", "HTTPStats", "Phase", "Request", "Site"]
