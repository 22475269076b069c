"""
Pins the Twisted details :mod:`pipecomet._twcompat` depends on, so that a
Twisted release that changes them fails here first.
"""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.tcp import Server
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import http

from pipecomet._twcompat import request_gone, send_now, transport_pending


class _Keep(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.made.callback(self)


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.got: defer.Deferred | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.got is not None and len(self.data) >= self.want:
            d, self.got = self.got, None
            d.callback(self.data)

    def wait(self, n: int) -> defer.Deferred:
        self.want = n
        self.got = defer.Deferred()
        if len(self.data) >= n:
            d, self.got = self.got, None
            d.callback(self.data)
        return self.got


class SendNowTests(TestCase):
    """
    Over a real TCP connection on 127.0.0.1 (the global reactor, as trial runs it).
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_tcp_server_buffer_state(self):
        factory = protocol.ServerFactory.forProtocol(_Keep)
        factory.made = defer.Deferred()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), _Collect())
        self.addCleanup(client.transport.loseConnection)
        server = yield factory.made
        transport = server.transport
        self.assertIs(type(transport), Server)
        # An idle connection: the direct send takes everything at once.
        self.assertEqual(transport_pending(transport), 0)
        self.assertEqual(send_now(transport, b"abc"), 3)
        # Twisted's write buffers until the reactor turns; while it holds
        # bytes, a direct send would overtake them: refused.
        transport.write(b"defg")
        self.assertEqual(transport_pending(transport), 4)
        self.assertEqual(send_now(transport, b"h"), 0)
        data = yield client.wait(7)
        self.assertEqual(data, b"abcdefg")
        self.assertEqual(transport_pending(transport), 0)
        transport.loseConnection()
        self.assertEqual(send_now(transport, b"x"), 0)

    def test_other_transports_are_left_to_write(self):
        t = StringTransport()
        self.assertEqual(send_now(t, b"abc"), 0)
        self.assertEqual(transport_pending(t), 0)
        self.assertEqual(t.value(), b"")


class RequestGoneTests(SynchronousTestCase):
    def test_plain_twisted_request(self):
        channel = http.HTTPChannel()
        channel.makeConnection(StringTransport())
        request = http.Request(channel)
        self.assertFalse(request_gone(request))
        request.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(request_gone(request))

    def test_finished_request(self):
        channel = http.HTTPChannel()
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        request = channel.requests[0]
        self.assertFalse(request_gone(request))
        request.finish()
        self.assertTrue(request_gone(request))
