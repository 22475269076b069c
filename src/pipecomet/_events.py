"""
The EventKeeper: requests that wait for external events (the seed's
condition pipes).

An :class:`Event` is one waiter tied to one or more keys.  Its lifecycle is
the seed's: ``init`` → ``invoke`` (repeatable) → ``complete`` or
``timeout``, plus ``cancelled`` when its client goes away.  Active
transitions come from the outside (:meth:`EventKeeper.fire`,
:meth:`EventKeeper.complete`) and run the event's listener at once; the
passive one, the timeout, is a timed call on the reactor: nothing is ever
scanned or polled.  Leaving the waiting states removes the event from every
key and cancels its timer, so a finished event holds nothing.

:class:`Condition` is the pipe that waits: in ``once`` mode it returns a
Deferred that the first firing of its key completes (an async backend that
answers later: the seed's Push & Complete); in ``many`` mode it returns a
comet subscription (see :mod:`pipecomet._comet`), fired by every publish on
its topics until an end event, a timeout or the client leaving.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Hashable, Iterable, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ._errors import GatewayTimeout
from ._interfaces import IEventListener

__all__ = [
    "EventState",
    "EventAction",
    "InvalidTransition",
    "Event",
    "EventListener",
    "EventKeeper",
    "Condition",
    "TRANSITIONS",
]

log = Logger()


class EventState(enum.Enum):
    INIT = "init"
    INVOKE = "invoke"
    COMPLETE = "complete"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class EventAction(enum.Enum):
    INVOKE = "invoke"
    COMPLETE = "complete"
    TIMEOUT = "timeout"
    CANCEL = "cancel"


_S, _A = EventState, EventAction

#: (state, action) → next state.  Anything else is an :class:`InvalidTransition`.
TRANSITIONS: dict[tuple[EventState, EventAction], EventState] = {
    (_S.INIT, _A.INVOKE): _S.INVOKE,
    (_S.INVOKE, _A.INVOKE): _S.INVOKE,
    (_S.INIT, _A.COMPLETE): _S.COMPLETE,
    (_S.INVOKE, _A.COMPLETE): _S.COMPLETE,
    (_S.INIT, _A.TIMEOUT): _S.TIMEOUT,
    (_S.INVOKE, _A.TIMEOUT): _S.TIMEOUT,
    (_S.INIT, _A.CANCEL): _S.CANCELLED,
    (_S.INVOKE, _A.CANCEL): _S.CANCELLED,
}

#: States an event waits in (it is registered under its keys).
WAITING = frozenset({_S.INIT, _S.INVOKE})


class InvalidTransition(RuntimeError):
    """
    An action that the event's state does not allow (e.g. invoking a
    completed event).
    """


@implementer(IEventListener)
class EventListener:
    """
    What an event runs on its transitions.  Subclass and override; the
    defaults do nothing.
    """

    __slots__ = ()

    def on_invoke(self, event: Event, value: Any) -> None: ...
    def on_complete(self, event: Event, value: Any) -> None: ...
    def on_timeout(self, event: Event) -> None: ...
    def on_cancel(self, event: Event) -> None: ...


class Event:
    """
    One waiter: its keys, its state, its listener and its deadline.

    Made by :meth:`EventKeeper.listen`; driven by the keeper and by its own
    timer.
    """

    __slots__ = ("keeper", "keys", "listener", "state", "timer", "invocations", "__weakref__")

    def __init__(self, keeper: EventKeeper, keys: tuple[Hashable, ...],
                 listener: EventListener) -> None:
        self.keeper = keeper
        self.keys = keys
        self.listener = listener
        self.state = EventState.INIT
        self.timer: IDelayedCall | None = None
        self.invocations = 0

    def __repr__(self) -> str:
        return f"<Event {self.keys!r} {self.state.value}>"

    @property
    def waiting(self) -> bool:
        return self.state in WAITING

    def _move(self, action: EventAction) -> None:
        try:
            self.state = TRANSITIONS[self.state, action]
        except KeyError:
            raise InvalidTransition(f"cannot {action.value} an event in state "
                                    f"{self.state.value}") from None

    def invoke(self, value: Any = None) -> None:
        """
        Run the listener once and keep waiting.
        """
        self._move(EventAction.INVOKE)
        self.invocations += 1
        self.keeper.invoked += 1
        self.listener.on_invoke(self, value)

    def complete(self, value: Any = None) -> None:
        """
        Run the listener once and stop waiting.
        """
        self._move(EventAction.COMPLETE)
        self.keeper._release(self)
        self.keeper.completed += 1
        self.listener.on_complete(self, value)

    def cancel(self) -> None:
        """
        Stop waiting without running anything but ``on_cancel``; a no-op
        once the event has ended.
        """
        if self.state not in WAITING:
            return
        self._move(EventAction.CANCEL)
        self.keeper._release(self)
        self.keeper.cancelled += 1
        self.listener.on_cancel(self)

    def _timed_out(self) -> None:
        self.timer = None
        if self.state not in WAITING:
            return
        self._move(EventAction.TIMEOUT)
        self.keeper._release(self)
        self.keeper.timed_out += 1
        self.listener.on_timeout(self)

    def reschedule(self, timeout: float | None) -> None:
        """
        Move the deadline to ``timeout`` seconds from now (None: no deadline).
        """
        if self.timer is not None:
            self.timer.cancel()
            self.keeper.timers -= 1
            self.timer = None
        if timeout is not None and self.state in WAITING:
            self.timer = self.keeper.reactor.callLater(timeout, self.keeper._fire_timer, self)
            self.keeper.timers += 1


class _OnceListener(EventListener):
    """
    Turns an event into a Deferred: the first firing completes it.
    """

    __slots__ = ("deferred", "timeout_value", "event")

    def __init__(self, timeout_value: Any) -> None:
        self.deferred: Deferred[Any] = Deferred(self._cancelled)
        self.timeout_value = timeout_value
        self.event: Event | None = None

    def _cancelled(self, d: Deferred[Any]) -> None:
        # Deferred.cancel() on a waiter: the event lets go of its keys.
        if self.event is not None:
            self.event.cancel()

    def on_invoke(self, event: Event, value: Any) -> None:
        event.complete(value)

    def on_complete(self, event: Event, value: Any) -> None:
        if not self.deferred.called:
            self.deferred.callback(value)

    def on_timeout(self, event: Event) -> None:
        if self.deferred.called:
            return
        tv = self.timeout_value
        if isinstance(tv, BaseException):
            self.deferred.errback(tv)
        elif callable(tv):
            try:
                self.deferred.callback(tv())
            except BaseException as e:
                self.deferred.errback(e)
        else:
            self.deferred.callback(tv)

    def on_cancel(self, event: Event) -> None:
        if not self.deferred.called:
            self.deferred.errback(CancelledError())


class EventKeeper:
    """
    Keeps the waiting events by key.

    ``fire``, ``complete`` and ``timeout`` are the seed's active and passive
    transitions; each returns how many waiters it reached.

    :param reactor: gives ``callLater`` for deadlines (a ``Clock`` in tests).
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self._by_key: dict[Hashable, dict[Event, None]] = {}
        self.timers = 0
        self.events = 0
        self.invoked = 0
        self.completed = 0
        self.timed_out = 0
        self.cancelled = 0

    # -- waiting

    def listen(self, keys: Hashable | Iterable[Hashable], listener: EventListener,
               timeout: float | None = None, *, many: bool = False) -> Event:
        """
        Register a waiter on ``keys`` (one key, or several with ``many=True``
        and an iterable) with a deadline ``timeout`` seconds from now.
        """
        # With many=True ``keys`` is an iterable of keys (a str key is
        # iterable too: only the caller knows which it meant).
        ks: tuple[Hashable, ...] = (tuple(cast(Iterable[Hashable], keys)) if many
                                    else (cast(Hashable, keys),))
        event = Event(self, ks, listener)
        for k in ks:
            waiters = self._by_key.get(k)
            if waiters is None:
                waiters = self._by_key[k] = {}
            waiters[event] = None
        self.events += 1
        if timeout is not None:
            event.timer = self.reactor.callLater(timeout, self._fire_timer, event)
            self.timers += 1
        return event

    def wait(self, key: Hashable, timeout: float | None = None, *,
             on_timeout: Any = None) -> Deferred[Any]:
        """
        A Deferred that fires with the value of the next :meth:`fire` or
        :meth:`complete` of ``key`` (the "once" mode).  Cancelling it lets go
        of the key at once.

        :param on_timeout: what the Deferred gives when ``timeout`` passes:
            an exception instance fails it (default: 504 ``GatewayTimeout``),
            a callable's result or any other value is its result.
        """
        if on_timeout is None:
            on_timeout = GatewayTimeout(f"no event for {key!r} within {timeout}s",
                                        code="event_timeout")
        listener = _OnceListener(on_timeout)
        event = self.listen(key, listener, timeout)
        listener.event = event
        return listener.deferred

    # -- firing

    def fire(self, key: Hashable, value: Any = None) -> int:
        """
        Invoke every waiter of ``key`` with ``value`` (a once-mode waiter
        completes).  Returns the number of waiters reached.
        """
        return self._reach(key, "invoke", value)

    invoke = fire

    def complete(self, key: Hashable, value: Any = None) -> int:
        """
        Complete every waiter of ``key`` (the end event).  Returns the
        number of waiters reached.
        """
        return self._reach(key, "complete", value)

    def _reach(self, key: Hashable, transition: str, value: Any) -> int:
        waiters = self._by_key.get(key)
        if not waiters:
            return 0
        reached = 0
        for event in tuple(waiters):
            if event.state in WAITING:
                reached += 1
                try:
                    getattr(event, transition)(value)
                except Exception:
                    log.failure("listener of {key!r} failed on {transition}", key=key,
                                transition=transition)
        return reached

    # -- books

    def _fire_timer(self, event: Event) -> None:
        self.timers -= 1
        event.timer = None
        try:
            event._timed_out()
        except Exception:
            log.failure("listener of {keys!r} failed on timeout", keys=event.keys)

    def _release(self, event: Event) -> None:
        for k in event.keys:
            waiters = self._by_key.get(k)
            if waiters is not None:
                waiters.pop(event, None)
                if not waiters:
                    del self._by_key[k]
        if event.timer is not None:
            event.timer.cancel()
            event.timer = None
            self.timers -= 1
        self.events -= 1

    def waiters(self, key: Hashable | None = None) -> int:
        """
        Waiting events on ``key``, or in all when None.
        """
        if key is None:
            return self.events
        return len(self._by_key.get(key, ()))

    def keys(self) -> list[Hashable]:
        return list(self._by_key)

    def status(self) -> dict[str, Any]:
        return {
            "waiters": self.events,
            "keys": len(self._by_key),
            "timers": self.timers,
            "invoked": self.invoked,
            "completed": self.completed,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
        }


