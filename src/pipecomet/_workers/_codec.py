"""
The message codec: pickle protocol 5 with out-of-band buffers.

A message is a small prefix, the function name (calls only), then parts:
part 0 is the pickle stream (or the raw bytes of a top-level ``bytes`` /
``bytearray`` / ``memoryview``, which are not pickled at all) and each
further part is one out-of-band buffer.  The encoder returns the parts as
they are, so the ring copies a payload's bytes straight from the caller's
object; the decoder copies each buffer out of the ring exactly once.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, Sequence, TypeAlias

__all__ = ["encode", "decode", "PicklingFailed", "ENC_PICKLE", "ENC_BYTES", "ENC_BYTEARRAY"]

ENC_PICKLE = 0
ENC_BYTES = 1
ENC_BYTEARRAY = 2

#: encoding, reserved, name length, number of parts
_PREFIX = struct.Struct("<BBHI")
_ONE = struct.Struct("<BBHIQ")
#: bit 63 of a part length: the buffer was writable, rebuild it as bytearray
_WRITABLE = 1 << 63


class PicklingFailed(Exception):
    """
    The value cannot be pickled; ``args[0]`` says why.
    """


#: A piece of a message as it is written to a ring: a view, not a copy, of a
#: big buffer.
Chunk: TypeAlias = "bytes | bytearray | memoryview"


# Any: a payload is whatever the caller hands in (pickled when it is not
# bytes), dispatched on its exact type.
def encode(value: Any, name: bytes = b"") -> tuple[list[Chunk], int]:
    """
    ``(chunks, length)`` of the message carrying ``value``.

    :raises PicklingFailed: the value cannot be pickled.
    """
    t = type(value)
    if t is bytes or t is bytearray:
        n = len(value)
        head = _ONE.pack(ENC_BYTES if t is bytes else ENC_BYTEARRAY, 0, len(name), 1, n)
        return [head + name, value], len(head) + len(name) + n
    if t is memoryview:
        mv = value if (value.format == "B" and value.c_contiguous) else None
        if mv is None:
            try:
                mv = value.cast("B")
            except TypeError:
                mv = memoryview(value.tobytes())
        n = mv.nbytes
        head = _ONE.pack(ENC_BYTES, 0, len(name), 1, n)
        return [head + name, mv], len(head) + len(name) + n
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception as e:
        raise PicklingFailed(f"{type(e).__name__}: {e}") from e
    if not buffers:
        n = len(data)
        head = _ONE.pack(ENC_PICKLE, 0, len(name), 1, n)
        return [head + name, data], len(head) + len(name) + n
    raws: list[memoryview] = []
    lengths = [len(data)]
    try:
        for b in buffers:
            raw = b.raw()
            raws.append(raw)
            lengths.append(raw.nbytes | (0 if raw.readonly else _WRITABLE))
    except BufferError:
        # A non-contiguous buffer: let pickle copy it in-band instead.
        data = pickle.dumps(value, protocol=5)
        n = len(data)
        head = _ONE.pack(ENC_PICKLE, 0, len(name), 1, n)
        return [head + name, data], len(head) + len(name) + n
    head = _PREFIX.pack(ENC_PICKLE, 0, len(name), len(lengths)) + struct.pack(
        f"<{len(lengths)}Q", *lengths)
    total = len(head) + len(name) + len(data) + sum(r.nbytes for r in raws)
    return [head + name, data, *raws], total


def _take(segments: Sequence[memoryview], start: int, n: int) -> bytes | memoryview:
    """
    ``n`` bytes at ``start`` of the segments: a view when they lie in one
    segment, else one joined copy.
    """
    first = len(segments[0])
    if start + n <= first:
        return segments[0][start:start + n]
    if start >= first:
        s = start - first
        return segments[1][s:s + n]
    return b"".join((segments[0][start:], segments[1][:n - (first - start)]))


# Any: the value is whatever the other side sent (a worker function's result
# goes to the pipe after it as it is).
def decode(segments: Sequence[memoryview]) -> tuple[str, Any]:
    """
    ``(name, value)`` from a message's segments (one or two memoryviews).
    Every byte the value keeps is copied out, so the segments may be
    released as soon as this returns.
    """
    if len(segments) == 1:
        seg = segments[0]
        enc, _, name_len, nparts = _PREFIX.unpack_from(seg, 0)
        if nparts == 1:
            n0 = _ONE.unpack_from(seg, 0)[4] & ~_WRITABLE
            pos = _ONE.size + name_len
            name = str(seg[_ONE.size:pos], "utf-8") if name_len else ""
            part0: bytes | memoryview = seg[pos:pos + n0]
            if enc == ENC_PICKLE:
                return name, pickle.loads(part0)
            if enc == ENC_BYTES:
                return name, bytes(part0)
            return name, bytearray(part0)
    prefix = _take(segments, 0, _PREFIX.size)
    enc, _, name_len, nparts = _PREFIX.unpack(prefix)
    pos = _PREFIX.size
    lengths = struct.unpack(f"<{nparts}Q", _take(segments, pos, 8 * nparts))
    pos += 8 * nparts
    name = ""
    if name_len:
        name = bytes(_take(segments, pos, name_len)).decode("utf-8")
        pos += name_len
    n0 = lengths[0] & ~_WRITABLE
    part0 = _take(segments, pos, n0)
    pos += n0
    if enc == ENC_BYTES:
        return name, part0 if type(part0) is bytes else bytes(part0)
    if enc == ENC_BYTEARRAY:
        return name, bytearray(part0)
    if nparts == 1:
        return name, pickle.loads(part0)
    buffers = []
    for raw_len in lengths[1:]:
        n = raw_len & ~_WRITABLE
        view = _take(segments, pos, n)
        pos += n
        buffers.append(bytearray(view) if raw_len & _WRITABLE else
                       (view if type(view) is bytes else bytes(view)))
    return name, pickle.loads(part0, buffers=buffers)
