"""
Unit tests of the balancer and the retry budget on a fake clock: power of
two choices, EWMA tie-break, ejection with jittered backoff, the cap on the
ejected share, panic mode, draining, and a hypothesis model that drives
random calls, failures and time and checks the invariants after each step.
"""

from __future__ import annotations

import math
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pipecomet._backend._balancer import Balancer, RetryBudget
from pipecomet._backend._config import BalancerConfig
from pipecomet._quota import Distribution

#: An endpoint's latency histogram before any answer.
NO_LATENCY = Distribution().to_json()
from pipecomet._backend._discovery import Endpoint


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint("10.0.0.1", 1000 + i) for i in range(n)]


def balancer(n: int, clock: Clock | None = None, seed: int = 1, **config: Any) -> Balancer:
    clock = clock or Clock()
    drained: list[Any] = []
    b = Balancer(BalancerConfig(**config), clock.seconds, lambda e: e.port,
                 drained.append, rng=random.Random(seed))
    b.drained = drained  # type: ignore[attr-defined]
    b.update(endpoints(n))
    return b


class BalancerTests(SynchronousTestCase):
    def test_two_choices_prefer_fewer_calls_in_flight(self) -> None:
        b = balancer(2)
        busy, free = b.active
        busy.outstanding = 5
        for _ in range(20):
            self.assertIs(b.pick(), free)

    def test_ewma_breaks_ties(self) -> None:
        clock = Clock()
        b = balancer(2, clock)
        slow, fast = b.active
        b.record_success(slow, 0.5)
        b.record_success(fast, 0.01)
        for _ in range(20):
            self.assertIs(b.pick(), fast)

    def test_a_failure_loses_the_tie_break(self) -> None:
        b = balancer(2, failures=10)
        failing, other = b.active
        b.record_success(other, 0.05)
        b.record_failure(failing)
        for _ in range(20):
            self.assertIs(b.pick(), other)

    def test_spread_over_many(self) -> None:
        b = balancer(5)
        seen = set()
        for _ in range(200):
            s = b.pick()
            seen.add(s.endpoint.port)
        self.assertEqual(len(seen), 5)

    def test_consecutive_failures_eject_with_growing_jittered_backoff(self) -> None:
        clock = Clock()
        b = balancer(4, clock, failures=3, ejection_base=1.0, ejection_max=100.0)
        s = b.active[0]
        b.record_failure(s)
        b.record_failure(s)
        self.assertFalse(s.ejected)
        b.record_failure(s)
        self.assertTrue(s.ejected)
        first = s.ejected_until - clock.seconds()
        self.assertTrue(0.5 <= first <= 1.5, first)
        for _ in range(50):
            self.assertIsNot(b.pick(), s)
        clock.advance(first)
        b.pick()  # ejection over: back on probation
        self.assertFalse(s.ejected)
        b.record_failure(s)  # one more failure ejects again, for longer
        self.assertTrue(s.ejected)
        second = s.ejected_until - clock.seconds()
        self.assertTrue(1.0 <= second <= 3.0, second)

    def test_success_resets_failures(self) -> None:
        b = balancer(2, failures=2)
        s = b.active[0]
        b.record_failure(s)
        b.record_success(s, 0.01)
        b.record_failure(s)
        self.assertFalse(s.ejected)

    def test_ejected_share_is_capped(self) -> None:
        b = balancer(4, failures=1, max_ejected_share=0.5, panic_threshold=0.0)
        for s in b.active:
            b.record_failure(s)
        self.assertEqual(sum(s.ejected for s in b.active), 2)
        self.assertEqual(b.ejections_refused, 2)

    def test_panic_uses_every_endpoint(self) -> None:
        b = balancer(4, failures=1, max_ejected_share=1.0, panic_threshold=0.5)
        for s in b.active[:3]:
            b.record_failure(s)
        self.assertEqual(b.ejected_count, 3)
        picked = {b.pick().endpoint.port for _ in range(200)}
        self.assertTrue(b.panic)
        self.assertEqual(len(picked), 4)

    def test_no_panic_above_threshold(self) -> None:
        b = balancer(4, failures=1, max_ejected_share=1.0, panic_threshold=0.5)
        b.record_failure(b.active[0])
        picked = {b.pick().endpoint.port for _ in range(200)}
        self.assertFalse(b.panic)
        self.assertEqual(len(picked), 3)

    def test_removed_endpoints_drain_and_new_ones_join(self) -> None:
        b = balancer(2)
        old = b.active[0]
        b.update([b.active[1].endpoint, Endpoint("10.0.0.2", 1)])
        self.assertEqual([s.endpoint.port for s in b.active], [1001, 1])
        self.assertEqual(b.draining, [old])
        self.assertTrue(old.draining)
        self.assertEqual(b.drained, [old])
        for _ in range(50):
            self.assertIsNot(b.pick(), old)
        b.forget(old)
        self.assertEqual(b.draining, [])

    def test_exclude_skips_the_endpoint_that_just_failed(self) -> None:
        b = balancer(2)
        a = b.active[0]
        for _ in range(20):
            self.assertIsNot(b.pick(exclude=a), a)
        one = balancer(1)
        self.assertIs(one.pick(exclude=one.active[0]), one.active[0])

    def test_no_endpoint(self) -> None:
        self.assertIsNone(balancer(0).pick())


