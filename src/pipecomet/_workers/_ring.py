"""
The shared-memory file of one worker and its two single-producer
single-consumer rings, byte for byte as ``docs/worker-protocol.md`` says.

Nothing here touches the reactor or blocks: the pool (server side) and the
worker main loop (worker side) decide when to park and whom to wake.  The
same classes drive both sides, so the ring tests exercise the real code.
"""

from __future__ import annotations

import mmap
import struct
import sys
import threading
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from ._codec import Chunk

__all__ = [
    "MAGIC",
    "VERSION",
    "FILE_HEADER_SIZE",
    "CONTROL_SIZE",
    "FRAME_HEADER",
    "FRAME_HEADER_SIZE",
    "KIND_HELLO",
    "KIND_CALL",
    "KIND_RESULT",
    "KIND_ERROR",
    "KIND_FAILURE",
    "KIND_STOP",
    "FLAG_MORE",
    "Layout",
    "RingProducer",
    "RingConsumer",
    "OutgoingMessage",
    "fence",
    "file_size",
    "align8",
]

MAGIC = b"PCOMETW1"
VERSION = 1
FILE_HEADER_SIZE = 256
#: control block of one ring: tail, head, consumer_parked, producer_waiting,
#: each on its own 64-byte cache line.
CONTROL_SIZE = 256

# -- file header fields (little-endian)
_FILE_HEADER = struct.Struct("<8sIIQII")  # magic, version, header size, capacity, epoch, slot
OFF_SERVER_PID = 32   # u64, written by the server
OFF_WORKER_PID = 40   # u32, written by the worker
OFF_CURRENT_CALL = 48  # u64, call id the worker is running (0: none)
OFF_RSS = 56          # u64, worker RSS in bytes (updated now and then)
OFF_BASELINE_RSS = 64  # u64, worker RSS after start-up
OFF_CALLS_DONE = 72   # u64, calls the worker finished

# Header fields the other side reads only when this side is gone or idle.
if sys.byteorder != "little":
    raise ImportError("pipecomet worker rings need a little-endian host")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

# -- frame header: payload length, kind, flags, reserved, call id, epoch,
# reserved, whole message length.
FRAME_HEADER = struct.Struct("<IBBHQIIQ")
FRAME_HEADER_SIZE = FRAME_HEADER.size  # 32

KIND_HELLO = 1    # worker → server: handshake
KIND_CALL = 2     # server → worker: run a function
KIND_RESULT = 3   # worker → server: the function's value
KIND_ERROR = 4    # worker → server: the function raised
KIND_FAILURE = 5  # worker → server: the call could not run (unknown function, unpicklable...)
KIND_STOP = 6     # server → worker: exit after this

FLAG_MORE = 1     # more parts of this message follow

#: the smallest part worth writing when a message is split
MIN_PART = 4096

_lock = threading.Lock()
_acquire = _lock.acquire
_release = _lock.release


def fence() -> None:
    """
    A full memory barrier between a store and the following load.

    An uncontended lock's acquire and release are atomic read-modify-write
    instructions (``lock cmpxchg`` on x86-64), which order all earlier
    stores before all later loads; that is what the park/wake handshake
    needs and costs ~100 ns, far less than a system call.
    """
    _acquire()
    _release()


def align8(n: int) -> int:
    return (n + 7) & ~7


def file_size(capacity: int) -> int:
    return FILE_HEADER_SIZE + 2 * (CONTROL_SIZE + capacity)


