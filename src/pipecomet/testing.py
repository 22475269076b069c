"""
Test helpers for pipecomet apps, for trial and pytest alike.

:class:`MemoryClient` drives an app's real ``Site`` and resources in memory
(``treq.testing.StubTreq``) on a fake clock, so a test is synchronous: make
a call, move the clock, read what the client has received so far::

    app = make_app()                       # built with reactor=client.clock
    client = MemoryClient(app)
    call = client.get("/api/search?q=x", headers={"accept": "application/x-ndjson"})
    client.advance(0.1)
    assert call.lines()[0]["name"] == "main"

No socket, thread or real time is involved; put those in integration tests.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from twisted.internet.task import Clock

from ._sse import parse_events

__all__ = ["MemoryClient", "Call", "make_clock"]


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
        self.response: Any = None
        self.chunks: list[bytes] = []
        self.done = False
        self.failure: Any = None
        self._pump: Any = None

    @property
    def started(self) -> bool:
        return self.response is not None

    def _need(self) -> None:
        if self.failure is not None:
            self.failure.raiseException()
        if self.response is None:
            raise AssertionError("no response yet (advance the clock?)")

    @property
    def status(self) -> int:
        self._need()
        return self.response.code

    def header(self, name: str) -> str | None:
        self._need()
        values = self.response.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def body(self) -> bytes:
        """
        Everything received so far.
        """
        self._need()
        return b"".join(self.chunks)

    def json(self) -> Any:
        if not self.done:
            raise AssertionError("the response is not complete yet")
        return json.loads(self.body)

    def lines(self) -> list[Any]:
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


class MemoryClient:
    """
    An in-memory HTTP client for an :class:`~pipecomet.App`.

    :param app: the app; give it ``reactor=client.clock`` (or pass ``clock``
        that the app was made with) so its timers follow :meth:`advance`.
    :param clock: the fake clock; ``app.runtime.reactor`` when it is a Clock.
    """

    def __init__(self, app: Any, clock: Clock | None = None) -> None:
        from treq.testing import StubTreq

        if clock is None:
            rt = app.runtime.reactor
            clock = rt if isinstance(rt, Clock) else make_clock()
        self.clock = clock
        self.app = app
        self._treq = StubTreq(app.resource())
        # Serve through the app's own Site (its request class, timeouts and
        # clock), not the plain one StubTreq makes.
        self._treq._agent._serverFactory = app.site()

    def request(self, method: str, path: str, *, headers: Mapping[str, str] | None = None,
                data: Any = None, json_body: Any = None) -> Call:
        """
        Start a request; it runs as far as it can without the clock moving.
        """
        import treq

        call = Call()
        kwargs: dict[str, Any] = {"headers": dict(headers or {})}
        if json_body is not None:
            kwargs["data"] = json.dumps(json_body).encode()
            kwargs["headers"].setdefault("content-type", "application/json")
        elif data is not None:
            kwargs["data"] = data
        pumps = set(self._treq._agent._pumps)
        d = self._treq.request(method, "http://pipecomet.test" + path, **kwargs)
        new = set(self._treq._agent._pumps) - pumps
        call._pump = new.pop() if new else None

        def got(response: Any) -> Any:
            call.response = response
            return treq.collect(response, call.chunks.append)

        def finished(_: Any) -> None:
            call.done = True

        def failed(f: Any) -> None:
            call.failure = f
            call.done = True

        d.addCallback(got).addCallbacks(finished, failed)
        self.flush()
        return call

    def get(self, path: str, **kw: Any) -> Call:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Call:
        return self.request("POST", path, **kw)

    def flush(self) -> None:
        """
        Deliver every byte that is ready, both ways.
        """
        self._treq.flush()

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
        if call._pump is None:
            raise AssertionError("this call has no connection to drop")
        call._pump.clientIO.loseConnection()
        self.flush()
