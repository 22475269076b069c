"""
``[metrics]`` and ``[logging]``: what the observability part exposes and writes.
"""

from __future__ import annotations

import attrs
from attrs import validators as v

__all__ = ["MetricsConfig", "LoggingConfig"]

LOG_FORMATS = ("text", "json")


@attrs.frozen
class MetricsConfig:
    """
    ``[metrics]``: the Prometheus endpoint ``/_pipecomet/metrics`` and the
    live dashboard ``/_pipecomet/dashboard``.

    :ivar enabled: serve the metrics and dashboard routes and keep the figures.
    :ivar allow_loopback: answer clients on a loopback address (127.0.0.0/8,
        ::1) without a token.
    :ivar token: when set, a client sending ``Authorization: Bearer <token>``
        (or ``?token=`` on the dashboard, which a browser's EventSource
        needs) is answered from any address.  Everyone else gets 403.
    :ivar pipe_timing: time every pipe (``pipecomet_pipe_duration_seconds``);
        costs about a microsecond per pipe.
    :ivar lag_interval: seconds between the reactor-lag probe's timed calls.
    :ivar scrape_timeout: with ``--processes N``, seconds a scrape waits for
        the other serving processes' figures; one that has not answered by
        then is left out of that scrape (``pipecomet_scrape_process_up`` 0).
    :ivar dashboard: serve the dashboard page and its SSE stream.
    :ivar dashboard_interval: seconds between dashboard snapshots.
    :ivar dashboard_history: snapshots kept for a page that opens later.
    :ivar dashboard_viewers: dashboard streams open at once; one more gets 503.
    """

    enabled: bool = attrs.field(default=True, validator=v.instance_of(bool))
    allow_loopback: bool = attrs.field(default=True, validator=v.instance_of(bool))
    token: str = attrs.field(default="", validator=v.instance_of(str))
    pipe_timing: bool = attrs.field(default=True, validator=v.instance_of(bool))
    lag_interval: float = attrs.field(default=0.5, converter=float, validator=v.gt(0))
    scrape_timeout: float = attrs.field(default=2.0, converter=float, validator=v.gt(0))
    dashboard: bool = attrs.field(default=True, validator=v.instance_of(bool))
    dashboard_interval: float = attrs.field(default=1.0, converter=float, validator=v.gt(0))
    dashboard_history: int = attrs.field(default=300, validator=[v.instance_of(int), v.ge(1)])
    dashboard_viewers: int = attrs.field(default=32, validator=[v.instance_of(int), v.ge(1)])


@attrs.frozen
class LoggingConfig:
    """
    ``[logging]``: the server log's format and the access log's buffering.
    Where the access log goes is ``server.access_log``.

    :ivar format: ``"text"`` (twistd's own lines) or ``"json"`` (one JSON
        object per line; the twistd option ``--log-format`` sets it).
    :ivar file: with ``format = "json"``, the file the server log goes to
        (empty: standard output).
    :ivar access_format: ``"text"`` or ``"json"`` access-log lines; empty:
        the same as ``format``.
    :ivar access_flush_interval: seconds between two writes of the buffered
        access-log lines.
    :ivar access_buffer_bytes: the buffer is written as soon as it holds
        this many bytes.
    :ivar access_max_pending_bytes: bytes handed to the writer thread but not
        written yet (a slow disk or a full pipe); past it, lines are dropped
        and counted rather than blocking the reactor.
    """

    format: str = attrs.field(default="text", validator=v.in_(LOG_FORMATS))
    file: str = attrs.field(default="", validator=v.instance_of(str))
    access_format: str = attrs.field(default="", validator=v.in_(("", *LOG_FORMATS)))
    access_flush_interval: float = attrs.field(default=1.0, converter=float, validator=v.gt(0))
    access_buffer_bytes: int = attrs.field(default=65536,
                                           validator=[v.instance_of(int), v.ge(1)])
    access_max_pending_bytes: int = attrs.field(default=8 * 1024 * 1024,
                                                validator=[v.instance_of(int), v.ge(1)])

    @property
    def access_line_format(self) -> str:
        return self.access_format or self.format
