"""
pipecomet's configuration: the TOML tables, one frozen attrs class each,
and :func:`register_section`, the hook an app uses to add a table of its
own (the demo's ``[demo]``).  ``docs/configuration.md`` lists every key.
"""

from ._backend import BackendsConfig, DiscoveryConfig, ServiceConfig
from ._bus import BusConfig
from ._comet import CometConfig
from ._config import Config, ConfigError, ServerConfig, load_config, register_section
from ._lazy import LimitsConfig
from ._observe import LoggingConfig, MetricsConfig
from ._quota import CategoryConfig, QuotaConfig
from ._workers import WorkersConfig

__all__ = [
    "BackendsConfig",
    "BusConfig",
    "CategoryConfig",
    "CometConfig",
    "Config",
    "ConfigError",
    "DiscoveryConfig",
    "LimitsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "QuotaConfig",
    "ServerConfig",
    "ServiceConfig",
    "WorkersConfig",
    "load_config",
    "register_section",
]
