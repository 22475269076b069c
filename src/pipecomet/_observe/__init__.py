"""
Observability: request ids, Prometheus metrics, the buffered access log,
JSON server logs and the live dashboard.

``[logging]``'s installer (:func:`install_logging`) starts the access log;
``[metrics]``'s (:func:`install_metrics`) keeps the figures, probes the
reactor's lag and serves ``/_pipecomet/metrics`` and
``/_pipecomet/dashboard``.  Both feed on the app's
:class:`RequestObserver`, which :class:`~pipecomet.PipecometResource` calls
once per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .._chain import Answer, Pipe, PipeContext, PipeInput, PipeResult
from ._accesslog import AccessLog, AccessLogService, FileWriter, MemoryWriter
from ._config import LoggingConfig, MetricsConfig
from ._dashboard import ASSETS, Dashboard, DashboardService, DashboardStream, asset, asset_answer
from ._jsonlog import JSONLineObserver, LoggingRoot, open_log_file
from ._metrics import (
    CONTENT_TYPE,
    HTTPStats,
    LagProbe,
    MetricsResource,
    PipecometCollector,
    PipeTimes,
    check_access,
    exposition,
    make_registry,
)
from ._multiprocess import FamilyData, Gathered, families_of, merged_exposition
from ._requests import (
    CLIENT_GONE,
    KLEIN,
    UNMATCHED,
    RequestObserver,
    RequestRecord,
    note_error,
    trace_headers,
    valid_request_id,
)

if TYPE_CHECKING:
    from .._app import App

__all__ = [
    "AccessLog",
    "AccessLogService",
    "ASSETS",
    "CLIENT_GONE",
    "CONTENT_TYPE",
    "Dashboard",
    "DashboardService",
    "DashboardStream",
    "FileWriter",
    "HTTPStats",
    "JSONLineObserver",
    "KLEIN",
    "LagProbe",
    "LoggingConfig",
    "LoggingRoot",
    "MemoryWriter",
    "Metrics",
    "MetricsConfig",
    "MetricsResource",
    "PipeTimes",
    "PipecometCollector",
    "RequestObserver",
    "RequestRecord",
    "UNMATCHED",
    "asset",
    "check_access",
    "exposition",
    "install_logging",
    "install_metrics",
    "json_log_root",
    "make_registry",
    "note_error",
    "trace_headers",
    "valid_request_id",
]

log = Logger()

METRICS_PATH = "/_pipecomet/metrics"
DASHBOARD_PATH = "/_pipecomet/dashboard"
STREAM_PATH = "/_pipecomet/dashboard/stream"
ASSET_PATH = "/_pipecomet/dashboard/assets/<name>"


class Metrics:
    """
    The ``[metrics]`` part of one app: its figures, registry and dashboard
    (``app.observer.metrics``).
    """

    def __init__(self, app: App, config: MetricsConfig) -> None:
        reactor = app.reactor
        runtime = app.runtime
        self.config = config
        self.stats = HTTPStats()
        self.times = PipeTimes(reactor.seconds) if config.pipe_timing else None
        self.lag = LagProbe(reactor, config.lag_interval)

        def ring_bytes() -> int | None:
            workers = runtime.workers
            return 2 * workers.config.ring_bytes if workers is not None else None

        self.collector = PipecometCollector(
            status_sources=runtime.status_sources, stats=self.stats, times=self.times,
            lag=self.lag, observer=app.observer, workers=ring_bytes)
        self.registry = make_registry(self.collector)
        self.dashboard = Dashboard(
            reactor, stats=self.stats, lag=self.lag, status=runtime.status,
            observer=app.observer, interval=config.dashboard_interval,
            history=config.dashboard_history,
            max_viewers=config.dashboard_viewers, app_name=app.name) if config.dashboard else None
        self._assets: dict[str, bytes] = {}
        #: set when serving as one of several processes (:meth:`serve_as_process`)
        self.gather: Callable[[float], Deferred[Gathered | None]] | None = None
        self.process_index = ""

    def _allowed(self, inp: PipeInput, ctx: PipeContext, res: PipeResult) -> None:
        denied = check_access(inp.request, self.config.allow_loopback, self.config.token,
                              query_token=True)
        if denied is not None:
            raise denied

    def families(self) -> list[FamilyData]:
        """
        This app's metric families as JSON-ready data (what a serving
        process sends the supervisor for a scrape of the whole set).
        """
        return families_of(self.registry)

    def serve_as_process(self, index: int, total: int,
                         gather: Callable[[float], Deferred[Gathered | None]]) -> None:
        """
        This app is serving process ``index`` of ``total`` (``--processes``):
        a scrape answers for all of them, through ``gather`` (the
        supervisor's round of the processes, waiting up to
        ``[metrics] scrape_timeout``); the dashboard says which process
        it shows.
        """
        self.process_index = str(index)
        self.gather = gather
        if self.dashboard is not None:
            self.dashboard.app_name = f"{self.dashboard.app_name} · process {index} of {total}"

    def _metrics(self, inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Answer | Deferred[Answer]:
        if self.gather is None:
            return Answer(body=exposition(self.registry), content_type=CONTENT_TYPE)
        return self.gather(self.config.scrape_timeout).addCallback(self._merged)

    def _merged(self, gathered: Gathered | None) -> Answer:
        if gathered is None:
            # The supervisor did not answer: this process's own series,
            # still labelled, rather than nothing.
            log.warn("metrics: the supervisor did not answer the scrape; "
                     "serving process {index} answers for itself", index=self.process_index)
            gathered = {"processes": {self.process_index: self.families()},
                        "up": {self.process_index: True}, "supervisor": {}}
        return Answer(body=merged_exposition(gathered), content_type=CONTENT_TYPE)

    def _page(self, inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Answer:
        return asset_answer("dashboard.html", self._assets)

    def _asset(self, inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Answer:
        return asset_answer(inp.path_params["name"], self._assets)

    def _stream(self, inp: PipeInput, ctx: PipeContext, res: PipeResult) -> DashboardStream:
        assert self.dashboard is not None
        return self.dashboard.open_stream()

    def add_routes(self, app: App) -> None:
        allowed = Pipe(self._allowed, name="metrics_access")
        app.route(METRICS_PATH, [allowed, Pipe(self._metrics, name="metrics")])
        if self.dashboard is not None:
            app.route(DASHBOARD_PATH, [allowed, Pipe(self._page, name="dashboard")])
            app.route(STREAM_PATH, [allowed, Pipe(self._stream, name="dashboard_stream")])
            app.route(ASSET_PATH, [Pipe(self._asset, name="dashboard_asset")])


def install_metrics(app: App, config: MetricsConfig) -> Metrics | None:
    """
    ``[metrics]`` installer: keep the request figures, time the pipes of
    every route, probe the reactor's lag, and serve the metrics and the
    dashboard.
    """
    if not config.enabled:
        return None
    metrics = Metrics(app, config)
    observer: RequestObserver = app.observer
    observer.metrics = metrics
    observer.attach(app.reactor, stats=metrics.stats, unobserved=frozenset({STREAM_PATH}))
    if metrics.times is not None:
        for route in app.routes:
            route.chain = metrics.times.instrument(route.chain, route.path)
        observer.pipe_times = metrics.times
    if not any(r.path == METRICS_PATH for r in app.routes):
        metrics.add_routes(app)
    app.add_service(DashboardService(
        metrics.lag, metrics.dashboard,
        metrics.times.drain if metrics.times is not None else None, app.reactor))
    return metrics


def install_logging(app: App, config: LoggingConfig) -> AccessLog | None:
    """
    ``[logging]`` installer: the buffered access log, to where
    ``server.access_log`` says (``"on"``: standard output; ``"off"``; or a
    file path).
    """
    where = app.config.server.access_log
    if where == "off":
        return None
    reactor = app.reactor
    writer = FileWriter(reactor, "-" if where == "on" else where, config.access_max_pending_bytes)
    access = AccessLog(writer, config.access_line_format, config.access_buffer_bytes)
    app.observer.attach(reactor, access=access)
    app.runtime.status_sources["access_log"] = access.status
    app.add_service(AccessLogService(access, reactor, config.access_flush_interval))
    return access


def json_log_root(config: LoggingConfig) -> LoggingRoot:
    """
    The root service for ``twistd pipecomet --log-format json``: the server
    log goes to ``config.file`` (standard output when empty) as JSON lines.
    """
    return LoggingRoot(JSONLineObserver(open_log_file(config.file)))
