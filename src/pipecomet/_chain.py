"""
Pipes and the chain runner (the seed's PipeManager).

A :class:`Chain` is declared once per route from stateless :class:`Pipe`
objects and shared by every request.  At declaration it is compiled into
*stages*: an inline pipe is a stage of its own, consecutive ``thread`` pipes
of one quota category form one stage (one pool job), a ``process`` pipe is a
stage, and a :class:`Parallel` fan-out is a stage that starts branches and
lets the main chain go on.

Per request, :class:`ChainRun` walks the stages.  A pipe that returns a
plain value costs a function call and a dict store: no Deferred is made
unless a pipe returns one.  Results reach the client through a responder
(:mod:`pipecomet._responders`) as they are ready.
"""

from __future__ import annotations

from types import CoroutineType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, TypeVar, cast, overload

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout
from twisted.logger import Logger
from twisted.python.components import registerAdapter
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from zope.interface import implementer

from ._errors import BadRequest, GatewayTimeout, InternalError, PipecometError
from ._interfaces import IBodySource, IChainRequest, IChainSink, IPipeInput
from ._json import JSON
from ._query import parse_query, parse_query_text
from ._runtime import Runtime

if TYPE_CHECKING:
    from ._backend import BackendService
    from ._comet._interfaces import IStreamSink

__all__ = [
    "Pipe",
    "pipe",
    "process_pipe",
    "Parallel",
    "Chain",
    "Answer",
    "SkipRest",
    "PipeInput",
    "PipeContext",
    "PipeResult",
    "ChainRun",
    "BufferedBody",
    "Stream",
]

log = Logger()

#: A pipe's function, ``func(inp, ctx, res)``.  What it returns is the
#: app's own value (any value, a Deferred, a coroutine, an Answer...): Any.
PipeFunc = Callable[["PipeInput", "PipeContext", "PipeResult"], Any]
SkipIf = Callable[["PipeResult", "PipeContext"], bool]

_T = TypeVar("_T")

RUN_KINDS = ("inline", "thread", "process")


# ---------------------------------------------------------------------------
# Declarations


