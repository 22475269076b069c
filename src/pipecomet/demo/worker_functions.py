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
import pickle
import threading
import time
from typing import TypedDict, TypeVar

from pipecomet import worker_function

__all__ = ["cpu_burn", "image_resize", "echo", "ResizeJob"]

_T = TypeVar("_T")


class ResizeJob(TypedDict, total=False):
    """
    What the ``/api/image/resize`` pipe sends :func:`image_resize`.
    """

    image: bytes | bytearray
    width: int
    height: int
    format: str
    max_pixels: int


@worker_function
def cpu_burn(ms: float | str) -> dict[str, object]:
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
def image_resize(job: ResizeJob) -> dict[str, object]:
    """
    Resize the image in ``job["image"]`` (any format Pillow reads) to fit
    ``job["width"]`` × ``job["height"]``, keeping its aspect ratio, and
    encode it as ``job["format"]``.

    The image travels out of band both ways (``pickle.PickleBuffer``), so
    its bytes are not copied into the pickle stream.  Input that is not an
    image, or one of more than ``job["max_pixels"]`` pixels, is an answer
    (``{"error": ...}``), not an exception.
    """
    from PIL import Image, UnidentifiedImageError

    max_pixels = int(job.get("max_pixels") or Image.MAX_IMAGE_PIXELS or 0)
    # The messages are the client's: no exception text (Pillow's carry
    # object reprs and addresses).
    not_an_image: dict[str, object] = {
        "error": "not_an_image",
        "message": "the body is not an image in a format the server reads"}
    try:
        # open() reads only the header: the size is known before a pixel
        # is decoded, so a decompression bomb is refused at no cost.
        im: Image.Image = Image.open(io.BytesIO(job["image"]))
    except Image.DecompressionBombError:
        return _too_large(max_pixels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return not_an_image
    with im:
        if max_pixels and im.width * im.height > max_pixels:
            return _too_large(max_pixels)
        try:
            im.load()
        except Image.DecompressionBombError:
            return _too_large(max_pixels)
        except (OSError, SyntaxError, ValueError):
            return not_an_image
        source = im.size
        im.thumbnail((int(job["width"]), int(job["height"])), Image.Resampling.LANCZOS)
        fmt = str(job.get("format", "PNG")).upper()
        if fmt == "JPEG" and im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        out = io.BytesIO()
        im.save(out, format=fmt)
        size = im.size
    return {"image": pickle.PickleBuffer(out.getvalue()), "format": fmt.lower(),
            "width": size[0], "height": size[1], "source_width": source[0],
            "source_height": source[1], "pid": os.getpid()}


def _too_large(max_pixels: int) -> dict[str, object]:
    return {"error": "image_too_large", "limit": max_pixels,
            "message": f"the image has more than {max_pixels} pixels"}


@worker_function
def echo(value: _T) -> _T:
    return value


@worker_function
def pid(_: object = None) -> int:
    return os.getpid()


@worker_function
def sleep(seconds: float | str) -> int:
    """
    Sleep, then return the worker's pid (a call to kill in the middle of).
    """
    time.sleep(float(seconds))
    return os.getpid()


@worker_function
def fail(message: object) -> None:
    raise ValueError(str(message))


@worker_function
def exit_now(code: int | str) -> None:
    os._exit(int(code))


@worker_function
def allocate_without_bound(step_mb: int | str = 64) -> None:
    """
    A memory bomb: allocate until something stops it.
    """
    hoard = []
    step = int(step_mb) * 1024 * 1024
    while True:
        hoard.append(bytearray(step))


@worker_function
def spin_forever(_: object = None) -> None:
    while True:
        pass


@worker_function
def unpicklable_result(_: object = None) -> object:
    return threading.Lock()
