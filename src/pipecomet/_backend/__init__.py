"""
Backend services: a lean HTTP/1.1 client to named services, with discovery,
balancing, ejection, deadlines and a retry budget (DESIGN.md, "backend").

Modules: ``_protocol`` (one HTTP/1.1 connection on httptools), ``_pool``
(connections per endpoint: cap, wait queue, upkeep), ``_balancer`` (P2C,
ejection, retry budget), ``_service`` (a service and its calls, the
``[backends]`` installer), ``_response``, ``_pipes`` (``call``, ``proxy``),
``_config``, ``_errors``, ``_discovery``.
"""

from ._config import BackendsConfig, BalancerConfig, PoolConfig, RetryConfig, ServiceConfig
from ._discovery import DiscoveryConfig, Endpoint, IDiscovery, StaticDiscovery, make_discovery
from ._errors import (
    BackendBusy,
    BackendError,
    BackendQueueTimeout,
    BackendResponseTooLarge,
    BackendTimeout,
    NoBackend,
    UnknownBackend,
)
from ._pipes import call, proxy
from ._response import Response
from ._service import Backends, BackendService, install

__all__ = [
    "BackendsConfig",
    "BalancerConfig",
    "PoolConfig",
    "RetryConfig",
    "ServiceConfig",
    "DiscoveryConfig",
    "Endpoint",
    "IDiscovery",
    "StaticDiscovery",
    "make_discovery",
    "BackendBusy",
    "BackendError",
    "BackendQueueTimeout",
    "BackendResponseTooLarge",
    "BackendTimeout",
    "NoBackend",
    "UnknownBackend",
    "call",
    "proxy",
    "Response",
    "Backends",
    "BackendService",
    "install",
]
