"""
The Redis bus's own RESP client and connection state on memory transports
and a fake clock: replies parsed across any split, error replies, pub/sub
messages routed apart from replies, every waiting command failed with 503
``bus_unavailable`` when the connection goes, reconnects with backoff, a
server that stops answering declared down, publishes refused at once while
down.  The bus against a real ``redis-server`` is ``test_it_redis_bus``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import SynchronousTestCase

from pipecomet._bus import BusConfig
from pipecomet._errors import ServiceUnavailable
from pipecomet._redis_bus import RedisBus, RedisError, RespProtocol, encode, parse_url


class RespTests(SynchronousTestCase):
    def connect(self, **kw: Any) -> tuple[RespProtocol, StringTransport]:
        p = RespProtocol(**kw)
        t = StringTransport()
        p.makeConnection(t)
        return p, t

    def test_encode(self) -> None:
        self.assertEqual(encode(("SET", "k", 12, b"v\r\n")),
                         b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$3\r\nv\r\n\r\n")

    def test_replies_in_order_across_any_split(self) -> None:
        wire = (b"+OK\r\n:42\r\n$5\r\nhe\r\nl\r\n$-1\r\n*2\r\n$1\r\na\r\n*1\r\n:7\r\n"
                b"-ERR wrong\r\n")
        for size in (1, 2, 3, 7, len(wire)):
            p, t = self.connect()
            ds = [p.command("X") for _ in range(6)]
            for i in range(0, len(wire), size):
                p.dataReceived(wire[i:i + size])
            self.assertEqual([self.successResultOf(d) for d in ds[:5]],
                             [b"OK", 42, b"he\r\nl", None, [b"a", [7]]])
            self.assertIsInstance(self.failureResultOf(ds[5]).value, RedisError)

    def test_pubsub_messages_are_not_replies(self) -> None:
        got: list[Any] = []
        p, t = self.connect(on_message=lambda ch, data: got.append((ch, data)))
        d = p.command("SUBSCRIBE", "c")
        p.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"
                       b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n")
        self.assertEqual(self.successResultOf(d), [b"subscribe", b"c", 1])
        self.assertEqual(got, [(b"c", b"hi")])

    def test_waiting_commands_fail_as_bus_unavailable_when_the_connection_goes(self) -> None:
        lost: list[Any] = []
        p, t = self.connect(on_lost=lost.append)
        d = p.command("GET", "k")
        p.connectionLost(Failure(ConnectionDone()))
        error = self.failureResultOf(d).value
        self.assertIsInstance(error, ServiceUnavailable)
        self.assertEqual(error.code, "bus_unavailable")
        self.assertEqual(len(lost), 1)

    def test_urls(self) -> None:
        self.assertEqual(parse_url("redis://:pw@h:7000/3"), ("tcp", ("h", 7000), 3, "pw"))
        self.assertEqual(parse_url("unix:///run/r.sock?db=2"), ("unix", "/run/r.sock", 2, None))
        self.assertRaises(ValueError, parse_url, "http://h")


def make_bus(**kw: Any) -> tuple[RedisBus, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    config = BusConfig(kind="redis", url="redis://127.0.0.1:6390/0", reconnect_min=0.5,
                       reconnect_max=2.0, command_timeout=3.0, **kw)
    return RedisBus(reactor, config), reactor


class Receiver:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def bus_message(self, *a: Any) -> None:
        self.seen.append(("message", a))

    def bus_down(self, reason: str) -> None:
        self.seen.append(("down", reason))

    def bus_up(self) -> None:
        self.seen.append(("up",))


def complete_connect(bus: RedisBus, reactor: MemoryReactorClock) -> tuple[Any, Any]:
    """
    Let both connections succeed and answer the handshake.
    """
    cmd_t, sub_t = StringTransport(), StringTransport()
    host, port, factory, timeout, _ = reactor.tcpClients[-1]
    cmd = factory.buildProtocol(None)
    cmd.makeConnection(cmd_t)
    host, port, factory, timeout, _ = reactor.tcpClients[-1]
    sub = factory.buildProtocol(None)
    sub.makeConnection(sub_t)
    cmd.dataReceived(b"$40\r\n" + b"a" * 40 + b"\r\n")  # SCRIPT LOAD: the sha
    sub.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$13\r\npipecomet:bus\r\n:1\r\n")
    return cmd, sub


class BusStateTests(SynchronousTestCase):
    def test_refused_connect_retries_with_backoff_and_publish_fails_fast(self) -> None:
        bus, reactor = make_bus()
        r = Receiver()
        bus.add_receiver(r)
        self.assertEqual(r.seen, [("down", "Redis not connected yet")])
        bus.start()
        self.assertEqual(len(reactor.tcpClients), 1)
        f = self.failureResultOf(bus.publish("t", "message", b"1"))
        self.assertEqual((f.value.code, f.value.status), ("bus_unavailable", 503))
        from twisted.internet.error import ConnectionRefusedError

        reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertIn("refused", bus.status()["last_error"].lower())
        reactor.advance(0.5)
        self.assertEqual(len(reactor.tcpClients), 2)
        reactor.tcpClients[1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        reactor.advance(0.5)
        self.assertEqual(len(reactor.tcpClients), 2)  # the delay doubled
        reactor.advance(0.5)
        self.assertEqual(len(reactor.tcpClients), 3)
        bus.stop()

    def test_connected_then_lost_tells_the_receivers_and_reconnects(self) -> None:
        bus, reactor = make_bus()
        r = Receiver()
        bus.add_receiver(r)
        bus.start()
        cmd, sub = complete_connect(bus, reactor)
        self.assertTrue(bus.connected)
        self.assertEqual(r.seen[-1], ("up",))
        d = bus.publish("t", "message", b"1")
        self.assertIn(b"EVALSHA", cmd.transport.value())
        cmd.dataReceived(b"*3\r\n$10\r\nabcd1234:1\r\n:0\r\n:2\r\n")
        done = self.successResultOf(d)
        self.assertEqual((done.id, done.delivered, done.duplicate), ("abcd1234:1", 2, False))
        sub.dataReceived(b"*3\r\n$7\r\nmessage\r\n$13\r\npipecomet:bus\r\n"
                         b"$28\r\nt\nabcd1234:1\nmessage\n5\n{\"a\"}\r\n")
        self.assertEqual(r.seen[-1], ("message", ("t", "message", b'{"a"}', None, "abcd1234:1")))
        sub.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(bus.connected)
        self.assertEqual(r.seen[-1], ("down", "Redis connection lost"))
        reactor.advance(0.5)
        complete_connect(bus, reactor)
        self.assertEqual(r.seen[-1], ("up",))
        self.assertEqual(bus.status()["drops"], 1)
        bus.stop()

    def test_a_server_that_stops_answering_is_declared_down(self) -> None:
        bus, reactor = make_bus()
        r = Receiver()
        bus.add_receiver(r)
        bus.start()
        cmd, sub = complete_connect(bus, reactor)
        d = bus.publish("t", "message", b"1")
        reactor.advance(2.9)
        self.assertFalse(cmd.transport.disconnecting)
        reactor.advance(0.1)  # command_timeout without a reply: the connection is dropped
        self.assertTrue(cmd.transport.disconnecting)
        self.assertIn("no reply within 3.0s", bus.status()["last_error"])
        cmd.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.failureResultOf(d).value.code, "bus_unavailable")
        self.assertEqual(r.seen[-1], ("down", "Redis connection lost"))
        bus.stop()