@attrs.frozen
class Pipe:
    """
    One stateless step of a chain.

    :param func: ``func(inp, ctx, res)``.  For ``inline`` pipes it may return
        a value, a Deferred or a coroutine; for ``thread`` pipes it runs on the
        quota pool and returns a value; for ``process`` pipes it runs on the
        reactor and returns the *payload* sent to the worker function.
    :param name: key of the pipe's result in :class:`PipeResult`.
    :param run: ``"inline"`` (reactor thread), ``"thread"`` or ``"process"``.
    :param category: quota category of a ``thread`` pipe.
    :param worker_function: name of the registered worker function a
        ``process`` pipe calls (``func`` computes its payload).
    :param skip_if: ``skip_if(res, ctx)``; when true the pipe does not run.
    :param timeout: seconds an inline Deferred or a process call may take
        before the request gets 504.
    """

    func: PipeFunc
    name: str = attrs.field(default="")
    run: str = attrs.field(default="inline", validator=attrs.validators.in_(RUN_KINDS))
    category: str | None = None
    worker_function: str | None = None
    skip_if: SkipIf | None = None
    timeout: float | None = None

    def __attrs_post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", getattr(self.func, "__name__", "pipe"))
        if self.run == "thread" and not self.category:
            raise ValueError(f"pipe {self.name!r}: a thread pipe needs a category")
        if self.run == "process" and not self.worker_function:
            raise ValueError(f"pipe {self.name!r}: a process pipe needs a function name")

    def __call__(self, inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Any:  # PipeFunc's
        return self.func(inp, ctx, res)


@overload
def pipe(func: PipeFunc, *, name: str = "", run: str = "inline", category: str | None = None,
         skip_if: SkipIf | None = None, timeout: float | None = None) -> Pipe: ...


@overload
def pipe(func: None = None, *, name: str = "", run: str = "inline",
         category: str | None = None, skip_if: SkipIf | None = None,
         timeout: float | None = None) -> Callable[[PipeFunc], Pipe]: ...


def pipe(
    func: PipeFunc | None = None,
    *,
    name: str = "",
    run: str = "inline",
    category: str | None = None,
    skip_if: SkipIf | None = None,
    timeout: float | None = None,
) -> Pipe | Callable[[PipeFunc], Pipe]:
    """
    Declare a pipe; usable bare (``@pipe``) or with options
    (``@pipe(run="thread", category="slow")``).
    """

    def wrap(f: PipeFunc) -> Pipe:
        return Pipe(f, name=name, run=run, category=category, skip_if=skip_if, timeout=timeout)

    return wrap(func) if func is not None else wrap


def process_pipe(
    function: str,
    payload: PipeFunc | None = None,
    *,
    name: str = "",
    skip_if: SkipIf | None = None,
    timeout: float | None = None,
) -> Pipe:
    """
    A pipe that calls the worker function ``function`` with ``payload(inp, ctx,
    res)`` (computed on the reactor; the last result when omitted).
    """
    if payload is None:

        def payload(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> object:
            return res.last

    return Pipe(
        payload,
        name=name or function,
        run="process",
        worker_function=function,
        skip_if=skip_if,
        timeout=timeout,
    )


def _branches(value: Iterable[Pipe | Chain]) -> tuple[Pipe | Chain, ...]:
    # A typed converter: with converter=tuple, mypy's attrs plugin cannot
    # type the constructor's argument.
    return tuple(value)


@attrs.frozen
class Parallel:
    """
    A fan-out: every branch starts at this point and runs concurrently while
    the main chain goes on.  Each branch's result (or error record) is sent
    to the client as soon as it is ready, under the branch's name; the
    response ends when the main chain and every branch have finished.

    :param branches: pipes or chains; a chain's name is its branch name.
    :param timeout: seconds each branch may take; a late branch yields an
        error record with code ``timeout`` and the others go on.
    """

    branches: tuple[Pipe | Chain, ...] = attrs.field(converter=_branches)
    name: str = "parallel"
    timeout: float | None = None

    def __attrs_post_init__(self) -> None:
        names = [b.name for b in self.branches]
        if len(set(names)) != len(names):
            raise ValueError(f"parallel {self.name!r}: branch names must differ: {names}")
        if "main" in names:
            raise ValueError(f"parallel {self.name!r}: 'main' is reserved for the main chain")


@attrs.frozen
class Answer:
    """
    Returned by a pipe to answer at once: the rest of the chain is skipped.

    :param body: bytes or str are sent as they are; anything else is encoded
        by the responder (JSON).
    """

    body: object = None
    status: int = 200
    headers: Mapping[str, str] = attrs.field(factory=dict)
    content_type: str | None = None


@attrs.frozen
class SkipRest:
    """
    Returned by a pipe to end the chain here; ``value`` is its result and
    the response, as if it were the last pipe.
    """

    value: Any = None  # a pipe's result, read by the pipes after it: anything


# ---------------------------------------------------------------------------
# Compiled stages


class _Inline:
    __slots__ = ("pipe",)
    kind = "inline"

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe


class _ThreadGroup:
    """
    Consecutive thread pipes of one category: one pool job runs them all.
    """

    __slots__ = ("pipes", "category")
    kind = "thread"

    def __init__(self, pipes: list[Pipe]) -> None:
        category = pipes[0].category
        assert category is not None  # Pipe refuses a thread pipe without one
        self.pipes = tuple(pipes)
        self.category = category

    def run_in_thread(self, inp: PipeInput, ctx: PipeContext, res: PipeResult) -> tuple[str, Any]:
        """
        Runs on a pool thread.  The request's reactor-side code does not
        touch ``res`` while the job holds it, so no lock is needed.
        """
        name, out = "", None
        for p in self.pipes:
            if p.skip_if is not None and p.skip_if(res, ctx):
                continue
            out = p.func(inp, ctx, res)
            name = p.name
            if isinstance(out, (Answer, SkipRest)):
                return name, out
            if isinstance(out, (Deferred, CoroutineType)):
                raise TypeError(f"thread pipe {name!r} returned {type(out).__name__}; "
                                "a thread pipe must return a value")
            res[name] = out
            res.last = out
        return name, out


class _Process:
    __slots__ = ("pipe", "function")
    kind = "process"

    def __init__(self, pipe: Pipe) -> None:
        assert pipe.worker_function is not None  # Pipe refuses a process pipe without one
        self.pipe = pipe
        self.function = pipe.worker_function


class _Fanout:
    __slots__ = ("parallel", "branches")
    kind = "parallel"

    def __init__(self, parallel: Parallel) -> None:
        self.parallel = parallel
        self.branches = tuple(
            (b.name, b if isinstance(b, Chain) else Chain([b], name=b.name))
            for b in parallel.branches
        )


_Stage = _Inline | _ThreadGroup | _Process | _Fanout


def _compile(pipes: Sequence[Pipe | Parallel]) -> tuple[_Stage, ...]:
    stages: list[_Stage] = []
    group: list[Pipe] = []
    for p in pipes:
        if isinstance(p, Pipe) and p.run == "thread":
            if group and group[0].category != p.category:
                stages.append(_ThreadGroup(group))
                group = []
            group.append(p)
            continue
        if group:
            stages.append(_ThreadGroup(group))
            group = []
        if isinstance(p, Parallel):
            stages.append(_Fanout(p))
        elif isinstance(p, Pipe):
            stages.append(_Process(p) if p.run == "process" else _Inline(p))
        elif callable(p):
            stages.append(_Inline(Pipe(p)))
        else:
            raise TypeError(f"not a pipe: {p!r}")
    if group:
        stages.append(_ThreadGroup(group))
    return tuple(stages)


class Chain:
    """
    An ordered list of pipes, compiled once and shared by all requests.

    :param pipes: :class:`Pipe`, :class:`Parallel` or plain callables
        ``f(inp, ctx, res)`` (taken as inline pipes named after ``f``).
    """

    def __init__(self, pipes: Iterable[Pipe | Parallel | PipeFunc], name: str = "main") -> None:
        self.pipes = tuple(p if isinstance(p, (Pipe, Parallel)) else Pipe(p) for p in pipes)
        self.name = name
        names = [p.name for p in self.pipes if isinstance(p, Pipe)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"chain {name!r}: pipe names must differ: {dupes}")
        self.stages = _compile(self.pipes)
        self.has_branches = any(isinstance(s, _Fanout) for s in self.stages)

    def walk(self) -> Iterable[Pipe]:
        """
        Every pipe of the chain and of its branches, for start-up checks.
        """
        for p in self.pipes:
            if isinstance(p, Parallel):
                for b in p.branches:
                    yield from (b.walk() if isinstance(b, Chain) else (b,))
            else:
                yield p

    def __repr__(self) -> str:
        return f"Chain({self.name!r}, {[p.name for p in self.pipes]})"


# ---------------------------------------------------------------------------
# Per-request values


@implementer(IBodySource)
class BufferedBody:
    """
    Body access for a request whose body twisted.web has already read whole.
    The lazy parser provides the same methods while the body still arrives.
    """

    __slots__ = ("_request", "_form")

    def __init__(self, request: IRequest) -> None:
        self._request = request
        self._form: dict[str, list[JSON]] | None = None

    def body(self) -> Deferred[bytes]:
        content = self._request.content
        if content is None:
            return _succeed(b"")
        content.seek(0)
        data = content.read()
        content.seek(0)
        return _succeed(data)

    def _form_now(self) -> dict[str, list[JSON]]:
        if self._form is None:
            form: dict[str, list[JSON]] = {}
            if self._request.method == b"POST":
                # twisted.web parsed urlencoded and multipart bodies into args.
                query = parse_query(self._request.uri)
                for k, vs in self._request.args.items():
                    extra = vs[len(query.get(k, ())):]
                    key = k.decode("utf-8", "replace")
                    if extra:
                        form[key] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                                     for v in extra]
            self._form = form
        return self._form

    def form(self) -> Deferred[dict[str, list[JSON]]]:
        return _succeed(self._form_now())

    def param(self, name: str, default: object = ...,
              query: Mapping[str, str] | None = None) -> Deferred[Any]:
        if query is not None and name in query:
            return _succeed(query[name])
        values = self._form_now().get(name)
        if values:
            return _succeed(values[0])
        if default is not ...:
            return _succeed(default)
        return _fail(BadRequest(f"missing parameter {name!r}", code="missing_parameter",
                                details={"param": name}))


@implementer(IChainRequest)
class BufferedRequest:
    """
    :class:`IChainRequest` of a twisted.web request that is not
    pipecomet's own (twisted.web's channel, Klein, tests): its body was
    read whole, and the run watches ``notifyFinish()`` for a disconnect.
    """

    __slots__ = ("request",)
    # Not kept in twisted.web's adapter cache (Componentized.getComponent):
    # a cached adapter would hold its request in a reference cycle.
    temporaryAdapter = True

    def __init__(self, request: IRequest) -> None:
        self.request = request

    def body_source(self) -> BufferedBody:
        return BufferedBody(self.request)

    def hold_run(self, run: ChainRun) -> bool:
        return False


registerAdapter(BufferedRequest, server.Request, IChainRequest)
registerAdapter(BufferedRequest, IRequest, IChainRequest)


def chain_request(request: IRequest) -> IChainRequest:
    """
    ``IChainRequest(request)``.  A request that provides it is used as it
    is: asking a twisted.web request (a ``Componentized``) would cache the
    request in its own adapter cache, a reference cycle per request.
    """
    if IChainRequest.providedBy(request):
        return request
    return IChainRequest(request)


def _succeed(value: _T) -> Deferred[_T]:
    d: Deferred[_T] = Deferred()
    d.callback(value)
    return d


def _fail(error: BaseException) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(error))
    return d


