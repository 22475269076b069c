"""
The twistd plugin and the ``pipecomet`` command in real subprocesses: the
demo served on a real port, a user's app with --app from the working
directory, a partial config laid over the demo's defaults, bad
configuration refused at start, ``pipecomet check``, the landing page,
and a SIGTERM that answers the calls in flight.  (Wheels and editable
installs: tests/test_it_packaging.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

from .support import ROOT, TWISTD, free_port, serve_process, twistd_server

PIPECOMET = str(Path(sys.executable).with_name("pipecomet"))
TWISTD_SCRIPT = str(Path(sys.executable).with_name("twistd"))


def get(port, path, headers=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_demo_served_by_twistd():
    with twistd_server() as (port, proc):
        status, headers, body = get(port, "/api/time.get?app_key=demo-key")
        assert status == 200
        assert "time" in json.loads(body)
        status, headers, body = get(port, "/api/time.get?app_key=wrong")
        assert status == 403
        assert json.loads(body)["error"]["code"] == "invalid_app_key"
        status, _, body = get(port, "/no/such/route")
        assert status == 404
        assert json.loads(body)["error"]["code"] == "not_found"
        codes = [get(port, "/api/time.get?app_key=demo-limited")[0] for _ in range(12)]
        assert 429 in codes
        status, _, body = get(port, "/api/search?app_key=demo-key&q=x",
                              {"accept": "application/x-ndjson"})
        names = [json.loads(line)["name"] for line in body.splitlines()]
        assert sorted(names) == ["images", "main", "news", "web"]


def test_user_app(tmp_path):
    (tmp_path / "myapp.py").write_text(textwrap.dedent("""
        from pipecomet import App, pipe

        @pipe
        def hello(inp, ctx, res):
            return {"hello": inp.query.get("name", "world")}

        app = App()
        app.route("/hello", [hello])
    """))
    # The twistd and pipecomet scripts (whose sys.path[0] is their bin
    # folder, not the working directory), no PYTHONPATH: each imports the
    # app from the folder it runs in.
    for command in ([TWISTD_SCRIPT, "-n", "--pidfile=", "pipecomet"], [PIPECOMET, "serve"]):
        port = free_port()
        with serve_process([*command, "--app", "myapp:app",
                            "--port", f"tcp:{port}:interface=127.0.0.1"], port, cwd=tmp_path,
                           clean_env=True):
            status, _, body = get(port, "/hello?name=ann")
            assert (status, json.loads(body)) == (200, {"hello": "ann"})


def run_twistd(*args, timeout=60):
    return subprocess.run([*TWISTD, "-n", "--pidfile=", "pipecomet",
                           "--port", f"tcp:{free_port()}:interface=127.0.0.1", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_bad_config_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nport = "tcp:0"\nflavour = "strawberry"\n')
    result = run_twistd("--config", str(bad))
    assert result.returncode != 0
    assert "server.flavour" in result.stdout + result.stderr

    bad.write_text("[demo.keys.k]\nrate = 0\n")
    result = run_twistd("--config", str(bad))
    assert result.returncode != 0
    assert "demo.keys.k" in result.stdout + result.stderr


def test_bad_app_refused():
    result = run_twistd("--app", "no_such_module_anywhere:app")
    assert result.returncode != 0
    assert "no_such_module_anywhere" in result.stdout + result.stderr


def test_options_override_config(tmp_path, monkeypatch):
    """
    --workers-module overrides the config file; the app is built and checked
    (not started) while the options are parsed.
    """
    from pipecomet._service import Options

    (tmp_path / "cpuapp.py").write_text(textwrap.dedent("""
        from pipecomet import App, process_pipe

        def make_app(config=None):
            app = App()
            app.route("/burn", [process_pipe("cpu_burn", lambda i, c, r: 1.0)])
            return app
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "c.toml"
    config.write_text('[workers]\nmodule = "nowhere.at_all"\nsize = 1\n')
    options = Options()
    options.parseOptions(["--config", str(config), "--app", "cpuapp:make_app",
                          "--workers-module", "pipecomet.demo.worker_functions"])
    app = options["app_object"]
    assert app.config.workers.module == "pipecomet.demo.worker_functions"
    assert app.config.workers.size == 1
    assert app.runtime.workers is not None
    assert not app.service.running


def test_partial_config_overlays_the_demo_defaults(tmp_path):
    """
    A file naming only the publish token serves the demo with that token
    and everything else (quota categories, workers, keys) as the demo's
    defaults.
    """
    config = tmp_path / "mine.toml"
    config.write_text('[comet]\npublish_token = "my-own-token"\n')
    with twistd_server(["--config", str(config)]) as (port, proc):
        assert get(port, "/api/fast.get?app_key=demo-key")[0] == 200
        assert get(port, "/api/time.get?app_key=demo-limited")[0] == 200

        def publish(token):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/_pipecomet/publish/news", data=b'{"a":1}',
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert publish("my-own-token") == 200
        assert publish("demo-publish-token") == 403
        status, _, body = get(port, "/_pipecomet/status")
        figures = json.loads(body)
        assert set(figures["quota"]["categories"]) >= {"slow", "fast"}
        assert figures["workers"]["size"] == 2


def run_cli(*args, cwd=None):
    return subprocess.run([PIPECOMET, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd or ROOT)


def test_pipecomet_check_version_and_processes(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[comet]\npublish_token = "t"\n[quota.categories.slow]\nlimit = 2\n')
    result = run_cli("check", "--config", str(good), cwd=tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[comet]\npublish_tokn = "t"\n')
    result = run_cli("check", "--config", str(bad), cwd=tmp_path)
    assert result.returncode != 0 and "ok" not in result.stdout
    assert "comet.publish_tokn" in result.stderr
    # A config the app cannot run with: the route's category is missing.
    bad.write_text('[quota.categories.slow]\nlimit = 0\n')
    result = run_cli("check", "--config", str(bad), cwd=tmp_path)
    assert result.returncode != 0 and "quota.categories.slow" in result.stderr
    from pipecomet import __version__
    result = run_cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"pipecomet {__version__}")
    # --processes reaches the service: the demo has comet routes, so two
    # processes on the in-memory bus are refused, naming [bus].
    result = run_cli("serve", "--processes", "2", "--port", f"tcp:{free_port()}")
    assert result.returncode != 0
    assert "--processes 2" in result.stderr and "[bus]" in result.stderr


def test_landing_page():
    with twistd_server() as (port, proc):
        status, headers, body = get(port, "/", {"accept": "text/html,application/xhtml+xml"})
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        page = body.decode()
        for href in ("/api/time.get?app_key=demo-key", "/demo/comet", "/_pipecomet/status"):
            assert f'href="{href.replace("&", "&amp;")}"' in page
        status, headers, body = get(port, "/", {"accept": "application/json"})
        assert status == 200 and headers["Content-Type"] == "application/json"
        listed = {e["path"] for e in json.loads(body)["endpoints"]}
        assert {"/api/<api>", "/api/echo", "/api/upload", "/api/cpu.burn", "/comet/<topic>",
                "/_pipecomet/publish/<topic>", "/demo/job"} <= listed

