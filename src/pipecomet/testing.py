"""
Test helpers for pipecomet apps, for trial and pytest alike.

:class:`MemoryClient` drives an app's real ``Site`` and resources in memory
(a real ``Agent`` joined to the site by ``twisted.test.iosim``, as treq's
``RequestTraversalAgent``) on a fake clock, so a test is synchronous: make
a call, move the clock, read what the client has received so far::

    app = make_app()                       # built with reactor=client.clock
    client = MemoryClient(app)
    call = client.get("/api/search?q=x", headers={"accept": "application/x-ndjson"})
    client.advance(0.1)
    assert call.lines()[0]["name"] == "main"

No socket, thread or real time is involved; put those in integration tests.

Test doubles for the parts: :class:`SynchronousThreadPool` runs a quota
pool's jobs at once on the calling thread (``QuotaPool(config, clock,
threadpool=SynchronousThreadPool())``).
"""

from __future__ import annotations

import json
from typing import IO, TYPE_CHECKING, Callable, Mapping, TypedDict, Unpack

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import URI, Agent
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from ._sse import parse_events

if TYPE_CHECKING:
    from ._app import App
    from ._json import JSON

#: A request body: bytes, text (sent as UTF-8) or a file read whole.
Body = bytes | str | IO[bytes]
#: Form fields, sent urlencoded.
Form = dict[str, str] | list[tuple[str, str]]
#: A job a SynchronousThreadPool holds: function, arguments, callback.
_Job = tuple[Callable[..., object], tuple[object, ...], dict[str, object],
             "Callable[[bool, object], object] | None"]

__all__ = ["MemoryClient", "Call", "make_clock", "SynchronousThreadPool"]


def make_clock() -> Clock:
    """
    A fake clock that starts at a realistic epoch (some code formats dates).
    """
    clock = Clock()
    clock.advance(1_700_000_000)
    return clock