@implementer(IPipeInput)
class PipeInput:
    """
    The request as pipes see it: method, path, path and query parameters,
    headers, and body access that may still be waiting for bytes.

    :ivar request: the underlying ``twisted.web`` request.
    :ivar path_params: parameters taken from the route's path.
    """

    __slots__ = ("request", "path_params", "_query", "_query_all", "_body")

    def __init__(self, request: IRequest, path_params: Mapping[str, Any] | None = None) -> None:
        self.request = request
        self.path_params = path_params or {}
        self._query: dict[str, str] | None = None
        self._query_all: dict[str, list[str]] | None = None
        self._body: IBodySource | None = None

    @property
    def method(self) -> str:
        return self.request.method.decode("ascii")

    @property
    def path(self) -> str:
        return self.request.path.decode("utf-8", "replace")

    @property
    def query_all(self) -> dict[str, list[str]]:
        """
        Every value of every query parameter.
        """
        if self._query_all is None:
            self._query_all = parse_query_text(self.request.uri)
        return self._query_all

    @property
    def query(self) -> dict[str, str]:
        """
        The first value of each query parameter.
        """
        if self._query is None:
            self._query = {k: vs[0] for k, vs in self.query_all.items() if vs}
        return self._query

    def header(self, name: str, default: str | None = None) -> str | None:
        """
        The first value of header ``name`` as text; a value that is not
        UTF-8 is the client's error (400 ``bad_header``), not ours.
        """
        raw = self.request.requestHeaders.getRawHeaders(name.encode("ascii"))
        if not raw:
            return default
        try:
            return raw[0].decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"header {name} is not UTF-8 text", code="bad_header",
                             details={"header": name}) from None

    @property
    def headers(self) -> Headers:
        return self.request.requestHeaders

    @property
    def body_source(self) -> IBodySource:
        """
        Where the body is read from (:class:`~pipecomet.interfaces.IBodySource`).
        """
        if self._body is None:
            self._body = chain_request(self.request).body_source()
        return self._body

    def body(self) -> Deferred[bytes]:
        """
        A Deferred of the whole body as bytes.
        """
        return self.body_source.body()

    def form(self) -> Deferred[dict[str, list[JSON]]]:
        """
        A Deferred of the body's form fields: ``{name: [values]}``.
        """
        return self.body_source.form()

    def param(self, name: str, default: object = ...) -> Deferred[Any]:
        """
        A Deferred of parameter ``name``: from the query at once, else from
        the body as soon as that field is complete.  Fails with 400
        ``missing_parameter`` when the body ends without it and no default
        is given.
        """
        return self.body_source.param(name, default, self.query)


