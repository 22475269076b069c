"""
Which endpoint gets a call, which are kept out, and how many retries the
service may add.

:class:`Balancer`: power of two choices on calls in flight (EWMA latency
breaks ties), consecutive-failure ejection with jittered exponential backoff,
at most ``max_ejected_share`` of the endpoints ejected, and *panic mode*
(every endpoint used again) when fewer than ``panic_threshold`` are healthy.
Endpoints removed from discovery drain: they get no new call and are
dropped once their last call ends.

:class:`RetryBudget`: retries allowed while they stay under
``ratio × calls + min_per_second × window`` over a sliding window, so
retries never multiply an outage.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Callable, Generic, Iterable, TypeVar

from .._quota import Distribution
from ._config import BalancerConfig
from ._discovery import Endpoint

if TYPE_CHECKING:
    from .._json import JSON

#: What the service keeps per endpoint (its connection pool).
_Pool = TypeVar("_Pool")

__all__ = ["EndpointState", "Balancer", "RetryBudget"]


class EndpointState(Generic[_Pool]):
    """
    What the balancer knows of one endpoint.  ``pool`` is whatever the
    service keeps per endpoint (its connections).
    """

    __slots__ = ("endpoint", "pool", "outstanding", "ewma", "ewma_stamp", "failures",
                 "ejected_until", "ejections", "calls", "errors", "draining", "ejected",
                 "latency")

    def __init__(self, endpoint: Endpoint, pool: _Pool) -> None:
        self.endpoint = endpoint
        self.pool = pool
        self.outstanding = 0
        self.ewma = 0.0
        self.ewma_stamp = 0.0
        #: Answer times of its successful calls (a fixed-bucket histogram:
        #: ``pipecomet_backend_latency_seconds``).
        self.latency = Distribution()
        self.failures = 0
        self.ejected = False
        self.ejected_until = 0.0
        self.ejections = 0
        self.calls = 0
        self.errors = 0
        self.draining = False

    def status(self, now: float,
               pool_status: Callable[[_Pool], JSON] | None = None) -> dict[str, JSON]:
        """
        The endpoint's figures; with ``pool_status``, its pool's under ``pool``.
        """
        out: dict[str, JSON] = {
            "id": self.endpoint.id,
            "address": self.endpoint.address,
            "outstanding": self.outstanding,
            "latency_ewma_ms": round(self.ewma * 1000, 3),
            "latency": self.latency.to_json(),
            "calls": self.calls,
            "errors": self.errors,
            "consecutive_failures": self.failures,
            "ejected": self.ejected,
            "ejected_for": round(max(0.0, self.ejected_until - now), 3) if self.ejected else 0,
            "ejections": self.ejections,
            "draining": self.draining,
        }
        if pool_status is not None:
            out["pool"] = pool_status(self.pool)
        return out


class Balancer(Generic[_Pool]):
    """
    Picks endpoints for one service.

    :param make_pool: ``make_pool(endpoint)`` → the per-endpoint object kept
        in :attr:`EndpointState.pool`.
    :param drain_pool: ``drain_pool(state)`` for an endpoint that left
        discovery; the service calls :meth:`forget` once it is empty.
    :param clock: reactor time, ``reactor.seconds``.
    :param rng: ``random.Random`` (a seeded one in tests).
    """

    def __init__(self, config: BalancerConfig, clock: Callable[[], float],
                 make_pool: Callable[[Endpoint], _Pool],
                 drain_pool: Callable[[EndpointState[_Pool]], None] = lambda s: None,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.clock = clock
        self.make_pool = make_pool
        self.drain_pool = drain_pool
        self.rng = rng or random.Random()
        self.active: list[EndpointState[_Pool]] = []
        self.draining: list[EndpointState[_Pool]] = []
        self.ejected_count = 0
        self.panic = False
        self.panics = 0
        self.ejections_refused = 0

    # -- membership

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        """
        Discovery says these are the endpoints now: new ones join, removed
        ones drain.
        """
        wanted = {e.id: e for e in endpoints}
        keep: list[EndpointState[_Pool]] = []
        removed: list[EndpointState[_Pool]] = []
        for state in self.active:
            e = wanted.pop(state.endpoint.id, None)
            if e is not None and e.address == state.endpoint.address:
                keep.append(state)
                continue
            if e is not None:
                wanted[e.id] = e  # same id, new address: a new endpoint
            removed.append(state)
        for e in wanted.values():
            keep.append(EndpointState(e, self.make_pool(e)))
        # The new list first: calls that waited on a removed endpoint are
        # sent to it while the old one drains.
        self.active = keep
        for state in removed:
            if state.ejected:
                state.ejected = False
                self.ejected_count -= 1
            state.draining = True
            self.draining.append(state)
            self.drain_pool(state)

    def forget(self, state: EndpointState[_Pool]) -> None:
        """
        A draining endpoint has no call left.
        """
        if state in self.draining:
            self.draining.remove(state)

    # -- choosing

    def pick(self, exclude: EndpointState[_Pool] | None = None) -> EndpointState[_Pool] | None:
        """
        The endpoint for the next call, or None when there is none.

        :param exclude: an endpoint that just failed this call (skipped when
            another is there).
        """
        candidates = self.active
        if self.ejected_count:
            candidates = self._healthy()
        n = len(candidates)
        if exclude is not None and n > 1 and exclude in candidates:
            candidates = [s for s in candidates if s is not exclude]
            n -= 1
        if n == 0:
            return None
        if n == 1:
            return candidates[0]
        rnd = self.rng.random
        i = int(rnd() * n)
        j = int(rnd() * (n - 1))
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        if a.outstanding != b.outstanding:
            return a if a.outstanding < b.outstanding else b
        return a if a.ewma <= b.ewma else b

    def _healthy(self) -> list[EndpointState[_Pool]]:
        now = self.clock()
        healthy = []
        for s in self.active:
            if s.ejected and s.ejected_until <= now:
                # Back on probation: one more failure ejects it again.
                s.ejected = False
                s.failures = self.config.failures - 1
                self.ejected_count -= 1
            if not s.ejected:
                healthy.append(s)
        n = len(self.active)
        panic = bool(n) and len(healthy) < self.config.panic_threshold * n
        if panic != self.panic:
            self.panic = panic
            self.panics += panic
        return list(self.active) if panic else healthy

    # -- outcomes

    def record_success(self, state: EndpointState[_Pool], latency: float) -> None:
        state.latency.observe(latency)
        state.failures = 0
        if state.ejections and not state.ejected:
            state.ejections = 0
        now = self.clock()
        if state.ewma_stamp:
            w = math.exp(-max(0.0, now - state.ewma_stamp) / self.config.ewma_decay)
            state.ewma = state.ewma * w + latency * (1.0 - w)
        else:
            state.ewma = latency
        state.ewma_stamp = now

    def record_failure(self, state: EndpointState[_Pool]) -> None:
        state.errors += 1
        state.failures += 1
        # A failure weighs like a slow answer, so a failing endpoint stops
        # winning the latency tie-break before it is ejected.
        state.ewma = max(state.ewma * 2.0, 1.0)
        state.ewma_stamp = self.clock()
        if state.ejected or state.draining or state.failures < self.config.failures:
            return
        n = len(self.active)
        if self.ejected_count + 1 > math.floor(self.config.max_ejected_share * n + 1e-9):
            self.ejections_refused += 1
            return
        config = self.config
        backoff = min(config.ejection_max, config.ejection_base * (2 ** min(state.ejections, 30)))
        backoff *= 0.5 + self.rng.random()  # ±50 % jitter, so ejected endpoints come back apart
        state.ejected = True
        state.ejected_until = self.clock() + backoff
        state.ejections += 1
        self.ejected_count += 1

    def status(self, pool_status: Callable[[_Pool], JSON] | None = None) -> dict[str, JSON]:
        """
        The balancer's figures and each endpoint's (with its pool's, given
        ``pool_status``).
        """
        now = self.clock()
        if self.ejected_count:
            self._healthy()
        return {
            "endpoints": [s.status(now, pool_status) for s in self.active],
            "draining": [s.status(now, pool_status) for s in self.draining],
            "ejected": self.ejected_count,
            "panic": self.panic,
            "panics": self.panics,
            "ejections_refused": self.ejections_refused,
        }


class RetryBudget:
    """
    Retries as a share of calls over a sliding window of whole seconds.

    A retry is allowed when ``retries < ratio × calls + min_per_second ×
    window`` over the last ``window`` seconds, counting the retry itself.
    """

    def __init__(self, ratio: float, min_per_second: float, window: float,
                 clock: Callable[[], float]) -> None:
        self.ratio = ratio
        self.reserve = min_per_second * window
        self.size = max(1, int(math.ceil(window)))
        self.clock = clock
        self._calls = [0] * self.size
        self._retries = [0] * self.size
        self._second = int(clock())
        self.calls = 0
        self.retries = 0
        self.refused = 0

    def _roll(self) -> None:
        second = int(self.clock())
        if second == self._second:
            return
        steps = min(second - self._second, self.size)
        for k in range(1, steps + 1):
            slot = (self._second + k) % self.size
            self.calls -= self._calls[slot]
            self.retries -= self._retries[slot]
            self._calls[slot] = 0
            self._retries[slot] = 0
        self._second = second

    def record_call(self) -> None:
        self._roll()
        self._calls[self._second % self.size] += 1
        self.calls += 1

    def allowed(self) -> float:
        """
        Retries the window allows in all.
        """
        return self.ratio * self.calls + self.reserve

    def try_retry(self) -> bool:
        """
        Take one retry from the budget; False (and counted) when it is spent.
        """
        self._roll()
        if self.retries + 1 > self.allowed():
            self.refused += 1
            return False
        self._retries[self._second % self.size] += 1
        self.retries += 1
        return True

    def status(self) -> dict[str, JSON]:
        self._roll()
        return {"calls_in_window": self.calls, "retries_in_window": self.retries,
                "allowed": round(self.allowed(), 1), "refused": self.refused}
