"""
Integration tests over real sockets on 127.0.0.1: partial results read
incrementally by a real HTTP client, and a real TCP client that hangs up
mid-chain cancelling the chain.  Every wait has a generous timeout
(``WAIT``) that fails its test instead of hanging the suite.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from pipecomet import App, Parallel, Pipe

#: Seconds any one wait may take before it fails the test.
WAIT = 30


def listen(app):
    port = reactor.listenTCP(0, app.site(), interface="127.0.0.1")
    return port, port.getHost().port


@pytest_twisted.inlineCallbacks
def test_partial_results_before_slowest_branch():
    """
    The main result and the fast branch reach a real client while the slow
    branch is still pending; the stream ends after the slow one.
    """
    gate = defer.Deferred()
    app = App(reactor=reactor)
    app.route("/p", [
        Pipe(lambda i, c, r: "main-value", name="main_step"),
        Parallel([
            Pipe(lambda i, c, r: "fast-value", name="fast"),
            Pipe(lambda i, c, r: gate, name="slow"),
        ]),
    ])
    port, number = listen(app)
    try:
        response = yield treq.get(f"http://127.0.0.1:{number}/p",
                                  headers={"accept": "application/x-ndjson"},
                                  unbuffered=True).addTimeout(WAIT, reactor)
        assert response.code == 200
        received = []
        two_lines = defer.Deferred()

        def chunk(data):
            received.append(data)
            if b"".join(received).count(b"\n") >= 2 and not two_lines.called:
                two_lines.callback(None)

        finished = treq.collect(response, chunk)
        yield two_lines.addTimeout(WAIT, reactor)
        assert not gate.called
        assert not finished.called
        lines = [json.loads(l) for l in b"".join(received).splitlines()]
        assert {l["name"] for l in lines} == {"main", "fast"}
        gate.callback("slow-value")
        yield finished.addTimeout(WAIT, reactor)
        lines = [json.loads(l) for l in b"".join(received).splitlines()]
        assert lines[-1] == {"name": "slow", "result": "slow-value"}
        assert len(lines) == 3
    finally:
        yield port.stopListening()


class HangUp(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"GET /hold HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")


def configured(app, lazy):
    from pipecomet import Config

    return app.configure(Config.from_dict({"limits": {"lazy": lazy}}))


@pytest.mark.parametrize("lazy", [False, True], ids=["buffered", "lazy"])
@pytest_twisted.inlineCallbacks
def test_client_disconnect_cancels_chain(lazy):
    """
    A real TCP client that closes (FIN) while a pipe waits: the pipe's
    Deferred is cancelled and no later pipe runs — with the plain and the
    lazy-parsing request alike.
    """
    entered = defer.Deferred()
    cancelled = defer.Deferred()
    later_ran = []

    def hold(inp, ctx, res):
        entered.callback(None)
        return defer.Deferred(lambda d: cancelled.callback("cancelled"))

    app = App(reactor=reactor)
    app.route("/hold", [Pipe(hold), Pipe(lambda i, c, r: later_ran.append(1), name="later")])
    configured(app, lazy)
    port, number = listen(app)
    try:
        client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", number, timeout=WAIT),
                                       HangUp())
        yield entered.addTimeout(WAIT, reactor)
        client.transport.loseConnection()
        outcome = yield cancelled.addTimeout(WAIT, reactor)
        assert outcome == "cancelled"
        # Give the reactor a few turns: nothing else may run.
        for _ in range(3):
            yield defer.succeed(None)
            d = defer.Deferred()
            reactor.callLater(0, d.callback, None)
            yield d
        assert later_ran == []
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_error_over_http():
    """
    The JSON error shape over a real connection, with Retry-After.
    """
    from pipecomet import ServiceUnavailable

    def busy(inp, ctx, res):
        raise ServiceUnavailable("try later", code="queue_full", retry_after=2.5)

    app = App(reactor=reactor)
    app.route("/busy", [Pipe(busy)])
    port, number = listen(app)
    try:
        response = yield treq.get(f"http://127.0.0.1:{number}/busy").addTimeout(WAIT, reactor)
        body = yield response.json().addTimeout(WAIT, reactor)
        assert response.code == 503
        assert response.headers.getRawHeaders("retry-after") == ["3"]
        assert body["error"]["code"] == "queue_full"
        assert body["error"]["message"] == "try later"
        assert len(body["error"]["id"]) == 16
    finally:
        yield port.stopListening()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
