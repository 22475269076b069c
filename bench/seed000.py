"""
``make bench-seed000``: the seed report 000 (fixed Python worker processes
fed through memory-mapped files) reproduced over HTTP.

A CPU-bound task of about 10 ms (``cpu_burn``), 100 concurrent clients for
60 s (``SEED_SECONDS`` to change), against two servers built the same way
except for where the task runs: the worker pool (2 workers on this 2-core
machine) or one new Python process per request (what the seed did before).
Prints the seed's table rows beside ours and each server's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

from ._common import free_port, tool_version, write_result

SECONDS = int(os.environ.get("SEED_SECONDS", "60"))
CLIENTS = 100
TASK_MS = 10

LUA = r"""
wrk.method = "POST"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; bad = 0 end
function response(status, headers, body)
  if status == 200 then ok = ok + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local o, b = 0, 0
  for _, t in ipairs(threads) do o = o + t:get("ok"); b = b + t:get("bad") end
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests":%d,"ok":%d,"failed":%d,"socket_errors":%d,"p50_us":%d,"p95_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"duration_us":%d}\n',
    summary.requests, o, b, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max,
    summary.duration))
end
"""

# The seed's figures (ybc_table, gatling): before, 10 threads 20 s, one
# process per request; after, 100 threads 60 s, 10 worker processes.
SEED_ROWS = [
    ["seed before: process per request (10 clients, 20 s)", 14140, 424, 13716, 250, 332, 385, 20.19],
    ["seed after: 10 workers over mmap (100 clients, 60 s)", 53235, 53232, 3, 13, 481, 771, 858.6],
]

BURN = ("import time\n"
        "end = time.process_time() + {ms} / 1000.0\n"
        "x = 0\n"
        "while time.process_time() < end:\n"
        "    for i in range(200):\n"
        "        x = (x * 31 + i) % 1000003\n"
        "print(x)\n")


def serve(kind: str, port: int) -> None:
    """
    The server under test (run in a subprocess by :func:`main`).
    """
    from twisted.internet import defer, protocol, reactor

    from pipecomet import App, Config, Pipe, process_pipe

    app = App(reactor=reactor, name=f"seed000-{kind}", builtin_routes=False)

    def ms(inp: Any, ctx: Any, res: Any) -> float:
        return float(inp.query.get("ms", TASK_MS))

    if kind == "pool":
        app.route("/api/cpu.burn", [Pipe(ms, name="ms"), process_pipe("cpu_burn")],
                  methods=("POST",))
        app.configure(Config.from_dict({"workers": {
            "module": "pipecomet.demo.worker_functions", "size": 2, "queue": 4096,
            "max_in_flight": 4}}))
    else:
        class Collect(protocol.ProcessProtocol):
            def __init__(self) -> None:
                self.out = b""
                self.done: defer.Deferred = defer.Deferred()

            def outReceived(self, data: bytes) -> None:
                self.out += data

            def processEnded(self, reason: Any) -> None:
                code = getattr(reason.value, "exitCode", 1)
                if code == 0:
                    self.done.callback({"result": self.out.decode().strip()})
                else:
                    self.done.errback(reason)

        def spawn(inp: Any, ctx: Any, res: Any) -> Any:
            p = Collect()
            reactor.spawnProcess(p, sys.executable,
                                 [sys.executable, "-c", BURN.format(ms=res["ms"])], env=None)
            return p.done

        app.route("/api/cpu.burn", [Pipe(ms, name="ms"), Pipe(spawn, name="spawn")],
                  methods=("POST",))
        app.configure(Config())
    app.service.startService()
    reactor.listenTCP(port, app.site(), interface="127.0.0.1", backlog=1024)
    if app.runtime.workers is not None:
        app.runtime.workers.ready().addCallback(lambda _: print("READY", flush=True))
    else:
        print("READY", flush=True)
    reactor.addSystemEventTrigger("before", "shutdown", app.service.stopService)
    reactor.run()


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(kind: str, lua: str) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.seed000", "--serve", kind,
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith(b"READY"):
            raise RuntimeError(f"{kind} server did not start: {line!r}")
        out = subprocess.run(["wrk", "-t2", f"-c{CLIENTS}", f"-d{SECONDS}s", "--timeout", "60s",
                              "-s", lua, f"http://127.0.0.1:{port}/api/cpu.burn?ms={TASK_MS}"],
                             capture_output=True, text=True, timeout=SECONDS + 120)
        figures = None
        for row in out.stdout.splitlines():
            if row.startswith("JSON "):
                figures = json.loads(row[5:])
        if figures is None:
            raise RuntimeError(f"wrk gave no figures: {out.stdout} {out.stderr}")
        figures["peak_rss_mib"] = peak_rss_mib(proc.pid)
        figures["req_per_s"] = figures["requests"] / (figures["duration_us"] / 1e6)
        figures["ok_per_s"] = figures["ok"] / (figures["duration_us"] / 1e6)
        return figures
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def main() -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA)
        lua = f.name
    try:
        results = {}
        for kind in ("pool", "spawn"):
            results[kind] = run(kind, lua)
            print(kind, results[kind], flush=True)
    finally:
        os.unlink(lua)
    rows = list(SEED_ROWS)
    names = {"pool": f"pipecomet: 2 workers over mmap ({CLIENTS} clients, {SECONDS} s)",
             "spawn": f"pipecomet: process per request ({CLIENTS} clients, {SECONDS} s)"}
    for kind in ("spawn", "pool"):
        r = results[kind]
        rows.append([names[kind], r["requests"], r["ok"], r["failed"] + r["socket_errors"],
                     round(r["p50_us"] / 1000, 1), round(r["p95_us"] / 1000, 1),
                     round(r["p99_us"] / 1000, 1), round(r["ok_per_s"], 1)])
    rss_rows = [[names[k], round(results[k]["peak_rss_mib"], 1)] for k in ("spawn", "pool")]
    pool, spawn = results["pool"], results["spawn"]
    write_result(
        "seed000",
        title=f"Seed 000 reproduction: a {TASK_MS} ms CPU task over HTTP, worker pool vs a process per request",
        command="make bench-seed000",
        tables=[
            {"title": "Requests (seed rows from its report; ours from wrk on 127.0.0.1)",
             "columns": ["run", "requests", "ok", "failed", "p50 (ms)", "p95 (ms)", "p99 (ms)",
                         "ok req/s"],
             "rows": rows},
            {"title": "Server peak RSS (VmHWM)", "columns": ["server", "peak RSS (MiB)"],
             "rows": rss_rows},
        ],
        ratios={"ok req/s: pool / process per request":
                pool["ok_per_s"] / spawn["ok_per_s"] if spawn["ok_per_s"] else float("inf")},
        peers=["one new Python process per request (reactor.spawnProcess)"],
        notes=[
            f"{CLIENTS} wrk connections for {SECONDS} s, each request burning {TASK_MS} ms of CPU "
            "in Python; the machine has 2 cores, so about 200 req/s is the ceiling for any "
            "design; the seed ran 10 workers on a larger host.",
            "The load generator shares the 2 cores with the server and its workers.",
        ],
        extra_versions=[],
        raw={"results": results, "wrk": tool_version(["wrk", "--version"])},
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", choices=("pool", "spawn"))
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
    else:
        main()
