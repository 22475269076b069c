"""
Prometheus metrics: per-request figures kept in plain dicts on the reactor
thread, the parts' live ``status()`` figures read at scrape time, a
reactor-lag probe, and the text exposition.

Nothing here uses prometheus_client's metric objects on the request path
(each of their updates takes a lock and a label lookup): :class:`HTTPStats`
and :class:`PipeTimes` count in dicts and lists, and
:class:`PipecometCollector` turns them, and every part's ``status()``,
into metric families only when Prometheus scrapes.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from bisect import bisect_left
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import attrs
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from .._chain import _PLAIN, Chain, Parallel, Pipe, PipeContext, PipeInput, PipeResult
from .._errors import Forbidden, error_response

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from ._requests import RequestObserver, RequestRecord

__all__ = [
    "BUCKETS",
    "LAG_BUCKETS",
    "Histogram",
    "HTTPStats",
    "PipeTimes",
    "LagProbe",
    "PipecometCollector",
    "make_registry",
    "exposition",
    "MetricsResource",
    "check_access",
    "CONTENT_TYPE",
]

log = Logger()

#: Upper bounds (seconds) of request and pipe duration buckets; +Inf is implied.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Upper bounds (seconds) of the reactor-lag buckets.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


class Histogram:
    """
    Counts per bucket and a sum: what a Prometheus histogram needs, updated
    with one ``bisect`` and two additions.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """
        Cumulative ``(le, count)`` pairs ending with ``+Inf``.
        """
        out, seen = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            seen += n
            out.append((_le(bound), seen))
        return out


def quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """
    Quantile ``q`` of bucket counts (not cumulative), interpolated linearly
    inside its bucket as Prometheus's ``histogram_quantile`` does; None
    without observations.  The last (+Inf) bucket answers its lower bound.
    """
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * ((rank - seen) / n)
        seen += n
    return bounds[-1]


