"""
``make bench-workers``: the worker pool against the process pools Python
users reach for, all driven from one Twisted reactor, 2 workers each,
echoing a payload: concurrent.futures.ProcessPoolExecutor,
multiprocessing.Pool, ampoule (Twisted's AMP process pool), and a bare mmap
ring with eventfd doorbells between two pinned processes (the lower bound:
no reactor, no codec, no pool).

Measures: one call at a time with a 100-byte payload (calls/s, median
latency), 64 calls in flight with 100 bytes (calls/s), and 1 MiB payloads
with 4 in flight (MiB/s of payload echoed).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import os
import statistics
import time
from io import BytesIO
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.protocols import amp

from ._common import write_result

ONE_SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
SMALL = b"x" * 100
BIG = os.urandom(1024 * 1024)
WINDOW = 64
BIG_WINDOW = 4
WORKERS = 2


def echo(value: Any) -> Any:
    return value


# -- ampoule: AMP values are at most 64 KiB, so a payload travels in keys
# "data", "data.2", ... (the usual BigString recipe).

CHUNK = 0xFFFF


class BigBytes(amp.Argument):
    def fromBox(self, name: Any, strings: Any, objects: Any, proto: Any) -> None:
        key = name if isinstance(name, bytes) else name.encode()
        out = BytesIO()
        out.write(strings.get(key, b""))
        for n in itertools.count(2):
            chunk = strings.get(key + b".%d" % n)
            if chunk is None:
                break
            out.write(chunk)
        objects[key.decode()] = out.getvalue()

    def toBox(self, name: Any, strings: Any, objects: Any, proto: Any) -> None:
        key = name if isinstance(name, bytes) else name.encode()
        value = memoryview(objects[key.decode()])
        strings[key] = bytes(value[:CHUNK])
        for n, start in enumerate(range(CHUNK, len(value), CHUNK), 2):
            strings[key + b".%d" % n] = bytes(value[start:start + CHUNK])


class EchoBig(amp.Command):
    arguments = [(b"data", BigBytes())]
    response = [(b"data", BigBytes())]


try:
    from ampoule import child as _ampoule_child

    class BenchChild(_ampoule_child.AMPChild):
        @EchoBig.responder
        def echo_big(self, data: bytes) -> dict[str, bytes]:
            return {"data": data}
except ImportError:  # reported as a missing peer
    BenchChild = None  # type: ignore[assignment,misc]


# -- drivers: each gives call(payload) -> Deferred

async def measure(call: Callable[[bytes], defer.Deferred], reactor: Any) -> dict[str, float]:
    for _ in range(300):  # warm up
        await call(SMALL)
    lat = []
    end = time.perf_counter() + ONE_SECONDS
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        await call(SMALL)
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        if t1 > end:
            break
    one_rate = len(lat) / (time.perf_counter() - start)
    median_us = statistics.median(lat) * 1e6
    window_rate = await windowed(call, SMALL, WINDOW, ONE_SECONDS)
    big_rate = await windowed(call, BIG, BIG_WINDOW, ONE_SECONDS)
    return {"one_per_s": one_rate, "median_us": median_us, "window_per_s": window_rate,
            "mib_per_s": big_rate * len(BIG) / 2**20}


def windowed(call: Callable[[bytes], defer.Deferred], payload: bytes, window: int,
             seconds: float) -> defer.Deferred:
    done: defer.Deferred = defer.Deferred()
    state = {"n": 0, "open": 0, "start": time.perf_counter()}
    end = state["start"] + seconds

    def one(_: Any = None) -> None:
        state["open"] += 1
        call(payload).addCallbacks(finished, failed)

    def finished(value: Any) -> None:
        state["open"] -= 1
        state["n"] += 1
        if time.perf_counter() < end:
            one()
        elif state["open"] == 0 and not done.called:
            done.callback(state["n"] / (time.perf_counter() - state["start"]))

    def failed(f: Any) -> None:
        if not done.called:
            done.errback(f)

    for _ in range(window):
        one()
    return done


async def bench_pipecomet(reactor: Any) -> dict[str, float]:
    from pipecomet._workers import WorkerPool, WorkersConfig

    pool = WorkerPool(WorkersConfig(module="pipecomet.demo.worker_functions", size=WORKERS,
                                    max_in_flight=64, queue=4096), reactor)
    pool.startService()
    await pool.ready()
    try:
        return await measure(lambda p: pool.call("echo", p), reactor)
    finally:
        await pool.stopService()


def _future_to_deferred(reactor: Any, fut: Any) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()

    def done(f: Any) -> None:
        exc = f.exception()
        if exc is None:
            reactor.callFromThread(d.callback, f.result())
        else:
            reactor.callFromThread(d.errback, exc)

    fut.add_done_callback(done)
    return d


# Forking a process that already runs threads can leave a child stuck on a
# lock it inherited held; the peers start their children from a fork server.
MP = multiprocessing.get_context("forkserver")


async def bench_ppe(reactor: Any) -> dict[str, float]:
    from bench import workers as named

    ex = concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=MP)
    try:
        return await measure(lambda p: _future_to_deferred(reactor, ex.submit(named.echo, p)),
                             reactor)
    finally:
        ex.shutdown()


async def bench_mp_pool(reactor: Any) -> dict[str, float]:
    from bench import workers as named

    pool = MP.Pool(WORKERS)

    def call(p: bytes) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        pool.apply_async(named.echo, (p,), callback=lambda r: reactor.callFromThread(d.callback, r),
                         error_callback=lambda e: reactor.callFromThread(d.errback, e))
        return d

    try:
        return await measure(call, reactor)
    finally:
        pool.terminate()
        pool.join()


async def bench_ampoule(reactor: Any) -> dict[str, float]:
    from ampoule import pool as apool

    # The children import the child class by name: take it from the module
    # under its importable name, not from __main__.
    from bench import workers as named

    pp = apool.ProcessPool(named.BenchChild, min=WORKERS, max=WORKERS)
    await pp.start()

    def call(p: bytes) -> defer.Deferred:
        return pp.doWork(named.EchoBig, data=p).addCallback(lambda r: r["data"])

    try:
        return await measure(call, reactor)
    finally:
        await pp.stop()


# -- the bare ring: two processes pinned to two cores, an mmap'd pair of
# rings, eventfd doorbells rung on every batch.  No reactor, no pickle.

def bare_ring() -> dict[str, float]:
    import mmap

    from pipecomet._workers._ring import KIND_CALL, Layout, OutgoingMessage, RingConsumer, RingProducer

    layout = Layout(4 * 1024 * 1024)
    mm = mmap.mmap(-1, layout.size)
    to_child = os.eventfd(0)
    to_parent = os.eventfd(0)
    cores = sorted(os.sched_getaffinity(0))
    pid = os.fork()
    if pid == 0:
        if len(cores) > 1:
            os.sched_setaffinity(0, {cores[1]})
        view = memoryview(mm)
        req = RingConsumer(*layout.request_ring(view))
        resp = RingProducer(*layout.response_ring(view))
        while True:
            os.eventfd_read(to_child)
            n = 0
            while True:
                m = req.next_message()
                if m is None:
                    break
                kind, cid, ep, segs = m
                if cid == 0:
                    os._exit(0)
                data = b"".join(segs)
                req.release()
                resp.try_write(OutgoingMessage(kind, cid, ep, [data], len(data)))
                n += 1
            if n:
                os.eventfd_write(to_parent, 1)
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[0]})
    view = memoryview(mm)
    req = RingProducer(*layout.request_ring(view))
    resp = RingConsumer(*layout.response_ring(view))
    ids = itertools.count(1)

    def batch(k: int) -> None:
        for _ in range(k):
            req.try_write(OutgoingMessage(KIND_CALL, next(ids), 1, [SMALL], len(SMALL)))
        os.eventfd_write(to_child, 1)
        got = 0
        while got < k:
            os.eventfd_read(to_parent)
            while resp.next_message() is not None:
                resp.release()
                got += 1

    for _ in range(1000):
        batch(1)
    lat = []
    end = time.perf_counter() + ONE_SECONDS
    start = time.perf_counter()
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        batch(1)
        lat.append(time.perf_counter() - t0)
    one = len(lat) / (time.perf_counter() - start)
    rounds = 0
    start = time.perf_counter()
    end = start + ONE_SECONDS
    while time.perf_counter() < end:
        batch(WINDOW)
        rounds += 1
    window = rounds * WINDOW / (time.perf_counter() - start)
    req.try_write(OutgoingMessage(KIND_CALL, 0, 1, [b""], 0))
    os.eventfd_write(to_child, 1)
    os.waitpid(pid, 0)
    os.sched_setaffinity(0, set(cores))
    del view, req, resp
    return {"one_per_s": one, "median_us": statistics.median(lat) * 1e6, "window_per_s": window}


PEERS = [
    ("pipecomet WorkerPool", bench_pipecomet),
    ("ProcessPoolExecutor", bench_ppe),
    ("multiprocessing.Pool", bench_mp_pool),
    ("ampoule", bench_ampoule),
]


def main() -> None:
    results: dict[str, Any] = {}
    # The bare ring first, before any reactor or thread exists (it forks).
    results["bare mmap ring (eventfd)"] = bare_ring()
    print("bare mmap ring:", results["bare mmap ring (eventfd)"], flush=True)

    async def run(reactor: Any) -> None:
        for name, fn in PEERS:
            try:
                results[name] = await fn(reactor)
            except Exception as e:  # a peer that cannot run is reported, not hidden
                results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(name, results[name], flush=True)
        report(results)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


def report(results: dict[str, Any]) -> None:
    ours = results["pipecomet WorkerPool"]
    bare = results["bare mmap ring (eventfd)"]
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, r["error"], "", "", ""])
            continue
        rows.append([name, round(r["one_per_s"]), round(r["median_us"], 1), round(r["window_per_s"]),
                     round(r["mib_per_s"]) if "mib_per_s" in r else "n/a"])

    def ratio(a: str, key: str, b: str) -> float:
        try:
            return results[a][key] / results[b][key]
        except (KeyError, ZeroDivisionError):
            return float("nan")

    P, PPE, MP, AMP = "pipecomet WorkerPool", "ProcessPoolExecutor", "multiprocessing.Pool", "ampoule"
    ratios = {
        "one at a time: pipecomet / ProcessPoolExecutor": ratio(P, "one_per_s", PPE),
        "one at a time: pipecomet / multiprocessing.Pool": ratio(P, "one_per_s", MP),
        "one at a time: pipecomet / ampoule": ratio(P, "one_per_s", AMP),
        "median latency: pipecomet / bare ring": ours["median_us"] / bare["median_us"],
        "64 in flight: pipecomet / ProcessPoolExecutor": ratio(P, "window_per_s", PPE),
        "64 in flight: pipecomet / multiprocessing.Pool": ratio(P, "window_per_s", MP),
        "64 in flight: pipecomet / ampoule": ratio(P, "window_per_s", AMP),
        "64 in flight: pipecomet / bare ring": ours["window_per_s"] / bare["window_per_s"],
        "1 MiB: pipecomet / ProcessPoolExecutor": ratio(P, "mib_per_s", PPE),
        "1 MiB: pipecomet / multiprocessing.Pool": ratio(P, "mib_per_s", MP),
        "1 MiB: pipecomet / ampoule": ratio(P, "mib_per_s", AMP),
    }
    r = ratios
    targets = [
        {"what": "one at a time vs ProcessPoolExecutor", "target": ">= 2x",
         "value": f"{r['one at a time: pipecomet / ProcessPoolExecutor']:.2f}x",
         "met": r["one at a time: pipecomet / ProcessPoolExecutor"] >= 2},
        {"what": "median latency vs bare ring", "target": "<= 1.3x",
         "value": f"{r['median latency: pipecomet / bare ring']:.2f}x",
         "met": r["median latency: pipecomet / bare ring"] <= 1.3},
        {"what": "64 in flight vs ProcessPoolExecutor", "target": ">= 10x",
         "value": f"{r['64 in flight: pipecomet / ProcessPoolExecutor']:.2f}x",
         "met": r["64 in flight: pipecomet / ProcessPoolExecutor"] >= 10},
        {"what": "64 in flight vs multiprocessing.Pool", "target": ">= 4x",
         "value": f"{r['64 in flight: pipecomet / multiprocessing.Pool']:.2f}x",
         "met": r["64 in flight: pipecomet / multiprocessing.Pool"] >= 4},
        {"what": "1 MiB payloads vs ProcessPoolExecutor", "target": ">= 3x",
         "value": f"{r['1 MiB: pipecomet / ProcessPoolExecutor']:.2f}x",
         "met": r["1 MiB: pipecomet / ProcessPoolExecutor"] >= 3},
        {"what": "1 MiB payloads", "target": ">= 1024 MiB/s", "value": f"{ours['mib_per_s']:.0f} MiB/s",
         "met": ours["mib_per_s"] >= 1024},
    ]
    write_result(
        "workers",
        title="Worker processes: pipecomet WorkerPool vs Python process pools (2 workers, echo)",
        command="make bench-workers",
        tables=[{"title": "Echo from a Twisted reactor, 2 worker processes each",
                 "columns": ["pool", "one at a time (calls/s)", "median latency (µs)",
                             f"{WINDOW} in flight (calls/s)", f"1 MiB, {BIG_WINDOW} in flight (MiB/s)"],
                 "rows": rows}],
        ratios=ratios,
        targets=targets,
        peers=[PPE, MP, AMP, "bare mmap ring with eventfd doorbells (lower bound, pinned cores)"],
        notes=[
            f"Each figure is a {ONE_SECONDS:g} s run after a warm-up; 100-byte payloads unless "
            "noted; MiB/s counts each 1 MiB payload once (it travels both ways).",
            "The bare ring runs without a reactor or codec, one process per core, ringing an "
            "eventfd on every batch: the floor for one round trip between two processes that "
            "sleep between messages.  The pool's workers look at their ring for spin_us (50 µs) "
            "before sleeping, so back-to-back calls skip the wake-up the bare ring pays.",
            "Before the project (same machine, from a Twisted reactor): ProcessPoolExecutor 4.3k/s "
            "(median 212 µs), 7.3k/s at 64 in flight, 350 MiB/s; multiprocessing.Pool 4.5k, 18k, "
            "385 MiB/s; ampoule 4.4k, 7.5k, 172 MiB/s; bare ring 12k/s (median 80 µs), 325k/s.",
            "The machine has 2 cores shared with the server, the workers and the load driver; "
            "figures are noisy when other jobs run.",
        ],
        extra_versions=["ampoule"],
        raw=results,
    )


if __name__ == "__main__":
    main()
