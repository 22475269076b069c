"""
``make bench-lazy``: lazy body parsing against buffered parsing, same chain.

The server (``python -m bench.lazy --serve PORT --lazy 1|0``) serves
``POST /bench/upload``: pipe 1 checks the ``app_key`` field (400 unless
``demo-key``), pipe 2 waits for the whole form.  ``--lazy 0`` is the same
app with ``[limits] lazy = false``: twisted.web reads the whole body, then
the chain runs.  The server is pinned to core 0, the clients to core 1.

1. Invalid-request flood: an asyncio client keeps ``BENCH_LAZY_CONNS``
   (16) requests in flight, each on a new connection, half of them 1 MiB
   form POSTs whose first field is an invalid key, half valid.  It sends a
   body until the answer arrives.  Per kind: answers/s, server CPU per
   request, bytes the server read (``/_pipecomet/status``).
2. Valid small form posts: wrk, 50 keep-alive connections, a 40-byte form.

Targets (issue 6): invalid half — ≥ 5× less data read and ≥ 2× the
throughput lazy vs buffered; small valid posts — lazy costs ≤ 10 %
throughput.  Settings: ``BENCH_LAZY_ROUNDS`` (2), ``BENCH_LAZY_SECONDS``
(8), ``BENCH_LAZY_WARMUP`` (2), ``BENCH_LAZY_CONNS`` (16).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from ._common import ROOT, cpu_seconds, free_port, stop_process, tool_version, write_result

MiB = 2**20
BODY_SIZE = MiB
SERVER_CORE, CLIENT_CORE = 0, 1
SMALL_BODY = b"app_key=demo-key&name=widget&qty=3&note=ok"


# ---------------------------------------------------------------------------
# the server


def serve(port: int, lazy: bool) -> None:
    import resource as rlimit

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from pipecomet import App, BadRequest, Pipe
    from pipecomet._config import Config

    soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (hard, hard))
    app = App(reactor=reactor, name="bench-lazy")

    def check_key(inp: Any, ctx: Any, res: Any) -> Deferred:
        def check(key: str) -> str:
            if key != "demo-key":
                raise BadRequest("invalid app_key", code="invalid_parameter")
            return key
        return inp.param("app_key").addCallback(check)

    def take_form(inp: Any, ctx: Any, res: Any) -> Deferred:
        return inp.form().addCallback(lambda form: {"fields": len(form)})

    app.route("/bench/upload", [Pipe(check_key), Pipe(take_form)], methods=("POST",))
    app.configure(Config.from_dict({"limits": {
        "lazy": lazy, "max_body_bytes": 4 * MiB, "max_field_bytes": 2 * MiB,
    }}))
    reactor.listenTCP(port, app.site(), interface="127.0.0.1", backlog=1024)
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


class Server:
    def __init__(self, lazy: bool, pinned: bool) -> None:
        self.lazy = lazy
        self.port = free_port()
        cmd = [sys.executable, "-m", "bench.lazy", "--serve", str(self.port),
               "--lazy", "1" if lazy else "0"]
        if pinned:
            cmd = ["taskset", "-c", str(SERVER_CORE), *cmd]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        line = self.proc.stdout.readline()
        if b"ready" not in line:
            self.stop()
            raise RuntimeError(f"bench server did not start: {line!r}")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_pipecomet/status",
                                    timeout=10) as r:
            return json.loads(r.read())["lazy"]

    def stop(self) -> None:
        stop_process(self.proc)


# ---------------------------------------------------------------------------
# the flood client

_FILL = b"y" * 65536


async def _one(port: int, invalid: bool) -> tuple[int, int]:
    """
    One 1 MiB form POST on a new connection; (status, body bytes sent).
    The body is sent until the answer arrives.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    first = b"app_key=" + (b"bad%21key" if invalid else b"demo-key") + b"&data="
    writer.write(b"POST /bench/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/x-www-form-urlencoded\r\n"
                 b"Content-Length: %d\r\n\r\n" % BODY_SIZE + first)
    sent = len(first)
    answer = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
    try:
        while sent < BODY_SIZE and not answer.done():
            n = min(len(_FILL), BODY_SIZE - sent)
            writer.write(_FILL[:n])
            sent += n
            drain = asyncio.ensure_future(writer.drain())
            await asyncio.wait({drain, answer}, return_when=asyncio.FIRST_COMPLETED)
            if not drain.done():
                drain.cancel()
            elif drain.exception() is not None:
                break
        head = await asyncio.wait_for(answer, 30)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        return status, sent
    finally:
        if not answer.done():
            answer.cancel()
        writer.transport.abort()


