"""
``make bench-scale``: what ``--processes`` and the Redis bus buy on this
machine.

(a) Throughput with wrk of a CPU-bound route (about 1 ms of pure-Python
work per request) and of the hello route, served by ``twistd pipecomet``
with one process and with ``--processes 2`` (target: ≥ 1.8× for the
CPU-bound route; the hello route is reported, wrk needs a core too).

(b) SSE subscribers (``SCALE_SUBS``, default 10,000) held over
``--processes 2`` with the Redis bus, against one process with the memory
bus in the same run: publish → last subscriber latency (p50, target ≤ 1.2×
the one-process figure), fan-out messages/s for a burst of publishes, and
Redis round trips per publish (from the bus's own counters).

(c) Accept balance of ``--processes 2`` with one inherited socket (the
default, with its accept balancer) and with SO_REUSEPORT per process
(``[server] processes_listen``): under wrk (keep-alive connections per
process, from ``ss``, and requests answered per process, from each
process's counter) and with ``SCALE_HELD`` (default 10,000) long-lived SSE
connections opened one after another (held per process, from the status).

The throughput rounds alternate between the one-process and the
two-process server (both kept running, the idle one costs nothing), so
that the other load of a shared machine falls on both; medians and
spreads are reported.

Everything runs on 127.0.0.1, bounded in count and time; run it under
``flock /tmp/pipecomet-bench.lock`` (the make target does).
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from ._common import ROOT, free_port, loadavg, tool_version, write_result

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
APP = "tests.scale_app:make_app"
TOKEN = "bench-token"
LISTEN = ("inherit", "reuseport")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def server(directory: Path, processes: int, bus_url: str | None,
           listen: str = "inherit", pids: list[int] | None = None) -> Iterator[int]:
    port = free_port()
    cfg = directory / f"scale-{processes}-{'redis' if bus_url else 'memory'}-{listen}.toml"
    text = (f'[server]\naccess_log = "off"\nprocesses = {processes}\n'
            f'processes_listen = "{listen}"\n'
            f'[comet]\npublish_token = "{TOKEN}"\nmax_connections = 20000\n'
            'max_connections_per_topic = 20000\nheartbeat = 60\nmax_lifetime = 0\n')
    if bus_url:
        text += f'[bus]\nkind = "redis"\nurl = "{bus_url}"\n'
    cfg.write_text(text)
    cmd = [*TWISTD, "-n", "--pidfile=", "pipecomet", "--app", APP, "--config", str(cfg),
           "--port", f"tcp:{port}:interface=127.0.0.1:backlog=4096"]
    log = open(directory / f"server-{port}.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    if pids is not None:
        pids.append(proc.pid)  # the supervisor (or the one process)
    try:
        end = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {(directory / f'server-{port}.log').read_text()[-3000:]}")
            try:
                st = status(port)
                ready = st.get("processes", {}).get("set")
                if processes == 1 or (ready and sum(1 for c in ready if c["ready"]) == processes):
                    if not bus_url or st["bus"]["connected"]:
                        break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > end:
                raise TimeoutError("server not ready in 60 s")
            time.sleep(0.2)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def http(port: int, method: str, path: str, body: bytes = b"",
         headers: dict[str, str] | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
            f"Content-Length: {len(body)}", *[f"{k}: {v}" for k, v in (headers or {}).items()]]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1]


def status(port: int) -> dict[str, Any]:
    return json.loads(http(port, "GET", "/_pipecomet/status"))


def _wrk_cmd(port: int, path: str, seconds: int, connections: int) -> list[str]:
    return ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"http://127.0.0.1:{port}{path}"]


def _wrk_errors(out: str) -> dict[str, int]:
    """
    wrk's non-2xx/3xx count and its socket errors (0 when it printed none).
    """
    errors = {"non_2xx": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Non-2xx or 3xx responses:"):
            errors["non_2xx"] = int(line.split(":")[1])
        elif line.startswith("Socket errors:"):
            for part in line.split(":", 1)[1].split(","):
                name, value = part.split()
                errors[name] = int(value)
    return errors


def _wrk_rate(out: str) -> float:
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError("wrk gave no Requests/sec:\n" + out)


def wrk(port: int, path: str, seconds: int, connections: int) -> float:
    out = subprocess.run(_wrk_cmd(port, path, seconds, connections),
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    return _wrk_rate(out)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "rounds": len(values)}


def cpu_route_ms(n: int) -> float:
    """
    The CPU ms one call of the CPU-bound route's work takes with ``n``
    (process CPU time, the smallest of 15 batches of 50 calls; other load
    on the machine changes it less than wall time).
    """
    sys.path.insert(0, str(ROOT))
    from tests.scale_app import _cpu

    class Inp:
        query = {"n": str(n)}

    best = float("inf")
    for _ in range(15):
        t = time.process_time()
        for _ in range(50):
            _cpu(Inp, None, None)
        best = min(best, (time.process_time() - t) / 50 * 1000)
    return best


def _cpu_seconds(pids: list[int]) -> float:
    """
    User + system CPU seconds of ``pids`` (from /proc; 0 for a gone one).
    """
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def _server_pids(port: int) -> list[int]:
    """
    The serving processes of a ``--processes N`` server.
    """
    return [c["pid"] for c in status(port)["processes"]["set"]]


def throughput(directory: Path, seconds: int, rounds: int, url: str,
               cpu_n: int) -> dict[str, Any]:
    """
    req/s of each route with 1 and 2 processes, in alternating rounds, and
    for each run the cores the server processes and wrk used (their CPU
    seconds / the run's seconds; with 2 processes also each one's) and the
    server's CPU ms per request.
    """
    paths = {"/cpu": f"/cpu?n={cpu_n}", "/hello": "/hello"}
    out: dict[str, Any] = {p: {1: [], 2: []} for p in paths}
    cores: dict[str, Any] = {p: {1: [], 2: []} for p in paths}
    wrk_cores: dict[str, Any] = {p: {1: [], 2: []} for p in paths}
    per_req: dict[str, Any] = {p: {1: [], 2: []} for p in paths}
    split: dict[str, list[list[float]]] = {p: [] for p in paths}
    with ExitStack() as stack:
        # The app has comet routes: two processes need the Redis bus.
        one: list[int] = []
        ports = {1: stack.enter_context(server(directory, 1, None, pids=one)),
                 2: stack.enter_context(server(directory, 2, url))}
        pids = {1: one, 2: _server_pids(ports[2])}  # one: the process itself
        for path in paths.values():
            for n in (1, 2):
                wrk(ports[n], path, 2, 32)  # warm-up
        for _ in range(rounds):
            for name, path in paths.items():
                for n in (1, 2):
                    each = [_cpu_seconds([pid]) for pid in pids[n]]
                    kids, t0 = os.times(), time.monotonic()
                    out[name][n].append(wrk(ports[n], path, seconds, 32))
                    took = time.monotonic() - t0
                    after = os.times()
                    each = [_cpu_seconds([pid]) - b for pid, b in zip(pids[n], each)]
                    used = sum(each)
                    if n == 2:
                        # One process idle (no connection of wrk's) would show here.
                        split[name].append([round(u / took, 2) for u in each])
                    cores[name][n].append(round(used / took, 2))
                    per_req[name][n].append(round(1000 * used / max(1.0, out[name][n][-1] * took),
                                                  3))
                    wrk_cores[name][n].append(round(
                        (after.children_user + after.children_system
                         - kids.children_user - kids.children_system) / took, 2))
    return {"req_s": out, "server_cores": cores, "wrk_cores": wrk_cores,
            "server_cpu_ms_per_request": per_req, "cores_per_process_2": split}


# -- (c) accept balance


def tcp_spread(port: int) -> dict[int, int]:
    """
    Established connections to ``port`` per serving process (``ss -p``).
    """
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=60).stdout
    per: Counter[int] = Counter()
    for line in out.splitlines():
        if "pid=" in line:
            per[int(line.split("pid=", 1)[1].split(",", 1)[0])] += 1
    return dict(per)


def _answered(port: int) -> dict[int, int]:
    return {c["pid"]: c["status"].get("scale_app", {}).get("answered", {}).get("hello", 0)
            for c in status(port)["processes"]["set"]}


def _held(port: int) -> dict[int, int]:
    return {c["pid"]: c["status"]["comet"]["connections"]
            for c in status(port)["processes"]["set"]}


def balance(directory: Path, url: str, listen: str, seconds: int, held: int) -> dict[str, Any]:
    """
    How wrk's connections and requests, and ``held`` SSE connections
    opened one after another, spread over two processes in ``listen`` mode.
    """
    supervisor: list[int] = []
    with server(directory, 2, url, listen=listen, pids=supervisor) as port:
        pids = sorted(c["pid"] for c in status(port)["processes"]["set"])
        time.sleep(2.5)  # the counters of the other process arrive every second
        before = _answered(port)
        proc = subprocess.Popen(_wrk_cmd(port, "/hello", seconds, 32), stdout=subprocess.PIPE,
                                text=True)
        time.sleep(seconds / 2)
        conns = tcp_spread(port)
        out, _ = proc.communicate(timeout=seconds + 60)
        rate = _wrk_rate(out)
        time.sleep(2.5)
        after = _answered(port)
        requests = {pid: after.get(pid, 0) - before.get(pid, 0) for pid in pids}
        topic = f"held{os.getpid()}{listen}"
        t0 = time.monotonic()
        clients = Subscribers(port, held, topic)
        try:
            end = time.monotonic() + 180
            while sum(_held(port).values()) < held:
                if time.monotonic() > end:
                    raise TimeoutError(f"only {_held(port)} of {held} held")
                clients.pump(0.5)
            opened_s = time.monotonic() - t0
            clients.pump(2.5)
            per_process = _held(port)
            held_tcp = tcp_spread(port)
        finally:
            clients.close()
        # SIGHUP (one at a time) under wrk: what its clients see.
        reload = reload_under_wrk(port, supervisor[0], pids, max(20, seconds))
    return {"listen": listen, "pids": pids, "wrk_req_s": rate,
            "reload": reload,
            "wrk_connections": [conns.get(p, 0) for p in pids],
            "wrk_requests": [requests[p] for p in pids],
            "held": [per_process.get(p, 0) for p in pids],
            "held_tcp": [held_tcp.get(p, 0) for p in pids],
            "held_open_seconds": opened_s}


def reload_under_wrk(port: int, supervisor: int, pids: list[int], seconds: int) -> dict[str, Any]:
    """
    SIGHUP to ``supervisor`` 2 s into a ``seconds`` wrk run on ``/hello``
    (32 keep-alive connections): wrk's errors, and whether every serving
    process (``pids``) was replaced within the run.
    """
    proc = subprocess.Popen(_wrk_cmd(port, "/hello", seconds, 32), stdout=subprocess.PIPE,
                            text=True)
    time.sleep(2)
    os.kill(supervisor, signal.SIGHUP)
    out, _ = proc.communicate(timeout=seconds + 60)
    replaced_during_wrk = not {c["pid"] for c in status(port)["processes"]["set"]} & set(pids)
    end = time.monotonic() + 60
    while True:
        after_reload = status(port)["processes"]
        replaced = not {c["pid"] for c in after_reload["set"]} & set(pids)
        if replaced or time.monotonic() > end:
            break
        time.sleep(0.5)
    return {"seconds": seconds, "req_s": _wrk_rate(out), **_wrk_errors(out),
            "reloads": after_reload["reloads"], "all_replaced": replaced,
            "replaced_within_wrk_run": replaced_during_wrk}


def reload_only() -> None:
    """
    ``python -m bench.scale reload``: only the SIGHUP-under-wrk runs, in
    both listen modes, printed (no JSON written).
    """
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with redis_server(d) as url:
            for mode in LISTEN:
                supervisor: list[int] = []
                with server(d, 2, url, listen=mode, pids=supervisor) as port:
                    pids = sorted(c["pid"] for c in status(port)["processes"]["set"])
                    print(mode, json.dumps(reload_under_wrk(port, supervisor[0], pids, 20)),
                          "load", loadavg(), flush=True)


# -- (b) fan-out


class Subscribers:
    """
    ``n`` SSE connections on one selector; records when each saw a marker.
    """

    def __init__(self, port: int, n: int, topic: str) -> None:
        self.sel = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.tail: dict[int, bytes] = {}
        req = (f"GET /comet/{topic} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
               ).encode()
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(req)
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ, i)
            self.socks.append(s)
            self.tail[i] = b""
            if i % 500 == 499:
                self.pump(0.05)

    def pump(self, seconds: float, marker: bytes | None = None,
             seen: dict[int, float] | None = None) -> None:
        end = time.perf_counter() + seconds
        while True:
            left = end - time.perf_counter()
            if left <= 0:
                return
            for key, _ in self.sel.select(min(left, 0.05)):
                i = key.data
                try:
                    data = key.fileobj.recv(262144)
                except BlockingIOError:
                    continue
                if marker is not None and seen is not None and i not in seen:
                    buf = self.tail[i] + data
                    if marker in buf:
                        seen[i] = time.perf_counter()
                    self.tail[i] = buf[-64:]
            if seen is not None and len(seen) == len(self.socks):
                return

    def close(self) -> None:
        for s in self.socks:
            self.sel.unregister(s)
            s.close()


def fanout(port: int, subs: int, publishes: int, burst: int) -> dict[str, Any]:
    topic = f"fan{os.getpid()}"
    clients = Subscribers(port, subs, topic)
    try:
        end = time.monotonic() + 120
        while True:
            st = status(port)
            held = (sum(c["status"]["comet"]["connections"] for c in st["processes"]["set"])
                    if "processes" in st else st["comet"]["connections"])
            if held >= subs:
                break
            if time.monotonic() > end:
                raise TimeoutError(f"only {held} of {subs} subscribers held")
            clients.pump(0.5)
        clients.pump(2.5)  # the other processes' counters arrive every second
        before = _bus_counts(port)
        lat = []
        for k in range(publishes):
            marker = b'"seq":%d}' % k
            seen: dict[int, float] = {}
            t0 = time.perf_counter()
            http(port, "POST", f"/_pipecomet/publish/{topic}", b'{"seq":%d}' % k,
                 {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
            clients.pump(30, marker, seen)
            if len(seen) < subs:
                raise TimeoutError(f"publish {k}: {len(seen)} of {subs} subscribers got it")
            lat.append((max(seen.values()) - t0) * 1000)
            clients.pump(0.2)
        clients.pump(2.5)
        after = _bus_counts(port)
        # A burst: `burst` publishes back to back, until every subscriber has the last.
        t0 = time.perf_counter()
        last = publishes + burst - 1
        for k in range(publishes, publishes + burst):
            http(port, "POST", f"/_pipecomet/publish/{topic}", b'{"seq":%d}' % k,
                 {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        seen = {}
        clients.pump(120, b'"seq":%d}' % last, seen)
        elapsed = time.perf_counter() - t0
        trips = (after[0] - before[0]) / max(1, after[1] - before[1]) if after[1] > before[1] \
            else None
        return {"p50_ms": statistics.median(lat), "max_ms": max(lat),
                "fanout_msgs_per_s": subs * burst / elapsed if len(seen) == subs else None,
                "round_trips_per_publish": trips}
    finally:
        clients.close()


def _bus_counts(port: int) -> tuple[int, int]:
    """
    (Redis round trips, publishes) summed over the serving processes.
    """
    st = status(port)
    parts = ([c["status"]["bus"] for c in st["processes"]["set"]] if "processes" in st
             else [st["bus"]])
    # Round trips of publishing and loading: the keep-alive PINGs left out.
    return (sum(b.get("round_trips", 0) - b.get("pings", 0) for b in parts),
            sum(b.get("published", 0) for b in parts))


def _split(values: list[int]) -> str:
    total = sum(values) or 1
    return " / ".join(f"{v:,} ({100 * v / total:.0f} %)" for v in values)


def main() -> None:
    if shutil.which("wrk") is None or shutil.which("redis-server") is None:
        raise SystemExit("wrk and redis-server are needed (scripts/apt-ensure wrk redis-server)")
    limit = raise_fd_limit()
    # This client holds the sockets (each server process has a limit of its own).
    subs = min(_env_int("SCALE_SUBS", 10_000), max(100, limit - 2000))
    held = min(_env_int("SCALE_HELD", 10_000), max(100, limit - 2000))
    seconds = _env_int("SCALE_SECONDS", 8)
    rounds = _env_int("SCALE_ROUNDS", 3)
    publishes = _env_int("SCALE_PUBLISHES", 20)
    burst = _env_int("SCALE_BURST", 20)
    notes = []
    load_before = loadavg()
    started = time.monotonic()
    # The CPU-bound route's work: fixed (not calibrated per run, so runs
    # compare), about 1 ms of CPU on this machine when it is quiet.
    cpu_n = _env_int("SCALE_CPU_N", 14_000)
    cpu_ms = cpu_route_ms(cpu_n)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with redis_server(d) as url:
            thr = throughput(d, seconds, rounds, url, cpu_n)
            tp = thr["req_s"]
            with server(d, 1, None) as port:
                mem = fanout(port, subs, publishes, burst)
            with server(d, 2, url) as port:
                red = fanout(port, subs, publishes, burst)
            bal = {mode: balance(d, url, mode, seconds, held) for mode in LISTEN}
    took = time.monotonic() - started
    ratios_per_round = {p: [b / a for a, b in zip(tp[p][1], tp[p][2])] for p in tp}
    cpu_ratio = statistics.median(ratios_per_round["/cpu"])
    hello_ratio = statistics.median(ratios_per_round["/hello"])
    lat_ratio = red["p50_ms"] / mem["p50_ms"]
    if subs < 10_000 or held < 10_000:
        notes.append(f"{subs} subscribers and {held} held connections, not 10,000: "
                     f"the file descriptor limit is {limit}")
    notes.append(f"load average {load_before} before, {loadavg()} after; {took:.0f} s in all")
    if os.environ.get("BENCH_NOTE"):
        notes.append(os.environ["BENCH_NOTE"])
    notes.append("2 cores hold the serving processes, wrk (1 thread, 32 connections), Redis and "
                 "the Python client of the SSE runs: 2 processes can at best double the CPU the "
                 "server gets, never more, and only when nothing else wants the cores")
    notes.append(f"CPU-bound route: /cpu?n={cpu_n} (SCALE_CPU_N), {cpu_ms:.2f} ms of CPU per "
                 "call of its work, measured in-process before the run (about 1 ms on this "
                 "machine when quiet; more CPU time per call when the cores are shared)")
    notes.append("server cores = the server processes' CPU seconds during a run / its seconds "
                 "(2 processes can use at most 2.0); wrk cores likewise for wrk: where the "
                 "server got less than 2 cores with 2 processes, the machine, not the design, "
                 "set the ratio; server CPU ms/request is the steadier figure: the same with 1 "
                 "and 2 processes means 2 free cores serve twice the requests")
    try:
        autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
    except OSError:
        autogroup = "?"
    if autogroup == "1":
        notes.append("kernel.sched_autogroup_enabled = 1: the scheduler shares CPU between "
                      "sessions, and a supervisor with its serving processes is one session, "
                      "so on a busy machine 2 processes get the share of 1 (see server cores)")
    notes.append("throughput: the 1-process and 2-process servers run side by side and the "
                 f"rounds alternate ({rounds} rounds of {seconds} s per route and server); "
                 "ratio = median of the per-round ratios")
    notes.append("accept balance: wrk connections per process sampled with ss halfway through "
                 "the run; requests per process from each process's own counter; held SSE "
                 "connections opened one after another by one client")

    def cell(v: dict[str, float]) -> str:
        return f"{v['median']:,.0f} ({v['min']:,.0f}-{v['max']:,.0f})"

    write_result(
        "scale",
        title="Scale-out: --processes and the Redis bus",
        command="make bench-scale",
        tables=[
            {"title": "Throughput (req/s, wrk; median (min-max) of the rounds; cores used, "
                       "median)",
             "columns": ["route", "1 process", "2 processes", "ratio 2/1 (median of rounds)",
                         "server cores 1 / 2 processes", "wrk cores 1 / 2 processes",
                         "server CPU ms/request 1 / 2 processes"],
             "rows": [[p, cell(spread(tp[p][1])), cell(spread(tp[p][2])),
                       round(statistics.median(ratios_per_round[p]), 2),
                       " / ".join(f"{statistics.median(thr['server_cores'][p][n]):.2f}"
                                  for n in (1, 2)),
                       " / ".join(f"{statistics.median(thr['wrk_cores'][p][n]):.2f}"
                                  for n in (1, 2)),
                       " / ".join(f"{statistics.median(thr['server_cpu_ms_per_request'][p][n]):.3f}"
                                  for n in (1, 2))]
                      for p in ("/cpu", "/hello")]},
            {"title": f"{subs:,} SSE subscribers: publish → last subscriber",
             "columns": ["setup", "p50 ms", "max ms", "fan-out msg/s",
                         "Redis round trips / publish"],
             "rows": [["1 process, memory bus", round(mem["p50_ms"], 1), round(mem["max_ms"], 1),
                       round(mem["fanout_msgs_per_s"] or 0), "-"],
                      ["2 processes, Redis bus", round(red["p50_ms"], 1), round(red["max_ms"], 1),
                       round(red["fanout_msgs_per_s"] or 0),
                       round(red["round_trips_per_publish"] or 0, 2)]]},
            {"title": f"Accept balance, 2 processes (process 0 / process 1)",
             "columns": ["listen", "wrk req/s", "wrk connections", "requests answered",
                         f"{held:,} held SSE connections"],
             "rows": [[mode, round(b["wrk_req_s"]), _split(b["wrk_connections"]),
                       _split(b["wrk_requests"]), _split(b["held"])]
                      for mode, b in bal.items()]},
            {"title": "SIGHUP (rolling restart of both processes) under wrk, 32 connections",
             "columns": ["listen", "wrk seconds", "req/s", "non-2xx", "socket errors "
                         "(connect/read/write/timeout)", "both replaced"],
             "rows": [[mode, b["reload"]["seconds"], round(b["reload"]["req_s"]),
                       b["reload"]["non_2xx"],
                       "/".join(str(b["reload"][k]) for k in ("connect", "read", "write",
                                                             "timeout")),
                       ("yes" if b["reload"]["replaced_within_wrk_run"] else
                        "after wrk ended" if b["reload"]["all_replaced"] else "NO")]
                      for mode, b in bal.items()]},
        ],
        ratios={"cpu route 2/1 processes": cpu_ratio, "hello route 2/1 processes": hello_ratio,
                "p50 Redis 2 processes / memory 1 process": lat_ratio},
        targets=[{"what": "CPU-bound route, 2 processes vs 1", "target": ">= 1.8x",
                  "value": round(cpu_ratio, 2), "met": cpu_ratio >= 1.8},
                 {"what": "publish → last subscriber p50, Redis 2 processes vs memory 1",
                  "target": "<= 1.2x", "value": round(lat_ratio, 2), "met": lat_ratio <= 1.2}],
        notes=notes,
        raw={"wrk": tool_version(["wrk", "--version"]), "throughput": tp,
             "server_cores": thr["server_cores"], "wrk_cores": thr["wrk_cores"],
             "server_cpu_ms_per_request": thr["server_cpu_ms_per_request"],
             "cores_per_process_2": thr["cores_per_process_2"],
             "cpu_route": {"n": cpu_n, "cpu_ms_per_call": cpu_ms},
             "ratios_per_round": ratios_per_round, "memory": mem, "redis": red,
             "balance": bal, "subscribers": subs, "held": held, "seconds": seconds,
             "rounds": rounds},
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["reload"]:
        reload_only()
    else:
        main()
