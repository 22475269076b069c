"""
Compact JSON as UTF-8 bytes, the one encoding every response and comet
frame uses.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["dumps"]

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def dumps(value: Any) -> bytes:
    """
    Compact JSON as UTF-8 bytes; objects JSON does not know become strings.
    """
    return _encoder.encode(value).encode("utf-8")
