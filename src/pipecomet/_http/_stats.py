"""
Live figures of the HTTP server, shown under ``lazy`` in ``/_pipecomet/status``.
"""

from __future__ import annotations

import attrs

__all__ = ["HTTPStats"]


@attrs.define
class HTTPStats:
    """
    Counters kept by :class:`~._protocol.HTTP11Protocol` and its requests.
    """

    bytes_received: int = 0
    body_bytes_read: int = 0
    requests_lazy: int = 0
    requests_buffered: int = 0
    answered_before_body_end: int = 0
    rejected_413: int = 0
    rejected_431: int = 0
    rejected_408: int = 0
    rejected_400: int = 0

    def refused(self, status: int) -> None:
        name = f"rejected_{status}"
        if hasattr(self, name):
            setattr(self, name, getattr(self, name) + 1)

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)
