"""
The README's example app, run as the README says: extracted from
README.md, served by twistd with its config file, called over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request

from .support import ROOT, twistd_server


def blocks(lang, after):
    text = (ROOT / "README.md").read_text()
    section = text[text.index(after):]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def test_readme_example_app(tmp_path):
    code = blocks("python", "## An app in 20 lines")[0]
    toml = blocks("toml", "## An app in 20 lines")[0]
    assert len(code.strip().splitlines()) <= 25
    (tmp_path / "hello.py").write_text(code)
    (tmp_path / "hello.toml").write_text(toml)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with twistd_server(["--app", "hello:app", "--config", str(tmp_path / "hello.toml")],
                       env=env) as (port, proc):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/me", headers={
            "x-api-key": "secret", "accept": "application/x-ndjson"})
        with urllib.request.urlopen(request, timeout=10) as r:
            lines = [json.loads(line) for line in r.read().splitlines()]
        assert lines == [
            {"name": "main", "result": {"user": "ann", "plan": "pro"}},
            {"name": "inbox", "result": ["hi"]},
            {"name": "feed", "result": ["news"]},
        ]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/me")
        try:
            urllib.request.urlopen(request, timeout=10)
            raise AssertionError("expected 401")
        except urllib.error.HTTPError as e:
            assert e.code == 401
            assert json.loads(e.read())["error"]["code"] == "unauthorized"
