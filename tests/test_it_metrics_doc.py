"""
docs/observability.md and ``GET /_pipecomet/metrics`` cannot drift apart:
every metric family the demo gateway exposes (``twistd -n pipecomet``,
after a little traffic that reaches every part), and those a server of
several processes adds (``--processes 2``: the demo itself would need a
Redis bus there, so a small app of the scale-out tests serves), is named
in the document's metric tables, and every name there is exposed.

A table row's first cell names its metrics in backticks; a name with a
``<placeholder>`` (``pipecomet_backend_<key>_total``) stands for the
family names the placeholder's text makes, and at least one of them must
be exposed too.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .support import ROOT, twistd_server

pytestmark = pytest.mark.integration

DOC = ROOT / "docs" / "observability.md"
TIMEOUT = 30  # seconds one HTTP call may take: a bound for a broken setup
#: Requests that make every part show its figures: a quota thread pipe, a
#: worker call, backend calls, a comet publish, errors with a code.
TRAFFIC = [
    ("GET", "/api/time.get?app_key=demo-key"),
    ("GET", "/api/time.get?app_key=nope"),
    ("GET", "/api/fast.get?app_key=demo-key"),
    ("POST", "/api/cpu.burn?app_key=demo-key&ms=1"),
    ("GET", "/api/user.get?app_key=demo-key&id=1"),
    ("GET", "/api/profile.get?app_key=demo-key&id=2"),
]


def documented(text: str) -> set[str]:
    """
    The metric names in the first cell of the document's table rows.
    """
    names: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("| `pipecomet_"):
            continue
        first = line.split("|")[1]
        names.update(re.findall(r"`(pipecomet_[a-z0-9_<>]+)`", first))
    return names


def pattern(name: str) -> re.Pattern[str]:
    return re.compile("".join("[a-z0-9_]+" if part.startswith("<") else re.escape(part)
                              for part in re.split(r"(<[a-z]+>)", name)) + "$")


def exposed(body: str) -> set[str]:
    """
    The family names of an exposition, as its ``# TYPE`` lines give them
    (counters with ``_total``); prometheus_client's ``_created`` series are
    left out.
    """
    names = set(re.findall(r"^# TYPE (\S+) \S+$", body, re.M))
    return {n for n in names if not n.endswith("_created")}


def drift(doc: str, families: set[str]) -> tuple[list[str], list[str]]:
    """
    ``(exposed but not documented, documented but not exposed)``.
    """
    names = documented(doc)
    plain = {n for n in names if "<" not in n}
    templates = {n: pattern(n) for n in names if "<" in n}
    undocumented = sorted(f for f in families
                          if f not in plain and not any(p.match(f) for p in templates.values()))
    missing = sorted([n for n in plain if n not in families]
                     + [n for n, p in templates.items() if not any(p.match(f) for f in families)])
    return undocumented, missing


def call(port: int, method: str, path: str) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.read().decode()
    except urllib.error.HTTPError as e:
        return e.read().decode()


def test_documented_names_are_read_from_the_tables():
    doc = ("| metric | type |\n|---|---|\n| `pipecomet_a_total` | counter |\n"
           "| `pipecomet_b`, `pipecomet_c_<key>` | gauge | see `pipecomet_not_me` |\n"
           "Text naming `pipecomet_prose` is not a row.\n")
    assert documented(doc) == {"pipecomet_a_total", "pipecomet_b", "pipecomet_c_<key>"}
    assert drift(doc, {"pipecomet_a_total", "pipecomet_b", "pipecomet_c_x_total", "pipecomet_d"}) \
        == (["pipecomet_d"], [])
    assert drift(doc, {"pipecomet_a_total"}) == ([], ["pipecomet_b", "pipecomet_c_<key>"])


def test_every_exposed_metric_is_documented_and_every_documented_one_exposed(tmp_path: Path):
    with twistd_server() as (port, _proc):
        for method, path in TRAFFIC:
            call(port, method, path)
        families = exposed(call(port, "GET", "/_pipecomet/metrics"))
    assert "pipecomet_backend_calls_total" in families
    config = tmp_path / "processes.toml"
    config.write_text('[server]\naccess_log = "off"\n')
    with twistd_server(["--app", "tests.test_it_metrics_processes:make_app",
                        "--config", str(config), "--processes", "2"]) as (port, _proc):
        several = exposed(call(port, "GET", "/_pipecomet/metrics"))
    assert "pipecomet_scrape_process_up" in several
    families |= several
    undocumented, missing = drift(DOC.read_text(), families)
    assert not undocumented, f"exposed, not in {DOC.name}: {undocumented}"
    assert not missing, f"in {DOC.name}, not exposed by the demo: {missing}"
