"""
What a running app shares with its pipes: the reactor and the pools.

One :class:`Runtime` per :class:`~pipecomet.App`.  The chain runner reaches
the quota thread pool, the worker pool and the event keeper through it, so
pipes never import globals and tests can hand in fakes and a fake clock.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

__all__ = ["Runtime"]


@attrs.define(eq=False)
class Runtime:
    """
    The parts a chain may use while it runs.

    :ivar reactor: the reactor every timed call and socket goes through.
    :ivar quota: the quota thread pool (``QuotaPool``) for ``thread`` pipes.
    :ivar workers: the worker process pool (``WorkerPool``) for ``process`` pipes.
    :ivar events: the ``EventKeeper`` for condition pipes.
    :ivar comet: the ``CometHub`` (comet push), when ``[comet]`` is installed.
    :ivar bus: the publish/subscribe bus behind the event keeper.
    :ivar backends: the backend services (``pipecomet._backend.Backends``)
        that ``ctx.backend(name)`` reaches.
    :ivar status_sources: name → callable giving a JSON-able dict of live
        figures; ``/_pipecomet/status`` shows them all.
    """

    reactor: Any
    quota: Any = None
    workers: Any = None
    events: Any = None
    comet: Any = None
    bus: Any = None
    lazy: Any = None
    config: Any = None
    backends: Any = None
    status_sources: dict[str, Callable[[], Any]] = attrs.field(factory=dict)

    def status(self) -> dict[str, Any]:
        """
        Every registered part's live figures, by part name.
        """
        return {name: source() for name, source in self.status_sources.items()}
