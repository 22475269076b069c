"""
Worker files under ``/dev/shm``: create, open, remove, and sweep the ones
a dead server left behind.

A file is named ``pipecomet-w<server pid>-<pool token>-<slot>-<epoch>``, so
a starting server can tell the files of a dead server (its pid is gone)
from those of a live one and remove only the former.
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path
from ._ring import Layout

__all__ = ["SharedFile", "shm_name", "sweep_stale", "PREFIX"]

PREFIX = "pipecomet-w"
_NAME = re.compile(r"^pipecomet-w(\d+)-([0-9a-f]+)-(\d+)-(\d+)$")


def shm_name(server_pid: int, token: str, slot: int, epoch: int) -> str:
    return f"{PREFIX}{server_pid}-{token}-{slot}-{epoch}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(directory: str) -> list[str]:
    """
    Remove worker files whose server is no longer running; the names
    removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _NAME.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass  # gone already, or another user's: not ours to remove
    return removed


class SharedFile:
    """
    One worker's mapped file.

    :ivar view: a memoryview of the whole mapping (the rings work on it);
        None once closed.
    """

    def __init__(self, path: str, mapping: mmap.mmap, layout: Layout) -> None:
        self.path = path
        self.mapping: mmap.mmap | None = mapping
        self.layout = layout
        self.view: memoryview | None = memoryview(mapping)

    @classmethod
    def create(cls, path: str, capacity: int, epoch: int, slot: int, server_pid: int) -> SharedFile:
        """
        Create and map a new file (never reusing an existing one).
        """
        layout = Layout(capacity)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                # Reserve the pages now: a full tmpfs fails here, not with
                # SIGBUS in the middle of a call.
                os.posix_fallocate(fd, 0, layout.size)
            except OSError:
                os.unlink(path)
                raise
            mapping = mmap.mmap(fd, layout.size)
        finally:
            os.close(fd)
        f = cls(path, mapping, layout)
        layout.write_header(mapping, epoch, slot, server_pid)
        return f

    @classmethod
    def open(cls, path: str) -> tuple[SharedFile, int, int, int]:
        """
        Map an existing file: ``(file, epoch, slot, server_pid)``.
        """
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        layout, epoch, slot, server_pid = Layout.read_header(mapping)
        if layout.size > size:
            mapping.close()
            raise ValueError(f"{path}: {size} bytes, layout needs {layout.size}")
        return cls(path, mapping, layout), epoch, slot, server_pid

    def close(self) -> None:
        """
        Unmap (views still held elsewhere keep the pages until they go).
        """
        view, self.view = self.view, None
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass
        mapping, self.mapping = self.mapping, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # a slice view is still alive; the GC unmaps later

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    @property
    def exists(self) -> bool:
        return Path(self.path).exists()
