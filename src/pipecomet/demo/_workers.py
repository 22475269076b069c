"""
The demo's worker-pool routes: CPU-heavy Python in worker processes.

``POST /api/cpu.burn?ms=N`` keeps a worker's core busy for N ms of CPU
time (for tests and benchmarks); ``POST /api/image.resize?width=W&height=H
&format=png|jpeg|webp`` resizes the image in the request body with Pillow
(an image of more than ``[demo] max_image_pixels`` pixels is refused
with 413 ``image_too_large`` before it is decoded).  Both authenticate
the app key first, like every ``/api/*`` route.
Both are ``process`` pipes: the payload is built on the reactor, the work
runs in a worker from ``pipecomet.demo.worker_functions``, and the chain
goes on with its result.  ``GET /_pipecomet/status`` shows the pool.
"""

from __future__ import annotations

import pickle

from twisted.internet.defer import Deferred

from pipecomet import (
    Answer,
    App,
    BadRequest,
    Pipe,
    PipeContext,
    PipeInput,
    PipeResult,
    process_pipe,
)
from pipecomet.errors import PayloadTooLarge
from ._gateway import auth_pipes

__all__ = ["install_routes", "MAX_BURN_MS", "MAX_SIDE", "FORMATS"]

#: the longest burn a client may ask for
MAX_BURN_MS = 10_000.0
#: the largest width or height a resize may ask for
MAX_SIDE = 4096
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}


def _number(inp: PipeInput, name: str, default: float, low: float, high: float) -> float:
    raw = inp.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number", code="invalid_parameter",
                         details={"param": name}) from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}",
                         code="invalid_parameter", details={"param": name})
    return value


def _burn_ms(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> float:
    return _number(inp, "ms", 10.0, 0.0, MAX_BURN_MS)


def _burn_answer(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> dict[str, object]:
    return {"burned": res["cpu_burn"]}


def _resize_job(inp: PipeInput, ctx: PipeContext,
                res: PipeResult) -> Deferred[dict[str, object]]:
    width = int(_number(inp, "width", 128, 1, MAX_SIDE))
    height = int(_number(inp, "height", 128, 1, MAX_SIDE))
    fmt = inp.query.get("format", "png").lower()
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {', '.join(sorted(FORMATS))}",
                         code="invalid_parameter", details={"param": "format"})

    def with_body(body: bytes) -> dict[str, object]:
        if not body:
            raise BadRequest("send the image as the request body", code="missing_body")
        # Out of band: the image bytes go into the ring without a pickle copy.
        return {"image": pickle.PickleBuffer(body), "width": width, "height": height,
                "format": "jpeg" if fmt == "jpg" else fmt,
                "max_pixels": ctx.runtime.config.demo.max_image_pixels}

    return inp.body().addCallback(with_body)


def _resize_answer(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Answer:
    out = res["image_resize"]
    if "error" in out:
        if out["error"] == "image_too_large":
            raise PayloadTooLarge(out["message"], code="image_too_large",
                                  details={"limit": out["limit"]})
        raise BadRequest(out["message"], code=out["error"])
    return Answer(bytes(out["image"]), content_type=FORMATS[out["format"]], headers={
        "X-Image-Size": f"{out['width']}x{out['height']}",
        "X-Source-Size": f"{out['source_width']}x{out['source_height']}",
        "X-Worker-Pid": str(out["pid"]),
    })


def install_routes(app: App) -> None:
    app.route("/api/cpu.burn", [
        *auth_pipes(app),
        Pipe(_burn_ms, name="ms"),
        process_pipe("cpu_burn"),
        Pipe(_burn_answer, name="answer"),
    ], methods=("POST",))
    app.route("/api/image.resize", [
        *auth_pipes(app),
        Pipe(_resize_job, name="job"),
        process_pipe("image_resize"),
        Pipe(_resize_answer, name="answer"),
    ], methods=("POST",))
