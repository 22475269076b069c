"""
The quota thread pool (the seed's virtual thread pool / JobDispatcher).

One :class:`twisted.python.threadpool.ThreadPool` of ``size`` threads is
shared by named *categories*.  Each category keeps ``reserve`` threads for
itself alone, may hold at most ``limit`` threads, lets at most ``queue``
jobs wait and fails a wait longer than ``queue_timeout`` or a run longer than
``timeout``.  Every decision is taken on the reactor thread: pool threads
only hand their result back with ``reactor.callFromThread``, so the books
need no lock, and a freed thread wakes waiting jobs in O(categories).

The rules (DESIGN.md, "Quota rules"), with ``held(d) = max(busy(d), reserve(d))``:

- a job of ``c`` starts now iff ``busy(c) < limit(c)`` and
  (``busy(c) < reserve(c)`` or ``size - sum(held) > 0``);
- otherwise it waits in ``c``'s FIFO queue; a full queue rejects at once
  (:class:`QueueFull`, 503 + ``Retry-After``), a wait past ``queue_timeout``
  fails (:class:`QueueTimeout`, 503);
- when a thread returns, waiting jobs are started in priority order;
- a job past its execution timeout fails its caller (:class:`ExecutionTimeout`,
  504) but its thread keeps counting in ``busy`` until it really returns
  (a *zombie*); so does a running job whose caller went away.
"""

from __future__ import annotations

import enum
import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Mapping, ParamSpec, TypeVar

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ._config import ConfigError
from ._errors import GatewayTimeout, ServiceUnavailable
from ._json import JSON

if TYPE_CHECKING:
    from ._app import App
    from .testing import SynchronousThreadPool

_P = ParamSpec("_P")
_R = TypeVar("_R")

__all__ = [
    "CategoryConfig",
    "QuotaConfig",
    "QuotaPool",
    "QueueFull",
    "QueueTimeout",
    "PoolClosing",
    "ExecutionTimeout",
    "JobState",
    "Outcome",
    "Distribution",
    "install",
]

log = Logger()


# ---------------------------------------------------------------------------
# Errors


class QueueFull(ServiceUnavailable):
    """
    The category's queue is full: rejected at once.
    """

    code = "queue_full"


class QueueTimeout(ServiceUnavailable):
    """
    The job waited longer than its category's ``queue_timeout``.
    """

    code = "queue_timeout"


class PoolClosing(ServiceUnavailable):
    """
    The pool is stopping: waiting and new jobs are turned away.
    """

    code = "pool_closing"


class ExecutionTimeout(GatewayTimeout):
    """
    The job ran longer than its category's ``timeout``; its thread goes on
    (and keeps counting) until it returns.
    """

    code = "execution_timeout"


# ---------------------------------------------------------------------------
# Configuration


# Converters turn what TOML gives into the field's type when they can and
# leave anything else as it is; the validators then refuse it, naming the
# field (attrs hands validators the attribute, not converters).


def _to_whole(value: object) -> object:
    if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
        return int(value)
    return value


def _to_seconds(value: object) -> object:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _to_limit_seconds(value: object) -> object:
    # 0 (TOML has no null) means "no limit".
    value = _to_seconds(value)
    return None if value == 0 else value


def _whole(instance: object, field: attrs.Attribute, value: object) -> None:
    # TOML gives ints; refuse bools and fractions instead of truncating them.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field.name}: expected a whole number, got {value!r}")


def _seconds(instance: object, field: attrs.Attribute, value: object) -> None:
    if not isinstance(value, float):
        raise ValueError(f"{field.name}: expected a number of seconds, got {value!r}")


_optional_whole = attrs.validators.optional(_whole)


def _positive(instance: object, field: attrs.Attribute, value: float | None) -> None:
    """
    None, or a number of seconds above 0.
    """
    if value is None:
        return
    _seconds(instance, field, value)
    if value <= 0:
        raise ValueError(f"'{field.name}' must be > 0: {value}")