class RetryBudgetTests(SynchronousTestCase):
    def test_ratio_plus_reserve(self) -> None:
        clock = Clock()
        budget = RetryBudget(0.2, 1.0, 10.0, clock.seconds)
        for _ in range(100):
            budget.record_call()
        allowed = sum(budget.try_retry() for _ in range(100))
        self.assertEqual(allowed, 30)  # 20 % of 100 + 1/s over 10 s
        self.assertEqual(budget.refused, 70)

    def test_window_slides(self) -> None:
        clock = Clock()
        budget = RetryBudget(0.0, 0.5, 4.0, clock.seconds)
        self.assertEqual(sum(budget.try_retry() for _ in range(10)), 2)
        clock.advance(4)
        self.assertEqual(sum(budget.try_retry() for _ in range(10)), 2)


class Model(SynchronousTestCase):
    # differing_executors: a trial TestCase method, seen on more than one
    # instance when a runner (mutmut) collects the test twice; harmless.
    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])
    @given(
        n=st.integers(min_value=1, max_value=8),
        failures=st.integers(min_value=1, max_value=4),
        share=st.floats(min_value=0.0, max_value=1.0),
        panic=st.floats(min_value=0.0, max_value=1.0),
        ratio=st.floats(min_value=0.0, max_value=1.0),
        reserve=st.floats(min_value=0.0, max_value=5.0),
        steps=st.lists(st.tuples(st.sampled_from(["ok", "fail", "retry", "tick"]),
                                 st.integers(min_value=0, max_value=7),
                                 st.floats(min_value=0.0, max_value=3.0)),
                       max_size=120),
    )
    def test_invariants(self, n: int, failures: int, share: float, panic: float, ratio: float,
                        reserve: float, steps: list[tuple[str, int, float]]) -> None:
        clock = Clock()
        b = balancer(n, clock, failures=failures, max_ejected_share=share, panic_threshold=panic,
                     ejection_base=0.5, ejection_max=4.0)
        budget = RetryBudget(ratio, reserve, 5.0, clock.seconds)
        retry_times: list[float] = []
        call_times: list[float] = []
        for kind, index, dt in steps:
            if kind == "tick":
                clock.advance(dt)
                continue
            chosen = b.pick()
            assert chosen is not None
            now = clock.seconds()
            if kind == "retry":
                if budget.try_retry():
                    retry_times.append(now)
                    # Retries in the window never pass ratio × calls + reserve.
                    window_start = math.floor(now) - 4
                    calls = sum(1 for t in call_times if math.floor(t) >= window_start)
                    retries = sum(1 for t in retry_times if math.floor(t) >= window_start)
                    assert retries <= ratio * calls + reserve * 5.0 + 1e-9
                continue
            budget.record_call()
            call_times.append(now)
            if not b.panic and b.ejected_count:
                # Outside panic mode an ejected endpoint never gets a call.
                assert not chosen.ejected or chosen.ejected_until <= now
            if kind == "ok":
                b.record_success(chosen, dt / 10)
            else:
                b.record_failure(chosen)
            ejected = sum(1 for s in b.active if s.ejected)
            assert ejected == b.ejected_count
            # Never more than the allowed share ejected at once.
            assert ejected <= math.floor(share * n + 1e-9)
            for s in b.active:
                if s.ejected:
                    assert s.ejected_until - now <= 4.0 * 1.5 + 1e-9


