"""
The live dashboard: a snapshot of the app's figures every second, kept in
a short history and pushed to open dashboard pages over Server-Sent Events
(``/_pipecomet/dashboard/stream``), and the page and its assets, which ship
inside the package.

The stream is a :class:`~pipecomet._chain.Stream` of its own rather than a
comet topic: a page that is open must not show up in the comet connection
counts it draws, and its hours-long request is left out of the request
figures (see ``RequestObserver.unobserved``).
"""

from __future__ import annotations

import json
import os
import platform
import socket
from collections import deque
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Protocol, cast

import twisted

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from .._chain import Answer, Stream
from .._errors import NotFound, ServiceUnavailable
from ._metrics import BUCKETS, HTTPStats, LagProbe, _endpoint_table, quantile

if TYPE_CHECKING:
    from twisted.web.http import Request

    from .._comet import IStreamSink
    from .._responders import Responder

__all__ = ["Dashboard", "DashboardStream", "DashboardService", "ASSETS", "asset"]

#: Snapshots the dashboard's latency percentiles are read over.
LATENCY_WINDOW = 5

#: Files under ``static/`` the dashboard serves, with their media types.
ASSETS = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


def asset(name: str) -> bytes:
    """
    A dashboard file shipped in the package (``pipecomet/_observe/static``).
    """
    return resources.files(__package__).joinpath("static", name).read_bytes()


_encoder = json.JSONEncoder(separators=(",", ":"), default=str)


class InFlight(Protocol):
    """
    What the dashboard reads of the app's
    :class:`~pipecomet._observe._requests.RequestObserver`.
    """

    @property
    def in_flight(self) -> int: ...


def dumps(value: object) -> bytes:
    # (not pipecomet._responders.dumps: _responders imports this package)
    return _encoder.encode(value).encode("utf-8")


def _rate(now: float, before: float, dt: float) -> float:
    return round(max(0.0, now - before) / dt, 3) if dt > 0 else 0.0


def _count(value: object) -> float:
    """
    A number, or the sum of a dict of numbers (errors by kind).
    """
    if isinstance(value, bool):
        return 0.0
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return float(sum(v for v in value.values()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)))
    return 0.0


