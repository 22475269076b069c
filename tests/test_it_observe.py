"""
Observability end to end, on 127.0.0.1: ``twistd -n pipecomet`` with JSON
logs and the access log in a file (request ids, error ids in both, lines
flushed on stop), a real Prometheus scrape, and the live dashboard in
headless Chromium (the Debian package ``make test`` installs), read over
the DevTools protocol while the test sends traffic.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .support import twistd_server
from .chromium import chromium_page, screenshot, wait_for

pytestmark = pytest.mark.integration

TIMEOUT = 10  # seconds any single HTTP call may take: a bound for a broken setup


def make_app(config: Any = None) -> Any:
    """
    The app ``twistd`` serves in these tests (``--app tests.test_it_observe:make_app``).
    """
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from pipecomet import App, Pipe

    app = App(name="observe-it")

    def hello(inp, ctx, res):
        return {"request_id": ctx.request_id}

    def boom(inp, ctx, res):
        raise RuntimeError("kaboom")

    def slow(inp, ctx, res):
        return deferLater(reactor, 0.05, lambda: "slow")

    app.route("/hello", [Pipe(hello)])
    app.route("/boom", [Pipe(boom)])
    app.route("/slow", [Pipe(slow)])
    app.route("/upload", [Pipe(lambda inp, ctx, res: inp.body(), name="read"),
                          Pipe(lambda inp, ctx, res: {"bytes": len(res.last)}, name="size")],
              methods=("POST",))
    return app


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def post(port: int, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def test_json_logs_access_log_and_metrics_under_twistd(tmp_path: Path):
    access = tmp_path / "access.log"
    server_log = tmp_path / "server.log"
    config = tmp_path / "observe.toml"
    config.write_text(f'[server]\naccess_log = "{access}"\n'
                      f'[logging]\nfile = "{server_log}"\naccess_format = "json"\n'
                      "access_flush_interval = 60.0\n")
    with twistd_server(["--app", "tests.test_it_observe:make_app", "--config", str(config),
                        "--log-format", "json"]) as (port, proc):
        status, headers, body = get(port, "/hello", {"X-Request-Id": "it-hello-1"})
        assert status == 200
        assert headers["x-request-id"] == "it-hello-1"
        assert json.loads(body) == {"request_id": "it-hello-1"}
        status, headers, body = get(port, "/hello", {"X-Request-Id": "bad id with spaces"})
        made = headers["x-request-id"]
        assert made != "bad id with spaces" and len(made) == 32
        status, headers, body = get(port, "/boom", {"X-Request-Id": "it-boom-1"})
        assert status == 500
        error_id = json.loads(body)["error"]["id"]
        for _ in range(5):
            assert get(port, "/slow")[0] == 200
        req = urllib.request.Request(f"http://127.0.0.1:{port}/upload", data=b"z" * 5000,
                                     headers={"Content-Type": "application/octet-stream",
                                              "X-Request-Id": "it-upload-1"}, method="POST")
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            assert json.loads(r.read()) == {"bytes": 5000}
            assert r.headers["X-Request-Id"] == "it-upload-1"
        status, headers, body = get(port, "/_pipecomet/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        assert samples[("pipecomet_http_requests_total",
                        (("method", "GET"), ("route", "/hello"), ("status", "200")))] == 2
        assert samples[("pipecomet_http_requests_total",
                        (("method", "GET"), ("route", "/boom"), ("status", "500")))] == 1
        assert samples[("pipecomet_http_errors_total", (("code", "internal_error"),))] == 1
        # Five 50 ms pipes: each took at least 50 ms, by the real clock.
        assert samples[("pipecomet_pipe_duration_seconds_bucket",
                        (("le", "0.025"), ("pipe", "slow"), ("route", "/slow")))] == 0
        assert samples[("pipecomet_pipe_duration_seconds_count",
                        (("pipe", "slow"), ("route", "/slow")))] == 5
        assert samples[("pipecomet_reactor_lag_seconds_count", ())] >= 0
        # Buffered: with a 60 s flush interval nothing is written yet.
        assert not access.exists() or access.read_text() == ""
        proc.send_signal(signal.SIGTERM)
        proc.wait(TIMEOUT)
    # Flushed on stop.
    lines = [json.loads(line) for line in access.read_text().splitlines()]
    by_id = {line["request_id"]: line for line in lines}
    assert by_id["it-hello-1"]["route"] == "/hello"
    assert by_id["it-hello-1"]["status"] == 200
    assert by_id[made]["status"] == 200
    boom = by_id["it-boom-1"]
    assert (boom["status"], boom["error_code"], boom["error_id"]) == (500, "internal_error", error_id)
    assert len([line for line in lines if line["route"] == "/slow"]) == 5
    upload = by_id["it-upload-1"]
    assert (upload["method"], upload["route"], upload["status"]) == ("POST", "/upload", 200)
    assert all(line["duration"] >= 0.05 for line in lines if line["route"] == "/slow")
    # The server log: JSON lines, the 500 logged with the ids the client got.
    records = [json.loads(line) for line in server_log.read_text().splitlines()]
    failures = [r for r in records if r.get("error_id") == error_id]
    assert len(failures) == 1
    assert failures[0]["request_id"] == "it-boom-1"
    assert "RuntimeError: kaboom" in failures[0]["traceback"]
    assert any("Site starting" in r["message"] or "starting on" in r["message"] for r in records)


def test_text_access_log_on_stdout_by_default():
    with twistd_server() as (port, proc):
        assert get(port, "/_pipecomet/status", {"X-Request-Id": "it-stdout-1"})[0] == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
        # support.twistd_server reads the output in a thread: give it the
        # last lines (a bounded wait that ends as soon as the line is there).
        for _ in range(100):
            if any(b"it-stdout-1" in chunk for chunk in proc.output_tail):
                break
            time.sleep(0.1)
        text = b"".join(proc.output_tail).decode()
    lines = [line for line in text.splitlines() if "it-stdout-1" in line]
    assert lines, text[-2000:]
    line = lines[0]
    assert '"GET /_pipecomet/status HTTP/1.1" 200 ' in line
    assert line.endswith("it-stdout-1 /_pipecomet/status")


def test_dashboard_in_headless_chromium(tmp_path: Path):
    with twistd_server() as (port, proc), chromium_page(
            f"http://127.0.0.1:{port}/_pipecomet/dashboard", "/_pipecomet/dashboard",
            "--window-size=1440,900", "--hide-scrollbars") as tools:
        wait_for(lambda: tools.evaluate("window.pipecometDashboard.snapshots.length") >= 1,
                 "a first snapshot")
        # The header names the serving process (twistd's own pid) and its uptime.
        shown = tools.evaluate("document.getElementById('proc').textContent")
        assert shown.startswith(f"pid {proc.pid} on "), shown
        assert " · pipecomet " in shown and " · Twisted " in shown
        assert tools.evaluate("document.getElementById('uptime').textContent").startswith("up ")
        before = json.loads(tools.evaluate("JSON.stringify(window.pipecometDashboard.charts)"))
        canvas_before = tools.evaluate(
            "document.getElementById('chart-requests').toDataURL()")
        # (The browser's own favicon request may be a not_found already.)
        assert "invalid_app_key" not in before["errors"]["series"]
        assert before["workers"]["max"] == 0
        # Traffic for a few seconds: answers, errors with a code of their
        # own, and calls on the worker processes.
        end = time.monotonic() + 3.5
        sent = 0
        while time.monotonic() < end:
            assert get(port, "/api/time.get?app_key=demo-key")[0] == 200
            assert get(port, "/api/time.get?app_key=nope")[0] == 403
            assert post(port, "/api/cpu.burn?app_key=demo-key&ms=5")[0] == 200
            sent += 3
            time.sleep(0.01)

        def changed() -> Any:
            charts = json.loads(tools.evaluate(
                "JSON.stringify(window.pipecometDashboard.charts)"))
            if (charts["requests"]["max"] > before["requests"]["max"]
                    and "invalid_app_key" in charts["errors"]["series"]
                    and charts["workers"]["max"] > 0):
                return charts
            return None

        after = wait_for(changed, "the charts to show the traffic")
        assert after["requests"]["max"] > before["requests"]["max"]
        assert after["latency"]["series"] == ["p50", "p90", "p99"]
        assert "2xx" in after["requests"]["series"]
        assert set(after["comet"]["series"]) == {"sse", "ndjson", "longpoll"}
        assert after["workers"]["last"]["calls/s"] >= 0
        assert "calls/s" in after["workers"]["series"]
        assert any(name.startswith("slow") for name in after["quota"]["series"])
        assert tools.evaluate(
            "document.getElementById('chart-requests').toDataURL()") != canvas_before
        assert tools.evaluate("document.getElementById('tile-rps').textContent") != "–"
        # The pointer over a chart: the legend shows that second (a real
        # mouse event at the canvas's middle, through DevTools).
        box = json.loads(tools.evaluate(
            "JSON.stringify(document.getElementById('chart-requests').getBoundingClientRect())"))
        tools.call("Input.dispatchMouseEvent", type="mouseMoved",
                   x=box["x"] + box["width"] / 2, y=box["y"] + box["height"] / 2)
        hovered = wait_for(lambda: tools.evaluate(
            "window.pipecometDashboard.charts.requests.hover"), "the hovered second")
        snaps = json.loads(tools.evaluate(
            "JSON.stringify(window.pipecometDashboard.snapshots.map(s => s.t))"))
        assert hovered in snaps
        tools.call("Input.dispatchMouseEvent", type="mouseMoved", x=1, y=1)
        # The page's own stream is not counted as a request in flight.
        status = json.loads(get(port, "/_pipecomet/status")[2])
        assert status["comet"]["connections"] == 0
        path = screenshot(tools, tmp_path / "dashboard.png", width=1440)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000
        keep = os.environ.get("PIPECOMET_DASHBOARD_SCREENSHOT")
        if keep:
            shutil.copy(path, keep)