class PipeContext(dict[str, Any]):
    """
    Data pipes of one request share, as a dict; plus the app's runtime
    (one with no parts when none is given).
    """

    __slots__ = ("runtime", "request_id")

    def __init__(self, runtime: Runtime | None = None) -> None:
        super().__init__()
        self.runtime = runtime if runtime is not None else Runtime(None)
        self.request_id: str | None = None

    def backend(self, name: str) -> BackendService:
        """
        The backend service ``name`` declared in ``[backends]``
        (:class:`pipecomet.BackendService`):
        ``resp = await ctx.backend("users").get("/users/1")``.
        """
        backends = self.runtime.backends if self.runtime is not None else None
        if backends is None:
            raise RuntimeError(f"backend service {name!r} used but no [backends] are configured")
        return backends.get(name)


class PipeResult(dict[str, Any]):
    """
    Results of the pipes that ran so far, by pipe name; ``last`` is the most
    recent one.
    """

    __slots__ = ("last",)

    def __init__(self, *args: Mapping[str, Any]) -> None:
        super().__init__(*args)
        self.last: Any = None  # a pipe's result: anything


# ---------------------------------------------------------------------------
# The runner


def refuse_stream(stream: Stream, error: Callable[[PipecometError], None]) -> None:
    """
    What an :class:`~pipecomet._interfaces.IChainSink` that cannot stream
    does with a :class:`Stream` (a fan-out branch, a responder that is no
    stream sink): cancel it and fail the run with a 500, ``error(...)``
    being the sink's own :meth:`~pipecomet._interfaces.IChainSink.error`.
    """
    stream.cancel()
    error(InternalError())