async def _flood(port: int, seconds: float, conns: int) -> dict[str, Any]:
    counts = {"invalid": 0, "valid": 0, "errors": 0, "wrong_status": 0}
    sent = {"invalid": 0, "valid": 0}
    end = time.monotonic() + seconds
    turn = 0

    async def worker() -> None:
        nonlocal turn
        while time.monotonic() < end:
            turn += 1
            invalid = turn % 2 == 0
            kind = "invalid" if invalid else "valid"
            try:
                status, n = await _one(port, invalid)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                counts["errors"] += 1
                continue
            if status != (400 if invalid else 200):
                counts["wrong_status"] += 1
                continue
            counts[kind] += 1
            sent[kind] += n

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conns)))
    counts["wall"] = time.monotonic() - started
    counts["sent_invalid"] = sent["invalid"]
    counts["sent_valid"] = sent["valid"]
    return counts


def measure_flood(lazy: bool, *, seconds: float, warmup: float, conns: int,
                  pinned: bool) -> dict[str, Any]:
    server = Server(lazy, pinned)
    try:
        if warmup:
            asyncio.run(_flood(server.port, warmup, conns))
        time.sleep(2.5)  # refused connections linger 2 s: let them go
        s0, cpu0 = server.status(), server.cpu_seconds()
        out = asyncio.run(_flood(server.port, seconds, conns))
        cpu = server.cpu_seconds() - cpu0
        s1 = server.status()
    finally:
        server.stop()
    done = out["invalid"] + out["valid"]
    body = s1["body_bytes_read"] - s0["body_bytes_read"]
    total = s1["bytes_received"] - s0["bytes_received"]
    # Valid bodies are read whole in both modes; the rest was read for the
    # invalid ones.  (Status requests carry no body.)
    invalid_body = max(0, body - out["valid"] * BODY_SIZE)
    wall = out["wall"]
    return {
        "invalid_per_s": out["invalid"] / wall,
        "valid_per_s": out["valid"] / wall,
        "total_per_s": done / wall,
        "cpu_us_per_req": 1e6 * cpu / done if done else 0.0,
        "bytes_read_per_req": total / done if done else 0.0,
        "body_read_per_invalid": invalid_body / out["invalid"] if out["invalid"] else 0.0,
        "client_sent_per_invalid": out["sent_invalid"] / out["invalid"] if out["invalid"] else 0.0,
        "errors": out["errors"],
        "wrong_status": out["wrong_status"],
        "requests": done,
        "server_busy_pct": 100.0 * cpu / wall,
    }


# ---------------------------------------------------------------------------
# small valid posts (wrk)


def measure_small(lazy: bool, *, seconds: int, warmup: int, pinned: bool) -> dict[str, Any]:
    from .http import parse_wrk

    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write('wrk.method = "POST"\n'
                 f'wrk.body = "{SMALL_BODY.decode()}"\n'
                 'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n')
    script.close()
    server = Server(lazy, pinned)
    try:
        url = f"http://127.0.0.1:{server.port}/bench/upload"

        def wrk(secs: int) -> dict[str, Any]:
            cmd = ["wrk", "-t1", "-c50", f"-d{secs}s", "--latency", "-s", script.name, url]
            if pinned:
                cmd = ["taskset", "-c", str(CLIENT_CORE), *cmd]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30)
            if p.returncode != 0:
                raise RuntimeError(f"wrk failed: {p.stderr or p.stdout}")
            return parse_wrk(p.stdout)

        if warmup:
            wrk(warmup)
        cpu0, wall0 = server.cpu_seconds(), time.monotonic()
        out = wrk(seconds)
        cpu, wall = server.cpu_seconds() - cpu0, time.monotonic() - wall0
    finally:
        server.stop()
        os.unlink(script.name)
    if out["non_2xx"] or out["socket_errors"]:
        raise RuntimeError(f"small posts: {out['non_2xx']} non-2xx, {out['socket_errors']} socket errors")
    out["cpu_us_per_req"] = 1e6 * cpu / out["requests"] if out["requests"] else 0.0
    out["server_busy_pct"] = 100.0 * cpu / wall
    return out


# ---------------------------------------------------------------------------


