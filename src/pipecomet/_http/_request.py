"""
The request object of pipecomet's HTTP/1.1 protocol.

:class:`Request` is a ``twisted.web.server.Request`` (so Klein routes,
``twisted.web`` resources and ``treq.testing`` see the request they
know), served by :class:`~._protocol.HTTP11Protocol` through the channel
interface ``Request`` calls (``writeHeaders``, ``write``,
``requestDone``, ``registerProducer``...), as ``twisted.web._http2``'s
``H2Stream`` does for HTTP/2.

A chain route's request skips ``process()`` and resource traversal: the
protocol finds the route when the headers are in and runs its chain at
once, with a :class:`~pipecomet._lazy.LazyBody` fed as the body arrives
when it has one.  Everything else (plain Klein routes, other resources,
``lazy = false``) is buffered and processed as twisted.web does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from zope.interface import implementer

from .._chain import BufferedBody
from .._errors import InternalError, PayloadTooLarge, PipecometError
from .._interfaces import IBodySource, IChainRequest
from .._query import parse_query
from .._lazy._body import BodyState, LazyBody
from .._observe._requests import DoneHook, RequestRecord
from .._responders import send_error

if TYPE_CHECKING:
    from .._app import Route
    from .._chain import ChainRun
    from ._protocol import HTTP11Protocol, _Message

__all__ = ["Request"]

log = Logger()



@implementer(IChainRequest)
class Request(server.Request):
    """
    One request on an :class:`~._protocol.HTTP11Protocol`.

    :ivar gone: True once the client has disconnected.
    :ivar pipecomet_body: the :class:`~pipecomet._lazy.LazyBody` of a lazy
        chain request, else None.
    """

    # Slots keep the attributes of held requests off the instance dict
    # (twisted.web's Request already fills most of its shared key table).
    __slots__ = ("gone", "pipecomet_body", "pipecomet_record", "_proto", "_msg", "_lazy",
                 "_received", "_run", "_continue_sent", "_route", "_args", "_postpath",
                 "_done_hook")

    def __init__(self, proto: HTTP11Protocol, msg: _Message) -> None:
        self.gone = False
        self.pipecomet_body: LazyBody | None = None
        #: the observer's record of this request (see ``pipecomet._observe``)
        self.pipecomet_record: RequestRecord | None = None
        self._done_hook: DoneHook | None = None
        self._proto = proto
        self._msg = msg
        self._lazy = False
        self._received = 0
        self._run: ChainRun | None = None
        self._continue_sent = False
        self._route: tuple[Route, Mapping[str, Any]] | None = None
        self._args: dict[bytes, list[bytes]] | None = None
        self._postpath: list[bytes] | None = None
        super().__init__(proto, queued=False)

    # -- set up by the protocol

    def prepare(self, method: bytes, uri: bytes, version: bytes) -> None:
        """
        What ``requestReceived`` would set, set when the headers are in.
        (``Server`` and ``Date`` are written by the protocol when the
        response does not set them; ``process()`` sets the rest for the
        requests it serves.)
        """
        self.method, self.uri, self.clientproto = method, uri, version
        self.path = uri.partition(b"?")[0]
        self.site = self._proto.site

    # ``args`` is parsed when first read: a chain route reads its query
    # through PipeInput, and twisted.web's requestReceived sets it anew.
    @property
    def args(self) -> dict[bytes, list[bytes]]:
        args = self._args
        if args is None:
            args = self._args = parse_query(self.uri)
        return args

    @args.setter
    def args(self, value: dict[bytes, list[bytes]]) -> None:
        self._args = value

    @property
    def postpath(self) -> list[bytes] | None:
        postpath = self._postpath
        if postpath is None:
            postpath = self._postpath = [unquote_to_bytes(p) for p in self.path[1:].split(b"/")]
            if self.prepath is None:
                self.prepath = []
        return postpath

    @postpath.setter
    def postpath(self, value: list[bytes] | None) -> None:
        self._postpath = value

    def start(self, length: int | None, expect_continue: bool) -> None:
        """
        The headers are in: refuse a declared body over the limit, start a
        chain route (lazily when it has a body), or buffer the body for
        twisted.web.
        """
        proto = self._proto
        site = proto.site
        limits = site.limits
        if length is not None and length > limits.max_body_bytes:
            self.content = None
            self.reject(PayloadTooLarge(
                f"body of {length} bytes is larger than the limit of {limits.max_body_bytes}",
                code="body_too_large", details={"limit": limits.max_body_bytes}))
            return
        found = site.find_route(self) if (length == 0 or limits.lazy) else None
        if found is not None:
            self._route = found
            if length == 0:
                site.stats.requests_buffered += 1
                return  # run when the (empty) message is complete
            try:
                self.pipecomet_body = LazyBody(limits, self.getHeader(b"content-type"),
                                               self._wants_body)
            except PipecometError as e:
                self.content = None
                self.reject(e)
                return
            self._lazy = True
            # Not ``content``: twisted.web closes that when the response
            # ends, which can be while the body is still being finished.
            self.content = None
            site.stats.requests_lazy += 1
            self._serve()
            return
        site.stats.requests_buffered += 1
        self.gotLength(length)
        if expect_continue and not self.finished:
            proto.send_continue(self)

    def _serve(self) -> None:
        found, self._route = self._route, None
        assert found is not None  # set by start()
        route, params = found
        try:
            run = route.serve(self, params)
        except Exception:
            err = InternalError()
            log.failure("starting route {path} failed (error id {error_id})",
                        path=route.path, error_id=err.error_id)
            self.reject(err)
            return
        if self._lazy and not self.finished:
            self._run = run

    def _wants_body(self) -> None:
        # A pipe waits on the body: now the client may send it.
        if not self._continue_sent and not self.startedWriting and not self.finished \
                and not self.gone and self._msg.expect_continue:
            self._continue_sent = True
            self._proto.send_continue(self)

    def incoming_ids(self) -> tuple[bytes | None, bytes | None]:
        """
        The first ``X-Request-Id`` and ``traceparent`` values the client
        sent (None: absent), noted while the headers were parsed, for the
        request observer.
        """
        msg = self._msg
        return msg.request_id, msg.traceparent

    def log_headers(self) -> tuple[bytes | None, bytes | None]:
        """
        The first ``User-Agent`` and ``Referer`` values the client sent
        (None: absent), noted while the headers were parsed, for the
        access log.
        """
        msg = self._msg
        return msg.user_agent, msg.referer

    @property
    def received(self) -> int:
        """
        Body bytes received so far.
        """
        return self._received

    def body_chunk(self, data: bytes) -> None:
        """
        Body bytes from the protocol.
        """
        site = self._proto.site
        self._received += len(data)
        site.stats.body_bytes_read += len(data)
        if self.finished:
            return  # answered already; these bytes were in hand with the rest
        limit = site.limits.max_body_bytes
        if self._received > limit:
            self.reject(PayloadTooLarge(f"body larger than the limit of {limit} bytes",
                                        code="body_too_large", details={"limit": limit}))
            return
        body = self.pipecomet_body
        if body is None:
            if self.content is not None:
                self.content.write(data)
            return
        try:
            body.feed(data)
        except PipecometError as e:
            self.reject(e)

    def body_complete(self) -> None:
        """
        The message is complete: finish the lazy body, run an empty chain
        request, or process a buffered request as twisted.web does.
        """
        if self.finished or self.gone:
            return
        if self._lazy:
            body = self.pipecomet_body
            assert body is not None  # a lazy request has one
            try:
                body.finish()
            except PipecometError as e:
                self.reject(e)
            if self.finished:
                body.close()  # answered while finishing: release() left it open
            return
        if self._route is not None:
            self._serve()
            return
        try:
            self.requestReceived(self.method, self.uri, self.clientproto)
        except Exception:
            # process() reports the resource's errors itself; this is ours.
            err = InternalError()
            log.failure("serving {uri} failed (error id {error_id})", uri=self.uri,
                        error_id=err.error_id)
            self.reject(err)

    # -- answering

    def reject(self, error: PipecometError) -> None:
        """
        Answer ``error`` now (the chain is cancelled, the body fails); the
        protocol stops reading a body that is not complete.
        """
        body = self.pipecomet_body
        if not (self.finished or self.gone):
            # Counted here: a pipe waiting on the body may answer with the
            # error itself as the body fails.
            self._proto.site.stats_refused(error)
        if body is not None:
            body.fail(error)
        if self.finished or self.gone:
            return
        run, self._run = self._run, None
        if run is not None:
            run.cancel()
        send_error(self, error)

    def write_frame(self, data: bytes) -> bool:
        """
        Write ``data`` (already framed for this response: chunked when
        ``chunked`` is set) after the headers have gone out, sending it to
        the socket at once when nothing waits before it.  False (nothing
        written) when the client is not reading: register a push producer
        and wait for ``resumeProducing``.
        """
        if self.gone:
            return True
        return self._proto.write_frame(data)

    def pending_bytes(self) -> int:
        """
        Bytes written on this connection that the kernel has not taken yet.
        """
        return self._proto.pending_bytes()

    def pause_body(self) -> None:
        """
        Stop reading this request's body until :meth:`resume_body` (or the
        end of the request): flow control for a body streamed elsewhere.
        """
        if not self.gone:
            self._proto.pause_body()

    def resume_body(self) -> None:
        if not self.gone:
            self._proto.resume_body()

    def hold(self) -> None:
        """
        This response is held open (comet): the connection's idle timeout
        does not apply to it, and a client EOF means the client has gone.
        """
        self._proto.hold()

    def body_source(self) -> IBodySource:
        """
        The lazy body of a lazy chain request, else the buffered body.
        """
        body = self.pipecomet_body
        return body if body is not None else BufferedBody(self)

    def hold_run(self, run: ChainRun) -> bool:
        """
        Cancel ``run`` when the client goes, as a ``notifyFinish()``
        errback would, without a Deferred and its callbacks kept for the
        life of the request.  False when the caller must watch by itself.
        """
        if self._run is not None or self.finished or self.gone:
            return False
        self._run = run
        return True

    def call_when_done(self, hook: DoneHook, record: RequestRecord) -> bool:
        """
        Have ``hook(self, record, gone)`` called once when the response
        ends (``gone`` False) or the client goes first (True): what the
        request observer takes instead of a ``notifyFinish()`` Deferred
        kept for the life of each request.  False when the request is over.
        """
        if self.finished or self.gone or self._done_hook is not None:
            return False
        self._done_hook = hook
        self.pipecomet_record = record
        return True

    def done(self) -> None:
        """
        The response ended (the protocol calls this from ``requestDone``).
        """
        hook = self._done_hook
        if hook is not None:
            self._done_hook = None
            record = self.pipecomet_record
            assert record is not None  # set with the hook
            hook(self, record, False)

    def connectionLost(self, reason: Failure | None) -> None:
        self.gone = True
        run, self._run = self._run, None
        hook = self._done_hook
        if hook is not None and not self.finished:
            self._done_hook = None
            record = self.pipecomet_record
            assert record is not None  # set with the hook
            hook(self, record, True)
        super().connectionLost(reason)
        body = self.pipecomet_body
        if body is not None:
            from .._errors import BadRequest

            body.fail(BadRequest("the client went away", code="client_gone"))
            body.close()
        if run is not None:
            run.cancel()

    def release(self, force: bool = False) -> None:
        """
        The response is done: close the lazy body's files.
        """
        self._run = None
        body = self.pipecomet_body
        if body is not None and (force or body.state is not BodyState.RECEIVING):
            # (Still receiving: the answer came from inside finish(), which
            # closes it when done, or the connection closes early.)
            body.close()