class Stream:
    """
    Returned by a pipe (a many-mode condition pipe) to make the response a
    long-lived stream: the runner hands it to the responder with
    ``sink.stream(obj)``, cancels it when the client goes, and counts the
    run done when ``obj.when_done()`` fires.  See :mod:`pipecomet._comet`.
    """

    __slots__ = ()

    def cancel(self) -> None:
        raise NotImplementedError

    def when_done(self) -> Deferred[None]:
        raise NotImplementedError

    def serve(self, sink: IStreamSink) -> None:
        """
        Start writing through ``sink``, the responder's
        :class:`~pipecomet._comet.IStreamSink`.
        """
        raise NotImplementedError


_SPECIAL = (Deferred, CoroutineType, Answer, SkipRest, Stream)
#: Plain results, told apart from _SPECIAL by type alone: Deferred is an
#: Awaitable, so isinstance() against it goes through ABCMeta.__instancecheck__.
_PLAIN = frozenset((dict, list, tuple, str, bytes, int, float, bool, type(None)))


def as_pipecomet_error(failure: Failure | BaseException, where: str,
                       request_id: str | None = None) -> PipecometError:
    """
    Map an exception to the error the client sees; unexpected ones are
    logged with the id the client gets (and the request's id).
    """
    exc = failure.value if isinstance(failure, Failure) else failure
    if isinstance(exc, PipecometError):
        return exc
    if isinstance(exc, (DeferredTimeout, TimeoutError)):
        return GatewayTimeout(f"{where} timed out")
    err = InternalError()
    f = failure if isinstance(failure, Failure) else Failure(failure, type(failure),
                                                             failure.__traceback__)
    log.failure("unexpected error in {where} (error id {error_id})", f, where=where,
                error_id=err.error_id, request_id=request_id)
    return err


