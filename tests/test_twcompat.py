"""
Pins the Twisted details :mod:`pipecomet._twcompat` depends on, so that a
Twisted release that changes them fails here first.  (pytest style: the
TCP test runs on pytest-twisted's reactor over 127.0.0.1.)
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.tcp import Client, Server
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import http

from pipecomet._twcompat import request_gone, send_now, transport_pending


class _Keep(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.made.callback(self)


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.got: defer.Deferred | None = None
        self.want = 0

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.got is not None and len(self.data) >= self.want:
            d, self.got = self.got, None
            d.callback(self.data)

    def wait(self, n: int) -> defer.Deferred:
        self.want = n
        self.got = defer.Deferred()
        d = self.got
        if len(self.data) >= n:
            self.got = None
            d.callback(self.data)
        return d.addTimeout(20, reactor)


@pytest_twisted.inlineCallbacks
def test_tcp_server_buffer_state():
    factory = protocol.ServerFactory.forProtocol(_Keep)
    factory.made = defer.Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = None
    try:
        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), _Collect())
        server = yield factory.made.addTimeout(20, reactor)
        transport = server.transport
        assert type(transport) is Server
        # An idle connection: the direct send takes everything at once.
        assert transport_pending(transport) == 0
        assert send_now(transport, b"abc") == 3
        # Twisted's write buffers until the reactor turns; while it holds
        # bytes, a direct send would overtake them: refused.
        transport.write(b"defg")
        assert transport_pending(transport) == 4
        assert send_now(transport, b"h") == 0
        data = yield client.wait(7)
        assert data == b"abcdefg"
        assert transport_pending(transport) == 0
        transport.loseConnection()
        assert send_now(transport, b"x") == 0
    finally:
        if client is not None:
            client.transport.loseConnection()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_tcp_client_buffer_state():
    # The backend client sends its requests the same way.
    factory = protocol.ServerFactory.forProtocol(_Collect)
    made: list[_Collect] = []
    factory.buildProtocol = lambda addr: made.append(_Collect()) or made[-1]  # type: ignore[method-assign]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = None
    try:
        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), protocol.Protocol())
        transport = client.transport
        assert type(transport) is Client
        assert transport_pending(transport) == 0
        assert send_now(transport, b"abc") == 3
        transport.write(b"defg")
        assert transport_pending(transport) == 4
        assert send_now(transport, b"h") == 0
        for _ in range(2000):
            if made:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        data = yield made[0].wait(7)
        assert data == b"abcdefg"
        transport.loseConnection()
        assert send_now(transport, b"x") == 0
    finally:
        yield port.stopListening()


def test_other_transports_are_left_to_write():
    t = StringTransport()
    assert send_now(t, b"abc") == 0
    assert transport_pending(t) == 0
    assert t.value() == b""


def test_plain_twisted_request_gone():
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    request = http.Request(channel)
    assert not request_gone(request)
    request.connectionLost(Failure(ConnectionDone()))
    assert request_gone(request)


def test_finished_request_gone():
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    request = channel.requests[0]
    assert not request_gone(request)
    request.finish()
    assert request_gone(request)
