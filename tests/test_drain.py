"""
A stopping serving process drains its connections (fake time, fake
transports): ``HTTP11Protocol.drain`` answers what is in hand and closes
after a ``Connection: close`` response, never under an idle connection;
:class:`~pipecomet._supervisor.ConnectionTracker` keeps the open
connections (and lets go of closed ones); ``ServingProcess`` waits for
them to close, at most ``[server] drain_grace`` seconds.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pipecomet import App
from pipecomet._config import Config
from pipecomet._supervisor import ConnectionBalancer, ConnectionTracker, ServingProcess

from .test_http import Server, get, responses


class ProtocolDrainTests(SynchronousTestCase):
    def test_idle_connection_stays_open_and_its_next_answer_closes_it(self) -> None:
        server = Server()
        proto, t = server.connect()
        proto.dataReceived(get(b"/n?n=1"))
        [(_, headers, _)] = responses(t.value())
        self.assertNotIn(b"connection", headers)
        proto.drain()
        # A request may be on its way: the connection is not closed under it.
        self.assertFalse(t.disconnecting)
        proto.dataReceived(get(b"/n?n=2"))
        (_, first, _), (code, second, body) = responses(t.value())
        self.assertEqual((code, json.loads(body)), (200, {"n": "2"}))
        self.assertEqual(second[b"connection"], b"close")
        self.assertTrue(t.disconnecting)

    def test_request_in_flight_is_answered_with_connection_close(self) -> None:
        server = Server()
        proto, t = server.connect()
        proto.dataReceived(get(b"/wait"))
        proto.drain()
        self.assertFalse(t.disconnecting)
        server.waiting[0].callback({"done": True})
        [(code, headers, body)] = responses(t.value())
        self.assertEqual((code, json.loads(body)), (200, {"done": True}))
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(t.disconnecting)

    def test_pipelined_requests_in_hand_are_all_answered(self) -> None:
        server = Server()
        proto, t = server.connect()
        proto.dataReceived(get(b"/wait") + get(b"/n?n=1") + get(b"/n?n=2"))
        proto.drain()
        server.waiting[0].callback({"first": True})
        got = responses(t.value())
        self.assertEqual([json.loads(b) for _, _, b in got],
                         [{"first": True}, {"n": "1"}, {"n": "2"}])
        self.assertEqual([h.get(b"connection") for _, h, _ in got], [None, None, b"close"])
        self.assertTrue(t.disconnecting)

    def test_without_drain_the_connection_is_kept(self) -> None:
        server = Server()
        proto, t = server.connect()
        proto.dataReceived(get(b"/n?n=1") + get(b"/n?n=2"))
        self.assertEqual([h.get(b"connection") for _, h, _ in responses(t.value())],
                         [None, None])
        self.assertFalse(t.disconnecting)


class Conn(Protocol):
    def __init__(self) -> None:
        self.drained = 0

    def drain(self) -> None:
        self.drained += 1


class NoDrain(Protocol):
    pass


class FakeSite:
    def __init__(self, make: Any = Conn) -> None:
        self.make = make
        self.started = self.stopped = 0

    def buildProtocol(self, addr: Any) -> Protocol | None:
        return self.make()

    def doStart(self) -> None:
        self.started += 1

    def doStop(self) -> None:
        self.stopped += 1


def connect(tracker: ConnectionTracker) -> tuple[Any, StringTransport]:
    p = tracker.buildProtocol(None)
    assert p is not None
    t = StringTransport()
    p.makeConnection(t)
    return p, t


def lose(t: StringTransport) -> None:
    t.disconnected = True  # as a FileDescriptor says it once closed


class TrackerTests(SynchronousTestCase):
    def test_forwards_to_the_site(self) -> None:
        site = FakeSite()
        tracker = ConnectionTracker(site)
        tracker.doStart()
        tracker.doStop()
        self.assertEqual((site.started, site.stopped), (1, 1))

    def test_drains_the_open_connections_only(self) -> None:
        tracker = ConnectionTracker(FakeSite())
        (a, _), (b, tb) = connect(tracker), connect(tracker)
        lose(tb)
        self.assertEqual(tracker.open_connections(), [a])
        tracker.drain()
        self.assertEqual((a.drained, b.drained), (1, 0))

    def test_connections_that_cannot_drain_are_kept_open(self) -> None:
        tracker = ConnectionTracker(FakeSite(NoDrain))
        p, _ = connect(tracker)
        tracker.drain()  # twisted.web's HTTPChannel has no drain: nothing happens
        self.assertEqual(tracker.open_connections(), [p])

    def test_closed_connections_are_let_go_of(self) -> None:
        tracker = ConnectionTracker(FakeSite())
        kept = connect(tracker)[0]
        for _ in range(5000):
            lose(connect(tracker)[1])
        # Pruned as the list doubles: never more than the threshold held.
        self.assertLessEqual(len(tracker._connections), 1024)
        self.assertEqual(tracker.open_connections(), [kept])


class ServingProcessDrainTests(SynchronousTestCase):
    def serving(self, grace: float) -> tuple[ServingProcess, ConnectionTracker, Clock]:
        clock = Clock()
        app = App(reactor=clock)
        app.configure(Config.from_dict({"server": {"drain_grace": grace}}))
        sp = ServingProcess(clock, app, {})  # type: ignore[arg-type]
        tracker = sp.connections = ConnectionTracker(FakeSite())
        return sp, tracker, clock

    def test_waits_until_every_connection_has_closed(self) -> None:
        sp, tracker, clock = self.serving(5.0)
        (a, ta), (b, tb) = connect(tracker), connect(tracker)
        done = sp._drain()
        self.assertEqual((a.drained, b.drained), (1, 1))
        clock.advance(1)
        lose(ta)
        clock.advance(1)
        self.assertNoResult(done)
        lose(tb)
        clock.advance(0.05)
        self.successResultOf(done)
        self.assertLess(clock.seconds(), 5.0)

    def test_waits_no_longer_than_the_grace(self) -> None:
        sp, tracker, clock = self.serving(1.5)
        connect(tracker)  # a client that never sends again
        done = sp._drain()
        clock.advance(1.4)
        self.assertNoResult(done)
        clock.advance(0.2)
        self.successResultOf(done)

    def test_nothing_open_stops_at_once(self) -> None:
        sp, _, _ = self.serving(5.0)
        self.successResultOf(sp._drain())


class Control:
    """
    What a ConnectionBalancer asks of ChildControl: report its count, know
    the others'.
    """

    def __init__(self) -> None:
        self.reported: list[int] = []
        self.conns_elsewhere: dict[str, int] = {}

    def report_conns(self, conns: int) -> None:
        self.reported.append(conns)


class Hub:
    connections = 0


class ConnectionBalancerTests(SynchronousTestCase):
    def setup(self, n: int) -> tuple[ConnectionBalancer, list[Any], Control, Clock]:
        clock, control = Clock(), Control()
        tracker = ConnectionTracker(FakeSite())
        conns = [connect(tracker) for _ in range(n)]
        b = ConnectionBalancer(clock, tracker, None, control)  # type: ignore[arg-type]
        b.start()
        return b, conns, control, clock

    def test_a_burst_on_one_process_is_moved_by_draining_half_the_excess(self) -> None:
        b, conns, control, clock = self.setup(32)
        clock.advance(b.interval)
        self.assertEqual(control.reported, [32])
        self.assertEqual(sum(p.drained for p, _ in conns), 0)  # the others not known yet
        control.conns_elsewhere = {"1": 0}
        clock.advance(b.interval)
        # mean 16, excess 16: half of it told to close after its next answer
        self.assertEqual(sum(p.drained for p, _ in conns), 8)
        # Those close; their clients come back to the other process.
        for p, t in conns:
            if p.drained:
                lose(t)
        control.conns_elsewhere = {"1": 8}
        clock.advance(b.interval)
        self.assertEqual(control.reported[-1], 24)
        self.assertEqual(sum(p.drained for p, _ in conns), 8 + 4)  # mean 16, 24 held: 4 more
        self.assertEqual(b.moved, 12)

    def test_a_fair_share_is_left_alone(self) -> None:
        b, conns, control, clock = self.setup(18)
        control.conns_elsewhere = {"1": 14}
        clock.advance(b.interval * 4)
        self.assertEqual(sum(p.drained for p, _ in conns), 0)

    def test_held_comet_streams_are_not_counted(self) -> None:
        b, conns, control, clock = self.setup(30)
        hub = Hub()
        hub.connections = 28
        b.hub = hub  # type: ignore[assignment]
        control.conns_elsewhere = {"1": 2}
        clock.advance(b.interval)
        self.assertEqual(control.reported, [2])
        self.assertEqual(sum(p.drained for p, _ in conns), 0)

    def test_stop(self) -> None:
        b, conns, control, clock = self.setup(32)
        control.conns_elsewhere = {"1": 0}
        b.stop()
        clock.advance(b.interval * 4)
        self.assertEqual((control.reported, sum(p.drained for p, _ in conns)), ([], 0))
