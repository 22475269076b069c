"""
``make bench-gateway``: what forwarding a call to a backend costs.

In one run, on 127.0.0.1: a minimal backend (``bench.gateway_servers
--kind backend``: ``GET /slow`` answers after 1 s, ``GET /fast`` at once)
pinned to core 1 with wrk; each gateway alone on core 0 (taskset):
pipecomet's backend client, treq in a pipecomet pipe, a bare treq gateway,
Tornado's AsyncHTTPClient, aiohttp's server + ClientSession; and wrk straight
at the backend ("direct").

Per gateway and round, three scenarios:

1. the seed 002 scenario: ``/slow`` (1 s backend) at 200, 400 and 2,000
   connections — req/s, p50/p99, errors, gateway CPU µs per forwarded call;
2. no-load latency: one connection, ``/fast`` — p50 added over direct;
3. forwarded calls per second per gateway core: ``/fast`` at 64
   connections, req/s divided by the gateway's CPU share.

Rounds are interleaved (every kind once per round, order rotated); tables
show medians and the spread over rounds.

Targets (issue 9): at 2,000 connections pipecomet ≥ 0.9× direct with zero
errors; gateway CPU per forwarded call below aiohttp's (≤ 250 µs moonshot);
no-load added latency ≤ 0.2 ms median.

Settings: ``BENCH_GW_ROUNDS`` (2), ``BENCH_GW_DURATION`` (6 s),
``BENCH_GW_WARMUP`` (2 s), ``BENCH_GW_KINDS``
(``direct,pipecomet,treq-pipe,treq,tornado,aiohttp``),
``BENCH_GW_CONNECTIONS`` (``200,400,2000``), ``BENCH_GW_INMEM_ROUNDS`` (3;
0 skips the in-memory table), ``BENCH_GW_INMEM_CALLS`` (20000).

Before the socket rounds, ``bench.gateway_inmemory`` measures pipecomet's
CPU per forwarded call without sockets at 64 and 2,000 calls in flight,
with and without the ``[gc] threshold`` the gateway runs with, and the
cyclic collector's share of it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from ._common import cpu_seconds, free_port, loadavg, stop_process, tool_version, wait_ready, write_result
from .gateway_servers import GC_THRESHOLD
from .http import parse_wrk

KINDS = ("direct", "pipecomet", "treq-pipe", "treq", "tornado", "aiohttp")
LABELS = {
    "direct": "wrk direct at the backend",
    "pipecomet": "pipecomet backend client",
    "treq-pipe": "treq in a pipecomet pipe",
    "treq": "bare treq gateway (twisted.web)",
    "tornado": "Tornado AsyncHTTPClient gateway",
    "aiohttp": "aiohttp server + ClientSession",
}
GATEWAY_CORE = "0"
CLIENT_CORE = "1"
HARD_LIMIT = 20 * 60
FAST_CONNECTIONS = 64


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


def _pin(core: str, cmd: list[str], pinned: bool) -> list[str]:
    return ["taskset", "-c", core, *cmd] if pinned else cmd


def _start(kind: str, core: str, pinned: bool, backend: int = 0) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.gateway_servers", "--kind", kind, "--port", str(port),
           "--backend", str(backend)]
    proc = subprocess.Popen(_pin(core, cmd, pinned), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        wait_ready(proc, kind, 60)
    except BaseException:
        stop_process(proc)
        raise
    return proc, port


def _wrk(port: int, path: str, seconds: int, connections: int, pinned: bool) -> dict[str, Any]:
    threads = 2 if connections >= 400 else 1
    cmd = _pin(CLIENT_CORE, ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
                             "--latency", "--timeout", "5s",
                             f"http://127.0.0.1:{port}{path}"], pinned)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr or p.stdout}")
    out = parse_wrk(p.stdout)
    out["errors"] = out["non_2xx"] + out["socket_errors"]
    return out


def _measure(port: int, pid: int | None, path: str, seconds: int, warmup: int,
             connections: int, pinned: bool) -> dict[str, Any]:
    try:
        return _measure_once(port, pid, path, seconds, warmup, connections, pinned)
    except Exception as e:  # a gateway that falls over is a result, not the end of the run
        print(f"  run failed: {e}", flush=True)
        return {"rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "requests": 0, "errors": 1,
                "cpu_us_per_call": 0.0, "busy_pct": 0.0, "calls_per_core_s": 0.0,
                "failed": str(e)[:500]}


def _measure_once(port: int, pid: int | None, path: str, seconds: int, warmup: int,
                  connections: int, pinned: bool) -> dict[str, Any]:
    if warmup:
        _wrk(port, path, warmup, connections, pinned)
    cpu0 = cpu_seconds(pid) if pid else 0.0
    wall0 = time.monotonic()
    out = _wrk(port, path, seconds, connections, pinned)
    wall = time.monotonic() - wall0
    if pid:
        cpu = cpu_seconds(pid) - cpu0
        out["cpu_us_per_call"] = 1e6 * cpu / out["requests"] if out["requests"] else 0.0
        out["busy_pct"] = 100.0 * cpu / wall if wall else 0.0
        out["calls_per_core_s"] = out["rps"] * 100.0 / out["busy_pct"] if out["busy_pct"] else 0.0
    return out


def in_memory(pinned: bool, rounds: int, calls: int) -> list[dict[str, Any]]:
    """
    ``bench.gateway_inmemory`` (CPU per forwarded call without sockets and
    the collector's share) at 64 and 2,000 calls in flight, with Python's
    default collector threshold and pipecomet's ``[gc] threshold``,
    interleaved over ``rounds``, each in its own process on the gateway's
    core.
    """
    out = []
    for r in range(rounds):
        for in_flight in (64, 2000):
            for threshold in (0, GC_THRESHOLD or 20000):
                cmd = _pin(GATEWAY_CORE, [sys.executable, "-m", "bench.gateway_inmemory",
                                          str(in_flight), str(calls), str(threshold)], pinned)
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                   cwd=os.path.dirname(os.path.dirname(__file__)))
                if p.returncode != 0:
                    raise RuntimeError(f"in-memory run failed: {p.stderr[-2000:]}")
                row = json.loads(p.stdout.strip().splitlines()[-1])
                print(f"in memory, round {r + 1}/{rounds}: {row}", flush=True)
                out.append(row)
    return out


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _spread(values: list[float]) -> str:
    med = _med(values)
    return f"{100.0 * (max(values) - min(values)) / med:.0f}%" if med and len(values) > 1 else "-"


def main() -> None:
    started = time.monotonic()
    rounds = _env_int("BENCH_GW_ROUNDS", 2)
    seconds = _env_int("BENCH_GW_DURATION", 6)
    warmup = _env_int("BENCH_GW_WARMUP", 2)
    levels = [int(x) for x in os.environ.get("BENCH_GW_CONNECTIONS", "200,400,2000").split(",")]
    kinds = [k for k in os.environ.get("BENCH_GW_KINDS", ",".join(KINDS)).split(",") if k]
    for k in kinds:
        if k not in KINDS:
            raise SystemExit(f"unknown kind {k!r}; known: {KINDS}")
    for k in ("direct", "pipecomet"):
        if k not in kinds:
            raise SystemExit(f"BENCH_GW_KINDS must include {k!r}")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (make bench-gateway installs it)")
    pinned = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    per_kind = len(levels) * (seconds + warmup + 2) + (seconds + 2) + (seconds + warmup + 2) + 5
    budget = rounds * len(kinds) * per_kind
    if budget > HARD_LIMIT:
        raise SystemExit(f"settings would take about {budget}s; the limit is {HARD_LIMIT}s")

    load_before = loadavg()
    inmem_rounds = _env_int("BENCH_GW_INMEM_ROUNDS", 3)
    inmem_calls = _env_int("BENCH_GW_INMEM_CALLS", 20000)
    inmem = in_memory(pinned, inmem_rounds, inmem_calls) if inmem_rounds else []
    backend, backend_port = _start("backend", CLIENT_CORE, pinned)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {k: {} for k in kinds}
    try:
        for r in range(rounds):
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for kind in order:
                proc = None
                if kind == "direct":
                    port, pid = backend_port, None
                else:
                    proc, port = _start(kind, GATEWAY_CORE, pinned, backend_port)
                    pid = proc.pid
                try:
                    for c in levels:
                        out = _measure(port, pid, "/slow", seconds, warmup, c, pinned)
                        runs[kind].setdefault(f"slow-{c}", []).append(out)
                        print(f"round {r + 1}/{rounds} {kind:10s} 1 s backend c={c:5d} "
                              f"{out['rps']:8.0f} req/s p50 {out['p50_ms']:7.1f} p99 "
                              f"{out['p99_ms']:7.1f} ms errors {out['errors']:5d} cpu "
                              f"{out.get('cpu_us_per_call', 0):6.0f} us/call", flush=True)
                    out = _measure(port, pid, "/fast", seconds, 0, 1, pinned)
                    runs[kind].setdefault("noload", []).append(out)
                    print(f"round {r + 1}/{rounds} {kind:10s} no load p50 {out['p50_ms'] * 1000:6.0f} us",
                          flush=True)
                    out = _measure(port, pid, "/fast", seconds, warmup, FAST_CONNECTIONS, pinned)
                    runs[kind].setdefault("fast", []).append(out)
                    print(f"round {r + 1}/{rounds} {kind:10s} immediate {out['rps']:8.0f} req/s "
                          f"cpu {out.get('cpu_us_per_call', 0):6.0f} us/call busy "
                          f"{out.get('busy_pct', 0):3.0f}%", flush=True)
                finally:
                    if proc is not None:
                        stop_process(proc)
    finally:
        stop_process(backend)
    load_after = loadavg()

    def med(kind: str, key: str, field: str) -> float:
        return _med([o.get(field, 0.0) for o in runs[kind].get(key, [])])

    tables = []
    for c in levels:
        key = f"slow-{c}"
        rows = []
        direct_rps = med("direct", key, "rps")
        for kind in kinds:
            outs = runs[kind][key]
            rps = [o["rps"] for o in outs]
            rows.append([LABELS[kind], round(_med(rps)),
                         round(_med(rps) / direct_rps, 2) if direct_rps else "-",
                         round(med(kind, key, "p50_ms")), round(med(kind, key, "p99_ms")),
                         sum(o["errors"] for o in outs),
                         round(med(kind, key, "cpu_us_per_call")) if kind != "direct" else "-",
                         _spread(rps)])
        tables.append({
            "title": f"1 s backend, {c} connections (seed 002 scenario)",
            "columns": ["gateway", "req/s", "× direct", "p50 ms", "p99 ms", "errors (all rounds)",
                        "gateway CPU µs/call", "req/s spread"],
            "rows": rows,
        })
    direct_p50 = med("direct", "noload", "p50_ms")
    rows = []
    for kind in kinds:
        p50 = med(kind, "noload", "p50_ms")
        rows.append([LABELS[kind], round(p50 * 1000), round((p50 - direct_p50) * 1000) if kind != "direct" else 0,
                     round(med(kind, "noload", "p99_ms") * 1000)])
    tables.append({"title": "No-load latency: one connection, immediate backend",
                   "columns": ["gateway", "p50 µs", "added over direct µs", "p99 µs"], "rows": rows})
    rows = []
    for kind in kinds:
        if kind == "direct":
            continue
        rows.append([LABELS[kind], round(med(kind, "fast", "rps")),
                     round(med(kind, "fast", "busy_pct")),
                     round(med(kind, "fast", "calls_per_core_s")),
                     round(med(kind, "fast", "cpu_us_per_call")),
                     sum(o["errors"] for o in runs[kind]["fast"]),
                     _spread([o["rps"] for o in runs[kind]["fast"]])])
    tables.append({"title": f"Immediate backend, {FAST_CONNECTIONS} connections: forwarded calls per gateway core",
                   "columns": ["gateway", "req/s", "gateway CPU %", "calls/s per core",
                               "gateway CPU µs/call", "errors", "req/s spread"],
                   "rows": rows})

    if inmem:
        rows = []
        for in_flight in (64, 2000):
            for threshold in sorted({o["gc_threshold"] for o in inmem}):
                sel = [o for o in inmem if o["in_flight"] == in_flight and o["gc_threshold"] == threshold]
                cpu = [o["cpu_us_per_call"] for o in sel]
                gcs = [o["gc_us_per_call"] for o in sel]
                rows.append([in_flight, threshold or "Python default (700)", round(_med(cpu)),
                             round(_med(gcs)), f"{100 * _med(gcs) / _med(cpu):.0f}%",
                             f"{min(cpu):.0f}–{max(cpu):.0f}"])
        tables.append({
            "title": "pipecomet gateway CPU per forwarded call without sockets (in memory), "
                     "and the cyclic collector's share",
            "columns": ["calls in flight", "[gc] threshold", "CPU µs/call (median)",
                        "of which collector µs", "collector share", "CPU µs/call range"],
            "rows": rows,
        })

    top = f"slow-{max(levels)}"
    pc_rps, direct_rps = med("pipecomet", top, "rps"), med("direct", top, "rps")
    pc_errors = sum(o["errors"] for o in runs["pipecomet"][top])
    pc_cpu = med("pipecomet", top, "cpu_us_per_call")
    ratios = {f"pipecomet/direct req/s at {max(levels)} connections": pc_rps / direct_rps if direct_rps else 0.0}
    targets = [
        {"what": f"pipecomet req/s vs direct at {max(levels)} connections, zero errors",
         "target": "≥ 0.9×, 0 errors", "value": f"{pc_rps / direct_rps:.3f}×, {pc_errors} errors",
         "met": pc_rps >= 0.9 * direct_rps and pc_errors == 0},
    ]
    if "aiohttp" in kinds:
        ai_cpu = med("aiohttp", top, "cpu_us_per_call")
        ratios[f"pipecomet/aiohttp gateway CPU per call at {max(levels)} connections"] = pc_cpu / ai_cpu if ai_cpu else 0.0
        targets.append({"what": f"gateway CPU per forwarded call at {max(levels)} connections vs aiohttp",
                        "target": "< aiohttp's", "value": f"{pc_cpu:.0f} µs vs {ai_cpu:.0f} µs",
                        "met": pc_cpu < ai_cpu})
    targets.append({"what": f"gateway CPU per forwarded call at {max(levels)} connections (moonshot)",
                    "target": "≤ 250 µs", "value": f"{pc_cpu:.0f} µs", "met": pc_cpu <= 250})
    added = (med("pipecomet", "noload", "p50_ms") - direct_p50) * 1000
    targets.append({"what": "no-load added latency, median", "target": "≤ 200 µs",
                    "value": f"{added:.0f} µs", "met": added <= 200})
    for kind in kinds:
        if kind not in ("direct", "pipecomet"):
            ratios[f"pipecomet/{kind} forwarded calls per core (immediate backend)"] = (
                med("pipecomet", "fast", "calls_per_core_s") / med(kind, "fast", "calls_per_core_s")
                if med(kind, "fast", "calls_per_core_s") else 0.0)
    elapsed = time.monotonic() - started
    notes = [
        f"{rounds} interleaved rounds; per gateway and round: for each connection count a "
        f"{warmup} s wrk warm-up then a {seconds} s measured run on /slow, a {seconds} s run with "
        f"one connection on /fast, and a {warmup} s + {seconds} s run at {FAST_CONNECTIONS} "
        "connections on /fast. Tables show medians over rounds; spread = (max − min) / median.",
        ("gateway pinned to core 0; backend and wrk to core 1 (taskset)" if pinned
         else "NOT pinned: fewer than 2 cores or no taskset"),
        "gateway CPU µs/call = the gateway process's user+system CPU during the measured run / "
        "calls answered; calls/s per core = req/s ÷ the gateway's CPU share in that run.",
        "no gateway writes an access log; every gateway keeps connections to the backend alive "
        "except Tornado's simple AsyncHTTPClient, which opens one per call (its design).",
        f"pipecomet's gateway runs with [gc] threshold = {GC_THRESHOLD or 'Python default'} "
        "(BENCH_GW_PC_GC; the others with Python's default 700): at 2,000 calls in flight the "
        "cyclic collector took about a third of a forwarded call's CPU at the default "
        "(docs/backends.md, 'Where the CPU goes').",
        f"load average before {load_before}, after {load_after}; the machine is shared by "
        "several engineers running tests and benchmarks, so compare kinds within this run "
        "rather than with other runs.",
        f"in-memory table: python -m bench.gateway_inmemory IN_FLIGHT {inmem_calls} THRESHOLD, "
        f"{inmem_rounds} interleaved rounds, each in its own process pinned to the gateway's core: "
        "the real server protocol, chain and backend client on memory transports, a fake backend "
        "holding IN_FLIGHT calls open; no kernel or reactor work.",
        "wrk's timeout is 5 s: a measured run of 5 s or less cannot count timeouts, so a "
        "gateway that answered nothing in it shows 0 req/s and 0 errors.",
        f"run took {elapsed:.0f} s.",
    ]
    write_result(
        "gateway",
        title="Gateway: forwarding calls to a backend (pipecomet backend client vs treq, Tornado, aiohttp)",
        command="flock /tmp/pipecomet-bench.lock make bench-gateway",
        tables=tables,
        ratios=ratios,
        targets=targets,
        peers=[LABELS[k] for k in kinds if k != "pipecomet"],
        notes=notes,
        extra_versions=("tornado", "aiohttp", "httptools"),
        raw={"wrk": tool_version(["wrk", "--version"]),
             "settings": {"rounds": rounds, "duration_s": seconds, "warmup_s": warmup,
                          "connections": levels, "pinned": pinned},
             "runs": runs, "in_memory": inmem},
    )


if __name__ == "__main__":
    main()
