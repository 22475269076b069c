"""
Unit tests of pipecomet's HTTP/1.1 protocol over memory transports and a
fake clock: pipelining in order with bounded buffering, flow control both
ways, the close paths on TCP and TLS, timers, comet frames.
"""

from __future__ import annotations

import gc
import json

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pipecomet import App, Pipe
from pipecomet._config import Config
from pipecomet._http import HTTP11Protocol, Phase, Site


def responses(raw: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get(b"content-length", b"0"))
        body, raw = raw[:n], raw[n:]
        out.append((status, headers, body))
    return out


def get(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n\r\n"


class Server:
    def __init__(self, **limits) -> None:
        self.clock = Clock()
        self.app = App(reactor=self.clock)
        self.waiting: list[Deferred] = []

        def wait(inp, ctx, res):
            d = Deferred()
            self.waiting.append(d)
            return d

        self.app.route("/wait", [Pipe(wait)])
        self.app.route("/n", [Pipe(lambda i, c, r: {"n": i.query.get("n")}, name="n")])
        self.app.route("/cookie", [Pipe(lambda i, c, r: {
            "c": (i.request.getCookie(b"c") or b"").decode()}, name="cookie")])
        self.app.configure(Config.from_dict({"limits": limits, "server": {"idle_timeout": 5}}))
        self.site = self.app.site()

    def connect(self, transport=None):
        proto = self.site.buildProtocol(None)
        transport = transport or StringTransport()
        proto.makeConnection(transport)
        return proto, transport


class PipeliningTests(SynchronousTestCase):
    def test_site_and_protocol(self):
        server = Server()
        self.assertIsInstance(server.site, Site)
        self.assertIsInstance(server.connect()[0], HTTP11Protocol)

    def test_cookies_are_parsed_when_sent(self):
        # parseCookies runs only for a request with a Cookie header (any case).
        server = Server()
        proto, t = server.connect()
        proto.dataReceived(b"GET /cookie HTTP/1.1\r\nHost: t\r\ncOOkie: a=1; c=v\r\n\r\n"
                           + get(b"/cookie"))
        got = [json.loads(body) for _, _, body in responses(t.value())]
        self.assertEqual(got, [{"c": "v"}, {"c": ""}])

    def test_answers_in_request_order(self):
        server = Server()
        proto, t = server.connect()
        proto.dataReceived(get(b"/wait") + get(b"/n?n=1") + get(b"/n?n=2"))
        self.assertEqual(t.value(), b"")  # nothing overtakes the first answer
        server.waiting[0].callback({"first": True})
        got = [json.loads(body) for _, _, body in responses(t.value())]
        self.assertEqual(got, [{"first": True}, {"n": "1"}, {"n": "2"}])
        self.assertFalse(t.disconnecting)

    def test_queue_is_bounded(self):
        server = Server(max_pipelined=4)
        proto, t = server.connect()
        proto.dataReceived(get(b"/wait") + get(b"/n?n=x") * 3)
        self.assertEqual(t.producerState, "producing")
        proto.dataReceived(get(b"/n?n=x") * 5)
        self.assertEqual(t.producerState, "paused")
        server.waiting[0].callback(1)
        self.assertEqual(t.producerState, "producing")
        self.assertEqual(len(responses(t.value())), 9)

    def test_queued_body_bytes_are_bounded(self):
        server = Server(max_pipelined_bytes=100)
        proto, t = server.connect()
        body = b"x" * 60
        post = (b"POST /n HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: 60\r\n\r\n" + body)
        proto.dataReceived(get(b"/wait") + post)
        self.assertEqual(t.producerState, "producing")
        proto.dataReceived(post)
        self.assertEqual(t.producerState, "paused")
        server.waiting[0].callback(1)
        self.assertEqual(t.producerState, "producing")

    def test_stray_crlf_arms_no_timer(self):
        server = Server(header_timeout=2)
        proto, t = server.connect()
        proto.dataReceived(get(b"/n?n=1"))
        answered = t.value()
        proto.dataReceived(b"\r\n")
        server.clock.advance(3)
        self.assertEqual(t.value(), answered)
        self.assertFalse(t.disconnecting)
        proto.dataReceived(get(b"/n?n=2"))
        self.assertEqual(json.loads(responses(t.value())[-1][2]), {"n": "2"})

    def test_header_timeout_after_partial_head(self):
        server = Server(header_timeout=2)
        proto, t = server.connect()
        proto.dataReceived(b"GET /n HTTP/1.1\r\nHo")
        server.clock.advance(2.1)
        status, headers, body = responses(t.value())[0]
        self.assertEqual((status, json.loads(body)["error"]["code"]), (408, "header_timeout"))
        self.assertTrue(t.disconnecting)


class FlowControlTests(SynchronousTestCase):
    def test_client_not_reading_pauses_reading_and_the_producer(self):
        server = Server()
        proto, t = server.connect()
        proto.dataReceived(get(b"/wait"))
        request = proto._active.request
        events = []

        class Producer:
            def pauseProducing(self):
                events.append("pause")

            def resumeProducing(self):
                events.append("resume")

            def stopProducing(self):
                events.append("stop")

        request.registerProducer(Producer(), True)
        proto.pauseProducing()  # the transport's buffer is full
        self.assertEqual((t.producerState, events), ("paused", ["pause"]))
        self.assertFalse(request.write_frame(b"x"))
        proto.resumeProducing()
        self.assertEqual((t.producerState, events), ("producing", ["pause", "resume"]))
        self.assertTrue(request.write_frame(b"frame"))
        self.assertTrue(t.value().endswith(b"frame"))
        request.unregisterProducer()

    def test_held_request_is_exempt_from_idle_timeout(self):
        server = Server()
        proto, t = server.connect()
        proto.dataReceived(get(b"/wait"))
        proto._active.request.hold()
        server.clock.advance(60)
        self.assertFalse(t.disconnecting)

    def test_after_a_held_response_the_connection_serves_and_times_out_again(self):
        server = Server()
        proto, t = server.connect()
        proto.dataReceived(get(b"/wait"))
        proto._active.request.hold()
        server.clock.advance(60)
        server.waiting[0].callback("held")
        proto.dataReceived(get(b"/n?n=2"))
        got = [json.loads(b) for _, _, b in responses(t.value())]
        self.assertEqual(got, ["held", {"n": "2"}])
        self.assertFalse(t.disconnecting)
        server.clock.advance(5.1)  # idle again: the idle timeout is back
        self.assertTrue(t.disconnecting)

    def test_idle_connection_closes_silently(self):
        server = Server()
        proto, t = server.connect()
        proto.dataReceived(get(b"/n?n=1"))
        server.clock.advance(5.1)
        self.assertTrue(t.disconnecting)
        self.assertEqual(len(responses(t.value())), 1)


@implementer(ISSLTransport)
class TLSTransport(StringTransport):
    """
    What a TLS transport looks like to the protocol: no half-close.
    """

    half_closed = False

    def loseWriteConnection(self):  # pragma: no cover - must not be called
        self.half_closed = True

    def getPeerCertificate(self):
        return None


class HalfCloseTransport(StringTransport):
    half_closed = False

    def loseWriteConnection(self):
        self.half_closed = True


class EarlyCloseTests(SynchronousTestCase):
    def early(self, transport):
        server = Server(max_body_bytes=100, linger=1.0)
        proto, t = server.connect(transport)
        proto.dataReceived(b"POST /n HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        status, headers, body = responses(t.value())[0]
        self.assertEqual((status, headers[b"connection"]), (413, b"close"))
        self.assertEqual(proto.phase, Phase.CLOSING)
        self.assertIsNone(t.producer)  # unregistered: a TLS transport closes only then
        return server, t

    def test_tls_closes_with_close_notify_never_half_closes(self):
        server, t = self.early(TLSTransport())
        self.assertTrue(t.disconnecting)
        self.assertFalse(t.half_closed)

    def test_tcp_half_closes_then_lingers(self):
        server, t = self.early(HalfCloseTransport())
        self.assertTrue(t.half_closed)
        self.assertFalse(t.disconnecting)
        server.clock.advance(1.1)
        self.assertTrue(t.disconnecting)  # aborted after linger


class OddRequestTests(SynchronousTestCase):
    def answer(self, data: bytes):
        server = Server()
        proto, t = server.connect()
        proto.dataReceived(data)
        return responses(t.value()), t

    def test_other_http_versions_get_505(self):
        (status, headers, body), = self.answer(b"GET /n HTTP/2.0\r\nHost: t\r\n\r\n")[0]
        self.assertEqual((status, json.loads(body)["error"]["code"]), (505, "bad_version"))

    def test_connect_is_refused_and_closes(self):
        got, t = self.answer(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n" + get(b"/n?n=1"))
        self.assertEqual([(s, json.loads(b)["error"]["code"]) for s, _, b in got],
                         [(405, "method_not_allowed")])
        self.assertTrue(t.disconnecting)

    def test_upgrade_is_served_as_a_plain_request(self):
        got, t = self.answer(b"GET /n?n=1 HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\n\r\n" + get(b"/n?n=2"))
        self.assertEqual([json.loads(b)["n"] for _, _, b in got], ["1", "2"])

    def test_pull_producer_is_handed_to_the_transport(self):
        server = Server()
        proto, t = server.connect()
        proto.dataReceived(get(b"/wait"))
        request = proto._active.request

        class Pull:
            def resumeProducing(self):
                pass

            def stopProducing(self):
                pass

        pull = Pull()
        request.registerProducer(pull, False)
        self.assertEqual((t.producer, t.streaming), (pull, False))
        request.unregisterProducer()
        self.assertEqual((t.producer, t.streaming), (proto, True))


class CountingTransport(StringTransport):
    writes = 0

    def write(self, data):
        self.writes += 1
        super().write(data)


def cyclic_garbage(serve) -> list[str]:
    """
    The type names of the objects ``serve()`` leaves for the cyclic GC
    (found with ``gc.DEBUG_SAVEALL``); the collector is off meanwhile.
    """
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        serve()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return sorted({type(o).__name__ for o in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was:
            gc.enable()


class CycleTests(SynchronousTestCase):
    """
    A served request is freed by reference counting: nothing of it is
    left to the cyclic GC (which, under load, promotes such objects to
    older generations and makes full collections longer).
    """

    def test_chain_get_leaves_no_cycle(self):
        server = Server()
        proto, t = server.connect()
        proto.dataReceived(get(b"/n?n=0"))  # first-use caches

        def serve():
            for i in range(20):
                proto.dataReceived(get(b"/n?n=%d" % i))
            self.assertEqual(t.value().count(b"HTTP/1.1 200"), 21)

        self.assertEqual(cyclic_garbage(serve), [])

    def test_lazy_post_leaves_no_cycle(self):
        server = Server()
        server.app.route("/form", [Pipe(lambda i, c, r: i.form(), name="form")],
                         methods=("POST",))
        server.site = server.app.site()
        proto, t = server.connect()
        post = (b"POST /form HTTP/1.1\r\nHost: t\r\nContent-Type: "
                b"application/x-www-form-urlencoded\r\nContent-Length: 7\r\n\r\na=1&b=2")
        proto.dataReceived(post)

        def serve():
            for _ in range(20):
                proto.dataReceived(post)
            self.assertEqual(t.value().count(b"HTTP/1.1 200"), 21)

        self.assertEqual(cyclic_garbage(serve), [])


class WriteTests(SynchronousTestCase):
    def test_head_and_body_leave_in_one_write(self):
        server = Server()
        proto, t = server.connect(CountingTransport())
        proto.dataReceived(get(b"/n?n=1"))
        self.assertEqual(t.writes, 1)
        self.assertEqual(json.loads(responses(t.value())[0][2]), {"n": "1"})

    def test_head_response_head_is_flushed_at_the_end(self):
        server = Server()
        proto, t = server.connect(CountingTransport())
        proto.dataReceived(b"HEAD /n?n=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertEqual(t.writes, 1)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(t.value().endswith(b"\r\n\r\n"))


class CometTests(SynchronousTestCase):
    def serve(self):
        from pipecomet._events import Condition

        clock = Clock()
        app = App(reactor=clock)
        app.route("/comet/<topic>", [Condition(lambda i, c, r: [i.path_params["topic"]],
                                               mode="many")],
                  responders=("sse", "json", "ndjson", "longpoll"))
        app.configure(Config.from_dict({"comet": {"publish_token": "t"}}))
        app.service.startService()
        self.addCleanup(app.service.stopService)
        site = app.site()
        proto = site.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        proto.dataReceived(b"GET /comet/news HTTP/1.1\r\nHost: t\r\n"
                           b"Accept: text/event-stream\r\n\r\n")
        hub = app.runtime.comet
        return proto, t, hub

    def test_frames_queue_while_blocked_and_drain_on_resume(self):
        proto, t, hub = self.serve()
        self.assertIn(b"text/event-stream", t.value())
        hub.publish("news", {"n": 1})
        self.assertIn(b'{"n":1}', t.value())
        proto.pauseProducing()  # the client stopped reading
        hub.publish("news", {"n": 2})
        self.assertNotIn(b'{"n":2}', t.value())
        sub = next(iter(hub._streams))
        self.assertEqual(proto._active.request.producer, sub.flow)
        proto.resumeProducing()
        self.assertIn(b'{"n":2}', t.value())

    def test_client_gone_while_blocked(self):
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        proto, t, hub = self.serve()
        proto.pauseProducing()
        hub.publish("news", {"n": 1})
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(hub.connections, 0)


class TwistedChannelTests(SynchronousTestCase):
    """
    ``[server] protocol = "twisted"``: a plain twisted.web Site, and comet
    still streams through its channel.
    """

    def test_plain_site_and_comet_stream(self):
        from twisted.web.server import Site as TwistedSite

        from pipecomet._events import Condition
        from pipecomet.testing import MemoryClient, make_clock

        clock = make_clock()
        app = App(reactor=clock)
        app.route("/comet/<topic>", [Condition(lambda i, c, r: [i.path_params["topic"]],
                                               mode="many")],
                  responders=("sse", "json"))
        app.configure(Config.from_dict({"server": {"protocol": "twisted"},
                                        "comet": {"publish_token": "t"}}))
        app.service.startService()
        self.addCleanup(app.service.stopService)
        site = app.site()
        self.assertIs(type(site), TwistedSite)
        client = MemoryClient(app, clock)
        call = client.get("/comet/news", headers={"accept": "text/event-stream"})
        app.runtime.comet.publish("news", {"n": 1})
        client.flush()
        self.assertEqual(call.status, 200)
        self.assertEqual(json.loads(call.events()[-1]["data"]), {"n": 1})
