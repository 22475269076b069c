"""
``[limits]``: the request limits of the HTTP server and the lazy-parsing switch.
"""

from __future__ import annotations

import attrs

__all__ = ["LimitsConfig"]

_v = attrs.validators


def _positive_int(default: int) -> int:
    return attrs.field(default=default, converter=int, validator=_v.gt(0))


def _positive_float(default: float) -> float:
    return attrs.field(default=default, converter=float, validator=_v.gt(0))


@attrs.frozen
class LimitsConfig:
    """
    Limits every request of a pipecomet site is held to, and whether chain
    routes parse their bodies lazily.

    :ivar lazy: start a chain route's pipes as soon as the headers are in
        and parse the body while it arrives; ``false`` buffers the whole
        body first (plain twisted.web behaviour, the limits still apply).
    :ivar max_body_bytes: a larger ``Content-Length`` gets 413 before any
        body byte is read; a chunked body gets 413 as soon as it passes it.
    :ivar max_fields: most form fields (text and file) in one body (413).
    :ivar max_field_bytes: largest text field, name and value (413).
    :ivar max_part_header_bytes: largest header block of one multipart part (400).
    :ivar max_header_bytes: request line and headers together (431).
    :ivar max_headers: most header lines (431).
    :ivar header_timeout: seconds from a request's first byte to the end of
        its headers (408, then disconnect).
    :ivar body_timeout: seconds from the end of the headers to the end of
        the body (408, then disconnect).
    :ivar file_memory_bytes: a file field (and the raw body kept for
        ``body()``) stays in memory up to this size, then moves to a
        temporary file.
    :ivar linger: seconds a connection answered before its body ended stays
        half-closed (response sent, nothing read) before it is dropped, so
        the client gets the answer instead of a reset.
    :ivar max_pipelined: most requests parsed ahead of the one being
        answered (pipelining); past it the connection is not read until
        they drain (flow control, not a refusal).
    :ivar max_pipelined_bytes: most body bytes those requests may hold
        before the connection stops being read.
    """

    lazy: bool = attrs.field(default=True, validator=_v.instance_of(bool))
    max_body_bytes: int = _positive_int(16 * 2**20)
    max_fields: int = _positive_int(1000)
    max_field_bytes: int = _positive_int(2**20)
    max_part_header_bytes: int = _positive_int(8192)
    max_header_bytes: int = _positive_int(16384)
    max_headers: int = _positive_int(100)
    header_timeout: float = _positive_float(10.0)
    body_timeout: float = _positive_float(60.0)
    file_memory_bytes: int = _positive_int(256 * 2**10)
    linger: float = _positive_float(2.0)
    max_pipelined: int = _positive_int(32)
    max_pipelined_bytes: int = _positive_int(256 * 2**10)