class Call:
    """
    One request made by a :class:`MemoryClient`, and what came back so far.
    """

    def __init__(self) -> None:
        self.response: IResponse | None = None
        self.chunks: list[bytes] = []
        self.done = False
        self.failure: Failure | None = None
        self._connection: iosim.FakeTransport | None = None

    @property
    def started(self) -> bool:
        return self.response is not None

    def _need(self) -> IResponse:
        if self.failure is not None:
            self.failure.raiseException()
        if self.response is None:
            raise AssertionError("no response yet (advance the clock?)")
        return self.response

    @property
    def status(self) -> int:
        return self._need().code

    def header(self, name: str) -> str | None:
        values = self._need().headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def body(self) -> bytes:
        """
        Everything received so far.
        """
        self._need()
        return b"".join(self.chunks)

    def json(self) -> JSON:
        if not self.done:
            raise AssertionError("the response is not complete yet")
        return json.loads(self.body)

    def lines(self) -> list[JSON]:
        """
        The complete NDJSON lines received so far, decoded.
        """
        body = self.body
        complete = body[: body.rfind(b"\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def events(self) -> list[dict[str, str]]:
        """
        The complete Server-Sent Events received so far, as field dicts
        (``data`` lines joined with newlines); comment-only blocks (comet
        heartbeats) are left out.  A comet stream's first event is
        ``open`` (``id`` is the cursor to resume from, ``data`` says
        how the stream resumed).
        """
        return parse_events(self.body)


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body handed over at once (treq's default producer would
    cooperate on the global reactor).
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _body_bytes(data: Body) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if not isinstance(data, bytes):
        return data.read()  # a file
    return data


def _body_producer(data: Body) -> IBodyProducer:
    return _BytesProducer(_body_bytes(data))


@implementer(IAgentEndpointFactory)
class _MemoryEndpoints:
    """
    Plain TCP endpoints on a memory reactor: a connection attempt is only
    recorded (``MemoryReactor.tcpClients``) for :class:`MemoryClient` to
    wire up.
    """

    def __init__(self, reactor: MemoryReactorClock) -> None:
        self._reactor = reactor

    def endpointForURI(self, uri: URI) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(self._reactor, uri.host, uri.port)


class _RequestOptions(TypedDict, total=False):
    headers: Mapping[str, str] | None
    data: Body | Form | None
    json_body: object


class MemoryClient:
    """
    An in-memory HTTP client for an :class:`~pipecomet.App`.

    Built as treq's ``RequestTraversalAgent`` is, on public APIs only: a
    real :class:`~twisted.web.client.Agent` connects on a
    :class:`~twisted.internet.testing.MemoryReactorClock`, and each
    connection it asks for is joined to a protocol of the app's own
    ``Site`` (its request class, limits and clock) by
    :func:`twisted.test.iosim.connect`.

    :param app: the app; give it ``reactor=client.clock`` (or pass ``clock``
        that the app was made with) so its timers follow :meth:`advance`.
    :param clock: the fake clock; ``app.runtime.reactor`` when it is a Clock.
    """

    def __init__(self, app: App, clock: Clock | None = None) -> None:
        from treq.client import HTTPClient

        if clock is None:
            rt = app.runtime.reactor
            clock = rt if isinstance(rt, Clock) else make_clock()
        self.clock = clock
        self.app = app
        self.site = app.site()
        self._network = MemoryReactorClock()
        agent = Agent.usingEndpointFactory(self._network, _MemoryEndpoints(self._network))
        self._http = HTTPClient(agent, data_to_body_producer=_body_producer)
        self._pumps: list[iosim.IOPump] = []

    def _connect(self) -> iosim.FakeTransport | None:
        """
        Join the connection the agent just asked for to the app's site.
        """
        if not self._network.tcpClients:
            return None
        host, port, factory, _timeout, _bind = self._network.tcpClients.pop()
        server_address = IPv4Address("TCP", "127.0.0.1", port)
        client_address = IPv4Address("TCP", "127.0.0.1", 31337)
        server = self.site.buildProtocol(client_address)
        server_io = iosim.FakeTransport(server, isServer=True, hostAddress=server_address,
                                        peerAddress=client_address)
        client = factory.buildProtocol(server_address)
        client_io = iosim.FakeTransport(client, isServer=False, hostAddress=client_address,
                                        peerAddress=server_address)
        self._pumps.append(iosim.connect(server, server_io, client, client_io))
        return client_io

    def request(self, method: str, path: str, *, headers: Mapping[str, str] | None = None,
                data: Body | Form | None = None, json_body: object = None) -> Call:
        """
        Start a request; it runs as far as it can without the clock moving.

        :param data: the body (bytes, text, or a file), or form fields
            (a dict or pairs, sent urlencoded).
        :param json_body: a value sent as a JSON body instead.
        """
        import treq

        call = Call()
        sent_headers: dict[bytes | str, bytes | str] = {k: v for k, v in (headers or {}).items()}
        body: bytes | Form | None = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            sent_headers.setdefault("content-type", "application/json")
        elif isinstance(data, (dict, list)):
            body = data
        elif data is not None:
            body = _body_bytes(data)
        d = self._http.request(method, "http://pipecomet.test" + path, headers=sent_headers,
                               data=body)
        call._connection = self._connect()

        def got(response: IResponse) -> Deferred[None]:
            call.response = response
            return treq.collect(response, call.chunks.append)

        def finished(_: object) -> None:
            call.done = True

        def failed(f: Failure) -> None:
            call.failure = f
            call.done = True

        d.addCallback(got).addCallbacks(finished, failed)
        self.flush()
        return call

    def get(self, path: str, **kw: Unpack[_RequestOptions]) -> Call:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Unpack[_RequestOptions]) -> Call:
        return self.request("POST", path, **kw)

    def flush(self) -> None:
        """
        Deliver every byte that is ready, both ways.
        """
        pumps, self._pumps = self._pumps, []
        for pump in pumps:
            pump.flush()
            if not (pump.clientIO.disconnected and pump.serverIO.disconnected):
                self._pumps.append(pump)

    def advance(self, seconds: float) -> None:
        """
        Move the fake clock, then deliver what that produced.
        """
        self.clock.advance(seconds)
        self.flush()

    def disconnect(self, call: Call) -> None:
        """
        Drop the connection of ``call`` as a client going away would.
        """
        if call._connection is None:
            raise AssertionError("this call has no connection to drop")
        call._connection.loseConnection()
        self.flush()


class SynchronousThreadPool:
    """
    A stand-in for :class:`~twisted.python.threadpool.ThreadPool` in unit
    tests: no thread at all.  With ``immediate=True`` a job runs the moment
    it is handed over (buildbot's ``NonThreadPool``); otherwise it waits in
    :attr:`running` until the test calls :meth:`finish`, so tests decide
    when each "thread" returns.
    """

    def __init__(self, immediate: bool = False) -> None:
        self.immediate = immediate
        self.running: list[_Job] = []
        self.started = False
        self.joined = False

    def start(self) -> None:
        self.started = True
        self.joined = False

    def stop(self) -> None:
        self.started = False
        self.joined = True

    def callInThreadWithCallback(self, onResult: Callable[[bool, object], object] | None,
                                 func: Callable[..., object], *args: object,
                                 **kw: object) -> None:
        entry = (func, args, kw, onResult)
        if self.immediate:
            self._run(entry)
            return
        self.running.append(entry)

    def finish(self, index: int = 0) -> None:
        """
        Run the ``index``-th held job now and deliver its result.
        """
        self._run(self.running.pop(index))

    def finish_all(self) -> None:
        while self.running:
            self.finish(0)

    @staticmethod
    def _run(entry: _Job) -> None:
        func, args, kw, onResult = entry
        try:
            result, ok = func(*args, **kw), True
        except BaseException:
            result, ok = Failure(), False
        if onResult is not None:
            onResult(ok, result)