class HTTPStats:
    """
    Requests by route, method and status, durations by route, error
    responses by code; fed by :class:`~pipecomet._observe._requests.RequestObserver`.

    :ivar all: every request's duration in one histogram (the dashboard's
        percentiles).
    :ivar by_class: requests by status class, index ``status // 100``.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.errors: dict[str, int] = {}
        self.all = Histogram()
        self.by_class = [0] * 6

    def record(self, record: RequestRecord, status: int, duration: float) -> None:
        route = record.route
        key = (route, record.method, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = Histogram()
        i = bisect_left(BUCKETS, duration)
        hist.counts[i] += 1
        hist.total += duration
        every = self.all
        every.counts[i] += 1
        every.total += duration
        self.by_class[status // 100 if 0 < status < 600 else 0] += 1
        code = record.error_code
        if code is not None:
            self.errors[code] = self.errors.get(code, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.by_class)


class PipeTimes:
    """
    Time per pipe, by route and pipe name.  Pipes are timed by wrapping
    their functions once, when a route is declared (:meth:`instrument`);
    a thread pipe's time is handed over in a list (``list.append`` is
    atomic) and counted on the reactor thread at the next scrape.

    :param seconds: the clock (the reactor's ``seconds``).
    """

    def __init__(self, seconds: Callable[[], float]) -> None:
        self.seconds = seconds
        self.hists: dict[tuple[str, str], Histogram] = {}
        self._from_threads: list[tuple[tuple[str, str], float]] = []

    def drain(self) -> None:
        """
        Count the thread pipes' times handed over since the last call.
        """
        if self._from_threads:
            done, self._from_threads = self._from_threads, []
            for key, took in done:
                self._hist(key).observe(took)

    def _hist(self, key: tuple[str, str]) -> Histogram:
        hist = self.hists.get(key)
        if hist is None:
            hist = self.hists[key] = Histogram()
        return hist

    def instrument(self, chain: Chain, route: str) -> Chain:
        """
        A chain like ``chain`` whose inline and thread pipes time
        themselves under ``route``.  A process pipe's function only makes
        the worker's payload, so it is left as it is (worker calls are in
        the ``pipecomet_workers_*`` figures).
        """
        return Chain(self._pipes(chain.pipes, route), name=chain.name)

    def _pipes(self, pipes: Iterable[Any], route: str) -> list[Any]:
        out: list[Any] = []
        for p in pipes:
            if isinstance(p, Parallel):
                branches: list[Pipe | Chain] = [
                    self.instrument(b, route) if isinstance(b, Chain) else self._pipes([b], route)[0]
                    for b in p.branches]
                out.append(attrs.evolve(p, branches=branches))
            elif isinstance(p, Pipe) and p.run != "process":
                out.append(attrs.evolve(p, func=self._timed(p, route)))
            else:
                out.append(p)
        return out

    def _timed(self, p: Pipe, route: str) -> Callable[..., Any]:
        func = p.func
        key = (route, p.name)
        seconds = self.seconds
        if p.run == "thread":
            handover = self

            def timed_in_thread(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Any:
                t0 = seconds()
                try:
                    return func(inp, ctx, res)
                finally:
                    handover._from_threads.append((key, seconds() - t0))

            timed_in_thread.__wrapped__ = func  # type: ignore[attr-defined]
            return timed_in_thread
        observe = self._hist(key).observe

        def ended(result: object, t0: float) -> object:
            observe(seconds() - t0)
            return result

        def timed(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Any:
            t0 = seconds()
            try:
                out = func(inp, ctx, res)
            except BaseException:
                observe(seconds() - t0)
                raise
            # A plain result is told apart by type first: isinstance()
            # against Deferred (an Awaitable) goes through ABCMeta.
            if type(out) not in _PLAIN and isinstance(out, (Deferred, CoroutineType)):
                if isinstance(out, CoroutineType):
                    out = Deferred.fromCoroutine(out)
                out.addBoth(ended, t0)
            else:
                observe(seconds() - t0)
            return out

        # What the pipe really calls, for checks that look at it (App.check,
        # the comet-route test of --processes): inspect.unwrap(p.func).
        timed.__wrapped__ = func  # type: ignore[attr-defined]
        return timed


class LagProbe:
    """
    How late the reactor runs a periodic timed call: a ``LoopingCall``
    every ``interval`` seconds on the injected reactor, each firing's delay
    past its due time counted in a histogram.  A busy or blocked reactor
    shows here first.
    """

    def __init__(self, reactor: IReactorTime, interval: float) -> None:
        self.reactor = reactor
        self.interval = interval
        self.hist = Histogram(LAG_BUCKETS)
        self.last = 0.0
        self.worst = 0.0
        self._start = 0.0
        self._due = 0.0
        self._call = LoopingCall(self._fired)
        self._call.clock = reactor

    def start(self) -> None:
        if self._call.running:
            return
        self._start = self.reactor.seconds()
        self._due = self._start + self.interval
        self._call.start(self.interval, now=False)

    def stop(self) -> None:
        if self._call.running:
            self._call.stop()

    def _fired(self) -> None:
        now = self.reactor.seconds()
        lag = max(0.0, now - self._due)
        self.hist.observe(lag)
        self.last = lag
        if lag > self.worst:
            self.worst = lag
        # LoopingCall's next time: the first multiple of the interval after now.
        self._due = self._start + (math.floor((now - self._start) / self.interval) + 1) * self.interval

    def take_worst(self) -> float:
        """
        The worst lag since the last call (the dashboard's per-second figure).
        """
        worst, self.worst = self.worst, 0.0
        return worst


# ---------------------------------------------------------------------------
# Scrape time


def _families() -> Any:  # the three family classes, imported when first scraped
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    return CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


def _num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dist_buckets(dist: dict[str, Any]) -> list[tuple[str, float]]:
    """
    ``(le, cumulative count)`` from a quota ``Distribution.to_json()``.
    """
    pairs = [(k, v) for k, v in dist.get("buckets", {}).items()]
    pairs.sort(key=lambda kv: math.inf if kv[0] == "+Inf" else float(kv[0]))
    if not pairs or pairs[-1][0] != "+Inf":
        pairs.append(("+Inf", dist.get("count", 0)))
    return pairs


#: Keys of a backend endpoint's status that count events (exposed as counters).
BACKEND_COUNTERS = frozenset({"calls", "errors", "ejections", "retries", "timeouts",
                              "connects", "connect_errors", "requests", "failures",
                              "safe_retries", "panics", "ejections_refused", "pool_connects",
                              "pool_connect_failures", "pool_rejected_busy",
                              "pool_queue_timeouts"})


class PipecometCollector:
    """
    The app's figures as metric families, read when Prometheus scrapes:
    the request figures, the reactor lag, and each registered status
    source (``quota``, ``workers``, ``comet``, ``events``, ``bus``,
    ``lazy``, ``backends``) mapped to metrics.

    :param status_sources: name → callable, as ``Runtime.status_sources``
        (read at every scrape, so parts installed later are seen).
    """

    def __init__(self, *, status_sources: dict[str, Callable[[], Any]], stats: HTTPStats,
                 times: PipeTimes | None, lag: LagProbe | None, observer: RequestObserver | None = None,
                 workers: Callable[[], Any] | None = None) -> None:
        self.status_sources = status_sources
        self.stats = stats
        self.times = times
        self.lag = lag
        self.observer = observer
        self.workers = workers

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        yield from self._http()
        if self.lag is not None:
            _, _, H = _families()
            h = H("pipecomet_reactor_lag_seconds",
                  "How late the reactor ran a periodic timed call, in seconds.")
            h.add_metric([], self.lag.hist.buckets(), self.lag.hist.total)
            yield h
        for name, mapper in _MAPPERS.items():
            source = self.status_sources.get(name)
            if source is None:
                continue
            try:
                status = source()
            except Exception:
                log.failure("status source {name!r} failed during a scrape", name=name)
                continue
            if status:
                yield from mapper(self, status)

    def _http(self) -> Iterator[Any]:
        C, G, H = _families()
        stats = self.stats
        requests = C("pipecomet_http_requests", "HTTP requests answered, by route pattern, "
                     "method and status (499: the client went first).",
                     labels=["route", "method", "status"])
        for (route, method, status), n in stats.requests.items():
            requests.add_metric([route, method, str(status)], n)
        yield requests
        latency = H("pipecomet_http_request_duration_seconds",
                    "Time from the request reaching the app to the end of its response, by route.",
                    labels=["route"])
        for route, hist in stats.latency.items():
            latency.add_metric([route], hist.buckets(), hist.total)
        yield latency
        errors = C("pipecomet_http_errors", "Error responses by error code "
                   "(the code in the JSON error body).", labels=["code"])
        for code, n in stats.errors.items():
            errors.add_metric([code], n)
        yield errors
        if self.observer is not None:
            yield G("pipecomet_http_requests_in_flight", "Requests begun and not yet answered.",
                    value=self.observer.in_flight)
        if self.times is not None:
            self.times.drain()
            pipes = H("pipecomet_pipe_duration_seconds",
                      "Time a pipe took (until its Deferred fired, for asynchronous ones), "
                      "by route and pipe.", labels=["route", "pipe"])
            for (route, name), hist in self.times.hists.items():
                if hist.count:
                    pipes.add_metric([route, name], hist.buckets(), hist.total)
            yield pipes


def _quota(col: PipecometCollector, s: dict[str, Any]) -> Iterator[Any]:
    C, G, H = _families()
    yield G("pipecomet_quota_pool_threads", "Threads of the quota pool.", value=s["size"])
    yield G("pipecomet_quota_pool_busy_threads", "Threads running a job (zombies included).",
            value=s["busy"])
    per = {
        "running": G("pipecomet_quota_running", "Jobs running, by category.", labels=["category"]),
        "queued": G("pipecomet_quota_queued", "Jobs waiting for a thread, by category.",
                    labels=["category"]),
        "zombies": G("pipecomet_quota_zombies", "Threads still running a job whose caller "
                     "already got 504, by category.", labels=["category"]),
        "reserve": G("pipecomet_quota_reserve", "Threads reserved for the category.",
                     labels=["category"]),
    }
    limit = G("pipecomet_quota_limit", "Most threads the category may hold.", labels=["category"])
    jobs = C("pipecomet_quota_jobs", "Jobs by category and outcome (completed, failed, rejected, "
             "queue_timeouts, execution_timeouts, cancelled).", labels=["category", "outcome"])
    wait = H("pipecomet_quota_queue_wait_seconds", "Time jobs waited for a thread.",
             labels=["category"])
    run = H("pipecomet_quota_run_seconds", "Time jobs ran on a thread.", labels=["category"])
    for name, c in s.get("categories", {}).items():
        for key, fam in per.items():
            fam.add_metric([name], c.get(key, 0))
        if c.get("limit") is not None:
            limit.add_metric([name], c["limit"])
        for outcome in ("completed", "failed", "rejected", "queue_timeouts",
                        "execution_timeouts", "cancelled"):
            if outcome in c:
                jobs.add_metric([name, outcome], c[outcome])
        for fam, key in ((wait, "queue_wait"), (run, "run_time")):
            dist = c.get(key)
            if dist:
                fam.add_metric([name], _dist_buckets(dist), dist.get("sum", 0.0))
    yield from per.values()
    yield from (limit, jobs, wait, run)


def _workers(col: PipecometCollector, s: dict[str, Any]) -> Iterator[Any]:
    C, G, H = _families()
    workers = s.get("workers", [])
    yield G("pipecomet_workers_size", "Worker processes configured.", value=s.get("size", 0))
    yield G("pipecomet_workers_busy", "Workers with at least one call in flight.",
            value=sum(1 for w in workers if w.get("in_flight")))
    yield G("pipecomet_workers_in_flight", "Calls handed to workers and not answered yet.",
            value=s.get("in_flight", 0))
    yield G("pipecomet_workers_queued", "Calls waiting for a worker.", value=s.get("queued", 0))
    yield G("pipecomet_workers_queue_limit", "Calls that may wait for a worker.",
            value=s.get("queue_limit", 0))
    calls = C("pipecomet_workers_calls", "Worker calls by outcome: completed, or the cause of "
              "the failure (crash, timeout, queue_full, queue_timeout, ...).", labels=["outcome"])
    calls.add_metric(["completed"], s.get("completed", 0))
    for cause, n in sorted(s.get("failed", {}).items()):
        calls.add_metric([cause], n)
    yield calls
    yield C("pipecomet_workers_rejected", "Calls refused at once (queue full).",
            value=s.get("rejected", 0))
    yield C("pipecomet_workers_crashes", "Calls failed because their worker crashed.",
            value=s.get("failed", {}).get("crash", 0))
    yield C("pipecomet_workers_restarts", "Worker restarts (crash, timeout, recycling).",
            value=s.get("restarts", 0))
    rss = G("pipecomet_workers_rss_bytes", "Resident memory of each worker.", labels=["slot"])
    for w in workers:
        rss.add_metric([str(w.get("slot"))], w.get("rss_bytes", 0))
    yield rss
    ring = col.workers() if col.workers is not None else None
    if ring:
        yield G("pipecomet_workers_ring_bytes", "Shared memory of each worker's two rings "
                "(requests in, responses out).", value=ring)


def _comet(col: PipecometCollector, s: dict[str, Any]) -> Iterator[Any]:
    C, G, H = _families()
    conns = G("pipecomet_comet_connections", "Held comet connections, by transport.",
              labels=["transport"])
    for kind, n in s.get("connections_by_transport", {}).items():
        conns.add_metric([kind], n)
    yield conns
    opened = C("pipecomet_comet_opened", "Comet connections opened, by transport.",
               labels=["transport"])
    for kind, n in s.get("opened_by_transport", {}).items():
        opened.add_metric([kind], n)
    yield opened
    yield G("pipecomet_comet_topics", "Topics known (with subscribers or history).",
            value=s.get("topics", 0))
    yield G("pipecomet_comet_history_messages", "Messages kept for resume, all topics.",
            value=s.get("history_messages", 0))
    yield G("pipecomet_comet_history_bytes", "Bytes of messages kept for resume.",
            value=s.get("history_bytes", 0))
    for key, doc in (("published", "Messages published."),
                     ("delivered", "Messages written to subscribers."),
                     ("dropped", "Messages dropped for slow subscribers."),
                     ("gaps", "Gap events sent (history lost before a resume point)."),
                     ("slow_disconnects", "Subscribers disconnected for being too slow."),
                     ("resume_hits", "Resumes served from history."),
                     ("bus_drops", "Bus messages that could not be delivered.")):
        yield C(f"pipecomet_comet_{key}", doc, value=s.get(key, 0))
    rejected = C("pipecomet_comet_rejected", "Comet requests refused, by reason.",
                 labels=["reason"])
    for reason, n in sorted(s.get("rejected", {}).items()):
        rejected.add_metric([reason], n)
    yield rejected


def _events(col: PipecometCollector, s: dict[str, Any]) -> Iterator[Any]:
    C, G, H = _families()
    yield G("pipecomet_events_waiters", "Events waiting (condition pipes, held requests).",
            value=s.get("waiters", 0))
    ends = C("pipecomet_events", "Event transitions: invoked, completed, timed_out, cancelled.",
             labels=["transition"])
    for key in ("invoked", "completed", "timed_out", "cancelled"):
        ends.add_metric([key], s.get(key, 0))
    yield ends


def _generic(prefix: str, doc: str, counters: frozenset[str] = frozenset(),
             skip: frozenset[str] = frozenset()) -> Callable[..., Any]:
    """
    A mapper for a flat status dict: each number becomes
    ``pipecomet_<prefix>_<key>`` (a counter for names in ``counters``,
    a gauge otherwise), booleans 0/1.
    """

    def mapper(col: PipecometCollector, s: dict[str, Any]) -> Iterator[Any]:
        C, G, H = _families()
        for key, value in s.items():
            if isinstance(value, bool):
                value = int(value)
            if not _num(value) or key in skip:
                continue
            name = f"pipecomet_{prefix}_{key}"
            if key in counters:
                yield C(name, f"{doc}: {key.replace('_', ' ')}.", value=value)
            else:
                yield G(name, f"{doc}: {key.replace('_', ' ')}.", value=value)

    return mapper


def _endpoint_table(svc: dict[str, Any]) -> dict[str, Any]:
    """
    A service's endpoints by address: the backend client lists them (active
    and draining, each with its connection pool's figures under ``pool``);
    a dict keyed by address is taken as it is.
    """
    endpoints = svc.get("endpoints")
    if isinstance(endpoints, dict):
        return endpoints
    table: dict[str, Any] = {}
    for item in [*(endpoints or []), *(svc.get("draining") or [])]:
        if not isinstance(item, dict) or "address" not in item:
            continue
        flat = {k: v for k, v in item.items() if k != "pool"}
        pool = item.get("pool")
        if isinstance(pool, dict):
            flat.update({f"pool_{k}": v for k, v in pool.items() if _num(v)})
        table[str(item["address"])] = flat
    return table


def _backends(col: PipecometCollector, s: dict[str, Any]) -> Iterator[Any]:
    """
    ``{service: {"endpoints": {addr: {...}}, ...}}``: each number of an
    endpoint becomes ``pipecomet_backend_<key>{service,endpoint}`` (a
    counter for :data:`BACKEND_COUNTERS`, a gauge otherwise), a dict of
    numbers ``pipecomet_backend_<key>{service,endpoint,kind}`` (errors by
    kind), a dict with ``buckets`` a histogram; each number of a service
    ``pipecomet_backend_service_<key>{service}``.
    """
    C, G, H = _families()
    fams: dict[str, Any] = {}

    def fam(name: str, kind: str, labels: list[str], doc: str) -> Any:  # one of _families()
        f = fams.get(name)
        if f is None:
            cls = {"counter": C, "gauge": G, "histogram": H}[kind]
            f = fams[name] = cls(name, doc, labels=labels)
        return f

    for service, svc in sorted(s.items()):
        if not isinstance(svc, dict):
            continue
        for key, value in svc.items():
            if isinstance(value, bool):
                value = int(value)
            if _num(value):
                kind = "counter" if key in BACKEND_COUNTERS else "gauge"
                fam(f"pipecomet_backend_service_{key}", kind, ["service"],
                    f"Backend service figure {key!r}.").add_metric([service], value)
            elif isinstance(value, dict) and key != "endpoints":
                # failures by kind, the retry budget, discovery's state
                kind = "counter" if key in BACKEND_COUNTERS else "gauge"
                numbers = {str(k): int(n) if isinstance(n, bool) else n
                           for k, n in value.items() if _num(n) or isinstance(n, bool)}
                if numbers:
                    f = fam(f"pipecomet_backend_service_{key}", kind, ["service", "kind"],
                            f"Backend service figure {key!r}, by kind.")
                    for sub, n in sorted(numbers.items()):
                        f.add_metric([service, sub], n)
        endpoints = _endpoint_table(svc)
        for addr, ep in sorted(endpoints.items()):
            if not isinstance(ep, dict):
                continue
            for key, value in ep.items():
                if isinstance(value, bool):
                    value = int(value)
                if _num(value):
                    kind = "counter" if key in BACKEND_COUNTERS else "gauge"
                    fam(f"pipecomet_backend_{key}", kind, ["service", "endpoint"],
                        f"Backend endpoint figure {key!r}.").add_metric([service, addr], value)
                elif isinstance(value, dict) and "buckets" in value:
                    fam(f"pipecomet_backend_{key}_seconds", "histogram", ["service", "endpoint"],
                        f"Backend endpoint {key!r} distribution, in seconds.").add_metric(
                        [service, addr], _dist_buckets(value), value.get("sum", 0.0))
                elif isinstance(value, dict):
                    kind = "counter" if key in BACKEND_COUNTERS else "gauge"
                    f = fam(f"pipecomet_backend_{key}", kind, ["service", "endpoint", "kind"],
                            f"Backend endpoint figure {key!r}, by kind.")
                    for sub, n in sorted(value.items()):
                        if _num(n):
                            f.add_metric([service, addr, str(sub)], n)
    yield from fams.values()


_MAPPERS: dict[str, Callable[[PipecometCollector, dict[str, Any]], Iterator[Any]]] = {
    "quota": _quota,
    "workers": _workers,
    "comet": _comet,
    "events": _events,
    "bus": _generic("bus", "Bus", frozenset({"published", "received", "reconnects",
                                               "errors", "dropped"})),
    "lazy": _generic("lazy", "Lazy parser", frozenset({
        "bytes_received", "body_bytes_read", "requests_lazy", "requests_buffered",
        "answered_before_body_end", "rejected_413", "rejected_431", "rejected_408",
        "rejected_400"}), skip=frozenset({"lazy"})),
    "backends": _backends,
    "access_log": _generic("access_log", "Access log", frozenset({"lines", "dropped", "writes"})),
}


def make_registry(collector: PipecometCollector, *, process: bool = True) -> CollectorRegistry:
    """
    A registry of the app's own (never prometheus_client's global one, so
    several apps and tests in one process do not clash), with the
    collector and, when ``process``, the process's CPU, memory and file
    descriptors.
    """
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(namespace="pipecomet", registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """
    The text exposition, rendered here on the reactor thread (a few
    milliseconds for a large app); never in a thread pool.
    """
    from prometheus_client import generate_latest

    return generate_latest(registry)


# ---------------------------------------------------------------------------
# Access


def _is_loopback(request: IRequest) -> bool:
    addr = request.getClientAddress()
    if isinstance(addr, UNIXAddress):
        return True  # a UNIX socket's client is on this host
    if not isinstance(addr, (IPv4Address, IPv6Address)):
        return False
    try:
        ip = ipaddress.ip_address(addr.host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def check_access(request: IRequest, allow_loopback: bool, token: str,
                 query_token: bool = False) -> Forbidden | None:
    """
    None when ``request`` may see the metrics or the dashboard: a loopback
    client (when allowed) or one with ``Authorization: Bearer <token>``
    (or ``?token=`` when ``query_token``); the 403 to send otherwise.
    """
    if allow_loopback and _is_loopback(request):
        return None
    if token:
        given = None
        auth = request.requestHeaders.getRawHeaders(b"authorization")
        if auth:
            scheme, _, rest = auth[0].partition(b" ")
            if scheme.lower() == b"bearer":
                given = rest.strip()
        if given is None and query_token:
            values = request.args.get(b"token") if request.args else None
            given = values[0] if values else None
        if given is not None and hmac.compare_digest(given, token.encode("utf-8")):
            return None
    return Forbidden("the metrics and the dashboard are served to loopback clients or with "
                     "the metrics token", code="metrics_forbidden")


class MetricsResource(Resource):
    """
    A leaf resource rendering the exposition on the reactor thread (as
    synapse's ``_twisted_exposition.py``), for mounting the metrics on a
    site of their own; the app serves the same at ``/_pipecomet/metrics``.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry, allow_loopback: bool = True, token: str = "") -> None:
        super().__init__()
        self.registry = registry
        self.allow_loopback = allow_loopback
        self.token = token

    def render_GET(self, request: IRequest) -> bytes:
        denied = check_access(request, self.allow_loopback, self.token)
        if denied is not None:
            return error_response(request, denied)
        request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
        return exposition(self.registry)