@attrs.frozen
class CategoryConfig:
    """
    ``[quota.categories.<name>]``: the rules of one category.

    :ivar reserve: threads kept for this category alone (the seed's *leave*).
    :ivar limit: most threads the category may hold; the pool size if unset.
    :ivar queue: most jobs that may wait; one more is rejected at once.
    :ivar queue_timeout: seconds a job may wait for a thread (0: no limit).
    :ivar timeout: seconds a job may run before its caller gets 504 (0: no
        limit).
    :ivar priority: when a thread frees, categories with a higher priority
        are offered it first (ties: by name).
    :ivar retry_after: seconds put in ``Retry-After`` on a 503; the pool's
        ``retry_after`` if unset.
    """

    reserve: int = attrs.field(default=0, converter=_to_whole,
                               validator=[_whole, attrs.validators.ge(0)])
    limit: int | None = attrs.field(
        default=None, converter=_to_whole,
        validator=[_optional_whole, attrs.validators.optional(attrs.validators.ge(1))])
    queue: int = attrs.field(default=100, converter=_to_whole,
                             validator=[_whole, attrs.validators.ge(0)])
    queue_timeout: float | None = attrs.field(default=30.0, converter=_to_limit_seconds,
                                              validator=_positive)
    timeout: float | None = attrs.field(default=60.0, converter=_to_limit_seconds,
                                        validator=_positive)
    priority: int = attrs.field(default=0, converter=_to_whole, validator=_whole)
    retry_after: float | None = attrs.field(default=None, converter=_to_seconds,
                                            validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.limit is not None and self.reserve > self.limit:
            raise ValueError(f"reserve ({self.reserve}) is more than limit ({self.limit})")


def _default_categories() -> dict[str, CategoryConfig]:
    return {"default": CategoryConfig()}


@attrs.frozen
class QuotaConfig:
    """
    ``[quota]``: the shared pool and its categories.

    :ivar size: threads in the pool.
    :ivar categories: name → :class:`CategoryConfig`.
    :ivar retry_after: default ``Retry-After`` seconds of a 503.
    :ivar stop_timeout: seconds ``stopService`` waits for running threads
        before it gives up on them (they are daemon threads).
    """

    size: int = attrs.field(default=20, converter=_to_whole,
                            validator=[_whole, attrs.validators.ge(1)])
    categories: dict[str, CategoryConfig] = attrs.field(factory=_default_categories)
    retry_after: float = attrs.field(default=1.0, converter=_to_seconds,
                                     validator=[_seconds, attrs.validators.gt(0)])
    stop_timeout: float = attrs.field(default=10.0, converter=_to_seconds,
                                      validator=[_seconds, attrs.validators.ge(0)])

    def __attrs_post_init__(self) -> None:
        if not self.categories:
            raise ConfigError("quota.categories: at least one category is needed")
        for name, cat in self.categories.items():
            if not isinstance(cat, CategoryConfig):
                raise ConfigError(f"quota.categories.{name}: expected a table of category rules")
            if cat.limit is not None and cat.limit > self.size:
                raise ConfigError(f"quota.categories.{name}.limit: {cat.limit} is more than "
                                  f"the pool size {self.size}")
            if cat.reserve > self.size:
                raise ConfigError(f"quota.categories.{name}.reserve: {cat.reserve} is more than "
                                  f"the pool size {self.size}")
        total = sum(c.reserve for c in self.categories.values())
        if total > self.size:
            parts = ", ".join(f"{n}={c.reserve}" for n, c in self.categories.items() if c.reserve)
            raise ConfigError(f"quota: the reserves add up to {total} ({parts}), more than "
                              f"the pool size {self.size}")
        if total == self.size:
            starved = sorted(n for n, c in self.categories.items() if not c.reserve)
            if starved:
                raise ConfigError(f"quota: the reserves take the whole pool ({self.size} threads), "
                                  f"so {', '.join(starved)} (no reserve) could never run")


# ---------------------------------------------------------------------------
# Statistics


#: Upper bounds (seconds) of the histogram buckets of waits and run times.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)


class Distribution:
    """
    A fixed-bucket histogram of durations: O(buckets) memory whatever the
    traffic, quantiles read as the upper bound of the bucket they fall in.
    """

    __slots__ = ("counts", "count", "total", "max")

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        i = 0
        while seconds > BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def quantile(self, q: float) -> float | None:
        """
        The upper bound of the bucket holding quantile ``q`` (the largest
        value seen for the last bucket); None with no observation.
        """
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for bound, n in zip(BUCKETS, self.counts):
            seen += n
            if seen >= rank and n:
                return min(bound, self.max)
        return self.max

    def to_json(self) -> dict[str, JSON]:
        return {
            "count": self.count,
            "sum": round(self.total, 6),
            "mean": round(self.total / self.count, 6) if self.count else None,
            "max": round(self.max, 6),
            "p50": self.quantile(0.5),
            "p90": self.quantile(0.9),
            "p99": self.quantile(0.99),
            # Cumulative, Prometheus style: "le" bound → jobs at or under it.
            "buckets": {("+Inf" if math.isinf(b) else repr(b)): c
                        for b, c in zip(BUCKETS, _cumulative(self.counts))},
        }


def _cumulative(counts: list[int]) -> list[int]:
    out, total = [], 0
    for n in counts:
        total += n
        out.append(total)
    return out


# ---------------------------------------------------------------------------
# Jobs


class JobState(enum.Enum):
    """
    A job's life.  ``ZOMBIE``: its caller has been answered (execution
    timeout) or has gone (cancelled) while its thread still runs.
    """

    # Members are singletons compared by identity: hash them the C way
    # (Enum's own __hash__ is a Python call, paid on every transition).
    __hash__ = object.__hash__

    NEW = "new"
    WAITING = "waiting"
    RUNNING = "running"
    ZOMBIE = "zombie"
    ENDED = "ended"


_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.NEW: frozenset({JobState.WAITING, JobState.RUNNING, JobState.ENDED}),
    JobState.WAITING: frozenset({JobState.RUNNING, JobState.ENDED}),
    JobState.RUNNING: frozenset({JobState.ENDED, JobState.ZOMBIE}),
    JobState.ZOMBIE: frozenset({JobState.ENDED}),
    JobState.ENDED: frozenset(),
}


