"""
The query string, parsed one way for every reader: a chain's
``PipeInput.query``, a buffered form body's bookkeeping, and
``request.args`` of pipecomet's own HTTP request.

The rules are ``urllib.parse.parse_qs(qs, keep_blank_values=True)``'s,
applied to bytes: the stdlib on bytes insists on ASCII (``%C3%A9`` or a
raw UTF-8 byte raised).  This runs on every request, so the common case of
a plain ``name=value`` skips unquoting.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

__all__ = ["parse_query", "parse_query_text"]


def _unquote(part: bytes) -> bytes:
    if b"%" in part or b"+" in part:
        return unquote_to_bytes(part.replace(b"+", b" "))
    return part


def parse_query(uri: bytes) -> dict[bytes, list[bytes]]:
    """
    The query of ``uri`` as ``{name: [values]}``, both unquoted bytes (the
    shape of twisted.web's ``request.args``).
    """
    _, _, qs = uri.partition(b"?")
    out: dict[bytes, list[bytes]] = {}
    if not qs:
        return out
    for item in qs.split(b"&"):
        if not item:
            continue
        k, _, v = item.partition(b"=")
        key, value = _unquote(k), _unquote(v)
        values = out.get(key)
        if values is None:
            out[key] = [value]
        else:
            values.append(value)
    return out


def parse_query_text(uri: bytes) -> dict[str, list[str]]:
    """
    The query of ``uri`` as ``{name: [values]}`` in text (UTF-8, bad bytes
    replaced).
    """
    _, _, qs = uri.partition(b"?")
    if not qs:
        return {}
    out: dict[str, list[str]] = {}
    if b"%" not in qs and b"+" not in qs:
        # Nothing to unquote: decode once and split text.  "&" and "=" are
        # ASCII, so this equals decoding every part on its own.
        for item in qs.decode("utf-8", "replace").split("&"):
            if item:
                key, _, value = item.partition("=")
                values = out.get(key)
                if values is None:
                    out[key] = [value]
                else:
                    values.append(value)
        return out
    for k, vs in parse_query(b"?" + qs).items():
        out.setdefault(k.decode("utf-8", "replace"), []).extend(
            v.decode("utf-8", "replace") for v in vs)
    return out
