"""
``[workers]``: the worker process pool's configuration.
"""

from __future__ import annotations

import attrs
from attrs import validators as v

__all__ = ["WorkersConfig"]

MiB = 1024 * 1024


def _positive_int(name: str) -> list:
    return [v.instance_of(int), v.ge(1)]


@attrs.frozen
class WorkersConfig:
    """
    :ivar module: module the workers import; its ``@worker_function``\\ s
        are what calls may name.  Empty: no pool (the twistd option
        ``--workers-module`` sets it).
    :ivar size: number of worker processes.
    :ivar queue: calls that may wait for a worker; one more gets 503.
    :ivar queue_timeout: seconds a call may wait for a worker (then 503).
    :ivar call_timeout: seconds a call may run when its pipe sets none;
        past it the worker is killed and the call gets 504.
    :ivar max_in_flight: calls handed to one worker at a time (the rest
        wait in the pool's queue, so a free worker can take them).
    :ivar ring_kib: size of each of a worker's two rings, in KiB.
    :ivar memory_limit_mb: address space a worker may add beyond its size
        after start-up (0: no limit); past it the call's worker exits and
        the call gets 502.
    :ivar oom_score_adj: written to each worker's ``oom_score_adj`` so the
        kernel's OOM killer picks a worker before the server.
    :ivar recycle_calls: replace a worker after this many calls (0: never).
    :ivar recycle_rss_mb: replace a worker whose RSS grew this much above
        its own baseline (0: never).
    :ivar start_timeout: seconds a new worker has to say hello.
    :ivar shutdown_timeout: seconds a stopping pool waits for calls in
        flight before it kills the workers.
    :ivar restart_backoff: first delay before restarting a crashed worker;
        doubled per crash in a row, up to ``restart_backoff_max``.
    :ivar crash_loop_crashes: this many crashes of one worker slot within
        ``crash_loop_window`` seconds open the breaker: the slot is left
        down for ``crash_loop_cooldown`` seconds.
    :ivar spin_us: microseconds a worker keeps looking at its empty ring
        after a call before it goes to sleep (0: sleep at once).
    :ivar python: interpreter for the workers (default: the server's).
    :ivar shm_dir: where the shared-memory files live.
    """

    module: str = attrs.field(default="", validator=v.instance_of(str))
    size: int = attrs.field(default=2, validator=_positive_int("size"))
    queue: int = attrs.field(default=1024, validator=[v.instance_of(int), v.ge(0)])
    queue_timeout: float = attrs.field(default=10.0, converter=float, validator=v.gt(0))
    call_timeout: float = attrs.field(default=30.0, converter=float, validator=v.gt(0))
    max_in_flight: int = attrs.field(default=16, validator=_positive_int("max_in_flight"))
    ring_kib: int = attrs.field(default=4096, validator=[v.instance_of(int), v.ge(4)])
    memory_limit_mb: int = attrs.field(default=1024, validator=[v.instance_of(int), v.ge(0)])
    oom_score_adj: int = attrs.field(default=1000, validator=[v.instance_of(int), v.ge(-1000),
                                                             v.le(1000)])
    recycle_calls: int = attrs.field(default=0, validator=[v.instance_of(int), v.ge(0)])
    recycle_rss_mb: int = attrs.field(default=0, validator=[v.instance_of(int), v.ge(0)])
    start_timeout: float = attrs.field(default=20.0, converter=float, validator=v.gt(0))
    shutdown_timeout: float = attrs.field(default=10.0, converter=float, validator=v.ge(0))
    restart_backoff: float = attrs.field(default=0.1, converter=float, validator=v.ge(0))
    restart_backoff_max: float = attrs.field(default=5.0, converter=float, validator=v.ge(0))
    crash_loop_crashes: int = attrs.field(default=5, validator=_positive_int("crash_loop_crashes"))
    crash_loop_window: float = attrs.field(default=10.0, converter=float, validator=v.gt(0))
    crash_loop_cooldown: float = attrs.field(default=30.0, converter=float, validator=v.gt(0))
    spin_us: float = attrs.field(default=50.0, converter=float, validator=[v.ge(0), v.le(10_000)])
    python: str = attrs.field(default="", validator=v.instance_of(str))
    shm_dir: str = attrs.field(default="/dev/shm", validator=v.instance_of(str))

    @property
    def ring_bytes(self) -> int:
        return self.ring_kib * 1024
