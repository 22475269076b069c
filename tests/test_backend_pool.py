"""
Unit tests of one endpoint's connection pool (``EndpointPool``) on a fake
reactor: the bookkeeping a gateway's calls rely on, read through the pool's
own status figures and the connections' transports.  The backend side of
each connection is a ``StringTransport`` the test completes by hand.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pipecomet._backend._config import PoolConfig
from pipecomet._backend._discovery import Endpoint
from pipecomet._backend._errors import BackendBusy, BackendQueueTimeout, ConnectionFailed
from pipecomet._backend._pool import EndpointPool


class Waiter:
    """
    A call as the pool sees it: it gets a connection or a failure.
    """

    service = "users"

    def __init__(self) -> None:
        self.conn: Any = None
        self.error: Exception | None = None

    def got_connection(self, conn: Any) -> None:
        self.conn = conn

    def acquire_failed(self, error: Exception) -> None:
        self.error = error


class Harness:
    def __init__(self, **pool: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = EndpointPool("users", Endpoint("127.0.0.1", 9001), PoolConfig(**pool),
                                 self.reactor, retry_after=7.0)
        self.taken = 0

    def pending(self) -> int:
        return len(self.reactor.tcpClients) - self.taken

    def accept(self) -> StringTransport:
        """
        Complete the oldest connect the pool started.
        """
        factory = self.reactor.tcpClients[self.taken][2]
        self.taken += 1
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return transport

    def lease(self) -> Any:
        """
        A connection for a new call: kept, or freshly made.
        """
        w = Waiter()
        conn = self.pool.acquire(w, 60.0)
        if conn is None:
            self.accept()
            conn = w.conn
        return conn


class LifetimeTests(SynchronousTestCase):
    """
    ``max_lifetime`` counts from when a connection was made, not from the
    reactor's zero.
    """

    def test_a_young_connection_made_late_is_reused(self) -> None:
        h = Harness(max_lifetime=10.0)
        h.reactor.advance(100.0)
        conn = h.lease()
        h.reactor.advance(5.0)
        h.pool.release(conn, reusable=True)
        self.assertEqual(h.pool.status()["idle"], 1)
        self.assertIs(h.pool.acquire(Waiter(), 60.0), conn)
        self.assertEqual((h.pending(), h.pool.status()["busy"]), (0, 1))

    def test_a_stale_kept_connection_is_skipped_for_the_next_one(self) -> None:
        h = Harness(max_lifetime=10.0)
        old = h.lease()
        h.reactor.advance(5.0)
        young = h.lease()
        h.reactor.advance(4.0)
        h.pool.release(young, reusable=True)
        h.pool.release(old, reusable=True)  # last in: tried first
        h.reactor.advance(2.0)  # old is 11 s old, young 6 s
        self.assertIs(h.pool.acquire(Waiter(), 60.0), young)
        self.assertTrue(old.closed)
        self.assertEqual(h.pending(), 0)
        s = h.pool.status()
        self.assertEqual((s["busy"], s["idle"], s["connects"]), (1, 0, 2))


class CountTests(SynchronousTestCase):
    def test_busy_counts_each_lease_once(self) -> None:
        h = Harness()
        a = h.lease()
        b = h.lease()
        self.assertEqual(h.pool.status()["busy"], 2)
        h.pool.release(a, reusable=True)
        h.pool.release(b, reusable=True)
        self.assertEqual(h.pool.status()["busy"], 0)
        h.lease()
        h.lease()
        s = h.pool.status()
        self.assertEqual((s["busy"], s["idle"], s["connects"]), (2, 0, 2))

    def test_a_released_connection_handed_to_a_waiter_stays_counted(self) -> None:
        h = Harness(max_connections=1)
        first = h.lease()
        w = Waiter()
        self.assertIsNone(h.pool.acquire(w, 60.0))
        h.pool.release(first, reusable=True)
        self.assertIs(w.conn, first)
        self.assertEqual(h.pool.status()["busy"], 1)
        other = Waiter()
        self.assertIsNone(h.pool.acquire(other, 60.0))  # still at the cap: it waits
        self.assertEqual((h.pool.status()["waiting"], h.pending()), (1, 0))

    def test_a_connection_handed_on_keeps_the_others_counted(self) -> None:
        h = Harness(max_connections=2)
        a = h.lease()
        h.lease()
        w = Waiter()
        self.assertIsNone(h.pool.acquire(w, 60.0))
        h.pool.release(a, reusable=True)
        self.assertIs(w.conn, a)
        self.assertEqual(h.pool.status()["busy"], 2)

    def test_rejections_are_counted_one_by_one(self) -> None:
        h = Harness(max_connections=1, queue=0)
        h.lease()
        for n in (1, 2):
            with self.assertRaises(BackendBusy) as e:
                h.pool.acquire(Waiter(), 60.0)
            self.assertEqual(h.pool.status()["rejected_busy"], n)
        self.assertEqual(e.exception.retry_after, 7.0)

    def test_queue_timeouts_are_counted_one_by_one_and_say_when_to_retry(self) -> None:
        h = Harness(max_connections=1, queue=5, queue_timeout=0.5)
        h.lease()
        waiters = [Waiter(), Waiter()]
        for w in waiters:
            self.assertIsNone(h.pool.acquire(w, 60.0))
        h.reactor.advance(0.5)
        self.assertEqual(h.pool.status()["queue_timeouts"], 2)
        for w in waiters:
            self.assertIsInstance(w.error, BackendQueueTimeout)
            self.assertEqual(w.error.retry_after, 7.0)


class RemovedEndpointTests(SynchronousTestCase):
    def check_refused(self, h: Harness) -> None:
        with self.assertRaises(ConnectionFailed) as e:
            h.pool.acquire(Waiter(), 60.0)
        self.assertEqual(str(e.exception), "endpoint removed")
        # Nothing reached a socket: the call may go to another endpoint.
        self.assertIs(e.exception.sent, False)
        self.assertEqual(h.pending(), 0)

    def test_a_draining_pool_gives_no_connection(self) -> None:
        h = Harness()
        h.pool.drain()
        self.check_refused(h)

    def test_a_closed_pool_gives_no_connection(self) -> None:
        h = Harness()
        h.pool.close()
        self.check_refused(h)


class ReleaseTests(SynchronousTestCase):
    def test_a_connection_not_reusable_is_aborted(self) -> None:
        h = Harness()
        conn = h.lease()
        h.pool.release(conn, reusable=False)
        self.assertTrue(conn.closed)
        t = conn.tcp
        self.assertTrue(t.disconnected)  # abortConnection: at once
        self.assertEqual(h.pool.status()["idle"], 0)

    def test_an_old_connection_is_closed_politely(self) -> None:
        h = Harness(max_lifetime=10.0)
        conn = h.lease()
        h.reactor.advance(10.0)
        h.pool.release(conn, reusable=True)
        self.assertTrue(conn.closed)
        self.assertTrue(conn.tcp.disconnecting)
        self.assertFalse(conn.tcp.disconnected)  # loseConnection: after the buffer

    def test_a_young_connection_released_late_is_kept(self) -> None:
        h = Harness(max_lifetime=10.0)
        h.reactor.advance(100.0)
        conn = h.lease()
        h.reactor.advance(9.0)
        h.pool.release(conn, reusable=True)
        self.assertFalse(conn.closed)
        self.assertEqual(h.pool.status()["idle"], 1)


class RefillTests(SynchronousTestCase):
    def test_a_closed_connection_makes_room_for_a_waiter(self) -> None:
        h = Harness(max_connections=1, queue=5)
        conn = h.lease()
        w = Waiter()
        self.assertIsNone(h.pool.acquire(w, 60.0))
        self.assertEqual(h.pending(), 0)
        h.pool.release(conn, reusable=False)
        self.assertEqual(h.pending(), 1)  # a new connect for the waiter
        h.accept()
        self.assertIsNotNone(w.conn)

    def test_refill_never_goes_past_the_cap(self) -> None:
        h = Harness(max_connections=2, queue=5)
        a = h.lease()
        h.lease()
        waiters = [Waiter(), Waiter(), Waiter()]
        for w in waiters:
            self.assertIsNone(h.pool.acquire(w, 60.0))
        h.pool.release(a, reusable=False)
        self.assertEqual(h.pending(), 1)  # one free place, one connect
        self.assertEqual(h.pool.total, 2)

    def test_a_draining_pool_opens_no_connection_for_waiters(self) -> None:
        h = Harness(max_connections=1, queue=5)
        conn = h.lease()
        w = Waiter()
        h.pool.acquire(w, 60.0)
        h.pool.drain()
        h.pool.release(conn, reusable=False)
        self.assertEqual(h.pending(), 0)
        self.assertIsInstance(w.error, ConnectionFailed)