def _key_of(key: Any) -> Callable[[Any, Any, Any], Any]:
    if callable(key):
        return key
    if isinstance(key, str) and "{" in key:
        def fmt(inp: Any, ctx: Any, res: Any) -> str:
            return key.format(**inp.path_params, **inp.query)
        return fmt
    return lambda inp, ctx, res: key


@attrs.frozen
class Condition:
    """
    A condition pipe: the request waits here for external events.

    :param key: in ``once`` mode the event key; in ``many`` mode the topic
        or topics.  A string (``{name}`` is filled from path and query
        parameters) or ``key(inp, ctx, res)``.
    :param mode: ``"once"``: the pipe's result is the value of the first
        :meth:`EventKeeper.fire` of the key and the chain goes on;
        ``"many"``: the response becomes a comet stream of the topics
        (SSE, long-poll or NDJSON by the route's responders).
    :param timeout: seconds to wait in ``once`` mode (then 504
        ``event_timeout``, or ``on_timeout``); ``many`` mode takes its
        timeouts from the transport and the ``[comet]`` table.
    :param on_timeout: ``once`` mode: the result (or exception) on timeout.
    """

    key: Any
    mode: str = attrs.field(default="once", validator=attrs.validators.in_(("once", "many")))
    timeout: float | None = None
    name: str = "condition"
    on_timeout: Any = None
    _key: Any = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_key", _key_of(self.key))

    @property
    def __name__(self) -> str:  # Pipe() names a plain callable after it
        return self.name

    def __call__(self, inp: Any, ctx: Any, res: Any) -> Any:
        runtime = ctx.runtime
        keeper = runtime.events if runtime is not None else None
        if keeper is None:
            raise RuntimeError("condition pipe used but no event keeper is installed")
        key = self._key(inp, ctx, res)
        if self.mode == "once":
            return keeper.wait(key, self.timeout, on_timeout=self.on_timeout)
        hub = runtime.comet
        if hub is None:
            raise RuntimeError("many-mode condition used but no comet hub is installed")
        topics = [key] if isinstance(key, str) else list(key)
        return hub.subscription(inp, topics)