class Halfway:
    """
    An rng whose every draw is 0.5: no jitter (×1.0) and a known pair in
    the two choices, so figures can be checked exactly.
    """

    def random(self) -> float:
        return 0.5


def exact(n: int, clock: Clock, **config: Any) -> Balancer:
    b = Balancer(BalancerConfig(**config), clock.seconds, lambda e: e.port, rng=Halfway())  # type: ignore[arg-type]
    b.update(endpoints(n))
    return b


class BalancerFigureTests(SynchronousTestCase):
    """
    The balancer's figures exactly: the latency average, ejection lengths,
    probation, the share and panic boundaries, what ``status()`` shows.
    """

    def test_latency_average_decays_over_ewma_decay(self) -> None:
        clock = Clock()
        clock.advance(100.0)
        b = exact(1, clock, ewma_decay=10.0)
        s = b.active[0]
        b.record_success(s, 0.1)
        self.assertEqual(s.ewma, 0.1)
        clock.advance(10.0)
        b.record_success(s, 0.2)
        w = math.exp(-1.0)
        self.assertAlmostEqual(s.ewma, 0.1 * w + 0.2 * (1 - w), places=12)
        before = s.ewma
        b.record_success(s, 1.0)  # no time passed: the new sample weighs nothing
        self.assertAlmostEqual(s.ewma, before, places=12)
        self.assertEqual(b.status()["endpoints"][0]["latency_ewma_ms"], round(before * 1000, 3))

    def test_every_successful_answer_time_goes_into_the_latency_histogram(self) -> None:
        clock = Clock()
        b = exact(2, clock)
        s = b.active[0]
        for seconds in (0.002, 0.002, 0.3):
            b.record_success(s, seconds)
        b.record_failure(s)  # a failure has no answer time
        latency = b.status()["endpoints"][0]["latency"]
        self.assertEqual((latency["count"], latency["sum"], latency["max"]), (3, 0.304, 0.3))
        self.assertEqual((latency["buckets"]["0.001"], latency["buckets"]["0.0025"],
                          latency["buckets"]["0.25"], latency["buckets"]["0.5"],
                          latency["buckets"]["+Inf"]), (0, 2, 2, 3, 3))
        self.assertEqual(b.status()["endpoints"][1]["latency"]["count"], 0)

    def test_a_failure_doubles_the_average_or_makes_it_a_second(self) -> None:
        clock = Clock()
        clock.advance(5.0)
        b = exact(1, clock, failures=10)
        s = b.active[0]
        b.record_failure(s)
        self.assertEqual(s.ewma, 1.0)
        b.record_failure(s)
        self.assertEqual(s.ewma, 2.0)
        self.assertEqual((s.failures, s.errors, s.ewma_stamp), (2, 2, 5.0))

    def test_ejections_double_up_to_the_maximum(self) -> None:
        clock = Clock()
        b = exact(2, clock, failures=2, ejection_base=1.5, ejection_max=5.0,
                  max_ejected_share=0.5)
        s = b.active[0]
        lengths = []
        for _ in range(4):
            b.record_failure(s)
            if not s.ejected:
                b.record_failure(s)
            self.assertTrue(s.ejected)
            lengths.append(s.ejected_until - clock.seconds())
            clock.advance(lengths[-1])
            b.pick()  # back on probation: one failure ejects again
            self.assertFalse(s.ejected)
            self.assertEqual(s.failures, 1)
        self.assertEqual(lengths, [1.5, 3.0, 5.0, 5.0])
        self.assertEqual(s.ejections, 4)

    def test_a_success_after_probation_starts_ejections_over(self) -> None:
        clock = Clock()
        clock.advance(1.0)
        b = exact(2, clock, failures=1, ejection_base=2.0, ejection_max=60.0)
        s = b.active[0]
        b.record_failure(s)
        clock.advance(2.0)
        b.pick()
        b.record_failure(s)
        self.assertEqual(s.ejected_until - clock.seconds(), 4.0)
        b.record_success(s, 0.01)  # while ejected: the count stays
        self.assertEqual(s.ejections, 2)
        clock.advance(4.0)
        b.pick()
        b.record_success(s, 0.01)
        self.assertEqual((s.ejections, s.failures), (0, 0))
        b.record_failure(s)
        self.assertEqual(s.ejected_until - clock.seconds(), 2.0)

    def test_status_of_an_ejected_endpoint(self) -> None:
        clock = Clock()
        clock.advance(10.0)
        b = exact(2, clock, failures=1, ejection_base=3.0)
        s = b.active[0]
        b.record_failure(s)
        clock.advance(1.2344)
        self.assertEqual(b.status(), {
            "endpoints": [
                {"id": "10.0.0.1:1000", "address": "10.0.0.1:1000", "outstanding": 0,
                 "latency_ewma_ms": 1000.0, "latency": NO_LATENCY, "calls": 0, "errors": 1,
                 "consecutive_failures": 1, "ejected": True, "ejected_for": 1.766,
                 "ejections": 1, "draining": False},
                {"id": "10.0.0.1:1001", "address": "10.0.0.1:1001", "outstanding": 0,
                 "latency_ewma_ms": 0.0, "latency": NO_LATENCY, "calls": 0, "errors": 0,
                 "consecutive_failures": 0, "ejected": False, "ejected_for": 0,
                 "ejections": 0, "draining": False}],
            "draining": [], "ejected": 1, "panic": False, "panics": 0,
            "ejections_refused": 0})
        clock.advance(1.7656)
        status = b.status()  # the ejection is over: the status says so
        self.assertEqual((status["ejected"], status["endpoints"][0]["ejected"],
                          status["endpoints"][0]["ejected_for"]), (0, False, 0))

    def test_ejected_share_boundary(self) -> None:
        for n, share, most in ((4, 0.25, 1), (4, 0.5, 2), (3, 0.5, 1), (5, 0.4, 2), (2, 0.4, 0)):
            b = exact(n, Clock(), failures=1, max_ejected_share=share, panic_threshold=0.0)
            for s in b.active:
                b.record_failure(s)
            self.assertEqual((b.ejected_count, b.ejections_refused), (most, n - most),
                             (n, share))

    def test_panic_boundary_and_count(self) -> None:
        clock = Clock()
        b = exact(4, clock, failures=1, max_ejected_share=1.0, panic_threshold=0.5,
                  ejection_base=10.0)
        for s in b.active[:2]:
            b.record_failure(s)
        b.pick()
        self.assertFalse(b.panic)  # 2 of 4 healthy: not fewer than half
        b.record_failure(b.active[2])
        b.pick()
        b.pick()
        self.assertEqual((b.panic, b.panics), (True, 1))
        clock.advance(10.0)
        b.pick()
        self.assertEqual((b.panic, b.panics, b.ejected_count), (False, 1, 0))
        for s in b.active[:3]:
            b.record_failure(s)
        b.pick()
        self.assertEqual((b.panic, b.panics), (True, 2))

    def test_draining_and_ejected_endpoints_leave_the_counts(self) -> None:
        clock = Clock()
        b = exact(3, clock, failures=1, max_ejected_share=1.0, panic_threshold=0.0)
        gone = b.active[0]
        b.record_failure(gone)
        self.assertEqual(b.ejected_count, 1)
        b.update([s.endpoint for s in b.active[1:]])
        self.assertEqual((b.ejected_count, gone.ejected, gone.draining), (0, False, True))
        b.record_failure(gone)  # a draining endpoint is never ejected
        self.assertEqual((gone.ejected, b.ejected_count), (False, 0))
        self.assertEqual(b.status()["draining"][0]["draining"], True)

    def test_same_id_new_address_is_a_new_endpoint(self) -> None:
        b = exact(1, Clock())
        old = b.active[0]
        b.update([Endpoint("10.0.0.9", 1000, id=old.endpoint.id)])
        [new] = b.active
        self.assertIsNot(new, old)
        self.assertEqual((new.endpoint.address, new.pool), ("10.0.0.9:1000", 1000))
        self.assertEqual(b.draining, [old])
        b.update([new.endpoint])
        self.assertIs(b.active[0], new)  # unchanged: kept as it is

    def test_two_choices_are_two_different_endpoints(self) -> None:
        b = exact(3, Clock())
        a, mid, c = b.active
        # Draws of 0.5: i = 1, j = 1 -> 2 (never the same one twice).
        mid.outstanding = 1
        self.assertIs(b.pick(), c)
        c.outstanding = 2
        self.assertIs(b.pick(), mid)
        mid.outstanding = c.outstanding = 0
        c.ewma = 0.5
        self.assertIs(b.pick(), mid)  # equal calls: the lower average
        mid.ewma = 0.5
        self.assertIs(b.pick(), mid)  # a tie: the first drawn
        a.ewma = 0.9
        self.assertIs(b.pick(exclude=mid), c)  # [a, c]: i = 1, j = 0; c is faster

    def test_exclude_of_an_endpoint_not_there(self) -> None:
        b = exact(2, Clock())
        stranger = exact(1, Clock()).active[0]
        first, second = b.active
        second.outstanding = 1
        self.assertIs(b.pick(exclude=stranger), first)


