"""
Worker functions for the worker-pool integration tests: the demo's (echo,
sleep, crash, ...) plus calls that end when the test says so, so that no
test races a sleep against a deadline.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pipecomet.demo.worker_functions  # noqa: F401  (registers the demo's functions)
from pipecomet._workers import worker_function


@worker_function
def wait_for_file(path: Any) -> int:
    """
    Return the worker's pid once ``path`` exists (after 120 s at most, so a
    failed test cannot leave a worker busy for ever).
    """
    end = time.monotonic() + 120
    while not os.path.exists(str(path)):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.005)
    return os.getpid()


def refuse(*_: Any) -> None:
    raise ValueError("this value cannot be unpickled")


class Undecodable:
    """
    Pickles fine, fails to unpickle (wherever that is).
    """

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return refuse, ()


@worker_function
def undecodable_result(_: Any = None) -> Undecodable:
    return Undecodable()