class ChainRun:
    """
    One request's walk through a chain.  Made by the route; driven by
    :meth:`start`.  Cancels everything it waits on when the client goes.
    """

    __slots__ = (
        "chain", "inp", "ctx", "res", "sink", "runtime", "_pending", "_branches",
        "_main_done", "_closed", "cancelled", "_watching", "_done",
    )

    def __init__(self, chain: Chain, inp: PipeInput, ctx: PipeContext, sink: IChainSink) -> None:
        self.chain = chain
        self.inp = inp
        self.ctx = ctx
        self.res = PipeResult()
        self.sink = sink
        self.runtime = ctx.runtime
        self._pending: Deferred | None = None
        self._branches: dict[str, _BranchRun] = {}
        self._main_done = False
        self._closed = False
        self.cancelled = False
        self._watching = False
        self._done: Deferred | None = None

    # -- public

    def start(self) -> None:
        self._advance(0)

    def cancel(self) -> None:
        """
        The client went away: cancel what is pending, run no further pipe.
        """
        if self._closed:
            return
        pending = self._pending
        if isinstance(pending, Stream) and self._done is None and pending.when_done().called:
            # The stream ended before anyone asked when_done(), so nothing
            # followed it (see _special): the run was over already.
            self._pending = None
            self._closed = True
            return
        self.cancelled = True
        self._closed = True
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        branches, self._branches = self._branches, {}
        for b in branches.values():
            b.cancel()
        self._fire_done()

    def when_done(self) -> Deferred:
        """
        A Deferred that fires once the run has ended (answered, failed,
        finished streaming or cancelled).
        """
        if self._done is None:
            self._done = Deferred()
            if self._closed:
                self._done.callback(None)
            elif isinstance(self._pending, Stream):
                # Streaming: follow the stream's end only now that someone
                # asks (see _special).
                self._pending.when_done().addBoth(self._stream_ended, self._pending)
        return self._done

    def watch_disconnect(self, request: IRequest) -> None:
        """
        Cancel this run if ``request``'s client disconnects.  Only needed
        once the run waits on something.
        """
        if self._watching:
            return
        self._watching = True
        if chain_request(request).hold_run(self):
            # The request cancels this run itself when its client goes (a
            # LazyRequest): no notifyFinish() Deferred and callbacks kept per
            # held connection.
            return
        # A bound method, not a closure: a held stream keeps this callback
        # for its whole life, and a closure and its cell cost ~150 bytes more.
        # notifyFinish() is twisted.web's Request's; IRequest does not declare it.
        cast(server.Request, request).notifyFinish().addErrback(self._client_gone)

    def _client_gone(self, reason: Failure) -> None:
        self.cancel()

    # -- walking

    def _advance(self, i: int) -> None:
        stages = self.chain.stages
        n = len(stages)
        inp, ctx, res = self.inp, self.ctx, self.res
        while i < n:
            if self.cancelled:
                return
            # Any: dispatched on .kind (a str compare, cheaper here than
            # isinstance), which mypy cannot narrow the stage union through.
            stage: Any = stages[i]
            kind = stage.kind
            if kind == "inline":
                p = stage.pipe
                if p.skip_if is not None and p.skip_if(res, ctx):
                    i += 1
                    continue
                try:
                    out = p.func(inp, ctx, res)
                except BaseException as e:
                    self._main_failed(e, p.name)
                    return
                if type(out) not in _PLAIN and isinstance(out, _SPECIAL):
                    if isinstance(out, CoroutineType):
                        out = Deferred.fromCoroutine(out)
                    if isinstance(out, Deferred):
                        self._wait(out, p.name, p.timeout, i)
                        return
                    if self._special(p.name, out):
                        return
                else:
                    res[p.name] = out
                    res.last = out
            elif kind == "thread":
                self._start_thread_group(stage, i)
                return
            elif kind == "process":
                self._start_process(stage, i)
                return
            else:
                self._start_fanout(stage)
            i += 1
        self._main_finished(res.last)

    def _special(self, name: str, out: Answer | SkipRest | Stream) -> bool:
        """
        Handle an Answer, SkipRest or Stream; True when the walk ends here.
        """
        if isinstance(out, Stream):
            self._cancel_branches()
            self._main_done = True
            self._pending = out  # type: ignore[assignment]  # cancel() reaches it
            self.watch_disconnect(self.inp.request)
            if self._done is not None:
                out.when_done().addBoth(self._stream_ended, out)
            # A held stream may last hours: the run keeps only what cancel()
            # and when_done() need.  The walk's input, context and results
            # are done with, and nobody follows the stream's end until
            # when_done() is asked (a Deferred and its callbacks per held
            # connection otherwise).
            self.inp = self.ctx = self.res = None  # type: ignore[assignment]
            self.sink.stream(out)
            return True
        if isinstance(out, Answer):
            self._cancel_branches()
            self._main_done = True
            self._closed = True
            self.sink.answer(out)
            self._fire_done()
            return True
        self.res[name] = out.value
        self.res.last = out.value
        self._main_finished(out.value)
        return True

    def _stream_ended(self, _: object, out: Stream) -> None:
        if self._pending is out:
            self._pending = None
        self._closed = True
        self._fire_done()

    def _wait(self, d: Deferred, name: str, timeout: float | None, i: int) -> None:
        if timeout is not None:
            d.addTimeout(timeout, self.runtime.reactor)
        self._pending = d
        self.watch_disconnect(self.inp.request)

        def ok(out: Any) -> None:  # the pipe's result: anything
            if self._pending is not d:
                return
            self._pending = None
            if isinstance(out, (Answer, SkipRest, Stream)):
                self._special(name, out)
                return
            self.res[name] = out
            self.res.last = out
            self._advance(i + 1)

        def failed(f: Failure) -> None:
            if self._pending is not d:
                return
            self._pending = None
            if f.check(CancelledError) and self.cancelled:
                return
            self._main_failed(f, name)

        d.addCallbacks(ok, failed)

    def _start_thread_group(self, stage: _ThreadGroup, i: int) -> None:
        quota = self.runtime.quota if self.runtime is not None else None
        if quota is None:
            self._main_failed(RuntimeError("thread pipe used but no quota pool is configured"),
                              stage.pipes[0].name)
            return
        try:
            d = quota.run(stage.category, stage.run_in_thread, self.inp, self.ctx, self.res)
        except BaseException as e:
            self._main_failed(e, stage.pipes[0].name)
            return
        self._pending = d
        self.watch_disconnect(self.inp.request)

        def ok(outcome: tuple[str, Any]) -> None:
            if self._pending is not d:
                return
            self._pending = None
            name, out = outcome
            if isinstance(out, (Answer, SkipRest)):
                self._special(name, out)
                return
            self._advance(i + 1)

        def failed(f: Failure) -> None:
            if self._pending is not d:
                return
            self._pending = None
            if f.check(CancelledError) and self.cancelled:
                return
            self._main_failed(f, stage.pipes[-1].name)

        d.addCallbacks(ok, failed)

    def _start_process(self, stage: _Process, i: int) -> None:
        p = stage.pipe
        if p.skip_if is not None and p.skip_if(self.res, self.ctx):
            self._advance(i + 1)
            return
        workers = self.runtime.workers if self.runtime is not None else None
        if workers is None:
            self._main_failed(RuntimeError("process pipe used but no worker pool is configured"),
                              p.name)
            return
        try:
            payload = p.func(self.inp, self.ctx, self.res)
            d = workers.call(stage.function, payload, timeout=p.timeout)
        except BaseException as e:
            self._main_failed(e, p.name)
            return
        self._wait(d, p.name, None, i)

    # -- branches

    def _start_fanout(self, stage: _Fanout) -> None:
        timeout = stage.parallel.timeout
        self.watch_disconnect(self.inp.request)
        for name, chain in stage.branches:
            branch = _BranchRun(self, name, chain, timeout)
            self._branches[name] = branch
            branch.start()

    def _branch_done(self, name: str, value: object, error: PipecometError | None) -> None:
        if self._branches.pop(name, None) is None or self._closed:
            return
        if error is None:
            self.sink.part(name, value)
        else:
            self.sink.part_error(name, error)
        self._maybe_close()

    def _cancel_branches(self) -> None:
        if not self._branches:
            return  # no new empty dict kept by every held stream
        branches, self._branches = self._branches, {}
        for b in branches.values():
            b.cancel()

    # -- ending

    def _main_finished(self, value: object) -> None:
        self._main_done = True
        if self.chain.has_branches:
            self.sink.part("main", value)
            self._maybe_close()
        else:
            self._closed = True
            self.sink.result(value)
            self._fire_done()

    def _main_failed(self, failure: Failure | BaseException, name: str) -> None:
        error = as_pipecomet_error(failure, f"pipe {name!r}",
                                   self.ctx.request_id if self.ctx is not None else None)
        self._main_done = True
        if self.chain.has_branches and self._branches:
            self.sink.part_error("main", error)
            self._maybe_close()
        else:
            self._closed = True
            self.sink.error(error)
            self._fire_done()

    def _maybe_close(self) -> None:
        if self._main_done and not self._branches and not self._closed:
            self._closed = True
            self.sink.close()
            self._fire_done()

    def _fire_done(self) -> None:
        if self._done is not None and not self._done.called:
            self._done.callback(None)


