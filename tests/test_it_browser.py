"""
A real browser: headless Chromium (the Debian package, installed by
``make test``) opens the demo's comet page served by ``twistd -n
pipecomet``; its ``EventSource`` receives messages published over HTTP, and
the test reads them from the page through the DevTools protocol
(``tests/chromium.py``).
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from .chromium import chromium_page, wait_for
from .support import twistd_server

TOKEN = "demo-publish-token"  # the demo's documented default (pipecomet.demo.PUBLISH_TOKEN)


def publish(port: int, topic: str, data: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/_pipecomet/publish/{topic}", data=json.dumps(data).encode(),
        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
        method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_eventsource_in_headless_chromium_receives_published_messages():
    with twistd_server() as (port, _proc), chromium_page(
            f"http://127.0.0.1:{port}/demo/comet?topic=chat", "/demo/comet") as tools:
        sent = [{"text": f"hello {n}", "n": n} for n in range(3)]
        ids = [publish(port, "chat", m)["id"] for m in sent]
        got = wait_for(lambda: (lambda r: r if len(r) >= 3 else None)(
            json.loads(tools.evaluate("JSON.stringify(window.received)") or "[]")),
            "3 messages in the page")
        assert [m["data"] for m in got] == sent
        assert [m["id"] for m in got] == ids
        shown = tools.evaluate("document.getElementById('messages').textContent")
        assert "hello 2" in shown
