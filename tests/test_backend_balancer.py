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
    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
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