class Dashboard:
    """
    Makes a snapshot every ``interval`` seconds and sends it to every open
    :class:`DashboardStream`.

    :param status: the app's ``Runtime.status`` (all parts' figures).
    :param history: snapshots kept for a page that opens later.
    :param max_viewers: open streams allowed; one more gets 503.
    """

    def __init__(self, reactor: IReactorTime, *, stats: HTTPStats, lag: LagProbe | None,
                 status: Callable[[], dict[str, Any]], observer: InFlight,
                 interval: float = 1.0,
                 history: int = 300, max_viewers: int = 32, app_name: str = "") -> None:
        self.reactor = reactor
        self.app_name = app_name
        self.stats = stats
        self.lag = lag
        self.status = status
        self.observer = observer
        self.interval = interval
        self.max_viewers = max_viewers
        self.history: deque[dict[str, Any]] = deque(maxlen=history)
        self.viewers: set[DashboardStream] = set()
        self._prev: dict[str, Any] | None = None
        #: Request-duration bucket counts of the last few snapshots: the
        #: percentiles are read over LATENCY_WINDOW of them, so that one
        #: slow request does not make every other second's p99.
        self._windows: deque[list[int]] = deque(maxlen=LATENCY_WINDOW)
        #: When the snapshots started (the server's start, for the page's uptime).
        self.started: float | None = None
        self._call = LoopingCall(self.tick)
        self._call.clock = reactor

    def process(self) -> dict[str, object]:
        """
        What the page's header says of the serving process.
        """
        from .. import __version__

        return {"pid": os.getpid(), "host": socket.gethostname(), "version": __version__,
                "twisted": twisted.__version__, "python": platform.python_version(),
                "started": self.started}

    def start(self) -> None:
        if not self._call.running:
            self.started = round(self.reactor.seconds(), 3)
            self._prev = self._totals()
            self._call.start(self.interval, now=False)

    def stop(self) -> None:
        if self._call.running:
            self._call.stop()
        for viewer in list(self.viewers):
            viewer.end()

    # -- snapshots

    def _totals(self) -> dict[str, Any]:
        """
        The cumulative figures a snapshot's rates are the difference of.
        """
        stats = self.stats
        status = self.status()
        totals: dict[str, Any] = {
            "t": self.reactor.seconds(),
            "counts": list(stats.all.counts),
            "classes": list(stats.by_class),
            "errors": dict(stats.errors),
            "status": status,
        }
        return totals

    def tick(self) -> dict[str, Any]:
        """
        Make one snapshot, keep it and push it to the open pages.
        """
        prev = self._prev if self._prev is not None else self._totals()
        cur = self._totals()
        self._prev = cur
        self._windows.append([a - b for a, b in zip(cur["counts"], prev["counts"])])
        snap = self._snapshot(prev, cur)
        self.history.append(snap)
        if self.viewers:
            frame = b"event: snapshot\ndata: " + dumps(snap) + b"\n\n"
            for viewer in list(self.viewers):
                viewer.write(frame)
        return snap

    def _snapshot(self, prev: dict[str, Any], cur: dict[str, Any]) -> dict[str, Any]:
        dt = cur["t"] - prev["t"] or self.interval
        n = sum(a - b for a, b in zip(cur["counts"], prev["counts"]))
        window = [sum(col) for col in zip(*self._windows)] if self._windows else []

        def ms(q: float) -> float | None:
            v = quantile(BUCKETS, window, q)
            return None if v is None else round(v * 1000, 3)

        classes = {f"{k}xx": _rate(cur["classes"][k], prev["classes"][k], dt) for k in (2, 3, 4, 5)}
        errors = {code: _rate(c, prev["errors"].get(code, 0), dt)
                  for code, c in cur["errors"].items() if c != prev["errors"].get(code, 0)}
        status, before = cur["status"], prev["status"]
        snap: dict[str, Any] = {
            "t": round(cur["t"], 3),
            "rps": round(n / dt, 3),
            "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99)},
            "status_rps": classes,
            "errors_rps": errors,
            "in_flight": self.observer.in_flight,
            "lag_ms": round(self.lag.take_worst() * 1000, 3) if self.lag is not None else None,
        }
        quota = status.get("quota")
        if quota:
            old = before.get("quota", {}).get("categories", {})
            snap["quota"] = {
                name: {"running": c.get("running", 0), "queued": c.get("queued", 0),
                       "zombies": c.get("zombies", 0),
                       "rejected_rps": _rate(c.get("rejected", 0),
                                             old.get(name, {}).get("rejected", 0), dt)}
                for name, c in quota.get("categories", {}).items()}
        workers = status.get("workers")
        if workers:
            snap["workers"] = {
                "calls_rps": _rate(workers.get("completed", 0),
                                   before.get("workers", {}).get("completed", 0), dt),
                "size": workers.get("size", 0),
                "busy": sum(1 for w in workers.get("workers", []) if w.get("in_flight")),
                "in_flight": workers.get("in_flight", 0),
                "queued": workers.get("queued", 0),
                "restarts": workers.get("restarts", 0),
            }
        comet = status.get("comet")
        if comet:
            old = before.get("comet", {})
            snap["comet"] = {
                "connections": dict(comet.get("connections_by_transport", {})),
                "published_rps": _rate(comet.get("published", 0), old.get("published", 0), dt),
                "delivered_rps": _rate(comet.get("delivered", 0), old.get("delivered", 0), dt),
            }
        backends = status.get("backends")
        if isinstance(backends, dict) and backends:
            old = before.get("backends", {}) or {}
            snap["backends"] = {
                service: self._backend(svc, old.get(service) or {}, dt)
                for service, svc in backends.items() if isinstance(svc, dict)}
        return snap

    @staticmethod
    def _backend(svc: dict[str, Any], old: dict[str, Any], dt: float) -> dict[str, Any]:
        def total(s: dict[str, Any], key: str) -> float:
            eps = _endpoint_table(s)
            return sum(_count(ep.get(key)) for ep in eps.values() if isinstance(ep, dict))

        eps = _endpoint_table(svc)
        return {
            "endpoints": len(eps),
            "ejected": sum(1 for ep in eps.values() if isinstance(ep, dict) and ep.get("ejected")),
            "calls_rps": _rate(total(svc, "calls"), total(old, "calls"), dt),
            "errors_rps": _rate(total(svc, "errors"), total(old, "errors"), dt),
            # the backend client's pools say "pool_waiting"; other sources "waiters"
            "waiters": total(svc, "waiters") + total(svc, "pool_waiting")
                       + _count(svc.get("waiters")),
        }

    # -- viewers

    def open_stream(self) -> DashboardStream:
        if len(self.viewers) >= self.max_viewers:
            raise ServiceUnavailable(f"{self.max_viewers} dashboards are open already",
                                     code="dashboard_busy", retry_after=10)
        return DashboardStream(self)


