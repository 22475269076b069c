"""
JSON server logs: one object per line with the time, level, namespace,
the formatted message and the event's own fields (``request_id``,
``error_id``, ``where``...), and the traceback of a failure.

twisted.logger's ``jsonFileLogObserver`` writes events so that they can be
read back as events (``log_format`` but no formatted text, levels as
objects); an operator's ``jq`` or a log shipper wants the message, so this
is a lean formatter of our own.  Under twistd it is put on the application
the documented way (``application.setComponent(ILogObserver, ...)``), by
:class:`LoggingRoot` when the service tree is attached.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, TextIO

from twisted.application.service import IServiceCollection, MultiService
from twisted.logger import ILogObserver, formatEvent
from twisted.python.components import Componentized
from zope.interface import implementer

__all__ = ["JSONLineObserver", "LoggingRoot", "open_log_file"]

#: Event keys twisted.logger and the legacy log system use for themselves.
_SKIP = frozenset({"message", "isError", "system", "format", "why", "failure", "time",
                   "printed", "debug", "log_trace", "log_text"})


def _plain(value: object) -> bool | int | float | str | None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@implementer(ILogObserver)
class JSONLineObserver:
    """
    Writes each log event as one JSON line to ``out``.

    :param out: a text file (written and flushed per event).
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        when = event.get("log_time") or time.time()
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
            + f".{int((when % 1) * 1e6):06d}Z",
            "level": level.name if level is not None else "info",
            "namespace": event.get("log_namespace", ""),
        }
        if event.get("log_system"):
            record["system"] = event["log_system"]
        try:
            record["message"] = formatEvent(event)
        except Exception:  # formatEvent already guards; be sure a bad event never kills logging
            record["message"] = repr(event.get("log_format"))
        for key, value in event.items():
            if key.startswith("log_") or key in _SKIP or key in record:
                continue
            record[key] = _plain(value)
        failure = event.get("log_failure")
        if failure is not None:
            record["exception"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
            record["traceback"] = failure.getTraceback()
        self.out.write(json.dumps(record, ensure_ascii=False, default=str,
                                  separators=(",", ":")) + "\n")
        self.out.flush()


def open_log_file(path: str) -> TextIO:
    """
    ``path`` opened for appending, or standard output for ``""`` or ``"-"``
    (a duplicate of descriptor 1, taken before twistd redirects
    ``sys.stdout`` into the log).
    """
    if path in ("", "-"):
        return open(os.dup(1), "w", encoding="utf-8", buffering=1)
    return open(path, "a", encoding="utf-8", buffering=1)


class LoggingRoot(MultiService):
    """
    The root of ``twistd pipecomet``'s service tree when the log is JSON:
    when twistd attaches it to its application, it sets the application's
    log observer, which twistd then starts logging to.
    """

    def __init__(self, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: IServiceCollection) -> None:
        if isinstance(parent, Componentized):
            # twistd's Application; a plain MultiService parent (tests) has
            # no log observer to set.
            parent.setComponent(ILogObserver, self.observer)
        return super().setServiceParent(parent)
