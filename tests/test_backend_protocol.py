"""
Unit tests of the backend client's HTTP/1.1 connection on a StringTransport:
framing (Content-Length, chunked, HEAD, 204, until close, 1xx), keep-alive,
protocol errors and what a listener is told.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import UNKNOWN_LENGTH

from pipecomet._backend._protocol import ClientConnection, build_head


class Owner:
    def __init__(self) -> None:
        self.lost: list[Any] = []

    def connection_lost(self, conn: Any) -> None:
        self.lost.append(conn)


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.body = b""

    def response_started(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.events.append(("started", status, dict(headers)))

    def body_data(self, data: bytes) -> None:
        self.body += data

    def response_done(self, keep_alive: bool) -> None:
        self.events.append(("done", keep_alive))

    def failed(self, error: Any) -> None:
        self.events.append(("failed", error.reason, error.answered, error.reused))


def connect() -> tuple[ClientConnection, StringTransport, Owner]:
    owner = Owner()
    conn = ClientConnection(owner, 0.0)
    transport = StringTransport()
    conn.makeConnection(transport)
    return conn, transport, owner


HEAD_GET = build_head(b"GET", b"/x", b"h:1", [], None)


class ClientConnectionTests(SynchronousTestCase):
    def test_request_head_is_well_formed(self) -> None:
        head = build_head(b"POST", b"/a?b=1", b"h:80", [(b"X-A", b"1")], 3)
        self.assertEqual(head, b"POST /a?b=1 HTTP/1.1\r\nHost: h:80\r\nX-A: 1\r\n"
                               b"Content-Length: 3\r\n\r\n")
        self.assertRaises(ValueError, build_head, b"GET", b"/", b"h", [(b"X", b"a\r\nB: c")], None)

    def test_content_length_response_keeps_the_connection(self) -> None:
        conn, transport, _ = connect()
        listener = Listener()
        conn.send(listener, HEAD_GET, b"")
        self.assertEqual(transport.value(), HEAD_GET)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Y: z\r\n\r\nhel")
        self.assertEqual(listener.events, [("started", 200, {b"content-length": b"5", b"x-y": b"z"})])
        conn.dataReceived(b"lo")
        self.assertEqual(listener.body, b"hello")
        self.assertEqual(listener.events[-1], ("done", True))
        self.assertFalse(transport.disconnecting)
        # And again on the same connection.
        second = Listener()
        conn.send(second, HEAD_GET)
        conn.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(second.events[-1], ("done", True))
        self.assertEqual(conn.calls, 2)

    def test_chunked_response_in_pieces(self) -> None:
        conn, transport, _ = connect()
        listener = Listener()
        conn.send(listener, HEAD_GET)
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        for i in range(len(data)):
            conn.dataReceived(data[i:i + 1])
        self.assertEqual(listener.body, b"hello world")
        self.assertEqual(listener.events[-1], ("done", True))

    def test_head_response_ends_at_its_headers(self) -> None:
        conn, transport, _ = connect()
        listener = Listener()
        conn.send(listener, build_head(b"HEAD", b"/", b"h", [], None), is_head=True)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        self.assertEqual(listener.events[-1], ("done", True))
        nxt = Listener()
        conn.send(nxt, HEAD_GET)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual((nxt.body, nxt.events[-1]), (b"ok", ("done", True)))

    def test_204_and_304_have_no_body(self) -> None:
        for status in (204, 304):
            conn, transport, _ = connect()
            listener = Listener()
            conn.send(listener, HEAD_GET)
            conn.dataReceived(b"HTTP/1.1 %d X\r\n\r\n" % status)
            self.assertEqual(listener.events[-1], ("done", True))

    def test_interim_100_is_skipped(self) -> None:
        conn, transport, _ = connect()
        listener = Listener()
        conn.send(listener, HEAD_GET)
        conn.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
        self.assertEqual([e[0] for e in listener.events], ["started", "done"])
        self.assertEqual(listener.events[0][1], 200)

    def test_connection_close_is_not_kept(self) -> None:
        conn, transport, _ = connect()
        listener = Listener()
        conn.send(listener, HEAD_GET)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx")
        self.assertEqual(listener.events[-1], ("done", False))
        self.assertTrue(conn.closed)

    def test_http10_is_not_kept(self) -> None:
        conn, transport, _ = connect()
        listener = Listener()
        conn.send(listener, HEAD_GET)
        conn.dataReceived(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx")
        self.assertEqual(listener.events[-1], ("done", False))

    def test_body_until_close(self) -> None:
        conn, transport, owner = connect()
        listener = Listener()
        conn.send(listener, HEAD_GET)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome ")
        conn.dataReceived(b"bytes")
        self.assertEqual([e[0] for e in listener.events], ["started"])
        conn.connectionLost(None)
        self.assertEqual(listener.body, b"some bytes")
        self.assertEqual(listener.events[-1], ("done", False))
        self.assertEqual(owner.lost, [conn])

    def test_garbage_is_a_protocol_error(self) -> None:
        conn, transport, _ = connect()
        listener = Listener()
        conn.send(listener, HEAD_GET)
        conn.dataReceived(b"SPAM SPAM SPAM\r\n\r\n")
        self.assertEqual(listener.events[0][0], "failed")
        self.assertTrue(listener.events[0][1].startswith("protocol error"))
        self.assertTrue(listener.events[0][2])  # answered: never replayed
        self.assertTrue(conn.closed)

    def test_lost_before_any_answer_on_a_reused_connection(self) -> None:
        conn, transport, _ = connect()
        first = Listener()
        conn.send(first, HEAD_GET)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        second = Listener()
        conn.send(second, HEAD_GET)
        conn.connectionLost(None)
        self.assertEqual(second.events, [("failed", "connection closed without answer", False, True)])

    def test_lost_mid_body_is_answered(self) -> None:
        conn, transport, _ = connect()
        listener = Listener()
        conn.send(listener, HEAD_GET)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        conn.connectionLost(None)
        self.assertEqual(listener.events[-1], ("failed", "connection lost", True, False))

    def test_unsolicited_bytes_close_an_idle_connection(self) -> None:
        conn, transport, _ = connect()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertTrue(conn.closed)

    def test_a_second_response_in_one_read_is_not_kept(self) -> None:
        conn, transport, _ = connect()
        listener = Listener()
        conn.send(listener, HEAD_GET)
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                          b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(listener.events[-1], ("done", False))
        self.assertTrue(conn.closed)

    def test_streamed_body_of_unknown_length_is_chunked(self) -> None:
        conn, transport, _ = connect()

        class Producer:
            length = UNKNOWN_LENGTH

            def startProducing(self, consumer: Any) -> Any:
                consumer.write(b"abc")
                consumer.write(b"de")
                return succeed(None)

        head = build_head(b"POST", b"/", b"h", [], None, chunked=True)
        conn.send(Listener(), head, Producer())
        self.assertEqual(transport.value(), head + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        self.assertIn(b"Transfer-Encoding: chunked", head)

    def test_pause_and_resume_reach_the_transport(self) -> None:
        conn, transport, _ = connect()
        conn.pause()
        self.assertEqual(transport.producerState, "paused")
        conn.resume()
        self.assertEqual(transport.producerState, "producing")
