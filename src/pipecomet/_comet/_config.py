"""
The ``[comet]`` table, its per-topic overrides, and the names comet accepts.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

__all__ = [
    "CometConfig",
    "TopicConfig",
    "TopicLimits",
    "limits_for",
    "TOPIC_RE",
    "EVENT_RE",
    "RESERVED_EVENTS",
    "END_EVENT",
    "SLOW_POLICIES",
]

_v = attrs.validators

TOPIC_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
EVENT_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

#: Event names the hub sends itself (the one list of them); a publish may
#: not use them, and a client treats them as control events, not messages.
RESERVED_EVENTS = frozenset({"gap", "reset", "end", "reconnect", "shutdown", "heartbeat", "timeout"})

#: The event name an end-of-topic travels under on the bus.
END_EVENT = "pipecomet.end"

SLOW_POLICIES = ("disconnect", "drop")


def _opt(validator: Any) -> Any:
    return _v.optional(validator)


@attrs.frozen
class TopicConfig:
    """
    ``[comet.topics."<name>"]``: per-topic overrides (a name ending in
    ``*`` matches a prefix).  Unset keys take the ``[comet]`` value.
    """

    history_count: int | None = attrs.field(default=None, validator=_opt(_v.ge(0)))
    history_bytes: int | None = attrs.field(default=None, validator=_opt(_v.ge(0)))
    history_age: float | None = attrs.field(default=None, validator=_opt(_v.gt(0)))
    slow_policy: str | None = attrs.field(default=None, validator=_opt(_v.in_(SLOW_POLICIES)))


@attrs.frozen
class CometConfig:
    """
    ``[comet]``: comet push.

    :ivar publish_token: bearer token of ``POST /_pipecomet/publish/{topic}``;
        empty disables publishing over HTTP (403).
    :ivar heartbeat: seconds between comment heartbeats on streams.
    :ivar retry: seconds a client waits before reconnecting (SSE ``retry:``).
    :ivar longpoll_timeout: seconds a long-poll is held by default.
    :ivar longpoll_max_timeout: cap on a client's ``timeout=``.
    :ivar longpoll_batch: most messages in one long-poll answer.
    :ivar max_lifetime: seconds a stream lives before it is told to
        reconnect (0: forever); shortened by up to ``lifetime_jitter`` of it
        so that clients do not come back all at once.
    :ivar buffer_bytes: bytes a connection may queue while its client is
        not reading, beyond the socket's own buffer.
    :ivar slow_policy: ``disconnect`` a client past ``buffer_bytes``, or
        ``drop`` its oldest queued messages and send a gap event.
    :ivar max_connections: held comet requests in all (503).
    :ivar max_connections_per_topic: subscribers of one topic (503).
    :ivar max_topics_per_connection: topics one request may ask for (400).
    :ivar max_topics: topics alive at once (503).
    :ivar max_message_bytes: largest published payload (413).
    :ivar history_count: messages kept per topic for resume.
    :ivar history_bytes: bytes kept per topic.
    :ivar history_age: seconds a message is kept.
    :ivar idempotency_ttl: seconds an idempotency key is remembered.
    :ivar idempotency_keys: most keys remembered.
    :ivar topics: per-topic overrides.
    """

    publish_token: str = attrs.field(default="", validator=_v.instance_of(str))
    heartbeat: float = attrs.field(default=15.0, converter=float, validator=_v.gt(0))
    retry: float = attrs.field(default=2.0, converter=float, validator=_v.gt(0))
    longpoll_timeout: float = attrs.field(default=30.0, converter=float, validator=_v.gt(0))
    longpoll_max_timeout: float = attrs.field(default=120.0, converter=float, validator=_v.gt(0))
    longpoll_batch: int = attrs.field(default=500, validator=[_v.instance_of(int), _v.gt(0)])
    max_lifetime: float = attrs.field(default=3600.0, converter=float, validator=_v.ge(0))
    lifetime_jitter: float = attrs.field(default=0.1, converter=float,
                                         validator=[_v.ge(0), _v.lt(1)])
    buffer_bytes: int = attrs.field(default=256 * 1024, validator=[_v.instance_of(int), _v.gt(0)])
    slow_policy: str = attrs.field(default="disconnect", validator=_v.in_(SLOW_POLICIES))
    max_connections: int = attrs.field(default=10_000, validator=[_v.instance_of(int), _v.gt(0)])
    max_connections_per_topic: int = attrs.field(default=10_000,
                                                 validator=[_v.instance_of(int), _v.gt(0)])
    max_topics_per_connection: int = attrs.field(default=8,
                                                 validator=[_v.instance_of(int), _v.gt(0)])
    max_topics: int = attrs.field(default=10_000, validator=[_v.instance_of(int), _v.gt(0)])
    max_message_bytes: int = attrs.field(default=64 * 1024,
                                         validator=[_v.instance_of(int), _v.gt(0)])
    history_count: int = attrs.field(default=1000, validator=[_v.instance_of(int), _v.ge(0)])
    history_bytes: int = attrs.field(default=1024 * 1024, validator=[_v.instance_of(int), _v.ge(0)])
    history_age: float = attrs.field(default=300.0, converter=float, validator=_v.gt(0))
    idempotency_ttl: float = attrs.field(default=300.0, converter=float, validator=_v.gt(0))
    idempotency_keys: int = attrs.field(default=100_000, validator=[_v.instance_of(int), _v.gt(0)])
    topics: dict[str, TopicConfig] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.longpoll_timeout > self.longpoll_max_timeout:
            raise ValueError("longpoll_timeout: must be <= longpoll_max_timeout")


@attrs.frozen
class TopicLimits:
    """
    The bounds one topic lives within, after its overrides.
    """

    history_count: int
    history_bytes: int
    history_age: float
    drop: bool


def limits_for(config: CometConfig, name: str) -> TopicLimits:
    """
    ``name``'s bounds: its own ``[comet.topics]`` entry, else the longest
    matching ``prefix*`` entry, else the ``[comet]`` values.
    """
    over = config.topics.get(name)
    if over is None:
        best = ""
        for pattern, tc in config.topics.items():
            if pattern.endswith("*") and name.startswith(pattern[:-1]) and len(pattern) > len(best):
                best, over = pattern, tc

    def pick(field: str) -> Any:
        v = getattr(over, field, None) if over is not None else None
        return getattr(config, field) if v is None else v

    return TopicLimits(pick("history_count"), pick("history_bytes"), pick("history_age"),
                       pick("slow_policy") == "drop")