class Layout:
    """
    Offsets of one worker's file: the header, then the request ring's
    control block and data, then the response ring's.

    :param capacity: bytes of data per ring; a multiple of 64.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 4096 or capacity % 64:
            raise ValueError(f"ring capacity must be a multiple of 64 and >= 4096, not {capacity}")
        self.capacity = capacity
        self.request_control = FILE_HEADER_SIZE
        self.request_data = self.request_control + CONTROL_SIZE
        self.response_control = self.request_data + capacity
        self.response_data = self.response_control + CONTROL_SIZE
        self.size = self.response_data + capacity

    def write_header(self, buf: memoryview | mmap.mmap, epoch: int, slot: int, server_pid: int) -> None:
        _FILE_HEADER.pack_into(buf, 0, MAGIC, VERSION, FILE_HEADER_SIZE, self.capacity, epoch, slot)
        U64.pack_into(buf, OFF_SERVER_PID, server_pid)

    @classmethod
    def read_header(cls, buf: memoryview | mmap.mmap) -> tuple[Layout, int, int, int]:
        """
        ``(layout, epoch, slot, server_pid)``; ValueError when the file is
        not one of ours.
        """
        magic, version, header_size, capacity, epoch, slot = _FILE_HEADER.unpack_from(buf, 0)
        if magic != MAGIC or version != VERSION or header_size != FILE_HEADER_SIZE:
            raise ValueError(f"not a pipecomet worker file (magic {magic!r}, version {version})")
        return cls(capacity), epoch, slot, U64.unpack_from(buf, OFF_SERVER_PID)[0]

    def request_ring(self, buf: memoryview) -> tuple[memoryview, int, int, int]:
        return buf, self.request_control, self.request_data, self.capacity

    def response_ring(self, buf: memoryview) -> tuple[memoryview, int, int, int]:
        return buf, self.response_control, self.response_data, self.capacity


class _RingSide:
    # The control words are read while the other process writes them, so
    # each is accessed through a one-item memoryview cast to its native type
    # (an item store or load is one aligned 8- or 4-byte move, which is
    # atomic on x86-64 and aarch64).  ``struct.pack_into`` would not do:
    # it zero-fills the field before writing it, and a reader in between
    # sees 0.
    __slots__ = ("buf", "cap", "base", "_tail", "_head", "_parked", "_waiting")

    def __init__(self, buf: memoryview, control: int, data: int, capacity: int) -> None:
        self.buf = buf
        self.cap = capacity
        self.base = data
        self._tail = buf[control:control + 8].cast("Q")
        self._head = buf[control + 64:control + 72].cast("Q")
        self._parked = buf[control + 128:control + 132].cast("I")
        self._waiting = buf[control + 192:control + 196].cast("I")

    # The two flags: the consumer says it sleeps (``consumer_parked``), the
    # producer says it waits for room (``producer_waiting``).  Whoever sees a
    # flag set after publishing clears it and rings the doorbell once.

    def set_consumer_parked(self, value: bool) -> None:
        self._parked[0] = 1 if value else 0

    def set_producer_waiting(self, value: bool) -> None:
        self._waiting[0] = 1 if value else 0

    def take_consumer_parked(self) -> bool:
        """
        After a fence: True (and clear the flag) when the consumer is
        parked and must be woken.
        """
        if self._parked[0]:
            self._parked[0] = 0
            return True
        return False

    def take_producer_waiting(self) -> bool:
        if self._waiting[0]:
            self._waiting[0] = 0
            return True
        return False

    def close(self) -> None:
        """
        Let go of the control views (so the mapping can be closed).
        """
        for v in (self._tail, self._head, self._parked, self._waiting):
            v.release()

    def reset(self) -> None:
        self._tail[0] = self._head[0] = 0
        self._parked[0] = self._waiting[0] = 0


class OutgoingMessage:
    """
    A message being written, perhaps in several parts: its frame fields and
    the chunks of its payload (bytes-like objects, copied straight into the
    ring, never joined first).
    """

    __slots__ = ("kind", "call_id", "epoch", "chunks", "length", "sent", "started", "_ci", "_co")

    def __init__(self, kind: int, call_id: int, epoch: int, chunks: Sequence[Chunk], length: int) -> None:
        self.kind = kind
        self.call_id = call_id
        self.epoch = epoch
        self.chunks = chunks
        self.length = length
        self.sent = 0
        self.started = False
        self._ci = 0   # chunk index
        self._co = 0   # offset in that chunk

    @property
    def done(self) -> bool:
        return self.started and self.sent >= self.length


class RingProducer(_RingSide):
    """
    The writing side of a ring.  It alone writes ``tail``; it reads
    ``head`` to know how much room there is.
    """

    __slots__ = ("tail",)

    def __init__(self, buf: memoryview, control: int, data: int, capacity: int) -> None:
        super().__init__(buf, control, data, capacity)
        self.tail = self._tail[0]

    def free(self) -> int:
        return self.cap - (self.tail - self._head[0])

    def _put(self, pos: int, data: Chunk) -> None:
        n = len(data)
        cap = self.cap
        off = pos % cap
        start = self.base + off
        first = cap - off
        buf = self.buf
        if n <= first:
            buf[start:start + n] = data
        else:
            if not isinstance(data, memoryview):
                data = memoryview(data)
            buf[start:start + first] = data[:first]
            buf[self.base:self.base + n - first] = data[first:]

    def write_small(self, kind: int, call_id: int, epoch: int, chunks: Sequence[Chunk],
                    length: int) -> bool:
        """
        Write a whole message as one frame if it fits without wrapping;
        False (nothing written) otherwise.  The hot path: no message object.
        """
        cap = self.cap
        pos = self.tail
        off = pos % cap
        record = (length + FRAME_HEADER_SIZE + 7) & ~7
        if record > cap - (pos - self._head[0]) or off + FRAME_HEADER_SIZE + length > cap:
            return False
        buf = self.buf
        start = self.base + off
        FRAME_HEADER.pack_into(buf, start, length, kind, 0, 0, call_id, epoch, 0, length)
        start += FRAME_HEADER_SIZE
        for chunk in chunks:
            n = len(chunk)
            buf[start:start + n] = chunk
            start += n
        self.tail = pos + record
        self._tail[0] = self.tail
        return True

    def try_write(self, msg: OutgoingMessage) -> bool:
        """
        Write as much of ``msg`` as fits, publishing ``tail`` after each
        frame.  True when the whole message is in the ring.
        """
        buf = self.buf
        cap = self.cap
        if not msg.started:
            # The common case: the whole message fits in one frame that does
            # not wrap.
            length = msg.length
            pos = self.tail
            off = pos % cap
            record = (length + FRAME_HEADER_SIZE + 7) & ~7
            if record <= cap - (pos - self._head[0]) and off + FRAME_HEADER_SIZE + length <= cap:
                start = self.base + off
                FRAME_HEADER.pack_into(buf, start, length, msg.kind, 0, 0, msg.call_id,
                                       msg.epoch, 0, length)
                start += FRAME_HEADER_SIZE
                for chunk in msg.chunks:
                    n = len(chunk)
                    buf[start:start + n] = chunk
                    start += n
                msg.sent = length
                msg.started = True
                self.tail = pos + record
                self._tail[0] = self.tail
                return True
        least = min(MIN_PART, cap // 4)
        while True:
            remaining = msg.length - msg.sent
            if remaining == 0 and msg.started:
                return True
            free = cap - (self.tail - self._head[0])
            room = free - FRAME_HEADER_SIZE
            if room < 0:
                return False
            room &= ~7
            if remaining <= room:
                part = remaining
            elif room >= least:
                part = room
            else:
                return False
            flags = FLAG_MORE if part < remaining else 0
            pos = self.tail
            if pos % cap + FRAME_HEADER_SIZE <= cap:
                FRAME_HEADER.pack_into(buf, self.base + pos % cap, part, msg.kind, flags, 0,
                                       msg.call_id, msg.epoch, 0, msg.length)
            else:
                self._put(pos, FRAME_HEADER.pack(part, msg.kind, flags, 0, msg.call_id,
                                                 msg.epoch, 0, msg.length))
            pos += FRAME_HEADER_SIZE
            left = part
            chunks = msg.chunks
            while left:
                chunk = chunks[msg._ci]
                clen = len(chunk)
                take = clen - msg._co
                if take > left:
                    take = left
                if msg._co == 0 and take == clen:
                    self._put(pos, chunk)
                else:
                    self._put(pos, memoryview(chunk)[msg._co:msg._co + take])
                pos += take
                left -= take
                msg._co += take
                if msg._co == clen:
                    msg._ci += 1
                    msg._co = 0
            msg.sent += part
            msg.started = True
            self.tail += FRAME_HEADER_SIZE + align8(part)
            # The frame's bytes are in place before the new tail is seen.
            self._tail[0] = self.tail


class RingConsumer(_RingSide):
    """
    The reading side of a ring.  It alone writes ``head``.

    :meth:`next_message` returns complete messages; a message split in
    parts is gathered into one buffer as the parts arrive.
    """

    __slots__ = ("head", "_pending", "_partial", "_partial_fill", "_partial_key")

    def __init__(self, buf: memoryview, control: int, data: int, capacity: int) -> None:
        super().__init__(buf, control, data, capacity)
        self.head = self._head[0]
        self._pending = 0          # record size to release
        self._partial: bytearray | None = None
        self._partial_fill = 0
        self._partial_key: tuple[int, int, int] = (0, 0, 0)

    def has_data(self) -> bool:
        return self._tail[0] != self.head

    def _view(self, pos: int, n: int) -> list[memoryview]:
        cap = self.cap
        off = pos % cap
        start = self.base + off
        first = cap - off
        buf = self.buf
        if n <= first:
            return [buf[start:start + n]]
        return [buf[start:start + first], buf[self.base:self.base + n - first]]

    def release(self) -> None:
        """
        Give back the room of the message last returned by
        :meth:`next_message` (its views must not be used after this).
        """
        if self._pending:
            self.head += self._pending
            self._pending = 0
            self._head[0] = self.head

    def next_message(self) -> tuple[int, int, int, list[memoryview]] | None:
        """
        ``(kind, call_id, epoch, segments)`` of the next complete message,
        or None when the ring holds no complete one.  ``segments`` are one
        or two memoryviews on the ring (or one on a gathered buffer); call
        :meth:`release` once they are decoded.
        """
        self.release()
        buf = self.buf
        cap = self.cap
        while True:
            tail = self._tail[0]
            if tail == self.head:
                return None
            pos = self.head
            if pos % cap + FRAME_HEADER_SIZE <= cap:
                fields = FRAME_HEADER.unpack_from(buf, self.base + pos % cap)
            else:
                fields = FRAME_HEADER.unpack(b"".join(self._view(pos, FRAME_HEADER_SIZE)))
            length, kind, flags, _, call_id, epoch, _, total = fields
            record = FRAME_HEADER_SIZE + align8(length)
            if tail - pos < record:
                raise ValueError(f"ring corrupt: frame of {record} bytes but {tail - pos} published")
            if self._partial is None and not flags & FLAG_MORE and length == total:
                self._pending = record
                return kind, call_id, epoch, self._view(pos + FRAME_HEADER_SIZE, length)
            # A part of a longer message: gather it.
            if self._partial is None:
                self._partial = bytearray(total)
                self._partial_fill = 0
                self._partial_key = (kind, call_id, epoch)
            elif self._partial_key != (kind, call_id, epoch) or len(self._partial) != total:
                raise ValueError("ring corrupt: parts of two messages interleaved")
            fill = self._partial_fill
            for seg in self._view(pos + FRAME_HEADER_SIZE, length):
                n = len(seg)
                self._partial[fill:fill + n] = seg
                fill += n
            self._partial_fill = fill
            self.head += record
            self._head[0] = self.head
            if not flags & FLAG_MORE:
                if fill != total:
                    raise ValueError(f"ring corrupt: message of {total} bytes ended at {fill}")
                gathered = self._partial
                self._partial = None
                return kind, call_id, epoch, [memoryview(gathered)]

    @property
    def gathering(self) -> bool:
        """
        True while a message split in parts is half received.
        """
        return self._partial is not None
