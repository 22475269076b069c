"""
``[backends]``: the backend services an app calls, one table per service
(``[backends.NAME]``), each with its discovery, pool, balancing and
retry settings.
"""

from __future__ import annotations

import attrs
from attrs import validators as v

from ._discovery import DiscoveryConfig

__all__ = ["PoolConfig", "BalancerConfig", "RetryConfig", "ServiceConfig", "BackendsConfig",
           "IDEMPOTENT_METHODS"]

#: Methods a retry may repeat (RFC 9110 9.2.2).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

_pos = [v.instance_of(float), v.gt(0.0)]


@attrs.frozen
class PoolConfig:
    """
    ``[backends.NAME.pool]``: connections to each endpoint.

    :ivar max_connections: hard cap of connections open to one endpoint
        (busy, idle and connecting).
    :ivar queue: calls that may wait for a connection of one endpoint; one
        more gets 503 ``backend_busy`` with ``Retry-After``.
    :ivar queue_timeout: seconds a call may wait for a connection; past it
        503 ``backend_queue_timeout`` (or 504 when the call's deadline
        comes first).
    :ivar connect_timeout: seconds a TCP connect may take (a failure counts
        as the endpoint's failure: 502 ``backend_error`` when no retry helps).
    :ivar idle_timeout: seconds a kept-alive connection may stay unused
        before it is closed.
    :ivar max_lifetime: seconds after which a connection is closed once its
        call ends (0: no limit), so endpoints behind a load balancer or DNS
        change get fresh connections.
    """

    max_connections: int = attrs.field(default=128, validator=[v.instance_of(int), v.ge(1)])
    queue: int = attrs.field(default=1024, validator=[v.instance_of(int), v.ge(0)])
    queue_timeout: float = attrs.field(default=1.0, converter=float, validator=_pos)
    connect_timeout: float = attrs.field(default=1.0, converter=float, validator=_pos)
    idle_timeout: float = attrs.field(default=30.0, converter=float, validator=_pos)
    max_lifetime: float = attrs.field(default=300.0, converter=float,
                                      validator=[v.instance_of(float), v.ge(0.0)])


@attrs.frozen
class BalancerConfig:
    """
    ``[backends.NAME.balancer]``: picking an endpoint and keeping
    failing ones out.

    :ivar failures: consecutive failures (refused, reset, protocol error,
        timeout) after which an endpoint is ejected.
    :ivar ejection_base: seconds of the first ejection; each further one
        doubles, with ±50 % jitter.
    :ivar ejection_max: longest ejection in seconds.
    :ivar max_ejected_share: at most this share of the endpoints is ejected
        at once (0–1); an endpoint over it stays in.
    :ivar panic_threshold: when fewer than this share of the endpoints is
        healthy, calls go to all of them again (panic mode), since a
        partial outage that ejects most endpoints would otherwise overload
        the rest.
    :ivar ewma_decay: seconds over which the latency average forgets (used
        to break ties between two endpoints with as many calls in flight).
    """

    failures: int = attrs.field(default=5, validator=[v.instance_of(int), v.ge(1)])
    ejection_base: float = attrs.field(default=1.0, converter=float, validator=_pos)
    ejection_max: float = attrs.field(default=30.0, converter=float, validator=_pos)
    max_ejected_share: float = attrs.field(default=0.5, converter=float,
                                           validator=[v.instance_of(float), v.ge(0.0), v.le(1.0)])
    panic_threshold: float = attrs.field(default=0.5, converter=float,
                                         validator=[v.instance_of(float), v.ge(0.0), v.le(1.0)])
    ewma_decay: float = attrs.field(default=10.0, converter=float, validator=_pos)


