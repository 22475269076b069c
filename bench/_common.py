"""
Shared helpers for the benchmarks: machine facts, tables, JSON results.

Every benchmark prints its table and writes ``bench/results/<name>.json``;
``python -m bench.report`` turns all results into ``docs/performance.md``.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine_info() -> dict[str, Any]:
    """
    What the figures were measured on.
    """
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in ("twisted", "klein", "treq", "pipecomet", *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def tool_version(cmd: Sequence[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (p.stdout or p.stderr).strip().splitlines()[0]
    except Exception as e:  # a missing tool is a fact worth recording
        return f"unavailable ({e})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """
    A Markdown table (also readable in a terminal).
    """

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(cell(v) for v in r) + " |")
    return "\n".join(lines)


def write_result(
    name: str,
    *,
    title: str,
    command: str,
    tables: Sequence[dict[str, Any]],
    targets: Sequence[dict[str, Any]] = (),
    ratios: dict[str, float] | None = None,
    peers: Sequence[str] = (),
    notes: Sequence[str] = (),
    extra_versions: Sequence[str] = (),
    raw: Any = None,
) -> Path:
    """
    Print and save one benchmark's results.

    :param tables: ``[{"title": str, "columns": [...], "rows": [[...]]}]``.
    :param targets: ``[{"what": str, "target": str, "value": float|str, "met": bool}]``.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "title": title,
        "command": command,
        "tables": list(tables),
        "ratios": ratios or {},
        "targets": list(targets),
        "peers": list(peers),
        "notes": list(notes),
        "machine": machine_info(),
        "versions": versions(*extra_versions),
        "raw": raw,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\n## {title}\n")
    for t in tables:
        if t.get("title"):
            print(f"### {t['title']}\n")
        print(format_table(t["columns"], t["rows"]))
        print()
    if ratios:
        for k, v in ratios.items():
            print(f"ratio {k}: {v:.3f}")
    for t in targets:
        print(f"target {'MET' if t['met'] else 'NOT MET'}: {t['what']} — target {t['target']}, got {t['value']}")
    for n in notes:
        print(f"note: {n}")
    print(f"\nwritten: {path.relative_to(ROOT)}")
    return path


def python() -> str:
    return sys.executable


def wait_ready(proc: subprocess.Popen, name: str, timeout: float = 30.0) -> None:
    """
    Wait until a server subprocess prints ``ready`` on its (piped) stdout.
    """
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    end, buf = time.monotonic() + timeout, b""
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        chunk = proc.stdout.read()
        if chunk:
            buf += chunk
            if b"ready" in buf:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{name} not ready after {timeout}s")


def cpu_seconds(pid: int) -> float:
    """
    User + system CPU time process ``pid`` has used so far.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """
    SIGTERM a subprocess we started, SIGKILL it after ``grace`` seconds.
    """
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def loadavg() -> str:
    """
    The 1, 5 and 15 minute load averages, to say how busy a run's machine was.
    """
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"
