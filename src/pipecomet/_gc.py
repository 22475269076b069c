"""
``[gc]``: how often the serving process runs Python's cyclic garbage
collector.

With thousands of calls in flight (a gateway in front of a slow backend),
every young-generation collection walks all the objects those calls keep
alive, and at Python's default threshold (a collection every 700
allocations) the collector took a third of a forwarded call's CPU
(``docs/backends.md``, "Where the CPU goes").  A higher threshold walks
them far less often; objects freed by reference counting never wait for it.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import attrs
from attrs import validators as v
from twisted.application.service import Service

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from ._app import App

__all__ = ["GCConfig", "GCTuning", "install"]


@attrs.frozen
class GCConfig:
    """
    ``[gc]``: the cyclic garbage collector of the serving process.

    :ivar threshold: allocations (less deallocations) between two
        young-generation collections, ``gc.set_threshold``'s first value;
        0 leaves Python's own (700).  20000 suits a gateway with thousands
        of calls in flight.
    :ivar freeze: move every object alive when the server starts (modules,
        classes, configuration) out of the collector's sight
        (``gc.freeze()``), so full collections walk only what serving made.
    """

    threshold: int = attrs.field(default=0, validator=[v.instance_of(int), v.ge(0)])
    freeze: bool = attrs.field(default=False, validator=v.instance_of(bool))


class GCTuning(Service):
    """
    Applies a :class:`GCConfig` while the app runs and puts the previous
    settings back when it stops.
    """

    name = "gc-tuning"

    def __init__(self, config: GCConfig) -> None:
        self.config = config
        self._previous: tuple[int, int, int] | None = None

    def startService(self) -> None:
        super().startService()
        config = self.config
        if config.threshold:
            self._previous = gc.get_threshold()
            _, gen1, gen2 = self._previous
            gc.set_threshold(config.threshold, gen1, gen2)
        if config.freeze:
            gc.collect()
            gc.freeze()

    def stopService(self) -> Deferred[None] | None:
        previous, self._previous = self._previous, None
        if previous is not None:
            gc.set_threshold(*previous)
        if self.config.freeze:
            gc.unfreeze()
        return super().stopService()


def install(app: App, config: GCConfig) -> None:
    """
    ``[gc]`` installer: a service that applies the settings when the app
    starts (nothing when both are left at their defaults).
    """
    if config.threshold or config.freeze:
        app.add_service(GCTuning(config))