class DashboardStream(Stream):
    """
    One open dashboard page: the history first, then each snapshot.
    """

    __slots__ = ("dashboard", "request", "_done")

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self.request: Request | None = None
        self._done: Deferred[None] = Deferred()

    def serve(self, responder: IStreamSink) -> None:
        # The built-in route's stream is served by pipecomet's own
        # responders, which all write to a twisted.web request.
        request = self.request = cast("Responder", responder).request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        channel = request.channel
        if channel is not None:
            # Held for as long as the page is open: not an idle connection.
            channel.setTimeout(None)
        self.dashboard.viewers.add(self)
        dash = self.dashboard
        request.write(b"retry: 2000\nevent: history\ndata: " + dumps({
            "app": dash.app_name, "interval": dash.interval, "process": dash.process(),
            "snapshots": list(dash.history)}) + b"\n\n")

    def write(self, frame: bytes) -> None:
        request = self.request
        if request is None or request.finished:
            self.cancel()
            return
        request.write(frame)

    def end(self) -> None:
        """
        The server stops: finish the response; the page reconnects later.
        """
        request = self.request
        self.dashboard.viewers.discard(self)
        if request is not None and not request.finished:
            request.finish()
        if not self._done.called:
            self._done.callback(None)

    def cancel(self) -> None:
        self.dashboard.viewers.discard(self)
        if not self._done.called:
            self._done.callback(None)

    def when_done(self) -> Deferred[None]:
        return self._done


class DashboardService(Service):
    """
    Runs the reactor-lag probe and the dashboard's snapshots with the app,
    and counts the thread pipes' times once a second (so that they do not
    pile up in an app nobody scrapes).
    """

    name = "observe"

    def __init__(self, lag: LagProbe | None, dashboard: Dashboard | None,
                 drain: Callable[[], None] | None = None,
                 reactor: IReactorTime | None = None) -> None:
        self.lag = lag
        self.dashboard = dashboard
        self._drain: LoopingCall | None = None
        if drain is not None:
            self._drain = LoopingCall(drain)
            if reactor is not None:
                self._drain.clock = reactor

    def startService(self) -> None:
        super().startService()
        if self.lag is not None:
            self.lag.start()
        if self.dashboard is not None:
            self.dashboard.start()
        if self._drain is not None and not self._drain.running:
            self._drain.start(1.0, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self.lag is not None:
            self.lag.stop()
        if self.dashboard is not None:
            self.dashboard.stop()
        if self._drain is not None and self._drain.running:
            self._drain.stop()


def asset_answer(name: str, cache: dict[str, bytes]) -> Answer:
    """
    The answer for dashboard file ``name`` (404 for any other name).
    """
    if name not in ASSETS:
        raise NotFound(f"no dashboard file {name!r}")
    body = cache.get(name)
    if body is None:
        body = cache[name] = asset(name)
    return Answer(body=body, content_type=ASSETS[name], headers={"Cache-Control": "no-cache"})
