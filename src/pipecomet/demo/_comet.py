"""
The demo gateway's comet routes.

- ``GET /comet/{topic}`` subscribes to a topic (several: ``/comet/a,b``) as
  SSE (default, or ``Accept: text/event-stream``), long-poll
  (``Accept: application/json`` or ``transport=longpoll``) or NDJSON
  (``Accept: application/x-ndjson``).  Topics named ``private.*`` need
  ``app_key`` (subscribe authorization is an ordinary pipe).
- ``POST /_pipecomet/publish/{topic}`` (installed with ``[comet]``)
  publishes with ``Authorization: Bearer demo-publish-token``.
- ``ticker``: a topic the demo publishes a price on every second.
- ``GET /demo/comet``: a small page whose EventSource shows ``ticker`` and
  ``chat`` (``?topic=`` picks others).
- ``GET /demo/job?seconds=1``: the "once" mode: the request waits for an
  async job whose result arrives later through ``EventKeeper.fire``.
"""

from __future__ import annotations

import itertools
import math
from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from pipecomet import (
    Answer,
    App,
    BadRequest,
    Condition,
    Forbidden,
    Pipe,
    PipeContext,
    PipeInput,
    PipeResult,
)

__all__ = ["install_routes", "TickerService", "PAGE"]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>pipecomet comet demo</title>
<style>body{font:14px system-ui,sans-serif;margin:2em}li{font-family:monospace}</style>
</head><body>
<h1>pipecomet: comet push</h1>
<p>Subscribed to <code id="topics"></code> with <code>EventSource</code>.
Publish with
<code>curl -H 'Authorization: Bearer demo-publish-token' -H 'content-type: application/json'
-d '{"text":"hi"}' http://HOST/_pipecomet/publish/chat</code></p>
<p>state: <b id="state">connecting</b>, last id: <code id="last"></code></p>
<ul id="messages"></ul>
<script>
var topics = new URLSearchParams(location.search).get("topic") || "chat,ticker";
document.getElementById("topics").textContent = topics;
window.received = [];
window.controls = [];
var es = new EventSource("/comet/" + topics);
function show(text) {
  var li = document.createElement("li");
  li.textContent = text;
  var ul = document.getElementById("messages");
  ul.insertBefore(li, ul.firstChild);
  while (ul.childNodes.length > 50) ul.removeChild(ul.lastChild);
}
es.onopen = function () { document.getElementById("state").textContent = "open"; };
es.onerror = function () { document.getElementById("state").textContent = "reconnecting"; };
function onData(e) {
  window.received.push({id: e.lastEventId, type: e.type, data: JSON.parse(e.data)});
  document.getElementById("last").textContent = e.lastEventId;
  show(e.type + " " + e.data);
}
es.onmessage = onData;
["chat", "ticker", "news"].forEach(function (t) { es.addEventListener(t, onData); });
["gap", "reset", "end", "reconnect", "shutdown"].forEach(function (t) {
  es.addEventListener(t, function (e) { window.controls.push({type: t, data: JSON.parse(e.data)});
                                        show(t + " " + e.data); });
});
</script></body></html>
"""


def _topics(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> list[str]:
    return inp.path_params["topic"].split(",")


def _authorize(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> None:
    """
    Subscribe authorization, as an ordinary pipe before the condition pipe.
    """
    private = [t for t in _topics(inp, ctx, res) if t.startswith("private.")]
    if private:
        key = inp.query.get("app_key")
        keys = ctx.runtime.config.demo.keys
        if not key:
            raise BadRequest("private topics need app_key", code="missing_app_key")
        if key not in keys:
            raise Forbidden("unknown app key", code="bad_app_key")
    return None


def _page(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Answer:
    return Answer(PAGE, content_type="text/html; charset=utf-8",
                  headers={"cache-control": "no-cache"})


_job_ids = itertools.count(1)


def _start_job(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> str:
    """
    Start an async job; its result comes back later through a fire of
    ``job:<id>`` (as a backend's callback would).
    """
    try:
        seconds = float(inp.query.get("seconds", "1"))
    except ValueError:
        seconds = -1
    if not (0 <= seconds <= 30):
        raise BadRequest("seconds must be between 0 and 30", code="bad_seconds")
    job = f"job:{next(_job_ids)}"
    keeper = ctx.runtime.events
    if keeper is None:
        raise RuntimeError("the demo's jobs need the event keeper ([comet])")
    ctx.runtime.reactor.callLater(seconds, keeper.fire, job,
                                  {"job": job, "result": "done", "took": seconds})
    return job


log = Logger()


class TickerService(Service):
    """
    Publishes ``{"n", "price"}`` on ``ticker`` every ``period`` seconds.
    """

    def __init__(self, app: App, period: float = 1.0) -> None:
        self.app = app
        self.period = period
        self.n = 0
        self._call: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        self._call = self.app.reactor.callLater(self.period, self._tick)

    def _tick(self) -> None:
        self._call = self.app.reactor.callLater(self.period, self._tick)
        self.n += 1
        hub = self.app.runtime.comet
        if hub is None:
            raise RuntimeError("the demo's ticker needs the comet hub ([comet])")
        price = round(100 + 10 * math.sin(self.n / 10), 2)
        d = hub.publish("ticker", {"n": self.n, "price": price}, event="ticker")
        # With a networked bus a tick can fail (bus down): the next one tries again.
        d.addErrback(lambda f: log.info("ticker: publish failed: {e}", e=f.value))

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def install_routes(app: App) -> None:
    app.route("/comet/<topic>", [Pipe(_authorize, name="authorize"),
                                 Condition(_topics, mode="many", name="subscribe")],
              responders=("sse", "json", "ndjson", "longpoll"))
    app.route("/demo/comet", [Pipe(_page, name="page")])
    app.route("/demo/job", [Pipe(_start_job, name="start_job"),
                            Condition(lambda inp, ctx, res: res["start_job"], timeout=35.0,
                                      name="job_result")])
    app.add_service(TickerService(app))