class RetryBudgetFigureTests(SynchronousTestCase):
    def test_status_and_the_window_rolling_second_by_second(self) -> None:
        clock = Clock()
        budget = RetryBudget(0.5, 0.25, 3.0, clock.seconds)
        for _ in range(4):
            budget.record_call()
        self.assertEqual(budget.status(), {"calls_in_window": 4, "retries_in_window": 0,
                                           "allowed": 2.8, "refused": 0})
        self.assertTrue(budget.try_retry())
        clock.advance(1.0)
        budget.record_call()
        self.assertTrue(budget.try_retry())
        clock.advance(1.0)
        self.assertEqual(budget.status()["calls_in_window"], 5)
        clock.advance(1.0)  # the first second leaves the window
        self.assertEqual(budget.status(), {"calls_in_window": 1, "retries_in_window": 1,
                                           "allowed": 1.2, "refused": 0})
        clock.advance(0.5)
        self.assertEqual(budget.status()["calls_in_window"], 1)
        clock.advance(0.5)
        self.assertEqual(budget.status()["calls_in_window"], 0)
        clock.advance(100.0)  # a long pause: every slot cleared once
        self.assertEqual((budget.calls, budget.retries), (0, 0))

    def test_the_retry_counts_itself(self) -> None:
        clock = Clock()
        budget = RetryBudget(0.0, 1.0, 2.0, clock.seconds)  # 2 retries in all
        self.assertEqual([budget.try_retry() for _ in range(3)], [True, True, False])
        self.assertEqual((budget.retries, budget.refused), (2, 1))
        budget = RetryBudget(0.0, 0.4, 1.5, clock.seconds)  # window of 2 slots, 0.6 retries
        self.assertEqual(budget.size, 2)
        self.assertFalse(budget.try_retry())