@implementer(IChainSink)
class _BranchSink:
    """
    The sink of a fan-out branch's run: its outcome goes to the branch.
    A branch has no branches of its own (``part``, ``part_error`` and
    ``close`` are never called) and cannot stream.
    """

    __slots__ = ("branch",)

    def __init__(self, branch: _BranchRun) -> None:
        self.branch = branch

    def answer(self, answer: Answer) -> None:
        self.branch.finish(answer.body, None)

    def result(self, value: object) -> None:
        self.branch.finish(value, None)

    def error(self, error: PipecometError) -> None:
        self.branch.finish(None, error)

    def part(self, name: str, value: object) -> None:
        pass

    def part_error(self, name: str, error: PipecometError) -> None:
        pass

    def close(self) -> None:
        pass

    def stream(self, stream: Stream) -> None:
        refuse_stream(stream, self.error)


class _BranchRun:
    """
    One branch of a fan-out: a sub-chain with its own results, reporting to
    the parent run, cut off after its timeout.
    """

    __slots__ = ("parent", "name", "run", "_timer", "_finished")

    def __init__(self, parent: ChainRun, name: str, chain: Chain, timeout: float | None) -> None:
        self.parent = parent
        self.name = name
        ctx = parent.ctx
        self.run = ChainRun(chain, parent.inp, ctx, _BranchSink(self))
        # A branch sees what the main chain had when it started.
        self.run.res.update(parent.res)
        self.run.res.last = parent.res.last
        # The parent watches the client; branches need not.
        self.run._watching = True
        self._finished = False
        self._timer = None
        if timeout is not None:
            self._timer = parent.runtime.reactor.callLater(timeout, self._timed_out, timeout)

    def start(self) -> None:
        self.run.start()

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        self.run.cancel()
        self.finish(None, GatewayTimeout(f"branch {self.name!r} took longer than {timeout}s"))

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._finished = True
        self.run.cancel()

    def finish(self, value: object, error: PipecometError | None) -> None:
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.parent._branch_done(self.name, value, error)

