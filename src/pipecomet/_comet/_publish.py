"""
Publishing over HTTP (``POST /_pipecomet/publish/{topic}``) and the
``[comet]`` installer, which puts the hub, its service and that route on an
app.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred

from .._bus import MemoryBus
from .._chain import Pipe, PipeContext, PipeInput, PipeResult
from .._errors import BadRequest, Forbidden, PayloadTooLarge, Unauthorized
from .._events import EventKeeper
from .._interfaces import IHistoryBus
from .._json import dumps
from ._config import CometConfig, limits_for
from ._hub import CometHub, CometService
from ._publishing import Published

if TYPE_CHECKING:
    from .._app import App

__all__ = ["install", "publish_pipes"]


def _check_token(hub: CometHub, inp: PipeInput) -> None:
    token = hub.config.publish_token
    auth = inp.header("authorization")
    if not auth:
        raise hub.stats.reject(Unauthorized("publishing needs Authorization: Bearer <token>",
                                       code="missing_token",
                                       headers={"WWW-Authenticate": 'Bearer realm="pipecomet"'}))
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise hub.stats.reject(Unauthorized("publishing needs Authorization: Bearer <token>",
                                       code="missing_token",
                                       headers={"WWW-Authenticate": 'Bearer realm="pipecomet"'}))
    if not token:
        raise hub.stats.reject(Forbidden("publishing over HTTP is disabled (no comet.publish_token)",
                                    code="publish_disabled"))
    if not hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8")):
        raise hub.stats.reject(Forbidden("wrong publish token", code="bad_token"))


def _hub_of(ctx: PipeContext) -> CometHub:
    hub: CometHub | None = ctx.runtime.comet if ctx.runtime is not None else None
    if hub is None:
        raise RuntimeError("the publish route is used but no comet hub is installed")
    return hub


def _publish_auth(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> None:
    hub = _hub_of(ctx)
    _check_token(hub, inp)
    hub.check_topic(inp.path_params["topic"])
    length = inp.header("content-length")
    if length is not None and length.isdigit() and int(length) > hub.config.max_message_bytes:
        raise hub.stats.reject(PayloadTooLarge(
            f"message of {length} bytes; the limit is {hub.config.max_message_bytes}",
            code="message_too_large"))
    return None


def _publish_body(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Deferred[bytes]:
    return inp.body()


def _publish_send(inp: PipeInput, ctx: PipeContext,
                  res: PipeResult) -> Deferred[dict[str, object]]:
    hub = _hub_of(ctx)
    body: bytes = res.last or b""
    if len(body) > hub.config.max_message_bytes:
        raise hub.stats.reject(PayloadTooLarge(
            f"message of {len(body)} bytes; the limit is {hub.config.max_message_bytes}",
            code="message_too_large"))
    # Imported here: pipecomet._lazy loads the HTTP server, whose requests
    # load the responders, which load this package (its IStreamSink).
    from .._lazy._parsers import decode_json

    ctype = (inp.header("content-type") or "").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            # NaN and Infinity are not JSON: subscribers' parsers would
            # choke on them.  Too deep or too long numbers are 400s too.
            data = dumps(decode_json(body))
        except BadRequest as e:
            raise hub.stats.reject(BadRequest(f"the body is not valid JSON ({e.message})",
                                         code="invalid_json")) from None
    else:
        try:
            data = dumps(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise hub.stats.reject(BadRequest("the body is not UTF-8 text",
                                         code="bad_encoding")) from None
    event = inp.query.get("event", "message")
    key = inp.header("idempotency-key") or inp.query.get("idempotency_key")
    if key is not None and not (0 < len(key) <= 200):
        raise hub.stats.reject(BadRequest("idempotency key must be 1-200 characters",
                                     code="bad_idempotency_key"))
    return hub.publish_json(inp.path_params["topic"], data, event, key).addCallback(
        lambda done: {"topic": done.topic, "id": done.id, "delivered": done.delivered,
                      "duplicate": done.duplicate})


def publish_pipes() -> list[Pipe]:
    """
    The chain of ``POST /_pipecomet/publish/{topic}``: bearer token, topic
    and size checks before the body is read, then the publish.
    """
    return [Pipe(_publish_auth, name="publish_auth"), Pipe(_publish_body, name="publish_body"),
            Pipe(_publish_send, name="publish")]


def _bus_limits(config: CometConfig, name: str) -> tuple[int, float, float]:
    lim = limits_for(config, name)
    return lim.history_count, lim.history_age, config.idempotency_ttl


def install(app: App, config: CometConfig) -> None:
    """
    ``[comet]`` installer: the event keeper, the bus (in-memory unless one
    is set already), the hub with its service and status, and the publish
    route.
    """
    runtime = app.runtime
    keeper = runtime.events if runtime.events is not None else EventKeeper(app.reactor)
    if runtime.bus is None:
        runtime.bus = MemoryBus()
    if IHistoryBus.providedBy(runtime.bus):
        runtime.bus.set_limits(lambda name: _bus_limits(config, name))
    hub = CometHub(app.reactor, keeper, runtime.bus, config)
    runtime.comet = hub
    runtime.events = keeper
    runtime.status_sources["comet"] = hub.status
    runtime.status_sources["events"] = keeper.status
    runtime.status_sources["bus"] = runtime.bus.status
    app.add_service(CometService(hub))
    if not any(r.path == "/_pipecomet/publish/<topic>" for r in app.routes):
        app.route("/_pipecomet/publish/<topic>", publish_pipes(), methods=("POST",))
