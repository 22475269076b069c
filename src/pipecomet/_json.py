"""
Compact JSON as UTF-8 bytes, the one encoding every response and comet
frame uses, and :data:`JSON`, the type of a decoded JSON value.
"""

from __future__ import annotations

import json
from typing import TypeAlias

__all__ = ["JSON", "dumps"]

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


#: A JSON value as ``json.loads`` gives it back (and as pipecomet's own
#: status and error bodies are built).
JSON: TypeAlias = "dict[str, JSON] | list[JSON] | str | int | float | bool | None"


def dumps(value: object) -> bytes:
    """
    Compact JSON as UTF-8 bytes; objects JSON does not know become strings.
    """
    return _encoder.encode(value).encode("utf-8")
