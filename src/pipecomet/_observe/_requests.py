"""
Per-request observation: the request id, and one record per request handed
to the metrics and the access log when the response ends.

:class:`RequestObserver` is called by :class:`~pipecomet.PipecometResource`
once per request (:meth:`RequestObserver.begin`).  The response's end
reaches it through the request's ``call_when_done`` when it has one
(pipecomet's own HTTP protocol: a direct call, no Deferred kept per request
for its whole life), otherwise through ``request.notifyFinish()``, which
every ``IRequest`` offers, so it does not depend on how the HTTP layer is
built.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
from typing import TYPE_CHECKING, Callable, Protocol, cast

from twisted.internet.interfaces import IReactorTime
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

if TYPE_CHECKING:
    from .._chain import Chain, PipeContext
    from .._errors import PipecometError
    from . import Metrics
    from ._accesslog import AccessLog
    from ._metrics import HTTPStats, PipeTimes

__all__ = [
    "RequestObserver",
    "RequestRecord",
    "note_error",
    "trace_headers",
    "valid_request_id",
    "UNMATCHED",
    "KLEIN",
    "CLIENT_GONE",
]

#: The ``route`` label of a request no route matched (404/405).
UNMATCHED = "<unmatched>"
#: The ``route`` label of a request served by a plain Klein handler.
KLEIN = "<klein>"
#: The status recorded for a request whose client went before the answer
#: (nginx's 499: nothing was sent with that status).
CLIENT_GONE = 499

_VALID_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_METHODS = {m: m.decode("ascii") for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE",
                                           b"PATCH", b"OPTIONS")}

#: The open records by request, so that :func:`note_error` (called where an
#: error response is sent, which knows only the request) finds its record.
#: Keys are request objects, which belong to one app each.  A request that
#: has a ``pipecomet_record`` attribute (pipecomet's own) keeps its record
#: there instead.
_OPEN: dict[object, RequestRecord] = {}

#: What a request's end hook is called with: (request, record, gone).
DoneHook = Callable[[IRequest, "RequestRecord", bool], None]


class _Answered(Protocol):
    """
    What the observer reads of a request beyond ``IRequest``: every request
    that reaches an app is a ``twisted.web.http.Request`` (pipecomet's own
    is one too), which has these.
    """

    finished: int | bool
    code: int

    def notifyFinish(self) -> Deferred[None]: ...


class ObservedRequest(Protocol):
    """
    A request that calls its observer when it ends, with no Deferred
    (:class:`pipecomet._http.Request`): ``call_when_done(hook, record)``
    has ``hook(request, record, gone)`` called once, when the response
    ended or the client went; False when it cannot (then
    ``notifyFinish()`` is used).
    """

    pipecomet_record: RequestRecord | None

    def call_when_done(self, hook: DoneHook, record: RequestRecord) -> bool: ...


def valid_request_id(raw: bytes) -> bool:
    """
    True when an incoming ``X-Request-Id`` is kept: 1-128 characters of
    ``[A-Za-z0-9._-]``.
    """
    return _VALID_ID.fullmatch(raw) is not None


def _new_id() -> str:
    # 128 random bits as 32 hex digits: also a valid W3C trace-id.
    # (random is reseeded in a forked child, so processes do not collide.)
    return "%032x" % random.getrandbits(128)


class _IdMaker:
    """
    Request ids made cheaply: 64 random bits for this process, then a
    counter, as 32 hex digits (a valid W3C trace-id).  A forked child
    draws new random bits, so serving processes never share ids.
    """

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = b"%016x" % (random.getrandbits(64) | 1 << 63)
        self.counter = itertools.count(random.getrandbits(32))

    def __call__(self) -> bytes:
        return b"%s%016x" % (self.prefix, next(self.counter))


_make_id = _IdMaker()


class RequestRecord:
    """
    What the metrics and the access log get about one request.

    :ivar route: the route's path pattern, :data:`UNMATCHED` or :data:`KLEIN`.
    :ivar method: the HTTP method (``OTHER`` for unusual ones).
    :ivar start: ``reactor.seconds()`` when the request reached the app.
    :ivar request_id: the id echoed in ``X-Request-Id``.
    :ivar error_code: the ``code`` of the error response sent, if any.
    :ivar error_id: the ``id`` of that error, as the client got it.
    """

    __slots__ = ("route", "method", "start", "request_id", "error_code", "error_id")

    def __init__(self, route: str, method: str, start: float, request_id: str) -> None:
        self.route = route
        self.method = method
        self.start = start
        self.request_id = request_id
        self.error_code: str | None = None
        self.error_id: str | None = None


def note_error(request: object, error: PipecometError) -> None:
    """
    Remember the code and id of the error response ``request`` gets
    (called by :func:`~pipecomet._responders.send_error`).
    """
    record = getattr(request, "pipecomet_record", None)
    if record is None:
        record = _OPEN.get(request)
    if record is not None:
        record.error_code = error.code
        record.error_id = error.error_id


class RequestObserver:
    """
    Gives each request its id and, when figures or an access log are
    wanted, follows it to its end.

    :ivar stats: the HTTP figures (:class:`~pipecomet._observe._metrics.HTTPStats`), or None.
    :ivar access: the access log (:class:`~pipecomet._observe._accesslog.AccessLog`), or None.
    :ivar unobserved: route paths left out of the figures, though not out
        of the access log (the dashboard's own stream, held for as long as
        the page is open, would skew durations and in-flight counts).
    :ivar in_flight: requests followed that have not ended yet.
    :ivar metrics: the app's :class:`~pipecomet._observe.Metrics`, or None.
    :ivar pipe_times: the pipe timer (:class:`~pipecomet._observe._metrics.PipeTimes`), or None.
    """

    def __init__(self) -> None:
        self.reactor: IReactorTime | None = None
        self.stats: HTTPStats | None = None
        self.access: AccessLog | None = None
        self.unobserved: frozenset[str] = frozenset()
        self.in_flight = 0
        self.metrics: Metrics | None = None
        self.pipe_times: PipeTimes | None = None
        self._recording = False
        # One bound method for every request that keeps it (a held request
        # would otherwise hold a bound-method object of its own).
        self._done_hook: DoneHook = self._done

    def attach(self, reactor: IReactorTime, *, stats: HTTPStats | None = None,
               access: AccessLog | None = None,
               unobserved: frozenset[str] | None = None) -> None:
        """
        Start recording with ``stats`` and/or ``access`` (the installers call this).
        """
        self.reactor = reactor
        if stats is not None:
            self.stats = stats
        if access is not None:
            self.access = access
        if unobserved is not None:
            self.unobserved = self.unobserved | unobserved
        self._recording = self.stats is not None or self.access is not None

    def instrument(self, chain: Chain, route: str) -> Chain:
        """
        ``chain`` with its pipes timed under ``route`` when pipe timing is
        on (``App.route`` calls this), else ``chain`` itself.
        """
        if self.pipe_times is None:
            return chain
        return self.pipe_times.instrument(chain, route)

    def begin(self, request: IRequest, route: str) -> RequestRecord:
        """
        A request reached the app and is served by ``route`` (its label):
        keep or make its id, echo it, and start following it when
        recording.  Call :meth:`follow` once the route has been served.

        :return: the request's record (``record.request_id`` is for
            ``ctx.request_id``).
        """
        incoming = getattr(request, "incoming_ids", None)
        if incoming is not None:
            # Noted by the protocol as the headers were parsed.
            rid_raw, parent_raw = incoming()
        else:
            raw = request.requestHeaders.getRawHeaders(b"x-request-id")
            rid_raw = raw[0] if raw else None
            parent_raw = None
        rid_bytes: bytes | None
        if rid_raw is not None and _VALID_ID.fullmatch(rid_raw) is not None:
            rid_bytes = rid_raw
        else:
            rid_bytes = None
            if incoming is None:
                parents = request.requestHeaders.getRawHeaders(b"traceparent")
                parent_raw = parents[0] if parents else None
            if parent_raw is not None:
                m = _TRACEPARENT.fullmatch(parent_raw.strip())
                if m is not None and m.group(1) != b"0" * 32:
                    # Join the caller's trace: its trace-id is our id.
                    rid_bytes = m.group(1)
            if rid_bytes is None:
                rid_bytes = _make_id()
        request.responseHeaders.setRawHeaders(b"x-request-id", [rid_bytes])
        reactor = self.reactor
        record = RequestRecord(route, _METHODS.get(request.method, "OTHER"),
                               reactor.seconds() if reactor is not None else 0.0,
                               rid_bytes.decode("ascii"))
        if self._recording:
            if hasattr(request, "pipecomet_record"):
                request.pipecomet_record = record
            else:
                _OPEN[request] = record
            if route not in self.unobserved:
                self.in_flight += 1
        return record

    def follow(self, request: IRequest, record: RequestRecord) -> None:
        """
        The route was served: a request answered at once is recorded now,
        a pending one when it ends, through its ``call_when_done`` (no
        Deferred) or else ``notifyFinish()``.
        """
        if not self._recording:
            return
        answered = cast(_Answered, request)
        if answered.finished:
            self._done(request, record, False)
            return
        when_done = getattr(request, "call_when_done", None)
        if when_done is not None and when_done(self._done_hook, record):
            return
        answered.notifyFinish().addBoth(self._finished, request, record)

    def _finished(self, result: object, request: IRequest, record: RequestRecord) -> None:
        self._done(request, record, isinstance(result, Failure))
        # Returning None ends a disconnect's failure here: it is not an error.

    def _done(self, request: IRequest, record: RequestRecord,
              gone: bool) -> None:
        if hasattr(request, "pipecomet_record"):
            request.pipecomet_record = None
        else:
            _OPEN.pop(request, None)
        reactor = self.reactor
        duration = reactor.seconds() - record.start if reactor is not None else 0.0
        status = CLIENT_GONE if gone else cast(_Answered, request).code
        if record.route not in self.unobserved:
            self.in_flight -= 1
            stats = self.stats
            if stats is not None:
                stats.record(record, status, duration)
        access = self.access
        if access is not None:
            access.record(request, record, status, duration)


def trace_headers(ctx: PipeContext) -> dict[str, str]:
    """
    Headers a pipe passes on to a backend call so the backend's logs carry
    this request's id: ``X-Request-Id`` and a W3C ``traceparent`` whose
    trace-id is derived from the request id (equal to it when the id is
    already 32 hex digits, as the ids pipecomet makes are) and whose
    parent-id is new for each call.

    :param ctx: the request's :class:`~pipecomet.PipeContext`.
    """
    rid = ctx.request_id or _new_id()
    if _HEX32.fullmatch(rid) and rid != "0" * 32:
        trace_id = rid
    else:
        trace_id = hashlib.blake2b(rid.encode("utf-8"), digest_size=16).hexdigest()
    span_id = "%016x" % (random.getrandbits(64) or 1)
    return {"X-Request-Id": rid, "traceparent": f"00-{trace_id}-{span_id}-01"}