@attrs.frozen
class RetryConfig:
    """
    ``[backends.NAME.retry]``: retrying idempotent calls.

    :ivar retries: further attempts a call may make on another endpoint after
        a connection failure (idempotent methods only; never after the
        deadline; never once the backend answered anything).
    :ivar budget_ratio: retries may add at most this share of the calls made
        in the last ``budget_window`` seconds ...
    :ivar budget_min_per_second: ... plus this many per second, so retries
        never multiply an outage.
    :ivar budget_window: seconds the budget looks back over.
    """

    retries: int = attrs.field(default=2, validator=[v.instance_of(int), v.ge(0)])
    budget_ratio: float = attrs.field(default=0.2, converter=float,
                                      validator=[v.instance_of(float), v.ge(0.0)])
    budget_min_per_second: float = attrs.field(default=10.0, converter=float,
                                               validator=[v.instance_of(float), v.ge(0.0)])
    budget_window: float = attrs.field(default=10.0, converter=float, validator=_pos)


def _check_headers(instance: object, attribute: attrs.Attribute[dict[str, str]],
                   value: object) -> None:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(x, str) for k, x in value.items()):
        raise ValueError("must be a table of header name = string value")


@attrs.frozen
class ServiceConfig:
    """
    ``[backends.NAME]``: one backend service.

    :ivar discovery: where the endpoints come from (``[...discovery]``).
    :ivar pool: connections per endpoint (``[...pool]``).
    :ivar balancer: endpoint choice and ejection (``[...balancer]``).
    :ivar retry: retries and their budget (``[...retry]``).
    :ivar timeout: default per-call deadline in seconds (connection wait,
        connect, request and whole response): past it 504
        ``backend_timeout``.  A call may pass its own.
    :ivar max_response_bytes: largest response body read; past it the
        connection is closed and the call fails with 502
        ``backend_response_too_large``.
    :ivar buffer_bytes: a response body up to this size is read whole before
        the call returns; a larger one is handed over as it arrives (the
        connection is paused while nobody reads).
    :ivar headers: headers sent with every call (e.g. an API token).
    :ivar deadline_header: header carrying the call's remaining deadline in
        milliseconds ("" to send none).
    :ivar retry_after: seconds put in ``Retry-After`` of the service's 503s.
    :ivar host_header: ``Host`` sent to the backend; the endpoint's
        ``host:port`` when empty.
    """

    discovery: DiscoveryConfig = attrs.field(factory=DiscoveryConfig)
    pool: PoolConfig = attrs.field(factory=PoolConfig)
    balancer: BalancerConfig = attrs.field(factory=BalancerConfig)
    retry: RetryConfig = attrs.field(factory=RetryConfig)
    timeout: float = attrs.field(default=5.0, converter=float, validator=_pos)
    max_response_bytes: int = attrs.field(default=16 * 2**20, validator=[v.instance_of(int), v.ge(0)])
    buffer_bytes: int = attrs.field(default=256 * 2**10, validator=[v.instance_of(int), v.ge(0)])
    headers: dict[str, str] = attrs.field(factory=dict, validator=_check_headers)
    deadline_header: str = attrs.field(default="X-Request-Deadline-Ms",
                                       validator=v.instance_of(str))
    retry_after: float = attrs.field(default=1.0, converter=float, validator=_pos)
    host_header: str = attrs.field(default="", validator=v.instance_of(str))


@attrs.frozen
class BackendsConfig:
    """
    ``[backends]``: the backend services, one ``[backends.NAME]``
    table each (the names are the table's own keys; in Python,
    ``BackendsConfig(services={"users": ServiceConfig(...)})``).

    :ivar services: service name → its settings.
    """

    services: dict[str, ServiceConfig] = attrs.field(factory=dict,
                                                     metadata={"named_tables": True})

    @services.validator
    def _check(self, attribute: attrs.Attribute[dict[str, ServiceConfig]], value: object) -> None:
        if not isinstance(value, dict):
            raise ValueError("must be a table of services")
        for name, service in value.items():
            if not isinstance(service, ServiceConfig):
                raise ValueError(f"{name}: expected a table of service settings")
