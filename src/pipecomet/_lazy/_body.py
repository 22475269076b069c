"""
The body of a lazily parsed request, as pipes see it: each parameter is a
Deferred that fires as soon as that field is complete.

:class:`LazyBody` is what :class:`~pipecomet._chain.PipeInput` delegates
to when the request is a :class:`~pipecomet._lazy.LazyRequest` serving a
chain route.  Its lifecycle is the :class:`BodyState` machine below.
"""

from __future__ import annotations

import enum
import hashlib
import tempfile
from typing import IO, TYPE_CHECKING, Any, Callable, Mapping, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from .._errors import BadRequest, PipecometError
from .._interfaces import IBodySource
from ._config import LimitsConfig
from ._parsers import Parser, RawParser, make_parser

if TYPE_CHECKING:
    from .._json import JSON

_T = TypeVar("_T")

__all__ = ["BodyState", "LazyBody", "UploadedFile"]


class BodyState(enum.Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    FAILED = "failed"


_TRANSITIONS: dict[BodyState, frozenset[BodyState]] = {
    BodyState.RECEIVING: frozenset({BodyState.COMPLETE, BodyState.FAILED}),
    BodyState.COMPLETE: frozenset(),
    BodyState.FAILED: frozenset(),
}


@attrs.define(eq=False)
class UploadedFile:
    """
    A multipart file field: its data is in ``file`` (memory up to
    ``[limits] file_memory_bytes``, then a temporary file), or was handed to
    the writer given to :meth:`LazyBody.stream_file`.

    :ivar size: bytes received.
    :ivar sha256: hex digest, computed while the data arrived.
    :ivar complete: False while the part is still arriving.
    """

    name: str
    filename: str
    content_type: str
    file: IO[bytes] | None = None
    size: int = 0
    sha256: str = ""
    complete: bool = False
    _hash: hashlib._Hash = attrs.field(factory=hashlib.sha256, repr=False)
    _writer: Callable[[bytes], object] | None = attrs.field(default=None, repr=False)

    def read(self) -> bytes:
        """
        The whole file (reads the spool: call it from a thread pipe for big files).
        """
        if self.file is None:
            return b""
        self.file.seek(0)
        data = self.file.read()
        self.file.seek(0)
        return data

    def describe(self) -> dict[str, JSON]:
        return {"name": self.name, "filename": self.filename, "content_type": self.content_type,
                "size": self.size, "sha256": self.sha256}


class _Parsed:
    """
    What is left of a closed body's parser: its value, if it had one.
    """

    __slots__ = ("value",)

    def __init__(self, value: JSON) -> None:
        self.value = value

    def feed(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def _missing(name: str) -> BadRequest:
    return BadRequest(f"missing parameter {name!r}", code="missing_parameter",
                      details={"param": name})


@implementer(IBodySource)
class LazyBody:
    """
    Body access while the body arrives: ``param``, ``form``, ``files``,
    ``file``, ``stream_file``, ``json`` and ``body``, each a Deferred.

    :param limits: the site's limits.
    :param content_type: the request's Content-Type header value.
    :param on_demand: called the first time a pipe waits for body data
        that is not there yet (the request then sends ``100 Continue``).
    """

    def __init__(self, limits: LimitsConfig, content_type: bytes | None,
                 on_demand: Callable[[], None] | None = None) -> None:
        self.limits = limits
        self.state = BodyState.RECEIVING
        self.error: PipecometError | None = None
        self.fields: dict[str, list[JSON]] = {}
        self.uploads: dict[str, list[UploadedFile]] = {}
        self.received = 0
        self._on_demand = on_demand
        # name → (waiter, the default it was asked with), not read back.
        self._waiters: dict[str, list[tuple[Deferred[Any], object]]] = {}
        self._end_waiters: list[tuple[Deferred[Any], Callable[[], object]]] = []
        self._streams: dict[str, Callable[[bytes], object]] = {}
        self._current: UploadedFile | None = None
        self._first: str | None = None
        self._first_waiters: list[Deferred] = []
        self._raw = tempfile.SpooledTemporaryFile(max_size=limits.file_memory_bytes)
        self._raw_writer: Callable[[bytes], object] | None = None
        # Raises a 400 for a bad Content-Type: the caller refuses the
        # request before reading its body.
        self._parser: Parser | _Parsed
        self.kind, self._parser = make_parser(
            content_type, self, max_fields=limits.max_fields,
            max_field_bytes=limits.max_field_bytes,
            max_part_header_bytes=limits.max_part_header_bytes)

    # -- lifecycle

    def _move(self, new: BodyState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"body cannot go from {self.state.value} to {new.value}")
        self.state = new

    def feed(self, data: bytes) -> None:
        """
        Some body bytes arrived.  Fires the waiters of every field they
        complete; a parse error fails the body (and is raised).
        """
        if self.state is not BodyState.RECEIVING:
            return
        self.received += len(data)
        writer = self._raw_writer
        if writer is not None:
            writer(data)
            return
        self._raw.write(data)
        try:
            self._parser.feed(data)
        except PipecometError as e:
            self.fail(e)
            raise

    def finish(self) -> None:
        """
        The body is complete: parameters never seen fail (or take their
        default) and the whole-body Deferreds fire.
        """
        if self.state is not BodyState.RECEIVING:
            return
        try:
            self._parser.close()
        except PipecometError as e:
            self.fail(e)
            raise
        self._move(BodyState.COMPLETE)
        if self._raw.closed:
            # The last field ended the request (a pipe refused it while the
            # parser was closing) and close() ran: nothing is left to give.
            return
        self._raw.seek(0)
        waiters, self._waiters = self._waiters, {}
        for name, ds in waiters.items():
            for d, default in ds:
                if d.called:
                    continue
                if default is not ...:
                    d.callback(default)
                else:
                    d.errback(_missing(name.removeprefix("\0file:")))
        ends, self._end_waiters = self._end_waiters, []
        for d, get in ends:
            if not d.called:
                d.callback(get())
        self._fire_first()

    def fail(self, error: PipecometError) -> None:
        """
        The body cannot be read (malformed, too large, too slow, cut off):
        everything waiting on it and asked later fails with ``error``.
        """
        if self.state is not BodyState.RECEIVING:
            return
        self._move(BodyState.FAILED)
        self.error = error
        waiters, self._waiters = self._waiters, {}
        ends, self._end_waiters = self._end_waiters, []
        for ds in waiters.values():
            for d, _ in ds:
                if not d.called:
                    d.errback(error)
        for d, _ in ends:
            if not d.called:
                d.errback(error)
        firsts, self._first_waiters = self._first_waiters, []
        for d in firsts:
            if not d.called:
                d.errback(error)

    def close(self) -> None:
        """
        Release the raw copy and spooled files (the request is gone).
        """
        self._raw.close()
        # The parser refers back to this body (its sink): keep only the
        # value json() may still read, so that neither is left to the
        # cyclic GC.
        self._parser = _Parsed(getattr(self._parser, "value", None))
        current, self._current = self._current, None
        if current is not None and current.file is not None:
            # A file part cut off by a disconnect: its spool is not in
            # ``uploads`` yet, and would stay open until a GC.
            current.file.close()
        for files in self.uploads.values():
            for f in files:
                if f.file is not None:
                    f.file.close()

    @property
    def complete(self) -> bool:
        return self.state is BodyState.COMPLETE

    # -- FieldSink (called by the parser)

    def _fire_first(self) -> None:
        firsts, self._first_waiters = self._first_waiters, []
        for d in firsts:
            if not d.called:
                d.callback(self._first)

    def field(self, name: str, value: JSON) -> None:
        if self._first is None:
            self._first = name
            self._fire_first()
        values = self.fields.get(name)
        if values is None:
            self.fields[name] = [value]
            waiters = self._waiters.pop(name, None)
            if waiters:
                for d, _ in waiters:
                    if not d.called:
                        d.callback(value)
        else:
            values.append(value)

    def file_start(self, name: str, filename: str, content_type: str) -> None:
        if self._first is None:
            self._first = name
            self._fire_first()
        up = UploadedFile(name, filename, content_type)
        writer = self._streams.pop(name, None)
        if writer is not None:
            up._writer = writer
        else:
            up.file = tempfile.SpooledTemporaryFile(max_size=self.limits.file_memory_bytes)
        self._current = up

    def file_data(self, data: bytes) -> None:
        up = self._current
        assert up is not None  # between file_start and file_end
        up.size += len(data)
        up._hash.update(data)
        if up._writer is not None:
            up._writer(data)
        else:
            assert up.file is not None  # file_start spooled it
            up.file.write(data)

    def file_end(self) -> None:
        up, self._current = self._current, None
        assert up is not None  # after file_start
        up.sha256 = up._hash.hexdigest()
        up.complete = True
        if up.file is not None:
            up.file.seek(0)
        self.uploads.setdefault(up.name, []).append(up)
        key = "\0file:" + up.name
        waiters = self._waiters.pop(key, None)
        if waiters:
            for d, _ in waiters:
                if not d.called:
                    d.callback(up)

    # -- what pipes call

    def _wait(self, key: str, default: object) -> Deferred[Any]:
        def forget(d: Deferred) -> None:
            ds = self._waiters.get(key)
            if ds:
                ds[:] = [w for w in ds if w[0] is not d]

        d: Deferred = Deferred(forget)
        self._waiters.setdefault(key, []).append((d, default))
        self._demand()
        return d

    def _at_end(self, get: Callable[[], _T]) -> Deferred[_T]:
        if self.state is BodyState.COMPLETE:
            return succeed(get())
        if self.state is BodyState.FAILED:
            return fail(self.error)

        def forget(d: Deferred) -> None:
            self._end_waiters[:] = [w for w in self._end_waiters if w[0] is not d]

        d: Deferred = Deferred(forget)
        self._end_waiters.append((d, get))
        self._demand()
        return d

    def _demand(self) -> None:
        on_demand, self._on_demand = self._on_demand, None
        if on_demand is not None:
            on_demand()

    def param(self, name: str, default: object = ...,
              query: Mapping[str, str] | None = None) -> Deferred[Any]:
        """
        Parameter ``name``: from the query at once, else the first body
        field of that name as soon as it is complete.  Fails with 400
        ``missing_parameter`` when the body ends without it (unless a
        default is given), or with the body's error.
        """
        if query is not None and name in query:
            return succeed(query[name])
        values = self.fields.get(name)
        if values:
            return succeed(values[0])
        if self.state is BodyState.COMPLETE:
            return succeed(default) if default is not ... else fail(_missing(name))
        if self.state is BodyState.FAILED:
            return fail(self.error)
        return self._wait(name, default)

    def first_field(self) -> Deferred:
        """
        The name of the body's first field (text or file) as soon as it is
        known (a text field: when complete; a file: when its part starts),
        or None for a body without fields.
        """
        if self._first is not None or self.state is BodyState.COMPLETE:
            return succeed(self._first)
        if self.state is BodyState.FAILED:
            return fail(self.error)

        def forget(d: Deferred) -> None:
            self._first_waiters[:] = [w for w in self._first_waiters if w is not d]

        d: Deferred = Deferred(forget)
        self._first_waiters.append(d)
        self._demand()
        return d

    def file(self, name: str) -> Deferred:
        """
        The first file field ``name`` (an :class:`UploadedFile`) once its
        data is complete.
        """
        files = self.uploads.get(name)
        if files:
            return succeed(files[0])
        if self.state is BodyState.COMPLETE:
            return fail(_missing(name))
        if self.state is BodyState.FAILED:
            return fail(self.error)
        return self._wait("\0file:" + name, ...)

    def stream_file(self, name: str, write: Callable[[bytes], object]) -> Deferred[UploadedFile]:
        """
        Hand the data of the next file field ``name`` to ``write`` as it
        arrives instead of spooling it; fires with its
        :class:`UploadedFile` (``file`` is None) when it is complete.
        """
        self._streams[name] = write
        return self.file(name)

    def stream_raw(self, write: Callable[[bytes], object]) -> Deferred[None]:
        """
        Hand the raw body to ``write`` as it arrives instead of keeping it
        (a proxy forwarding it): the bytes already in hand at once, then
        each piece as it comes.  From then on the body is neither parsed
        nor kept (``body()``, ``form()``... see nothing more of it).  Fires
        with None when the body is complete, or fails with its error.
        """
        if self._raw_writer is None and self.state is not BodyState.FAILED \
                and not self._raw.closed:
            self._raw.seek(0)
            held = self._raw.read()
            self._raw.seek(0)
            if self.state is BodyState.RECEIVING:
                self._raw.truncate()
                self._parser = RawParser(self)
                self._raw_writer = write
            if held:
                write(held)
        return self._at_end(lambda: None)

    def form(self) -> Deferred:
        """
        Every text field, ``{name: [values]}``, once the body is complete.
        """
        return self._at_end(lambda: {k: list(v) for k, v in self.fields.items()})

    def files(self) -> Deferred:
        """
        Every file field, ``{name: [UploadedFile]}``, once the body is complete.
        """
        return self._at_end(lambda: {k: list(v) for k, v in self.uploads.items()})

    def json(self) -> Deferred:
        """
        The decoded JSON body (``application/json``) once it is complete.
        """
        return self._at_end(lambda: getattr(self._parser, "value", None))

    def body(self) -> Deferred:
        """
        The whole raw body as bytes, once it is complete.
        """
        def read() -> bytes:
            self._raw.seek(0)
            data = self._raw.read()
            self._raw.seek(0)
            return data

        return self._at_end(read)

    @property
    def raw(self) -> IO[bytes]:
        """
        The file holding the raw body (what twisted.web calls ``content``).
        """
        return self._raw
