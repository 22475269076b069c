"""
``make bench-http``: what a request costs on pipecomet's own HTTP/1.1
protocol, on twisted.web's channel, and on aiohttp.

In one run, on 127.0.0.1, with wrk: a bare twisted.web Resource, a bare
Klein app, pipecomet serving a five-pipe inline chain (default settings),
pipecomet's 1-pipe and 5-pipe chains on its own protocol with the access log
off, the 5-pipe chain on twisted.web's channel, Tornado and aiohttp (plain
asyncio loop, access log off), all answering ``GET /hello`` with the same
13-byte JSON body (see :mod:`bench.http_servers`).  Each server runs alone, pinned to core 0;
wrk is pinned to core 1.  Per server and round: start it, a warm-up run, a
measured run, stop it by its PID.  Rounds are interleaved (every kind once
per round) so drift from other load on the machine hits all kinds alike; the
table shows the median over rounds and the spread.

The access log's cost (issue 13) is measured on the "hello" of
:mod:`bench.accesslog` (a 1-pipe chain with the default metrics), served
with and without the access log (text lines to a file in a temporary
directory, as ``server.access_log = PATH`` writes them, the app's services
started so the log is written once a second by its own thread):
``hello``, ``hello-log`` and ``hello-log-json``, with an in-process table of
their CPU per request.

Targets (issue 2): pipecomet ≥ 1.0× bare Klein req/s, pipecomet p99 ≤ 1.2×
bare Klein p99.  Issue 10: the 1-pipe chain (own protocol, no access log)
≥ 1.0× aiohttp req/s, the 5-pipe chain ≥ 0.9×, p99 ≤ 1.2× aiohttp's.
Issue 13: the access log costs ≤ 10 % of hello's req/s (median of the
per-round paired losses).

Settings come from the environment so the Makefile target needs no
arguments: ``BENCH_HTTP_ROUNDS`` (3), ``BENCH_HTTP_DURATION`` (10 s),
``BENCH_HTTP_WARMUP`` (3 s), ``BENCH_HTTP_CONNECTIONS`` (50),
``BENCH_HTTP_KINDS`` (all of :data:`~bench.http_servers.KINDS`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from ._common import cpu_seconds, free_port, loadavg, stop_process, tool_version, wait_ready, write_result
from .http_servers import IN_PROCESS_KINDS, KINDS, PATH, QUERY

LABELS = {
    "twisted": "bare twisted.web Resource",
    "klein": "bare Klein",
    "pipecomet": "pipecomet, 5-pipe inline chain (defaults: access log on)",
    "pipecomet-1": "pipecomet, 1 pipe, own protocol, access log off",
    "pipecomet-5": "pipecomet, 5-pipe chain, own protocol, access log off",
    "pipecomet-5-twisted": "pipecomet, 5-pipe chain, twisted.web channel, access log off",
    "tornado": "bare Tornado (anchor)",
    "aiohttp": "bare aiohttp (asyncio loop, access log off)",
    "hello": "pipecomet hello (1 pipe, metrics on), access log off",
    "hello-log": "pipecomet hello, access log on (text, to a file)",
    "hello-log-json": "pipecomet hello, access log on (JSON, to a file)",
}
#: Kinds served by :mod:`bench.accesslog` (kind → its variant): the access
#: log's cost, with and without it.
ACCESS_LOG_KINDS = {"hello": "metrics", "hello-log": "text", "hello-log-json": "json"}
ALL_KINDS = (*KINDS, *ACCESS_LOG_KINDS)
SERVER_CORE = "0"
CLIENT_CORE = "1"
#: No run may outlive this, whatever the settings.
HARD_LIMIT = 30 * 60


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot read wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """
    Figures from ``wrk --latency`` output: req/s, p50/p75/p90/p99 in ms,
    requests, non-2xx responses and socket errors.
    """
    res: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise ValueError("no Requests/sec in wrk output:\n" + out)
    res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    res["requests"] = int(m.group(1)) if m else 0
    dist = out.split("Latency Distribution", 1)
    if len(dist) < 2:
        raise ValueError("no latency distribution (was --latency given?):\n" + out)
    for pct, val in re.findall(r"^\s*(50|75|90|99)%\s+(\S+)", dist[1], re.M):
        res[f"p{pct}_ms"] = _ms(val)
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return res


def _pin(core: str, cmd: list[str], pinned: bool) -> list[str]:
    return ["taskset", "-c", core, *cmd] if pinned else cmd


class Server:
    """
    One benchmark server process, started and stopped by its PID.
    """

    def __init__(self, kind: str, pinned: bool, logdir: str) -> None:
        self.kind = kind
        self.port = free_port()
        if kind in ACCESS_LOG_KINDS:
            cmd = [sys.executable, "-m", "bench.accesslog", "--serve", ACCESS_LOG_KINDS[kind],
                   "--port", str(self.port), "--logdir", logdir]
        else:
            cmd = [sys.executable, "-m", "bench.http_servers", "--kind", kind,
                   "--port", str(self.port)]
        self.proc = subprocess.Popen(_pin(SERVER_CORE, cmd, pinned), stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     cwd=os.path.dirname(os.path.dirname(__file__)))

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_ready(self.proc, f"{self.kind} server", timeout)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)


def run_wrk(port: int, seconds: int, connections: int, pinned: bool) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}{PATH}?{QUERY}"
    cmd = _pin(CLIENT_CORE, ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                             "--timeout", "5s", url], pinned)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr or p.stdout}")
    return parse_wrk(p.stdout)


def measure(kind: str, *, seconds: int, warmup: int, connections: int, pinned: bool,
            logdir: str) -> dict[str, Any]:
    server = Server(kind, pinned, logdir)
    try:
        server.wait_ready()
        if warmup:
            run_wrk(server.port, warmup, connections, pinned)
        cpu0, wall0 = server.cpu_seconds(), time.monotonic()
        out = run_wrk(server.port, seconds, connections, pinned)
        cpu, wall = server.cpu_seconds() - cpu0, time.monotonic() - wall0
    finally:
        server.stop()
    if out["non_2xx"] or out["socket_errors"]:
        raise RuntimeError(f"{kind}: {out['non_2xx']} non-2xx responses, "
                           f"{out['socket_errors']} socket errors")
    # CPU the server spent per request: unlike req/s it barely moves when
    # other processes take turns on the server's core.
    out["cpu_us_per_req"] = 1e6 * cpu / out["requests"] if out["requests"] else 0.0
    # Below ~95 % the server was not alone on its core (or not saturated).
    out["server_busy_pct"] = 100.0 * cpu / wall if wall else 0.0
    return out


def in_process_breakdown(pinned: bool) -> dict[str, float]:
    """
    ``bench.http_servers --in-process`` in its own process on the server's
    core: µs of CPU per request of each kind without sockets.
    """
    cmd = _pin(SERVER_CORE, [sys.executable, "-m", "bench.http_servers", "--in-process"], pinned)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    if p.returncode != 0:
        raise RuntimeError(f"in-process breakdown failed: {p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def access_log_in_process(pinned: bool, logdir: str) -> dict[str, float]:
    """
    ``bench.accesslog --in-process`` for the hello's variants: µs of CPU
    per request without sockets, with and without the access log.
    """
    variants = ",".join(ACCESS_LOG_KINDS.values())
    cmd = _pin(SERVER_CORE, [sys.executable, "-m", "bench.accesslog", "--in-process",
                             "--logdir", logdir, "--variants", variants], pinned)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    if p.returncode != 0:
        raise RuntimeError(f"access-log in-process run failed: {p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> float:
    """
    (max - min) / median, in percent: how much the rounds disagreed.
    """
    med = statistics.median(values)
    return 100.0 * (max(values) - min(values)) / med if med else 0.0


def main() -> None:
    started = time.monotonic()
    rounds = _env_int("BENCH_HTTP_ROUNDS", 3)
    seconds = _env_int("BENCH_HTTP_DURATION", 10)
    warmup = _env_int("BENCH_HTTP_WARMUP", 3)
    connections = _env_int("BENCH_HTTP_CONNECTIONS", 50)
    kinds = [k for k in os.environ.get("BENCH_HTTP_KINDS", ",".join(ALL_KINDS)).split(",") if k]
    for k in kinds:
        if k not in ALL_KINDS:
            raise SystemExit(f"unknown kind {k!r}; known: {ALL_KINDS}")
    for k in ("klein", "pipecomet"):
        if k not in kinds:
            raise SystemExit(f"BENCH_HTTP_KINDS must include {k!r}")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (make bench-http installs it with scripts/apt-ensure)")
    pinned = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    budget = rounds * len(kinds) * (seconds + warmup + 15)
    if budget > HARD_LIMIT:
        raise SystemExit(f"settings would take up to {budget}s; the limit is {HARD_LIMIT}s")

    load_before = loadavg()
    per_kind: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    logdir = tempfile.mkdtemp(prefix="pipecomet-bench-http-")
    try:
        for r in range(rounds):
            # Rotate the order each round so no kind always runs first or last.
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for kind in order:
                out = measure(kind, seconds=seconds, warmup=warmup, connections=connections,
                              pinned=pinned, logdir=logdir)
                per_kind[kind].append(out)
                print(f"round {r + 1}/{rounds} {kind:10s} {out['rps']:9.0f} req/s  "
                      f"p50 {out['p50_ms']:6.2f} ms  p99 {out['p99_ms']:6.2f} ms  "
                      f"cpu {out['cpu_us_per_req']:6.1f} us/req  "
                      f"busy {out['server_busy_pct']:3.0f}%", flush=True)
        load_after = loadavg()
        log_written = {name: os.path.getsize(os.path.join(logdir, name))
                       for name in sorted(os.listdir(logdir))}
        breakdown = in_process_breakdown(pinned)
        access_cpu = (access_log_in_process(pinned, logdir)
                      if any(k in ACCESS_LOG_KINDS for k in kinds) else {})
    finally:
        shutil.rmtree(logdir, ignore_errors=True)

    med: dict[str, dict[str, float]] = {}
    rows = []
    for kind in kinds:
        runs = per_kind[kind]
        rps = [o["rps"] for o in runs]
        p50 = [o["p50_ms"] for o in runs]
        p99 = [o["p99_ms"] for o in runs]
        cpu = [o["cpu_us_per_req"] for o in runs]
        busy = [o["server_busy_pct"] for o in runs]
        med[kind] = {"rps": statistics.median(rps), "p50": statistics.median(p50),
                     "p99": statistics.median(p99), "cpu": statistics.median(cpu)}
        rows.append([LABELS[kind], round(med[kind]["rps"]), round(med[kind]["p50"], 2),
                     round(med[kind]["p99"], 2), round(med[kind]["cpu"], 1),
                     f"{min(rps):,.0f}–{max(rps):,.0f}", f"{_spread(rps):.1f}%",
                     f"{_spread(p99):.1f}%", f"{_spread(cpu):.1f}%", f"{min(busy):.0f}%"])

    pc, kl = med["pipecomet"], med["klein"]
    ratios = {}
    targets = []
    if "aiohttp" in med:
        ai = med["aiohttp"]
        for kind, want in (("pipecomet-1", 1.0), ("pipecomet-5", 0.9)):
            if kind not in med:
                continue
            r = med[kind]["rps"] / ai["rps"]
            p = med[kind]["p99"] / ai["p99"]
            ratios[f"{kind}/aiohttp req/s"] = r
            ratios[f"{kind}/aiohttp p99"] = p
            targets.append({"what": f"{LABELS[kind]}: req/s vs aiohttp", "target": f"≥ {want}×",
                            "value": round(r, 3), "met": r >= want})
            targets.append({"what": f"{LABELS[kind]}: p99 vs aiohttp p99", "target": "≤ 1.2×",
                            "value": round(p, 3), "met": p <= 1.2})
        if "pipecomet-5-twisted" in med:
            ratios["pipecomet-5-twisted/aiohttp req/s"] = (
                med["pipecomet-5-twisted"]["rps"] / ai["rps"])
        if "pipecomet-5" in med and "pipecomet-5-twisted" in med:
            ratios["own protocol/twisted.web channel req/s (5 pipes)"] = (
                med["pipecomet-5"]["rps"] / med["pipecomet-5-twisted"]["rps"])
    ratios.update({
        "pipecomet/klein req/s": pc["rps"] / kl["rps"],
        "pipecomet/klein p99": pc["p99"] / kl["p99"],
        "pipecomet/klein server CPU per request": pc["cpu"] / kl["cpu"],
    })
    if "twisted" in med:
        ratios["pipecomet/twisted.web req/s"] = pc["rps"] / med["twisted"]["rps"]
        ratios["pipecomet/twisted.web p99"] = pc["p99"] / med["twisted"]["p99"]
    if "tornado" in med:
        ratios["pipecomet/tornado req/s"] = pc["rps"] / med["tornado"]["rps"]
    paired = [p["rps"] / k["rps"] for p, k in zip(per_kind["pipecomet"], per_kind["klein"])]
    paired_p99 = [p["p99_ms"] / k["p99_ms"] for p, k in zip(per_kind["pipecomet"], per_kind["klein"])]

    targets += [
        {"what": "pipecomet req/s vs bare Klein", "target": "≥ 1.0×",
         "value": round(ratios["pipecomet/klein req/s"], 3),
         "met": ratios["pipecomet/klein req/s"] >= 1.0},
        {"what": "pipecomet p99 vs bare Klein p99", "target": "≤ 1.2×",
         "value": round(ratios["pipecomet/klein p99"], 3),
         "met": ratios["pipecomet/klein p99"] <= 1.2},
    ]
    access_notes: list[str] = []
    access_tables: list[dict[str, Any]] = []
    if "hello" in med:
        base_runs = per_kind["hello"]
        access_rows = [[LABELS["hello"], round(med["hello"]["rps"]),
                        round(med["hello"]["p99"], 2), round(med["hello"]["cpu"], 1), "—", "—",
                        round(access_cpu["metrics"], 1) if access_cpu else "—", "—"]]
        for kind in ("hello-log", "hello-log-json"):
            if kind not in med:
                continue
            losses = [100 * (1 - a["rps"] / b["rps"])
                      for a, b in zip(per_kind[kind], base_runs)]
            loss = statistics.median(losses)
            cpu_more = 100 * (med[kind]["cpu"] / med["hello"]["cpu"] - 1)
            variant = ACCESS_LOG_KINDS[kind]
            in_proc = (100 * (access_cpu[variant] / access_cpu["metrics"] - 1)
                       if access_cpu else None)
            ratios[f"{kind}/hello req/s"] = med[kind]["rps"] / med["hello"]["rps"]
            access_rows.append([
                LABELS[kind], round(med[kind]["rps"]), round(med[kind]["p99"], 2),
                round(med[kind]["cpu"], 1), f"{loss:+.1f}%", f"{cpu_more:+.1f}%",
                round(access_cpu[variant], 1) if access_cpu else "—",
                f"{in_proc:+.1f}%" if in_proc is not None else "—"])
            targets.append({"what": f"access log ({variant}) cost in hello req/s, median of "
                            "paired rounds", "target": "≤ 10 %", "value": f"{loss:.1f} %",
                            "met": loss <= 10.0})
            access_notes.append(f"{kind}: per-round req/s lost against hello "
                                f"{', '.join(f'{x:+.1f}' for x in losses)} %.")
        access_tables.append({
            "title": "The access log's cost: pipecomet hello (1 pipe, metrics on), with and "
                     "without it",
            "columns": ["server", "req/s (median)", "p99 ms", "server CPU µs/req",
                        "req/s lost (paired median)", "CPU/req more", "in-process µs/req",
                        "in-process CPU more"],
            "rows": access_rows,
        })
        access_notes.append(
            "access log: text or JSON lines to a file in a temporary directory, written by "
            "the log's own thread once a second (the app's services started, as twistd "
            "does); written per kind: "
            + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in log_written.items()) + ". "
            "The in-process figures are bench.accesslog's (raw requests into the real Site, "
            "minimum of 15 batches of 2,000), the steadier measure of what a line costs.")
    elapsed = time.monotonic() - started
    notes = [
        f"{rounds} interleaved rounds per server, each a {warmup} s warm-up then a {seconds} s "
        f"measured wrk run (1 thread, {connections} keep-alive connections); table = median "
        "over rounds, spread = (max − min) / median. Server CPU µs/req = the server process's "
        "user+system CPU time during the measured run / requests served: it changes little "
        "when other processes share the core, so it is the steadier figure of the chain's cost; "
        "'min server busy' below ~95 % means the server lost its core to other work in a round.",
        ("server pinned to core 0, wrk to core 1 (taskset)" if pinned
         else "NOT pinned: fewer than 2 cores or no taskset"),
        "same body everywhere: 13 bytes `{\"msg\":\"hi!\"}` as application/json; pipecomet's chain "
        "reads the query, checks the app key, takes a token, validates, routes and JSON-encodes "
        "the handler's dict per request, the bare servers return constant bytes. "
        "Klein answers chunked (its default), the others with Content-Length.",
        f"per-round pipecomet/Klein req/s ratios: {', '.join(f'{x:.3f}' for x in paired)}; "
        f"p99 ratios: {', '.join(f'{x:.3f}' for x in paired_p99)}.",
        f"load average before {load_before}, after {load_after}. On a shared machine rounds "
        "of one server can disagree by 20-40 % (see the spread columns); compare the per-round "
        "ratios, which interleaving keeps fair, rather than single figures.",
        "in-process table: raw requests fed to each kind's real Site and HTTPChannel over an "
        "in-memory transport (parsing, headers, access log included; kernel socket work and "
        "reactor polling not), minimum over 15 interleaved batches of 2,000 requests.",
        *access_notes,
        *([os.environ["BENCH_NOTE"]] if os.environ.get("BENCH_NOTE") else []),
        f"run took {elapsed:.0f} s.",
    ]
    write_result(
        "http",
        title=("HTTP: pipecomet (own protocol and twisted.web's channel) vs aiohttp, "
               "twisted.web, Klein (wrk)"),
        command="flock /tmp/pipecomet-bench.lock make bench-http",
        tables=[{
            "title": "GET /hello, 13-byte body, 50 connections",
            "columns": ["server", "req/s (median)", "p50 ms", "p99 ms", "server CPU µs/req",
                        "req/s range", "req/s spread", "p99 spread", "CPU/req spread",
                        "min server busy"],
            "rows": rows,
        }, {
            "title": "Where the time goes: server CPU per request without sockets (in-process)",
            "columns": ["server", "µs/req", "µs more than bare twisted.web"],
            "rows": [[label, round(breakdown[k], 1), round(breakdown[k] - breakdown["twisted"], 1)]
                     for k, label in IN_PROCESS_KINDS.items()],
        }, *access_tables],
        ratios=ratios,
        targets=targets,
        peers=[LABELS[k] for k in kinds if k != "pipecomet"],
        notes=notes,
        extra_versions=("tornado", "werkzeug", "aiohttp", "httptools"),
        raw={"wrk": tool_version(["wrk", "--version"]), "settings": {
            "rounds": rounds, "duration_s": seconds, "warmup_s": warmup,
            "connections": connections, "pinned": pinned}, "runs": per_kind,
             "in_process_us_per_req": breakdown, "access_log_in_process_us_per_req": access_cpu},
    )


if __name__ == "__main__":
    main()
