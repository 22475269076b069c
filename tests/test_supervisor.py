"""
The ``--processes`` supervisor and accept balancer on a fake clock with a
fake process launcher: restart with backoff, SIGHUP one at a time (the new
one ready before the old one is stopped, the old one kept when the new one
fails), SIGTERM to all, the set every process is sent, and the balancer
pausing the most loaded process.  Real ``twistd --processes 2`` runs are in
``test_it_processes``.
"""

from __future__ import annotations

import json
import signal
import socket
from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.internet.error import ProcessTerminated
from twisted.trial.unittest import SynchronousTestCase

from pipecomet._supervisor import (
    AcceptBalancer,
    ChildControl,
    Supervisor,
    parse_tcp_endpoint,
)
from pipecomet._config import ConfigError


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sent: list[bytes] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.sent.append(data)


class Launcher(Clock):
    """
    A clock that records spawnProcess calls and hands out fake pids.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Any] = []
        self.next_pid = 1000

    def spawnProcess(self, proto: Any, exe: str, args: Any, env: Any = None,
                     childFDs: Any = None) -> Any:
        self.next_pid += 1
        t = FakeTransport(self.next_pid)
        proto.makeConnection(t)
        self.spawned.append((proto, args, childFDs))
        return t


def ready(child: Any) -> None:
    child.childDataReceived(4, json.dumps({"op": "ready"}).encode() + b"\n")


def end(child: Any, code: int = 1) -> None:
    child.processEnded(Failure(ProcessTerminated(exitCode=code)))


def make(count: int = 2) -> tuple[Supervisor, Launcher, list[Any]]:
    reactor = Launcher()
    killed: list[Any] = []
    sup = Supervisor(reactor, count, "tcp:0:interface=127.0.0.1", ["--app", "x:y"],
                     kill=lambda pid, sig: killed.append((pid, sig)))
    sup.install_sighup = False
    sup.socket = socket.socket()
    sup.startService()
    return sup, reactor, killed


class SupervisorTests(SynchronousTestCase):
    def test_children_get_the_socket_and_their_index(self) -> None:
        sup, reactor, _ = make()
        self.addCleanup(sup.socket.close)
        self.assertEqual(len(reactor.spawned), 2)
        for i, (proto, args, fds) in enumerate(reactor.spawned):
            self.assertEqual(fds[3], sup.socket.fileno())
            self.assertEqual(fds[4], "r")
            self.assertEqual(fds[5], "w")
            self.assertIn("--listen-fd", args)
            self.assertEqual(args[args.index("--process-index") + 1], str(i))

    def test_reuseport_children_bind_the_port_the_supervisor_holds(self) -> None:
        reactor = Launcher()
        sup = Supervisor(reactor, 2, "tcp:0:interface=127.0.0.1:backlog=64", ["--app", "x:y"],
                         listen="reuseport", kill=lambda pid, sig: None)
        sup.install_sighup = False
        sup.startService()
        self.addCleanup(lambda: sup.socket and sup.socket.close())
        port = sup.socket.getsockname()[1]
        self.assertNotEqual(port, 0)
        # Held, not listening: the kernel gives a listening socket in the
        # SO_REUSEPORT group its share of connections, and nobody here accepts.
        self.assertEqual(sup.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 0)
        self.assertEqual(sup.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)
        for proto, args, fds in reactor.spawned:
            self.assertNotIn(3, fds)
            self.assertNotIn("--listen-fd", args)
            self.assertIn("--reuseport", args)
            self.assertEqual(args[args.index("--port") + 1],
                             f"tcp:{port}:interface=127.0.0.1:backlog=64")
        self.assertEqual(sup.describe()["listen"], "reuseport")

    def test_unknown_listen_mode_is_refused(self) -> None:
        self.assertRaises(ValueError, Supervisor, Launcher(), 2, "tcp:0", [], listen="fork")

    def test_a_dead_child_is_restarted_with_backoff(self) -> None:
        sup, reactor, _ = make()
        self.addCleanup(sup.socket.close)
        first = sup.children[0]
        ready(first)
        end(first)
        self.assertNotIn(0, sup.children)
        self.assertIn(1, sup.children)  # the other one is untouched
        reactor.advance(0.1)
        second = sup.children[0]
        self.assertIsNot(second, first)
        end(second)  # dies at once again: the delay doubles
        reactor.advance(0.1)
        self.assertNotIn(0, sup.children)
        reactor.advance(0.1)
        self.assertIn(0, sup.children)
        self.assertEqual((sup.restarts, sup.deaths), (2, 2))
        # Having lived long, the next death restarts after the shortest delay again.
        third = sup.children[0]
        reactor.advance(60)
        end(third)
        reactor.advance(0.1)
        self.assertIn(0, sup.children)

    def test_sighup_replaces_one_at_a_time_new_ready_before_old_stops(self) -> None:
        sup, reactor, killed = make()
        self.addCleanup(sup.socket.close)
        old0, old1 = sup.children[0], sup.children[1]
        ready(old0)
        ready(old1)
        d = sup.reload()
        new0 = sup.children[0]
        self.assertIsNot(new0, old0)
        self.assertEqual(killed, [])  # nothing stopped before the new one is ready
        ready(new0)
        self.assertEqual(killed, [(old0.pid, signal.SIGTERM)])
        self.assertIs(sup.children[1], old1)  # the second waits its turn
        end(old0, 0)
        new1 = sup.children[1]
        self.assertIsNot(new1, old1)
        ready(new1)
        self.assertEqual(killed[-1], (old1.pid, signal.SIGTERM))
        end(old1, 0)
        self.successResultOf(d)
        self.assertEqual((sup.reloads, sup.deaths, sup.restarts), (1, 0, 0))

    def test_sighup_keeps_the_old_one_when_the_new_one_fails(self) -> None:
        sup, reactor, killed = make(count=1)
        self.addCleanup(sup.socket.close)
        old = sup.children[0]
        ready(old)
        d = sup.reload()
        end(sup.children[0])  # the new one dies before it is ready
        self.successResultOf(d)
        self.assertIs(sup.children[0], old)
        self.assertEqual(killed, [])
        reactor.advance(10)
        self.assertIs(sup.children[0], old)  # and no stray restart

    def test_sigterm_stops_all_and_kills_the_stubborn(self) -> None:
        sup, reactor, killed = make()
        a, b = sup.children[0], sup.children[1]
        d = sup.stopService()
        self.assertEqual(sorted(killed), sorted([(a.pid, signal.SIGTERM),
                                                 (b.pid, signal.SIGTERM)]))
        end(a, 0)
        self.assertNoResult(d)
        reactor.advance(sup.stop_timeout)
        self.assertIn((b.pid, signal.SIGKILL), killed)
        end(b, -9)
        self.successResultOf(d)
        self.assertIsNone(sup.socket)
        reactor.advance(10)
        self.assertEqual(sup.children, {})  # nothing restarted while stopping

    def test_every_child_is_sent_the_set(self) -> None:
        sup, reactor, _ = make()
        self.addCleanup(sup.socket.close)
        for c in sup.children.values():
            ready(c)
            c.childDataReceived(4, b'{"op": "status", "status": {"comet": {"connections": 3}}}\n')
        reactor.advance(sup.status_interval)
        msg = json.loads(sup.children[1].transport.sent[-1])
        self.assertEqual(msg["op"], "set")
        self.assertEqual([c["status"]["comet"]["connections"] for c in msg["set"]["set"]], [3, 3])
        self.assertEqual(msg["set"]["workers"]["pool"], "per process")

    def test_endpoint_parsing(self) -> None:
        self.assertEqual(parse_tcp_endpoint("tcp:8080:interface=127.0.0.1"),
                         ("127.0.0.1", 8080, 1024))
        self.assertEqual(parse_tcp_endpoint("8080"), ("0.0.0.0", 8080, 1024))
        self.assertRaises(ConfigError, parse_tcp_endpoint, "unix:/tmp/x")
        self.assertEqual(parse_tcp_endpoint("tcp6:80:interface=\\:\\:1:backlog=5"),
                         ("::1", 80, 5))


class FakePort:
    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class FakeHub:
    connections = 0


class BalancerTests(SynchronousTestCase):
    def test_the_most_loaded_process_stops_accepting_until_even(self) -> None:
        clock = Clock()
        control = ChildControl(clock, None, 0, 2, 1)
        sent: list[Any] = []
        control._write = sent.append  # type: ignore[method-assign]
        hub, port = FakeHub(), FakePort()
        b = AcceptBalancer(clock, port, hub, control)
        b.start()
        hub.connections = 50
        clock.advance(b.interval)
        self.assertTrue(port.reading)  # nothing known of the others yet
        self.assertEqual(sent[-1], {"op": "held", "held": 50})
        control.dataReceived(b'{"op": "held", "held": {"0": 50, "1": 10}}\n')
        clock.advance(b.interval)
        self.assertFalse(port.reading)
        control.dataReceived(b'{"op": "held", "held": {"0": 50, "1": 48}}\n')
        clock.advance(b.interval)
        self.assertTrue(port.reading)
        self.assertEqual(b.pauses, 1)
        b.stop()
        self.assertTrue(port.reading)


def said(child: Any) -> list[dict[str, Any]]:
    """
    What the supervisor sent ``child``, as messages.
    """
    return [json.loads(line) for line in child.transport.sent]


def send(child: Any, msg: dict[str, Any]) -> None:
    child.childDataReceived(4, json.dumps(msg).encode() + b"\n")


FAMILY = {"name": "pipecomet_x", "help": "X.", "type": "counter", "unit": "",
          "samples": [["pipecomet_x_total", {"route": "/a"}, 3.0]]}


class MetricsGatheringTests(SynchronousTestCase):
    """
    A scrape of one serving process: the supervisor asks every ready one
    for its families and answers the one asked.
    """

    def setUp(self) -> None:
        self.sup, self.reactor, _ = make(3)
        self.addCleanup(lambda: self.sup.socket and self.sup.socket.close())
        for c in self.sup.children.values():
            ready(c)
        self.c0, self.c1, self.c2 = (self.sup.children[i] for i in range(3))

    def collect_ids(self, child: Any) -> list[int]:
        return [m["id"] for m in said(child) if m["op"] == "collect"]

    def test_every_process_is_asked_and_the_asker_gets_all(self) -> None:
        send(self.c1, {"op": "scrape", "id": 7, "timeout": 2})
        gid = self.collect_ids(self.c0)[-1]
        self.assertEqual([gid], self.collect_ids(self.c1))
        self.assertEqual([gid], self.collect_ids(self.c2))
        for c in (self.c0, self.c1):
            send(c, {"op": "families", "id": gid, "families": [FAMILY]})
        self.assertFalse([m for m in said(self.c1) if m["op"] == "scraped"])
        send(self.c2, {"op": "families", "id": gid, "families": []})
        answer = [m for m in said(self.c1) if m["op"] == "scraped"]
        self.assertEqual(len(answer), 1)
        self.assertEqual(answer[0]["id"], 7)
        self.assertEqual(set(answer[0]["processes"]), {"0", "1", "2"})
        self.assertEqual(answer[0]["up"], {"0": True, "1": True, "2": True})
        self.assertEqual(answer[0]["supervisor"]["processes"], 3)
        # Nobody else was sent the answer; a late reply changes nothing.
        self.assertFalse([m for m in said(self.c0) if m["op"] == "scraped"])
        send(self.c0, {"op": "families", "id": gid, "families": [FAMILY]})
        self.assertEqual(len([m for m in said(self.c1) if m["op"] == "scraped"]), 1)

    def test_a_silent_process_is_left_out_after_the_timeout(self) -> None:
        send(self.c0, {"op": "scrape", "id": 1, "timeout": 0.5})
        gid = self.collect_ids(self.c0)[-1]
        send(self.c0, {"op": "families", "id": gid, "families": [FAMILY]})
        send(self.c2, {"op": "families", "id": gid, "families": [FAMILY]})
        self.reactor.advance(0.49)
        self.assertFalse([m for m in said(self.c0) if m["op"] == "scraped"])
        self.reactor.advance(0.01)
        (answer,) = [m for m in said(self.c0) if m["op"] == "scraped"]
        self.assertEqual(answer["up"], {"0": True, "1": False, "2": True})
        self.assertEqual(set(answer["processes"]), {"0", "2"})
        self.assertFalse(self.sup._gatherings)

    def test_a_process_that_ends_is_not_waited_for(self) -> None:
        send(self.c0, {"op": "scrape", "id": 1, "timeout": 5})
        gid = self.collect_ids(self.c0)[-1]
        send(self.c0, {"op": "families", "id": gid, "families": []})
        send(self.c1, {"op": "families", "id": gid, "families": []})
        end(self.c2)
        (answer,) = [m for m in said(self.c0) if m["op"] == "scraped"]
        self.assertEqual(answer["up"], {"0": True, "1": True, "2": False})


class ChildScrapeTests(SynchronousTestCase):
    """
    The serving process's side: it answers the supervisor's ``collect``
    with its families and gets the whole set back for its scrape.
    """

    def make(self) -> tuple[Clock, ChildControl, list[Any]]:
        clock = Clock()
        control = ChildControl(clock, None, 1, 2, 1)
        sent: list[Any] = []
        control._write = sent.append  # type: ignore[method-assign]
        return clock, control, sent

    def test_collect_is_answered_with_the_families(self) -> None:
        clock, control, sent = self.make()
        control.dataReceived(b'{"op": "collect", "id": 4}\n')
        self.assertEqual(sent, [{"op": "families", "id": 4, "families": []}])
        control.families = lambda: [FAMILY]
        control.dataReceived(b'{"op": "collect", "id": 5}\n')
        self.assertEqual(sent[-1], {"op": "families", "id": 5, "families": [FAMILY]})

    def test_gather_fires_with_the_supervisors_answer(self) -> None:
        clock, control, sent = self.make()
        d = control.gather_metrics(0.5)
        self.assertEqual(sent, [{"op": "scrape", "id": 1, "timeout": 0.5}])
        self.assertNoResult(d)
        control.dataReceived(json.dumps({"op": "scraped", "id": 1,
                                         "processes": {"1": [FAMILY]}, "up": {"1": True},
                                         "supervisor": {"restarts": 2}}).encode() + b"\n")
        got = self.successResultOf(d)
        self.assertEqual(got["processes"], {"1": [FAMILY]})
        self.assertEqual(got["supervisor"], {"restarts": 2})
        self.assertFalse(clock.getDelayedCalls())

    def test_gather_fires_none_when_the_supervisor_is_silent(self) -> None:
        clock, control, sent = self.make()
        d = control.gather_metrics(0.5)
        clock.advance(1.49)
        self.assertNoResult(d)
        clock.advance(0.01)
        self.assertIsNone(self.successResultOf(d))
        # A late answer is ignored.
        control.dataReceived(b'{"op": "scraped", "id": 1, "processes": {}}\n')
