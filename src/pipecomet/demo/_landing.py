"""
The demo's landing page, ``GET /``: what a browser (HTML) or a client
asking ``Accept: application/json`` sees first — every endpoint of the
demo, with a link to try it.

The list is built from the app's routes when the page is asked for, so a
route added by any part shows up by itself; :data:`ENDPOINTS` gives the
known ones a description and a ready-to-click example (append to it).
"""

from __future__ import annotations

from html import escape
from typing import TypedDict
from pipecomet import Answer, App, Pipe, PipeContext, PipeInput, PipeResult

from ._json import dumps

__all__ = ["install_routes", "ENDPOINTS", "endpoints"]

#: ``(route as declared, method, example href, what it shows)``; an entry is
#: listed only when the app has that route.
ENDPOINTS: list[tuple[str, str, str, str]] = [
    ("/api/<api>", "GET", "/api/time.get?app_key=demo-key",
     "plain chain: app key, rate limit, validation, routing, format=json|xml"),
    ("/api/echo", "GET", "/api/echo?app_key=demo-key&a=1",
     "query and body parameters echoed back (body parsed as it arrives)"),
    ("/api/search", "GET", "/api/search?app_key=demo-key&q=cats",
     "parallel branches, each streamed as it completes (NDJSON or SSE by Accept)"),
    ("/api/slow.get", "GET", "/api/slow.get?app_key=demo-key",
     "thread pipe in quota category slow (about 2 s of blocking)"),
    ("/api/fast.get", "GET", "/api/fast.get?app_key=demo-key",
     "thread pipe in quota category fast (about 1 ms)"),
    ("/api/cpu.burn", "POST", "/api/cpu.burn?app_key=demo-key&ms=50",
     "CPU work on the worker process pool"),
    ("/api/image.resize", "POST", "/api/image.resize?app_key=demo-key&width=64&height=64",
     "resize the image in the body on the worker pool"),
    ("/api/upload", "POST", "/api/upload",
     "form or multipart upload; app_key, the first field, checked before the rest is read"),
    ("/comet/<topic>", "GET", "/comet/news",
     "subscribe to a topic: SSE, long-poll or NDJSON by Accept or transport="),
    ("/demo/comet", "GET", "/demo/comet", "a page whose browser EventSource shows ticker and chat"),
    ("/demo/job", "GET", "/demo/job?seconds=1", "the once mode: waits for an async job's result"),
    ("/_pipecomet/publish/<topic>", "POST", "/_pipecomet/publish/news",
     "publish to a topic (Authorization: Bearer demo-publish-token)"),
    ("/_pipecomet/status", "GET", "/_pipecomet/status", "live figures of every part"),
    ("/_pipecomet/metrics", "GET", "/_pipecomet/metrics", "Prometheus metrics"),
    ("/_pipecomet/dashboard", "GET", "/_pipecomet/dashboard", "live dashboard"),
]


def _declared(app: App) -> dict[str, tuple[str, ...]]:
    """
    Route as declared → its methods: chain routes and plain Klein ones.
    """
    found: dict[str, tuple[str, ...]] = {}
    for route in app.routes:
        found.setdefault(route.path, route.methods)
    for rule in app.klein.url_map.iter_rules():
        found.setdefault(rule.rule, tuple(sorted(rule.methods or ("GET",))))
    return found


class Listed(TypedDict):
    """
    One endpoint the landing page lists.
    """

    path: str
    method: str
    href: str | None
    about: str


def endpoints(app: App) -> list[Listed]:
    """
    What the landing page lists: the described endpoints the app has, in
    :data:`ENDPOINTS` order, then every other route.
    """
    declared = _declared(app)
    out: list[Listed] = []
    described = set()
    for route, method, href, about in ENDPOINTS:
        if route in declared:
            described.add(route)
            out.append({"path": route, "method": method, "href": href, "about": about})
    for route, methods in declared.items():
        if route in described or route == "/":
            continue
        method = "GET" if "GET" in methods else (methods[0] if methods else "GET")
        out.append({"path": route, "method": method,
                    "href": None if "<" in route else route, "about": ""})
    return out


def _wants_json(inp: PipeInput) -> bool:
    accept = (inp.header("accept") or "").lower()
    return "application/json" in accept and "text/html" not in accept


def _page(app: App, items: list[Listed]) -> str:
    rows = []
    for item in items:
        label = escape(item["path"])
        href = item["href"]
        if href is not None and item["method"] == "GET":
            label = f'<a href="{escape(href)}">{escape(href)}</a>'
        elif href is not None:
            label = f"<code>{escape(href)}</code>"
        rows.append(f"<tr><td>{escape(item['method'])}</td><td>{label}</td>"
                    f"<td>{escape(item['about'])}</td></tr>")
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(app.name)}</title>"
        "<style>body{font:15px/1.5 system-ui,sans-serif;margin:2em;max-width:60em}"
        "td{padding:.2em .8em;vertical-align:top}code{font-size:90%}</style></head><body>"
        f"<h1>{escape(app.name)}</h1>"
        "<p>The pipecomet demo gateway. App keys: <code>demo-key</code> and "
        "<code>demo-limited</code> (5 req/s); publish token "
        "<code>demo-publish-token</code>. <code>POST</code> endpoints are for curl; "
        "see the README.</p>"
        "<table><tr><th>method</th><th>endpoint</th><th>shows</th></tr>"
        + "".join(rows) + "</table></body></html>"
    )


def install_routes(app: App) -> None:
    def landing(inp: PipeInput, ctx: PipeContext, res: PipeResult) -> Answer:
        items = endpoints(app)
        if _wants_json(inp):
            return Answer(dumps({"name": app.name, "endpoints": items}),
                          content_type="application/json")
        return Answer(_page(app, items), content_type="text/html; charset=utf-8")

    app.route("/", [Pipe(landing, name="landing")])
