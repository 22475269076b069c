"""
The demo gateway's worker functions: what its worker processes import
(``[workers] module = "pipecomet.demo.worker_functions"``).

``cpu_burn`` and ``image_resize`` serve the demo routes; the others show
(and let the tests provoke) each way a call can end: an echo, a sleep, an
exception, a crash, a memory bomb, a call that never returns and a result
that cannot be pickled.
"""

from __future__ import annotations

import io
import os
import threading
import time
from typing import Any

from pipecomet._workers import worker_function

__all__ = ["cpu_burn", "image_resize", "echo"]


@worker_function
def cpu_burn(ms: Any) -> dict[str, Any]:
    """
    Keep one core busy for ``ms`` milliseconds of CPU time.
    """
    ms = float(ms)
    start = time.process_time()
    end = start + ms / 1000.0
    loops = 0
    x = 0
    while time.process_time() < end:
        for i in range(200):
            x = (x * 31 + i) % 1_000_003
        loops += 1
    return {"ms": ms, "loops": loops, "cpu_ms": round((time.process_time() - start) * 1000, 3),
            "pid": os.getpid()}


@worker_function
def image_resize(job: dict[str, Any]) -> bytes:
    """
    Resize the image in ``job["image"]`` (any format Pillow reads) to fit
    ``job["width"]`` × ``job["height"]``, keeping its aspect ratio, and
    return it encoded as ``job["format"]`` (PNG by default).
    """
    from PIL import Image

    data = job["image"]
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im.thumbnail((int(job["width"]), int(job["height"])), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        fmt = str(job.get("format", "PNG")).upper()
        if fmt == "JPEG" and im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        im.save(out, format=fmt)
    return out.getvalue()


@worker_function
def echo(value: Any) -> Any:
    return value


@worker_function
def pid(_: Any = None) -> int:
    return os.getpid()


@worker_function
def sleep(seconds: Any) -> int:
    """
    Sleep, then return the worker's pid (a call to kill in the middle of).
    """
    time.sleep(float(seconds))
    return os.getpid()


@worker_function
def fail(message: Any) -> None:
    raise ValueError(str(message))


@worker_function
def exit_now(code: Any) -> None:
    os._exit(int(code))


@worker_function
def allocate_without_bound(step_mb: Any = 64) -> None:
    """
    A memory bomb: allocate until something stops it.
    """
    hoard = []
    step = int(step_mb) * 1024 * 1024
    while True:
        hoard.append(bytearray(step))


@worker_function
def spin_forever(_: Any = None) -> None:
    while True:
        pass


@worker_function
def unpicklable_result(_: Any = None) -> Any:
    return threading.Lock()
