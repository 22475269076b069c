"""
``/_pipecomet/metrics`` under ``twistd pipecomet --processes 2``, for real:
one scrape of either serving process gives both processes' series, each
with its ``process`` label, and the request counts add up to what was
sent; a serving process that cannot answer (stopped with SIGSTOP) is left
out of the scrape within ``[metrics] scrape_timeout`` and shown as
``pipecomet_scrape_process_up 0``.

Synchronous (subprocesses and sockets, never the test reactor); every wait
has a deadline that fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .support import twistd_server
from .test_it_processes import http, ready_set, wait_for

pytestmark = pytest.mark.integration

APP = "tests.test_it_metrics_processes:make_app"


def make_app(config: Any = None) -> Any:
    """
    What the serving processes serve: a hello and the serving process's pid.
    """
    from pipecomet import App, Pipe

    app = App(name="metrics-processes")
    app.route("/hello", [Pipe(lambda inp, ctx, res: {"pid": os.getpid()}, name="hello")])
    return app


def write_config(directory: Path) -> str:
    path = directory / "pipecomet.toml"
    path.write_text('[server]\naccess_log = "off"\ndrain_grace = 0.2\n'
                    '[metrics]\nscrape_timeout = 0.5\n')
    return str(path)


def scrape(port: int) -> dict[str, Any]:
    code, body = http(port, "GET", "/_pipecomet/metrics")
    assert code == 200, body
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def hello_counts(families: dict[str, Any]) -> dict[str, float]:
    """
    ``pipecomet_http_requests_total{route="/hello"}`` by process.
    """
    out: dict[str, float] = {}
    for s in families["pipecomet_http_requests"].samples:
        if s.labels["route"] == "/hello":
            out[s.labels["process"]] = out.get(s.labels["process"], 0.0) + s.value
    return out


def test_one_scrape_gives_every_process_with_a_process_label(tmp_path: Path):
    cfg = write_config(tmp_path)
    with twistd_server(["--app", APP, "--config", cfg, "--processes", "2"]) as (port, _proc):
        procs = ready_set(port)
        pids = {c["index"]: c["pid"] for c in procs["set"]}
        # Requests on new connections until both processes have answered some.
        sent = 0
        served_by: set[int] = set()
        deadline = time.monotonic() + 30
        while served_by != set(pids.values()):
            assert time.monotonic() < deadline, f"only {served_by} answered of {pids}"
            code, body = http(port, "GET", "/hello")
            assert code == 200, body
            served_by.add(json.loads(body)["pid"])
            sent += 1
        # Every scrape (whichever process takes it) sees both processes'
        # series, and the counts add up to what was sent.
        answered_by: set[int] = set()
        for _ in range(20):
            fams = scrape(port)
            counts = hello_counts(fams)
            assert set(counts) == {"0", "1"}, counts
            assert all(n >= 1 for n in counts.values()), counts
            assert sum(counts.values()) == sent, (counts, sent)
            up = {s.labels["process"]: s.value for s in fams["pipecomet_scrape_process_up"].samples}
            assert up == {"0": 1.0, "1": 1.0}
            # The process collector's figures are each process's own.
            starts = {s.labels["process"] for s in
                      fams["pipecomet_process_start_time_seconds"].samples}
            assert starts == {"0", "1"}
            # Every sample carries the label; the supervisor's own don't.
            for name, fam in fams.items():
                for s in fam.samples:
                    if name.startswith("pipecomet_supervisor_"):
                        assert "process" not in s.labels
                    else:
                        assert "process" in s.labels, (name, s)
            assert fams["pipecomet_supervisor_processes"].samples[0].value == 2
            # Which process took this scrape: its own in-flight gauge shows it.
            inflight = {s.labels["process"]: s.value
                        for s in fams["pipecomet_http_requests_in_flight"].samples}
            answered_by |= {int(p) for p, v in inflight.items() if v >= 1}
        assert answered_by, "no scrape counted itself in flight"


def test_a_stopped_process_is_left_out_within_the_scrape_timeout(tmp_path: Path):
    cfg = write_config(tmp_path)
    with twistd_server(["--app", APP, "--config", cfg, "--processes", "2"]) as (port, _proc):
        procs = ready_set(port)
        victim = procs["set"][1]
        os.kill(victim["pid"], signal.SIGSTOP)
        try:
            def partial() -> Any:
                fams = scrape(port)
                up = {s.labels["process"]: s.value
                      for s in fams["pipecomet_scrape_process_up"].samples}
                return fams if up == {"0": 1.0, "1": 0.0} else None

            fams = wait_for(partial, 30, "a scrape without the stopped process")
            processes = {s.labels["process"] for s in
                         fams["pipecomet_process_start_time_seconds"].samples}
            assert processes == {"0"}
        finally:
            os.kill(victim["pid"], signal.SIGCONT)

        def whole() -> Any:
            fams = scrape(port)
            up = {s.labels["process"]: s.value
                  for s in fams["pipecomet_scrape_process_up"].samples}
            return up == {"0": 1.0, "1": 1.0}

        wait_for(whole, 30, "both processes in the scrape again")
