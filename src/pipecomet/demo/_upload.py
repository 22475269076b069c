"""
The demo's upload API, ``POST /api/upload`` (form or multipart): the app
key is checked as soon as its field is parsed, so a bad key is refused
before the rest of the body is read; the upload is then received with file
fields streamed through a hash into a spooled file.

Clients send ``app_key`` as the first field (or in the query); with the
lazy parser a body whose first field is something else is refused as soon
as that field is seen (400 ``app_key_not_first``), so an unauthenticated
file is never spooled.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.python.failure import Failure

from pipecomet import App, BadRequest, Forbidden, Pipe, PipeContext, PipeInput, PipeResult
from ._gateway import RateLimiter

__all__ = ["install_routes"]

_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def upload_key(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Deferred:
    """
    The ``app_key`` field, checked the moment it is complete.
    """

    def check(key: object) -> str:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise BadRequest("app_key must be 1-64 letters, digits, '_', '-' or '.'",
                             code="invalid_parameter", details={"param": "app_key"})
        if key not in ctx.runtime.config.demo.keys:
            raise Forbidden("unknown app_key", code="invalid_app_key")
        return key

    source = inp.body_source
    if "app_key" in inp.query or not hasattr(source, "first_field"):
        return inp.param("app_key").addCallback(check)

    def first(name: str | None) -> Deferred:
        # Refuse before anything else in the body is read, even a file.
        if name is not None and name != "app_key":
            raise BadRequest(f"app_key must be the first field, not {name!r}",
                             code="app_key_not_first", details={"param": "app_key"})
        return inp.param("app_key")

    return source.first_field().addCallback(first).addCallback(check)


def receive(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Deferred:
    """
    The rest of the upload: text fields and a description of each file.
    """
    source = inp.body_source
    files = source.files() if hasattr(source, "files") else succeed({})

    # Any: gatherResults gives the form and the files as one list.
    def done(parts: list[Any]) -> dict[str, object]:
        form, uploads = parts
        fields = {k: v for k, v in form.items() if k != "app_key"}
        return {
            "app_key": res["upload_key"],
            "lazy": hasattr(source, "files"),
            "fields": fields,
            "files": [f.describe() for fs in uploads.values() for f in fs],
        }

    return gatherResults([inp.form(), files], consumeErrors=True).addCallback(done).addErrback(
        _first_error)


def _first_error(f: Failure) -> Failure:
    """
    The failure of the part that failed first (not the ``FirstError``
    ``gatherResults`` wraps it in).
    """
    return f.value.subFailure if isinstance(f.value, FirstError) else f


def install_routes(app: App) -> None:
    limiter = RateLimiter(lambda: app.config.demo.keys, lambda: app.reactor.seconds())

    def upload_rate(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> bool:
        limiter.check(res["upload_key"])
        return True

    app.route("/api/upload", [Pipe(upload_key), Pipe(upload_rate), Pipe(receive)],
              methods=("POST",))
