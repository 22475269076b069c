"""
The README's commands, run as written.

Every ``sh`` block of README.md is run, in order, line by line, with bash,
by the installed package's scripts (its ``bin`` folder first on ``PATH``,
as in an activated virtualenv) and no other environment: no PYTHONPATH,
nothing of the test runner.  Each section runs in a fresh temporary
folder; ``python``/``toml`` blocks whose first line is ``# NAME.py`` or
``# NAME.toml`` are written there first.

How a line is read:

- ``pipecomet serve ...`` / ``twistd -n pipecomet ...`` starts a server in
  the background (kept until the end: a user keeps it in a terminal) on a
  free port standing for the port the line names (8080 when none);
  ``localhost:PORT`` in later lines goes to it.
- ``make ...`` and ``pip ...`` lines are installation: skipped (the test
  runs against the installed package).
- any other line starting with a command is run and must exit 0 (28 when
  it sets a curl ``-m``/``--max-time``); a trailing comment naming HTTP
  statuses (``# 403``, ``# 200 ×5, then 429``) is what its responses must
  be, otherwise a curl must get a status below 400;
- lines after a command that are not commands are its expected output
  (JSON lines compared as JSON).

A block preceded by ``<!-- readme-test: skip ... -->`` is not run.  New curl
lines with a status comment are picked up by themselves.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from .support import ROOT, clean_env, free_port, stop_process, wait_for_port

pytestmark = pytest.mark.timeout(600)

BIN = Path(sys.executable).parent
COMMANDS = {"curl", "for", "pipecomet", "twistd", "head", "python3", "python", "echo", "printf",
            "cat", "ls"}
SKIPPED = {"make", "pip"}
STATUS_MARK = "__readme_status__:"


@dataclass
class Line:
    command: str
    comment: str
    expected: list[str] = field(default_factory=list)


@dataclass
class Section:
    title: str
    files: dict[str, str] = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)


def split_comment(line: str) -> tuple[str, str]:
    """
    ``(command, comment)``: the comment starts at a ``#`` after whitespace,
    outside quotes.
    """
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def parse(text: str) -> list[Section]:
    sections: list[Section] = [Section("(top)")]
    lines = text.splitlines()
    i = 0
    skip_next = False
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            sections.append(Section(line[3:].strip()))
        elif line.startswith("<!-- readme-test: skip"):
            skip_next = True
        elif line.startswith("```") and len(line) > 3:
            lang = line[3:].strip()
            body = []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if not skip_next:
                add_block(sections[-1], lang, body)
            skip_next = False
        i += 1
    return [s for s in sections if s.lines]


def add_block(section: Section, lang: str, body: list[str]) -> None:
    if lang in ("python", "toml"):
        m = re.match(r"#\s*([\w.-]+\.(?:py|toml))\b", body[0]) if body else None
        if m:
            section.files[m.group(1)] = "\n".join(body) + "\n"
        return
    if lang != "sh":
        return
    joined: list[str] = []
    for raw in body:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + raw.strip()
        else:
            joined.append(raw)
    for raw in joined:
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        first = stripped.split()[0]
        if first in SKIPPED:
            continue
        if first in COMMANDS:
            command, comment = split_comment(stripped)
            section.lines.append(Line(command, comment))
        else:
            assert section.lines, f"output line before any command: {raw!r}"
            section.lines[-1].expected.append(stripped)


def is_server(command: str) -> bool:
    return command.startswith("pipecomet serve") or command.startswith("twistd -n pipecomet")


class Servers:
    """
    The servers the README starts, by the port it names.
    """

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.procs: list[subprocess.Popen] = []

    def start(self, command: str, cwd: Path) -> None:
        m = re.search(r"--port\s+tcp:(\d+)\S*", command)
        named = m.group(1) if m else "8080"
        command = re.sub(r"\s*--port\s+\S+", "", command)
        port = free_port()
        proc = subprocess.Popen(["bash", "-c", f"exec {command} --port tcp:{port}:interface=127.0.0.1"],
                                cwd=cwd, env=clean_env([str(BIN)]), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        wait_for_port(port, proc, deadline=60.0)
        from .support import drain_output

        drain_output(proc)
        self.ports[named] = port

    def rewrite(self, command: str) -> str:
        def local(m: re.Match) -> str:
            named = m.group(1) or "80"
            assert named in self.ports, f"no server started for localhost:{named}: {command}"
            return f"127.0.0.1:{self.ports[named]}"

        return re.sub(r"localhost(?::(\d+))?(?=[/'\s]|$)", local, command)

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)


def statuses(comment: str) -> list[int]:
    return [int(s) for s in re.findall(r"\b([1-5]\d\d)\b", comment)]


def run_line(line: Line, servers: Servers, cwd: Path) -> None:
    command = servers.rewrite(line.command)
    own_codes = "%{http_code}" in command
    if command.startswith("curl") and not own_codes:
        command += f" -s -w '\\n{STATUS_MARK}%{{http_code}}\\n'"
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=clean_env([str(BIN)]),
                          capture_output=True, text=True, timeout=120)
    allowed = {0, 28} if re.search(r"(^|\s)(-m|--max-time)\s", command) else {0}
    assert done.returncode in allowed, (line.command, done.returncode, done.stderr)
    out = done.stdout
    expected = statuses(line.comment)
    if command.startswith("curl") and not own_codes:
        out, _, status = out.rpartition(STATUS_MARK)
        status = int(status.strip())
        if expected:
            assert status == expected[0], (line.command, status, out)
        else:
            assert status < 400, (line.command, status, out)
    elif own_codes:
        got = {int(s) for s in re.findall(r"\b\d{3}\b", out)}
        assert expected and set(expected) <= got, (line.command, out)
    if line.expected:
        shown = [l for l in out.splitlines() if l.strip()]
        assert len(shown) >= len(line.expected), (line.command, out)
        for want, got_line in zip(line.expected, shown):
            try:
                assert json.loads(got_line) == json.loads(want), (line.command, got_line)
            except json.JSONDecodeError:
                assert got_line.strip() == want, (line.command, got_line)


@pytest.fixture(scope="module")
def sections() -> list[Section]:
    return parse((ROOT / "README.md").read_text())


def test_readme_is_read_as_expected(sections):
    """
    The blocks the test must find are there (a README edit that hides one
    from the test fails here, not silently).
    """
    titles = [s.title for s in sections]
    assert titles[0] == "Quick start"
    quick = sections[0]
    assert quick.lines[0].command == "pipecomet serve"
    assert any(l.command == "pipecomet --version" for l in quick.lines)
    app = next(s for s in sections if s.title == "An app in 20 lines")
    assert set(app.files) == {"hello.py", "hello.toml"}
    assert len(app.files["hello.py"].strip().splitlines()) <= 25
    assert [l.expected for l in app.lines if l.command.startswith("pipecomet check")] == [["ok"]]
    demo = next(s for s in sections if s.title == "The demo gateway")
    curls = [l for l in demo.lines if l.command.startswith(("curl", "for"))]
    assert len(curls) >= 20
    assert any(statuses(l.comment) == [403] for l in curls)
    assert any(statuses(l.comment) == [200, 429] for l in curls)


def test_readme_commands_run_as_written(sections):
    servers = Servers()
    folders: list[Path] = []
    try:
        for section in sections:
            cwd = Path(tempfile.mkdtemp(prefix="readme-"))
            folders.append(cwd)
            for name, text in section.files.items():
                (cwd / name).write_text(text)
            for line in section.lines:
                if is_server(line.command):
                    servers.start(line.command, cwd)
                else:
                    run_line(line, servers, cwd)
    finally:
        servers.stop()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
