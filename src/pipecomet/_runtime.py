"""
What a running app shares with its pipes: the reactor and the parts.

One :class:`Runtime` per :class:`~pipecomet.App`.  The chain runner reaches
the quota thread pool, the worker pool, the event keeper and the comet hub
through it, so pipes never import globals and tests can hand in fakes and a
fake clock.  Each part is None until its ``[table]``'s installer has put it
there (``App.configure``); the configuration is an empty one until then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, cast

import attrs

from ._config import Config

if TYPE_CHECKING:
    from ._backend import Backends
    from ._comet import CometHub
    from ._events import EventKeeper
    from ._json import JSON
    from ._lazy import LazySiteFactory
    from ._quota import QuotaPool
    from ._workers._pool import WorkerPool
    from .interfaces import IBus, IPipecometReactor

__all__ = ["Runtime"]


@attrs.define(eq=False)
class Runtime:
    """
    The parts a chain may use while it runs.

    :ivar reactor: the reactor every timed call and socket goes through
        (a fake one in unit tests); the global one when None is given,
        looked up on first use (never at import, so ``twistd -r`` works).
    :ivar quota: the quota thread pool for ``thread`` pipes.
    :ivar workers: the worker process pool for ``process`` pipes.
    :ivar events: the event keeper of condition pipes.
    :ivar comet: the comet hub of many-mode condition pipes (comet streams).
    :ivar bus: the publish/subscribe bus behind the comet hub.
    :ivar lazy: the ``[limits]`` part: lazy bodies and the site factory.
    :ivar config: the configuration the app was configured with.
    :ivar backends: the backend services ``ctx.backend(name)`` reaches.
    :ivar status_sources: name → callable giving a JSON-able dict of live
        figures; ``/_pipecomet/status`` shows them all.
    """

    _reactor: IPipecometReactor | None = attrs.field(alias="reactor")
    quota: QuotaPool | None = None
    workers: WorkerPool | None = None
    events: EventKeeper | None = None
    comet: CometHub | None = None
    bus: IBus | None = None
    lazy: LazySiteFactory | None = None
    config: Config = attrs.field(factory=Config)
    backends: Backends | None = None
    status_sources: dict[str, Callable[[], JSON]] = attrs.field(factory=dict)

    @property
    def reactor(self) -> IPipecometReactor:
        """
        The reactor given, else the global one (looked up now).
        """
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = cast("IPipecometReactor", reactor)
        return self._reactor

    @reactor.setter
    def reactor(self, reactor: IPipecometReactor) -> None:
        self._reactor = reactor

    def status(self) -> dict[str, JSON]:
        """
        Every registered part's live figures, by part name.
        """
        return {name: source() for name, source in self.status_sources.items()}
