"""
The demo's JSON bodies: compact UTF-8, objects JSON does not know as text
(what pipecomet's responders send for a pipe's result).
"""

from __future__ import annotations

import json
__all__ = ["dumps"]

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def dumps(value: object) -> bytes:
    """
    ``value`` as compact JSON, UTF-8 encoded.
    """
    return _encoder.encode(value).encode("utf-8")