class Outcome(enum.Enum):
    """
    What the caller of :meth:`QuotaPool.run` was told; each job gets one.
    """

    __hash__ = object.__hash__

    DONE = "completed"
    FAILED = "failed"
    REJECTED = "rejected"
    QUEUE_TIMEOUT = "queue_timeouts"
    EXECUTION_TIMEOUT = "execution_timeouts"
    CANCELLED = "cancelled"
    CLOSED = "closed"


class _Job:
    __slots__ = ("category", "fn", "args", "kwargs", "deferred", "state", "outcome",
                 "submitted", "started", "timer")

    def __init__(self, category: _Category, fn: Callable[..., object], args: tuple[object, ...],
                 kwargs: Mapping[str, object], now: float) -> None:
        self.category = category
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.deferred: Deferred = Deferred(self._cancel)
        self.state = JobState.NEW
        self.outcome: Outcome | None = None
        self.submitted = now
        self.started = 0.0
        # The one pending timed call: queue timeout while waiting,
        # execution timeout while running.
        self.timer: IDelayedCall | None = None

    def _cancel(self, d: Deferred) -> None:
        self.category.pool._cancel(self)

    def move(self, to: JobState) -> None:
        if to not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"quota job: no transition {self.state.name} -> {to.name}")
        self.state = to
        if to is JobState.ENDED:
            # The caller may keep the Deferred (and so this job) for long;
            # the request's inputs need not live that long.
            self.fn = self.args = self.kwargs = None  # type: ignore[assignment]

    def stop_timer(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None


class _Category:
    """
    One category's rules and live books.
    """

    __slots__ = ("pool", "name", "config", "reserve", "limit", "queue_max", "queue_timeout",
                 "timeout", "priority", "retry_after", "queue", "busy", "zombies",
                 "counters", "queue_wait", "run_time", "submitted", "started",
                 "zombies_returned")

    def __init__(self, pool: QuotaPool, name: str, config: CategoryConfig, size: int,
                 retry_after: float) -> None:
        self.pool = pool
        self.name = name
        self.config = config
        self.reserve = config.reserve
        self.limit = config.limit if config.limit is not None else size
        self.queue_max = config.queue
        self.queue_timeout = config.queue_timeout
        self.timeout = config.timeout
        self.priority = config.priority
        self.retry_after = config.retry_after if config.retry_after is not None else retry_after
        self.queue: OrderedDict[_Job, None] = OrderedDict()
        # Threads this category holds, zombies included: the rules count these.
        self.busy = 0
        self.zombies = 0
        self.submitted = 0
        self.started = 0
        self.zombies_returned = 0
        self.counters = {o: 0 for o in Outcome}
        self.queue_wait = Distribution()
        self.run_time = Distribution()

    def status(self) -> dict[str, JSON]:
        return {
            "reserve": self.reserve,
            "limit": self.limit,
            "queue_limit": self.queue_max,
            "queue_timeout": self.queue_timeout,
            "timeout": self.timeout,
            "priority": self.priority,
            "running": self.busy - self.zombies,
            "zombies": self.zombies,
            "threads": self.busy,
            "queued": len(self.queue),
            "submitted": self.submitted,
            "started": self.started,
            **{o.value: n for o, n in self.counters.items()},
            "zombies_returned": self.zombies_returned,
            "queue_wait": self.queue_wait.to_json(),
            "run_time": self.run_time.to_json(),
        }


# ---------------------------------------------------------------------------
# The pool


class _DaemonThread(threading.Thread):
    # Any: threading.Thread's own arguments, as Twisted's ThreadPool passes them.
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A zombie that never returns must not keep the process alive.
        self.daemon = True


class _QuotaThreadPool(ThreadPool):
    threadFactory = _DaemonThread


class QuotaPool(Service):
    """
    Categories with reserves and limits over one shared thread pool.

    :param config: the ``[quota]`` table.
    :param reactor: every timed call and the results from threads go
        through it.  A reactor that is not an ``IReactorThreads`` (a
        :class:`~twisted.internet.task.Clock` in unit tests) gets results
        delivered directly, which is right for
        :class:`pipecomet.testing.SynchronousThreadPool`.
    :param threadpool: the pool that runs the jobs; a new
        :class:`~twisted.python.threadpool.ThreadPool` of ``config.size``
        daemon threads when None.
    """

    name = "quota"

    def __init__(self, config: QuotaConfig, reactor: IReactorTime,
                 threadpool: ThreadPool | SynchronousThreadPool | None = None) -> None:
        self.config = config
        self.size = config.size
        self._reactor = reactor
        self._threadpool: ThreadPool | SynchronousThreadPool = (
            threadpool if threadpool is not None
            else _QuotaThreadPool(0, config.size, name="pipecomet-quota"))
        self._from_thread: Callable[..., object] = (
            reactor.callFromThread if IReactorThreads.providedBy(reactor) else _direct)
        self._categories = {name: _Category(self, name, c, config.size, config.retry_after)
                            for name, c in config.categories.items()}
        self._order = sorted(self._categories.values(), key=lambda c: (-c.priority, c.name))
        # sum over categories of max(busy, reserve), kept up to date in O(1).
        self._held = sum(c.reserve for c in self._categories.values())
        self._busy = 0
        self._closing = False
        self._waking = False
        self._rewake = False
        self._stopped: Deferred | None = None
        self._stop_timer: IDelayedCall | None = None

    # -- questions

    def has_category(self, name: str | None) -> bool:
        return name in self._categories

    @property
    def categories(self) -> list[str]:
        return list(self._categories)

    @property
    def free(self) -> int:
        """
        Threads no category holds or has reserved.
        """
        return self.size - self._held

    @property
    def busy(self) -> int:
        """
        Threads running a job (zombies included).
        """
        return self._busy

    def category_status(self, name: str) -> dict[str, JSON]:
        """
        One category's live figures and statistics.
        """
        return self._categories[name].status()

    def status(self) -> dict[str, JSON]:
        """
        The whole pool's live figures (``/_pipecomet/status`` shows them).
        """
        return {
            "size": self.size,
            "busy": self._busy,
            "held": self._held,
            "free": self.size - self._held,
            "closing": self._closing,
            "categories": {c.name: c.status() for c in self._order},
        }

    # -- the one entry point

    def run(self, category: str, fn: Callable[_P, _R], *args: _P.args,
            **kwargs: _P.kwargs) -> Deferred[_R]:
        """
        Run ``fn(*args, **kwargs)`` on a pool thread under ``category``'s
        rules.

        :return: a Deferred of ``fn``'s result; it fails with
            :class:`QueueFull`, :class:`QueueTimeout`, :class:`PoolClosing`,
            :class:`ExecutionTimeout` or ``fn``'s own exception.  Cancelling
            it while the job waits removes the job from the queue at once;
            once it runs, its thread goes on as a zombie.
        :raises ValueError: for an unknown category (a programming error;
            ``App.check`` finds it at configure time).
        """
        cat = self._categories.get(category)
        if cat is None:
            raise ValueError(f"unknown quota category {category!r}; known: {sorted(self._categories)}")
        job = _Job(cat, fn, args, kwargs, self._reactor.seconds())
        cat.submitted += 1
        if self._closing:
            job.move(JobState.ENDED)
            self._tell(job, Outcome.CLOSED, PoolClosing(
                "the thread pool is stopping", retry_after=cat.retry_after,
                details={"category": cat.name}))
        elif not cat.queue and self._may_start(cat):
            self._start(job)
        elif len(cat.queue) >= cat.queue_max:
            job.move(JobState.ENDED)
            self._tell(job, Outcome.REJECTED, QueueFull(
                f"category {cat.name!r} is busy and its queue is full",
                retry_after=cat.retry_after, details={"category": cat.name}))
        else:
            job.move(JobState.WAITING)
            cat.queue[job] = None
            if cat.queue_timeout is not None:
                job.timer = self._reactor.callLater(cat.queue_timeout, self._queue_timed_out, job)
        return job.deferred

    # -- rules

    def _may_start(self, cat: _Category) -> bool:
        busy = cat.busy
        return busy < cat.limit and (busy < cat.reserve or self._held < self.size)

    def _start(self, job: _Job) -> None:
        cat = job.category
        job.stop_timer()
        job.move(JobState.RUNNING)
        if cat.busy >= cat.reserve:
            self._held += 1
        cat.busy += 1
        self._busy += 1
        cat.started += 1
        now = self._reactor.seconds()
        job.started = now
        cat.queue_wait.observe(now - job.submitted)
        if cat.timeout is not None:
            job.timer = self._reactor.callLater(cat.timeout, self._execution_timed_out, job)
        from_thread = self._from_thread
        returned = self._returned

        def on_result(ok: bool, result: object) -> None:
            # Runs on the pool thread: hand over, touch nothing.
            from_thread(returned, job, ok, result)

        self._threadpool.callInThreadWithCallback(on_result, job.fn, *job.args, **job.kwargs)

    def _wake(self) -> None:
        """
        Start every waiting job the rules allow, categories in priority
        order.  One pass suffices: starting a job never makes another
        category eligible.  Re-entered (a synchronous pool returning at
        once), it asks the running pass to go round again instead.
        """
        if self._waking:
            self._rewake = True
            return
        self._waking = True
        try:
            again = True
            while again:
                self._rewake = False
                for cat in self._order:
                    queue = cat.queue
                    while queue and self._may_start(cat):
                        job, _ = queue.popitem(last=False)
                        self._start(job)
                again = self._rewake
        finally:
            self._waking = False

    # -- events, all on the reactor thread

    def _returned(self, job: _Job, ok: bool, result: object) -> None:
        cat = job.category
        cat.busy -= 1
        self._busy -= 1
        if cat.busy >= cat.reserve:
            self._held -= 1
        cat.run_time.observe(self._reactor.seconds() - job.started)
        job.stop_timer()
        was = job.state
        job.move(JobState.ENDED)
        if was is JobState.ZOMBIE:
            cat.zombies -= 1
            cat.zombies_returned += 1
            if not ok:
                # Its caller was already answered; a warning, not an error
                # the request could be blamed for.
                log.warn("quota category {category}: a job whose caller was already answered "
                         "failed: {error}", category=cat.name,
                         error=result.getErrorMessage() if isinstance(result, Failure) else result)
        # Hand the freed thread to waiting jobs before the caller's chain
        # goes on, so a job just made by that chain cannot jump the queue.
        self._wake()
        if was is JobState.RUNNING:
            self._tell(job, Outcome.DONE if ok else Outcome.FAILED, result)
        if self._stopped is not None and self._busy == 0:
            self._finish_stop(joined=True)

    def _queue_timed_out(self, job: _Job) -> None:
        job.timer = None
        if job.state is not JobState.WAITING:
            return
        cat = job.category
        del cat.queue[job]
        job.move(JobState.ENDED)
        self._tell(job, Outcome.QUEUE_TIMEOUT, QueueTimeout(
            f"category {cat.name!r}: no thread within {cat.queue_timeout:g}s",
            retry_after=cat.retry_after, details={"category": cat.name}))

    def _execution_timed_out(self, job: _Job) -> None:
        job.timer = None
        if job.state is not JobState.RUNNING:
            return
        cat = job.category
        job.move(JobState.ZOMBIE)
        cat.zombies += 1
        self._tell(job, Outcome.EXECUTION_TIMEOUT, ExecutionTimeout(
            f"category {cat.name!r}: the job ran longer than {cat.timeout:g}s",
            details={"category": cat.name}))

    def _cancel(self, job: _Job) -> None:
        """
        The caller cancelled (client gone).  Deferred fails it with
        CancelledError once this returns.
        """
        cat = job.category
        if job.state is JobState.WAITING:
            del cat.queue[job]
            job.stop_timer()
            job.move(JobState.ENDED)
        elif job.state is JobState.RUNNING:
            job.stop_timer()
            job.move(JobState.ZOMBIE)
            cat.zombies += 1
        else:
            return
        job.outcome = Outcome.CANCELLED
        cat.counters[Outcome.CANCELLED] += 1

    def _tell(self, job: _Job, outcome: Outcome, result: object) -> None:
        """
        Give the caller its one outcome.
        """
        if job.outcome is not None:
            raise RuntimeError(f"quota job answered twice ({job.outcome.name}, {outcome.name})")
        job.outcome = outcome
        job.category.counters[outcome] += 1
        d = job.deferred
        if isinstance(result, BaseException):
            d.errback(Failure(result))
        elif isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)

    # -- service

    def startService(self) -> None:
        self._closing = False
        self._threadpool.start()
        super().startService()

    def stopService(self) -> Deferred | None:
        """
        Turn away waiting and new jobs (:class:`PoolClosing`), let running
        ones finish for up to ``stop_timeout`` seconds, then stop the threads.
        """
        super().stopService()
        self._closing = True
        for cat in self._order:
            while cat.queue:
                job, _ = cat.queue.popitem(last=False)
                job.stop_timer()
                job.move(JobState.ENDED)
                self._tell(job, Outcome.CLOSED, PoolClosing(
                    "the thread pool is stopping", retry_after=cat.retry_after,
                    details={"category": cat.name}))
        if self._busy == 0:
            self._threadpool.stop()
            return None
        self._stopped = Deferred()
        self._stop_timer = self._reactor.callLater(self.config.stop_timeout,
                                                   self._finish_stop, False)
        return self._stopped

    def _finish_stop(self, joined: bool) -> None:
        stopped, self._stopped = self._stopped, None
        if stopped is None:
            return
        if joined:
            timer = self._stop_timer
            if timer is not None and timer.active():
                timer.cancel()
            self._threadpool.stop()
        else:
            log.warn("quota pool stopped with {busy} threads still running; they are left to "
                     "finish on their own", busy=self._busy)
            # ThreadPool.stop() joins every thread, the hung ones too: it
            # runs on a daemon thread of its own, never the reactor's.  The
            # idle threads quit at once; the hung ones when they return.
            threading.Thread(target=self._threadpool.stop, name="pipecomet-quota-stop",
                             daemon=True).start()
        stopped.callback(None)


def _direct(f: Callable[..., object], *args: object) -> None:
    f(*args)


# ---------------------------------------------------------------------------
# Installing


def install(app: App, config: QuotaConfig) -> QuotaPool:
    """
    Build the app's quota pool from ``[quota]``: ``app.runtime.quota``,
    the ``quota`` status source, and a service started with the app.
    """
    pool = QuotaPool(config, app.reactor)
    app.runtime.quota = pool
    app.runtime.status_sources["quota"] = pool.status
    app.add_service(pool)
    return pool
