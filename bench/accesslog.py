"""
``make bench-accesslog``: what the access log and the metrics cost per request.

One pipecomet app, a 1-pipe chain answering ``GET /hello`` with
``{"msg":"hi!"}`` (the "hello" of issue 13), served in five variants:

- ``none``: no metrics, no access log (the floor);
- ``metrics``: the default ``[metrics]`` (request figures, pipe timing,
  request ids), no access log;
- ``text`` / ``json``: metrics plus the buffered access log in text or
  JSON lines, written to a file;
- ``twisted-log``: metrics plus twisted.web's own access log (``Site.log``,
  a line per request through a text log observer writing to a file), as
  pipecomet had before (issue 13 measured it at 42 %).

Each variant runs in its own process pinned to core 0, wrk on core 1;
rounds are interleaved and the medians reported, like ``bench.http``.  An
in-process table (raw requests into each variant's real Site over an
in-memory transport) gives the steadier CPU µs per request.

Settings: ``BENCH_ACCESSLOG_ROUNDS`` (3), ``BENCH_ACCESSLOG_DURATION`` (10 s),
``BENCH_ACCESSLOG_WARMUP`` (3 s), ``BENCH_ACCESSLOG_CONNECTIONS`` (50).

Target (issue 13): the access log costs ≤ 10 % of hello throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from ._common import cpu_seconds, free_port, loadavg, stop_process, tool_version, wait_ready, write_result
from .http import parse_wrk

PATH = "/hello"
VARIANTS = ("none", "metrics", "text", "json", "twisted-log")
LABELS = {
    "none": "no metrics, no access log",
    "metrics": "metrics on, no access log",
    "text": "metrics + access log, text",
    "json": "metrics + access log, JSON",
    "twisted-log": "metrics + twisted.web's Site.log (old default)",
}
SERVER_CORE, CLIENT_CORE = "0", "1"
HARD_LIMIT = 20 * 60


def make_site(variant: str, reactor: Any, logdir: str) -> tuple[Any, Any]:
    """
    The app and its Site for ``variant``.
    """
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from pipecomet import App, Config, Pipe

    app = App(name="bench-accesslog")
    app.runtime.reactor = reactor
    app.route(PATH, [Pipe(lambda inp, ctx, res: {"msg": "hi!"}, name="hello")])
    config: dict[str, Any] = {"server": {"access_log": "off"},
                              "metrics": {"enabled": variant != "none"}}
    if variant in ("text", "json"):
        config["server"]["access_log"] = os.path.join(logdir, f"access-{variant}.log")
        config["logging"] = {"access_format": variant}
    app.configure(Config.from_dict(config))
    site = app.site()
    if variant == "twisted-log":
        # Back to twisted.web's own Site.log, logged as twistd would: a text
        # log observer writing each line to a file.
        del site.log
        out = open(os.path.join(logdir, "twisted.log"), "a")
        globalLogBeginner.beginLoggingTo([textFileLogObserver(out)], redirectStandardIO=False,
                                         discardBuffer=True)
    return app, site


def serve(variant: str, port: int, logdir: str) -> None:
    from twisted.internet import reactor

    app, site = make_site(variant, reactor, logdir)
    app.service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", app.service.stopService)
    reactor.listenTCP(port, site, backlog=1024, interface="127.0.0.1")
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


def in_process(logdir: str, rounds: int = 15, batch: int = 2000,
               variants: tuple[str, ...] = VARIANTS) -> dict[str, float]:
    """
    CPU µs per request of each variant without sockets (see ``bench.http_servers``).
    ``twisted-log`` goes last: it starts global logging.  The user agent
    is wrk's, so the text and JSON lines are as long as under wrk.
    """
    from twisted.internet import reactor
    from twisted.internet.testing import StringTransport

    line = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: wrk/4.2.0\r\n\r\n".encode()
    setups = {}
    for variant in variants:
        app, site = make_site(variant, reactor, logdir)
        app.service.startService()
        site.startFactory()
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(line)
        if not transport.value().startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{variant}: unexpected answer {transport.value()!r}")
        transport.clear()
        setups[variant] = (app, channel, transport)
    best = {v: float("inf") for v in setups}
    for _ in range(rounds):
        for variant, (_, channel, transport) in setups.items():
            feed = channel.dataReceived
            start = time.process_time()
            for _ in range(batch):
                feed(line)
            took = time.process_time() - start
            if transport.value().count(b"HTTP/1.1 200") != batch:
                raise RuntimeError(f"{variant}: not every request was answered")
            transport.clear()
            best[variant] = min(best[variant], 1e6 * took / batch)
    for app, channel, _ in setups.values():
        channel.connectionLost(None)
    return best


def _pin(core: str, cmd: list[str], pinned: bool) -> list[str]:
    return ["taskset", "-c", core, *cmd] if pinned else cmd


def measure(variant: str, *, seconds: int, warmup: int, connections: int, pinned: bool,
            logdir: str) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.accesslog", "--serve", variant, "--port", str(port),
           "--logdir", logdir]
    proc = subprocess.Popen(_pin(SERVER_CORE, cmd, pinned), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        wait_ready(proc, f"{variant} server")

        def wrk(duration: int) -> dict[str, Any]:
            out = subprocess.run(
                _pin(CLIENT_CORE, ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
                                   "--timeout", "5s", f"http://127.0.0.1:{port}{PATH}"], pinned),
                capture_output=True, text=True, timeout=duration + 30)
            if out.returncode != 0:
                raise RuntimeError(f"wrk failed: {out.stderr or out.stdout}")
            return parse_wrk(out.stdout)

        if warmup:
            wrk(warmup)
        cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
        res = wrk(seconds)
        cpu, wall = cpu_seconds(proc.pid) - cpu0, time.monotonic() - wall0
    finally:
        stop_process(proc)
    if res["non_2xx"] or res["socket_errors"]:
        raise RuntimeError(f"{variant}: {res['non_2xx']} non-2xx, {res['socket_errors']} socket errors")
    res["cpu_us_per_req"] = 1e6 * cpu / res["requests"] if res["requests"] else 0.0
    res["server_busy_pct"] = 100.0 * cpu / wall if wall else 0.0
    return res


def main() -> None:
    started = time.monotonic()
    env = os.environ.get
    rounds = int(env("BENCH_ACCESSLOG_ROUNDS") or 3)
    seconds = int(env("BENCH_ACCESSLOG_DURATION") or 10)
    warmup = int(env("BENCH_ACCESSLOG_WARMUP") or 3)
    connections = int(env("BENCH_ACCESSLOG_CONNECTIONS") or 50)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (make bench-accesslog installs it)")
    pinned = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    budget = rounds * len(VARIANTS) * (seconds + warmup + 15)
    if budget > HARD_LIMIT:
        raise SystemExit(f"settings would take up to {budget}s; the limit is {HARD_LIMIT}s")
    logdir = tempfile.mkdtemp(prefix="pipecomet-bench-accesslog-")
    load_before = loadavg()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    try:
        for r in range(rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            for variant in order:
                out = measure(variant, seconds=seconds, warmup=warmup, connections=connections,
                              pinned=pinned, logdir=logdir)
                runs[variant].append(out)
                print(f"round {r + 1}/{rounds} {variant:12s} {out['rps']:9.0f} req/s  "
                      f"p99 {out['p99_ms']:6.2f} ms  cpu {out['cpu_us_per_req']:6.1f} us/req  "
                      f"busy {out['server_busy_pct']:3.0f}%", flush=True)
        written = {name: os.path.getsize(os.path.join(logdir, name))
                   for name in os.listdir(logdir)}
        cmd = _pin(SERVER_CORE, [sys.executable, "-m", "bench.accesslog", "--in-process",
                                 "--logdir", logdir], pinned)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           cwd=os.path.dirname(os.path.dirname(__file__)))
        if p.returncode != 0:
            raise RuntimeError(f"in-process run failed: {p.stderr}")
        breakdown = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    load_after = loadavg()

    med = {v: {k: statistics.median(o[k] for o in runs[v])
               for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")} for v in VARIANTS}
    rows = []
    for v in VARIANTS:
        rps = [o["rps"] for o in runs[v]]
        rows.append([LABELS[v], round(med[v]["rps"]), round(med[v]["p50_ms"], 2),
                     round(med[v]["p99_ms"], 2), round(med[v]["cpu_us_per_req"], 1),
                     f"{min(rps):,.0f}–{max(rps):,.0f}",
                     f"{100 * (1 - med[v]['rps'] / med['metrics']['rps']):+.1f}%"
                     if v != "metrics" else "—"])
    base = med["metrics"]["rps"]
    # Paired per round: each round ran every variant back to back.
    paired = {v: [100 * (1 - a["rps"] / b["rps"]) for a, b in zip(runs[v], runs["metrics"])]
              for v in ("text", "json", "twisted-log")}
    cost = {v: statistics.median(paired[v]) for v in paired}
    cpu_cost = {v: 100 * (breakdown[v] / breakdown["metrics"] - 1) for v in ("text", "json",
                                                                           "twisted-log")}
    targets = [
        {"what": f"access log ({fmt}) cost in hello req/s, median of paired rounds",
         "target": "≤ 10 %", "value": f"{cost[fmt]:.1f} %", "met": cost[fmt] <= 10.0}
        for fmt in ("text", "json")
    ]
    notes = [
        f"{rounds} interleaved rounds per variant, each a {warmup} s warm-up then a {seconds} s "
        f"wrk run (1 thread, {connections} keep-alive connections); medians. 'vs metrics only' = "
        "throughput lost against the same app with metrics and no access log; the access-log "
        "targets use the median of the per-round paired losses "
        f"(text {', '.join(f'{x:.1f}' for x in paired['text'])} %; "
        f"json {', '.join(f'{x:.1f}' for x in paired['json'])} %; "
        f"twisted.web log {', '.join(f'{x:.1f}' for x in paired['twisted-log'])} %).",
        "in-process: CPU µs per request feeding raw requests to each variant's real Site over an "
        "in-memory transport, minimum of 15 batches of 2,000 (access-log cost in CPU: "
        + ", ".join(f"{v} {cpu_cost[v]:+.1f} %" for v in cpu_cost) + ").",
        "the access log files went to a temporary directory: "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(written.items())) + ".",
        ("server pinned to core 0, wrk to core 1 (taskset)" if pinned
         else "NOT pinned: fewer than 2 cores or no taskset"),
        f"load average before {load_before}, after {load_after}; run took "
        f"{time.monotonic() - started:.0f} s.",
    ]
    write_result(
        "accesslog",
        title="Access log and metrics: cost per hello request (wrk)",
        command="flock /tmp/pipecomet-bench.lock make bench-accesslog",
        tables=[{
            "title": "GET /hello (1-pipe chain, JSON body), 50 connections",
            "columns": ["variant", "req/s (median)", "p50 ms", "p99 ms", "server CPU µs/req",
                        "req/s range", "vs metrics only"],
            "rows": rows,
        }, {
            "title": "Server CPU per request without sockets (in-process)",
            "columns": ["variant", "µs/req", "µs more than no metrics/no log"],
            "rows": [[LABELS[v], round(breakdown[v], 1), round(breakdown[v] - breakdown["none"], 1)]
                     for v in VARIANTS],
        }],
        ratios={f"{v} req/s / metrics-only req/s": med[v]["rps"] / base for v in VARIANTS},
        targets=targets,
        notes=notes,
        raw={"wrk": tool_version(["wrk", "--version"]), "runs": runs,
             "in_process_us_per_req": breakdown},
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=VARIANTS)
    parser.add_argument("--port", type=int)
    parser.add_argument("--logdir")
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="with --in-process: the variants to measure, comma-separated")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.logdir)
    elif args.in_process:
        chosen = tuple(v for v in VARIANTS if v in args.variants.split(","))
        print(json.dumps(in_process(args.logdir, variants=chosen)))
    else:
        main()