def _env(name: str, default: float) -> float:
    v = os.environ.get(name)
    return float(v) if v else default


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    rounds = int(_env("BENCH_LAZY_ROUNDS", 2))
    seconds = _env("BENCH_LAZY_SECONDS", 8)
    warmup = _env("BENCH_LAZY_WARMUP", 2)
    conns = int(_env("BENCH_LAZY_CONNS", 16))
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (make bench-lazy installs it with scripts/apt-ensure)")
    pinned = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if pinned:
        os.sched_setaffinity(0, {CLIENT_CORE})

    flood: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    small: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for r in range(rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for lazy in order:
            out = measure_flood(lazy, seconds=seconds, warmup=warmup, conns=conns, pinned=pinned)
            flood[lazy].append(out)
            print(f"round {r + 1} flood {'lazy' if lazy else 'buffered':8s} "
                  f"invalid {out['invalid_per_s']:7.1f}/s valid {out['valid_per_s']:6.1f}/s "
                  f"cpu {out['cpu_us_per_req']:7.0f} us/req  read/invalid "
                  f"{out['body_read_per_invalid'] / 1024:7.1f} KiB  errors {out['errors']}",
                  flush=True)
        for lazy in order:
            out = measure_small(lazy, seconds=int(seconds), warmup=int(warmup), pinned=pinned)
            small[lazy].append(out)
            print(f"round {r + 1} small {'lazy' if lazy else 'buffered':8s} "
                  f"{out['rps']:8.0f} req/s p99 {out['p99_ms']:6.2f} ms "
                  f"cpu {out['cpu_us_per_req']:6.1f} us/req", flush=True)

    def label(lazy: bool) -> str:
        return "lazy" if lazy else "buffered (lazy = false)"

    flood_rows = []
    for lazy in (True, False):
        runs = flood[lazy]
        flood_rows.append([
            label(lazy), round(_med(runs, "invalid_per_s"), 1), round(_med(runs, "valid_per_s"), 1),
            round(_med(runs, "cpu_us_per_req")), round(_med(runs, "bytes_read_per_req") / 1024, 1),
            round(_med(runs, "body_read_per_invalid") / 1024, 1),
            round(_med(runs, "client_sent_per_invalid") / 1024, 1),
            sum(r["errors"] + r["wrong_status"] for r in runs),
        ])
    small_rows = []
    for lazy in (True, False):
        runs = small[lazy]
        small_rows.append([label(lazy), round(_med(runs, "rps")), round(_med(runs, "p50_ms"), 2),
                           round(_med(runs, "p99_ms"), 2), round(_med(runs, "cpu_us_per_req"), 1),
                           f"{min(r['rps'] for r in runs):,.0f}–{max(r['rps'] for r in runs):,.0f}"])

    lz, bf = flood[True], flood[False]
    read_ratio = (_med(bf, "body_read_per_invalid") / _med(lz, "body_read_per_invalid")
                  if _med(lz, "body_read_per_invalid") else float("inf"))
    tput_ratio = _med(lz, "invalid_per_s") / _med(bf, "invalid_per_s")
    cpu_ratio = _med(bf, "cpu_us_per_req") / _med(lz, "cpu_us_per_req")
    small_ratio = _med(small[True], "rps") / _med(small[False], "rps")
    write_result(
        "lazy",
        title="Lazy parser: invalid-request flood and small form posts, lazy vs buffered",
        command="make bench-lazy",
        peers=["the same app and chain with [limits] lazy = false (twisted.web buffers the body)"],
        tables=[
            {"title": f"Flood: 1 MiB form POSTs, 50 % with an invalid first field, {conns} in "
                      "flight, one connection each (median of rounds)",
             "columns": ["mode", "invalid answered/s", "valid answered/s", "server CPU µs/req",
                         "KiB read/req (all)", "body KiB read/invalid", "client KiB sent/invalid",
                         "errors"],
             "rows": flood_rows},
            {"title": "Small valid form posts (42 B), wrk 50 keep-alive connections",
             "columns": ["mode", "req/s", "p50 ms", "p99 ms", "server CPU µs/req", "req/s range"],
             "rows": small_rows},
        ],
        ratios={
            "invalid half: buffered body bytes read / lazy": read_ratio,
            "invalid half: lazy answers/s / buffered": tput_ratio,
            "flood: buffered CPU per request / lazy": cpu_ratio,
            "small posts: lazy req/s / buffered": small_ratio,
        },
        targets=[
            {"what": "invalid half: data read, buffered / lazy", "target": "≥ 5×",
             "value": round(read_ratio, 1), "met": read_ratio >= 5},
            {"what": "invalid half: throughput, lazy / buffered", "target": "≥ 2×",
             "value": round(tput_ratio, 2), "met": tput_ratio >= 2},
            {"what": "small valid posts: lazy throughput vs buffered", "target": "≥ 0.90×",
             "value": round(small_ratio, 3), "met": small_ratio >= 0.90},
        ],
        notes=[
            f"{rounds} rounds of {seconds:g} s (+{warmup:g} s warm-up), modes alternated per round",
            ("server pinned to core 0, clients to core 1 (taskset)" if pinned
             else "NOT pinned: fewer than 2 cores or no taskset"),
            "bytes read are the server's own counts (/_pipecomet/status lazy.*); what the client "
            "sent beyond that sat in kernel socket buffers and was dropped unread",
            "a lazy refusal half-closes the connection and drops it after [limits] linger (2 s)",
            os.environ.get("BENCH_NOTE") or "the machine may be shared: other work may have run "
            "at the same time",
        ],
        raw={"flood": {"lazy": lz, "buffered": bf},
             "small": {"lazy": small[True], "buffered": small[False]},
             "wrk": tool_version(["wrk", "--version"])},
    )


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), sys.argv[4] == "1")
    else:
        main()
